"""Pure-PyTorch chunked linear cross-entropy over compacted labeled rows (`impl="torch"`).

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
"""

from __future__ import annotations

import os
import threading

import torch

# CPU chunk budget. A cache-sized chunk (a few MB: ~64 rows at V = 32000) keeps the elementwise
# passes in cache but starves the GEMMs (small M) and re-reads and re-writes the whole float32 dW
# once per chunk (8 V D bytes per chunk against 6 m D V FLOPs: 11 % of the time at m = 128 on
# 2 cores). Measured on 2 AVX-512 cores (N 4096, D 512, V 32000, all labeled; min of 3, loaded
# machine): 128 rows 1.8x the floor, 256 1.35x, 512 1.2x, 1024 1.1x, 2048 1.1x. 128 MiB gives
# ~1000 rows at V = 32000 and ~220 at V = 152k; benchmarks/README.md has the sweep command.
CPU_CHUNK_BYTES = 128 * 2**20
# On a GPU the chunk bounds memory; its size also sets the float32 dW traffic, since every chunk
# after the first reads and writes dW (V x D x 8 B: 4.4 GB at Qwen2.5-VL-7B's head, ~1.5 ms on an
# H100), so n = 16384 rows in 10 chunks of 1 GiB spend ~13 ms of a 104 ms step on it. Untested
# alternatives (benchmarks/README.md "chunk sweep"): 2 GiB ~ -7 ms for +1.5 GB.
CUDA_CHUNK_BYTES = 1 * 2**30


# Fresh multi-MB CPU buffers come from mmap and page-fault inside the GEMM that first writes them
# (+34 ms on a 410 x 32000 projection that takes 83 ms into a warm buffer, 2 cores). So on CPU the
# logits chunk buffers are kept per thread between calls and reused while large enough;
# `release_workspace()` frees them, DVSFT_CPU_WORKSPACE=0 turns the reuse off.
_workspace = threading.local()


def release_workspace() -> None:
    """Free the CPU logits buffers kept between calls."""
    _workspace.__dict__.clear()


def _chunk_buffer(slot: int, m: int, V: int, device: torch.device) -> torch.Tensor:
    if device.type != "cpu" or os.environ.get("DVSFT_CPU_WORKSPACE", "1") == "0":
        return torch.empty(m, V, dtype=torch.float32, device=device)
    key = f"buf{slot}"
    flat = getattr(_workspace, key, None)
    if flat is None or flat.numel() < m * V:
        setattr(_workspace, key, None)  # drop the old one before allocating the new one
        flat = torch.empty(m * V, dtype=torch.float32)
        setattr(_workspace, key, flat)
    return flat[: m * V].view(m, V)


