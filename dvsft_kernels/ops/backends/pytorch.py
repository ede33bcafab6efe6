"""`impl="torch"`: pure-PyTorch chunked linear cross-entropy over compacted labeled rows.

Runs on any device; the CPU default. Rows arrive already compacted (ignored rows removed) and are
processed in chunks of `chunk_rows`, so the largest tensor is one (chunk_rows, V) float32 logits
buffer (two with softcap), reused across chunks. Gradients are formed chunk by chunk:

    G = s * [(1 + 2 zl lse) softmax(y) - (1 - eps) onehot(t) - eps / V] * dy/dx

Without softcap dy/dx = 1 and G = a * E - c1 * onehot - c2 with E = exp(x - max) and a, c1, c2
per row. Writing c1 / a into E at the targets (m elements) gives E' with a * E' = G + c2, and the
row factors then ride on the GEMMs' small operands instead of passing over the (m, V) chunk:

    dh = a * (E' @ W) - c2 * sum_v W_v
    dW = E'^T @ (a * h) - 1 (x) sum_i c2_i h_i        (the rank-one term once, after all chunks)
    db = E'^T a - sum_i c2_i

which leaves four elementwise sweeps over the chunk (max, subtract, exp, sum) between the GEMMs.

On CPU, when the native epilogue is built (dvsft_kernels/native.py; DVSFT_NATIVE=0 turns it off), one
C++ pass per row replaces those sweeps: it reads the chunk once for the row statistics (max,
sum-exp, target logit, first argmax, smoothing sum) and writes the full G over it (incl. the
smoothing term and dy/dx under softcap), so the GEMMs take G as is: dh = G W, dW += G^T h,
db += sum_rows G. No second buffer is needed under softcap. bfloat16 (float16) inputs on a CPU with
fast GEMMs in that dtype run those GEMMs, the logits chunk and G in the input dtype (`_lce_native`).

Soft targets (t (n, K) with probabilities q, ops/backends/base.py `Inputs`): the target logit is
sum_k q_k y[t_k] (a (m, K) gather) and the one-hot term sum_k q_k onehot(t_k) (a scatter-add of K
entries per row, repeated ids adding up), in the fold, the explicit G and the native epilogue alike.
"""

from __future__ import annotations

import torch

from dvsft_kernels import native
from dvsft_kernels.ops.backends.base import CompactBackend, Grads
from dvsft_kernels.ops.backends.registry import register
from dvsft_kernels.ops.gemm import (
    accum_f32,
    chunk_buffer,
    chunk_rows_for,
    compute_weight,
    cpu_half_gemm,
    explicit_grad_gemms,
    mm_f32,
    row_outputs,
)
from dvsft_kernels.ops.options import LCEOptions


