"""Fused backward of the linear cross-entropy: recompute each logit tile, form its gradient from
the saved row statistics, and accumulate dh (at the rows' original positions) and dW, in float32.

For a tile of labeled rows (slots, gathered through idx) and vocabulary entries, with the
forward's row max M and log S (lse = M + log S) and the row's gradient scale s (the caller's
dL/d row_loss; 0 for a target outside [0, V)):

    z    = h W^T (+ b),  y = softcap tanh(z / softcap) (HAS_SOFTCAP)
    G_ij = s_i [(1 + 2 zl lse_i) exp(y_ij - M_i - log S_i) - (1 - eps) [j == t_i] - eps / V] dy/dz
    dh_i += sum_j G_ij W_j,   dW_j += sum_i G_ij h_i,   db_j += sum_i G_ij

Two designs (README.md beside this file):
- atomic (default), `lce_bwd_kernel`: a program takes one (row tile, vocabulary tile), computes z
  and G once and adds both products to dh / dW with float32 atomics. 8 n D V FLOPs with the
  forward; the order of the additions varies from run to run (results differ in the last bits).
- staged (deterministic), per chunk of VC vocabulary entries: `lce_stage_g_kernel` writes G for
  every labeled row into a bounded staging buffer (N x VC in the GEMM operand dtype), then
  `lce_stage_dw_kernel` forms dW of the chunk's rows as a GEMM over the labeled rows (written once,
  in the weight's dtype) and `lce_stage_dh_kernel` adds G W_chunk to dh, each program owning its
  output tile. No atomics, every sum in a fixed order: bitwise repeatable. Also 8 n D V FLOPs; the
  bytes are G written once and read twice plus one float32 read-modify-write of dh per chunk.

Soft targets (SOFT_K = K > 0, t and q (N, K) by position): the one-hot term is
(1 - eps) sum_k q_ik [j == t_ik] (duplicate ids add), and a row with any slot outside [0, V) gets
no gradient. It is applied in the tile, per slot, only where some row of the tile has that slot's
target in the tile's columns (`_soft_onehot`): G then holds the whole gradient in both designs.

FILTER skips the products of a tile in which every row's gradient mass sum_j |G_ij| is at most
TAU |s_i| / n_vt (n_vt = vocabulary tiles): the skipped mass of a row is at most TAU |s_i| in all,
so |dh_i error| <= TAU |s_i| max|W| and |dW_j error| <= (TAU / n_vt) max|h| sum_i |s_i|.
"""

import torch
import triton
import triton.language as tl

from dvsft_kernels.ops.gemm import accum_f32
from dvsft_kernels.ops.kernels import fused_config
from dvsft_kernels.ops.kernels.common import grouped, logit_tile, softcap_tanh, target32
from dvsft_kernels.ops.kernels.fused_config import (
    BWD_TILES,
    FILTER_TAU,
    STAGE_TILES,
    FusedConfig,
    dot_options,
    strides,
)
from dvsft_kernels.ops.kernels.lce_fused_fwd import slots_in_range, soft_slots


@triton.jit
def _rows(o_j, count, idx_ptr, t_ptr, stat_ptr, s_ptr, N, V, SOFT_K: tl.constexpr):
    """Per-row inputs of a slot tile: position (int64), target (soft: unused, 0), M, log S, scale
    (0 where the slot is past count or a target is out of range), and the mask of rows that
    contribute."""
    m_j = o_j < count
    o_pos = tl.load(idx_ptr + o_j, mask=m_j, other=0).to(tl.int64)
    if SOFT_K > 0:
        b_t = tl.zeros_like(o_j)
        m_r = m_j & slots_in_range(t_ptr, o_pos, m_j, V, SOFT_K)
    else:
        b_t = target32(tl.load(t_ptr + o_pos, mask=m_j, other=0), V)
        m_r = m_j & (b_t >= 0)
    b_mx = tl.load(stat_ptr + o_j, mask=m_r, other=0.0)
    b_logs = tl.load(stat_ptr + N + o_j, mask=m_r, other=0.0)
    b_s = tl.load(s_ptr + o_pos, mask=m_r, other=0.0)
    return m_j, m_r, o_pos, b_t, b_mx, b_logs, b_s


