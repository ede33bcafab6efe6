"""Fused forward of the linear cross-entropy: logit tiles by `tl.dot`, never stored.

Labeled row j (slot j of the device-built index, j < count) is hidden row idx[j]. For a tile of BM
slots and a tile of BV vocabulary entries, z = h W^T (+ b) lives in registers; per row the kernel
keeps, over the vocabulary tiles of its split,

    y  = softcap * tanh(z / softcap)              (HAS_SOFTCAP)   else y = z
    m  = max_j y_j,  se = sum_j exp(y_j - m)      (online: se rescaled when m grows)
    arg = first j with y_j == m,  yt = y_t,  sy = sum_j y_j (HAS_SMOOTHING)

and writes them as one partial per (slot, split). The combine kernel merges a row's S partials:
M = max m, S = sum se exp(m - M), lse = M + log S,

    loss = (1 - eps) (M - yt + log S) + eps (M - sy / V + log S) + zl lse^2,
    pred = first argmax (the combine kernel writes it by position).

Soft targets (SOFT_K = K > 0; t and q (N, K) by position, `Inputs` in ops/backends/base.py): yt =
sum_k q_k y_{t_k}, K more dot products h . W[t_k] in split 0 (O(K D) per row; slots of
probability 0 are not loaded), and a row with any slot outside [0, V) is a NaN row.

No host synchronisation: count (labeled rows) is read on the device; the grid is sized for the
static upper bound and programs past the real work return at once. The number of vocabulary splits
S is chosen on the device from count (`_num_splits`), so a few rows still fill the GPU. Design,
tile choice and the byte model: README.md beside this file.
"""

import torch
import triton
import triton.language as tl

from dvsft_kernels.ops.kernels import fused_config
from dvsft_kernels.ops.kernels.common import grouped, logit_tile, softcap_tanh, target32
from dvsft_kernels.ops.kernels.fused_config import (
    FWD_TILES,
    FusedConfig,
    dot_options,
    partial_entries,
    strides,
    target_programs,
)


@triton.jit
def _num_splits(count, V, TARGET, BM: tl.constexpr, BV: tl.constexpr, S_MIN: tl.constexpr,
                S_MAX: tl.constexpr):
    """Vocabulary splits for `count` rows: enough (row tile, split) programs to reach TARGET, at
    least S_MIN (so that programs running together share row tiles, README.md), at most S_MAX and
    one vocabulary tile per split."""
    n_rt = tl.maximum(tl.cdiv(count, BM), 1)
    s = tl.maximum(tl.cdiv(TARGET, n_rt), S_MIN)
    return tl.maximum(tl.minimum(tl.minimum(s, S_MAX), tl.cdiv(V, BV)), 1)


