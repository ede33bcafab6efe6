"""The fused CE chunk kernel (kernels/ce_chunk.py, its launcher `ce_chunk`) against a float64 reference written here.

The kernel's input is float32 logits, so the error rule's "PyTorch in the input dtype" is the same
reference run in float32 (for a bf16/fp16 G: that G rounded to the output dtype). The rule
(tests/ops/errors.py) compares whole-tensor norms, which the largest entries of G (the targets')
dominate, so G is also checked entry by entry (assert_g_entrywise): each entry is a short sum of
terms, s * dy * ((1 + 2 z lse) p - (1 - eps) onehot - eps / V), computed in float32, so its error
is a few float32 ulps of the magnitude of those terms (p carrying the error of its exponent's
argument, |y| + |lse| ulps), plus one ulp of the output dtype for the final rounding. That bound
is below 10 % of the entry for nearly all entries (test_g_check_catches_planted_faults measures
it); only entries that are themselves a cancellation of larger terms, or subnormal in float16,
get more room.
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

from dvsft_kernels.ops.kernels.ce_chunk import ce_chunk, ce_chunk_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_MODES = ("none", "inplace", torch.float32, torch.bfloat16, torch.float16)


def reference(x, t, scale, eps, zl, cap, dtype, q=None):
    """Loss, lse, G = scale * dloss/dx (autograd) and the argmax, all in `dtype`. Soft targets:
    t (m, K) with probabilities q (m, K), y_t = sum_k q_k y[t_k] (autograd adds repeated ids)."""
    xr = x.detach().to(dtype).requires_grad_()
    y = cap * torch.tanh(xr / cap) if cap else xr
    lse = torch.logsumexp(y, dim=-1)
    if q is None:
        y_t = y.gather(1, t.long()[:, None])[:, 0]
    else:
        y_t = (y.gather(1, t.long()) * q.to(dtype)).sum(1)
    loss = (1 - eps) * (lse - y_t) + eps * (lse - y.mean(dim=-1)) + zl * lse**2
    w = scale.to(dtype) if scale is not None else torch.ones_like(loss)
    (g,) = torch.autograd.grad((loss * w).sum(), xr)
    return loss.detach(), lse.detach(), g, y.argmax(dim=-1)


# float32 ulps of the terms' magnitude an entry of G may be off by (the interpreter needs <= 2.4:
# tanh and 1 - tanh^2 under softcap, exp / log elsewhere)
G_ULPS = 8


def term_magnitude(x, t, scale, eps, zl, cap, q=None):
    """Per entry of G, the magnitude of the terms it is computed from (float64): |s| |dy/dx|
    ((1 + 2 z |lse|) p (1 + |y| + |lse|) + (1 - eps) onehot + eps / V), with 1 + tanh^2 for the
    magnitude of the softcap's 1 - tanh^2; soft targets: onehot = sum_k q_k onehot(t_k)."""
    x = x.detach().cpu().double()
    if cap:
        u = torch.tanh(x / cap)
        y, dy = cap * u, 1 + u * u
    else:
        y, dy = x, torch.ones_like(x)
    lse = torch.logsumexp(y, dim=-1, keepdim=True)
    p = torch.exp(y - lse)
    if q is None:
        one = torch.nn.functional.one_hot(t.cpu().long(), x.shape[1]).double()
    else:
        one = torch.zeros_like(x).scatter_add_(1, t.cpu().long(), q.cpu().double().abs())
    s = scale.cpu().double().abs()[:, None] if scale is not None else 1.0
    return s * dy * ((1 + 2 * zl * lse.abs()) * p * (1 + y.abs() + lse.abs()) + (1 - eps) * one + eps / x.shape[1])


def g_entry_bound(g64, magnitude, dtype):
    """What each entry of G in `dtype` may be off by: G_ULPS float32 ulps of its terms' magnitude,
    one ulp of the output dtype for the rounding to it (and half a subnormal step)."""
    bound = G_ULPS * torch.finfo(torch.float32).eps * magnitude
    if dtype != torch.float32:
        fi = torch.finfo(dtype)
        bound = bound + fi.eps * g64.abs() + fi.tiny * fi.eps
    return bound