def lce_torch(h, weight, bias, targets, scale, options: LCEOptions, grads: Grads, q=None):
    """The "torch" rows: `CompactBackend.rows` in PyTorch ops, chunk by chunk. Without
    `options.return_stats` the argmax is not computed (predicted is -1). Soft targets: targets
    (n, K) with probabilities q (n, K)."""
    n, D = h.shape
    V = weight.shape[0]
    dev = h.device
    eps, zl, softcap = options.label_smoothing, options.z_loss, options.softcap
    grad_h, grad_w, grad_b = grads
    any_grad = grad_h or grad_w or grad_b
    if any_grad and scale is None:
        raise ValueError("scale: required when gradients are requested")

    loss, lse, pred, dh, dW, db = row_outputs(n, D, V, dev, grad_h, grad_w, grad_b)
    if n == 0:
        return loss, lse, pred, dh, dW, db
    epilogue = native.epilogue() if dev.type == "cpu" else None
    # with the native epilogue on a CPU with fast 16-bit GEMMs: the GEMMs in the input dtype, no
    # float32 weight copy
    half = epilogue is not None and cpu_half_gemm(weight.dtype)
    W = weight if half else compute_weight(weight)
    b = bias if (half or bias is None) else bias.float()
    if epilogue is not None:
        return _lce_native(epilogue, h, W, b, targets, q, scale, options, grads, (loss, lse, pred, dh, dW, db))

    m_max = options.chunk_rows or chunk_rows_for(n, V, dev)
    buf = chunk_buffer(0, m_max, V, dev)
    buf2 = chunk_buffer(1, m_max, V, dev) if softcap is not None else None
    w_sum = W.sum(0, dtype=torch.float32) if (grad_h and eps) else None
    # sum_i c2_i h_i and sum_i c2_i over all chunks: the smoothing term of dW / db is a rank-one
    # update applied once at the end instead of a (V, D) pass per chunk
    c2h_total = torch.zeros(D, dtype=torch.float32, device=dev) if (grad_w and eps) else None
    c2_total = torch.zeros((), dtype=torch.float32, device=dev)

    for s0 in range(0, n, m_max):
        s1 = min(n, s0 + m_max)
        m = s1 - s0
        hc = h[s0:s1]
        hc = hc if hc.dtype == W.dtype else hc.to(W.dtype)
        tc = targets[s0:s1]
        qc = q[s0:s1] if q is not None else None
        x = buf[:m]
        if b is not None:
            if x.dtype == W.dtype:
                torch.addmm(b, hc, W.T, out=x)
            else:
                mm_f32(hc, W.T, out=x).add_(b)
        else:
            mm_f32(hc, W.T, out=x)

        if softcap is not None:
            # x <- tanh(x / cap) (kept for dy/dx); y = cap * x lives in buf2, then becomes E
            x.div_(softcap).tanh_()
            y = torch.mul(x, softcap, out=buf2[:m])
        else:
            y = x
        # the target logit; soft: sum_k q_k y[t_k]
        y_t = y.gather(1, tc[:, None]).squeeze(1) if qc is None else (y.gather(1, tc) * qc).sum(1)
        y_mean = y.sum(1).div_(V) if eps else None
        if options.return_stats:
            mx, amax = y.max(1)
            pred[s0:s1] = amax
        else:  # the index costs a 5x slower reduction on CPU: skip it when nobody reads it
            mx = y.amax(1)
            pred[s0:s1] = -1
        e = y.sub_(mx[:, None]).exp_()  # E = exp(y - max), in place
        ssum = e.sum(1)
        lse_c = mx + ssum.log()
        ce = (1 - eps) * (lse_c - y_t)
        if eps:
            ce = ce + eps * (lse_c - y_mean)
        loss[s0:s1] = ce + zl * lse_c * lse_c if zl else ce
        lse[s0:s1] = lse_c
        if not any_grad:
            continue

        sc = scale[s0:s1].float()
        k = 1 + 2 * zl * lse_c if zl else None  # z-loss factor on softmax
        a = sc / ssum if k is None else sc * k / ssum  # G = a * E - c1 * onehot - c2
        c1 = sc * (1 - eps)
        c2 = sc * (eps / V)
        rows = torch.arange(m, device=dev)
        # fold: with E[r, t_r] -= c1 / a, a * E is G + c2, so the row factor moves into the GEMMs;
        # c1 / a = (1 - eps) * sum / k is independent of the scale (no 0/0 for zero-weight rows)
        fold = softcap is None and (k is None or bool((k > 1e-3).all()))
        if not fold:
            # explicit G: softcap, or a z-loss factor k <= 0
            explicit_grad_gemms(e, a, rows, tc, c1, c2 if eps else None, x if softcap is not None else None,
                                W, hc, dh[s0:s1] if grad_h else None, dW, db, first=s0 == 0, q=qc)
            continue

        ratio = (1 - eps) * ssum if k is None else (1 - eps) * ssum / k
        if qc is None:
            e.index_put_((rows, tc), -ratio, accumulate=True)
        else:  # K targets per row, each with its share of the one-hot term
            e.scatter_add_(1, tc, qc * -ratio[:, None])
        eW = e if e.dtype == W.dtype else e.to(W.dtype)
        if grad_h:
            dhc = mm_f32(eW, W, out=dh[s0:s1])
            dhc.mul_(a[:, None])
            if eps:
                dhc.sub_(c2[:, None] * w_sum)
        if grad_w:
            ah = a[:, None] * hc.float()
            accum_f32(dW, eW.T, ah if ah.dtype == W.dtype else ah.to(W.dtype), first=s0 == 0)
            if eps:
                c2h_total.add_(c2 @ hc.float())
        if grad_b:
            db.add_(torch.mv(e.T, a))
            if eps:
                c2_total.add_(c2.sum())

    if c2h_total is not None:
        dW.sub_(c2h_total[None, :])
    if grad_b and eps:
        db.sub_(c2_total)
    return loss, lse, pred, dh, dW, db


