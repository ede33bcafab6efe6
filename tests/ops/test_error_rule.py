"""The error rule (tests/ops/errors.py) must be able to fail: faults planted in real outputs of the
op (impl="torch", and the Triton impls through the interpreter on small odd shapes) are each caught
in float32, float16 and bfloat16 and for every reduction, while the unplanted outputs pass."""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch

from dvsft_kernels import linear_cross_entropy

from .cases import baseline, make_case, reference, run, to_device
from .errors import assert_error_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KEYS = ("loss", "hidden", "weight", "bias")
_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = [pytest.param("torch"),
         *(pytest.param(impl, marks=[pytest.mark.interpreter,
                                     pytest.mark.skipif(not _TRITON, reason="needs CUDA or TRITON_INTERPRET=1")])
           for impl in ("chunked", "fused"))]
# numpy warns about exp overflow in lanes the kernels mask out
pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")


def _case(reduction):
    # N 37 (30 % ignored), D 40, V 301: no extent a multiple of a tile; bias for its gradient,
    # label smoothing for a term to drop
    case = make_case(lead=(37,), D=40, V=301, options={"bias": True, "label_smoothing": 0.1},
                     reduction=reduction, seed=21)
    return to_device(case, "cuda" if torch.cuda.is_available() else "cpu")


def _op(impl):
    def fn(*a, **k):
        return linear_cross_entropy(*a, **k, impl=impl)
    return fn


@functools.cache
def _outputs(impl, dtype, reduction):
    """(the op's outputs, the float64 reference, the baseline), each on the host."""
    case = _case(reduction)
    host = [{k: None if v is None else v.cpu() for k, v in d.items()}
            for d in (run(_op(impl), case, dtype), reference(case, dtype), baseline(case, dtype))]
    return tuple(host)


def _check(got, ref, base, dtype):
    for key in KEYS:
        out_dtype = torch.float32 if key == "loss" else dtype
        assert_error_rule(key, got[key], ref[key], base[key], out_dtype)


def _median_row(ref, rows):
    """Of `rows`, the one whose reference row has the median norm: typical, not the largest."""
    norms = ref.reshape(ref.shape[0], -1).norm(dim=1)[rows]
    return int(rows[norms.argsort()[len(rows) // 2]])


def _planted(fault, key, t, ref, targets):
    """The fault planted in a copy of the output t of `key` (ref: the reference, to choose rows)."""
    t = t.clone()
    labeled = (targets != -100).nonzero().flatten()
    if fault == "scaled_10pct":  # a wrong factor on the whole tensor
        return t * 1.1
    if fault == "rows_10pct":  # a wrong factor on every fourth row (a tile, a chunk)
        t[1::4] *= 1.1
        return t
    if fault == "zeroed_row":  # a typical row that carries gradient, never written: a position's
        # row of dh (or loss), a target's row of dW (or entry of db)
        rows = labeled if key in ("loss", "hidden") else targets[labeled].unique()
        t[_median_row(ref, rows)] = 0
        return t
    if fault == "zeroed_small_row":  # the median of all nonzero rows: for dW / db a vocabulary
        # entry no position targets, far below the tensor's norms
        t[_median_row(ref, ref.reshape(ref.shape[0], -1).norm(dim=1).nonzero().flatten())] = 0
        return t
    if fault == "dropped":  # the whole output missing
        return torch.zeros_like(t)
    raise ValueError(fault)


FAULTS = ["scaled_10pct", "rows_10pct", "zeroed_row", "dropped"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_real_outputs_pass(impl, dtype, reduction):
    got, ref, base = _outputs(impl, dtype, reduction)
    _check(got, ref, base, dtype)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_planted_fault_is_caught(impl, dtype, reduction, fault):
    _assert_caught(impl, dtype, reduction, fault)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", IMPLS)
def test_zeroed_small_row_is_caught_in_float32(impl, reduction):
    """A row far below the tensor's norms (a vocabulary entry no position targets, as an
    off-by-one at the vocabulary's edge would leave) is within a 16-bit floor of the norms; the
    float32 run of every test sees it."""
    _assert_caught(impl, torch.float32, reduction, "zeroed_small_row")


def _assert_caught(impl, dtype, reduction, fault):
    got, ref, base = _outputs(impl, dtype, reduction)
    targets = _case(reduction).targets.cpu()
    keys = [k for k in KEYS if k != "loss" or reduction == "none" or fault in ("scaled_10pct", "dropped")]
    for key in keys:
        bad = dict(got, **{key: _planted(fault, key, got[key], ref[key], targets)})
        with pytest.raises(AssertionError, match=rf"^{key}: "):
            _check(bad, ref, base, dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_dropped_term_is_caught(impl, dtype, reduction):
    """The op run without its label-smoothing term (eps = 0.1): each output, alone, fails."""
    case = _case(reduction)
    kwargs = dict(case.kwargs)
    kwargs.pop("label_smoothing")
    wrong = run(_op(impl), dataclasses.replace(case, kwargs=kwargs), dtype)
    got, ref, base = _outputs(impl, dtype, reduction)
    for key in KEYS:
        bad = dict(got, **{key: wrong[key].cpu()})
        with pytest.raises(AssertionError, match=rf"^{key}: "):
            _check(bad, ref, base, dtype)
