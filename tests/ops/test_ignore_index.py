"""A non-default `ignore_index` for every impl, against the float64 spec (ops/naive.py).

The contract (ops/function.py): positions whose target equals `ignore_index` are dropped, whatever
its value; an index inside [0, V) therefore makes that id unusable as a target. -100 is then an
ordinary out-of-range target: a ValueError for "torch" / "chunked", a NaN row for "fused" (no host
sync there). "chunked" and "fused" run through the Triton interpreter on CPU, on small odd shapes."""

from __future__ import annotations

import os

import pytest
import torch

from dvsft_kernels import linear_cross_entropy
from dvsft_kernels.ops.naive import naive_linear_cross_entropy
from tests.ops.cases import lce_stats

N, D, V = 19, 24, 101
TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["torch", pytest.param("chunked", marks=pytest.mark.interpreter),
         pytest.param("fused", marks=pytest.mark.interpreter)]
OPTIONS = {"plain": {}, "all": {"bias": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 6.0,
                                "token_weights": True}}


def _skip_without_triton(impl):
    if impl != "torch" and not TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


def _inputs(ignore_index, options, seed=0):
    """float64 masters: about a third of the positions ignored (= ignore_index), no -100 anywhere."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * (3.0 / D**0.5)
    t = torch.randint(0, V, (N,), generator=g)
    if 0 <= ignore_index < V:  # that id is never a target: resample the rows that drew it
        t = torch.where(t == ignore_index, (t + 1) % V, t)
    t[torch.arange(N) % 3 == 1] = ignore_index
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if options.get("bias") else None
    tw = torch.rand(N, generator=g, dtype=torch.float64) * 2 if options.get("token_weights") else None
    kw = {k: v for k, v in options.items() if k not in ("bias", "token_weights")}
    return h, w, b, t, tw, kw


def _close(name, got, ref, rel=2e-5):
    """float32 result against the float64 spec: max error within rel of the reference's scale (a
    10 % error, a zeroed row or a dropped term is orders of magnitude above it)."""
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert scale > 0, f"{name}: the reference is all zero, the comparison would be empty"
    assert err <= rel * scale, f"{name}: max error {err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ignore_index", [-1, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_matches_spec(impl, ignore_index, reduction, options):
    _skip_without_triton(impl)
    h64, w64, b64, t, tw, kw = _inputs(ignore_index, OPTIONS[options])
    cot = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)  # a non-uniform upstream gradient for "none"

    h = h64.float().requires_grad_()
    w = w64.float().requires_grad_()
    b = b64.float().requires_grad_() if b64 is not None else None
    loss = linear_cross_entropy(h, w, t, b, ignore_index=ignore_index, reduction=reduction,
                                token_weights=tw.float() if tw is not None else None, impl=impl, **kw)
    (loss * cot.float() if reduction == "none" else loss).sum().backward()

    rh, rw = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    rb = b64.clone().requires_grad_() if b64 is not None else None
    ref = naive_linear_cross_entropy(rh, rw, t, rb, ignore_index=ignore_index, reduction=reduction,
                                     token_weights=tw, **kw)
    (ref * cot if reduction == "none" else ref).sum().backward()

    _close("loss", loss.detach(), ref.detach())
    _close("d_hidden", h.grad, rh.grad)
    _close("d_weight", w.grad, rw.grad)
    if b is not None:
        _close("d_bias", b.grad, rb.grad)
    ignored = t == ignore_index
    assert ignored.sum() >= N // 3 and (~ignored).sum() >= N // 2
    assert h.grad[ignored].abs().max() == 0  # ignored rows get no gradient
    if reduction == "none":
        assert loss[ignored].abs().max() == 0 and loss[~ignored].abs().min() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_stats_are_zero_at_ignored_positions(impl):
    _skip_without_triton(impl)
    h64, w64, _, t, _, _ = _inputs(7, {})
    out = lce_stats(h64.float(), w64.float(), t, ignore_index=7, impl=impl)
    _, lse, correct = naive_linear_cross_entropy(h64, w64, t, ignore_index=7, return_stats=True)
    ignored = t == 7
    assert not out.correct[ignored].any() and out.lse[ignored].abs().max() == 0
    assert out.row_loss[ignored].abs().max() == 0
    _close("lse", out.lse, lse)
    assert torch.equal(out.correct, correct)


@pytest.mark.parametrize("impl", ["torch", pytest.param("chunked", marks=pytest.mark.interpreter)])
def test_minus_100_is_a_bad_target_when_not_the_ignore_index(impl):
    _skip_without_triton(impl)
    h64, w64, _, t, _, _ = _inputs(7, {})
    t[0] = -100
    with pytest.raises(ValueError, match=r"^targets: values must lie in \[0, 101\) or equal ignore_index=7"):
        linear_cross_entropy(h64.float(), w64.float(), t, ignore_index=7, impl=impl)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")
def test_fused_gives_nan_for_minus_100_when_not_the_ignore_index():
    """README: "fused" gives a NaN loss for the row instead of a ValueError (no host sync)."""
    _skip_without_triton("fused")
    h64, w64, _, t, _, _ = _inputs(7, {})
    t[0] = -100
    rows = linear_cross_entropy(h64.float(), w64.float(), t, ignore_index=7, impl="fused", reduction="none")
    assert torch.isnan(rows[0])
    ok = t != 7
    ok[0] = False
    ref = naive_linear_cross_entropy(h64, w64, torch.where(ok, t, 7), ignore_index=7, reduction="none")
    _close("other rows", rows[1:], ref[1:])


def test_ignore_index_must_be_an_int():
    h64, w64, _, t, _, _ = _inputs(-1, {})
    for bad in (7.0, True, None):
        with pytest.raises(ValueError, match="^ignore_index: expected an int"):
            linear_cross_entropy(h64.float(), w64.float(), t, ignore_index=bad, impl="torch")
