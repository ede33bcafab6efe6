"""`impl="chunked"`: per chunk of compacted labeled rows, the projection GEMM into a float32
buffer, one fused Triton pass (`kernels/ce_chunk.py`: online max / sum-exp, loss terms, argmax and the
logit gradient written in the GEMM dtype), then the two gradient GEMMs with float32 accumulation of
dW (across chunks in a float32 buffer; a single chunk of 16-bit operands writes dW in the weight's
dtype straight from the GEMM's float32 accumulator). Memory: one (chunk_rows, V) float32 buffer
plus one in the GEMM dtype.
"""

from __future__ import annotations

import torch

from dvsft_kernels.ops.backends.base import CompactBackend, Grads
from dvsft_kernels.ops.backends.registry import register
from dvsft_kernels.ops.gemm import (
    accum_f32,
    chunk_logits,
    chunk_rows_for,
    compute_weight,
    mm_f32,
    row_outputs,
)
from dvsft_kernels.ops.options import LCEOptions


def lce_chunked(h, weight, bias, targets, scale, options: LCEOptions, grads: Grads, q=None):
    """`CompactBackend.rows` with the CE pass in one Triton kernel per chunk (argmax included:
    free in this pass). Soft targets: targets (n, K) with probabilities q (n, K)."""
    from dvsft_kernels.ops.kernels.ce_chunk import ce_chunk  # imports triton

    grad_h, grad_w, grad_b = grads
    n, D = h.shape
    V = weight.shape[0]
    dev = h.device
    W = compute_weight(weight)
    b = bias.float() if bias is not None else None
    any_grad = grad_h or grad_w or grad_b
    if any_grad and scale is None:
        raise ValueError("scale: required when gradients are requested")

    m_max = options.chunk_rows or chunk_rows_for(n, V, dev)
    # One chunk: its GEMM accumulates in float32 and rounds once, so dW is written in the weight's
    # dtype (no float32 (V, D) buffer, and half the bytes here and in the backward's scale + cast).
    one_chunk_dw = n <= m_max and W.dtype != torch.float32
    loss, lse, pred, dh, dW, db = row_outputs(n, D, V, dev, grad_h, grad_w, grad_b,
                                                 W.dtype if one_chunk_dw else torch.float32)
    if n == 0:
        return loss, lse, pred, dh, dW, db

    xbuf = torch.empty(m_max, V, dtype=torch.float32, device=dev)
    # G in the GEMM dtype: the gradient GEMMs read half the bytes of a float32 G
    gbuf = xbuf if (not any_grad or W.dtype == torch.float32) else torch.empty(m_max, V, dtype=W.dtype, device=dev)

    for s0 in range(0, n, m_max):
        s1 = min(n, s0 + m_max)
        m = s1 - s0
        hc, x = chunk_logits(h, s0, s1, W, b, out=xbuf[:m])
        g = gbuf[:m]
        l_c, lse_c, pred_c = ce_chunk(
            x, targets[s0:s1], scale[s0:s1] if any_grad else None,
            **options.loss_terms(),
            compute_grad=any_grad, grad_out=None if g.data_ptr() == x.data_ptr() else g,
            target_probs=q[s0:s1] if q is not None else None,
        )
        loss[s0:s1] = l_c
        lse[s0:s1] = lse_c
        pred[s0:s1] = pred_c
        if not any_grad:
            continue
        if grad_h:
            mm_f32(g, W, out=dh[s0:s1])
        if grad_w and one_chunk_dw:
            torch.mm(g.T, hc, out=dW)
        elif grad_w:
            accum_f32(dW, g.T, hc, first=s0 == 0)
        if grad_b:
            db.add_(g.sum(0, dtype=torch.float32))
    return loss, lse, pred, dh, dW, db


@register
class ChunkedBackend(CompactBackend):
    name = "chunked"

    def rows(self, h, weight, bias, t, scale, options: LCEOptions, grads: Grads, q=None):
        return lce_chunked(h, weight, bias, t, scale, options, grads, q=q)