# 16-bit inputs on a CPU with fast 16-bit GEMMs (`cpu_half_gemm`; bfloat16 ~4-5x the float32 rate on
# AVX-512 BF16 cores): the GEMMs run in the input dtype, as plain PyTorch in that dtype does (the
# error rule's baseline), so the logits come out rounded to it; the epilogue reads them and writes G
# over them in that dtype (half the float32 chunk, no float32 weight copy), then dh = G W and
# dW = sum over chunks of G^T h, each chunk's product added into the float32 dW.


def _lce_native(epilogue, h, W, b, targets, q, scale, options: LCEOptions, grads: Grads, outputs):
    """`lce_torch` with the native CPU epilogue between the same GEMMs: G is formed in full in
    the logits buffer, so no fold and no second buffer. Soft targets: targets (n, K), q (n, K).
    W float32 (b float32 or None): float32 GEMMs. W 16-bit (b any float dtype or None): GEMMs,
    logits chunk and G in W's dtype, dh / dW / db still float32 (`row_outputs`)."""
    loss, lse, pred, dh, dW, db = outputs
    n = h.shape[0]
    V = W.shape[0]
    half = W.dtype != torch.float32
    grad_h, grad_w, grad_b = grads
    any_grad = grad_h or grad_w or grad_b
    eps, zl, softcap = options.label_smoothing, options.z_loss, options.softcap
    # a 16-bit chunk: twice the rows in the same bytes (N 4096, D 512, V 32000 bfloat16 on 2 cores:
    # 1.30x the GEMM floor at 1048 rows, 1.14x at 2096; fewer float32 dW read-modify-writes)
    m_max = options.chunk_rows or chunk_rows_for(n, V, h.device, itemsize=W.dtype.itemsize)
    buf = chunk_buffer(0, m_max, V, h.device, dtype=W.dtype)
    if half and b is not None:
        b = b.to(W.dtype)
    # one chunk's G^T h in W's dtype: reused by every chunk (a fresh V x D buffer page-faults inside the
    # GEMM); with a single chunk it is still the product's target, cast into the float32 dW after
    dw_part = torch.empty(W.shape, dtype=W.dtype) if (half and grad_w) else None
    t_all = targets.long()
    q_all = q.float() if q is not None else None
    s_all = scale.float() if any_grad else None
    for s0 in range(0, n, m_max):
        s1 = min(n, s0 + m_max)
        hc = h[s0:s1]
        hc = hc if hc.dtype == W.dtype else hc.to(W.dtype)
        x = buf[: s1 - s0]
        if half and b is not None:
            # h W^T rounded, then + b rounded, as plain PyTorch in the dtype: the loss is a mean of
            # row losses whose rounding errors mostly cancel, so the error rule's bound on it is the
            # baseline's own rounding pattern; addmm's single rounding is a different draw
            torch.mm(hc, W.T, out=x).add_(b)
        elif b is not None:
            torch.addmm(b, hc, W.T, out=x)
        else:
            torch.mm(hc, W.T, out=x)
        lc, lsec, pc = epilogue(x, t_all[s0:s1].contiguous(), None if q_all is None else q_all[s0:s1].contiguous(),
                                None if s_all is None else s_all[s0:s1].contiguous(),
                                eps, zl, softcap, any_grad, None, options.return_stats, native.FAULT["code"])
        loss[s0:s1] = lc
        lse[s0:s1] = lsec
        pred[s0:s1] = pc
        if not any_grad:
            continue
        if half:
            if grad_h:
                dh[s0:s1] = torch.mm(x, W)  # (m, D): rounded to W's dtype, as the baseline's dh
            if grad_w:
                torch.mm(x.T, hc, out=dw_part)
                if s0 == 0:
                    dW.copy_(dw_part)
                else:
                    dW.add_(dw_part)
            if grad_b:
                db.add_(x.sum(0, dtype=torch.float32))
            continue
        if grad_h:
            mm_f32(x, W, out=dh[s0:s1])
        if grad_w:
            accum_f32(dW, x.T, hc, first=s0 == 0)
        if grad_b:
            db.add_(x.sum(0))
    return loss, lse, pred, dh, dW, db


@register
class TorchBackend(CompactBackend):
    name = "torch"

    def rows(self, h, weight, bias, t, scale, options: LCEOptions, grads: Grads, q=None):
        return lce_torch(h, weight, bias, t, scale, options, grads, q=q)
