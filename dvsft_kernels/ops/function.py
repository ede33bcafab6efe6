"""Autograd Function and impl dispatch for `linear_cross_entropy` (docs/linear_cross_entropy.md).

"torch" and "chunked" compact the labeled rows first (one host sync: the row count sizes the
work), so ignored rows are never projected. For "mean" and "sum" the gradients are computed in the
forward, chunk by chunk, with each row's gradient scale known in advance (w_i / n or w_i); backward
only multiplies by the incoming scalar. For "none" the per-row upstream gradient is known only in
backward, so backward recomputes the logits (8 n D V FLOPs in all instead of 6).

"fused" (ops/fused.py) indexes the labeled rows on the device instead and never synchronises; it
recomputes the logits in backward for every reduction.

Under torch.compile the op runs as the custom op of ops/custom_op.py (same forward and backward
code, registered with torch.library), so `torch.compile(fullgraph=True)` traces through it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from dvsft_kernels.ops.torch_impl import lce_torch
from dvsft_kernels.ops.vocab_parallel import refusing_on_error

_REDUCTIONS = ("mean", "sum", "none")
_IMPLS = ("auto", "torch", "chunked", "fused")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class LCEOutput:
    """`loss` is differentiable; the rest are detached per-position statistics shaped like
    `targets`: `row_loss` (ce + z_loss * lse**2, before token weights), `lse`, `correct` (argmax of
    the logits equals the target); 0 / False at ignored positions."""

    loss: torch.Tensor
    row_loss: torch.Tensor
    lse: torch.Tensor
    correct: torch.Tensor


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _no_host_sync_allowed() -> bool:
    """A CUDA graph is being captured, or torch.compile is tracing (its CUDA-graph modes capture
    the compiled step): an implementation that waits on the device cannot run there."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation for `impl` on `device`.

    "auto": CPU or no Triton: "torch". CUDA: "fused" when no host synchronisation is allowed
    (stream capture, torch.compile), since "chunked" syncs once per call to size its work;
    otherwise "chunked", 1.9-2.6x faster than "fused" at every row count measured on an H100
    (512 to 16384 rows, kernels/README.md "impl=auto").
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda" and _triton_available():
            return "fused" if _no_host_sync_allowed() else "chunked"
        return "torch"
    if impl in ("chunked", "fused"):
        if not _triton_available():
            raise ValueError(f"impl: {impl!r} needs the triton package (pip install triton)")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"impl: {impl!r} runs Triton kernels and needs CUDA tensors "
                "(or TRITON_INTERPRET=1 for testing); use impl='torch' on CPU"
            )
    return impl


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _validate(hidden, weight, targets, bias, ignore_index, reduction, token_weights, label_smoothing,
              z_loss, softcap, num_items):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError("hidden: expected a tensor of shape (..., D)")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden: expected float16, bfloat16 or float32, got {hidden.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight: expected a 2-D tensor of shape (V, D)")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: on {weight.device}, hidden on {hidden.device}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not match hidden size D={hidden.shape[-1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight: vocabulary size V must be > 0")
    if not isinstance(targets, torch.Tensor):
        raise ValueError("targets: expected a tensor")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected an integer dtype, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets: shape {tuple(targets.shape)} != hidden's leading shape {tuple(hidden.shape[:-1])}")
    if targets.device != hidden.device:
        raise ValueError(f"targets: on {targets.device}, hidden on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},)")
        if bias.device != hidden.device:
            raise ValueError(f"bias: on {bias.device}, hidden on {hidden.device}")
        if not bias.dtype.is_floating_point:
            raise ValueError(f"bias: expected a floating dtype, got {bias.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor) or tuple(token_weights.shape) != tuple(targets.shape):
            raise ValueError(f"token_weights: expected a tensor of shape {tuple(targets.shape)}")
        if not token_weights.dtype.is_floating_point:
            raise ValueError(f"token_weights: expected a floating dtype, got {token_weights.dtype}")
        if token_weights.device != hidden.device:
            raise ValueError(f"token_weights: on {token_weights.device}, hidden on {hidden.device}")
    for name, val in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if not isinstance(val, (int, float)) or isinstance(val, bool) or not (val >= 0) or val != val or val == float("inf"):
            raise ValueError(f"{name}: expected a finite number >= 0, got {val!r}")
    if label_smoothing > 1:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing!r}")
    if softcap is not None:
        if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not (softcap > 0) or softcap == float("inf"):
            raise ValueError(f"softcap: expected None or a finite number > 0, got {softcap!r}")
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.dim() != 0:
                raise ValueError("num_items: expected an int or a 0-dim tensor")
        elif not isinstance(num_items, int) or isinstance(num_items, bool):
            raise ValueError(f"num_items: expected an int or a 0-dim tensor, got {type(num_items).__name__}")
        elif num_items < 0:
            raise ValueError(f"num_items: expected >= 0, got {num_items}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")