@triton.jit
def _target_logit(h_ptr, w_ptr, b_ptr, o_pos, m_rows, b_t, D, stride_hn, stride_hd, stride_wv, stride_wd,
                  HAS_BIAS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """z_t = h . W[t] (+ b[t]) per row, float32 products and sums ([BM] float32; 0 where the row
    is masked or t is -1)."""
    m_t = m_rows & (b_t >= 0)
    o_hrow = o_pos * stride_hn
    o_wrow = tl.where(m_t, b_t, 0).to(tl.int64) * stride_wv
    o_k = tl.arange(0, BK)
    b_acc = tl.zeros([BM, BK], dtype=tl.float32)
    for k0 in range(0, D, BK):
        o_kk = k0 + o_k
        if EVEN_K:
            m = m_t[:, None]
        else:
            m = m_t[:, None] & (o_kk < D)[None, :]
        b_h = tl.load(h_ptr + o_hrow[:, None] + o_kk[None, :] * stride_hd, mask=m, other=0.0)
        b_w = tl.load(w_ptr + o_wrow[:, None] + o_kk[None, :] * stride_wd, mask=m, other=0.0)
        b_acc += b_h.to(tl.float32) * b_w.to(tl.float32)
    b_zt = tl.sum(b_acc, axis=1)
    if HAS_BIAS:
        b_zt += tl.load(b_ptr + tl.where(m_t, b_t, 0), mask=m_t, other=0.0).to(tl.float32)
    return b_zt


@triton.jit
def soft_target_logit(h_ptr, w_ptr, b_ptr, t_ptr, q_ptr, o_pos, m_rows, V, D,
                      stride_hn, stride_hd, stride_wv, stride_wd, softcap, inv_cap,
                      HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SOFT_K: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """sum_k q_k y_{t_k} per row ([BM] float32): one target dot product per slot, the softcap
    applied to each (y is not linear in z). Slots of probability 0 (unused) load nothing; with K = 1
    and q = 1 this is the hard y_t bit for bit."""
    b_yt = tl.zeros([BM], dtype=tl.float32)
    for k in range(SOFT_K):
        o_tk = o_pos * SOFT_K + k
        b_q = tl.load(q_ptr + o_tk, mask=m_rows, other=0.0)
        b_t = target32(tl.load(t_ptr + o_tk, mask=m_rows, other=0), V)
        b_z = _target_logit(h_ptr, w_ptr, b_ptr, o_pos, m_rows & (b_q != 0.0), b_t, D, stride_hn, stride_hd,
                            stride_wv, stride_wd, HAS_BIAS, BM, BK, EVEN_K)
        if HAS_SOFTCAP:
            b_z, _ = softcap_tanh(b_z, softcap, inv_cap)
        b_yt += b_q * b_z
    return b_yt


@triton.jit
def slots_in_range(t_ptr, o_pos, m_rows, V, SOFT_K: tl.constexpr):
    """Per row: every one of its SOFT_K target slots (t_ptr [N, K] by position) lies in [0, V).
    Rows failing this are NaN rows without gradient (a host-side check would synchronise)."""
    b_ok = o_pos >= 0  # all true: o_pos is a position
    for k in range(SOFT_K):
        b_t = target32(tl.load(t_ptr + o_pos * SOFT_K + k, mask=m_rows, other=0), V)
        b_ok = b_ok & (b_t >= 0)
    return b_ok


@triton.jit
def lce_fwd_kernel(
    h_ptr,  # [N, D] hidden states (all positions; labeled rows gathered through idx)
    w_ptr,  # [V, D] weight
    b_ptr,  # [V] bias (read only if HAS_BIAS)
    t_ptr,  # [N] int targets, by position; soft: [N, K]
    q_ptr,  # soft: [N, K] float32 target probabilities by position (read only if SOFT_K > 0)
    idx_ptr,  # [N] int32: slot -> position; slots >= count are never read
    cnt_ptr,  # [1] int32: count of labeled rows
    pm_ptr, pse_ptr, psy_ptr,  # [P] float32 partials, entry slot * S + split
    parg_ptr,  # [P] int32 partial first argmax
    yt_ptr,  # [N] float32 y_t by slot (split 0 writes it)
    V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    softcap,  # > 0; ignored (pass 1.0) unless HAS_SOFTCAP
    TARGET,  # programs wanted in flight (a few per SM)
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
    S_MIN: tl.constexpr, S_MAX: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    SOFT_K: tl.constexpr,  # 0: hard targets; K > 0: K soft targets per row (t_ptr, q_ptr [N, K])
):
    pid = tl.program_id(0)
    count = tl.load(cnt_ptr)
    n_rt = tl.cdiv(count, BM)
    S = _num_splits(count, V, TARGET, BM, BV, S_MIN, S_MAX)
    if pid >= n_rt * S:
        return
    i_r, i_s = grouped(pid, n_rt, S, GROUP)
    n_vt = tl.cdiv(V, BV)
    vt0 = i_s * n_vt // S
    vt1 = (i_s + 1) * n_vt // S

    o_j = i_r * BM + tl.arange(0, BM)
    m_j = o_j < count
    o_pos = tl.load(idx_ptr + o_j, mask=m_j, other=0).to(tl.int64)
    if SOFT_K == 0:
        b_t = target32(tl.load(t_ptr + o_pos, mask=m_j, other=0), V)
    inv_cap = 1.0 / softcap

    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_se = tl.zeros([BM], dtype=tl.float32)
    b_sy = tl.zeros([BM], dtype=tl.float32)
    b_arg = tl.zeros([BM], dtype=tl.int32)
    if i_s == 0:
        # y_t as its own dot product (BM x D, next to BM x V x D of the tiles): picking it out of
        # every tile costs ~90 registers of target compares in the loop (README.md)
        if SOFT_K > 0:
            b_zt = soft_target_logit(h_ptr, w_ptr, b_ptr, t_ptr, q_ptr, o_pos, m_j, V, D, stride_hn, stride_hd,
                                     stride_wv, stride_wd, softcap, inv_cap, HAS_BIAS, HAS_SOFTCAP, SOFT_K, BM, BK,
                                     EVEN_K)
        else:
            b_zt = _target_logit(h_ptr, w_ptr, b_ptr, o_pos, m_j, b_t, D, stride_hn, stride_hd, stride_wv,
                                 stride_wd, HAS_BIAS, BM, BK, EVEN_K)
            if HAS_SOFTCAP:
                b_zt, _ = softcap_tanh(b_zt, softcap, inv_cap)
        tl.store(yt_ptr + o_j, b_zt, mask=m_j)
    for vt in range(vt0, vt1):
        o_v = vt * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_z = logit_tile(h_ptr, w_ptr, b_ptr, o_pos, m_j, o_v, m_v, D,
                          stride_hn, stride_hd, stride_wv, stride_wd,
                          HAS_BIAS, BM, BV, BK, EVEN_K, DOT_F32, PRECISION)  # [BM, BV]
        if HAS_SOFTCAP:
            b_y, _ = softcap_tanh(b_z, softcap, inv_cap)
        else:
            b_y = b_z
        b_y = tl.where(m_v[None, :], b_y, float("-inf"))
        # tile max and its first index; tiles come in increasing v, so a strict ">" keeps the first
        b_tm, b_ta = tl.max(b_y, axis=1, return_indices=True, return_indices_tie_break_left=True)  # [BM]
        b_arg = tl.where(b_tm > b_m, b_ta + vt * BV, b_arg)
        b_mn = tl.maximum(b_m, b_tm)
        b_ref = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_se = b_se * tl.exp(b_m - b_ref) + tl.sum(tl.exp(b_y - b_ref[:, None]), axis=1)
        b_m = b_mn
        if HAS_SMOOTHING:
            b_sy += tl.sum(tl.where(m_v[None, :], b_y, 0.0), axis=1)

    o_p = o_j * S + i_s
    tl.store(pm_ptr + o_p, b_m, mask=m_j)
    tl.store(pse_ptr + o_p, b_se, mask=m_j)
    tl.store(parg_ptr + o_p, b_arg, mask=m_j)
    if HAS_SMOOTHING:
        tl.store(psy_ptr + o_p, b_sy, mask=m_j)


@triton.jit
def lce_fwd_combine_kernel(
    t_ptr, idx_ptr, cnt_ptr,
    pm_ptr, pse_ptr, psy_ptr, parg_ptr, yt_ptr,  # partials of lce_fwd_kernel
    stat_ptr,  # [2, N] float32 out, by slot: row max M and log S (what the backward reads)
    loss_ptr, lse_ptr, pred_ptr,  # [N] by position (float32, float32, int32 argmax); only labeled ones written
    N, V, TARGET,
    eps, zl,
    HAS_SMOOTHING: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, S_MIN: tl.constexpr, S_MAX: tl.constexpr,  # the forward's
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,  # BLOCK_S: power of two >= S_MAX
    SOFT_K: tl.constexpr,  # the forward's: t_ptr [N, K] when > 0
):
    """Merge each row's S partials; loss, lse and the first argmax at the row's position. A target outside
    [0, V) (not checked on the host: that would synchronise; soft: any slot) gives NaN loss and lse;
    the backward gives that row a zero gradient."""
    pid = tl.program_id(0)
    count = tl.load(cnt_ptr)
    if pid * BLOCK_R >= count:
        return
    S = _num_splits(count, V, TARGET, BM, BV, S_MIN, S_MAX)
    o_j = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    m_j = o_j < count
    o_s = tl.arange(0, BLOCK_S)
    m_p = m_j[:, None] & (o_s < S)[None, :]
    o_p = o_j[:, None] * S + o_s[None, :]  # [BR, BS]
    b_m = tl.load(pm_ptr + o_p, mask=m_p, other=float("-inf"))
    b_mx = tl.where(m_j, tl.max(b_m, axis=1), 0.0)  # [BR]; padded rows computed on 0 / 1
    b_sum = tl.sum(tl.load(pse_ptr + o_p, mask=m_p, other=0.0) * tl.exp(b_m - b_mx[:, None]), axis=1)
    b_sum = tl.where(m_j, b_sum, 1.0)
    b_yt = tl.load(yt_ptr + o_j, mask=m_j, other=0.0)
    # splits are in vocabulary order and each holds its first argmax: the first split at the max wins
    b_arg = tl.min(tl.where(m_p & (b_m == b_mx[:, None]), tl.load(parg_ptr + o_p, mask=m_p, other=0), V), axis=1)
    b_logs = tl.log(b_sum)
    b_lse = b_mx + b_logs
    b_loss = (b_mx - b_yt) + b_logs
    if HAS_SMOOTHING:
        b_sy = tl.sum(tl.load(psy_ptr + o_p, mask=m_p, other=0.0), axis=1)
        b_loss = (1.0 - eps) * b_loss + eps * ((b_mx - b_sy / V) + b_logs)
    b_loss += zl * b_lse * b_lse

    o_pos = tl.load(idx_ptr + o_j, mask=m_j, other=0).to(tl.int64)
    if SOFT_K > 0:
        bad = ~slots_in_range(t_ptr, o_pos, m_j, V, SOFT_K)
    else:
        b_t = target32(tl.load(t_ptr + o_pos, mask=m_j, other=0), V)
        bad = b_t < 0
    tl.store(stat_ptr + o_j, b_mx, mask=m_j)
    tl.store(stat_ptr + N + o_j, b_logs, mask=m_j)
    tl.store(loss_ptr + o_pos, tl.where(bad, float("nan"), b_loss), mask=m_j)
    tl.store(lse_ptr + o_pos, tl.where(bad, float("nan"), b_lse), mask=m_j)
    tl.store(pred_ptr + o_pos, b_arg, mask=m_j)


# ------------------------------------------------------------------ launcher
def fused_forward(h2, weight, bias, flat_t, idx, count, *, label_smoothing=0.0, z_loss=0.0, softcap=None,
                  target_probs=None, config: FusedConfig | None = None):
    """Per-position row_loss (float32, 0 where unlabeled), lse, predicted (int32 first argmax, -1
    where unlabeled), and the per-slot statistics (2, N) float32 [row max; log sum-exp - max] the
    backward reads. Soft targets: flat_t (N, K) int and target_probs (N, K) float32, both
    contiguous (`idx` built from slot 0)."""
    N, D = h2.shape
    V = weight.shape[0]
    dev = h2.device
    cfg = config or fused_config.default_config(dev, weight.dtype)
    has_smoothing = label_smoothing > 0
    t = cfg.fwd_tiles(bias is not None, has_smoothing)
    target = target_programs(cfg, dev)
    entries, grid, block_s = partial_entries(N, V, cfg, target, t)
    dot_f32, precision = dot_options(weight.dtype)

    row_loss = torch.zeros(N, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    predicted = torch.full((N,), -1, dtype=torch.int32, device=dev)
    stat = torch.empty(2, N, dtype=torch.float32, device=dev)
    if N == 0:
        return row_loss, lse, predicted, stat
    pm = torch.empty(entries, dtype=torch.float32, device=dev)
    pse = torch.empty(entries, dtype=torch.float32, device=dev)
    yt = torch.empty(N, dtype=torch.float32, device=dev)
    psy = torch.empty(entries, dtype=torch.float32, device=dev) if has_smoothing else pm
    parg = torch.empty(entries, dtype=torch.int32, device=dev)
    b = bias if bias is not None else pm  # dummy pointer when unused
    s_hn, s_hd, s_wv, s_wd = strides(h2, weight)
    soft_k = soft_slots(flat_t, target_probs, N)

    lce_fwd_kernel[(grid,)](
        h_ptr=h2, w_ptr=weight, b_ptr=b, t_ptr=flat_t, q_ptr=target_probs if soft_k else pm, idx_ptr=idx,
        cnt_ptr=count,
        pm_ptr=pm, pse_ptr=pse, psy_ptr=psy, parg_ptr=parg, yt_ptr=yt,
        V=V, D=D, stride_hn=s_hn, stride_hd=s_hd, stride_wv=s_wv, stride_wd=s_wd,
        softcap=float(softcap) if softcap is not None else 1.0, TARGET=target,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=has_smoothing,
        BM=t.BM, BV=t.BV, BK=t.BK, GROUP=t.GROUP, S_MIN=cfg.s_min, S_MAX=cfg.s_max,
        EVEN_K=D % t.BK == 0, DOT_F32=dot_f32, PRECISION=precision, SOFT_K=soft_k,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    block_r = max(1, min(128, 2048 // block_s))
    lce_fwd_combine_kernel[(triton.cdiv(N, block_r),)](
        t_ptr=flat_t, idx_ptr=idx, cnt_ptr=count, pm_ptr=pm, pse_ptr=pse, psy_ptr=psy, parg_ptr=parg, yt_ptr=yt,
        stat_ptr=stat, loss_ptr=row_loss, lse_ptr=lse, pred_ptr=predicted,
        N=N, V=V, TARGET=target, eps=float(label_smoothing), zl=float(z_loss),
        HAS_SMOOTHING=has_smoothing, BM=t.BM, BV=t.BV, S_MIN=cfg.s_min, S_MAX=cfg.s_max,
        BLOCK_R=block_r, BLOCK_S=block_s, SOFT_K=soft_k, num_warps=4,
    )
    return row_loss, lse, predicted, stat


def soft_slots(flat_t, target_probs, N: int) -> int:
    """SOFT_K of a launch: 0 for hard targets (flat_t (N,)), else K, with flat_t and target_probs
    (N, K) contiguous (the kernels index slot k of position p at p * K + k)."""
    if target_probs is None:
        return 0
    K = flat_t.shape[-1]
    if flat_t.shape != (N, K) or target_probs.shape != (N, K) or target_probs.dtype != torch.float32 \
            or not (flat_t.is_contiguous() and target_probs.is_contiguous()):
        raise ValueError(f"soft targets: expected contiguous targets (N, K) and float32 target_probs (N, K), N = {N}, "
                         f"got {tuple(flat_t.shape)} and {tuple(target_probs.shape)} {target_probs.dtype}")
    return K

def _static_fwd(name, dtype, has_softcap, has_smoothing=True, tiles=None, has_bias=True, soft_k=0):
    """One sm_90 compile of `lce_fwd_kernel` for scripts/kernel_report.py, typed as the launcher
    specialises a real call: aligned pointers, 16-divisible V, D and row strides (':16'), unit
    inner strides (constexpr 1); the tiles fused_config.py picks for these switches; soft_k: SOFT_K."""
    key = "fp32" if dtype == "fp32" else ("half_epilogue" if has_bias or has_smoothing else "half")
    t = dict(FWD_TILES[key], **(tiles or {}))
    prec = "tf32x3" if dtype == "fp32" else "tf32"
    return {
        "name": name,
        "kernel": lce_fwd_kernel,
        "signature": {
            "h_ptr": f"*{dtype}:16", "w_ptr": f"*{dtype}:16", "b_ptr": f"*{dtype}:16", "t_ptr": "*i64:16",
            "q_ptr": "*fp32:16", "idx_ptr": "*i32:16", "cnt_ptr": "*i32:16", "pm_ptr": "*fp32:16", "pse_ptr": "*fp32:16",
            "psy_ptr": "*fp32:16", "parg_ptr": "*i32:16", "yt_ptr": "*fp32:16",
            "V": "i32:16", "D": "i32:16", "stride_hn": "i32:16", "stride_wv": "i32:16",
            "softcap": "fp32", "TARGET": "i32",
        },
        "constexprs": {
            "stride_hd": 1, "stride_wd": 1,
            "HAS_BIAS": has_bias, "HAS_SOFTCAP": has_softcap, "HAS_SMOOTHING": has_smoothing,
            "BM": t["BM"], "BV": t["BV"], "BK": t["BK"], "GROUP": t["GROUP"], "S_MIN": 16, "S_MAX": 256,
            "EVEN_K": True, "DOT_F32": False, "PRECISION": prec, "SOFT_K": soft_k,
        },
        "num_warps": t["num_warps"],
        "num_stages": t["num_stages"],
        "matmul": True,
    }


def _static_combine(name, block_s=256, soft_k=0):
    return {
        "name": name,
        "kernel": lce_fwd_combine_kernel,
        "signature": {
            "t_ptr": "*i64:16", "idx_ptr": "*i32:16", "cnt_ptr": "*i32:16", "pm_ptr": "*fp32:16",
            "pse_ptr": "*fp32:16", "psy_ptr": "*fp32:16", "parg_ptr": "*i32:16", "yt_ptr": "*fp32:16",
            "stat_ptr": "*fp32:16", "loss_ptr": "*fp32:16", "lse_ptr": "*fp32:16", "pred_ptr": "*i32:16",
            "N": "i32", "V": "i32:16", "TARGET": "i32", "eps": "fp32", "zl": "fp32",
        },
        "constexprs": {
            "HAS_SMOOTHING": True, "BM": FWD_TILES["half"]["BM"], "BV": FWD_TILES["half"]["BV"], "S_MIN": 16,
            "S_MAX": 256,
            "BLOCK_R": max(1, 2048 // block_s), "BLOCK_S": block_s, "SOFT_K": soft_k,
        },
        "num_warps": 4,
        "num_stages": 1,
        "matmul": False,
    }


# What ops/backends/fused.py launches on sm_90: each dtype, both 16-bit tile choices at their widest
# epilogue (softcap; bias and smoothing), the combine at the largest split count.
STATIC_CONFIGS = [
    _static_fwd("lce_fused_fwd/bf16", "bf16", False, has_smoothing=False, has_bias=False),
    _static_fwd("lce_fused_fwd/bf16_softcap", "bf16", True, has_smoothing=False, has_bias=False),
    _static_fwd("lce_fused_fwd/bf16_bias_smoothing_softcap", "bf16", True),
    _static_fwd("lce_fused_fwd/fp16_softcap", "fp16", True, has_smoothing=False, has_bias=False),
    _static_fwd("lce_fused_fwd/fp16_bias_smoothing_softcap", "fp16", True),
    _static_fwd("lce_fused_fwd/fp32_softcap", "fp32", True),
    _static_combine("lce_fused_fwd/combine_s256"),
] + [
    # soft targets (K = 16): the same tiles; the K target dot products run before the tile loop
    _static_fwd("lce_fused_fwd/bf16_softcap_soft16", "bf16", True, has_smoothing=False, has_bias=False, soft_k=16),
    _static_fwd("lce_fused_fwd/bf16_bias_smoothing_softcap_soft16", "bf16", True, soft_k=16),
    _static_fwd("lce_fused_fwd/fp32_softcap_soft16", "fp32", True, soft_k=16),
    _static_combine("lce_fused_fwd/combine_s256_soft16", soft_k=16),
]
