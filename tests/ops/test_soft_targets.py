"""Soft targets (`target_weights`, K weighted targets per position) in every implementation against
the float64 spec (ops/naive.py) under the error rule, K = 1 equal to the hard op, the statistics,
the edge rows (slots ignored, rows of total weight 0, duplicate ids), bad input, torch.compile, the
memory bound, and planted faults that the comparison must catch."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from dvsft_kernels import linear_cross_entropy, native
from dvsft_kernels.ops import function as function_mod
from dvsft_kernels.ops.naive import naive_linear_cross_entropy

from ..memory import AllocationRecorder
from .cases import OPTION_SETS, Case, check_against_spec, lce_stats, make_case, to_device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASKED_LANES = pytest.mark.filterwarnings("ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")


def soft_case(*, lead=(37,), K=3, D=72, V=517, options=None, reduction="mean", seed=3) -> Case:
    """A hard case with K targets per position: slot ids random, ~25 % of slots unused, some rows
    with every slot unused, a row whose weights are all 0, a row that repeats one id in two slots,
    weights exact in float32 (the op and the float64 spec see the same values)."""
    case = make_case(lead=lead, D=D, V=V, ignore_frac=0.0, options=options, reduction=reduction, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    ign = case.kwargs["ignore_index"]
    t = torch.randint(0, V, (*lead, K), generator=g)
    w = torch.rand(*lead, K, generator=g).float().double()
    t[torch.rand(*lead, K, generator=g) < 0.25] = ign
    flat_t, flat_w = t.view(-1, K), w.view(-1, K)
    n = flat_t.shape[0]
    flat_t[torch.rand(n, generator=g) < 0.2] = ign  # unlabeled rows
    if n > 3:
        flat_t[1] = torch.randint(0, V, (K,), generator=g)
        flat_w[1] = 0.0  # labeled, total weight 0
        if K > 1:
            flat_t[2] = torch.randint(0, V, (K,), generator=g)
            flat_t[2, 1] = flat_t[2, 0]  # one id in two slots: its weights add
    case.targets = t
    case.kwargs["target_weights"] = w
    return case


def _impl_fn(impl, **extra):
    def fn(*a, **k):
        return lce_stats(*a, **k, impl=impl, **extra).loss
    return fn


def _native_mode(mode, monkeypatch):
    monkeypatch.setenv("DVSFT_NATIVE", "1" if mode == "native" else "0")
    if mode == "native" and not native.native_available():
        pytest.skip(f"native epilogue not built: {native.native_status()}")


# ------------------------------------------------------------------ the spec itself
def test_spec_soft_row_is_the_weighted_sum_of_hard_rows():
    """The float64 spec with K targets equals K hard calls weighted by hand (independent of the
    soft code path of the spec)."""
    case = soft_case(K=4, options=OPTION_SETS["all"], reduction="none")
    kw = {k: v for k, v in case.kwargs.items() if k not in ("target_weights", "reduction", "num_items")}
    got = naive_linear_cross_entropy(case.hidden, case.weight, case.targets, case.bias, reduction="none",
                                     target_weights=case.kwargs["target_weights"], **kw)
    want = torch.zeros(case.targets.shape[:-1], dtype=torch.float64)
    for k in range(4):
        hard = naive_linear_cross_entropy(case.hidden, case.weight, case.targets[..., k], case.bias,
                                          reduction="none", **kw)
        want += case.kwargs["target_weights"][..., k] * hard
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ every implementation
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("mode", ["native", "plain"])
def test_torch_soft_matches_spec(mode, options, reduction, dtype, monkeypatch):
    _native_mode(mode, monkeypatch)
    case = soft_case(options=OPTION_SETS[options], reduction=reduction)
    check_against_spec(case, dtype, _impl_fn("torch", chunk_rows=16))


@pytest.mark.parametrize("K", [1, 2, 16])
@pytest.mark.parametrize("mode", ["native", "plain"])
def test_torch_soft_k_range(mode, K, monkeypatch):
    _native_mode(mode, monkeypatch)
    case = soft_case(K=K, options=OPTION_SETS["all"], lead=(5, 7))
    check_against_spec(case, torch.float32, _impl_fn("torch", chunk_rows=8))


@pytest.mark.interpreter
@pytest.mark.skipif(not _TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
@MASKED_LANES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "all"])
@pytest.mark.parametrize("impl, extra", [("chunked", {"chunk_rows": 16}),
                                         ("fused", {"deterministic": False}), ("fused", {"deterministic": True})],
                         ids=["chunked", "fused-atomic", "fused-staged"])
def test_triton_soft_matches_spec(impl, extra, options, reduction, dtype):
    # chunked: 37 rows in chunks of 16; fused: both backward designs
    case = to_device(soft_case(options=OPTION_SETS[options], reduction=reduction), DEVICE)
    check_against_spec(case, dtype, _impl_fn(impl, **extra))


def _impls():
    out = [pytest.param("torch", "native", id="torch-native"), pytest.param("torch", "plain", id="torch-plain")]
    if _TRITON:
        out += [pytest.param("chunked", None, id="chunked", marks=[pytest.mark.interpreter, MASKED_LANES]),
                pytest.param("fused", None, id="fused", marks=[pytest.mark.interpreter, MASKED_LANES])]
    return out


@pytest.mark.parametrize("impl, mode", _impls())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k1_weight_one_is_the_hard_op_exactly(impl, mode, reduction, monkeypatch):
    if mode:
        _native_mode(mode, monkeypatch)
    case = to_device(make_case(lead=(29,), options=OPTION_SETS["all"], reduction=reduction, seed=7), DEVICE)
    h, w, b = case.hidden.float(), case.weight.float(), case.bias.float()
    kw = dict(case.kwargs, token_weights=case.token_weights.float(), impl=impl)
    hard = lce_stats(h, w, case.targets, b, **kw)
    soft = lce_stats(h, w, case.targets[..., None], b, target_weights=torch.ones_like(h[..., :1]), **kw)
    for name in ("loss", "row_loss", "lse", "predicted", "correct"):
        assert torch.equal(getattr(hard, name), getattr(soft, name)), name


@pytest.mark.parametrize("impl, mode", _impls())
def test_soft_stats_match_spec(impl, mode, monkeypatch):
    if mode:
        _native_mode(mode, monkeypatch)
    case = soft_case(K=4, options={"label_smoothing": 0.1, "z_loss": 1e-3}, reduction="none")
    kw = dict(case.kwargs)
    tw = kw.pop("target_weights")
    ign = kw["ignore_index"]
    ref, ref_lse, ref_correct = naive_linear_cross_entropy(case.hidden, case.weight, case.targets,
                                                           target_weights=tw, return_stats=True, **kw)
    dev = to_device(case, DEVICE)
    got = lce_stats(dev.hidden.float(), dev.weight.float(), dev.targets, target_weights=tw.float().to(DEVICE),
                    impl=impl, **kw)
    torch.testing.assert_close(got.row_loss.cpu().double(), ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.lse.cpu().double(), ref_lse, rtol=2e-5, atol=2e-5)
    assert torch.equal(got.correct.cpu(), ref_correct)
    labeled = (case.targets != ign).any(-1)
    assert torch.equal(got.predicted.cpu() >= 0, labeled)


@pytest.mark.parametrize("impl, mode", _impls())
def test_correct_means_argmax_is_the_highest_weight_target(impl, mode, monkeypatch):
    """Rows built so that the argmax is slot 1's id: correct only where slot 1 has the most weight."""
    if mode:
        _native_mode(mode, monkeypatch)
    V, D = 67, 8
    weight = torch.eye(V, D) * 0 + torch.randn(V, D, generator=torch.Generator().manual_seed(0)) * 0.01
    hidden = torch.zeros(6, D)
    ids = torch.arange(6) + 3
    weight[ids, :] = 0
    weight[ids, torch.arange(6) % D] = 10.0
    hidden[torch.arange(6), torch.arange(6) % D] = 1.0  # row i's argmax is id i + 3
    targets = torch.stack([torch.full((6,), 50), ids], dim=1)
    tw = torch.tensor([[0.3, 0.7], [0.7, 0.3], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0], [0.2, 0.2]])
    targets[5, 0] = -100  # slot 0 unused: slot 1 is the top target despite its equal weight
    st = lce_stats(hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), target_weights=tw.to(DEVICE), impl=impl)
    assert st.correct.cpu().tolist() == [True, False, False, True, False, True]


