"""`impl="fused"`: no logits in device memory and no host synchronisation.

Labeled rows are indexed on the device (`build_index`: a cumulative sum and a scatter into a
buffer sized by the static number of positions N, plus the count as a device scalar), and the
Triton kernels gather hidden rows through that index, so hidden states are never copied. The
forward (`kernels/lce_fused_fwd.py`) keeps per-row max, sum-exp, target logit, argmax and the
smoothing sum over vocabulary splits and merges them; the backward (`kernels/lce_fused_bwd.py`)
recomputes each logit tile from the saved row max and log-sum-exp and forms dh (at the rows'
original positions) and dW, in one of two designs: atomic (float32 atomics from every tile, the
default) or staged (deterministic: G of a chunk of the vocabulary into a bounded buffer, then
two GEMMs without atomics).

Gradients are formed in the autograd backward for every reduction: the logits are recomputed there
in any case, so forming them in the forward (as the compacting implementations do) would save no
FLOPs and would hold float32 dh and dW from the forward to the backward.

Extra memory (beyond inputs, outputs and the float32 gradient accumulators dh (N, D) and, atomic
only, dW (V, D)): the index and per-row statistics, O(N), the forward partials, O(N x S_MIN + rows
in flight), and, staged only, the G buffer (max(FusedConfig.stage_bytes, N x stage_min_cols x 2 B):
64 MiB on CUDA up to N = 16384, then 4 KiB per position).

Differences from the compacting implementations, both so that nothing waits on the device:
- a target outside [0, V) (and not ignore_index) is not a ValueError: that row's loss and lse are
  NaN and it gets no gradient;
- the gradients are accumulated with float32 atomics, in any order, unless `deterministic` (default:
  `torch.are_deterministic_algorithms_enabled()`) selects the staged backward, see kernels/README.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from dvsft_kernels.ops.kernels import lce_fused_bwd as _bwd
from dvsft_kernels.ops.kernels import lce_fused_fwd as _fwd
from dvsft_kernels.ops.launch import _interpreting
from dvsft_kernels.ops.torch_impl import _accum_f32

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
    # large N a budget-sized chunk would turn the backward into dh traffic (kernels/README.md)
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
    epi = _fwd.FWD_TILES.get(width + "_epilogue")
    return FusedConfig(fwd=Tiles(**_fwd.FWD_TILES[width]), bwd=Tiles(**_bwd.BWD_TILES[width]),
                       stage=Tiles(**_bwd.STAGE_TILES[width]), fwd_epilogue=Tiles(**epi) if epi else None)


# sm_90 choices (kernels/README.md) for 16-bit and float32 operands: the same tiles as the kernels'
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


def _target_programs(cfg: FusedConfig, device: torch.device) -> int:
    if cfg.target_programs is not None:
        return cfg.target_programs
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return 2 * _SM_COUNT[i]


def _dot_options(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, PRECISION): upcast tiles to float32 in the interpreter (its bf16 dot is wrong);
    float32 weights on a GPU use three TF32 products (about float32 accuracy on tensor cores)."""
    if _interpreting():
        return True, "ieee"
    return False, "tf32x3" if dtype == torch.float32 else "tf32"


def check_device(device: torch.device) -> None:
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise ValueError(f"impl: 'fused' runs Triton kernels and needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got {device}")


def check_deterministic(deterministic: bool, device: torch.device) -> None:
    """The first deterministic backward (read-modify-write kernels) returned wrong gradients (NaN,
    garbage, an illegal address) on an H100 with Triton 3.6 while the interpreter passed it
    (benchmarks/results/2026-11-27-h100/, kernels/README.md). Its replacement, the staged backward,
    has not run on a GPU yet: until it has, CUDA calls need DVSFT_FUSED_DETERMINISTIC=1, and the
    error names the deterministic alternative."""
    if deterministic and device.type == "cuda" and os.environ.get("DVSFT_FUSED_DETERMINISTIC") != "1":
        raise ValueError(
            "deterministic: the fused deterministic (staged) backward is disabled on CUDA until a GPU run "
            "verifies it (a first design returned wrong gradients on an H100). Use impl='chunked' "
            "(deterministic: cuBLAS products and a Triton pass without atomics), or deterministic=False; "
            "DVSFT_FUSED_DETERMINISTIC=1 runs it anyway, to verify it.")


def _wants_deterministic(opts) -> bool:
    det = opts.get("deterministic")
    return torch.are_deterministic_algorithms_enabled() if det is None else bool(det)