def chunk_rows_for(n: int, V: int, device: torch.device, budget_bytes: int | None = None) -> int:
    """Rows per chunk so that one float32 (rows, V) logits buffer fits `budget_bytes`."""
    if budget_bytes is None:
        budget_bytes = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    rows = max(1, budget_bytes // (4 * V))
    return int(max(1, min(n, rows)))


def row_outputs(n: int, D: int, V: int, dev, grad_h: bool, grad_w: bool, grad_b: bool,
                dw_dtype: torch.dtype = torch.float32):
    """(loss, lse, correct, dh, dW, db) of the row-chunk implementations. dW is left unwritten
    (the first chunk's GEMM writes it with `_accum_f32(..., first=True)`, no zero-fill pass) except
    when there are no rows, where it is zero; dh is written chunk by chunk; db accumulates."""
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    correct = torch.empty(n, dtype=torch.bool, device=dev)
    dh = torch.empty(n, D, dtype=torch.float32, device=dev) if grad_h else None
    make = torch.zeros if n == 0 else torch.empty
    dW = make(V, D, dtype=dw_dtype, device=dev) if grad_w else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if grad_b else None
    return loss, lse, correct, dh, dW, db


def _has_mm_out_dtype() -> bool:
    return hasattr(torch.ops.aten.mm, "dtype")


# aten::mm.dtype_out (16-bit operands, float32 result written straight into `out`): CUDA only;
# False once it has raised (a torch without the CUDA kernel), then the result is copied into out.
_MM_DTYPE_OUT = {"ok": hasattr(torch.ops.aten.mm, "dtype_out")}


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with float32 result and accumulation whatever the operand dtype."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
    if out is not None and a.is_cuda and _MM_DTYPE_OUT["ok"]:
        try:  # no (m, V) float32 temporary and no copy: 8 B per logit less traffic
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_DTYPE_OUT["ok"] = False
    if a.is_cuda and _has_mm_out_dtype():
        r = torch.mm(a, b, out_dtype=torch.float32)
    else:
        r = torch.mm(a.float(), b.float())
    if out is not None:
        out.copy_(r)
        return out
    return r


def compute_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight the GEMMs read: itself on CUDA or in float32; a float32 copy for half
    precision on CPU, where half GEMMs would round the logits to the input dtype."""
    if weight.dtype == torch.float32 or weight.is_cuda:
        return weight
    return weight.float()


def lce_torch(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    scale: torch.Tensor | None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    grad_h: bool = False,
    grad_w: bool = False,
    grad_b: bool = False,
    chunk_rows: int | None = None,
    need_correct: bool = True,
):
    """Forward (and, when asked, gradients) on compacted rows.

    h (n, D), targets (n,) int64 in [0, V), scale (n,) float32 (the gradient of the caller's loss
    with respect to each row's loss; needed only for gradients).
    Returns (loss (n,), lse (n,), correct (n,) bool, dh (n, D) f32 | None, dW (V, D) f32 | None,
    db (V,) f32 | None); loss is per row and not multiplied by scale. With need_correct=False,
    `correct` is all False (not computed).
    """
    n, D = h.shape
    V = weight.shape[0]
    dev = h.device
    eps, zl = float(label_smoothing), float(z_loss)
    W = compute_weight(weight)
    b = bias.float() if bias is not None else None
    any_grad = grad_h or grad_w or grad_b
    if any_grad and scale is None:
        raise ValueError("scale: required when gradients are requested")

    loss, lse, correct, dh, dW, db = row_outputs(n, D, V, dev, grad_h, grad_w, grad_b)
    if n == 0:
        return loss, lse, correct, dh, dW, db

    m_max = chunk_rows or chunk_rows_for(n, V, dev)
    buf = _chunk_buffer(0, m_max, V, dev)
    buf2 = _chunk_buffer(1, m_max, V, dev) if softcap is not None else None
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
        y_t = y.gather(1, tc[:, None]).squeeze(1)
        y_mean = y.sum(1).div_(V) if eps else None
        if need_correct:
            mx, amax = y.max(1)
            correct[s0:s1] = amax == tc
        else:  # the index costs a 5x slower reduction on CPU: skip it when nobody reads it
            mx = y.amax(1)
            correct[s0:s1] = False
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
                                W, hc, dh[s0:s1] if grad_h else None, dW, db, first=s0 == 0)
            continue

        ratio = (1 - eps) * ssum if k is None else (1 - eps) * ssum / k
        e.index_put_((rows, tc), -ratio, accumulate=True)
        eW = e if e.dtype == W.dtype else e.to(W.dtype)
        if grad_h:
            dhc = mm_f32(eW, W, out=dh[s0:s1])
            dhc.mul_(a[:, None])
            if eps:
                dhc.sub_(c2[:, None] * w_sum)
        if grad_w:
            ah = a[:, None] * hc.float()
            _accum_f32(dW, eW.T, ah if ah.dtype == W.dtype else ah.to(W.dtype), first=s0 == 0)
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
    return loss, lse, correct, dh, dW, db


def explicit_grad_gemms(e, a, rows, t, c1, c2, tanh, W, hc, dh_c, dW, db, first):
    """G = (a E - c1 onehot(t) - c2) * (1 - tanh^2), formed in place over E (and tanh), then
    dh_c = G W, dW (+)= G^T hc (`first`: dW is written, not accumulated), db += sum_rows G.
    c2 None: no smoothing term; tanh None: no softcap; dh_c / dW / db None: not wanted."""
    g = e.mul_(a[:, None])
    g.index_put_((rows, t), -c1, accumulate=True)
    if c2 is not None:
        g.sub_(c2[:, None])
    if tanh is not None:
        g.mul_(tanh.mul_(tanh).neg_().add_(1))
    gW = g if g.dtype == W.dtype else g.to(W.dtype)
    if dh_c is not None:
        mm_f32(gW, W, out=dh_c)
    if dW is not None:
        _accum_f32(dW, gW.T, hc, first=first)
    if db is not None:
        db.add_(g.sum(0))


def _accum_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool = False) -> None:
    """acc (float32) += a @ b, accumulating in float32; with `first`, acc = a @ b (acc may hold
    garbage)."""
    if first:
        mm_f32(a, b, out=acc)
    elif a.dtype == torch.float32:
        torch.addmm(acc, a, b, out=acc)  # not addmm_: FLOP counters see the out= overload
    elif a.is_cuda and hasattr(torch.ops.aten.addmm, "dtype"):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(mm_f32(a, b))
