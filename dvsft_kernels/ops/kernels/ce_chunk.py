"""Cross-entropy over one chunk of precomputed float32 logits, with its logit gradient.

Row i of x holds the raw logits of one labeled position (x = h W^T + b, written by a GEMM); t is
its target. All math is float32:

    y    = softcap * tanh(x / softcap)            (HAS_SOFTCAP)    else y = x
    lse  = logsumexp_j y_j
    loss = (1 - eps) (lse - y_t) + eps (lse - mean_j y_j) + zl lse^2
    G_ij = s_i [p_ij (1 + 2 zl lse) - (1 - eps) [j == t] - eps / V] (1 - tanh^2(x_ij / softcap))
    pred_i = argmax_j y_j                          (first index on ties, as torch.argmax)

with p = softmax(y) and s_i the row scale (the loss is not scaled). Soft targets (HAS_Q): row i
has K ids t_ik with probabilities q_ik; y_t becomes sum_k q_ik y_{t_ik} and [j == t] becomes
sum_k q_ik [j == t_ik] (repeated ids add up). One program per row sweeps
the vocabulary twice in tiles of BLOCK_V: sweep 1 keeps, per thread, an online max / sum-exp, the
first argmax and the sum of y; sweep 2 (COMPUTE_GRAD) re-reads x and writes G, in place over x or
into a separate buffer in the gradient GEMMs' dtype (the store casts to g_ptr's element type).
Per element: 4 B read (forward only), or 8 B read + 2 B (bf16 G) / 4 B (in-place G) written;
n = 16384, V = 151936 on an H100: ~8.3 ms at 3 TB/s with a bf16 G. Derivation, block and warp
choice, instruction counts: README.md beside this file.
"""

import torch
import triton
import triton.language as tl

from dvsft_kernels.ops.kernels.common import softcap_tanh
from dvsft_kernels.ops.options import LCEOptions, interpreting