def assert_g_entrywise(name, g, g64, magnitude, dtype):
    err = (g.cpu().double() - g64.cpu()).abs()
    bound = g_entry_bound(g64.cpu(), magnitude, dtype)
    bad = err > bound
    worst = divmod(int((err / bound).argmax()), err.shape[-1])
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} entries off, worst "
                           f"{(err / bound).max():.3g} x the bound at {worst}")


def run_and_check(x, t, scale=None, *, eps=0.0, zl=0.0, cap=None, grad="inplace", block_v=None,
                  check_correct=True, q=None):
    """Run the kernel on a copy of x in the given grad mode and apply the error rule to every
    output. Returns (loss, lse, correct, G); correct: predicted == t (slot 0 for soft targets q)."""
    x = x.to(DEVICE)
    t = t.to(DEVICE)
    scale = scale.to(DEVICE) if scale is not None else None
    q = q.to(DEVICE) if q is not None else None
    xk = x.clone()
    grad_out = torch.empty(x.shape, dtype=grad, device=DEVICE) if isinstance(grad, torch.dtype) else None
    loss, lse, pred = ce_chunk(xk, t, scale, label_smoothing=eps, z_loss=zl, softcap=cap,
                               compute_grad=grad != "none", grad_out=grad_out, block_v=block_v, target_probs=q)
    assert loss.dtype == lse.dtype == torch.float32 and pred.dtype == torch.int32
    assert loss.shape == lse.shape == pred.shape == t.shape[:1]
    correct = pred.long() == (t if q is None else t[:, 0])
    l64, lse64, g64, c64 = reference(x, t, scale, eps, zl, cap, torch.float64, q)
    l32, lse32, g32, _ = reference(x, t, scale, eps, zl, cap, torch.float32, q)
    assert_error_rule("loss", loss, l64, l32, torch.float32)
    assert_error_rule("lse", lse, lse64, lse32, torch.float32)
    if check_correct:
        assert torch.equal(pred.long().cpu(), c64.cpu()), "predicted"
    if grad == "none":
        assert torch.equal(xk, x), "x was written with compute_grad=False"
        return loss, lse, correct, None
    g = xk if grad == "inplace" else grad_out
    g_dtype = torch.float32 if grad == "inplace" else grad
    assert_error_rule("G", g, g64, g32.to(g_dtype), g_dtype)
    assert_g_entrywise("G", g, g64, term_magnitude(x, t, scale, eps, zl, cap, q), g_dtype)
    # Row sums (s * 2 zl lse without softcap: softmax sums to 1, the one-hot and smoothing terms
    # to 1) weigh the V small entries together; they cancel to ~0 without z-loss or softcap, so the
    # floor scales with the sums of |G|.
    assert_error_rule("G row sums", g.double().sum(1), g64.sum(1), g32.to(g_dtype).double().sum(1), g_dtype,
                      magnitude=g64.abs().sum(1))
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


