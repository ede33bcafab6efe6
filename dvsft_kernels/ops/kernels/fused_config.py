"""Tiles and configuration of the fused kernels (lce_fused_fwd.py, lce_fused_bwd.py): the sm_90
tile tables, `FusedConfig`, the interpreter's small tiles, and the sizing rules the launchers share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from dvsft_kernels.ops.options import interpreting

# sm_90 tiles of the forward by operand width (README.md). 16-bit: a 128 x 256 float32 logit tile
# is 128 registers per thread at 8 warps; with the plain epilogue (softcap allowed) the kernel
# fits in 255 registers without spills and ran 20 % faster than 128 x 128 on an H100
# (benchmarks/results/2026-11-27-h100/fused_sweep.json); a bias or label smoothing adds live values
# that spill there, so those calls use 128 x 128 ("_epilogue"). 3 stages of BK 64 (16-bit) or 32
# (float32, three TF32 products). GROUP: row tiles that programs running together share.
FWD_TILES = {
    "half": {"BM": 128, "BV": 256, "BK": 64, "num_warps": 8, "num_stages": 3, "GROUP": 8},
    "half_epilogue": {"BM": 128, "BV": 128, "BK": 64, "num_warps": 8, "num_stages": 3, "GROUP": 8},
    "fp32": {"BM": 128, "BV": 128, "BK": 32, "num_warps": 8, "num_stages": 3, "GROUP": 8},
}


# sm_90 tiles by operand width (README.md), each the largest that compiles without spills (the
# static report): a 128 x 128 logit / gradient tile (64 float32 per thread at 8 warps), gradient
# products in 64-wide slices of D; float32 operands (three TF32 products) take BV 64, BK 32.
BWD_TILES = {
    "half": {"BM": 128, "BV": 128, "BK": 64, "BD": 64, "num_warps": 8, "num_stages": 3, "GROUP": 8},
    "fp32": {"BM": 128, "BV": 64, "BK": 32, "BD": 32, "num_warps": 8, "num_stages": 3, "GROUP": 8},
}
# The staged backward's gradient GEMMs (dh: BM rows x BD of D; dW: BV vocabulary entries x BD; K
# steps of BK), plain GEMM tiles with a float32 accumulator of 64 registers per thread at 8 warps.
# 5 stages: dW's K steps gather h through idx, and Triton pipelines that load chain 3 deep at 5
# stages (2 at 3 or 4); dh then keeps 5 W and G tiles in flight (160 KB of shared memory).
STAGE_TILES = {
    "half": {"BM": 128, "BV": 128, "BK": 64, "BD": 128, "num_warps": 8, "num_stages": 5, "GROUP": 8},
    "fp32": {"BM": 128, "BV": 128, "BK": 32, "BD": 64, "num_warps": 8, "num_stages": 5, "GROUP": 8},
}



# Filtering threshold per output dtype: its unit roundoff (half the spacing of floats in [1, 2)).
FILTER_TAU = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch options of one kernel. BM: labeled rows, BV: vocabulary entries,
    BK: hidden dimension per step of the logit GEMM, BD: hidden dimension per step of the
    gradient GEMMs. All powers of two >= 16 (tl.dot)."""

    BM: int
    BV: int
    BK: int
    BD: int = 64
    num_warps: int = 8
    num_stages: int = 3
    GROUP: int = 8