def build_index(flat_t: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, count): idx[j] (int32, j < count) is the position of the j-th labeled target, in order;
    count a 1-element int32 device tensor. No host synchronisation: slots past count hold 0."""
    N = flat_t.numel()
    valid = flat_t != ignore_index
    pos = torch.cumsum(valid, 0, dtype=torch.int32) - 1
    # unlabeled positions all land in the dump slot N, cut off below
    dest = torch.where(valid, pos, N).long()
    idx = torch.zeros(N + 1, dtype=torch.int32, device=flat_t.device)
    idx.scatter_(0, dest, torch.arange(N, dtype=torch.int32, device=flat_t.device))
    count = valid.sum(dtype=torch.int32).reshape(1)
    return idx[:N], count


def _strides(h2: torch.Tensor, weight: torch.Tensor):
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


def fused_forward(h2, weight, bias, flat_t, idx, count, *, label_smoothing=0.0, z_loss=0.0, softcap=None,
                  config: FusedConfig | None = None):
    """Per-position row_loss (float32, 0 where unlabeled), lse, correct (bool), and the per-slot
    statistics (2, N) float32 [row max; log sum-exp - max] the backward reads."""
    N, D = h2.shape
    V = weight.shape[0]
    dev = h2.device
    cfg = config or default_config(dev, weight.dtype)
    has_smoothing = label_smoothing > 0
    t = cfg.fwd_tiles(bias is not None, has_smoothing)
    target = _target_programs(cfg, dev)
    entries, grid, block_s = partial_entries(N, V, cfg, target, t)
    dot_f32, precision = _dot_options(weight.dtype)

    row_loss = torch.zeros(N, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    correct = torch.zeros(N, dtype=torch.int8, device=dev)
    stat = torch.empty(2, N, dtype=torch.float32, device=dev)
    if N == 0:
        return row_loss, lse, correct.view(torch.bool), stat
    pm = torch.empty(entries, dtype=torch.float32, device=dev)
    pse = torch.empty(entries, dtype=torch.float32, device=dev)
    yt = torch.empty(N, dtype=torch.float32, device=dev)
    psy = torch.empty(entries, dtype=torch.float32, device=dev) if has_smoothing else pm
    parg = torch.empty(entries, dtype=torch.int32, device=dev)
    b = bias if bias is not None else pm  # dummy pointer when unused

    _fwd._lce_fwd_kernel[(grid,)](
        h2, weight, b, flat_t, idx, count, pm, pse, psy, parg, yt,
        V, D, *_strides(h2, weight),
        float(softcap) if softcap is not None else 1.0, target,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=has_smoothing,
        BM=t.BM, BV=t.BV, BK=t.BK, GROUP=t.GROUP, S_MIN=cfg.s_min, S_MAX=cfg.s_max,
        EVEN_K=D % t.BK == 0, DOT_F32=dot_f32, PRECISION=precision,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    block_r = max(1, min(128, 2048 // block_s))
    _fwd._lce_fwd_combine_kernel[(triton.cdiv(N, block_r),)](
        flat_t, idx, count, pm, pse, psy, parg, yt, stat, row_loss, lse, correct,
        N, V, target, float(label_smoothing), float(z_loss),
        HAS_SMOOTHING=has_smoothing, BM=t.BM, BV=t.BV, S_MIN=cfg.s_min, S_MAX=cfg.s_max,
        BLOCK_R=block_r, BLOCK_S=block_s, num_warps=4,
    )
    return row_loss, lse, correct.view(torch.bool), stat


def fused_backward(h2, weight, bias, flat_t, idx, count, stat, scale, *, label_smoothing=0.0, z_loss=0.0,
                   softcap=None, grad_h=True, grad_w=True, grad_b=False, deterministic=False, grad_filter=False,
                   config: FusedConfig | None = None):
    """dh (N, D) float32 by position (zero where unlabeled), dW (V, D), db (V,) (None where not
    requested) for the row gradient scales `scale` (N,) float32 by position. dW and db are float32
    from the atomic backward, in the weight's / bias's dtype from the staged one."""
    N, D = h2.shape
    V = weight.shape[0]
    dev = h2.device
    cfg = config or default_config(dev, weight.dtype)
    dot_f32, precision = _dot_options(weight.dtype)
    staged = cfg.backward_design(deterministic) == "staged"
    dh = torch.zeros(N, D, dtype=torch.float32, device=dev) if grad_h else None

    def zero_dw_db():
        return (torch.zeros(V, D, dtype=torch.float32, device=dev) if grad_w else None,
                torch.zeros(V, dtype=torch.float32, device=dev) if grad_b else None)

    if N == 0 or not (grad_h or grad_w or grad_b):
        return (dh, *zero_dw_db())
    dummy = stat
    common = (h2, weight, bias if bias is not None else dummy, flat_t, idx, count, stat, scale.float().contiguous())
    scalars = (N, V, D, *_strides(h2, weight), float(label_smoothing), float(z_loss),
               float(softcap) if softcap is not None else 1.0, FILTER_TAU[weight.dtype])
    flags = {"HAS_BIAS": bias is not None, "HAS_SOFTCAP": softcap is not None, "HAS_SMOOTHING": label_smoothing > 0,
             "FILTER": bool(grad_filter), "DOT_F32": dot_f32, "PRECISION": precision}

    if staged:  # writes dW / db whole, in the operand dtypes
        return _staged_backward(common, scalars, flags, cfg, dh, grad_w, grad_b)
    dW, db = zero_dw_db()
    t = cfg.bwd
    _bwd._lce_bwd_kernel[(triton.cdiv(N, t.BM) * triton.cdiv(V, t.BV),)](  # grid for the static bound N
        *common, dh if grad_h else dummy, dW if grad_w else dummy, db if grad_b else dummy, *scalars,
        COMPUTE_DH=grad_h, COMPUTE_DW=grad_w, COMPUTE_DB=grad_b, GROUP=t.GROUP, **flags,
        BM=t.BM, BV=t.BV, BK=t.BK, BD=t.BD, EVEN_K=D % t.BK == 0, EVEN_D=D % t.BD == 0,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return dh, dW, db


def _staged_backward(common, scalars, flags, cfg: FusedConfig, dh, grad_w, grad_b):
    """The deterministic design (kernels/README.md): per chunk of VC vocabulary entries, G of every
    labeled row into a bounded buffer, then dW of the chunk's rows and dh += G W_chunk as GEMMs
    without atomics (Triton, or torch.mm over all N positions with stage_gemm="torch"). The chunk
    loop is static (V, N), so a CUDA graph captures it."""
    h2, weight, bias, _, idx, count, dummy, _ = common  # bias: the dummy when there is none
    N, V, D = scalars[:3]
    dev = h2.device
    tg, ts = cfg.bwd, cfg.stage
    VC = cfg.stage_columns(N, V, weight.element_size())
    by_pos = cfg.stage_gemm == "torch"
    # by slot: rows past count are never read; by position: unlabeled rows are never written, and
    # the GEMMs read them, so they start (and stay) zero
    g = (torch.zeros if by_pos else torch.empty)(N, VC, dtype=weight.dtype, device=dev)
    # written whole, chunk by chunk (every row, every D tile): no zero fill, no float32 copy
    dW = torch.empty(V, D, dtype=weight.dtype, device=dev) if grad_w else None
    db = torch.empty(V, dtype=bias.dtype, device=dev) if grad_b else None
    pdb = torch.empty(triton.cdiv(N, tg.BM), VC, dtype=torch.float32, device=dev) if grad_b else g
    dot = {"DOT_F32": flags["DOT_F32"], "PRECISION": flags["PRECISION"]}
    n_rt_g, n_rt_s = triton.cdiv(N, tg.BM), triton.cdiv(N, ts.BM)
    n_dt = triton.cdiv(D, ts.BD)
    # slots past count gather row 0: a static-size copy, no host sync; the kernel never reads them
    hs = h2.index_select(0, idx) if cfg.stage_compact_h and grad_w and not by_pos else h2
    triton_dw = grad_w and not by_pos
    for v0 in range(0, V, VC):
        vc = min(VC, V - v0)
        _bwd._lce_stage_g_kernel[(n_rt_g * triton.cdiv(vc, tg.BV),)](
            *common, g, pdb, *scalars, v0, VC, **flags, COMPUTE_DB=grad_b, BY_POSITION=by_pos,
            BM=tg.BM, BV=tg.BV, BK=tg.BK, GROUP=tg.GROUP, EVEN_K=D % tg.BK == 0,
            num_warps=tg.num_warps, num_stages=tg.num_stages,
        )
        if triton_dw or grad_b:
            _bwd._lce_stage_dw_kernel[(triton.cdiv(vc, ts.BV) * (n_dt if triton_dw else 1),)](
                hs, idx, count, g, pdb, dW if triton_dw else dummy, db if grad_b else dummy,
                v0, V, D, VC, hs.stride(0), hs.stride(1), COMPUTE_DW=triton_dw, COMPUTE_DB=grad_b,
                GATHER=hs is h2, BV=ts.BV, BD=ts.BD, BK=ts.BK, GROUP=ts.GROUP, BM_G=tg.BM, **dot,
                num_warps=ts.num_warps, num_stages=ts.num_stages,
            )
        if grad_w and by_pos:  # float32 accumulation inside the GEMM, written in the weight's dtype
            torch.mm(g[:, :vc].t(), h2, out=dW[v0:v0 + vc])
        if dh is not None and by_pos:
            _accum_f32(dh, g[:, :vc], weight[v0:v0 + vc])
        elif dh is not None:
            _bwd._lce_stage_dh_kernel[(n_rt_s * n_dt,)](
                weight, idx, count, g, dh, v0, V, D, VC, weight.stride(0), weight.stride(1),
                BM=ts.BM, BD=ts.BD, BK=ts.BK, GROUP=ts.GROUP, **dot,
                num_warps=ts.num_warps, num_stages=ts.num_stages,
            )
    return dh, dW, db


# ------------------------------------------------------------------ the op on full positions
def forward_core(hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction, opts,
                 grads=(True, True, True)):
    """The op's forward without autograd: (out, row_loss, lse, correct shaped like targets) and
    what backward_core needs (a tuple of tensors / None). grads: which inputs want a gradient."""
    D = hidden.shape[-1]
    h2 = hidden.reshape(-1, D)
    flat_t = targets.reshape(-1).contiguous()
    dev = hidden.device
    check_device(dev)
    if any(grads):
        check_deterministic(_wants_deterministic(opts), dev)  # at the call, not first in the backward
    idx, count = build_index(flat_t, ignore_index)
    eps, zl, cap = opts["label_smoothing"], opts["z_loss"], opts["softcap"]
    row_loss, lse, correct, stat = fused_forward(h2, weight, bias, flat_t, idx, count, label_smoothing=eps,
                                                 z_loss=zl, softcap=cap, config=opts.get("fused_config"))
    tw = token_weights.reshape(-1).float() if token_weights is not None else None
    if reduction == "mean":
        if num_items is None:
            denom = count.reshape(()).float()
        elif isinstance(num_items, torch.Tensor):
            denom = num_items.to(device=dev, dtype=torch.float32)
        else:
            denom = torch.full((), float(num_items), device=dev, dtype=torch.float32)
        # n == 0 (or num_items == 0): loss 0 and zero gradients, never NaN
        inv = torch.where(denom > 0, 1.0 / denom.clamp_min(1e-30), torch.zeros_like(denom))
        scale = tw * inv if tw is not None else inv.expand(flat_t.numel())
    elif reduction == "sum":
        scale = tw
    else:
        scale = tw
    if reduction == "none":
        out = row_loss * tw if tw is not None else row_loss.clone()
        out = out.reshape(targets.shape)
    else:
        out = (row_loss * scale).sum() if scale is not None else row_loss.sum()
    shape = targets.shape
    saved = (h2, weight, bias, flat_t, idx, count, stat, scale)
    return out, row_loss.reshape(shape), lse.reshape(shape), correct.reshape(shape), saved


def backward_core(saved, g, reduction, opts, grads, hidden_shape, dtypes):
    """Gradients for the upstream gradient g of the op's first output (a scalar for mean / sum,
    shaped like targets for none)."""
    h2, weight, bias, flat_t, idx, count, stat, scale = saved
    grad_h, grad_w, grad_b = grads
    hdtype, wdtype, bdtype = dtypes
    g = g.float()
    if reduction == "none":
        g = g.reshape(-1)
        scale = g * scale if scale is not None else g
    else:
        scale = scale * g if scale is not None else g.expand(flat_t.numel())
    det = _wants_deterministic(opts)
    check_deterministic(det, h2.device)
    dh, dW, db = fused_backward(
        h2, weight, bias, flat_t, idx, count, stat, scale,
        label_smoothing=opts["label_smoothing"], z_loss=opts["z_loss"], softcap=opts["softcap"],
        grad_h=grad_h, grad_w=grad_w, grad_b=grad_b,
        deterministic=det,
        grad_filter=bool(opts.get("grad_filter", False)), config=opts.get("fused_config"),
    )
    d_hidden = dh.to(hdtype).reshape(hidden_shape) if grad_h else None
    d_weight = dW.to(wdtype) if grad_w else None
    d_bias = db.to(bdtype) if grad_b else None
    return d_hidden, d_weight, d_bias
