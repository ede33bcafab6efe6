"""GEMM helpers and chunk sizing shared by the backends that project rows chunk by chunk
("torch", "chunked", vocabulary-parallel): float32-accumulating products, the CPU workspace, the
per-row output buffers and the explicit-gradient GEMMs.
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


def workspace_buffer(slot: int) -> torch.Tensor | None:
    """The CPU buffer kept for `slot` in this thread, if any (for tests of the reuse)."""
    return getattr(_workspace, f"buf{slot}", None)


def chunk_buffer(slot: int, m: int, V: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An (m, V) buffer of `dtype`; on CPU a view of the float32 storage kept for `slot`, so a
    16-bit chunk reuses (half of) the buffer a float32 call left."""
    if device.type != "cpu" or os.environ.get("DVSFT_CPU_WORKSPACE", "1") == "0":
        return torch.empty(m, V, dtype=dtype, device=device)
    key = f"buf{slot}"
    n32 = -(-m * V * dtype.itemsize // 4)  # float32 elements holding m V of dtype
    flat = getattr(_workspace, key, None)
    if flat is None or flat.numel() < n32:
        setattr(_workspace, key, None)  # drop the old one before allocating the new one
        flat = torch.empty(n32, dtype=torch.float32)
        setattr(_workspace, key, flat)
    return flat[:n32].view(dtype)[: m * V].view(m, V)


def chunk_rows_for(n: int, V: int, device: torch.device, budget_bytes: int | None = None,
                   itemsize: int = 4) -> int:
    """Rows per chunk so that one (rows, V) logits buffer of `itemsize`-byte elements (float32
    unless told) fits `budget_bytes`."""
    if budget_bytes is None:
        budget_bytes = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    rows = max(1, budget_bytes // (itemsize * V))
    return int(max(1, min(n, rows)))


def row_outputs(n: int, D: int, V: int, dev, grad_h: bool, grad_w: bool, grad_b: bool,
                dw_dtype: torch.dtype = torch.float32):
    """(loss, lse, predicted, dh, dW, db) of the row-chunk backends. dW is left unwritten (the
    first chunk's GEMM writes it with `accum_f32(..., first=True)`, no zero-fill pass) except when
    there are no rows, where it is zero; dh is written chunk by chunk; db accumulates."""
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    predicted = torch.empty(n, dtype=torch.int64, device=dev)
    dh = torch.empty(n, D, dtype=torch.float32, device=dev) if grad_h else None
    make = torch.zeros if n == 0 else torch.empty
    dW = make(V, D, dtype=dw_dtype, device=dev) if grad_w else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if grad_b else None
    return loss, lse, predicted, dh, dW, db


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


def chunk_logits(h: torch.Tensor, s0: int, s1: int, W: torch.Tensor, b: torch.Tensor | None,
                 out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hc, x): rows [s0, s1) of h in W's dtype, and their float32 logits hc @ W.T (+ b) written
    into `out` (a (s1 - s0, V) float32 view)."""
    hc = h[s0:s1]
    hc = hc if hc.dtype == W.dtype else hc.to(W.dtype)
    x = mm_f32(hc, W.T, out=out)
    if b is not None:
        x.add_(b)
    return hc, x


# Whether a CPU GEMM in a 16-bit dtype beats float32, so that the native path runs its GEMMs in the
# input dtype (ops/backends/pytorch.py): oneDNN's own probe of the instruction set (AVX-512 BF16 / AMX
# for bfloat16, AVX-512 FP16 / AMX-FP16 for float16). Without it the 16-bit kernels fall back to slow
# code: (1024, 512) x (512, 32000) on 2 AVX-512 BF16 cores without FP16: bfloat16 69 ms, float32
# 257 ms, float16 847 ms. Filled on first use; tests may set entries.
CPU_HALF_GEMM: dict[torch.dtype, bool] = {}


def cpu_half_gemm(dtype: torch.dtype) -> bool:
    """True when CPU GEMMs in `dtype` (bfloat16 / float16) run at the native 16-bit rate."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if dtype not in CPU_HALF_GEMM:
        probe = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
        try:
            ok = bool(getattr(torch.ops.mkldnn, probe)())
        except (AttributeError, RuntimeError):
            ok = False
        CPU_HALF_GEMM[dtype] = ok and torch.backends.mkldnn.is_available()
    return CPU_HALF_GEMM[dtype]


def compute_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight the GEMMs read: itself on CUDA or in float32; a float32 copy for half
    precision on CPU, where half GEMMs would round the logits to the input dtype."""
    if weight.dtype == torch.float32 or weight.is_cuda:
        return weight
    return weight.float()


def explicit_grad_gemms(e, a, rows, t, c1, c2, tanh, W, hc, dh_c, dW, db, first, q=None):
    """G = (a E - c1 onehot(t) - c2) * (1 - tanh^2), formed in place over E (and tanh), then
    dh_c = G W, dW (+)= G^T hc (`first`: dW is written, not accumulated), db += sum_rows G.
    c2 None: no smoothing term; tanh None: no softcap; dh_c / dW / db None: not wanted. Soft
    targets: t (m, K) and q (m, K), the one-hot term is c1 * sum_k q_k onehot(t_k)."""
    g = e.mul_(a[:, None])
    if q is None:
        g.index_put_((rows, t), -c1, accumulate=True)
    else:
        g.scatter_add_(1, t, q * -c1[:, None])
    if c2 is not None:
        g.sub_(c2[:, None])
    if tanh is not None:
        g.mul_(tanh.mul_(tanh).neg_().add_(1))
    gW = g if g.dtype == W.dtype else g.to(W.dtype)
    if dh_c is not None:
        mm_f32(gW, W, out=dh_c)
    if dW is not None:
        accum_f32(dW, gW.T, hc, first=first)
    if db is not None:
        db.add_(g.sum(0))


def accum_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool = False) -> None:
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
