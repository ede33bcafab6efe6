"""impl="fused" (ops/backends/fused.py, kernels/lce_fused_*.py) through the interpreter: parity with the
float64 spec under the error rule, statistics, argmax ties, splits, determinism, gradient filtering
within its documented bound, memory, and the absence of host synchronisations."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from dvsft_kernels import linear_cross_entropy
from dvsft_kernels.ops import function as function_mod
from dvsft_kernels.ops.backends import Inputs
from dvsft_kernels.ops.backends import auto as auto_backend
from dvsft_kernels.ops.backends import fused as fused_backend
from dvsft_kernels.ops.custom_op import lce_custom_op
from dvsft_kernels.ops.kernels import fused_config, lce_fused_bwd, lce_fused_fwd
from dvsft_kernels.ops.naive import naive_linear_cross_entropy
from dvsft_kernels.ops.options import LCEOptions
from tests.ops.cases import lce_stats

from ..memory import AllocationRecorder
from ..syncs import OpLog
from .cases import OPTION_SETS, check_against_spec, make_case, reference, run, to_device
from .errors import assert_error_rule

pytestmark = pytest.mark.interpreter
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# numpy warns about exp overflow in lanes the kernels mask out (padded rows, the tanh branch not taken)
MASKED_LANES = pytest.mark.filterwarnings("ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")


def fused_fn(**extra):
    def fn(*a, **k):
        return lce_stats(*a, **k, impl="fused", **extra).loss
    return fn


def use_config(monkeypatch, **fields):
    """Every fused call in this test runs its device's default config with `fields` replaced."""
    real = fused_config.default_config
    monkeypatch.setattr(fused_config, "default_config", lambda dev, dt: dataclasses.replace(real(dev, dt), **fields))