@triton.jit
def ce_chunk_kernel(
    x_ptr,  # [M, V] float32 logits, unit stride along V
    t_ptr,  # [M] int32/int64 targets, all in [0, V); soft: [M, K] contiguous
    q_ptr,  # soft only: [M, K] contiguous float32 probabilities of t (t_ptr when hard, never read)
    s_ptr,  # [M] float32 row scales (read only if HAS_SCALE)
    g_ptr,  # [M, V] gradient output (x_ptr itself when in place); float32 / bf16 / fp16
    loss_ptr,  # [M] float32
    lse_ptr,  # [M] float32
    pred_ptr,  # [M] int32 first argmax of y
    V,
    stride_xm,
    stride_gm,
    eps,  # label smoothing
    zl,  # z-loss coefficient
    softcap,  # > 0; ignored (pass 1.0) unless HAS_SOFTCAP
    K,  # soft targets per row (ignored unless HAS_Q)
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,  # power of two, >= 4 * LANES
    LANES: tl.constexpr,  # threads sharing a tile in sweep 1: 32 * num_warps, or fewer for tiny V
    HAS_Q: tl.constexpr,  # soft targets (t_ptr, q_ptr [M, K]); False compiles the hard kernel
    BLOCK_K: tl.constexpr,  # soft: next power of two of K (1 when hard)
):
    i_m = tl.program_id(0).to(tl.int64)
    p_x = x_ptr + i_m * stride_xm
    inv_cap = 1.0 / softcap
    if not HAS_Q:
        i_t = tl.load(t_ptr + i_m).to(tl.int32)

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
            b_y, _ = softcap_tanh(b_x, softcap, inv_cap)
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

    # The target logits are read here, before the cross-lane reductions below: their barrier
    # orders these loads before any thread's sweep-2 store, which may overwrite x in place.
    if HAS_Q:
        # Soft: a K-element gather (O(K) per row, nothing per element). Slots past K read id 0
        # with q = 0.
        o_k = tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_tk = tl.load(t_ptr + i_m * K + o_k, mask=m_k, other=0).to(tl.int32)  # [BK]
        b_qk = tl.load(q_ptr + i_m * K + o_k, mask=m_k, other=0.0)  # [BK]
        b_xk = tl.load(p_x + b_tk)  # [BK]
        if HAS_SOFTCAP:
            b_yk, b_sech2k = softcap_tanh(b_xk, softcap, inv_cap)
        else:
            b_yk = b_xk
    else:
        b_xt = tl.load(p_x + i_t)

    # Everything below works from the row max M and S = sum_j exp(y_j - M), lse = M + log S:
    # y - M is exact near the max, so the loss and p stay accurate when |y| is large, where lse
    # itself is rounded to ulp(|lse|).
    b_mx = tl.max(b_m, axis=0)
    b_sum = tl.sum(b_se * tl.exp(b_m - b_mx), axis=0)
    b_logs = tl.log(b_sum)
    b_lse = b_mx + b_logs
    b_argmax = tl.min(tl.where(b_m == b_mx, b_arg, V), axis=0)
    if HAS_Q:
        # M - sum_k q_k y_k as sum_k q_k (M - y_k) + (1 - Q) M, Q = sum_k q_k: each M - y_k is
        # exact near the max, and (1 - Q) M is 0 for the rows that sum to 1 (K = 1, q = 1 gives
        # the hard kernel's loss bit for bit); Q = 0 rows get lse, as the formula says.
        b_q = tl.sum(b_qk, axis=0)
        b_loss = (tl.sum(b_qk * (b_mx - b_yk), axis=0) + (1.0 - b_q) * b_mx) + b_logs
    else:
        # y_t from the same formula on the same x, so it equals the y_t seen by the sweep.
        if HAS_SOFTCAP:
            b_yt, _ = softcap_tanh(b_xt, softcap, inv_cap)
        else:
            b_yt = b_xt
        b_loss = (b_mx - b_yt) + b_logs
    if HAS_SMOOTHING:
        b_loss = (1.0 - eps) * b_loss + eps * ((b_mx - tl.sum(b_sy, axis=0) / V) + b_logs)
    b_loss += zl * b_lse * b_lse
    tl.store(loss_ptr + i_m, b_loss)
    tl.store(lse_ptr + i_m, b_lse)
    tl.store(pred_ptr + i_m, b_argmax)

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
        if HAS_Q:
            # Soft one-hot term: sweep 2 writes G without it, then the K target entries are
            # rewritten whole (a K x K compare sums repeated ids; their slots store equal values).
            # A per-element compare against K ids would add 2K instructions per element to a
            # ~12-instruction sweep; this costs O(K^2) per row and one barrier. The entries are
            # formed from the gathered y_k, as x may be overwritten by then.
            b_wk = tl.sum(tl.where(b_tk[:, None] == b_tk[None, :], b_qk[None, :], 0.0), axis=1)  # [BK]
            b_gk = b_a * tl.exp(b_yk - b_mx) - b_c - b_d * b_wk
            if HAS_SOFTCAP:
                b_gk = b_gk * b_sech2k
        o_v = tl.arange(0, BLOCK_V)
        for v0 in range(0, V, BLOCK_V):
            o_j = v0 + o_v
            m_j = o_j < V
            b_x = tl.load(p_x + o_j, mask=m_j, other=0.0)  # [BV]
            if HAS_SOFTCAP:
                b_y, b_sech2 = softcap_tanh(b_x, softcap, inv_cap)
            else:
                b_y = b_x
            b_g = b_a * tl.exp(b_y - b_mx) - b_c
            if not HAS_Q:
                b_g = tl.where(o_j == i_t, b_g - b_d, b_g)
            if HAS_SOFTCAP:
                b_g = b_g * b_sech2
            tl.store(p_g + o_j, b_g.to(g_ptr.dtype.element_ty), mask=m_j)
        if HAS_Q:
            tl.debug_barrier()  # every thread's sweep-2 stores land before these overwrite them
            tl.store(p_g + b_tk, b_gk.to(g_ptr.dtype.element_ty), mask=m_k)


# ------------------------------------------------------------------ launcher
# Vocabulary tile of the CE chunk kernel: 32 lanes x num_warps threads, 8 float32 (two 16-byte
# loads) per thread at the largest tile, 8 KB per program per tile. At 32-48 registers an H100 SM
# holds 5-8 such programs, above the ~20 KB in flight that 3 TB/s x ~1 us / 132 SMs needs; larger
# tiles buy no bandwidth. README.md has the byte model.
CE_MAX_BLOCK_V = 2048
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} (the device of x)")