_COMPACT_OPTS = ("label_smoothing", "z_loss", "softcap", "chunk_rows", "need_correct")


def _run_impl(impl, h, weight, bias, t, scale, opts, grad_h, grad_w, grad_b):
    kw = {k: opts[k] for k in _COMPACT_OPTS if k in opts}
    vp = opts.get("vocab_parallel")
    if vp is not None:
        from dvsft_kernels.ops.vocab_parallel import lce_torch_vocab_parallel

        coll, start, total = vp
        return lce_torch_vocab_parallel(h, weight, bias, t, scale, coll=coll, vocab_start=start, vocab_total=total,
                                        **kw, grad_h=grad_h, grad_w=grad_w, grad_b=grad_b)
    if impl == "chunked":
        from dvsft_kernels.ops.chunked import lce_chunked

        return lce_chunked(h, weight, bias, t, scale, **kw, grad_h=grad_h, grad_w=grad_w, grad_b=grad_b)
    return lce_torch(h, weight, bias, t, scale, **kw, grad_h=grad_h, grad_w=grad_w, grad_b=grad_b)


def _compact_rows(hidden, targets, token_weights, ignore_index, V):
    """(idx, t, h, w): positions of the labeled targets (a host sync sizes them), their targets
    (int64, range-checked), hidden rows and float32 token weights (or None)."""
    D = hidden.shape[-1]
    flat_t = targets.reshape(-1)
    idx = (flat_t != ignore_index).nonzero().squeeze(1)
    t = flat_t.index_select(0, idx).long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
        raise ValueError(f"targets: values must lie in [0, {V}) or equal ignore_index={ignore_index}")
    h = hidden.reshape(-1, D).index_select(0, idx)
    w = token_weights.reshape(-1).index_select(0, idx).float() if token_weights is not None else None
    return idx, t, h, w


def _compact_forward(hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction, opts, impl,
                     grads):
    """Forward of "torch" / "chunked": (out, row_loss, lse, correct) shaped as the op returns them,
    and the tensors `_compact_backward` needs."""
    shape = targets.shape
    vp = opts.get("vocab_parallel")
    V = vp[2] if vp is not None else weight.shape[0]
    idx, t, h, w = _compact_rows(hidden, targets, token_weights, ignore_index, V)
    n = t.numel()
    N = targets.numel()

    if reduction == "mean":
        denom = torch.as_tensor(n if num_items is None else num_items, device=hidden.device,
                                dtype=torch.float32)
        # n == 0 (or num_items == 0): loss 0 and zero gradients, never NaN
        inv = torch.where(denom > 0, 1.0 / denom.clamp_min(1e-30), torch.zeros_like(denom))
        scale = inv.expand(n) if w is None else w * inv
    else:
        scale = w if w is not None else torch.ones(n, device=hidden.device, dtype=torch.float32)

    grad_h, grad_w, grad_b = grads
    precompute = reduction != "none" and (grad_h or grad_w or grad_b)
    row_loss, lse, correct, dh, dW, db = _run_impl(
        impl, h, weight, bias, t, scale, opts,
        grad_h and precompute, grad_w and precompute, grad_b and precompute,
    )

    def scatter(v, fill_dtype):
        out = torch.zeros(N, dtype=fill_dtype, device=hidden.device)
        return out.index_copy_(0, idx, v.to(fill_dtype)).reshape(shape)

    row_loss_full = scatter(row_loss, torch.float32)
    weighted = row_loss * scale if reduction != "none" else (row_loss * w if w is not None else row_loss)
    if reduction == "none":
        out = scatter(weighted, torch.float32)
    else:
        out = weighted.sum()
    lse_full = scatter(lse, torch.float32)
    correct_full = scatter(correct, torch.bool)
    saved = (idx, h, t, w, weight, bias) if reduction == "none" else (idx, dh, dW, db)
    return out, row_loss_full, lse_full, correct_full, saved