@MASKED_LANES
@pytest.mark.parametrize("options, ignore_frac", [("plain", 0.3), ("all", 0.3), ("all", 1.0), ("plain", 0.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backward", ["atomic", "staged", "staged_torch_gemm"])
def test_fused_matches_spec(backward, dtype, reduction, options, ignore_frac, monkeypatch):
    # the op tests' matrix; 37 rows, V = 517, D = 72: no count is a multiple of any tile (16 rows,
    # 64 vocabulary entries, 32 of D) and the vocabulary falls into splits of several tiles; the
    # staged (deterministic) backward in chunks of 64-192 entries (INTERPRETER_CONFIG.stage_bytes),
    # its gradient GEMMs in Triton or torch.mm
    if backward == "staged_torch_gemm":
        use_config(monkeypatch, stage_gemm="torch")
    case = to_device(make_case(lead=(37,), ignore_frac=ignore_frac, options=OPTION_SETS[options],
                               reduction=reduction, seed=11), DEVICE)
    got = check_against_spec(case, dtype, fused_fn(deterministic=backward != "atomic"))
    if ignore_frac == 1.0:
        for key in ("loss", "hidden", "weight", "bias"):
            assert torch.count_nonzero(got[key]) == 0, f"{key} must be exactly zero when all ignored"


@MASKED_LANES
@pytest.mark.parametrize("options", ["softcap", "smoothing", "z_loss", "token_weights", "num_items"])
def test_fused_each_option_with_leading_dims(options):
    case = to_device(make_case(lead=(2, 19), options=OPTION_SETS[options], seed=3), DEVICE)
    check_against_spec(case, torch.float32, fused_fn(deterministic=True))


@MASKED_LANES
def test_stats_match_torch_impl():
    case = to_device(make_case(lead=(29,), options={"softcap": 4.0, "bias": True}, seed=5), DEVICE)
    args = (case.hidden.float(), case.weight.float(), case.targets, case.bias.float())
    a = lce_stats(*args, softcap=4.0, impl="fused")
    b = lce_stats(*args, softcap=4.0, impl="torch")
    torch.testing.assert_close(a.lse, b.lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.row_loss, b.row_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.correct, b.correct)
    top = (case.hidden.double() @ case.weight.double().T + case.bias.double()).argmax(-1)
    labeled = case.targets != -100
    assert torch.equal(a.predicted, b.predicted) and torch.equal(a.predicted[labeled].cpu(), top[labeled].cpu())
    assert bool((a.predicted[~labeled] == -1).all())


def _tie_inputs(V, D=16):
    """Integer hidden states and weights: every logit is exact in float32, so ties are exact."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-2, 3, (V, D), generator=g).float()
    h = torch.randint(-2, 3, (6, D), generator=g).float()
    return h, w


@pytest.mark.parametrize("config", ["default", "one_split"])
def test_argmax_first_index_across_tiles_and_splits(config):
    V = 517
    h, w = _tie_inputs(V)
    # the same top logit at several vocabulary entries in different tiles and splits
    ties = [(3, 200), (70, 400), (135, 263, 500), (516, 0), (64, 65), (1, 129, 257)]
    for row, idx in enumerate(ties):
        w[list(idx)] = 10.0 * h[row].sign()
    z = h @ w.T
    targets = []
    for row, idx in enumerate(ties):
        top = z[row].max()
        first = int((z[row] == top).nonzero()[0])
        assert first == min(idx)
        targets.append(first if row % 2 == 0 else max(idx))  # odd rows: a later tie, not correct
    t = torch.tensor(targets)
    cfg = None
    if config == "one_split":
        cfg = dataclasses.replace(fused_config.INTERPRETER_CONFIG, fwd=fused_config.Tiles(BM=16, BV=64, BK=16), s_min=1,
                                  s_max=1, target_programs=1)
    idx, count = fused_backend.build_index(t.to(DEVICE), -100)
    _, _, pred, _ = lce_fused_fwd.fused_forward(h.to(DEVICE), w.to(DEVICE), None, t.to(DEVICE), idx, count, config=cfg)
    assert pred.cpu().tolist() == [min(i) for i in ties]


@MASKED_LANES
@pytest.mark.parametrize("s_min, target, bv", [(1, 1, 16), (4, 64, 32), (8, 1, 64)])
def test_split_choices_agree(s_min, target, bv):
    """The device picks the number of vocabulary splits from the labeled count: one split of many
    tiles, many splits of one tile, and in between give the same statistics."""
    case = make_case(lead=(45,), V=300, D=40, options={"bias": True, "label_smoothing": 0.1, "softcap": 5.0},
                     seed=9)
    h, w, b = (x.float().to(DEVICE) for x in (case.hidden, case.weight, case.bias))
    t = case.targets.to(DEVICE)
    cfg = dataclasses.replace(fused_config.INTERPRETER_CONFIG, fwd=fused_config.Tiles(BM=16, BV=bv, BK=16), s_min=s_min,
                              s_max=8, target_programs=target)
    idx, count = fused_backend.build_index(t, -100)
    loss, lse, pred, _ = lce_fused_fwd.fused_forward(h, w, b, t, idx, count, label_smoothing=0.1, softcap=5.0,
                                                     config=cfg)
    correct = (pred.long() == t) & (t != -100)
    ref_loss = naive_linear_cross_entropy(case.hidden, case.weight, case.targets, case.bias, reduction="none",
                                          label_smoothing=0.1, softcap=5.0)
    _, ref_lse, ref_correct = naive_linear_cross_entropy(case.hidden, case.weight, case.targets, case.bias,
                                                         label_smoothing=0.1, softcap=5.0, return_stats=True)
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=0, atol=2e-5)
    assert torch.equal(correct.cpu(), ref_correct)


@MASKED_LANES
def test_strided_inputs_and_frozen_weight():
    """Transposed storage for hidden and weight (the kernels take both strides), strided
    targets; then a frozen head: no weight gradient work."""
    case = make_case(lead=(2, 3, 11), D=24, V=97, options={"bias": True, "token_weights": True})
    ref = reference(case)
    h = case.hidden.float().transpose(0, 1).contiguous().transpose(0, 1).to(DEVICE).requires_grad_()
    w = case.weight.float().T.contiguous().T.to(DEVICE).requires_grad_()
    assert not h.is_contiguous() and w.stride() == (1, 97)
    t = torch.stack([case.targets, case.targets], -1).to(DEVICE)[..., 0]
    b = case.bias.float().to(DEVICE).requires_grad_()
    tw = case.token_weights.float().to(DEVICE)
    loss = linear_cross_entropy(h, w, t, b, token_weights=tw, impl="fused")
    loss.backward()
    for got, key in ((loss, "loss"), (h.grad, "hidden"), (w.grad, "weight"), (b.grad, "bias")):
        torch.testing.assert_close(got.cpu().double(), ref[key], rtol=1e-4, atol=1e-6)
    h.grad = None
    linear_cross_entropy(h, w.detach(), t, token_weights=tw, impl="fused").backward()
    assert h.grad is not None


def test_build_index_order_and_count():
    t = torch.tensor([5, -100, 2, -100, -100, 7, 0, -100]).to(DEVICE)
    idx, count = fused_backend.build_index(t, -100)
    assert idx.dtype == count.dtype == torch.int32 and idx.shape == (8,) and count.shape == (1,)
    assert int(count) == 4 and idx[:4].cpu().tolist() == [0, 2, 5, 6]
    idx, count = fused_backend.build_index(torch.full((3,), -100, device=DEVICE), -100)
    assert int(count) == 0


# ---------------------------------------------------------------- determinism
@MASKED_LANES
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the interpreter runs programs one at a "
                    "time, so any design repeats bitwise there")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_deterministic_mode_is_bitwise_repeatable(reduction):
    case = to_device(make_case(lead=(37,), options=OPTION_SETS["all"], reduction=reduction, seed=2), DEVICE)
    fn = fused_fn(deterministic=True)
    a = run(fn, case, torch.bfloat16)
    b = run(fn, case, torch.bfloat16)
    for key in ("loss", "hidden", "weight", "bias"):
        assert torch.equal(a[key], b[key]), key


@MASKED_LANES
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_deterministic_mode_is_the_same_math(reduction):
    """The staged (deterministic) backward against the atomic default in float32."""
    case = to_device(make_case(lead=(37,), options=OPTION_SETS["all"], reduction=reduction, seed=2), DEVICE)
    c = run(fused_fn(deterministic=False), case, torch.float32)
    d = run(fused_fn(deterministic=True), case, torch.float32)
    for key in ("hidden", "weight", "bias"):
        scale = float(c[key].abs().max())
        torch.testing.assert_close(d[key], c[key], rtol=1e-5, atol=1e-6 * scale, msg=key)


def _stage_inputs(dtype):
    """37 rows (9 ignored) of the op matrix's shape with bias, softcap, smoothing and z-loss, the
    forward's statistics and row scales: the backward's inputs."""
    case = make_case(lead=(37,), options=OPTION_SETS["all"], seed=5)
    h, w, b = (x.to(dtype).to(DEVICE) for x in (case.hidden, case.weight, case.bias))
    t = case.targets.to(DEVICE)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}
    idx, count = fused_backend.build_index(t, -100)
    stat = lce_fused_fwd.fused_forward(h, w, b, t, idx, count, **opts)[3]
    s = torch.rand(37, generator=torch.Generator().manual_seed(1)).to(DEVICE) + 0.5
    return (h, w, b, t, idx, count, stat, s), opts


@MASKED_LANES
@pytest.mark.parametrize("grads", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1)], ids=["all", "h", "w", "b"])
@pytest.mark.parametrize("stage_bytes", [1, 37 * 192 * 4, 1 << 30], ids=["tile_chunks", "3_chunks", "one_chunk"])
@pytest.mark.parametrize("gemm", ["triton", "torch"])
def test_staged_backward_matches_atomic_for_any_chunking(gemm, stage_bytes, grads):
    """The staged backward (chunks of one column tile up to the whole vocabulary, the last one
    partial; each gradient alone, db without dW; gradient GEMMs in Triton or torch.mm) against the
    atomic kernel in float32, which the spec tests pin (bitwise repeatability: the CUDA test below)."""
    args, opts = _stage_inputs(torch.float32)
    cfg = fused_config.INTERPRETER_CONFIG
    staged = dataclasses.replace(cfg, backward="staged", stage_bytes=stage_bytes, stage_gemm=gemm)
    vc = staged.stage_columns(37, 517, 4)
    assert vc == {1: 64, 37 * 192 * 4: 192}.get(stage_bytes, 576), vc
    kw = dict(opts, grad_h=bool(grads[0]), grad_w=bool(grads[1]), grad_b=bool(grads[2]))
    want = lce_fused_bwd.fused_backward(*args, config=cfg, **kw)
    got = lce_fused_bwd.fused_backward(*args, config=staged, **kw)
    for name, g, w_ in zip(("dh", "dW", "db"), got, want):
        assert (g is None) == (w_ is None), name
        if g is not None:
            torch.testing.assert_close(g.float(), w_, rtol=1e-5, atol=1e-6 * float(w_.abs().max()), msg=name)


@MASKED_LANES
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the interpreter runs programs one at a "
                    "time, so any design repeats bitwise there")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage_bytes", [1, 1 << 30], ids=["tile_chunks", "one_chunk"])
@pytest.mark.parametrize("gemm", ["triton", "torch"])
def test_staged_backward_is_bitwise_repeatable(gemm, stage_bytes, dtype):
    """The staged backward on the GPU's tiles: two runs give the same bits for any chunking."""
    args, opts = _stage_inputs(dtype)
    cfg = dataclasses.replace(fused_config.default_config(torch.device("cuda"), dtype), backward="staged",
                              stage_bytes=stage_bytes, stage_gemm=gemm)
    kw = dict(opts, grad_h=True, grad_w=True, grad_b=True)
    got = lce_fused_bwd.fused_backward(*args, config=cfg, **kw)
    again = lce_fused_bwd.fused_backward(*args, config=cfg, **kw)
    for name, g, a in zip(("dh", "dW", "db"), got, again):
        assert torch.equal(g, a), f"{name}: two staged runs differ"


@MASKED_LANES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_staged_compact_h_is_the_same_sum(dtype):
    """stage_compact_h: the dW GEMM reads a slot-ordered copy of the labeled rows instead of
    gathering them; the same products in the same order, so bitwise the same gradients."""
    args, opts = _stage_inputs(dtype)
    cfg = dataclasses.replace(fused_config.INTERPRETER_CONFIG, backward="staged")
    kw = dict(opts, grad_b=True)
    want = lce_fused_bwd.fused_backward(*args, config=cfg, **kw)
    got = lce_fused_bwd.fused_backward(*args, config=dataclasses.replace(cfg, stage_compact_h=True), **kw)
    for name, g, w_ in zip(("dh", "dW", "db"), got, want):
        assert torch.equal(g, w_), name


def test_staged_outputs_use_the_operand_dtypes():
    """The staged backward writes dW / db once, in the weight's / bias's dtype (no float32 (V, D)
    buffer and cast); dh accumulates over chunks in float32."""
    args, opts = _stage_inputs(torch.bfloat16)
    dh, dw, db = lce_fused_bwd.fused_backward(*args, **opts, grad_b=True, deterministic=True)
    assert (dh.dtype, dw.dtype, db.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)
    dh0, dw0, db0 = lce_fused_bwd.fused_backward(*args, **opts, grad_b=True, deterministic=False)

    # G is rounded to bf16 before the products in both designs (the GEMM operand on a GPU; the
    # interpreter's atomic kernel keeps it float32): agreement to a few bf16 ulps of each entry, with
    # the tensor's RMS as the floor (measured: at most 0.0105 of it, dW, where the interpreter
    # truncates to bf16 instead of rounding)
    def agree(a, b):
        a, b = a.double(), b.double()
        return bool(((a - b).abs() <= 4 * 2**-8 * (b.abs() + b.square().mean().sqrt())).all())

    for g, w_ in ((dh, dh0), (dw, dw0), (db, db0)):
        assert agree(g, w_)
    # planted: 10 % off on the whole tensor, on the largest row, or the largest entry zeroed
    top = dh0.abs().amax(1).argmax()
    assert not agree(dw * 1.1, dw0) and not agree(db * 1.1, db0)
    assert not agree(torch.cat([dh[:top], dh[top:top + 1] * 1.1, dh[top + 1:]]), dh0)
    assert not agree(torch.where(db0.abs() == db0.abs().max(), 0, db), db0)


def test_fused_config_errors():
    cfg = fused_config.INTERPRETER_CONFIG
    with pytest.raises(ValueError, match="^fused_config: backward"):
        dataclasses.replace(cfg, backward="ordered")
    with pytest.raises(ValueError, match="^fused_config: stage_gemm"):
        dataclasses.replace(cfg, stage_gemm="cublas")
    with pytest.raises(ValueError, match="^fused_config: stage_bytes"):
        dataclasses.replace(cfg, stage_bytes=0)
    with pytest.raises(ValueError, match="^fused_config: stage_bytes.*stage_min_cols"):
        dataclasses.replace(cfg, stage_min_cols=-1)
    with pytest.raises(ValueError, match=r"^fused_config: stage.BK \(64\) must divide bwd.BV \(32\)"):
        dataclasses.replace(cfg, bwd=fused_config.Tiles(BM=16, BV=32, BK=32), stage=fused_config.Tiles(BM=16, BV=32, BK=64))
    with pytest.raises(ValueError, match="^fused_config: backward='atomic'.*deterministic"):
        dataclasses.replace(cfg, backward="atomic").backward_design(True)
    assert cfg.backward_design(True) == "staged" and cfg.backward_design(False) == "atomic"
    assert dataclasses.replace(cfg, backward="staged").backward_design(False) == "staged"


@pytest.mark.parametrize("N, V, esize", [(16384, 151936, 2), (100, 1000, 2), (1, 50, 4), (10**6, 151936, 2),
                                          (16384, 262144, 4)])
def test_stage_columns_rule(N, V, esize):
    """Chunk width: a multiple of every tile stepping through it, within stage_bytes unless one
    tile of columns is already over, never past the vocabulary rounded up to that tile."""
    for cfg in (fused_config.CUDA_CONFIGS["half"], fused_config.CUDA_CONFIGS["fp32"], fused_config.INTERPRETER_CONFIG):
        align = max(cfg.bwd.BV, cfg.stage.BV, cfg.stage.BK)
        v_up = -(-V // align) * align
        floor = max(align, min(cfg.stage_min_cols // align * align, v_up))
        vc = cfg.stage_columns(N, V, esize)
        assert vc % align == 0 and floor <= vc <= v_up
        assert N * vc * esize <= cfg.stage_bytes or vc == floor
        if vc + align <= v_up:  # a wider chunk would break the budget
            assert N * (vc + align) * esize > cfg.stage_bytes
    half = fused_config.CUDA_CONFIGS["half"]
    # the target shape (README): 2048-entry chunks of a 64 MiB bf16 G; N = 10^6: still 2048, not 128
    assert half.stage_columns(16384, 151936, 2) == 2048 and half.stage_columns(10**6, 151936, 2) == 2048


def test_deterministic_default_follows_torch_flag(monkeypatch):
    seen = []
    real = lce_fused_bwd.fused_backward
    monkeypatch.setattr(lce_fused_bwd, "fused_backward", lambda *a, **k: seen.append(k["deterministic"]) or real(*a, **k))
    h = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 40, (5,), device=DEVICE)
    linear_cross_entropy(h, w, t, impl="fused").backward()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        linear_cross_entropy(h, w, t, impl="fused").backward()
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen == [False, True]


def test_deterministic_guard(monkeypatch):
    """ops/backends/fused.py: on CUDA the deterministic backward needs DVSFT_FUSED_DETERMINISTIC=1 until a GPU
    run verifies their fix; without it a deterministic request is a ValueError naming the option
    and the alternatives, raised at the call (not in the backward)."""
    monkeypatch.delenv("DVSFT_FUSED_DETERMINISTIC", raising=False)
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match=r"^deterministic\b.*impl='chunked'"):
        fused_backend.check_deterministic(True, cuda)
    fused_backend.check_deterministic(False, cuda)
    fused_backend.check_deterministic(True, torch.device("cpu"))  # the interpreter runs them
    monkeypatch.setenv("DVSFT_FUSED_DETERMINISTIC", "1")
    fused_backend.check_deterministic(True, cuda)
    if torch.cuda.is_available():
        monkeypatch.delenv("DVSFT_FUSED_DETERMINISTIC")
        h = torch.randn(5, 16, device="cuda", requires_grad=True)
        w = torch.randn(40, 16, device="cuda")
        t = torch.randint(0, 40, (5,), device="cuda")
        with pytest.raises(ValueError, match="^deterministic"):
            lce_stats(h, w, t, impl="fused", deterministic=True)
        with torch.no_grad():  # no backward, nothing to refuse
            lce_stats(h, w, t, impl="fused", deterministic=True)
        lce_stats(h, w, t, impl="fused").loss.backward()


# ---------------------------------------------------------------- filtering
def _filter_case(kind):
    """bf16 inputs. peaked: ten vocabulary entries (in the first tile) sit 12 above logits of std
    1 and hold the targets, like a trained model's few likely tokens; every other tile's softmax
    mass is below the filter's threshold yet visible in float32. uniform: logits ~0, every tile
    carries ~BV / V of the mass, no tile may be skipped."""
    g = torch.Generator().manual_seed(4)
    n, D, V = 40, 32, 517
    h = torch.randn(n, D, generator=g)
    s = torch.rand(n, generator=g) + 0.5  # row gradient scales
    if kind == "peaked":
        w = torch.randn(V, D, generator=g) / D**0.5
        b = torch.zeros(V)
        b[:10] = 12.0
        t = torch.randint(0, 10, (n,), generator=g)
    else:
        w = torch.randn(V, D, generator=g) * 1e-3
        b = torch.zeros(V)
        t = torch.randint(0, V, (n,), generator=g)
    return h.bfloat16(), w.bfloat16(), b.bfloat16(), t, s


@MASKED_LANES
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("kind", ["peaked", "uniform"])
def test_filtering_error_within_bound(kind, deterministic):
    """kernels/README.md: every row's skipped gradient mass is at most TAU |s_i| (TAU = 2^-8 for
    bf16), so |dh_i - dh_i(unfiltered)| <= TAU |s_i| max|W| and |dW_v - dW_v(unfiltered)| <=
    TAU / n_vt max|h| sum_i |s_i|, |db_v - db_v(unfiltered)| <= TAU / n_vt sum_i |s_i| (n_vt:
    vocabulary tiles of the backward kernel)."""
    h, w, b, t, s = (x.to(DEVICE) for x in _filter_case(kind))
    idx, count = fused_backend.build_index(t, -100)
    _, _, _, stat = lce_fused_fwd.fused_forward(h, w, b, t, idx, count)
    kw = {"grad_h": True, "grad_w": True, "grad_b": True, "deterministic": deterministic}
    dh0, dw0, db0 = lce_fused_bwd.fused_backward(h, w, b, t, idx, count, stat, s, **kw)
    dh1, dw1, db1 = lce_fused_bwd.fused_backward(h, w, b, t, idx, count, stat, s, grad_filter=True, **kw)
    tau = fused_config.FILTER_TAU[torch.bfloat16]
    cfg = fused_config.default_config(h.device, torch.bfloat16).bwd  # the tiles this device runs
    n_vt = -(-w.shape[0] // cfg.BV)
    slack = 1e-6  # float32 accumulation-order differences
    err_h = (dh1 - dh0).abs().max(dim=1).values.cpu()
    bound_h = tau * s.abs().cpu() * w.float().abs().max().cpu() + slack
    assert (err_h <= bound_h).all(), f"dh: {(err_h / bound_h).max():.3g} x the bound"
    err_w = (dw1 - dw0).abs().max().cpu()
    bound_w = tau / n_vt * h.float().abs().max().cpu() * s.abs().sum().cpu() + slack
    assert err_w <= bound_w, f"dW: error {err_w:.3g} > bound {bound_w:.3g}"
    err_b = (db1 - db0).abs().max().cpu()
    assert err_b <= tau / n_vt * s.abs().sum().cpu() + slack, f"db: error {err_b:.3g}"
    if kind == "peaked":
        assert err_h.max() > 0 and err_w > 0, "peaked logits: the filter should have skipped tiles"
    elif deterministic or DEVICE == "cpu":  # the interpreter adds atomics in a fixed order
        assert torch.equal(dh1, dh0) and torch.equal(dw1, dw0) and torch.equal(db1, db0), \
            "uniform logits: no tile may be skipped"
    else:  # GPU atomics: the same sums in another order, far inside the filter's bound
        for got, want in ((dh1, dh0), (dw1, dw0), (db1, db0)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3 * float(want.abs().max()) * 2**-13)


def test_grad_filter_needs_fused():
    h, w, t = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match="^grad_filter"):
        lce_stats(h, w, t, impl="torch", grad_filter=True)
    with pytest.raises(ValueError, match="^deterministic"):
        lce_stats(h, w, t, impl="torch", deterministic=1)


# ---------------------------------------------------------------- edge cases
@MASKED_LANES
def test_all_ignored_and_num_items_zero_give_zero_not_nan():
    h = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(11, 8, device=DEVICE, requires_grad=True)
    b = torch.randn(11, device=DEVICE, requires_grad=True)
    for t, num_items in ((torch.full((4,), -100), None), (torch.arange(4), 0), (torch.arange(4), torch.tensor(0))):
        for reduction in ("mean", "sum", "none"):
            if reduction != "mean" and num_items is not None:
                continue
            loss = linear_cross_entropy(h, w, t.to(DEVICE), b, reduction=reduction, num_items=num_items, impl="fused")
            loss.sum().backward()
            if num_items is None:
                assert torch.count_nonzero(loss) == 0
            assert torch.isfinite(loss).all()
            for p in (h, w, b):
                assert torch.count_nonzero(p.grad) == 0
                p.grad = None


@MASKED_LANES
def test_target_out_of_range_is_nan_without_a_host_sync():
    """Checking targets on the host would synchronise; a bad target's row gets NaN loss and lse,
    no gradient, and the other rows are unaffected."""
    case = make_case(lead=(9,), ignore_frac=0.0, seed=1)
    t = case.targets.clone()
    t[3] = case.weight.shape[0]  # == V
    t[5] = -7
    h = case.hidden.float().to(DEVICE).requires_grad_()
    out = lce_stats(h, case.weight.float().to(DEVICE), t.to(DEVICE), reduction="none",
                                          impl="fused")
    bad = torch.zeros(9, dtype=torch.bool)
    bad[[3, 5]] = True
    assert out.loss.cpu()[bad].isnan().all() and out.lse.cpu()[bad].isnan().all()
    assert not out.correct.cpu()[bad].any()
    good = case.targets.clone()
    good[bad] = -100
    ref = naive_linear_cross_entropy(case.hidden, case.weight, good, reduction="none")
    torch.testing.assert_close(out.loss.cpu()[~bad].double(), ref[~bad], rtol=1e-5, atol=1e-5)
    out.loss.nan_to_num(0.0).sum().backward()
    assert torch.count_nonzero(h.grad[bad]) == 0 and torch.isfinite(h.grad).all()


@MASKED_LANES
@pytest.mark.parametrize("backward", ["atomic", "staged", "staged_compact_h", "staged_torch_gemm"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_synchronising_ops(reduction, backward, monkeypatch):
    """Every torch op of a fused forward + backward, none that waits on the device (the kernels
    read the labeled count on the device), for each backward design and its options. On CUDA the
    same step is captured in a CUDA graph in test_cuda_graph_capture."""
    options = {"atomic": {}, "staged": {"backward": "staged"},
               "staged_compact_h": {"backward": "staged", "stage_compact_h": True},
               "staged_torch_gemm": {"backward": "staged", "stage_gemm": "torch"}}
    use_config(monkeypatch, **options[backward])
    case = make_case(lead=(3, 11), options={"bias": True, "token_weights": True, "num_items": 20, "softcap": 3.0},
                     reduction=reduction, seed=6)
    h = case.hidden.float().to(DEVICE).requires_grad_()
    w = case.weight.float().to(DEVICE).requires_grad_()
    b = case.bias.float().to(DEVICE).requires_grad_()
    kw = {k: v for k, v in case.kwargs.items()}
    kw["num_items"] = torch.tensor(20, device=DEVICE)
    log = OpLog()
    with log:
        loss = linear_cross_entropy(h, w, case.targets.to(DEVICE), b, token_weights=case.token_weights.float().to(DEVICE),
                                    impl="fused", **kw)
        loss.sum().backward()
    assert not log.host_syncs(), log.host_syncs()
    # the compacting implementation does synchronise (the check above would catch it)
    log = OpLog()
    with log:
        linear_cross_entropy(h, w, case.targets.to(DEVICE), b, impl="torch")
    assert "aten.nonzero" in log.ops and "aten._local_scalar_dense" in log.ops


# ---------------------------------------------------------------- memory
@MASKED_LANES
@pytest.mark.parametrize("deterministic", [False, True])
def test_no_logit_sized_allocation(deterministic, monkeypatch):
    """Nothing larger than O(rows) + O(tiles) besides the gradients, their float32 accumulators and
    (staged backward, deterministic=True) the G staging buffer within FusedConfig.stage_bytes: no
    (rows, V) tensor at any point."""
    n, d, v = 128, 16, 1024
    use_config(monkeypatch, stage_bytes=n * 128 * 2, stage_min_cols=0)  # G chunks of 128 columns on any tiles
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).bfloat16().to(DEVICE).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).bfloat16().to(DEVICE).requires_grad_()
    b = torch.zeros(v, device=DEVICE).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    rec = AllocationRecorder()
    with rec:
        lce_stats(h, w, t, b, softcap=3.0, label_smoothing=0.1, impl="fused",
                                        deterministic=deterministic).loss.backward()
    cfg = fused_config.default_config(h.device, h.dtype)
    entries, _, _ = fused_config.partial_entries(n, v, cfg, fused_config.target_programs(cfg, h.device),
                                          cfg.fwd_tiles(True, True))
    gradients = {(n, d), (v, d), (v,)}
    vc = cfg.stage_columns(n, v, 2)
    staging = {(n, vc), (-(-n // cfg.bwd.BM), vc)} if deterministic else set()  # G (bf16), db partials (f32)
    others = [(op, shape, k) for op, shape, k in rec.sizes if shape not in gradients | staging]
    largest_other = max(k for _, _, k in others)
    assert largest_other <= max(2 * n, entries), f"{max(others, key=lambda s: s[2])}"
    assert entries < n * v // 8
    small = 64 * n * 4 + 8 * entries  # O(n) statistics and the forward partials
    if deterministic:
        assert vc < v and n * vc * 2 <= cfg.stage_bytes, (vc, cfg.stage_bytes)
        assert {shape for _, shape, _ in rec.sizes} >= staging, "the staged backward did not run"
        wide = [(s, dt) for (_, s, _), dt in zip(rec.sizes, rec.dtypes) if s in {(v, d), (v,)} and dt != w.dtype]
        assert not wide, f"the staged backward writes dW / db in the weight's dtype, not {wide}"
        # dW and db in bf16, dh float32 and its cast, G and the db partials
        bound = v * d * 2 + v * 2 + n * d * (4 + 2) + 3 * cfg.stage_bytes + small
    else:
        # live at once: dW float32 and its cast, dh float32 and its cast
        bound = 2 * v * d * (4 + 2) + n * d * (4 + 2) + small
    assert rec.peak <= bound < n * v * 4, f"peak {rec.peak} bytes, bound {bound}"


# ---------------------------------------------------------------- CUDA only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_graph_capture(deterministic, monkeypatch):
    """A training step through impl="fused" is captured in a CUDA graph and replays with new data
    (loss and gradients); "auto" picks "fused" while capturing; deterministic: the staged
    backward's chunk loop (4 chunks here) inside the graph."""
    torch.manual_seed(0)
    n, d, v = 300, 64, 1000
    use_config(monkeypatch, stage_bytes=n * 256 * 2, stage_min_cols=0)
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, v, (n,), device="cuda")
    t[::3] = -100

    def step():
        h.grad = w.grad = None
        loss = lce_stats(h, w, t, impl="auto", deterministic=deterministic).loss
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lce_stats(h, w, t, impl="fused", deterministic=deterministic).loss.backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    t.copy_(torch.randint(0, v, (n,), device="cuda"))
    t[::5] = -100
    graph.replay()
    torch.cuda.synchronize()
    # the replay on the new targets under the error rule: float64 spec, plain PyTorch in bf16
    ref = _naive_grads(h, w, t, torch.float64, torch.float64)
    base = _naive_grads(h, w, t, torch.bfloat16, torch.float32)
    assert_error_rule("loss", loss.cpu(), ref[0].cpu(), base[0].cpu(), loss.dtype)
    for name, got, want, b in zip(("hidden", "weight"), (h.grad, w.grad), ref[1:], base[1:]):
        assert_error_rule(name, got.cpu(), want.cpu(), b.cpu(), got.dtype)


def _naive_grads(h, w, t, dtype, upcast_dtype):
    """Loss, dh, dW of the spec on h, w cast to dtype (upcast after the head to upcast_dtype)."""
    hh = h.detach().to(dtype).requires_grad_()
    ww = w.detach().to(dtype).requires_grad_()
    loss = naive_linear_cross_entropy(hh, ww, t, upcast_dtype=upcast_dtype)
    loss.backward()
    return loss.detach(), hh.grad, ww.grad


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("deterministic", [False, True, "torch_gemm"])
@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_cuda_many_tiles_match_spec(options, impl, deterministic, monkeypatch):
    """The GPU tiles (128 rows x 128 vocabulary) on a shape with several row tiles, vocabulary
    splits and GROUP blocks, none of them full: the interpreter tests use small tiles instead.
    deterministic: the staged backward in several chunks, its gradient GEMMs in Triton or
    ("torch_gemm") cuBLAS."""
    if impl == "chunked" and deterministic:
        pytest.skip("chunked has no atomics")
    case = to_device(make_case(lead=(1100,), D=200, V=5003, options=OPTION_SETS[options], seed=3), DEVICE)
    extra = {"deterministic": True} if deterministic else {}
    if deterministic:  # 1024-column chunks of a 16-bit G (5, the last partial), 512 of a float32 one (10)
        use_config(monkeypatch, stage_bytes=1100 * 1024 * 2, stage_min_cols=0,
                   stage_gemm="torch" if deterministic == "torch_gemm" else "triton")
    for dtype in (torch.bfloat16, torch.float32):
        check_against_spec(case, dtype, lambda *a, **k: lce_stats(
            *a, **k, impl=impl, **extra).loss)


@MASKED_LANES
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("deterministic", [False, True, "torch_gemm"])
def test_cuda_aligned_tiles_match_spec(deterministic, monkeypatch):
    """Every extent a multiple of the GPU tiles, as at the target shape (D 3584): EVEN_K (no K
    masks), full row and vocabulary tiles, all rows labeled, the staged backward in two full
    2048-entry chunks. The many-tiles test above covers the ragged edges (D 200: EVEN_K off)."""
    case = to_device(make_case(lead=(1024,), D=256, V=4096, ignore_frac=0.0, options=OPTION_SETS["all"],
                               seed=4), DEVICE)
    extra = {"deterministic": True} if deterministic else {}
    if deterministic:
        use_config(monkeypatch, stage_bytes=1, stage_gemm="torch" if deterministic == "torch_gemm" else "triton")
        assert fused_config.default_config(torch.device("cuda"), torch.bfloat16).stage_columns(1024, 4096, 2) == 2048
    for dtype in (torch.bfloat16, torch.float32):
        check_against_spec(case, dtype, lambda *a, **k: lce_stats(
            *a, **k, impl="fused", **extra).loss)


# ---------------------------------------------------------------- soft targets (beyond test_soft_targets.py)
def _soft_inputs(n=45, V=300, D=40, K=4, seed=9):
    """Soft targets through the front end's normalisation (`function.soft_targets`): float64 master
    inputs with a bias, K slots per row spread over the whole vocabulary (so over every split and
    chunk), ~20 % of slots unused, some rows unlabeled, one row repeating an id."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * (3.0 / D**0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, V, (n, K), generator=g)
    c = torch.rand(n, K, generator=g, dtype=torch.float64).float().double()  # exact in float32
    t[torch.rand(n, K, generator=g) < 0.2] = -100
    t[torch.rand(n, generator=g) < 0.15] = -100
    t[3] = torch.tensor([7, 7, V - 1, 0])[:K]
    return h, w, b, t, c


def _soft_kernel_args(t, c, V):
    """(slot-0 targets, ids (N, K), probabilities (N, K)) as fused.kernel_targets hands them over."""
    ts, q, _ = function_mod.soft_targets(t, c, -100)
    x = Inputs(torch.empty(t.shape[0], 1), torch.empty(V, 1), None, ts.to(DEVICE), None, None, q.to(DEVICE))
    flat_t, qq = fused_backend.kernel_targets(x)
    return x.row_targets(), flat_t, qq


@MASKED_LANES
@pytest.mark.parametrize("s_min, target, bv", [(1, 1, 16), (4, 64, 32), (8, 1, 64)])
def test_soft_split_choices_agree(s_min, target, bv):
    """The soft target logit sum_k q_k y_{t_k} is formed in split 0 only, whatever the split of
    each t_k: one split of many tiles, many splits of one tile and in between against the float64
    spec; a probability 10 % off (planted) fails the same comparison."""
    h, w, b, t, c = _soft_inputs()
    V = w.shape[0]
    opts = {"label_smoothing": 0.1, "softcap": 5.0, "z_loss": 1e-3}
    ref_loss, ref_lse, _ = naive_linear_cross_entropy(h, w, t, b, reduction="none", target_weights=c,
                                                      return_stats=True, **opts)
    total = c.where(t != -100, 0.0).sum(-1)  # the spec's row loss carries the row's total weight
    ref_loss = torch.where(total > 0, ref_loss / total.clamp_min(1e-30), ref_loss)
    labeled = (t != -100).any(-1) & (total > 0)
    cfg = dataclasses.replace(fused_config.INTERPRETER_CONFIG, fwd=fused_config.Tiles(BM=16, BV=bv, BK=16), s_min=s_min,
                              s_max=8, target_programs=target)
    row_t, flat_t, q = _soft_kernel_args(t, c, V)
    idx, count = fused_backend.build_index(row_t, -100)
    hf, wf, bf = (x.float().to(DEVICE) for x in (h, w, b))

    def run_fwd(q):
        return lce_fused_fwd.fused_forward(hf, wf, bf, flat_t, idx, count, target_probs=q, config=cfg, **opts)

    loss, lse, _, _ = run_fwd(q)
    torch.testing.assert_close(loss.cpu().double()[labeled], ref_loss[labeled], rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.cpu().double()[labeled], ref_lse[labeled], rtol=0, atol=2e-5)
    bad = q.clone()
    bad[:, 1] *= 1.1
    with pytest.raises(AssertionError):
        torch.testing.assert_close(run_fwd(bad)[0].cpu().double()[labeled], ref_loss[labeled], rtol=0, atol=2e-5)


@MASKED_LANES
@pytest.mark.parametrize("backward", ["atomic", "staged", "staged_torch_gemm", "staged_compact_h"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_no_host_synchronising_ops(reduction, backward, monkeypatch):
    """Soft targets through every backward design: no op of the fused forward + backward waits on
    the device, the index built from slot 0 included. The front end's one validation read of
    target_weights (skipped under capture and compile, function._check_soft_targets) is skipped
    here as under capture; without that the same log reports it (the check sees this path)."""
    options = {"atomic": {}, "staged": {"backward": "staged"},
               "staged_torch_gemm": {"backward": "staged", "stage_gemm": "torch"},
               "staged_compact_h": {"backward": "staged", "stage_compact_h": True}}
    use_config(monkeypatch, **options[backward])
    h0, w0, b0, t, c = _soft_inputs(n=33, V=131, D=24)
    h = h0.float().to(DEVICE).requires_grad_()
    w = w0.float().to(DEVICE).requires_grad_()
    b = b0.float().to(DEVICE).requires_grad_()
    tw = torch.rand(33, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    kw = {"reduction": reduction, "softcap": 3.0, "label_smoothing": 0.1, "num_items": torch.tensor(20, device=DEVICE),
          "token_weights": tw, "target_weights": c.float().to(DEVICE), "impl": "fused"}
    if reduction == "none":
        kw.pop("num_items")
    log = OpLog()
    with log:
        linear_cross_entropy(h, w, t.to(DEVICE), b, **kw).sum().backward()
    assert set(log.host_syncs()) <= {"aten._local_scalar_dense", "aten.is_nonzero"} and log.host_syncs(), \
        log.host_syncs()  # the front end's validation only
    monkeypatch.setattr(function_mod, "no_host_sync_allowed", lambda: True)
    log = OpLog()
    with log:
        linear_cross_entropy(h, w, t.to(DEVICE), b, **kw).sum().backward()
    assert not log.host_syncs(), log.host_syncs()


@MASKED_LANES
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "staged"])
def test_soft_target_out_of_range_is_nan_without_a_host_sync(deterministic):
    """A soft slot outside [0, V) makes its row a NaN row without gradient, whatever the slot's
    weight (0 included) and position; the other rows match the spec."""
    h0, w0, _, t, c = _soft_inputs(n=12, V=97, D=16, K=3, seed=4)
    t[:, 0] = torch.arange(12)  # every row labeled
    V = w0.shape[0]
    t[2, 1], c[2, 1] = V, 0.7  # a used slot
    t[5, 2], c[5, 2] = -3, 0.0  # a slot of weight 0
    t[8, 0] = V + 5  # the top slot
    c[8, 0] = 2.0
    bad = torch.zeros(12, dtype=torch.bool)
    bad[[2, 5, 8]] = True
    h = h0.float().to(DEVICE).requires_grad_()
    w = w0.float().to(DEVICE).requires_grad_()
    out = lce_stats(h, w, t.to(DEVICE), target_weights=c.float().to(DEVICE), reduction="none", impl="fused",
                    deterministic=deterministic)
    assert out.loss.cpu()[bad].isnan().all() and out.lse.cpu()[bad].isnan().all()
    good_t = t.clone()
    good_t[bad] = -100
    ref = naive_linear_cross_entropy(h0, w0, good_t, reduction="none", target_weights=c)
    torch.testing.assert_close(out.loss.cpu()[~bad].double(), ref[~bad], rtol=1e-5, atol=1e-5)
    out.loss.nan_to_num(0.0).sum().backward()
    assert torch.count_nonzero(h.grad[bad]) == 0 and torch.isfinite(h.grad).all()
    assert torch.count_nonzero(h.grad[~bad]) > 0
    # dW gets nothing from the bad rows: the spec's gradient without them
    hh, ww = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    naive_linear_cross_entropy(hh, ww, good_t, reduction="none", target_weights=c).sum().backward()
    torch.testing.assert_close(w.grad.cpu().double(), ww.grad, rtol=1e-4, atol=1e-5)


def _soft_filter_case(kind):
    """_filter_case's rows with K = 3 soft targets: peaked, the ids among the 10 boosted entries
    (the mass of a row sits in one tile); uniform, ids anywhere."""
    h, w, b, t, s = _filter_case(kind)
    g = torch.Generator().manual_seed(5)
    hi = 10 if kind == "peaked" else w.shape[0]
    tk = torch.randint(0, hi, (t.shape[0], 3), generator=g)
    c = torch.rand(t.shape[0], 3, generator=g)
    ts, q, _ = function_mod.soft_targets(tk, c, -100)
    return h, w, b, ts, q, s


@MASKED_LANES
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("kind", ["peaked", "uniform"])
def test_soft_filtering_error_within_bound(kind, deterministic):
    """grad_filter with soft targets: the tile criterion sees the whole G (the K one-hot terms
    included), so the documented bound holds as for hard targets (test_filtering_error_within_bound)."""
    h, w, b, ts, q, s = (x.to(DEVICE) for x in _soft_filter_case(kind))
    idx, count = fused_backend.build_index(ts[:, 0], -100)
    _, _, _, stat = lce_fused_fwd.fused_forward(h, w, b, ts, idx, count, target_probs=q)
    kw = {"grad_h": True, "grad_w": True, "grad_b": True, "deterministic": deterministic, "target_probs": q}
    dh0, dw0, db0 = lce_fused_bwd.fused_backward(h, w, b, ts, idx, count, stat, s, **kw)
    dh1, dw1, db1 = lce_fused_bwd.fused_backward(h, w, b, ts, idx, count, stat, s, grad_filter=True, **kw)
    tau = fused_config.FILTER_TAU[torch.bfloat16]
    n_vt = -(-w.shape[0] // fused_config.default_config(h.device, torch.bfloat16).bwd.BV)
    slack = 1e-6
    err_h = (dh1 - dh0).abs().max(dim=1).values.cpu()
    assert (err_h <= tau * s.abs().cpu() * w.float().abs().max().cpu() + slack).all()
    assert (dw1 - dw0).abs().max().cpu() <= tau / n_vt * h.float().abs().max().cpu() * s.abs().sum().cpu() + slack
    assert (db1 - db0).abs().max().cpu() <= tau / n_vt * s.abs().sum().cpu() + slack
    if kind == "peaked":
        assert err_h.max() > 0, "peaked logits: the filter should have skipped tiles"
    elif deterministic or DEVICE == "cpu":
        assert torch.equal(dh1, dh0) and torch.equal(dw1, dw0) and torch.equal(db1, db0)


@MASKED_LANES
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_staged_designs_match_spec(reduction, monkeypatch):
    """The staged backward's options that test_soft_targets.py does not run: cuBLAS gradient GEMMs
    over G by position, and the slot-ordered copy of h; soft cases against the float64 spec."""
    from .test_soft_targets import soft_case

    case = to_device(soft_case(options=OPTION_SETS["all"], reduction=reduction), DEVICE)
    for fields in ({"stage_gemm": "torch"}, {"stage_compact_h": True}):
        use_config(monkeypatch, **fields)
        check_against_spec(case, torch.float32, fused_fn(deterministic=True))


@MASKED_LANES
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_auto_custom_op_under_capture(reduction, monkeypatch):
    """impl="auto" in the custom op while a CUDA graph is captured (mocked) runs the fused kernels
    with soft targets: the probabilities travel as an input of the op, forward and backward op."""
    from .test_soft_targets import soft_case

    monkeypatch.setattr(auto_backend, "capturing", lambda: True)
    ran = []
    real = auto_backend.fused_backward_core
    monkeypatch.setattr(auto_backend, "fused_backward_core", lambda *a, **k: ran.append(1) or real(*a, **k))
    case = to_device(soft_case(K=3, options={"bias": True, "softcap": 4.0, "token_weights": True},
                               reduction=reduction), DEVICE)

    def via_auto(h, w, t, b, token_weights=None, target_weights=None, num_items=None, **kwargs):
        ts, q, total = function_mod.soft_targets(t, target_weights, kwargs["ignore_index"])
        x = Inputs(h, w, b, ts, token_weights * total, num_items, q)
        options = LCEOptions(**kwargs, impl="auto")
        return torch.compile(lambda x: lce_custom_op(x, options, "auto").out, fullgraph=True,
                             backend="aot_eager")(x)

    case.kwargs["target_weights"] = case.kwargs["target_weights"].float().to(DEVICE)
    check_against_spec(case, torch.float32, via_auto)
    assert ran, "the fused backward did not run"