def ce_chunk_config(V: int, block_v: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_V, LANES, num_warps) for a vocabulary of V. BLOCK_V: the next power of two of V,
    clamped to [16, CE_MAX_BLOCK_V] (or `block_v`); one warp per 256 elements of the tile, 1 to 8
    warps; LANES, the threads that split a tile in sweep 1, owning 8 elements each (4 when the tile
    is smaller than one warp's 128)."""
    if block_v is None:
        block_v = min(CE_MAX_BLOCK_V, max(16, triton.next_power_of_2(V)))
    elif block_v < 4 or block_v & (block_v - 1):
        raise ValueError(f"block_v: must be a power of two >= 4, got {block_v}")
    num_warps = max(1, min(8, block_v // 256))
    return block_v, min(32 * num_warps, block_v // 4), num_warps


def ce_chunk(
    x: torch.Tensor,
    targets: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    compute_grad: bool = True,
    grad_out: torch.Tensor | None = None,
    block_v: int | None = None,
    target_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row CE of the float32 logits `x` (m, V) against `targets` (m,), and its gradient.
    Soft targets: `targets` (m, K) with `target_probs` (m, K) float32, the probability of each id
    (normally summing to 1 per row; repeated ids add up), as `Inputs` in ops/backends/base.py.

    Returns (loss, lse, predicted): float32 (m,), float32 (m,), int32 (m,). `loss` is the
    unscaled per-row ce + z_loss * lse**2 (the math is in this module's docstring); `lse` is of
    the softcapped logits; `predicted` is the first argmax of the softcapped logits.

    With compute_grad, G = row_scale[:, None] * dloss/dx (row_scale None = 1) is written into
    `grad_out` ((m, V), float32 / bfloat16 / float16, unit stride on V), or over `x` itself when
    grad_out is None (or is x); grad_out must not otherwise overlap x. Without compute_grad x is
    only read and grad_out must be None.

    Targets must lie in [0, V): they are not checked (that would sync the host); the caller
    compacts ignored rows away first. `block_v` (a power of two) overrides the tile rule of
    `ce_chunk_config`, for tests and tuning.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"x: expected a 2-D float32 tensor, got {getattr(x, 'dtype', type(x))} "
                         f"of shape {tuple(getattr(x, 'shape', ()))}")
    m, V = x.shape
    if not 0 < V < 2**31:
        raise ValueError(f"x: vocabulary size {V} outside [1, 2^31)")
    if V > 1 and x.stride(1) != 1:
        raise ValueError(f"x: needs unit stride along V, got strides {x.stride()}")
    device = x.device
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"x: on {device}; ce_chunk needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
    if target_probs is None:
        if targets.shape != (m,) or targets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"targets: expected int32/int64 of shape ({m},), got {targets.dtype} "
                             f"{tuple(targets.shape)}")
        K = 1
    else:
        if targets.dim() != 2 or targets.shape[0] != m or targets.shape[1] < 1 or \
                targets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"targets: with target_probs, expected int32/int64 of shape ({m}, K >= 1), got "
                             f"{targets.dtype} {tuple(targets.shape)}")
        K = targets.shape[1]
        if target_probs.shape != targets.shape or target_probs.dtype != torch.float32:
            raise ValueError(f"target_probs: expected float32 of shape {tuple(targets.shape)}, got "
                             f"{target_probs.dtype} {tuple(target_probs.shape)}")
        _check_device("target_probs", target_probs, device)
    _check_device("targets", targets, device)
    if row_scale is not None:
        if row_scale.shape != (m,) or not row_scale.is_floating_point():
            raise ValueError(f"row_scale: expected a float tensor of shape ({m},), got "
                             f"{row_scale.dtype} {tuple(row_scale.shape)}")
        _check_device("row_scale", row_scale, device)
    LCEOptions(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)  # the op's checks of these
    if grad_out is not None and grad_out.data_ptr() == x.data_ptr() and grad_out.stride() == x.stride():
        grad_out = None  # x itself: in place
    if grad_out is not None:
        if not compute_grad:
            raise ValueError("grad_out: given with compute_grad=False")
        if grad_out.shape != x.shape or grad_out.dtype not in _GRAD_DTYPES or (V > 1 and grad_out.stride(1) != 1):
            raise ValueError(f"grad_out: expected ({m}, {V}) float32/bfloat16/float16 with unit stride on V, got "
                             f"{grad_out.dtype} {tuple(grad_out.shape)} strides {grad_out.stride()}")
        _check_device("grad_out", grad_out, device)
    block_v, lanes, num_warps = ce_chunk_config(V, block_v)

    loss = torch.empty(m, dtype=torch.float32, device=device)
    lse = torch.empty(m, dtype=torch.float32, device=device)
    predicted = torch.empty(m, dtype=torch.int32, device=device)
    if m == 0:
        return loss, lse, predicted
    g = x if grad_out is None else grad_out
    scale = row_scale.float().contiguous() if row_scale is not None else loss  # dummy when unused
    t = targets.contiguous()
    ce_chunk_kernel[(m,)](
        x_ptr=x, t_ptr=t, q_ptr=target_probs.contiguous() if target_probs is not None else t,
        s_ptr=scale, g_ptr=g, loss_ptr=loss, lse_ptr=lse, pred_ptr=predicted,
        V=V, stride_xm=x.stride(0), stride_gm=g.stride(0),
        eps=float(label_smoothing), zl=float(z_loss), softcap=float(softcap) if softcap is not None else 1.0,
        K=K,
        HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTHING=label_smoothing > 0,
        HAS_SCALE=row_scale is not None and compute_grad,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v,
        LANES=lanes,
        HAS_Q=target_probs is not None,
        BLOCK_K=triton.next_power_of_2(K),
        num_warps=num_warps,
    )
    return loss, lse, predicted


def _static_config(name, grad_dtype, has_softcap, block_v, num_warps, compute_grad=True, block_k=0):
    """One sm_90 compile of `ce_chunk_kernel` for scripts/kernel_report.py. Types follow the
    triton.tools.compile convention: ':16' marks an argument the launcher would specialise as
    16-divisible (aligned pointers, strides and V of real vocabularies); integers below 2^31
    are passed as i32, as the launcher does. block_k > 0: soft targets, K = block_k."""
    return {
        "name": name,
        "kernel": ce_chunk_kernel,
        "signature": {
            "x_ptr": "*fp32:16", "t_ptr": "*i64:16", "q_ptr": "*fp32:16" if block_k else "*i64:16",
            "s_ptr": "*fp32:16", "g_ptr": f"*{grad_dtype}:16",
            "loss_ptr": "*fp32:16", "lse_ptr": "*fp32:16", "pred_ptr": "*i32:16",
            "V": "i32:16", "stride_xm": "i32:16", "stride_gm": "i32:16",
            "eps": "fp32", "zl": "fp32", "softcap": "fp32", "K": "i32:16" if block_k == 16 else "i32",
        },
        "constexprs": {
            "HAS_SOFTCAP": has_softcap, "HAS_SMOOTHING": True, "HAS_SCALE": True,
            "COMPUTE_GRAD": compute_grad, "BLOCK_V": block_v, "LANES": 32 * num_warps,
            "HAS_Q": block_k > 0, "BLOCK_K": max(block_k, 1),
        },
        "num_warps": num_warps,
        "num_stages": 1,
        "matmul": False,
    }


# What ce_chunk compiles for real vocabularies (BLOCK_V 2048, 8 warps) with each switch
# that changes register pressure, plus the 1024-wide tile of mid-size vocabularies.
STATIC_CONFIGS = [
    _static_config("ce_chunk/bf16_grad", "bf16", False, 2048, 8),
    _static_config("ce_chunk/bf16_grad_softcap", "bf16", True, 2048, 8),
    _static_config("ce_chunk/fp16_grad_softcap", "fp16", True, 2048, 8),
    _static_config("ce_chunk/inplace_fp32", "fp32", False, 2048, 8),
    _static_config("ce_chunk/inplace_fp32_softcap", "fp32", True, 2048, 8),
    _static_config("ce_chunk/forward_only_softcap", "fp32", True, 2048, 8, compute_grad=False),
    _static_config("ce_chunk/bf16_grad_softcap_bv1024", "bf16", True, 1024, 4),
    _static_config("ce_chunk/bf16_grad_softcap_soft_k16", "bf16", True, 2048, 8, block_k=16),
    _static_config("ce_chunk/inplace_fp32_softcap_soft_k16", "fp32", True, 2048, 8, block_k=16),
]