@triton.jit
def _soft_onehot(b_g, b_c, t_ptr, q_ptr, o_pos, m_r, o_v, v_lo, V, SOFT_K: tl.constexpr, BV: tl.constexpr):
    """b_g - b_c q_k at (row, t_k) for every slot k, the tile's columns being v_lo + [0, BV).

    Why in the tile and not as a separate gather / scatter of O(K D) per row: the staged design's
    sums are deterministic because each G element is formed whole before its fixed-order GEMMs; a
    separate scatter of the one-hot term into dW and db would collide on shared target ids and need
    atomics or a sort, and under softcap it needs dy/dz at every t_k (K more dot products). Here a
    slot costs a [BM] load and compare per tile, and a [BM, BV] select only in the tiles that hold
    a target of that slot for some row of the tile (at most BM of the n_vt tiles; unused slots,
    probability 0, never): per row O(K V / BV + K BM) next to the tile's O(V D)."""
    for k in range(SOFT_K):
        o_tk = o_pos * SOFT_K + k
        b_q = tl.load(q_ptr + o_tk, mask=m_r, other=0.0)
        b_t = target32(tl.load(t_ptr + o_tk, mask=m_r, other=0), V)
        m_hit = m_r & (b_q != 0.0) & (b_t >= v_lo) & (b_t < v_lo + BV)
        if tl.max(m_hit.to(tl.int32), axis=0) > 0:
            b_t = tl.where(m_hit, b_t, -1)
            b_g = tl.where(o_v[None, :] == b_t[:, None], b_g - (b_c * b_q)[:, None], b_g)
    return b_g


@triton.jit
def _grad_tile(b_z, o_v, m_v, m_r, b_t, b_mx, b_logs, b_s, V, eps, zl, softcap, inv_cap,
               t_ptr, q_ptr, o_pos, v_lo,
               HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SOFT_K: tl.constexpr, BV: tl.constexpr):
    """G (float32 [BM, BV]) from the logit tile; exactly 0 outside valid rows and columns (a
    padded row's logits are its bias, whose exp may overflow). Soft targets (SOFT_K > 0): the
    one-hot term from t_ptr / q_ptr at the rows' positions o_pos, the tile's columns v_lo + [0, BV)."""
    if HAS_SOFTCAP:
        # keep tanh only (y = softcap t, dy/dz = 1 - t^2): one float32 tile fewer in registers than
        # ce_chunk's sech^2 form; 1 - t^2 is exact to 2^-24 absolute, all G needs
        b_th, _ = softcap_tanh(b_z, 1.0, inv_cap)
        b_y = softcap * b_th
    else:
        b_y = b_z
    b_a = b_s * (1.0 + 2.0 * zl * (b_mx + b_logs))  # [BM]
    b_g = b_a[:, None] * tl.exp((b_y - b_mx[:, None]) - b_logs[:, None])
    if HAS_SMOOTHING:
        b_g -= (b_s * (eps / V))[:, None]
    if SOFT_K > 0:
        b_g = _soft_onehot(b_g, b_s * (1.0 - eps), t_ptr, q_ptr, o_pos, m_r, o_v, v_lo, V, SOFT_K, BV)
    else:
        b_g = tl.where(o_v[None, :] == b_t[:, None], b_g - (b_s * (1.0 - eps))[:, None], b_g)
    if HAS_SOFTCAP:
        b_g *= 1.0 - b_th * b_th
    return tl.where(m_r[:, None] & m_v[None, :], b_g, 0.0)


@triton.jit
def _keep_tile(b_g, b_s, n_vt, TAU, FILTER: tl.constexpr):
    """1 unless FILTER and every row's |G| mass in this tile is <= TAU |s| / n_vt."""
    if FILTER:
        b_keep = tl.sum(tl.abs(b_g), axis=1) > TAU * tl.abs(b_s) / n_vt
        return tl.max(b_keep.to(tl.int32), axis=0)
    else:
        return 1


@triton.jit
def _gemm_operand(b_g, w_ptr, DOT_F32: tl.constexpr):
    """G in the dtype of the weight (bf16 / fp16 tensor-core operand), float32 when interpreting."""
    if DOT_F32:
        return b_g
    else:
        return b_g.to(w_ptr.dtype.element_ty)


