"""The native CPU epilogue (dvsft_kernels/native.py, dvsft_kernels/csrc/ce_epilogue.cpp): `impl="torch"`
on CPU with the extension on and off against the float64 spec under the error rule, the epilogue
itself against a float64 reference, and the fallback when the build fails. The first test to run
builds the extension (seconds; cached in ~/.cache/dvsft_kernels/native across runs); a failed build
skips the "native" cases with native_status()'s reason."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import dvsft_kernels
from dvsft_kernels import linear_cross_entropy, native

from .cases import OPTION_SETS, check_against_spec, make_case

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _require_native():
    if not native.native_available():
        pytest.skip(f"native epilogue not built: {native.native_status()}")


@pytest.fixture(params=["native", "plain"])
def mode(request, monkeypatch):
    """'native': the extension on, and a counter that shows the op ran; 'plain': DVSFT_NATIVE=0."""
    if request.param == "plain":
        monkeypatch.setenv("DVSFT_NATIVE", "0")
        yield request.param
        return
    monkeypatch.setenv("DVSFT_NATIVE", "1")
    _require_native()
    real = native.epilogue()
    calls = []

    def counting(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setitem(native._state, "op", counting)
    yield request.param
    assert calls, "the native epilogue was not used"


def torch_impl(chunk_rows=None, stats=True):
    def fn(*a, **k):
        out = linear_cross_entropy(*a, **k, impl="torch", chunk_rows=chunk_rows, return_stats=stats)
        return out.loss if stats else out
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_option_matrix_against_spec(mode, options, reduction, dtype):
    case = make_case(options=OPTION_SETS[options], reduction=reduction,
                     seed=zlib.crc32(f"native/{options}/{reduction}".encode()) % 1000)
    check_against_spec(case, dtype, torch_impl(chunk_rows=16, stats=reduction != "sum"))


@pytest.mark.parametrize(
    "lead, D, V, chunk_rows",
    [((1, 1), 3, 1, None), ((2, 5), 7, 2, 1), ((3, 11), 13, 15, 4), ((1, 29), 17, 17, 7),
     ((2, 23), 33, 1023, None), ((1, 40), 9, 1025, 16), ((1, 9), 5, 2049, 2), ((4, 17), 31, 3001, None)],
)
@pytest.mark.parametrize("options", ["plain", "all"])
def test_odd_shapes_against_spec(mode, lead, D, V, chunk_rows, options):
    case = make_case(lead=lead, D=D, V=V, options=OPTION_SETS[options], ignore_frac=0.2,
                     seed=zlib.crc32(f"{lead}/{D}/{V}".encode()) % 1000)
    check_against_spec(case, torch.float32, torch_impl(chunk_rows))


def test_stats_native_equal_plain(monkeypatch):
    """predicted, correct and lse of the native path equal the PyTorch path's (argmax: first index)."""
    _require_native()
    case = make_case(lead=(2, 40), D=24, V=700, options={"softcap": 4.0, "bias": True})
    h, w, b = case.hidden.float(), case.weight.float(), case.bias.float()
    h[0, :5] = 0  # rows of all-equal logits (softcapped bias only): ties broken by the first index
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("DVSFT_NATIVE", flag)
        outs[flag] = linear_cross_entropy(h, w, case.targets, b, impl="torch", return_stats=True)
    assert torch.equal(outs["1"].predicted, outs["0"].predicted)
    assert torch.equal(outs["1"].correct, outs["0"].correct)
    torch.testing.assert_close(outs["1"].lse, outs["0"].lse)
    torch.testing.assert_close(outs["1"].loss, outs["0"].loss)


# ---------------------------------------------------------------- 16-bit GEMMs on CPU
def _soft(case, K=3, seed=0):
    """The case with K weighted targets per position (some slots unused, one id in two slots)."""
    g = torch.Generator().manual_seed(seed)
    lead, V = case.targets.shape, case.weight.shape[0]
    t = torch.randint(0, V, (*lead, K), generator=g)
    t[torch.rand(*lead, K, generator=g) < 0.25] = case.kwargs["ignore_index"]
    t.view(-1, K)[0, 1] = t.view(-1, K)[0, 0] = 3
    case.targets = t
    case.kwargs["target_weights"] = torch.rand(*lead, K, generator=g).float().double()
    return case