@pytest.mark.parametrize("impl, mode", _impls())
def test_unlabeled_and_zero_weight_rows(impl, mode, monkeypatch):
    """A row whose slots are all ignored is ignored (not counted by "mean"); a labeled row of total
    weight 0 counts but adds no loss and no gradient; an all-ignored batch gives 0, not NaN."""
    if mode:
        _native_mode(mode, monkeypatch)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 16, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(33, 16, generator=g).to(DEVICE).requires_grad_()
    t = torch.tensor([[1, 2], [-100, -100], [5, 6], [7, -100]], device=DEVICE)
    c = torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.0, 0.0], [2.0, 9.0]], device=DEVICE)
    loss = linear_cross_entropy(h, w, t, target_weights=c, impl=impl)
    rows = linear_cross_entropy(h, w, t, target_weights=c, impl=impl, reduction="none")
    assert rows[1].item() == 0 and rows[2].item() == 0
    torch.testing.assert_close(loss, rows.sum() / 3)  # three labeled rows
    loss.backward()
    assert torch.all(h.grad[1] == 0) and torch.all(h.grad[2] == 0)
    assert torch.all(h.grad[0] != 0) and torch.all(h.grad[3] != 0)
    empty = linear_cross_entropy(h, w, torch.full_like(t, -100), target_weights=c, impl=impl)
    assert empty.item() == 0.0


