"""README's `impl="auto"` rule (ops/backends `select_backend`): "torch" on CPU or without Triton;
on CUDA with Triton "chunked" eager and "fused" while a CUDA graph is captured; under torch.compile
the run-time "auto" backend, which makes the same choice inside the custom op when it runs
(tests/ops/test_compile.py runs it). CUDA and Triton are mocked, so every branch runs on a CPU
machine."""

from __future__ import annotations

import pytest
import torch

from dvsft_kernels import linear_cross_entropy
from dvsft_kernels.ops import backends, options
from dvsft_kernels.ops.backends import pytorch
from dvsft_kernels.ops.options import LCEOptions

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def _select(impl, device):
    """The name of the backend select_backend picks for `impl` on `device`."""
    return backends.select_backend(impl, device, LCEOptions()).name


@pytest.fixture
def env(monkeypatch):
    """set(triton=..., capturing=..., compiling=..., interpret=...): the machine resolve_impl sees."""

    def set_(*, triton=True, capturing=False, compiling=False, interpret=False):
        monkeypatch.setattr(backends, "triton_available", lambda: triton)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")

    return set_


@pytest.mark.parametrize("triton, capturing, compiling, want", [
    (True, False, False, "chunked"),   # eager: the fastest
    (True, True, False, "fused"),      # CUDA-graph capture: the sync-free one
    (True, False, True, "auto"),       # torch.compile tracing: chosen at run time inside the custom op
    (True, True, True, "auto"),
    (False, False, False, "torch"),    # CUDA without Triton
    (False, True, False, "torch"),
])
def test_auto_on_cuda(env, triton, capturing, compiling, want):
    env(triton=triton, capturing=capturing, compiling=compiling)
    assert _select("auto", CUDA) == want


@pytest.mark.parametrize("capturing, compiling", [(False, False), (True, False), (False, True)])
def test_auto_on_cpu_is_torch_even_with_triton(env, capturing, compiling):
    env(triton=True, capturing=capturing, compiling=compiling, interpret=True)
    assert _select("auto", CPU) == "torch"


@pytest.mark.parametrize("impl", ["torch", "chunked", "fused"])
def test_explicit_impl_is_kept_where_it_can_run(env, impl):
    env(triton=True, capturing=True, compiling=True)
    assert _select(impl, CUDA) == impl
    env(triton=True, interpret=True)  # the interpreter runs the Triton impls on CPU tensors
    assert _select(impl, CPU) == impl


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_explicit_triton_impl_refusals(env, impl):
    env(triton=False)
    with pytest.raises(ValueError, match=rf"^impl: '{impl}' needs the triton package"):
        _select(impl, CUDA)
    env(triton=True, interpret=False)
    with pytest.raises(ValueError, match=rf"^impl: '{impl}' runs Triton kernels and needs CUDA tensors"):
        _select(impl, CPU)
    env(triton=True)
    assert _select("torch", CPU) == "torch"  # "torch" needs neither


@pytest.mark.parametrize("bad", ["Torch", "triton", "", None])
def test_unknown_impl(bad):
    with pytest.raises(ValueError, match="^impl: expected one of"):
        _select(bad, CPU)
    with pytest.raises(ValueError, match="^impl: expected one of"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), impl=bad)


def test_no_host_sync_allowed_sees_capture_and_compile(env):
    env(capturing=False, compiling=False)
    assert not options.no_host_sync_allowed()
    env(capturing=True, compiling=False)
    assert options.no_host_sync_allowed()
    env(capturing=False, compiling=True)
    assert options.no_host_sync_allowed()


def test_real_compile_trace_counts_as_no_sync():
    """Unmocked: while torch.compile traces, the rule's compile branch is taken."""
    seen = []

    def f(x):
        seen.append(options.no_host_sync_allowed())
        return x + 1

    torch.compile(f, backend="eager")(torch.ones(2))
    assert seen == [True]
    seen.clear()
    f(torch.ones(2))
    assert seen == [torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()]


def test_auto_runs_the_torch_impl_on_cpu(monkeypatch):
    """Through the public op: impl="auto" on CPU tensors reaches the PyTorch implementation."""
    calls = []
    real = pytorch.lce_torch

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(pytorch, "lce_torch", spy)
    h, w, t = torch.randn(6, 8), torch.randn(11, 8), torch.tensor([1, -100, 3, 4, -100, 10])
    linear_cross_entropy(h, w, t)
    assert calls == [torch.Size([4, 8])]  # the 4 labeled rows only
