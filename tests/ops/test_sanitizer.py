"""Every Triton kernel of the package under tests/sanitizer.py: no access outside its arguments and
no unordered access between programs of one launch, for each backward design and option that
changes which kernel or which code path runs. The interpreter alone would pass such bugs (it runs
programs one by one over host memory); a GPU turns them into garbage, NaN or illegal-address
faults, as the first deterministic kernel did on the H100. The sanitizer's own tests come first:
each fault it should find, planted in a small kernel."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from ..sanitizer import KernelSanitizer, SanitizerError
from .cases import OPTION_SETS, check_against_spec, make_case
from .test_fused import MASKED_LANES, fused_fn, use_config

pytestmark = pytest.mark.interpreter
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the sanitizer checks interpreter launches (TRITON_INTERPRET=1)", allow_module_level=True)
triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _copy(x_ptr, y_ptr, n, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n if MASKED else None
    tl.store(y_ptr + o, tl.load(x_ptr + o, mask=m), mask=m)


@triton.jit
def _shift(x_ptr, n, BLOCK: tl.constexpr):
    # reads the block the next program writes: a read-write race
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + o + 1, tl.load(x_ptr + o), mask=o + 1 < n)


@triton.jit
def _to_first(x_ptr, y_ptr, ATOMIC: tl.constexpr, READ_BACK: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    s = tl.sum(tl.load(x_ptr + o))
    if ATOMIC:
        tl.atomic_add(y_ptr, s, sem="relaxed")
        if READ_BACK:
            tl.store(y_ptr + 1 + tl.program_id(0), tl.load(y_ptr))
    else:
        tl.store(y_ptr, s)


def test_sanitizer_passes_a_correct_kernel_and_counts_launches():
    x = torch.arange(50, dtype=torch.float32)
    y = torch.zeros(50)
    with KernelSanitizer() as san:
        _copy[(4,)](x, y, 50, MASKED=True, BLOCK=16)
    assert torch.equal(x, y)
    assert san.launches["_copy"] == 1


def test_sanitizer_finds_out_of_bounds_reads():
    x, y = torch.zeros(50), torch.zeros(64)  # y large enough: the load is the fault
    with KernelSanitizer(), pytest.raises(Exception, match="out-of-bounds load .* 'x_ptr'"):
        _copy[(4,)](x, y, 50, MASKED=False, BLOCK=16)


def test_sanitizer_finds_writes_past_a_view_inside_its_storage():
    base = torch.zeros(8, 16)
    x = torch.zeros(48)
    with KernelSanitizer(), pytest.raises(Exception, match="out-of-bounds store .* 'y_ptr'"):
        # rows 2-3 of base (32 elements); the kernel writes 48, into row 4 of the same storage
        _copy[(3,)](x, base[2:4], 48, MASKED=True, BLOCK=16)
    assert torch.count_nonzero(base) == 0  # checked before the store, not after


def test_sanitizer_finds_write_races():
    x, y = torch.ones(64), torch.zeros(4)
    with KernelSanitizer(), pytest.raises(Exception, match="several programs .* 'y_ptr'"):
        _to_first[(4,)](x, y, ATOMIC=False, READ_BACK=False, BLOCK=16)
    x = torch.arange(64, dtype=torch.float32)
    with KernelSanitizer(), pytest.raises(Exception, match="several programs"):
        _shift[(4,)](x, 64, BLOCK=16)


def test_sanitizer_allows_atomics_but_not_reading_them_back():
    x, y = torch.ones(64), torch.zeros(8)
    with KernelSanitizer():
        _to_first[(4,)](x, y, ATOMIC=True, READ_BACK=False, BLOCK=16)
    assert y[0] == 64
    with KernelSanitizer(), pytest.raises(Exception, match="several programs"):
        _to_first[(4,)](x, y, ATOMIC=True, READ_BACK=True, BLOCK=16)


def test_sanitizer_error_type_survives_the_interpreter():
    x, y = torch.zeros(50), torch.zeros(64)
    with KernelSanitizer(), pytest.raises(Exception) as err:
        _copy[(4,)](x, y, 50, MASKED=False, BLOCK=16)
    assert isinstance(err.value, SanitizerError) or "SanitizerError" in str(err.value)


# ---- the package's kernels ------------------------------------------------------------------
# backward design -> (FusedConfig fields, fused kwargs, kernels that must have run)
_DESIGNS = {
    "atomic": ({}, {}, {"lce_bwd_kernel"}),
    "atomic_filter": ({}, {"grad_filter": True}, {"lce_bwd_kernel"}),
    "staged": ({}, {"deterministic": True}, {"lce_stage_g_kernel", "lce_stage_dw_kernel", "lce_stage_dh_kernel"}),
    "staged_compact_h": ({"stage_compact_h": True}, {"deterministic": True},
                         {"lce_stage_g_kernel", "lce_stage_dw_kernel", "lce_stage_dh_kernel"}),
    "staged_torch_gemm": ({"stage_gemm": "torch"}, {"deterministic": True}, {"lce_stage_g_kernel"}),
}
_FWD = {"lce_fwd_kernel", "lce_fwd_combine_kernel"}


@MASKED_LANES
@pytest.mark.parametrize("dtype, options", [(torch.bfloat16, "all"), (torch.float32, "plain")], ids=str)
@pytest.mark.parametrize("design", list(_DESIGNS))
def test_fused_kernels_stay_in_bounds_and_race_free(design, dtype, options, monkeypatch):
    # 37 x 2 rows (a partial row tile at the end), V = 517 (partial vocabulary tile, split and
    # stage chunk), D = 72 (partial K and D tiles); 30 % ignored so the index has holes. (Every
    # other test runs under the conftest's sanitizer too; this one holds whatever DVSFT_SANITIZE says.)
    fields, kwargs, kernels = _DESIGNS[design]
    if fields:
        use_config(monkeypatch, **fields)
    case = make_case(lead=(2, 37), options=OPTION_SETS[options], reduction="none", seed=5)
    with KernelSanitizer() as san:
        check_against_spec(case, dtype, fused_fn(**kwargs))
    assert kernels | _FWD <= set(san.launches), san.launches


@MASKED_LANES
@pytest.mark.parametrize("options", ["plain", "all"])
def test_chunked_kernel_stays_in_bounds_and_race_free(options):
    from .cases import lce_stats

    def chunked(*a, **k):
        return lce_stats(*a, **k, impl="chunked", chunk_rows=16).loss

    case = make_case(lead=(2, 37), options=OPTION_SETS[options], reduction="mean", seed=6)
    with KernelSanitizer() as san:
        check_against_spec(case, torch.bfloat16, chunked)
    assert san.launches["ce_chunk_kernel"] >= 2, san.launches


# (rows, D, V, ignored fraction): ragged (partial row, K, D and last-chunk tiles: 552 entries) and
# aligned (every extent a multiple of its tile: EVEN_K, full tiles, two full 2048-entry chunks, as
# at the target shape)
_SM90_SHAPES = {"ragged": (200, 136, 2600, 0.3), "aligned": (256, 128, 4096, 0.0)}


@MASKED_LANES
@pytest.mark.parametrize("dtype, shape", [(torch.float32, "ragged"), (torch.bfloat16, "ragged"),
                                          (torch.bfloat16, "aligned")], ids=str)
@pytest.mark.parametrize("design", ["atomic", "staged", "staged_torch_gemm"])
def test_fused_kernels_with_the_sm90_tiles(design, dtype, shape, monkeypatch):
    # the CUDA configs' tiles (128-row, 128-256-entry tiles, BD 128 / 64) and chunk width (2048)
    # run by the interpreter: tile-size relations (BK dividing BV, G written up to a BV multiple past
    # the last chunk's end, partial D and row tiles) are checked as the GPU will run them
    from dvsft_kernels.ops.kernels import fused_config

    n, D, V, ignore = _SM90_SHAPES[shape]
    fields, kwargs, kernels = _DESIGNS[design]
    base = fused_config.CUDA_CONFIGS["fp32" if dtype == torch.float32 else "half"]
    config = dataclasses.replace(base, target_programs=8, stage_bytes=1, **fields)
    assert config.stage_columns(n, V, 2) == 2048  # two chunks
    monkeypatch.setattr(fused_config, "default_config", lambda dev, dt: config)
    case = make_case(lead=(1, n), D=D, V=V, ignore_frac=ignore, options=OPTION_SETS["all"], reduction="mean",
                     seed=7)
    with KernelSanitizer() as san:
        check_against_spec(case, dtype, fused_fn(**kwargs))
    assert kernels | _FWD <= set(san.launches), san.launches