# ------------------------------------------------------------------ planted faults
def _faulty(kind):
    real = function_mod.soft_targets

    def fake(targets, target_weights, ignore_index):
        t, q, total = real(targets, target_weights, ignore_index)
        if kind == "top_only":  # every slot but the top one dropped
            q = torch.where(torch.arange(q.shape[-1], device=q.device) == 0, (q > 0).to(q.dtype), 0.0)
        elif kind == "no_total":  # the row's total weight forgotten
            total = torch.where(total > 0, torch.ones_like(total), total)
        elif kind == "q_10pct":  # the second slot's probability 10 % too large
            q = q.clone()
            q[..., 1] *= 1.1
        return t, q, total
    return fake


@pytest.mark.parametrize("kind", ["top_only", "no_total", "q_10pct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_planted_fault_is_caught(kind, dtype, monkeypatch):
    monkeypatch.setenv("DVSFT_NATIVE", "0")
    case = soft_case(K=3, options=OPTION_SETS["all"])
    check_against_spec(case, dtype, _impl_fn("torch"))  # passes without the fault
    monkeypatch.setattr(function_mod, "soft_targets", _faulty(kind))
    with pytest.raises(AssertionError):
        check_against_spec(case, dtype, _impl_fn("torch"))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("mutate, match", [
    (lambda t, c: (t, -c), "target_weights: expected finite values >= 0"),
    (lambda t, c: (t, c.masked_fill(c > 0.5, float("nan"))), "target_weights: expected finite values"),
    (lambda t, c: (t, c.masked_fill(c > 0.5, float("inf"))), "target_weights: expected finite values"),
    (lambda t, c: (t, c[..., :2]), "targets: shape"),
    (lambda t, c: (t[..., 0], c[..., 0]), "target_weights: shape"),
    (lambda t, c: (t, c.long()), "target_weights: expected a floating dtype"),
    (lambda t, c: (t, c[:, :0]), "target_weights: K"),
    (lambda t, c: (t, [1.0]), "target_weights: expected a tensor"),
    (lambda t, c: (t.float(), c), "targets: expected an integer dtype"),
    (lambda t, c: (t.clamp_min(0) + 1000, c), "targets: values must lie in"),
])
def test_bad_input_names_the_argument(mutate, match):
    h, w = torch.randn(5, 8), torch.randn(40, 8)
    t = torch.randint(0, 40, (5, 3))
    c = torch.rand(5, 3)
    t2, c2 = mutate(t, c)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(h, w, t2, target_weights=c2, impl="torch")


# ------------------------------------------------------------------ compile, memory
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_under_torch_compile(reduction):
    case = soft_case(K=4, options=OPTION_SETS["all"], reduction=reduction)

    def fn(*a, **k):
        return linear_cross_entropy(*a, **k, impl="torch")

    eager = check_against_spec(case, torch.float32, fn)
    compiled = check_against_spec(case, torch.float32, torch.compile(fn, fullgraph=True, backend="aot_eager"))
    for key in ("loss", "hidden", "weight", "bias"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-6, atol=1e-7)


def test_soft_custom_op_opcheck():
    from dvsft_kernels.ops.options import LCEOptions

    case = soft_case(K=3, options=OPTION_SETS["all"])
    t, q, total = function_mod.soft_targets(case.targets, case.kwargs["target_weights"], -100)
    options = LCEOptions(reduction="mean", label_smoothing=0.1, z_loss=1e-3, softcap=4.0, impl="torch")
    args = (case.hidden.float().requires_grad_(), case.weight.float().requires_grad_(),
            case.bias.float().requires_grad_(), t, total * case.token_weights.float(), q, torch.tensor(50),
            True, True, True, "torch", *dataclasses.astuple(options))
    torch.library.opcheck(torch.ops.dvsft_kernels.linear_cross_entropy.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("mode", ["native", "plain"])
def test_k16_allocates_no_more_than_k1_beyond_per_row_arrays(mode, monkeypatch):
    """Peak bytes of a K = 16 call over a K = 1 call on the same rows: at most the per-row (N, K)
    arrays (ids, probabilities and their sort), never a (rows, V) buffer."""
    _native_mode(mode, monkeypatch)
    N, D, V = 256, 64, 4099
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * 0.1
    peaks = {}
    for K in (1, 16):
        t = torch.randint(0, V, (N, K), generator=g)
        c = torch.rand(N, K, generator=g)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        linear_cross_entropy(hh, ww, t, target_weights=c, impl="torch", chunk_rows=64).backward()  # warm
        with AllocationRecorder() as rec:
            linear_cross_entropy(hh, ww, t, target_weights=c, impl="torch", chunk_rows=64).backward()
        peaks[K] = rec.peak
    per_row = N * 16 * (8 + 4) * 4  # ids (int64) and float32 weights, a few copies each
    assert peaks[16] - peaks[1] <= per_row, (peaks, per_row)
    assert peaks[16] - peaks[1] < 64 * V * 4  # not one more logits chunk