def _half_spy(monkeypatch, dtype):
    """Forces the 16-bit-GEMM path for `dtype` (as on a CPU whose oneDNN has fast `dtype` GEMMs) and
    records the dtypes of the logits chunks the epilogue is given."""
    from dvsft_kernels.ops import gemm

    monkeypatch.setenv("DVSFT_NATIVE", "1")
    _require_native()
    monkeypatch.setitem(gemm.CPU_HALF_GEMM, dtype, True)
    real, seen = native.epilogue(), []

    def spy(x, *a):
        seen.append(x.dtype)
        return real(x, *a)

    monkeypatch.setitem(native._state, "op", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options, soft", [("plain", False), ("all", False), ("bias", True), ("all", True)],
                         ids=["plain", "all", "bias-soft", "all-soft"])
def test_half_gemms_on_cpu_against_spec(monkeypatch, dtype, reduction, options, soft):
    """16-bit inputs with the native epilogue: the GEMMs, the logits chunk and G run in the input
    dtype (the epilogue sees 16-bit chunks), and the result meets the error rule at an odd shape over
    many chunks (12 of 7 rows: dW accumulates 12 rounded chunk products). bfloat16 is the path this
    CPU takes by itself when oneDNN reports its bf16 GEMMs; float16 is forced (slow here, same code)."""
    from dvsft_kernels.ops.gemm import cpu_half_gemm

    if dtype == torch.bfloat16 and not cpu_half_gemm(dtype):
        pytest.skip("no fast bfloat16 GEMMs on this CPU (oneDNN)")
    seen = _half_spy(monkeypatch, dtype)
    case = make_case(lead=(3, 37), D=45, V=1531, options=OPTION_SETS[options], ignore_frac=0.25,
                     reduction=reduction, seed=zlib.crc32(f"half/{options}/{soft}".encode()) % 1000)
    if soft:
        case = _soft(case)
    check_against_spec(case, dtype, torch_impl(chunk_rows=7))
    assert seen and set(seen) == {dtype}, f"the epilogue saw {set(seen)}, not {dtype} chunks"


def test_half_gemms_float32_untouched(monkeypatch):
    """float32 inputs keep float32 chunks whatever the 16-bit probe says."""
    seen = _half_spy(monkeypatch, torch.bfloat16)
    check_against_spec(make_case(seed=4), torch.float32, torch_impl(chunk_rows=16))
    assert set(seen) == {torch.float32}


@pytest.mark.parametrize("fault", [1, 2, 4])
def test_half_gemm_planted_faults_are_caught(monkeypatch, fault):
    """The error rule still bites on the 16-bit path: the z-loss term of the loss (1) or of G (2),
    a soft target's one-hot term in G (4) dropped, in bfloat16 over several chunks, each fails."""
    seen = _half_spy(monkeypatch, torch.bfloat16)
    monkeypatch.setitem(native.FAULT, "code", fault)
    case = make_case(lead=(2, 29), D=33, V=1031, options={"z_loss": 2e-2}, reduction="sum", seed=5)
    if fault == 4:
        case = _soft(case)
    with pytest.raises(AssertionError, match="loss" if fault == 1 else "hidden|weight"):
        check_against_spec(case, torch.bfloat16, torch_impl(chunk_rows=9))
    assert set(seen) == {torch.bfloat16}


# ---------------------------------------------------------------- the epilogue itself
def _reference(x, t, s, eps, zl, cap):
    x = x.double().requires_grad_()
    y = cap * torch.tanh(x / cap) if cap else x
    lse = y.logsumexp(1)
    loss = (1 - eps) * (lse - y.gather(1, t[:, None])[:, 0]) + eps * (lse - y.mean(1)) + zl * lse**2
    (loss * (s.double() if s is not None else 1)).sum().backward()
    return loss.detach(), lse.detach(), x.grad


