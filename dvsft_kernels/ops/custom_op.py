"""`linear_cross_entropy` as a torch.library custom op, for torch.compile.

`function.linear_cross_entropy_with_stats` calls `lce_custom_op` while dynamo traces (eager calls
use the autograd.Function). The op is opaque to the compiler: its host synchronisations ("torch",
"chunked" compact the labeled rows) happen inside it, so `fullgraph=True` traces through, and its
fake implementations give every output's shape from the input shapes alone. The forward and the
backward run the same code as the eager Function (`function._forward_core` / `_backward_core`);
what the eager Function keeps on its context, with data-dependent shapes for the compacting
implementations, becomes fixed-shape auxiliary outputs here:

- "torch" / "chunked", "mean" / "sum": gradients formed in the forward, dh scattered to the
  positions of hidden (float32, shaped like hidden), dW, db; the backward scales them.
- "torch" / "chunked", "none": nothing; the backward op recomputes from the inputs.
- "fused": the device index, its count, the per-row statistics and the per-position gradient
  scale; the backward op runs the fused backward kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvsft_kernels.ops import function as _fn

_FWD = "dvsft_kernels::linear_cross_entropy"
_BWD = "dvsft_kernels::linear_cross_entropy_backward"


def _opts(label_smoothing, z_loss, softcap, chunk_rows, deterministic, grad_filter):
    return dict(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, chunk_rows=chunk_rows,
                deterministic=deterministic, grad_filter=grad_filter)


def _none(ref: Tensor) -> Tensor:
    """Placeholder for an absent auxiliary output or gradient."""
    return ref.new_empty(0, dtype=torch.float32)


def _fused_has_scale(reduction: str, token_weights) -> bool:
    return reduction == "mean" or token_weights is not None


@torch.library.custom_op(_FWD, mutates_args=())
def _lce_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, token_weights: Tensor | None,
    num_items: Tensor | None, ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
    softcap: float | None, impl: str, chunk_rows: int | None, grad_h: bool, grad_w: bool, grad_b: bool,
    deterministic: bool | None, grad_filter: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    opts = _opts(label_smoothing, z_loss, softcap, chunk_rows, deterministic, grad_filter)
    grads = (grad_h, grad_w, grad_b)
    out, row_loss, lse, correct, saved = _fn._forward_core(
        hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction, opts, impl, grads)
    if impl == "fused":
        _, _, _, _, idx, count, stat, scale = saved
        # clones: outputs may not alias each other or an input (scale can be token_weights itself)
        aux = (idx.clone(), count, stat, scale.clone(memory_format=torch.contiguous_format)
               if scale is not None else _none(hidden))
    elif reduction != "none" and any(grads):
        idx, dh, dW, db = saved
        if dh is not None:
            D = hidden.shape[-1]
            full = torch.zeros(targets.numel(), D, dtype=torch.float32, device=hidden.device)
            dh = full.index_copy_(0, idx, dh).reshape(hidden.shape)
        aux = tuple(x if x is not None else _none(hidden) for x in (dh, dW, db)) + (_none(hidden),)
    else:
        aux = tuple(_none(hidden) for _ in range(4))
    return (out, row_loss, lse, correct, *aux)


@_lce_forward.register_fake
def _(hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction, label_smoothing, z_loss,
      softcap, impl, chunk_rows, grad_h, grad_w, grad_b, deterministic, grad_filter):
    shape = targets.shape
    N, D, V = targets.numel(), hidden.shape[-1], weight.shape[0]
    f32 = dict(dtype=torch.float32)
    out = hidden.new_empty(shape if reduction == "none" else (), **f32)
    stats = (hidden.new_empty(shape, **f32), hidden.new_empty(shape, **f32),
             hidden.new_empty(shape, dtype=torch.bool))
    if impl == "fused":
        aux = (hidden.new_empty(N, dtype=torch.int32), hidden.new_empty(1, dtype=torch.int32),
               hidden.new_empty(2, N, **f32),
               hidden.new_empty(N, **f32) if _fused_has_scale(reduction, token_weights) else _none(hidden))
    elif reduction != "none" and (grad_h or grad_w or grad_b):
        aux = (hidden.new_empty(hidden.shape, **f32) if grad_h else _none(hidden),
               hidden.new_empty(V, D, **f32) if grad_w else _none(hidden),
               hidden.new_empty(V, **f32) if grad_b else _none(hidden), _none(hidden))
    else:
        aux = tuple(_none(hidden) for _ in range(4))
    return (out, *stats, *aux)


@torch.library.custom_op(_BWD, mutates_args=())
def _lce_backward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, token_weights: Tensor | None,
    g: Tensor, a0: Tensor, a1: Tensor, a2: Tensor, a3: Tensor, ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, softcap: float | None, impl: str, chunk_rows: int | None,
    grad_h: bool, grad_w: bool, grad_b: bool, deterministic: bool | None, grad_filter: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of hidden, weight, bias (empty where not requested) for "fused" (any reduction)
    and for "torch" / "chunked" with reduction "none" (recomputed from the inputs)."""
    opts = _opts(label_smoothing, z_loss, softcap, chunk_rows, deterministic, grad_filter)
    grads = (grad_h, grad_w, grad_b)
    dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    if impl == "fused":
        D = hidden.shape[-1]
        scale = a3 if _fused_has_scale(reduction, token_weights) else None
        saved = (hidden.reshape(-1, D), weight, bias, targets.reshape(-1).contiguous(), a0, a1, a2, scale)
    else:
        idx, t, h, w = _fn._compact_rows(hidden, targets, token_weights, ignore_index, weight.shape[0])
        saved = (idx, h, t, w, weight, bias)
    d = _fn._backward_core(saved, g, reduction, impl, opts, grads, hidden.shape, dtypes)
    return tuple(x if x is not None else _none(hidden) for x in d)


