import pytest
import torch

_real_empty, _real_empty_like = torch.empty, torch.empty_like


def _nan_fill(t):
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Fill every torch.empty / empty_like made from Python with NaN, so an output the code forgot
    to write fails loudly instead of passing with stale memory (fla's convention)."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan_fill(_real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan_fill(_real_empty_like(*a, **k)))
    yield


@pytest.fixture(autouse=True)
def fused_deterministic_kernels(monkeypatch):
    """The op tests run the fused deterministic backward on CUDA too (ops/fused.py keeps it behind
    DVSFT_FUSED_DETERMINISTIC=1 there until a GPU run verifies it): a GPU test run is that check.
    tests/ops/test_fused.py::test_deterministic_guard removes the variable to test the guard."""
    monkeypatch.setenv("DVSFT_FUSED_DETERMINISTIC", "1")
    yield
