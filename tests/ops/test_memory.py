"""Memory and work bounds of the torch impl, counted exactly (no timings)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dvsft_kernels.ops.gemm import release_workspace
from tests.ops.cases import lce_stats

from ..memory import AllocationRecorder

N, D, V, CHUNK = 512, 16, 4096, 32


def inputs(frac, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.3).requires_grad_()
    b = torch.zeros(V).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    n_lab = round(frac * N)
    t[n_lab:] = -100
    return h, w, b, t, n_lab


@pytest.fixture(autouse=True)
def fresh_workspace():
    """The CPU logits buffers are kept between calls; free them so each test sees (and counts)
    its own."""
    release_workspace()
    yield
    release_workspace()


@pytest.mark.parametrize("options", [{}, {"softcap": 5.0, "label_smoothing": 0.1, "z_loss": 1e-3}])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_no_tensor_larger_than_a_chunk_or_a_parameter(options, reduction, bias):
    h, w, b, t, _ = inputs(1.0, bias=bias)
    rec = AllocationRecorder()
    with rec:
        out = lce_stats(h, w, t, b, reduction=reduction, impl="torch", chunk_rows=CHUNK,
                                              **options)
        out.loss.sum().backward()
    # the largest legitimate tensors: one chunk of logits, a weight-sized gradient
    bound = max(CHUNK * V, V * D)
    assert rec.largest <= bound, f"{rec.largest_op()} exceeds {bound} (N x V would be {N * V})"
    # peak live bytes: a few chunks + a few parameter-sized buffers, far below one N x V float32
    assert rec.peak < 0.25 * N * V * 4, f"peak {rec.peak} bytes"


def test_work_and_allocations_scale_with_labeled_rows():
    res = {}
    for frac in (1.0, 0.1):
        release_workspace()
        h, w, _, t, n_lab = inputs(frac)
        rec = AllocationRecorder()
        with FlopCounterMode(display=False) as fc, rec:
            # default chunking: the budget allows all N rows in one chunk, so the logits buffer is
            # sized by the labeled rows alone
            lce_stats(h, w, t, impl="torch").loss.backward()
        res[frac] = (fc.get_total_flops(), n_lab, rec)
        # nothing larger than the labeled rows' logits or a weight-sized gradient
        assert rec.largest <= max(n_lab * V, V * D), f"frac {frac}: {rec.largest_op()} for {n_lab} labeled rows"
    for frac, (flops, n_lab, _) in res.items():
        assert flops == 6 * n_lab * D * V, f"frac {frac}: {flops} FLOPs, expected 6 n D V with n = {n_lab}"
    # everything but the parameter-sized gradient (V x D) shrinks with the labeled rows
    def row_elems(rec):
        return sum(n for _, shape, n in rec.sizes if shape != (V, D))
    assert row_elems(res[0.1][2]) < 0.15 * row_elems(res[1.0][2])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_impl_bounded_by_its_chunk(dtype):
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    n, d, v, chunk = 256, 16, 1024, 16  # small: the kernel runs in the interpreter
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dev, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).to(dev, dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(dev)
    rec = AllocationRecorder()
    with rec:
        lce_stats(h, w, t, impl="chunked", chunk_rows=chunk, softcap=3.0).loss.backward()
    assert rec.largest <= max(chunk * v, v * d), f"{rec.largest_op()}"
    # live at once: the float32 chunk and its gradient copy, a few weight-sized float32 buffers
    # (dW, its scaled result, the float32 copy of a half weight), a few row-sized ones
    bound = 2 * chunk * v * 4 + 3 * v * d * 4 + 8 * n * d * 4
    assert rec.peak <= bound < n * v * 4, f"peak {rec.peak} bytes, bound {bound}"


def test_workspace_is_reused_and_released():
    import gc
    import weakref

    h, w, _, t, _ = inputs(1.0)
    lce_stats(h.detach(), w.detach(), t, impl="torch", chunk_rows=CHUNK)
    rec = AllocationRecorder()
    with rec:  # second call: the chunk buffer is not allocated again
        lce_stats(h.detach(), w.detach(), t, impl="torch", chunk_rows=CHUNK)
    assert rec.largest < CHUNK * V, rec.largest_op()
    from dvsft_kernels.ops import gemm

    ref = weakref.ref(gemm.workspace_buffer(0))
    release_workspace()
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_grad_forward_does_only_the_projection(reduction):
    """Under torch.no_grad (an eval loop) with parameters that require grad, the op does the
    forward's 2 n D V and no gradient work (autograd.Function's needs_input_grad ignores grad
    mode), and returns the same loss as with gradients on."""
    h, w, _, t, n_lab = inputs(0.5)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        loss = lce_stats(h, w, t, reduction=reduction, impl="torch").loss
    assert fc.get_total_flops() == 2 * n_lab * D * V
    assert not loss.requires_grad
    torch.testing.assert_close(loss, lce_stats(h, w, t, reduction=reduction,
                                                                      impl="torch").loss.detach())