@_lce_backward.register_fake
def _(hidden, weight, bias, targets, token_weights, g, a0, a1, a2, a3, ignore_index, reduction, label_smoothing,
      z_loss, softcap, impl, chunk_rows, grad_h, grad_w, grad_b, deterministic, grad_filter):
    return (torch.empty_like(hidden) if grad_h else _none(hidden),
            torch.empty_like(weight) if grad_w else _none(hidden),
            torch.empty_like(bias) if grad_b else _none(hidden))


_ARG_NAMES = ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "impl", "chunk_rows",
              "grad_h", "grad_w", "grad_b", "deterministic", "grad_filter")


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, token_weights, _num_items = inputs[:6]
    ctx.args = dict(zip(_ARG_NAMES, inputs[6:]))
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.save_for_backward(hidden, weight, bias, targets, token_weights, *output[4:])


def _backward(ctx, g, _g_row, _g_lse, _g_correct, *_g_aux):
    hidden, weight, bias, targets, token_weights, a0, a1, a2, a3 = ctx.saved_tensors
    a = ctx.args
    grads = (a["grad_h"], a["grad_w"], a["grad_b"])
    if a["impl"] != "fused" and a["reduction"] != "none":
        g = g.float()
        hdtype, wdtype, bdtype = ctx.dtypes
        d = ((a0 * g).to(hdtype) if grads[0] else None, (a1 * g).to(wdtype) if grads[1] else None,
             (a2 * g).to(bdtype) if grads[2] else None)
    else:
        d = torch.ops.dvsft_kernels.linear_cross_entropy_backward(
            hidden, weight, bias, targets, token_weights, g, a0, a1, a2, a3, *(a[k] for k in _ARG_NAMES))
        d = tuple(x if need else None for x, need in zip(d, grads))
    return (*d,) + (None,) * (3 + len(_ARG_NAMES))


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


def lce_custom_op(hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction, opts, impl):
    """(loss, row_loss, lse, correct) through the custom op; the statistics come back detached."""
    grad_on = torch.is_grad_enabled()
    grad_h = grad_on and hidden.requires_grad
    grad_w = grad_on and weight.requires_grad
    grad_b = grad_on and bias is not None and bias.requires_grad
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        num_items = torch.tensor(num_items, dtype=torch.int64)
    out = torch.ops.dvsft_kernels.linear_cross_entropy(
        hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction,
        opts["label_smoothing"], opts["z_loss"], opts["softcap"], impl, opts["chunk_rows"],
        grad_h, grad_w, grad_b, opts["deterministic"], opts["grad_filter"])
    loss, row_loss, lse, correct = out[:4]
    return loss, row_loss.detach(), lse.detach(), correct
