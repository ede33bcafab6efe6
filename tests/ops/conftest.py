import pytest
import torch

_real_empty, _real_empty_like, _real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty


def _poison(t):
    """NaN in floats; in integers a large negative value, so an index nobody wrote points far out
    of bounds (tests/sanitizer.py names the access; unsanitised, the results go wrong)."""
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    elif t.dtype in (torch.int32, torch.int64):
        t.fill_(-(1 << 30))
    return t


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Poison every torch.empty / empty_like / Tensor.new_empty made from Python, so an output or
    index the code forgot to write fails loudly instead of passing with stale memory (fla's
    convention, extended to integers)."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(_real_new_empty(self, *a, **k)))
    yield


@pytest.fixture(autouse=True)
def fused_deterministic_kernels(monkeypatch):
    """The op tests run the fused deterministic backward on CUDA too (ops/backends/fused.py keeps it behind
    DVSFT_FUSED_DETERMINISTIC=1 there until a GPU run verifies it): a GPU test run is that check.
    tests/ops/test_fused.py::test_deterministic_guard removes the variable to test the guard."""
    monkeypatch.setenv("DVSFT_FUSED_DETERMINISTIC", "1")
    yield

