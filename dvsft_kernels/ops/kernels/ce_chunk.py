"""Cross-entropy over one chunk of precomputed float32 logits, with its logit gradient.

Row i of x holds the raw logits of one labeled position (x = h W^T + b, written by a GEMM); t is
its target. All math is float32:

    y    = softcap * tanh(x / softcap)            (HAS_SOFTCAP)    else y = x
    lse  = logsumexp_j y_j
    loss = (1 - eps) (lse - y_t) + eps (lse - mean_j y_j) + zl lse^2
    G_ij = s_i [p_ij (1 + 2 zl lse) - (1 - eps) [j == t] - eps / V] (1 - tanh^2(x_ij / softcap))
    correct_i = argmax_j y_j == t_i                (first index on ties, as torch.argmax)

with p = softmax(y) and s_i the row scale (the loss is not scaled). One program per row sweeps
the vocabulary twice in tiles of BLOCK_V: sweep 1 keeps, per thread, an online max / sum-exp, the
first argmax and the sum of y; sweep 2 (COMPUTE_GRAD) re-reads x and writes G, in place over x or
into a separate buffer in the gradient GEMMs' dtype (the store casts to g_ptr's element type).
Per element: 4 B read (forward only), or 8 B read + 2 B (bf16 G) / 4 B (in-place G) written;
n = 16384, V = 151936 on an H100: ~8.3 ms at 3 TB/s with a bf16 G. Derivation, block and warp
choice, instruction counts: README.md beside this file.
"""

import triton
import triton.language as tl

# Below this |u| tanh(u) comes from its odd Taylor polynomial (degree 9, <= 1.3 ulp): the
# exp form (1 - e) / (1 + e) cancels there (~60 ulps at u = 0.01). Above it the exp form is
# <= ~4 ulps and never overflows, since e = exp(-2|u|) lies in [0, 1].
TANH_POLY_MAX = tl.constexpr(0.3)
MINUS_2_LOG2E = tl.constexpr(-2.8853900817779268)  # -2 / ln 2: exp(-2a) = exp2(a * this)


