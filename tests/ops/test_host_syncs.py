"""The host-sync detector (tests/syncs.py) itself: each way of reading a device value on the host,
planted in an otherwise sync-free function, must show in OpLog.host_syncs(); the clean function
must not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ..syncs import OpLog

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _step(x: torch.Tensor) -> torch.Tensor:
    """Sync-free device work: what the planted reads are added to."""
    return (x.exp() * 2).sum(0)


def _host(y):
    """y itself on CPU (numpy() needs a host tensor; on CUDA the copy is caught as well)."""
    return y.detach() if y.device.type == "cpu" else y.detach().cpu()


PLANTED = {
    "Tensor.tolist": lambda y: y.tolist(),
    "Tensor.cpu": lambda y: y.cpu(),
    "Tensor.item": lambda y: y[0].item(),
    "Tensor.numpy": lambda y: _host(y).numpy(),
    "np.asarray": lambda y: np.asarray(_host(y)),
    "bool": lambda y: bool(y[0] > 0),
    "int": lambda y: int(y[0]),
    "nonzero": lambda y: y.nonzero(),
}
# what each planted read must be reported as (one of them is enough)
EXPECTED = {"Tensor.tolist": {"Tensor.tolist"}, "Tensor.cpu": {"Tensor.cpu"},
            "Tensor.item": {"Tensor.item", "aten._local_scalar_dense"},
            "Tensor.numpy": {"Tensor.numpy"}, "np.asarray": {"Tensor.numpy"},
            "bool": {"aten._local_scalar_dense", "aten.is_nonzero"},
            "int": {"aten._local_scalar_dense"}, "nonzero": {"aten.nonzero"}}


def _inputs():
    return torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def test_clean_function_has_no_syncs():
    log = OpLog()
    with log:
        _step(_inputs())
    assert log.ops and not log.host_syncs(), log.host_syncs()


@pytest.mark.parametrize("read", list(PLANTED))
def test_planted_host_read_is_caught(read):
    x = _inputs()
    log = OpLog()
    with log:
        PLANTED[read](_step(x))
    found = set(log.host_syncs())
    assert found & EXPECTED[read], f"{read}: reported {sorted(found)}"


def test_methods_are_restored_after_the_region():
    before = {m: getattr(torch.Tensor, m) for m in ("cpu", "tolist", "numpy", "item")}
    log = OpLog()
    with pytest.raises(RuntimeError, match="planted"), log:
        _step(_inputs()).tolist()
        raise RuntimeError("planted")
    assert {m: getattr(torch.Tensor, m) for m in before} == before
    # outside the region nothing is logged
    n = len(log.ops)
    _inputs().tolist()
    assert len(log.ops) == n and "Tensor.tolist" in log.host_syncs()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("copy", ["to_cpu", "copy_into_host"])
def test_device_to_host_copies_at_the_aten_level(copy):
    """On a GPU the copy itself is dispatched; seen without the method names."""
    y = _step(_inputs())
    host = torch.empty(y.shape)
    log = OpLog()
    with log:
        if copy == "to_cpu":
            y.to("cpu")
        else:
            host.copy_(y)
    assert "device-to-host copy" in log.host_syncs(), log.ops
