"""Triton helpers shared by the kernel files: the softcap transform, target clamping, grouped
program order and the logit tile of the fused kernels."""

import triton
import triton.language as tl

# Below this |u| tanh(u) comes from its odd Taylor polynomial (degree 9, <= 1.3 ulp): the
# exp form (1 - e) / (1 + e) cancels there (~60 ulps at u = 0.01). Above it the exp form is
# <= ~4 ulps and never overflows, since e = exp(-2|u|) lies in [0, 1].
TANH_POLY_MAX = tl.constexpr(0.3)
MINUS_2_LOG2E = tl.constexpr(-2.8853900817779268)  # -2 / ln 2: exp(-2a) = exp2(a * this)


@triton.jit
def softcap_tanh(x, softcap, inv_cap):
    """y = softcap * tanh(u) and dy/dx = 1 - tanh(u)^2, u = x / softcap, from exp2 only (libdevice
    is unavailable in the interpreter). sech^2 = 4 e / (1 + e)^2 keeps its relative accuracy
    where tanh^2 rounds to 1."""
    u = x * inv_cap  # one multiply per element instead of a division
    a = tl.abs(u)
    e = tl.exp2(a * MINUS_2_LOG2E)  # exp(-2 |u|) in [0, 1]
    r = 1.0 / (1.0 + e)
    u2 = u * u
    poly = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))))
    t_exp = (1.0 - e) * r
    t = tl.where(a < TANH_POLY_MAX, poly, tl.where(u < 0, -t_exp, t_exp))
    return softcap * t, 4.0 * e * r * r


@triton.jit
def target32(b_t, V):
    """Targets as int32 (tile compares stay 32-bit), -1 for any value outside [0, V)."""
    return tl.where((b_t >= 0) & (b_t < V), b_t, -1).to(tl.int32)


@triton.jit
def grouped(pid, n_a, n_b, GROUP: tl.constexpr):
    """pid -> (a, b) over an n_a x n_b grid, GROUP consecutive a per group and a fastest inside a
    group: programs that run together share GROUP row tiles (a) and read n_programs / GROUP
    different vocabulary tiles (b)."""
    per_group = GROUP * n_b
    g = pid // per_group
    a0 = g * GROUP
    rows = tl.minimum(n_a - a0, GROUP)
    r = pid % per_group
    return a0 + r % rows, r // rows


@triton.jit
def logit_tile(h_ptr, w_ptr, b_ptr, o_pos, m_rows, o_v, m_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
                HAS_BIAS: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """z = h[o_pos] W[o_v]^T (+ b[o_v]) as a float32 [BM, BV] tile. o_pos: int64 indices of the
    gathered hidden rows (masked rows read 0); masked vocabulary entries read 0."""
    # pointers rebuilt from per-row / per-column bases at every step: loop-carried [BM, BK] and
    # [BK, BV] pointer tensors would hold 64-bit addresses in registers for the whole loop
    o_k = tl.arange(0, BK)
    o_hrow = o_pos * stride_hn  # [BM] int64
    o_wcol = o_v.to(tl.int64) * stride_wv  # [BV] int64
    b_z = tl.zeros([BM, BV], dtype=tl.float32)
    for k0 in range(0, D, BK):
        o_kk = k0 + o_k
        p_h = h_ptr + o_hrow[:, None] + o_kk[None, :] * stride_hd  # [BM, BK]
        p_w = w_ptr + o_wcol[None, :] + o_kk[:, None] * stride_wd  # [BK, BV] = W^T tile
        if EVEN_K:
            b_h = tl.load(p_h, mask=m_rows[:, None], other=0.0)
            b_w = tl.load(p_w, mask=m_v[None, :], other=0.0)
        else:
            m_k = o_kk < D
            b_h = tl.load(p_h, mask=m_rows[:, None] & m_k[None, :], other=0.0)
            b_w = tl.load(p_w, mask=m_v[None, :] & m_k[:, None], other=0.0)
        if DOT_F32:  # interpreter: tl.dot on bf16 operands returns garbage there
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        b_z = tl.dot(b_h, b_w, b_z, input_precision=PRECISION)
    if HAS_BIAS:
        b_z += tl.load(b_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return b_z