@triton.jit
def _softcap(x, softcap, inv_cap):
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
def _ce_chunk_kernel(
    x_ptr,  # [M, V] float32 logits, unit stride along V
    t_ptr,  # [M] int32/int64 targets, all in [0, V)
    s_ptr,  # [M] float32 row scales (read only if HAS_SCALE)
    g_ptr,  # [M, V] gradient output (x_ptr itself when in place); float32 / bf16 / fp16
    loss_ptr,  # [M] float32
    lse_ptr,  # [M] float32
    correct_ptr,  # [M] int8 (0/1)
    V,
    stride_xm,
    stride_gm,
    eps,  # label smoothing
    zl,  # z-loss coefficient
    softcap,  # > 0; ignored (pass 1.0) unless HAS_SOFTCAP
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,  # power of two, >= 4 * LANES
    LANES: tl.constexpr,  # threads sharing a tile in sweep 1: 32 * num_warps, or fewer for tiny V
):
    i_m = tl.program_id(0).to(tl.int64)
    p_x = x_ptr + i_m * stride_xm
    i_t = tl.load(t_ptr + i_m).to(tl.int32)
    inv_cap = 1.0 / softcap

    # Sweep 1 views a tile as [R, LANES, 4]: lane l owns j = v0 + (r * LANES + l) * 4 + c, i.e.
    # R 16-byte vectors, and keeps its own running max m, sum-exp (rescaled when m grows), sum of
    # y and first argmax. Reductions over axes 2 and 0 stay inside a thread, so the loop has no
    # barrier and each warp streams at its own pace; lanes meet once, after the loop.
    o_r = tl.arange(0, BLOCK_V // (4 * LANES))
    o_l = tl.arange(0, LANES)
    o_c = tl.arange(0, 4)
    o_3 = (o_r[:, None, None] * LANES + o_l[None, :, None]) * 4 + o_c[None, None, :]  # [R, L, 4]
    b_m = tl.full([LANES], float("-inf"), dtype=tl.float32)  # [L]
    b_se = tl.zeros([LANES], dtype=tl.float32)  # [L]
    b_sy = tl.zeros([LANES], dtype=tl.float32)  # [L]
    b_arg = tl.zeros([LANES], dtype=tl.int32)  # [L]
    for v0 in range(0, V, BLOCK_V):
        o_j = v0 + o_3
        m_j = o_j < V
        b_x = tl.load(p_x + o_j, mask=m_j, other=0.0)  # [R, L, 4]
        if HAS_SOFTCAP:
            b_y, _ = _softcap(b_x, softcap, inv_cap)
        else:
            b_y = b_x
        b_y = tl.where(m_j, b_y, float("-inf"))
        b_tm = tl.max(tl.max(b_y, axis=2), axis=0)  # [L]
        # first index of the tile max; a lane's indices grow from tile to tile, so a strict ">"
        # keeps its first maximum
        b_ta = tl.min(tl.min(tl.where(b_y == b_tm[None, :, None], o_j, V), axis=2), axis=0)
        b_arg = tl.where(b_tm > b_m, b_ta, b_arg)
        b_m_new = tl.maximum(b_m, b_tm)
        b_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # lanes that saw only padding
        b_p = tl.exp(b_y - b_ref[None, :, None])
        b_se = b_se * tl.exp(b_m - b_ref) + tl.sum(tl.sum(b_p, axis=2), axis=0)
        b_m = b_m_new
        if HAS_SMOOTHING:
            b_sy += tl.sum(tl.sum(tl.where(m_j, b_y, 0.0), axis=2), axis=0)

    # Everything below works from the row max M and S = sum_j exp(y_j - M), lse = M + log S:
    # y - M is exact near the max, so the loss and p stay accurate when |y| is large, where lse
    # itself is rounded to ulp(|lse|).
    b_mx = tl.max(b_m, axis=0)
    b_sum = tl.sum(b_se * tl.exp(b_m - b_mx), axis=0)
    b_logs = tl.log(b_sum)
    b_lse = b_mx + b_logs
    b_argmax = tl.min(tl.where(b_m == b_mx, b_arg, V), axis=0)
    # y_t from the same formula on the same x, so it equals the y_t seen by the sweep.
    b_xt = tl.load(p_x + i_t)
    if HAS_SOFTCAP:
        b_yt, _ = _softcap(b_xt, softcap, inv_cap)
    else:
        b_yt = b_xt
    b_loss = (b_mx - b_yt) + b_logs
    if HAS_SMOOTHING:
        b_loss = (1.0 - eps) * b_loss + eps * ((b_mx - tl.sum(b_sy, axis=0) / V) + b_logs)
    b_loss += zl * b_lse * b_lse
    tl.store(loss_ptr + i_m, b_loss)
    tl.store(lse_ptr + i_m, b_lse)
    tl.store(correct_ptr + i_m, (b_argmax == i_t).to(tl.int8))

    if COMPUTE_GRAD:
        # G = a exp(y - M) - c - d [j == t] (times sech^2 under softcap): the row scale, 1 / S,
        # the z-loss factor and the smoothing terms fold into three scalars.
        if HAS_SCALE:
            b_s = tl.load(s_ptr + i_m)
        else:
            b_s = 1.0
        b_a = b_s * (1.0 + 2.0 * zl * b_lse) / b_sum
        b_c = b_s * eps / V
        b_d = b_s * (1.0 - eps)
        p_g = g_ptr + i_m * stride_gm
        o_v = tl.arange(0, BLOCK_V)
        for v0 in range(0, V, BLOCK_V):
            o_j = v0 + o_v
            m_j = o_j < V
            b_x = tl.load(p_x + o_j, mask=m_j, other=0.0)  # [BV]
            if HAS_SOFTCAP:
                b_y, b_sech2 = _softcap(b_x, softcap, inv_cap)
            else:
                b_y = b_x
            b_g = b_a * tl.exp(b_y - b_mx) - b_c
            b_g = tl.where(o_j == i_t, b_g - b_d, b_g)
            if HAS_SOFTCAP:
                b_g = b_g * b_sech2
            tl.store(p_g + o_j, b_g.to(g_ptr.dtype.element_ty), mask=m_j)


def _static_config(name, grad_dtype, has_softcap, block_v, num_warps, compute_grad=True):
    """One sm_90 compile of `_ce_chunk_kernel` for scripts/kernel_report.py. Types follow the
    triton.tools.compile convention: ':16' marks an argument the launcher would specialise as
    16-divisible (aligned pointers, strides and V of real vocabularies); integers below 2^31
    are passed as i32, as the launcher does."""
    return {
        "name": name,
        "kernel": _ce_chunk_kernel,
        "signature": {
            "x_ptr": "*fp32:16", "t_ptr": "*i64:16", "s_ptr": "*fp32:16", "g_ptr": f"*{grad_dtype}:16",
            "loss_ptr": "*fp32:16", "lse_ptr": "*fp32:16", "correct_ptr": "*i8:16",
            "V": "i32:16", "stride_xm": "i32:16", "stride_gm": "i32:16",
            "eps": "fp32", "zl": "fp32", "softcap": "fp32",
        },
        "constexprs": {
            "HAS_SOFTCAP": has_softcap, "HAS_SMOOTHING": True, "HAS_SCALE": True,
            "COMPUTE_GRAD": compute_grad, "BLOCK_V": block_v, "LANES": 32 * num_warps,
        },
        "num_warps": num_warps,
        "num_stages": 1,
        "matmul": False,
    }


# What launch.ce_chunk compiles for real vocabularies (BLOCK_V 2048, 8 warps) with each switch
# that changes register pressure, plus the 1024-wide tile of mid-size vocabularies.
STATIC_CONFIGS = [
    _static_config("ce_chunk/bf16_grad", "bf16", False, 2048, 8),
    _static_config("ce_chunk/bf16_grad_softcap", "bf16", True, 2048, 8),
    _static_config("ce_chunk/fp16_grad_softcap", "fp16", True, 2048, 8),
    _static_config("ce_chunk/inplace_fp32", "fp32", False, 2048, 8),
    _static_config("ce_chunk/inplace_fp32_softcap", "fp32", True, 2048, 8),
    _static_config("ce_chunk/forward_only_softcap", "fp32", True, 2048, 8, compute_grad=False),
    _static_config("ce_chunk/bf16_grad_softcap_bv1024", "bf16", True, 1024, 4),
]