@triton.jit
def lce_bwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, q_ptr, idx_ptr, cnt_ptr,  # t, q: as the forward's
    stat_ptr,  # [2, N] float32 by slot: M, log S (the forward combine's)
    s_ptr,  # [N] float32 gradient scale by position
    dh_ptr,  # [N, D] float32 by position, zeroed (COMPUTE_DH)
    dw_ptr,  # [V, D] float32, zeroed (COMPUTE_DW)
    db_ptr,  # [V] float32, zeroed (COMPUTE_DB)
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    eps, zl, softcap, TAU,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, FILTER: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, GROUP: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    SOFT_K: tl.constexpr,  # 0: hard targets; K > 0: t_ptr, q_ptr [N, K]
):
    pid = tl.program_id(0)
    count = tl.load(cnt_ptr)
    n_rt = tl.cdiv(count, BM)
    n_vt = tl.cdiv(V, BV)
    # the grid is sized for the static N: tiles past the labeled count have nothing to add
    if pid >= n_rt * n_vt:
        return
    i_r, i_v = grouped(pid, n_rt, n_vt, GROUP)
    o_j = i_r * BM + tl.arange(0, BM)
    m_j, m_r, o_pos, b_t, b_mx, b_logs, b_s = _rows(o_j, count, idx_ptr, t_ptr, stat_ptr, s_ptr, N, V, SOFT_K)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_z = logit_tile(h_ptr, w_ptr, b_ptr, o_pos, m_j, o_v, m_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
                      HAS_BIAS, BM, BV, BK, EVEN_K, DOT_F32, PRECISION)
    b_g = _grad_tile(b_z, o_v, m_v, m_r, b_t, b_mx, b_logs, b_s, V, eps, zl, softcap, 1.0 / softcap,
                     t_ptr, q_ptr, o_pos, i_v * BV, HAS_SOFTCAP, HAS_SMOOTHING, SOFT_K, BV)  # [BM, BV]
    if _keep_tile(b_g, b_s, n_vt, TAU, FILTER) > 0:
        if COMPUTE_DB:
            tl.atomic_add(db_ptr + o_v, tl.sum(b_g, axis=0), mask=m_v, sem="relaxed")
        b_gl = _gemm_operand(b_g, w_ptr, DOT_F32)
        o_b = tl.arange(0, BD)
        # two sweeps over D, so that one float32 product tile is live at a time
        if COMPUTE_DH:
            for d0 in range(0, D, BD):
                o_d = d0 + o_b
                if EVEN_D:
                    m_d = o_b < BD
                else:
                    m_d = o_d < D
                b_w = tl.load(w_ptr + o_v[:, None].to(tl.int64) * stride_wv + o_d[None, :] * stride_wd,
                              mask=m_v[:, None] & m_d[None, :], other=0.0)  # [BV, BD]
                if DOT_F32:
                    b_w = b_w.to(tl.float32)
                b_dh = tl.dot(b_gl, b_w, input_precision=PRECISION)  # [BM, BD]
                tl.atomic_add(dh_ptr + o_pos[:, None] * D + o_d[None, :], b_dh,
                              mask=m_j[:, None] & m_d[None, :], sem="relaxed")
        if COMPUTE_DW:
            b_gt = tl.trans(b_gl)  # [BV, BM]
            for d0 in range(0, D, BD):
                o_d = d0 + o_b
                if EVEN_D:
                    m_d = o_b < BD
                else:
                    m_d = o_d < D
                b_h = tl.load(h_ptr + o_pos[:, None] * stride_hn + o_d[None, :] * stride_hd,
                              mask=m_j[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
                if DOT_F32:
                    b_h = b_h.to(tl.float32)
                b_dw = tl.dot(b_gt, b_h, input_precision=PRECISION)  # [BV, BD]
                tl.atomic_add(dw_ptr + o_v[:, None].to(tl.int64) * D + o_d[None, :], b_dw,
                              mask=m_v[:, None] & m_d[None, :], sem="relaxed")


# ------------------------------------------------------------------ staged (deterministic) backward
@triton.jit
def lce_stage_g_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, q_ptr, idx_ptr, cnt_ptr, stat_ptr, s_ptr,
    g_ptr,  # [N, VC] staging buffer in the GEMM operand dtype: G of vocabulary v0 + [0, VC) by slot
    # (BY_POSITION: by position, rows of unlabeled positions left as they are, zero)
    pdb_ptr,  # [N / BM, VC] float32 column sums of G per row tile (COMPUTE_DB)
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    eps, zl, softcap, TAU,
    v0,  # first vocabulary entry of the chunk, a multiple of BV
    VC,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    COMPUTE_DB: tl.constexpr, FILTER: tl.constexpr, BY_POSITION: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    SOFT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    count = tl.load(cnt_ptr)
    n_rt = tl.cdiv(count, BM)
    n_ct = tl.cdiv(tl.minimum(VC, V - v0), BV)
    if pid >= n_rt * n_ct:
        return
    i_r, i_c = grouped(pid, n_rt, n_ct, GROUP)
    o_j = i_r * BM + tl.arange(0, BM)
    m_j, m_r, o_pos, b_t, b_mx, b_logs, b_s = _rows(o_j, count, idx_ptr, t_ptr, stat_ptr, s_ptr, N, V, SOFT_K)
    o_c = i_c * BV + tl.arange(0, BV)  # column in the chunk
    o_v = v0 + o_c
    m_v = o_v < V
    b_z = logit_tile(h_ptr, w_ptr, b_ptr, o_pos, m_j, o_v, m_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
                      HAS_BIAS, BM, BV, BK, EVEN_K, DOT_F32, PRECISION)
    b_g = _grad_tile(b_z, o_v, m_v, m_r, b_t, b_mx, b_logs, b_s, V, eps, zl, softcap, 1.0 / softcap,
                     t_ptr, q_ptr, o_pos, v0 + i_c * BV, HAS_SOFTCAP, HAS_SMOOTHING, SOFT_K, BV)  # [BM, BV], 0 past V
    if FILTER:  # chunks start on tile boundaries: the atomic kernel's tiles and criterion
        b_g = b_g * _keep_tile(b_g, b_s, tl.cdiv(V, BV), TAU, FILTER).to(tl.float32)
    if COMPUTE_DB:  # from float32 G, as the atomic kernel adds it
        tl.store(pdb_ptr + i_r.to(tl.int64) * VC + o_c, tl.sum(b_g, axis=0))
    if BY_POSITION:
        o_row = o_pos
    else:
        o_row = o_j.to(tl.int64)
    tl.store(g_ptr + o_row[:, None] * VC + o_c[None, :], b_g.to(g_ptr.dtype.element_ty), mask=m_j[:, None])


@triton.jit
def lce_stage_dw_kernel(
    h_ptr, idx_ptr, cnt_ptr, g_ptr, pdb_ptr,
    dw_ptr,  # [V, D] in the weight's dtype: rows v0 + [0, VC) written here, once
    db_ptr,  # [V] in the bias's dtype (COMPUTE_DB)
    v0, V, D, VC,
    stride_hn, stride_hd,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    GATHER: tl.constexpr,  # h rows by position through idx; False: h_ptr holds them by slot
    BV: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, BM_G: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dW[v0 + c] = sum over slots k < count of G[k, c] h[idx[k]]: a GEMM whose K runs over the
    labeled rows, a fixed order. Grid: chunk vocabulary tiles x D tiles (1 D tile for db only)."""
    pid = tl.program_id(0)
    count = tl.load(cnt_ptr)
    vc = tl.minimum(VC, V - v0)
    n_ct = tl.cdiv(vc, BV)
    if COMPUTE_DW:
        n_dt = tl.cdiv(D, BD)
    else:
        n_dt = 1
    i_c, i_d = grouped(pid, n_ct, n_dt, GROUP)
    o_c = i_c * BV + tl.arange(0, BV)
    m_c = o_c < vc
    if COMPUTE_DW:
        o_d = i_d * BD + tl.arange(0, BD)
        m_d = o_d < D
        o_kb = tl.arange(0, BK)
        b_acc = tl.zeros([BV, BD], dtype=tl.float32)
        for k0 in range(0, count, BK):
            o_k = k0 + o_kb
            m_k = o_k < count  # staged rows past count were never written
            if GATHER:
                o_pos = tl.load(idx_ptr + o_k, mask=m_k, other=0).to(tl.int64)
            else:
                o_pos = o_k.to(tl.int64)
            b_g = tl.load(g_ptr + o_k[:, None].to(tl.int64) * VC + o_c[None, :], mask=m_k[:, None], other=0.0)
            b_h = tl.load(h_ptr + o_pos[:, None] * stride_hn + o_d[None, :] * stride_hd,
                          mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BK, BD]
            if DOT_F32:
                b_g = b_g.to(tl.float32)
                b_h = b_h.to(tl.float32)
            b_acc = tl.dot(tl.trans(b_g), b_h, b_acc, input_precision=PRECISION)  # [BV, BD]
        tl.store(dw_ptr + (v0 + o_c)[:, None].to(tl.int64) * D + o_d[None, :],
                 b_acc.to(dw_ptr.dtype.element_ty), mask=m_c[:, None] & m_d[None, :])
    if COMPUTE_DB:  # noqa: SIM102 - a constexpr branch around a runtime one
        if i_d == 0:
            b_db = tl.zeros([BV], dtype=tl.float32)
            for r in range(tl.cdiv(count, BM_G)):
                b_db += tl.load(pdb_ptr + r * VC + o_c, mask=m_c, other=0.0)
            tl.store(db_ptr + v0 + o_c, b_db.to(db_ptr.dtype.element_ty), mask=m_c)


@triton.jit
def lce_stage_dh_kernel(
    w_ptr, idx_ptr, cnt_ptr, g_ptr,
    dh_ptr,  # [N, D] float32 by position: += this chunk's G W
    v0, V, D, VC,
    stride_wv, stride_wd,
    BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dh[idx[j]] += sum over the chunk's columns c of G[j, c] W[v0 + c]. A program owns a
    (row tile, D tile) of dh, so its read-modify-write after the K loop races with nothing; chunks
    are separate launches in stream order."""
    pid = tl.program_id(0)
    count = tl.load(cnt_ptr)
    n_rt = tl.cdiv(count, BM)
    n_dt = tl.cdiv(D, BD)
    if pid >= n_rt * n_dt:
        return
    i_r, i_d = grouped(pid, n_rt, n_dt, GROUP)
    o_j = i_r * BM + tl.arange(0, BM)
    m_j = o_j < count
    o_pos = tl.load(idx_ptr + o_j, mask=m_j, other=0).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    vc = tl.minimum(VC, V - v0)
    o_kb = tl.arange(0, BK)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    o_grow = o_j.to(tl.int64) * VC
    for k0 in range(0, vc, BK):
        o_k = k0 + o_kb
        m_k = o_k < vc
        # no column mask: G is written (0 past V) up to vc rounded up to the G kernel's BV, a
        # multiple of BK; a mask along the contiguous axis would stop the async-copy pipelining
        b_g = tl.load(g_ptr + o_grow[:, None] + o_k[None, :], mask=m_j[:, None], other=0.0)  # [BM, BK]
        b_w = tl.load(w_ptr + (v0 + o_k)[:, None].to(tl.int64) * stride_wv + o_d[None, :] * stride_wd,
                      mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BK, BD]
        if DOT_F32:
            b_g = b_g.to(tl.float32)
            b_w = b_w.to(tl.float32)
        b_acc = tl.dot(b_g, b_w, b_acc, input_precision=PRECISION)
    p_dh = dh_ptr + o_pos[:, None] * D + o_d[None, :]
    m = m_j[:, None] & m_d[None, :]
    tl.store(p_dh, tl.load(p_dh, mask=m, other=0.0) + b_acc, mask=m)


# ------------------------------------------------------------------ launchers
def fused_backward(h2, weight, bias, flat_t, idx, count, stat, scale, *, label_smoothing=0.0, z_loss=0.0,
                   softcap=None, grad_h=True, grad_w=True, grad_b=False, deterministic=False, grad_filter=False,
                   target_probs=None, config: FusedConfig | None = None):
    """dh (N, D) float32 by position (zero where unlabeled), dW (V, D), db (V,) (None where not
    requested) for the row gradient scales `scale` (N,) float32 by position. dW and db are float32
    from the atomic backward, in the weight's / bias's dtype from the staged one. Soft targets:
    flat_t and target_probs (N, K), as `lce_fused_fwd.fused_forward` takes them."""
    N, D = h2.shape
    V = weight.shape[0]
    dev = h2.device
    cfg = config or fused_config.default_config(dev, weight.dtype)
    dot_f32, precision = dot_options(weight.dtype)
    staged = cfg.backward_design(deterministic) == "staged"
    dh = torch.zeros(N, D, dtype=torch.float32, device=dev) if grad_h else None

    def zero_dw_db():
        return (torch.zeros(V, D, dtype=torch.float32, device=dev) if grad_w else None,
                torch.zeros(V, dtype=torch.float32, device=dev) if grad_b else None)

    if N == 0 or not (grad_h or grad_w or grad_b):
        return (dh, *zero_dw_db())
    dummy = stat
    s_hn, s_hd, s_wv, s_wd = strides(h2, weight)
    # arguments every backward kernel reads
    soft_k = soft_slots(flat_t, target_probs, N)
    rows = {"h_ptr": h2, "w_ptr": weight, "b_ptr": bias if bias is not None else dummy, "t_ptr": flat_t,
            "q_ptr": target_probs if soft_k else dummy, "SOFT_K": soft_k,
            "idx_ptr": idx, "cnt_ptr": count, "stat_ptr": stat, "s_ptr": scale.float().contiguous(),
            "N": N, "V": V, "D": D, "stride_hn": s_hn, "stride_hd": s_hd, "stride_wv": s_wv, "stride_wd": s_wd,
            "eps": float(label_smoothing), "zl": float(z_loss),
            "softcap": float(softcap) if softcap is not None else 1.0, "TAU": FILTER_TAU[weight.dtype],
            "HAS_BIAS": bias is not None, "HAS_SOFTCAP": softcap is not None, "HAS_SMOOTHING": label_smoothing > 0,
            "FILTER": bool(grad_filter), "DOT_F32": dot_f32, "PRECISION": precision}

    if staged:  # writes dW / db whole, in the operand dtypes
        return _staged_backward(rows, cfg, dh, grad_w, grad_b)
    dW, db = zero_dw_db()
    t = cfg.bwd
    lce_bwd_kernel[(triton.cdiv(N, t.BM) * triton.cdiv(V, t.BV),)](  # grid for the static bound N
        **rows, dh_ptr=dh if grad_h else dummy, dw_ptr=dW if grad_w else dummy, db_ptr=db if grad_b else dummy,
        COMPUTE_DH=grad_h, COMPUTE_DW=grad_w, COMPUTE_DB=grad_b, GROUP=t.GROUP,
        BM=t.BM, BV=t.BV, BK=t.BK, BD=t.BD, EVEN_K=D % t.BK == 0, EVEN_D=D % t.BD == 0,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return dh, dW, db


def _staged_backward(rows, cfg: FusedConfig, dh, grad_w, grad_b):
    """The deterministic design (README.md beside this file): per chunk of VC vocabulary entries, G
    of every labeled row into a bounded buffer, then dW of the chunk's rows and dh += G W_chunk as
    GEMMs without atomics (Triton, or torch.mm over all N positions with stage_gemm="torch"). The
    chunk loop is static (V, N), so a CUDA graph captures it."""
    h2, weight, idx, count, dummy = rows["h_ptr"], rows["w_ptr"], rows["idx_ptr"], rows["cnt_ptr"], rows["stat_ptr"]
    bias = rows["b_ptr"]  # the dummy when there is none
    N, V, D = rows["N"], rows["V"], rows["D"]
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
    dot = {"DOT_F32": rows["DOT_F32"], "PRECISION": rows["PRECISION"]}
    n_rt_g, n_rt_s = triton.cdiv(N, tg.BM), triton.cdiv(N, ts.BM)
    n_dt = triton.cdiv(D, ts.BD)
    # slots past count gather row 0: a static-size copy, no host sync; the kernel never reads them
    hs = h2.index_select(0, idx) if cfg.stage_compact_h and grad_w and not by_pos else h2
    triton_dw = grad_w and not by_pos
    for v0 in range(0, V, VC):
        vc = min(VC, V - v0)
        lce_stage_g_kernel[(n_rt_g * triton.cdiv(vc, tg.BV),)](
            **rows, g_ptr=g, pdb_ptr=pdb, v0=v0, VC=VC, COMPUTE_DB=grad_b, BY_POSITION=by_pos,
            BM=tg.BM, BV=tg.BV, BK=tg.BK, GROUP=tg.GROUP, EVEN_K=D % tg.BK == 0,
            num_warps=tg.num_warps, num_stages=tg.num_stages,
        )
        if triton_dw or grad_b:
            lce_stage_dw_kernel[(triton.cdiv(vc, ts.BV) * (n_dt if triton_dw else 1),)](
                h_ptr=hs, idx_ptr=idx, cnt_ptr=count, g_ptr=g, pdb_ptr=pdb, dw_ptr=dW if triton_dw else dummy,
                db_ptr=db if grad_b else dummy, v0=v0, V=V, D=D, VC=VC, stride_hn=hs.stride(0),
                stride_hd=hs.stride(1), COMPUTE_DW=triton_dw, COMPUTE_DB=grad_b,
                GATHER=hs is h2, BV=ts.BV, BD=ts.BD, BK=ts.BK, GROUP=ts.GROUP, BM_G=tg.BM, **dot,
                num_warps=ts.num_warps, num_stages=ts.num_stages,
            )
        if grad_w and by_pos:  # float32 accumulation inside the GEMM, written in the weight's dtype
            torch.mm(g[:, :vc].t(), h2, out=dW[v0:v0 + vc])
        if dh is not None and by_pos:
            accum_f32(dh, g[:, :vc], weight[v0:v0 + vc])
        elif dh is not None:
            lce_stage_dh_kernel[(n_rt_s * n_dt,)](
                w_ptr=weight, idx_ptr=idx, cnt_ptr=count, g_ptr=g, dh_ptr=dh, v0=v0, V=V, D=D, VC=VC,
                stride_wv=weight.stride(0), stride_wd=weight.stride(1),
                BM=ts.BM, BD=ts.BD, BK=ts.BK, GROUP=ts.GROUP, **dot,
                num_warps=ts.num_warps, num_stages=ts.num_stages,
            )
    return dh, dW, db

_PTR_SIG = {
    "t_ptr": "*i64:16", "q_ptr": "*fp32:16", "idx_ptr": "*i32:16", "cnt_ptr": "*i32:16", "stat_ptr": "*fp32:16",
    "s_ptr": "*fp32:16",
    "N": "i32:16", "V": "i32:16", "D": "i32:16", "stride_hn": "i32:16", "stride_wv": "i32:16",
    "eps": "fp32", "zl": "fp32", "softcap": "fp32", "TAU": "fp32", "v0": "i32", "VC": "i32:16",
    "pdb_ptr": "*fp32:16",
}


def _static_bwd(name, kernel, tiles, dtype, has_softcap, flt=False, **switches):
    """One sm_90 compile of a backward kernel for scripts/kernel_report.py, typed as the launcher
    specialises a real call (see lce_fused_fwd._static_fwd). The staged kernels write G, dW and db
    in the operand dtype; every other output is float32."""
    t = dict(tiles)
    names = kernel.arg_names
    sig = dict(_PTR_SIG, h_ptr=f"*{dtype}:16", w_ptr=f"*{dtype}:16", b_ptr=f"*{dtype}:16", dh_ptr="*fp32:16")
    staged = "g_ptr" in names
    for out in ("g_ptr", "dw_ptr", "db_ptr"):
        sig[out] = f"*{dtype}:16" if staged else "*fp32:16"
    constexprs = {
        "stride_hd": 1, "stride_wd": 1,
        "HAS_BIAS": True, "HAS_SOFTCAP": has_softcap, "HAS_SMOOTHING": True, "FILTER": flt,
        "EVEN_K": True, "EVEN_D": True, "DOT_F32": False, "PRECISION": "tf32x3" if dtype == "fp32" else "tf32",
        "SOFT_K": 0,
        **{k: t[k] for k in ("BM", "BV", "BK", "BD", "GROUP")},
        **switches,
    }
    return {"name": name, "kernel": kernel,
            "signature": {k: v for k, v in sig.items() if k in names},
            "constexprs": {k: v for k, v in constexprs.items() if k in names},
            "num_warps": t["num_warps"], "num_stages": t["num_stages"], "matmul": True}


_ALL = {"COMPUTE_DH": True, "COMPUTE_DW": True, "COMPUTE_DB": True}
_DW_DB = {"COMPUTE_DW": True, "COMPUTE_DB": True}
_H, _F = "half", "fp32"
# What ops/backends/fused.py launches on sm_90: per dtype, the atomic kernel with softcap (the heaviest
# epilogue), without it and with filtering; the staged kernels (G at its widest epilogue, both GEMMs).
STATIC_CONFIGS = [
    _static_bwd("lce_fused_bwd/atomic_bf16", lce_bwd_kernel, BWD_TILES[_H], "bf16", False, **_ALL),
    _static_bwd("lce_fused_bwd/atomic_bf16_softcap", lce_bwd_kernel, BWD_TILES[_H], "bf16", True, **_ALL),
    _static_bwd("lce_fused_bwd/atomic_bf16_softcap_filter", lce_bwd_kernel, BWD_TILES[_H], "bf16", True, True,
                **_ALL),
    _static_bwd("lce_fused_bwd/atomic_fp16_softcap", lce_bwd_kernel, BWD_TILES[_H], "fp16", True, **_ALL),
    _static_bwd("lce_fused_bwd/atomic_fp32_softcap", lce_bwd_kernel, BWD_TILES[_F], "fp32", True, **_ALL),
] + [
    cfg
    for w, dt in ((_H, "bf16"), (_H, "fp16"), (_F, "fp32"))
    for cfg in (
        _static_bwd(f"lce_fused_bwd/stage_g_{dt}_softcap_filter", lce_stage_g_kernel, BWD_TILES[w], dt, True, True,
                    COMPUTE_DB=True, BY_POSITION=False),
        _static_bwd(f"lce_fused_bwd/stage_dw_{dt}", lce_stage_dw_kernel, STAGE_TILES[w], dt, False,
                    BM_G=BWD_TILES[w]["BM"], GATHER=True, **_DW_DB),
        _static_bwd(f"lce_fused_bwd/stage_dh_{dt}", lce_stage_dh_kernel, STAGE_TILES[w], dt, False),
    )
] + [
    # the dW kernel over a slot-ordered copy of the labeled rows (FusedConfig.stage_compact_h)
    _static_bwd("lce_fused_bwd/stage_dw_bf16_compact", lce_stage_dw_kernel, STAGE_TILES[_H], "bf16", False,
                BM_G=BWD_TILES[_H]["BM"], GATHER=False, **_DW_DB),
    # G by position for torch.mm gradient GEMMs (FusedConfig.stage_gemm="torch")
    _static_bwd("lce_fused_bwd/stage_g_bf16_by_position", lce_stage_g_kernel, BWD_TILES[_H], "bf16", True,
                COMPUTE_DB=False, BY_POSITION=True),
] + [
    # soft targets (K = 16): the kernels that form G, at their widest epilogues
    _static_bwd("lce_fused_bwd/atomic_bf16_soft16", lce_bwd_kernel, BWD_TILES[_H], "bf16", False, SOFT_K=16, **_ALL),
    _static_bwd("lce_fused_bwd/atomic_bf16_softcap_filter_soft16", lce_bwd_kernel, BWD_TILES[_H], "bf16", True, True,
                SOFT_K=16, **_ALL),
    _static_bwd("lce_fused_bwd/atomic_fp32_softcap_soft16", lce_bwd_kernel, BWD_TILES[_F], "fp32", True, SOFT_K=16,
                **_ALL),
    _static_bwd("lce_fused_bwd/stage_g_bf16_softcap_filter_soft16", lce_stage_g_kernel, BWD_TILES[_H], "bf16", True,
                True, COMPUTE_DB=True, BY_POSITION=False, SOFT_K=16),
    _static_bwd("lce_fused_bwd/stage_g_fp32_softcap_filter_soft16", lce_stage_g_kernel, BWD_TILES[_F], "fp32", True,
                True, COMPUTE_DB=True, BY_POSITION=False, SOFT_K=16),
    _static_bwd("lce_fused_bwd/stage_g_bf16_by_position_soft16", lce_stage_g_kernel, BWD_TILES[_H], "bf16", True,
                COMPUTE_DB=False, BY_POSITION=True, SOFT_K=16),
]
