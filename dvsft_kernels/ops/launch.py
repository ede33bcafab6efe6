"""Host wrappers for the Triton kernels in `kernels/`: argument checks, allocation, grids.

Importing this module imports triton but touches no GPU. A wrapper runs on CUDA tensors, or on CPU
tensors when TRITON_INTERPRET=1 (checked at call time; the kernels must then have been imported
with it set, since triton picks interpreter or compiler when a kernel is decorated).
"""

from __future__ import annotations

import os

import torch
import triton

from dvsft_kernels.ops.kernels.ce_chunk import _ce_chunk_kernel

# Vocabulary tile of the CE chunk kernel: 32 lanes x num_warps threads, 8 float32 (two 16-byte
# loads) per thread at the largest tile, 8 KB per program per tile. At 32-48 registers an H100 SM
# holds 5-8 such programs, above the ~20 KB in flight that 3 TB/s x ~1 us / 132 SMs needs; larger
# tiles buy no bandwidth. kernels/README.md has the byte model.
CE_MAX_BLOCK_V = 2048
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    """TRITON_INTERPRET read now, as triton parses it (1/true/on/yes)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row CE of the float32 logits `x` (m, V) against `targets` (m,), and its gradient.

    Returns (loss, lse, correct): float32 (m,), float32 (m,), bool (m,). `loss` is the
    unscaled per-row ce + z_loss * lse**2 (see kernels/ce_chunk.py for the math); `lse` is of the
    softcapped logits; `correct` is argmax == target, first index on ties.

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
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise ValueError(f"x: on {device}; ce_chunk needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
    if targets.shape != (m,) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets: expected int32/int64 of shape ({m},), got {targets.dtype} {tuple(targets.shape)}")
    _check_device("targets", targets, device)
    if row_scale is not None:
        if row_scale.shape != (m,) or not row_scale.is_floating_point():
            raise ValueError(f"row_scale: expected a float tensor of shape ({m},), got "
                             f"{row_scale.dtype} {tuple(row_scale.shape)}")
        _check_device("row_scale", row_scale, device)
    if label_smoothing < 0 or label_smoothing > 1:
        raise ValueError(f"label_smoothing: must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss: must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap: must be > 0 or None, got {softcap}")
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
    correct = torch.empty(m, dtype=torch.bool, device=device)
    if m == 0:
        return loss, lse, correct
    g = x if grad_out is None else grad_out
    scale = row_scale.float().contiguous() if row_scale is not None else loss  # dummy when unused
    _ce_chunk_kernel[(m,)](
        x, targets.contiguous(), scale, g, loss, lse, correct.view(torch.int8),
        V, x.stride(0), g.stride(0),
        float(label_smoothing), float(z_loss), float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTHING=label_smoothing > 0,
        HAS_SCALE=row_scale is not None and compute_grad,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v,
        LANES=lanes,
        num_warps=num_warps,
    )
    return loss, lse, correct
