"""impl="auto" under torch.compile (ops/backends/auto.py): the custom op picks its backend when it
runs, "fused" while a CUDA graph is captured and "chunked" otherwise, with one fixed layout of
auxiliary outputs for both. The capture is mocked (the Triton kernels run in the interpreter on
CPU); the real capture waits for a GPU (tests/ops/test_compile.py::test_compile_reduce_overhead_cuda)."""

from __future__ import annotations

import os

import pytest
import torch

from dvsft_kernels.ops.backends import Inputs, auto, chunked, fused
from dvsft_kernels.ops.custom_op import lce_custom_op
from dvsft_kernels.ops.options import LCEOptions

from .cases import check_against_spec, make_case, to_device

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")


@pytest.fixture
def spies(monkeypatch):
    """Counts of the chunked rows and the fused forward / backward cores that ran."""
    ran = {"chunked": 0, "fused_fwd": 0, "fused_bwd": 0}

    def spy(key, real):
        def f(*a, **k):
            ran[key] += 1
            return real(*a, **k)
        return f

    monkeypatch.setattr(chunked, "lce_chunked", spy("chunked", chunked.lce_chunked))
    monkeypatch.setattr(auto, "fused_forward_core", spy("fused_fwd", fused.fused_forward_core))
    monkeypatch.setattr(auto, "fused_backward_core", spy("fused_bwd", fused.fused_backward_core))
    return ran


def _via_auto(h, w, t, b, token_weights=None, num_items=None, **kwargs):
    """The custom op with the run-time "auto" backend, traced by torch.compile(fullgraph=True)."""
    options = LCEOptions(**kwargs, impl="auto")

    def f(h, w, b):
        return lce_custom_op(Inputs(h, w, b, t, token_weights, num_items), options, "auto").out

    return torch.compile(f, fullgraph=True, backend="aot_eager")(h, w, b)


@pytest.mark.parametrize("capture", [False, True], ids=["not_captured", "captured"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_auto_custom_op_picks_at_run_time(capture, reduction, spies, monkeypatch):
    monkeypatch.setattr(auto, "capturing", lambda: capture)
    case = make_case(lead=(3, 7), V=131, D=24, options={"bias": True, "token_weights": True, "softcap": 4.0},
                     reduction=reduction, seed=21)
    to_device(case, DEVICE)
    check_against_spec(case, torch.float32, _via_auto)
    if capture:
        # the fused kernels, forward then backward; "none" reruns the forward in its backward op
        assert spies["chunked"] == 0 and spies["fused_bwd"] == 1
        assert spies["fused_fwd"] == (2 if reduction == "none" else 1)
    else:
        assert spies["fused_fwd"] == spies["fused_bwd"] == 0 and spies["chunked"] >= 1