def _plant(fault, g, t):
    g = g.clone()
    rows = torch.arange(g.shape[0])
    if fault == "non_target_10pct":  # every entry but the targets' (which dominate the norms)
        keep = g[rows, t].clone()
        g *= 1.1
        g[rows, t] = keep
    elif fault == "one_row_10pct":
        g[2] *= 1.1
    elif fault == "median_entry_zeroed":  # an entry of typical size, not the largest
        g[1, g[1].abs().argsort()[g.shape[1] // 2]] = 0
    return g


@pytest.mark.parametrize("cap", (None, 4.0))
@pytest.mark.parametrize("grad", ("inplace", torch.bfloat16, torch.float16), ids=str)
def test_g_check_catches_planted_faults(grad, cap):
    """The entrywise check passes the kernel's G, binds (below 10 % of the entry) on most entries,
    and fails each planted fault; so does the kernel run without its smoothing term."""
    x, t, scale = logits(5, 517, seed=8)
    opts = {"eps": 0.1, "zl": 1e-3, "cap": cap}
    g = run_and_check(x, t, scale, **opts, grad=grad, block_v=128)[3].cpu()
    g_dtype = torch.float32 if grad == "inplace" else grad
    _, _, g64, _ = reference(x, t, scale, *opts.values(), torch.float64)
    magnitude = term_magnitude(x, t, scale, *opts.values())
    covered = (g_entry_bound(g64, magnitude, g_dtype) < 0.1 * g64.abs()).double().mean()
    assert covered >= 0.85, f"a 10 % error is visible in only {covered:.1%} of the entries"
    for fault in ("non_target_10pct", "one_row_10pct", "median_entry_zeroed"):
        with pytest.raises(AssertionError, match="^G: "):
            assert_g_entrywise("G", _plant(fault, g, t), g64, magnitude, g_dtype)
    xk = x.clone().to(DEVICE)
    out = torch.empty(x.shape, dtype=grad, device=DEVICE) if grad != "inplace" else None
    ce_chunk(xk, t.to(DEVICE), scale.to(DEVICE), label_smoothing=0.0, z_loss=1e-3, softcap=cap, grad_out=out,
             block_v=128)
    with pytest.raises(AssertionError, match="^G: "):
        assert_g_entrywise("G", xk if out is None else out, g64, magnitude, g_dtype)


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


# ------------------------------------------------------------------ soft targets
def soft_targets(m, V, K, seed=0):
    """(t, q) as the backends receive them: (m, K) ids and float32 probabilities summing to 1 per
    row; ~25 % of slots unused (slot 0's id, q = 0); row 1 repeats an id in two used slots (their
    probabilities add); the last row (m >= 3) has q = 0 throughout (a row of total weight 0)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, V, (m, K), generator=g)
    w = torch.rand(m, K, generator=g) + 0.05
    unused = torch.rand(m, K, generator=g) < 0.25
    unused[:, 0] = False
    if m > 1 and K > 1:
        t[1, K - 1] = t[1, 0]
        unused[1, K - 1] = False
    w[unused] = 0.0
    t = torch.where(unused, t[:, :1], t)
    q = (w / w.sum(1, keepdim=True)).float()
    if m >= 3:
        q[-1] = 0.0
    return t, q


@pytest.mark.parametrize("K", (1, 3, 16))
@pytest.mark.parametrize("m,V,block_v", [(1, 7, None), (5, 517, 128), (37, 1000, 128), (6, 130, None)])
def test_soft_odd_shapes(K, m, V, block_v):
    # V = 7 with K = 16: most ids repeat; 130 under the tile rule: one tile and a ragged tail
    x, _, scale = logits(m, V, seed=m * V + K)
    t, q = soft_targets(m, V, K, seed=K)
    run_and_check(x, t, scale, eps=0.1, zl=1e-3, cap=4.0, grad=torch.bfloat16, block_v=block_v, q=q,
                  check_correct=False)
    run_and_check(x, t, scale, grad="inplace", block_v=block_v, q=q, check_correct=False)


@pytest.mark.parametrize("opts", [{}, {"eps": 0.1, "zl": 1e-3, "cap": 4.0}], ids=("plain", "all"))
@pytest.mark.parametrize("grad", GRAD_MODES, ids=str)
def test_soft_every_grad_mode(opts, grad):
    x, _, scale = logits(5, 517, seed=11)
    t, q = soft_targets(5, 517, 3, seed=11)
    run_and_check(x, t, scale, **opts, grad=grad, block_v=128, q=q)


@OVERFLOW_IN_DISCARDED_LANES
def test_soft_large_logits():
    """|y| ~ 1e4: the soft loss is formed from M - y_k, so it stays accurate where lse and
    sum_k q_k y_k are each rounded to ulp(1e4)."""
    x, _, scale = logits(5, 517, seed=12)
    t, q = soft_targets(5, 517, 3, seed=12)
    run_and_check(x - 1e4, t, scale, eps=0.1, grad="inplace", block_v=128, q=q)


@pytest.mark.parametrize("grad", GRAD_MODES, ids=str)
def test_soft_k1_is_the_hard_kernel_bitwise(grad):
    x, t, scale = logits(6, 517, seed=13)
    outs = []
    for q in (None, torch.ones(6, 1)):
        xk = x.clone().to(DEVICE)
        out = torch.empty(x.shape, dtype=grad, device=DEVICE) if isinstance(grad, torch.dtype) else None
        res = ce_chunk(xk, (t if q is None else t[:, None]).to(DEVICE), scale.to(DEVICE), label_smoothing=0.1,
                       z_loss=1e-3, softcap=4.0, compute_grad=grad != "none", grad_out=out, block_v=128,
                       target_probs=q.to(DEVICE) if q is not None else None)
        outs.append((*res, xk if out is None else out))
    for name, a, b in zip(("loss", "lse", "predicted", "G"), *outs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("K", (3, 16))
@pytest.mark.parametrize("grad", ("inplace", torch.bfloat16), ids=str)
def test_soft_check_catches_planted_faults(K, grad):
    """The checks pass the kernel on (t, q), and fail it where it sees q without slots >= 1 (every
    output but the argmax) or without slot 0 of the repeated id of row 1 (G at that entry)."""
    x, _, scale = logits(5, 517, seed=14)
    t, q = soft_targets(5, 517, K, seed=14)
    opts = {"eps": 0.1, "zl": 1e-3, "cap": 4.0}
    run_and_check(x, t, scale, **opts, grad=grad, block_v=128, q=q)
    l64, _, g64, _ = reference(x, t, scale, *opts.values(), torch.float64, q)
    l32, _, _, _ = reference(x, t, scale, *opts.values(), torch.float32, q)
    magnitude = term_magnitude(x, t, scale, *opts.values(), q)
    g_dtype = torch.float32 if grad == "inplace" else grad
    dropped = q.clone()
    dropped[:, 1:] = 0.0
    no_repeat = q.clone()
    no_repeat[1, 0] = 0.0  # row 1's id in slots 0 and K - 1 gets only slot K - 1's share
    for fault, q_bad in (("slots >= 1 dropped", dropped), ("repeat not summed", no_repeat)):
        xk = x.clone().to(DEVICE)
        out = torch.empty(x.shape, dtype=grad, device=DEVICE) if grad != "inplace" else None
        loss, _, _ = ce_chunk(xk, t.to(DEVICE), scale.to(DEVICE), label_smoothing=0.1, z_loss=1e-3, softcap=4.0,
                              grad_out=out, block_v=128, target_probs=q_bad.to(DEVICE))
        with pytest.raises(AssertionError, match="^G: "):
            assert_g_entrywise("G", xk if out is None else out, g64, magnitude, g_dtype)
        if fault == "slots >= 1 dropped":
            with pytest.raises(AssertionError, match="^loss: "):
                assert_error_rule("loss", loss.cpu(), l64, l32, torch.float32)


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
    loss, lse, pred = ce_chunk(wide[:, :517], t.to(DEVICE, torch.int32), scale.to(DEVICE), softcap=4.0,
                               grad_out=g_wide[:, :517], block_v=128)
    l64, lse64, g64, c64 = reference(x, t, scale, 0.0, 0.0, 4.0, torch.float64)
    l32, lse32, g32, _ = reference(x, t, scale, 0.0, 0.0, 4.0, torch.float32)
    assert_error_rule("loss", loss.cpu(), l64, l32, torch.float32)
    assert_error_rule("lse", lse.cpu(), lse64, lse32, torch.float32)
    assert_error_rule("G", g_wide[:, :517].cpu(), g64, g32.bfloat16(), torch.bfloat16)
    assert_g_entrywise("G", g_wide[:, :517], g64, term_magnitude(x, t, scale, 0.0, 0.0, 4.0), torch.bfloat16)
    assert torch.equal(pred.long().cpu(), c64.cpu())
    assert (g_wide[:, 517:] == 0).all() and wide[:, 517:].isnan().all()


def test_grad_out_is_x_means_in_place():
    x, t, _ = logits(3, 517, seed=7)
    xk = x.clone().to(DEVICE)
    ce_chunk(xk, t.to(DEVICE), grad_out=xk, block_v=128)
    _, _, g64, _ = reference(x, t, None, 0.0, 0.0, None, torch.float64)
    assert_g_entrywise("G", xk, g64, term_magnitude(x, t, None, 0.0, 0.0, None), torch.float32)


def test_empty_chunk():
    loss, lse, pred = ce_chunk(torch.empty(0, 517, device=DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE))
    assert loss.shape == lse.shape == pred.shape == (0,)


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
    ({"targets": torch.zeros(2, 1, dtype=torch.long), "target_probs": torch.ones(2, 1, dtype=torch.float64)},
     "target_probs:"),
    ({"targets": torch.zeros(2, 1, dtype=torch.long), "target_probs": torch.ones(2, 3)}, "target_probs:"),
    ({"target_probs": torch.ones(2)}, "targets:"),
    ({"targets": torch.zeros(2, 0, dtype=torch.long), "target_probs": torch.ones(2, 0)}, "targets:"),
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