def _compact_backward(saved, g, reduction, impl, opts, grads, hidden_shape, dtypes):
    grad_h, grad_w, grad_b = grads
    hdtype, wdtype, bdtype = dtypes
    if reduction == "none":
        idx, h, t, w, weight, bias = saved
        gs = g.reshape(-1).index_select(0, idx).float()
        scale = gs * w if w is not None else gs
        _, _, _, dh, dW, db = _run_impl(impl, h, weight, bias, t, scale, opts, grad_h, grad_w, grad_b)
        g = None
    else:
        idx, dh, dW, db = saved
        g = g.float()
        # the usual upstream gradient of a loss is exactly 1 (checked for free on CPU): then the
        # saved gradients are the answer
        if g.device.type == "cpu" and g.item() == 1.0:
            g = None

    def out(x, dtype):
        """x * g in dtype in one pass: the multiply writes the cast result (a float32 dW scaled in
        place, then cast, would move 7 B per element instead of 3 for a 16-bit weight)."""
        if g is None:
            return x.to(dtype)
        if x.dtype == dtype:
            return x.mul_(g)
        return torch.mul(x, g, out=torch.empty(x.shape, dtype=dtype, device=x.device))

    d_hidden = d_weight = d_bias = None
    if grad_h:
        D = hidden_shape[-1]
        d_hidden = torch.zeros(math.prod(hidden_shape[:-1]), D, dtype=hdtype, device=dh.device)
        d_hidden.index_copy_(0, idx, out(dh, hdtype))
        d_hidden = d_hidden.reshape(hidden_shape)
    if grad_w:
        d_weight = out(dW, wdtype)
    if grad_b:
        d_bias = out(db, bdtype)
    return d_hidden, d_weight, d_bias


def _forward_core(hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction, opts, impl,
                  grads):
    if impl == "fused" and opts.get("vocab_parallel") is None:
        from dvsft_kernels.ops import fused

        return fused.forward_core(hidden, weight, bias, targets, token_weights, num_items, ignore_index,
                                  reduction, opts, grads)
    return _compact_forward(hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction, opts,
                            impl, grads)


def _backward_core(saved, g, reduction, impl, opts, grads, hidden_shape, dtypes):
    if impl == "fused" and opts.get("vocab_parallel") is None:
        from dvsft_kernels.ops import fused

        return fused.backward_core(saved, g, reduction, opts, grads, hidden_shape, dtypes)
    return _compact_backward(saved, g, reduction, impl, opts, grads, hidden_shape, dtypes)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction, opts, impl):
        need = ctx.needs_input_grad
        grads = (bool(need[0]), bool(need[1]), bool(bias is not None and need[2]))
        out, row_loss, lse, correct, saved = _forward_core(
            hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction, opts, impl, grads)
        ctx.reduction = reduction
        ctx.meta = (hidden.shape, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype), impl, opts)
        ctx.grads = grads
        if any(grads):
            ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(row_loss, lse, correct)
        return out, row_loss, lse, correct

    @staticmethod
    def backward(ctx, g, _g_row, _g_lse, _g_correct):
        hshape, dtypes, impl, opts = ctx.meta
        if ctx.reduction != "none" and impl != "fused":
            # the saved gradients are scaled in place: a second backward would see them scaled
            if getattr(ctx, "consumed", False):
                raise RuntimeError("linear_cross_entropy: backward through the same graph twice is not "
                                   "supported for reduction='mean'/'sum'; run the forward again")
            ctx.consumed = True
        d_hidden, d_weight, d_bias = _backward_core(ctx.saved_tensors, g, ctx.reduction, impl, opts, ctx.grads,
                                                    hshape, dtypes)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None


