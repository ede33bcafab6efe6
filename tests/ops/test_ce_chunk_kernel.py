"""The fused CE chunk kernel (launch.ce_chunk) against a float64 reference written here.

The kernel's input is float32 logits, so the error rule's "PyTorch in the input dtype" is the same
reference run in float32 (for a bf16/fp16 G: that G rounded to the output dtype). The floor of
tests/ops/errors.py is 2e-6 x the output's magnitude (~17 float32 ulps): the kernel's own error is
a few ulps of y per element (its tanh is <= 4 ulps, exp2/log approximations 2 ulps) plus the
float32 sum of V terms, whose relative error grows like eps * sqrt(V / lanes) ~ 2 ulps here, so
17 ulps leaves a margin of ~3 without letting a wrong formula through (a missing term is >= 1e-3).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from tests.ops.errors import assert_error_rule

pytestmark = pytest.mark.interpreter

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set", allow_module_level=True)
pytest.importorskip("triton")

from dvsft_kernels.ops.launch import ce_chunk, ce_chunk_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_MODES = ("none", "inplace", torch.float32, torch.bfloat16, torch.float16)


def reference(x, t, scale, eps, zl, cap, dtype):
    """Loss, lse, G = scale * dloss/dx (autograd) and argmax == t, all in `dtype`."""
    xr = x.detach().to(dtype).requires_grad_()
    y = cap * torch.tanh(xr / cap) if cap else xr
    lse = torch.logsumexp(y, dim=-1)
    y_t = y.gather(1, t.long()[:, None])[:, 0]
    loss = (1 - eps) * (lse - y_t) + eps * (lse - y.mean(dim=-1)) + zl * lse**2
    w = scale.to(dtype) if scale is not None else torch.ones_like(loss)
    (g,) = torch.autograd.grad((loss * w).sum(), xr)
    return loss.detach(), lse.detach(), g, y.argmax(dim=-1) == t


def run_and_check(x, t, scale=None, *, eps=0.0, zl=0.0, cap=None, grad="inplace", block_v=None,
                  check_correct=True):
    """Run the kernel on a copy of x in the given grad mode and apply the error rule to every
    output. Returns (loss, lse, correct, G)."""
    x = x.to(DEVICE)
    t = t.to(DEVICE)
    scale = scale.to(DEVICE) if scale is not None else None
    xk = x.clone()
    grad_out = torch.empty(x.shape, dtype=grad, device=DEVICE) if isinstance(grad, torch.dtype) else None
    loss, lse, correct = ce_chunk(xk, t, scale, label_smoothing=eps, z_loss=zl, softcap=cap,
                                  compute_grad=grad != "none", grad_out=grad_out, block_v=block_v)
    assert loss.dtype == lse.dtype == torch.float32 and correct.dtype == torch.bool
    assert loss.shape == lse.shape == correct.shape == t.shape
    l64, lse64, g64, c64 = reference(x, t, scale, eps, zl, cap, torch.float64)
    l32, lse32, g32, _ = reference(x, t, scale, eps, zl, cap, torch.float32)
    assert_error_rule("loss", loss, l64, l32, torch.float32)
    assert_error_rule("lse", lse, lse64, lse32, torch.float32)
    if check_correct:
        assert torch.equal(correct.cpu(), c64.cpu()), "correct"
    if grad == "none":
        assert torch.equal(xk, x), "x was written with compute_grad=False"
        return loss, lse, correct, None
    g = xk if grad == "inplace" else grad_out
    g_dtype = torch.float32 if grad == "inplace" else grad
    assert_error_rule("G", g, g64, g32.to(g_dtype), g_dtype)
    # The max error is set by the largest entry (the target's); row sums (s * 2 zl lse without
    # softcap: softmax sums to 1, the one-hot and smoothing terms to 1) weigh the V small ones.
    assert_error_rule("G row sums", g.double().sum(1), g64.sum(1), g32.to(g_dtype).double().sum(1), g_dtype)
    if grad != "inplace":
        assert torch.equal(xk, x), "x was written although grad_out was given"
    return loss, lse, correct, g


def logits(m, V, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, V, generator=g) * spread
    t = torch.randint(0, V, (m,), generator=g)
    scale = torch.rand(m, generator=g) * 2
    return x, t, scale


@pytest.mark.parametrize("cap,zl,eps,use_scale", list(itertools.product((None, 4.0), (0.0, 1e-3), (0.0, 0.1),
                                                                         (False, True))))
@pytest.mark.parametrize("grad", GRAD_MODES, ids=str)
def test_every_option(cap, zl, eps, use_scale, grad):
    x, t, scale = logits(5, 517, seed=1)
    run_and_check(x, t, scale if use_scale else None, eps=eps, zl=zl, cap=cap, grad=grad, block_v=128)


@pytest.mark.parametrize("m", (1, 5, 37))
@pytest.mark.parametrize("V", (7, 517, 1000))
@pytest.mark.parametrize("block_v", (None, 128), ids=("rule", "bv128"))
def test_odd_shapes(m, V, block_v):
    # None: the wrapper's tile rule (one tile for these V); 128: several tiles and a ragged tail
    x, t, scale = logits(m, V, seed=m * V)
    run_and_check(x, t, scale, eps=0.1, zl=1e-3, cap=4.0, grad=torch.bfloat16, block_v=block_v)
    run_and_check(x, t, scale, grad="inplace", block_v=block_v)


# numpy warns about inf / nan in lanes the kernel discards (masked tail, the tanh branch not taken)
OVERFLOW_IN_DISCARDED_LANES = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")


@OVERFLOW_IN_DISCARDED_LANES
def test_saturated_softcap():
    """|x| >= 1e4 with softcap 30: y is exactly +-30 in float32 and float64 alike, exp(-2|u|)
    underflows, G is ~0 there; no NaN/inf. The max is tied over every saturated entry."""
    x, t, scale = logits(6, 517, seed=2)
    g = torch.Generator().manual_seed(3)
    big = torch.rand(x.shape, generator=g) < 0.1
    x[big] = torch.sign(torch.randn(int(big.sum()), generator=g)) * (1e4 + 1e3 * torch.rand(int(big.sum()), generator=g))
    x[5] = 2e4  # a whole row saturated: uniform softmax, argmax 0
    t[5] = 0
    t[4] = int(big[4].nonzero()[0])  # a saturated target
    _, _, correct, _ = run_and_check(x, t, scale, eps=0.1, zl=1e-3, cap=30.0, grad="inplace", block_v=128)
    assert bool(correct[5])


@OVERFLOW_IN_DISCARDED_LANES
@pytest.mark.parametrize("cap", (None, 30.0))
def test_large_negative(cap):
    """Logits around -1e4 (and -1e30 with softcap): nothing underflows to 0 / 0. Without softcap
    the kernel works from y - max, so its loss and G stay accurate where lse is rounded to ulp(1e4)."""
    x, t, scale = logits(5, 517, seed=4)
    x = x - (1e30 if cap else 1e4)
    run_and_check(x, t, scale, eps=0.1, zl=0.0 if cap is None else 1e-3, cap=cap, grad="inplace", block_v=128)


def test_argmax_ties_first_index():
    """torch.argmax returns the first maximal index; ties across tiles, lanes and inside a lane."""
    V, bv = 517, 128
    x = torch.randn(6, V, generator=torch.Generator().manual_seed(5))
    ties = [(0, 3, 200), (10, 11, 400), (7, 135, 263), (516, 515, 0), (300, 301, 302), (1, 129, 257)]
    targets = []
    for row, idx in enumerate(ties):
        x[row, list(idx)] = 9.0
        first = min(idx)
        # even rows: target the first tie (correct); odd rows: a later tie (not correct)
        targets.append(first if row % 2 == 0 else max(idx))
    t = torch.tensor(targets)
    for cap in (None, 30.0):
        _, _, correct, _ = run_and_check(x, t, cap=cap, grad="none", block_v=bv)
        assert correct.tolist() == [r % 2 == 0 for r in range(6)]


def test_strided_rows_and_int32_targets():
    x, t, scale = logits(5, 517, seed=6)
    wide = torch.full((5, 600), float("nan"), device=DEVICE)
    wide[:, :517] = x.to(DEVICE)
    g_wide = torch.zeros(5, 700, dtype=torch.bfloat16, device=DEVICE)
    loss, lse, correct = ce_chunk(wide[:, :517], t.to(DEVICE, torch.int32), scale.to(DEVICE), softcap=4.0,
                                  grad_out=g_wide[:, :517], block_v=128)
    l64, lse64, g64, c64 = reference(x, t, scale, 0.0, 0.0, 4.0, torch.float64)
    l32, lse32, g32, _ = reference(x, t, scale, 0.0, 0.0, 4.0, torch.float32)
    assert_error_rule("loss", loss.cpu(), l64, l32, torch.float32)
    assert_error_rule("lse", lse.cpu(), lse64, lse32, torch.float32)
    assert_error_rule("G", g_wide[:, :517].cpu(), g64, g32.bfloat16(), torch.bfloat16)
    assert torch.equal(correct.cpu(), c64.cpu())
    assert (g_wide[:, 517:] == 0).all() and wide[:, 517:].isnan().all()


def test_grad_out_is_x_means_in_place():
    x, t, _ = logits(3, 517, seed=7)
    xk = x.clone().to(DEVICE)
    ce_chunk(xk, t.to(DEVICE), grad_out=xk, block_v=128)
    _, _, g64, _ = reference(x, t, None, 0.0, 0.0, None, torch.float64)
    assert (xk.cpu().double() - g64).abs().max() < 1e-6


def test_empty_chunk():
    loss, lse, correct = ce_chunk(torch.empty(0, 517, device=DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE))
    assert loss.shape == lse.shape == correct.shape == (0,)


def test_tile_rule():
    assert ce_chunk_config(151936) == (2048, 256, 8)
    assert ce_chunk_config(1000) == (1024, 128, 4)
    assert ce_chunk_config(7) == (16, 4, 1)
    assert ce_chunk_config(517, 128) == (128, 32, 1)


@pytest.mark.parametrize("bad,match", [
    ({"x": torch.zeros(2, 8, dtype=torch.float64)}, "x:"),
    ({"x": torch.zeros(8, 2).T}, "x:"),
    ({"x": torch.zeros(2, 0)}, "x:"),
    ({"targets": torch.zeros(3, dtype=torch.long)}, "targets:"),
    ({"targets": torch.zeros(2)}, "targets:"),
    ({"row_scale": torch.ones(3)}, "row_scale:"),
    ({"z_loss": -1.0}, "z_loss:"),
    ({"label_smoothing": -0.1}, "label_smoothing:"),
    ({"softcap": 0.0}, "softcap:"),
    ({"grad_out": torch.zeros(2, 8, dtype=torch.float64)}, "grad_out:"),
    ({"grad_out": torch.zeros(2, 8), "compute_grad": False}, "grad_out:"),
    ({"block_v": 100}, "block_v:"),
])
def test_invalid_arguments(bad, match):
    args = {"x": torch.zeros(2, 8), "targets": torch.zeros(2, dtype=torch.long)}
    args.update(bad)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    x, targets = args.pop("x"), args.pop("targets")
    with pytest.raises(ValueError, match=match):
        ce_chunk(x, targets, **args)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="x:"):
        ce_chunk(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long))
