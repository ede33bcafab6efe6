"""`linear_cross_entropy`: input checks, the backend choice and the autograd Function
(docs/linear_cross_entropy.md).

The backends (ops/backends/) compute; this module checks the tensors, builds the `LCEOptions`,
asks `select_backend` which backend runs the call, and wraps it in autograd. Under torch.compile
the call goes through the custom op of ops/custom_op.py instead (same backends, registered with
torch.library), so `torch.compile(fullgraph=True)` traces through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvsft_kernels.ops.backends import Backend, Grads, Inputs, Meta, select_backend
from dvsft_kernels.ops.backends.vocab_parallel import refusing_on_error
from dvsft_kernels.ops.custom_op import lce_custom_op
from dvsft_kernels.ops.options import (
    FLOAT_DTYPES,
    LCEOptions,
    check_num_items,
    no_host_sync_allowed,
    safe_reciprocal,
)


@dataclass
class LCEStats:
    """`linear_cross_entropy(..., return_stats=True)`. `loss` is differentiable; the rest are
    detached per-position statistics shaped like the positions (`targets`, or its leading shape
    with soft targets): `row_loss` (ce + z_loss * lse**2, before token weights; with soft targets
    the weighted sum over the targets), `lse`, `predicted` (the argmax token id of the logits,
    first index on ties) and `correct` (predicted == target, or == the highest-weight target);
    0 / -1 / False at ignored positions."""

    loss: torch.Tensor
    row_loss: torch.Tensor
    lse: torch.Tensor
    correct: torch.Tensor
    predicted: torch.Tensor


def _check_tensors(hidden, weight, targets, bias, token_weights, target_weights=None) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError("hidden: expected a tensor of shape (..., D)")
    if hidden.dtype not in FLOAT_DTYPES:
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
    lead = tuple(hidden.shape[:-1])
    if target_weights is None and tuple(targets.shape) != lead:
        raise ValueError(f"targets: shape {tuple(targets.shape)} != hidden's leading shape {lead}")
    if target_weights is not None:
        _check_soft_targets(targets, target_weights, lead, hidden.device)
    if targets.device != hidden.device:
        raise ValueError(f"targets: on {targets.device}, hidden on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},)")
        if bias.device != hidden.device:
            raise ValueError(f"bias: on {bias.device}, hidden on {hidden.device}")
        if not bias.dtype.is_floating_point:
            raise ValueError(f"bias: expected a floating dtype, got {bias.dtype}")
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor) or tuple(token_weights.shape) != lead:
            raise ValueError(f"token_weights: expected a tensor of shape {lead}")
        if not token_weights.dtype.is_floating_point:
            raise ValueError(f"token_weights: expected a floating dtype, got {token_weights.dtype}")
        if token_weights.device != hidden.device:
            raise ValueError(f"token_weights: on {token_weights.device}, hidden on {hidden.device}")


def _check_soft_targets(targets, target_weights, lead: tuple, device) -> None:
    if not isinstance(target_weights, torch.Tensor):
        raise ValueError("target_weights: expected a tensor of shape (..., K) or None")
    if target_weights.dim() != len(lead) + 1 or tuple(target_weights.shape[:-1]) != lead:
        raise ValueError(f"target_weights: shape {tuple(target_weights.shape)} is not (*{lead}, K) "
                         "(hidden's leading shape, then K targets per position)")
    if target_weights.shape[-1] < 1:
        raise ValueError("target_weights: K (the last dimension) must be >= 1")
    if tuple(targets.shape) != tuple(target_weights.shape):
        raise ValueError(f"targets: shape {tuple(targets.shape)} != target_weights' {tuple(target_weights.shape)} "
                         "(with target_weights, targets holds K ids per position)")
    if not target_weights.dtype.is_floating_point:
        raise ValueError(f"target_weights: expected a floating dtype, got {target_weights.dtype}")
    if target_weights.device != device:
        raise ValueError(f"target_weights: on {target_weights.device}, hidden on {device}")
    # one host sync, skipped where none is allowed (CUDA graph capture, torch.compile tracing)
    if not no_host_sync_allowed() and target_weights.numel():
        tw = target_weights.detach()
        if not bool((torch.isfinite(tw) & (tw >= 0)).all()):
            raise ValueError("target_weights: expected finite values >= 0")


def soft_targets(targets: torch.Tensor, target_weights: torch.Tensor, ignore_index: int):
    """What the backends take for soft targets: (targets (..., K) ordered by weight, highest first,
    with unused slots holding the row's top target; target_probs (..., K) float32, the weights
    over their row sum (0 for unused slots and for rows of total 0); total (...) float32, that sum).
    A position whose slots are all ignore_index keeps ignore_index in every slot, so slot 0 alone
    says whether a row is labeled, and predicted == slot 0 whether it is correct. The row loss is
    total * (the loss for target_probs), so total joins the token weights."""
    used = targets != ignore_index
    w = torch.where(used, target_weights.detach().float(), 0.0)
    order = torch.where(used, w, -1.0).argsort(dim=-1, descending=True, stable=True)
    t, w, used = targets.gather(-1, order), w.gather(-1, order), used.gather(-1, order)
    t = torch.where(used, t, t[..., :1]).long()
    total = w.sum(-1)
    return t, w * safe_reciprocal(total)[..., None], total


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, num_items, target_probs, options: LCEOptions,
                backend: Backend):
        need = ctx.needs_input_grad
        grads = Grads(bool(need[0]), bool(need[1]), bool(bias is not None and need[2]))
        x = Inputs(hidden, weight, bias, targets, token_weights, num_items, target_probs)
        fwd, saved = backend.forward(x, options, grads)
        ctx.backend, ctx.options, ctx.grads, ctx.meta = backend, options, grads, Meta.of(x)
        ctx.saved_type = type(saved)
        if any(grads):
            ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(fwd.row_loss, fwd.lse, fwd.predicted)
        return tuple(fwd)

    @staticmethod
    def backward(ctx, g, *_unused):
        if ctx.backend.saves_gradients(ctx.options):
            # the saved gradients are scaled in place: a second backward would see them scaled
            if getattr(ctx, "consumed", False):
                raise RuntimeError("linear_cross_entropy: backward through the same graph twice is not "
                                   "supported for reduction='mean'/'sum'; run the forward again")
            ctx.consumed = True
        saved = ctx.saved_type(*ctx.saved_tensors)
        d_hidden, d_weight, d_bias = ctx.backend.backward(saved, g, ctx.options, ctx.grads, ctx.meta)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


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
    chunk_rows: int | None = None,
    deterministic: bool | None = None,
    grad_filter: bool = False,
    return_stats: bool = False,
    process_group=None,
    target_weights: torch.Tensor | None = None,
) -> torch.Tensor | LCEStats:
    """Cross-entropy of `hidden @ weight.T + bias` against `targets`, computed only at labeled
    positions and without materialising the logits. See docs/linear_cross_entropy.md.

    Returns float32: a scalar for "mean" / "sum", a tensor shaped like `targets` for "none"; with
    `return_stats=True` an `LCEStats` holding that loss and the per-position statistics.

    `chunk_rows`: rows per logits chunk ("torch", "chunked", vocabulary-parallel; None sizes it
    from a memory budget). `deterministic` ("fused"): bitwise repeatable gradients; None follows
    `torch.are_deterministic_algorithms_enabled()`. `grad_filter` ("fused"): skip gradient tiles
    below the output dtype's resolution (error bound in ops/kernels/README.md); a ValueError with
    impl="torch" or "chunked", ignored when "auto" picks one of them.

    `process_group`: vocabulary-parallel LM head (ops/backends/vocab_parallel.py): each rank passes
    the same hidden, targets and options and its own contiguous slice of the head's rows; targets
    are global ids. A weight that is a DTensor sharded on dim 0 implies its mesh's group.

    `target_weights` (soft targets): shape (..., K) float >= 0 with `targets` (..., K) ids; slots
    equal to `ignore_index` are unused and a position with no used slot is ignored. The row loss is
    sum_k w_k * (ce(t_k) + z_loss * lse**2): one lse per row, K = 1 with weight 1 is the hard op;
    "mean" divides by the number of labeled positions (or `num_items`). Outputs and statistics are
    shaped like the positions, and `correct` compares with the highest-weight target.
    """
    weight, bias, process_group = _unwrap_vocab_sharded(weight, bias, process_group)
    # with a process group, the other ranks wait in the agreement check: a refusal here reaches them
    with refusing_on_error(process_group, hidden):
        _check_tensors(hidden, weight, targets, bias, token_weights, target_weights)
        options = LCEOptions(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                             z_loss=z_loss, softcap=softcap, impl=impl, chunk_rows=chunk_rows,
                             deterministic=deterministic, grad_filter=grad_filter, return_stats=return_stats)
        check_num_items(num_items)
        backend = select_backend(impl, hidden.device, options, process_group)
    if token_weights is not None:
        token_weights = token_weights.detach()
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.detach()
    target_probs = total = None
    if target_weights is not None:
        targets, target_probs, total = soft_targets(targets, target_weights, ignore_index)
        token_weights = total if token_weights is None else token_weights.float() * total
    x = Inputs(hidden, weight, bias, targets, token_weights, num_items, target_probs)
    backend.prepare(x, options)
    if torch.compiler.is_compiling():
        fwd = lce_custom_op(x, options, backend.name)
    else:
        if not torch.is_grad_enabled():
            # needs_input_grad ignores grad mode: without this an eval loop under no_grad would form
            # (and the fused path would refuse or check) gradients nobody asked for
            hidden, weight = hidden.detach(), weight.detach()
            bias = bias.detach() if bias is not None else None
        fwd = LinearCrossEntropyFunction.apply(hidden, weight, bias, targets, token_weights, num_items,
                                               target_probs, options, backend)
    loss, row_loss, lse, predicted = fwd
    if not return_stats:
        return loss
    if target_probs is not None:
        row_loss = row_loss * total  # the backends' row loss is that of target_probs (sum 1)
        targets = targets[..., 0]  # the highest-weight target; ignore_index where the row is unused
    correct = (predicted == targets) & (targets != ignore_index)
    return LCEStats(loss, row_loss, lse, correct, predicted)


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