@pytest.mark.parametrize("V", [1, 7, 16, 1024, 1025, 3001])
@pytest.mark.parametrize("opts", [(0.0, 0.0, None), (0.1, 1e-3, 4.0), (0.0, 1e-2, None), (0.2, 0.0, 2.0)])
@pytest.mark.parametrize("grad_dtype", [None, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_epilogue_against_float64(V, opts, grad_dtype):
    _require_native()
    eps, zl, cap = opts
    g = torch.Generator().manual_seed(V)
    m = 9
    x = torch.randn(m, V, generator=g) * 3
    t = torch.randint(0, V, (m,), generator=g)
    s = torch.rand(m, generator=g) * 2
    ref_loss, ref_lse, ref_g = _reference(x, t, s, eps, zl, cap)
    xx = x.clone()
    out = None if grad_dtype is None else torch.full((m, V), 7.0, dtype=grad_dtype)
    loss, lse, pred = native.ce_chunk(xx, t, s, label_smoothing=eps, z_loss=zl, softcap=cap, grad_out=out)
    y = cap * torch.tanh(x.double() / cap) if cap else x.double()
    assert torch.equal(pred, y.argmax(1))
    tol = {"rtol": 2e-6, "atol": 2e-6 * float(ref_loss.abs().max())}
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-6, atol=2e-6 * float(ref_lse.abs().max()))
    if out is None:
        got = xx
    else:
        assert torch.equal(xx, x), "x must be left as it was when grad_out is given"
        got = out
    atol = {None: 1e-6, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[grad_dtype]
    # G's entries are differences of terms up to s (softmax and one-hot): the scale of their rounding
    size = max(float(ref_g.abs().max()), float(s.max()))
    torch.testing.assert_close(got.double(), ref_g, rtol=0, atol=atol * size)


@pytest.mark.parametrize("V, K", [(1, 1), (7, 1), (1025, 1), (3001, 1), (1025, 3)])
@pytest.mark.parametrize("opts", [(0.0, 0.0, None), (0.1, 1e-3, 4.0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_epilogue_half_logits_equal_float32(V, K, opts, dtype):
    """16-bit logits are read as their float32 values: loss, lse, argmax and G (over x, in x's dtype,
    or into a float32 buffer) equal the float32 call on the widened logits bit for bit."""
    _require_native()
    eps, zl, cap = opts
    g = torch.Generator().manual_seed(V + K)
    x = (torch.randn(8, V, generator=g) * 3).to(dtype)
    t = torch.randint(0, V, (8, K) if K > 1 else (8,), generator=g)
    q = torch.rand(8, K, generator=g) if K > 1 else None
    s = torch.rand(8, generator=g)
    kw = {"target_probs": q, "label_smoothing": eps, "z_loss": zl, "softcap": cap}
    want_g = torch.empty(8, V, dtype=dtype)
    want = native.ce_chunk(x.float(), t, s, grad_out=want_g, **kw)
    over = x.clone()
    got = native.ce_chunk(over, t, s, **kw)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert torch.equal(over, want_g), "G over 16-bit x"
    want_f, got_f = torch.empty(8, V), torch.empty(8, V)
    native.ce_chunk(x.float(), t, s, grad_out=want_f, **kw)
    native.ce_chunk(x.clone(), t, s, grad_out=got_f, **kw)
    assert torch.equal(got_f, want_f), "float32 G from 16-bit x"


def test_epilogue_forward_only_and_ties():
    _require_native()
    V = 2100  # > 2 blocks of 1024
    x = torch.zeros(5, V)
    x[0, 5] = x[0, 1500] = 1.0  # tie across blocks: the first
    x[1, 2000] = x[1, 2099] = 1.0  # tie inside the last, partial block
    x[2, 1030] = x[2, 1031] = 2.0  # tie inside a later block
    x[3, 0] = 1.0  # the very first element; row 4: all equal -> 0
    t = torch.tensor([0, 1, 2, 3, 4])
    before = x.clone()
    loss, lse, pred = native.ce_chunk(x, t, compute_grad=False)
    assert pred.tolist() == [5, 2000, 1030, 0, 0]
    assert torch.equal(x, before), "forward only: x is only read"
    ref_loss, ref_lse, _ = _reference(before, t, None, 0.0, 0.0, None)
    torch.testing.assert_close(lse.double(), ref_lse)
    torch.testing.assert_close(loss.double(), ref_loss)
    _, _, pred = native.ce_chunk(x.clone(), t, compute_grad=False, want_argmax=False)
    assert pred.tolist() == [-1] * 5
    # -inf logits, in whole blocks before the first finite one and after it
    x = torch.full((2, V), float("-inf"))
    x[0, 1500], x[0, 1600], x[1, 5], x[1, 2000] = 1.0, 0.0, 2.0, 0.0
    t = torch.tensor([1500, 2000])
    ref = x.clone().requires_grad_()
    (ref.logsumexp(1) - ref.gather(1, t[:, None])[:, 0]).sum().backward()
    g = x.clone()
    loss, _, pred = native.ce_chunk(g, t)
    assert pred.tolist() == [1500, 5]
    torch.testing.assert_close(loss, torch.logsumexp(x, 1) - x.gather(1, t[:, None])[:, 0])
    torch.testing.assert_close(g, ref.grad)
    # softcap: the first argmax of the softcapped logits (tanh saturates: 30 and 31 tie at cap 1)
    x = torch.zeros(1, 40)
    x[0, 9], x[0, 30] = 30.0, 31.0
    ycap = torch.tanh(x)
    _, _, pred = native.ce_chunk(x, torch.tensor([0]), softcap=1.0, compute_grad=False)
    assert pred.item() == int(ycap.argmax(1))


# ---------------------------------------------------------------- soft targets in the epilogue
def _soft_reference(x, t, q, s, eps, zl, cap):
    """Float64 loss, lse and d(sum_i s_i loss_i)/dx with y_t = sum_k q_k y[t_k] (gather + sum: a
    duplicate id counts once per slot), by autograd."""
    x = x.double().requires_grad_()
    y = cap * torch.tanh(x / cap) if cap else x
    lse = y.logsumexp(1)
    y_t = (y.gather(1, t) * q.double()).sum(1)
    loss = (1 - eps) * (lse - y_t) + eps * (lse - y.mean(1)) + zl * lse**2
    (loss * s.double()).sum().backward()
    return loss.detach(), lse.detach(), x.grad


def _soft_rows(m, K, V, g):
    """Ids and probabilities summing to 1 per row, with the edge rows: an id in two slots with
    weight in both (row 1), a row of probability 0 (row 2), unused slots repeating slot 0 with
    probability 0 (row 3), and K = V + 9 slots over V ids where asked (duplicates everywhere)."""
    t = torch.randint(0, V, (m, K), generator=g)
    q = torch.rand(m, K, generator=g) + 0.05
    if K > 1:
        t[1, 1] = t[1, 0]
        t[3, K // 2:] = t[3, 0]
        q[3, K // 2:] = 0
    q = q / q.sum(1, keepdim=True)
    q[2] = 0
    return t, q


def _check_soft_epilogue(K, V, opts, grad_dtype, seed=0):
    eps, zl, cap = opts
    g = torch.Generator().manual_seed(seed + 31 * K + V)
    m = 7
    x = torch.randn(m, V, generator=g) * 3
    t, q = _soft_rows(m, K, V, g)
    if K <= V:  # row 4 confident, p_k ~ q_k at distinct ids: G ~ 0 there, where rounding twice would show
        t[4] = torch.randperm(V, generator=g)[:K]
        x[4, t[4]] = 20 + q[4].log()
    s = torch.rand(m, generator=g) * 2
    ref_loss, ref_lse, ref_g = _soft_reference(x, t, q, s, eps, zl, cap)
    xx = x.clone()
    out = None if grad_dtype is None else torch.full((m, V), 7.0, dtype=grad_dtype)
    loss, lse, _ = native.ce_chunk(xx, t, s, target_probs=q, label_smoothing=eps, z_loss=zl, softcap=cap,
                                   grad_out=out)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6 * float(ref_loss.abs().max()))
    torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-6, atol=2e-6 * float(ref_lse.abs().max()))
    got = xx if out is None else out
    atol = {None: 1e-6, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[grad_dtype]
    size = max(float(ref_g.abs().max()), float(s.max()))
    torch.testing.assert_close(got.double(), ref_g, rtol=0, atol=atol * size)
    # the target entries alone, relative to their own size: a 16-bit G rounded once there
    # (bfloat16: 2^-9 relative), not corrected after a first rounding (row 4: off by 2^-9 s q_k)
    tgt = (t[:, :, None] == torch.arange(V)).any(1)
    gt, rt = got.double()[tgt], ref_g[tgt]
    rel = {None: 1e-5, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[grad_dtype]
    torch.testing.assert_close(gt, rt, rtol=rel, atol=4e-6 * size)


@pytest.mark.parametrize("K, V", [(1, 1), (1, 1025), (3, 7), (3, 3001), (16, 7), (16, 1025)])
@pytest.mark.parametrize("opts", [(0.0, 0.0, None), (0.1, 1e-3, 4.0), (0.2, 1e-2, None)])
@pytest.mark.parametrize("grad_dtype", [None, torch.float32, torch.bfloat16], ids=str)
def test_epilogue_soft_against_float64(K, V, opts, grad_dtype):
    """Soft targets (m, K) in all three gradient forms (in place over e, in place from x under
    softcap, into a separate buffer) against the float64 reference: duplicate ids, zero rows."""
    _require_native()
    _check_soft_epilogue(K, V, opts, grad_dtype)


@pytest.mark.parametrize("opts", [(0.0, 0.0, None), (0.1, 1e-3, 4.0)])
@pytest.mark.parametrize("grad_dtype", [None, torch.bfloat16], ids=str)
def test_epilogue_soft_k1_is_hard_bitwise(opts, grad_dtype):
    """K = 1 with probability 1 is the hard call bit for bit (loss, lse, argmax, G)."""
    _require_native()
    eps, zl, cap = opts
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2100, generator=g) * 3
    t = torch.randint(0, 2100, (6,), generator=g)
    s = torch.rand(6, generator=g)
    outs = []
    for soft in (False, True):
        xx = x.clone()
        go = None if grad_dtype is None else torch.empty(6, 2100, dtype=grad_dtype)
        kw = {"target_probs": torch.ones(6, 1)} if soft else {}
        r = native.ce_chunk(xx, t[:, None] if soft else t, s, label_smoothing=eps, z_loss=zl, softcap=cap,
                            grad_out=go, **kw)
        outs.append((*r, xx if go is None else go))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_epilogue_soft_bad_input():
    _require_native()
    x = torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match="target_probs: required"):
        native.ce_chunk(x.clone(), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="target_probs: expected"):
        native.ce_chunk(x.clone(), torch.zeros(2, 3, dtype=torch.long), target_probs=torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="outside"):
        native.ce_chunk(x.clone(), torch.tensor([[0, 5], [1, 1]]), target_probs=torch.ones(2, 2) / 2)


# ---------------------------------------------------------------- planted faults bite
@pytest.mark.parametrize("fault", [1, 2])
def test_planted_faults_are_caught(monkeypatch, fault):
    """The C++ code has two test-only faults (native.FAULT): 1 drops the z-loss term of the loss,
    2 the z-loss factor (1 + 2 zl lse) of the gradient. The parity check must fail on each."""
    _require_native()
    monkeypatch.setitem(native.FAULT, "code", fault)
    case = make_case(options={"z_loss": 1e-2}, reduction="sum", seed=3)
    with pytest.raises(AssertionError, match="loss" if fault == 1 else "hidden|weight"):
        check_against_spec(case, torch.float32, torch_impl(chunk_rows=16))


@pytest.mark.parametrize("fault", [3, 4])
@pytest.mark.parametrize("opts, grad_dtype", [((0.0, 0.0, None), None), ((0.1, 1e-3, 4.0), torch.bfloat16)],
                         ids=["over-e", "from-x"])
def test_planted_soft_faults_are_caught(monkeypatch, fault, opts, grad_dtype):
    """Soft-target faults (native.FAULT): 3 takes slot 0's logit alone, weight 1, as the target logit
    of the loss; 4 drops the one-hot term of slots 1.. from G. The epilogue check must fail on each,
    in both gradient forms."""
    _require_native()
    monkeypatch.setitem(native.FAULT, "code", fault)
    with pytest.raises(AssertionError):
        _check_soft_epilogue(3, 1025, opts, grad_dtype)


# ---------------------------------------------------------------- fallback and build
def test_failed_build_falls_back(monkeypatch):
    """A remembered failed build: native_available() is False, the status says why, and the op runs
    the PyTorch path with the same results under the error rule."""
    monkeypatch.setenv("DVSFT_NATIVE", "1")
    monkeypatch.setattr(native, "_state", {"op": None, "status": "build failed: simulated", "tried": True})
    assert not dvsft_kernels.native_available()
    assert dvsft_kernels.native_status() == "build failed: simulated"
    case = make_case(options=OPTION_SETS["all"], reduction="none", seed=11)
    check_against_spec(case, torch.float32, torch_impl(chunk_rows=16))
    with pytest.raises(RuntimeError, match="unavailable"):
        native.ce_chunk(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))


def test_broken_source_is_remembered(monkeypatch, tmp_path):
    """A source that does not compile: the build fails once, the failure is written beside the
    build (FAILED) and later attempts (fresh processes: the state reset) do not compile again."""
    src = tmp_path / "broken.cpp"
    src.write_text("#error planted\n")
    monkeypatch.setenv("DVSFT_NATIVE", "1")
    monkeypatch.setenv("DVSFT_NATIVE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DVSFT_NATIVE_REBUILD", raising=False)
    monkeypatch.setattr(native, "SOURCE", src)
    monkeypatch.setattr(native, "variants", lambda: ([("default", ["-O0"])], "x"))
    monkeypatch.setattr(native, "_state", {"op": None, "status": "", "tried": False})
    assert native.epilogue() is None
    assert native.native_status().startswith("build failed")
    assert list((tmp_path / "cache").glob("*/FAILED"))

    import torch.utils.cpp_extension as cpp

    def no_compile(*a, **k):
        raise AssertionError("compiled again after a remembered failure")

    monkeypatch.setattr(cpp, "load", no_compile)
    monkeypatch.setattr(native, "_state", {"op": None, "status": "", "tried": False})
    assert native.epilogue() is None
    assert "an earlier build failed" in native.native_status()
    case = make_case(options=OPTION_SETS["plain"], seed=12)
    check_against_spec(case, torch.float32, torch_impl(chunk_rows=16))


def test_switch_off(monkeypatch):
    monkeypatch.setenv("DVSFT_NATIVE", "0")
    assert native.epilogue() is None
    assert not dvsft_kernels.native_available()
    assert dvsft_kernels.native_status() == "off (DVSFT_NATIVE=0)"


def test_import_does_not_build():
    code = "import dvsft_kernels, dvsft_kernels.native as n; print(n._state['tried'])"
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"



# ---------------------------------------------------------------- ahead-of-time build (setup.py)
REPO = Path(__file__).resolve().parents[2]
# a fresh process (a namespace registers once per process) that looks for the prebuilt module in
# argv[1], with an empty cache (argv[2]) and, with argv[3] == "nocompile", no compiler
PROBE = """
import sys
from pathlib import Path
import torch, torch.utils.cpp_extension as cpp
from dvsft_kernels import native
if sys.argv[3] == "nocompile":
    def no_compile(*a, **k):
        raise RuntimeError("no compiler (simulated)")
    cpp.load = no_compile
native.PREBUILT_DIR = Path(sys.argv[1])
print(native.native_status())
if native.native_available():
    x = torch.tensor([[1.0, 2.0, 0.5]])
    print(float(native.ce_chunk(x, torch.tensor([0]), compute_grad=False)[0]))
"""


def _probe(prebuilt_dir, cache, compile_ok=True):
    env = {**os.environ, "DVSFT_NATIVE": "1", "DVSFT_NATIVE_DIR": str(cache)}
    env.pop("DVSFT_NATIVE_REBUILD", None)
    r = subprocess.run([sys.executable, "-c", PROBE, str(prebuilt_dir), str(cache),
                        "compile" if compile_ok else "nocompile"],
                       check=False, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.splitlines()


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory):
    """setup.py's ahead-of-time build, as pip would run it without build isolation (no pip here):
    `setup.py build_ext` into a temporary build/lib; DVSFT_BUILD_NATIVE=1 makes a failure loud."""
    _require_native()  # a machine that cannot compile at all has nothing to test here
    out = tmp_path_factory.mktemp("aot")
    env = {**os.environ, "DVSFT_BUILD_NATIVE": "1"}
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out / "lib"),
                        "--build-temp", str(out / "tmp")], check=False, capture_output=True, text=True,
                       timeout=900, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    d = out / "lib" / "dvsft_kernels"
    assert (d / f"{native.PREBUILT_NAME}.json").exists()
    return d


def _copy_prebuilt(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


LOSS_1205 = math.log(math.exp(1) + math.exp(2) + math.exp(0.5)) - 1.0  # the probe's row, target 0


@pytest.mark.slow
def test_prebuilt_is_preferred(prebuilt, tmp_path):
    """With the setup.py build present, an empty cache and no compiler, the op loads the prebuilt
    module (the status names it) and computes the loss."""
    status, loss = _probe(prebuilt, tmp_path / "cache", compile_ok=False)
    assert status.startswith("available (") and "prebuilt" in status and str(prebuilt) in status, status
    assert abs(float(loss) - LOSS_1205) < 1e-6 * LOSS_1205
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir()), "compiled anyway"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["not-a-library", "other-torch", "stale-source", "no-record"])
def test_unusable_prebuilt_falls_back_with_reason(prebuilt, tmp_path, damage):
    """A prebuilt module that is broken, built for another torch or from another source, or has no
    record is skipped before or at loading: the cache / first-use build serves, and the status says
    why the prebuilt one was not used. Without a compiler as well: the PyTorch path, and both reasons."""
    d = _copy_prebuilt(prebuilt, tmp_path / "pkg")
    rec_path = d / f"{native.PREBUILT_NAME}.json"
    rec = json.loads(rec_path.read_text())
    so = next(d.glob(f"{native.PREBUILT_NAME}*.so"))
    if damage == "not-a-library":
        so.write_bytes(b"\x7fELF not really")
    elif damage == "other-torch":
        rec["torch"] = "0.0.1"
    elif damage == "stale-source":
        rec["source"] = "0" * 64
    if damage == "no-record":
        rec_path.unlink()
    else:
        rec_path.write_text(json.dumps(rec))
    reason = {"not-a-library": "OSError", "other-torch": "built for torch '0.0.1'",
              "stale-source": "built for source", "no-record": "FileNotFoundError"}[damage]
    # the default cache: the session's first-use build is there (no compile)
    status, loss = _probe(d, native.cache_root())
    assert status.startswith("available (") and "prebuilt" in status and reason in status, status
    assert "skipped" in status
    assert abs(float(loss) - LOSS_1205) < 1e-6 * LOSS_1205
    (status,) = _probe(d, tmp_path / "cache", compile_ok=False)
    assert status.startswith("build failed") and reason in status and "no compiler (simulated)" in status, status


def test_setup_without_torch_skips_the_build(tmp_path):
    """setup.py where torch cannot be imported (pip's build isolation): no extension, no error; with
    DVSFT_BUILD_NATIVE=1 a clear error instead. Simulated: a `torch` package that fails to import."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('no torch in this build environment')\n")
    code = ("import runpy, sys, setuptools; captured = {}; "
            "setuptools.setup = lambda **kw: captured.update(kw); "
            "runpy.run_path('setup.py', run_name='__main__'); print(sorted(captured))")
    for mode, ok in (("auto", True), ("0", True), ("1", False)):
        env = {**os.environ, "PYTHONPATH": str(fake), "DVSFT_BUILD_NATIVE": mode}
        r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                           timeout=120, env=env, cwd=REPO)
        if ok:
            assert r.returncode == 0 and r.stdout.strip() == "[]", (mode, r.stdout, r.stderr[-2000:])
        else:
            assert r.returncode != 0 and "DVSFT_BUILD_NATIVE=1" in r.stderr, (mode, r.stderr[-2000:])