@dataclass(frozen=True)
class FusedConfig:
    fwd: Tiles
    bwd: Tiles  # the atomic backward kernel; the staged backward's G kernel (the same logit tile)
    stage: Tiles  # the staged backward's gradient GEMMs (BM: dh rows, BV: dW rows, BD, BK)
    s_min: int = 16  # vocabulary splits at least (README: programs running together share row tiles)
    s_max: int = 256
    target_programs: int | None = None  # None: 2 per SM on CUDA, 4 in the interpreter
    # forward tiles when a bias or label smoothing widens the epilogue (None: `fwd`)
    fwd_epilogue: Tiles | None = None
    # the staged backward's G buffer (N slots x a chunk of VC vocabulary entries) in bytes, and the
    # fewest columns per chunk whatever the budget: dh is read and written once per chunk, so for
    # large N a budget-sized chunk would turn the backward into dh traffic (README.md)
    stage_bytes: int = 64 << 20
    stage_min_cols: int = 2048
    # copy the labeled hidden rows into slot order once (N x D, the size of the hidden states) so the
    # dW GEMM reads them without the per-step index gather; off: that copy exceeds 64 MiB at 16k rows
    stage_compact_h: bool = False
    # the staged gradient GEMMs: "triton" (K and rows stop at the labeled count) or "torch" (cuBLAS
    # over G by position: all N positions, unlabeled rows zero; no gather, no scatter)
    stage_gemm: str = "triton"
    # "atomic", "staged", or None: "staged" when deterministic, else "atomic"
    backward: str | None = None

    def __post_init__(self):
        if self.backward not in (None, "atomic", "staged"):
            raise ValueError(f"fused_config: backward must be None, 'atomic' or 'staged', got {self.backward!r}")
        if self.stage_gemm not in ("triton", "torch"):
            raise ValueError(f"fused_config: stage_gemm must be 'triton' or 'torch', got {self.stage_gemm!r}")
        if self.stage_bytes <= 0 or self.stage_min_cols < 0:
            raise ValueError(f"fused_config: stage_bytes must be positive and stage_min_cols >= 0, got "
                             f"{self.stage_bytes} and {self.stage_min_cols}")
        if self.bwd.BV % self.stage.BK:  # the dh kernel reads G past the chunk's end up to a BK step
            raise ValueError(f"fused_config: stage.BK ({self.stage.BK}) must divide bwd.BV ({self.bwd.BV})")

    def backward_design(self, deterministic: bool) -> str:
        if self.backward is None:
            return "staged" if deterministic else "atomic"
        if deterministic and self.backward == "atomic":
            raise ValueError("fused_config: backward='atomic' adds in any order; deterministic=True needs "
                             "backward='staged' or None")
        return self.backward

    def stage_columns(self, N: int, V: int, esize: int) -> int:
        """VC, the vocabulary entries per chunk of the staged backward: the most that keep N x VC
        G entries of esize bytes within stage_bytes, at least stage_min_cols, a multiple of every
        tile that steps through it, at most the vocabulary rounded up to that tile."""
        align = max(self.bwd.BV, self.stage.BV, self.stage.BK)
        vc = max(self.stage_bytes // (max(N, 1) * esize), self.stage_min_cols) // align * align
        return max(align, min(vc, triton.cdiv(V, align) * align))

    def fwd_tiles(self, has_bias: bool, has_smoothing: bool) -> Tiles:
        return self.fwd_epilogue if (has_bias or has_smoothing) and self.fwd_epilogue else self.fwd


def _cuda_config(width: str) -> FusedConfig:
    epi = FWD_TILES.get(width + "_epilogue")
    return FusedConfig(fwd=Tiles(**FWD_TILES[width]), bwd=Tiles(**BWD_TILES[width]),
                       stage=Tiles(**STAGE_TILES[width]), fwd_epilogue=Tiles(**epi) if epi else None)


# sm_90 choices (README.md) for 16-bit and float32 operands: the same tiles as the kernels'
# STATIC_CONFIGS, which the static report compiles and checks for spills and HGMMA.
CUDA_CONFIGS = {"half": _cuda_config("half"), "fp32": _cuda_config("fp32")}
# The interpreter runs every program in NumPy: small tiles keep masked work low on test shapes.
INTERPRETER_CONFIG = FusedConfig(
    fwd=Tiles(BM=16, BV=64, BK=32, GROUP=2),
    bwd=Tiles(BM=16, BV=64, BK=32, BD=32, GROUP=2),
    stage=Tiles(BM=16, BV=32, BK=32, BD=32, GROUP=2),
    s_min=2,
    s_max=8,
    target_programs=4,
    stage_bytes=16 << 10,  # several chunks on the test shapes
    stage_min_cols=0,
)

_SM_COUNT: dict[int, int] = {}


def default_config(device: torch.device, dtype: torch.dtype) -> FusedConfig:
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    return CUDA_CONFIGS["fp32" if dtype == torch.float32 else "half"]


def target_programs(cfg: FusedConfig, device: torch.device) -> int:
    if cfg.target_programs is not None:
        return cfg.target_programs
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return 2 * _SM_COUNT[i]


def dot_options(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, PRECISION): upcast tiles to float32 in the interpreter (its bf16 dot is wrong);
    float32 weights on a GPU use three TF32 products (about float32 accuracy on tensor cores)."""
    if interpreting():
        return True, "ieee"
    return False, "tf32x3" if dtype == torch.float32 else "tf32"


def strides(h2: torch.Tensor, weight: torch.Tensor):
    return h2.stride(0), h2.stride(1), weight.stride(0), weight.stride(1)


def partial_entries(N: int, V: int, cfg: FusedConfig, target: int, t: Tiles | None = None) -> tuple[int, int, int]:
    """(entries of the partial buffers, forward grid size, BLOCK_S): upper bounds over every count
    in [0, N] of count x S(count) and n_row_tiles x S(count) (the device picks S from count), for
    the forward tiles t (default cfg.fwd)."""
    t = t or cfg.fwd
    cap = max(1, min(cfg.s_max, triton.cdiv(V, t.BV)))
    s_lo = min(cfg.s_min, cap)
    n_rt = triton.cdiv(N, t.BM)
    entries = min(N * cap, N * s_lo + t.BM * (target + n_rt + 1))
    grid = min(n_rt * cap, n_rt * s_lo + target + n_rt)
    return max(entries, 1), max(grid, 1), triton.next_power_of_2(cap)