def linear_cross_entropy_with_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items: int | torch.Tensor | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
    deterministic: bool | None = None,
    grad_filter: bool = False,
    process_group=None,
    _need_correct: bool = True,
) -> LCEOutput:
    """`linear_cross_entropy` plus the per-position statistics of the same pass (for DVLoss).

    Options of the Triton implementations: `chunk_rows` ("torch", "chunked": rows per logits
    chunk); `deterministic` ("fused": bitwise repeatable gradients; None follows
    `torch.are_deterministic_algorithms_enabled()`); `grad_filter` ("fused": skip gradient tiles
    below the output dtype's resolution, error bound in kernels/README.md; a ValueError with
    impl="torch" or "chunked", and ignored when "auto" picks one of them).

    `process_group`: vocabulary-parallel LM head (ops/vocab_parallel.py): each rank passes the same
    hidden, targets and options and its own contiguous slice of the head's rows; targets are
    global ids. A weight that is a DTensor sharded on dim 0 implies its mesh's group."""
    weight, bias, process_group = _unwrap_vocab_sharded(weight, bias, process_group)
    # with a process group, the other ranks wait in the agreement check: a refusal here reaches them
    with refusing_on_error(process_group, hidden):
        _validate(hidden, weight, targets, bias, ignore_index, reduction, token_weights, label_smoothing,
                  z_loss, softcap, num_items)
        if deterministic is not None and not isinstance(deterministic, bool):
            raise ValueError(f"deterministic: expected None or a bool, got {deterministic!r}")
        if not isinstance(grad_filter, bool):
            raise ValueError(f"grad_filter: expected a bool, got {grad_filter!r}")
        if grad_filter and impl in ("torch", "chunked"):
            raise ValueError(f"grad_filter: only impl='fused' filters gradient tiles, got impl={impl!r}")
        impl = resolve_impl(impl, hidden.device)
    if token_weights is not None:
        token_weights = token_weights.detach()
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.detach()
    opts = dict(label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                softcap=None if softcap is None else float(softcap), chunk_rows=chunk_rows,
                deterministic=deterministic, grad_filter=grad_filter)
    if not _need_correct:
        opts["need_correct"] = False  # the public loss-only call: `correct` is not returned
    if process_group is not None:
        if torch.compiler.is_compiling():
            raise ValueError("process_group: the vocabulary-parallel op is not traceable by torch.compile")
        opts["vocab_parallel"] = _vocab_parallel_setup(process_group, hidden, weight, bias, targets, token_weights,
                                                       num_items, ignore_index, reduction, opts)
    if torch.compiler.is_compiling():
        from dvsft_kernels.ops.custom_op import lce_custom_op

        loss, row_loss, lse, correct = lce_custom_op(
            hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction, opts, impl)
    else:
        if not torch.is_grad_enabled():
            # needs_input_grad ignores grad mode: without this an eval loop under no_grad would form
            # (and the fused path would refuse or check) gradients nobody asked for
            hidden, weight = hidden.detach(), weight.detach()
            bias = bias.detach() if bias is not None else None
        loss, row_loss, lse, correct = LinearCrossEntropyFunction.apply(
            hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction, opts, impl
        )
    return LCEOutput(loss, row_loss, lse, correct)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items: int | torch.Tensor | None = None,
    impl: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `targets`, computed only at labeled
    positions and without materialising the logits. See docs/linear_cross_entropy.md.

    Returns float32: a scalar for "mean" / "sum", a tensor shaped like `targets` for "none".
    With `process_group`, `weight` (and `bias`) are this rank's slice of a vocabulary-parallel head
    (see `linear_cross_entropy_with_stats`).
    """
    return linear_cross_entropy_with_stats(
        hidden, weight, targets, bias, ignore_index=ignore_index, reduction=reduction,
        token_weights=token_weights, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        num_items=num_items, impl=impl, process_group=process_group, _need_correct=False,
    ).loss


def _unwrap_vocab_sharded(weight, bias, process_group):
    """A DTensor head sharded on the vocabulary dimension becomes its local slice (autograd-aware:
    the gradient comes back as a DTensor with the same placements) and its mesh's group."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return weight, bias, process_group
    if not isinstance(weight, DTensor):
        if isinstance(bias, DTensor):
            raise ValueError("bias: a DTensor bias needs a DTensor weight")
        return weight, bias, process_group
    if weight.device_mesh.ndim != 1 or len(weight.placements) != 1 or weight.placements[0] != Shard(0):
        raise ValueError(f"weight: a DTensor head must be sharded as [Shard(0)] on a 1-D mesh, got "
                         f"{weight.placements} on a {weight.device_mesh.ndim}-D mesh; call .full_tensor() first")
    group = weight.device_mesh.get_group()
    if process_group is not None and process_group != group:
        raise ValueError("process_group: differs from the group of the DTensor weight's mesh")
    if isinstance(bias, DTensor):
        if bias.placements != weight.placements:
            raise ValueError(f"bias: placements {bias.placements} differ from the weight's {weight.placements}")
        bias = bias.to_local()
    return weight.to_local(), bias, group


def _vocab_parallel_setup(group, hidden, weight, bias, targets, token_weights, num_items, ignore_index, reduction,
                         opts):
    from dvsft_kernels.ops.vocab_parallel import Collectives, vocab_layout

    start, total = vocab_layout(group, hidden, weight, bias, targets, token_weights, num_items, ignore_index,
                                reduction, opts)
    return Collectives(group), start, total
