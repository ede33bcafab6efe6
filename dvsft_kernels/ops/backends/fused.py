"""`impl="fused"`: no logits in device memory and no host synchronisation.

Labeled rows are indexed on the device (`build_index`: a cumulative sum and a scatter into a
buffer sized by the static number of positions N, plus the count as a device scalar), and the
Triton kernels gather hidden rows through that index, so hidden states are never copied. The
forward (`kernels/lce_fused_fwd.py`) keeps per-row max, sum-exp, target logit, argmax and the
smoothing sum over vocabulary splits and merges them; the backward (`kernels/lce_fused_bwd.py`)
recomputes each logit tile from the saved row max and log-sum-exp and forms dh (at the rows'
original positions) and dW, in one of two designs: atomic (float32 atomics from every tile, the
default) or staged (deterministic: G of a chunk of the vocabulary into a bounded buffer, then
two GEMMs without atomics).

Gradients are formed in the autograd backward for every reduction: the logits are recomputed there
in any case, so forming them in the forward (as the compacting implementations do) would save no
FLOPs and would hold float32 dh and dW from the forward to the backward.

Extra memory (beyond inputs, outputs and the float32 gradient accumulators dh (N, D) and, atomic
only, dW (V, D)): the index and per-row statistics, O(N), the forward partials, O(N x S_MIN + rows
in flight), and, staged only, the G buffer (max(FusedConfig.stage_bytes, N x stage_min_cols x 2 B):
64 MiB on CUDA up to N = 16384, then 4 KiB per position).

Soft targets (`Inputs.target_probs`): the index is built from slot 0, the kernels read the (N, K)
ids and probabilities by position (kernels/README.md, "Soft targets (fused)").

Differences from the compacting implementations, both so that nothing waits on the device:
- a target outside [0, V) (and not ignore_index; soft: in any slot) is not a ValueError: that row's
  loss and lse are NaN and it gets no gradient;
- the gradients are accumulated with float32 atomics, in any order, unless `deterministic` (default:
  `torch.are_deterministic_algorithms_enabled()`) selects the staged backward, see kernels/README.md.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from dvsft_kernels.ops.backends.base import Backend, Forward, Grads, Inputs, Meta, empty_aux
from dvsft_kernels.ops.backends.registry import register
from dvsft_kernels.ops.options import LCEOptions, mean_denominator, safe_reciprocal


def check_deterministic(deterministic: bool, device: torch.device) -> None:
    """The first deterministic backward (read-modify-write kernels) returned wrong gradients (NaN,
    garbage, an illegal address) on an H100 with Triton 3.6 while the interpreter passed it
    (benchmarks/results/2026-11-27-h100/, ops/kernels/README.md). Its replacement, the staged backward,
    has not run on a GPU yet: until it has, CUDA calls need DVSFT_FUSED_DETERMINISTIC=1, and the
    error names the deterministic alternative."""
    if deterministic and device.type == "cuda" and os.environ.get("DVSFT_FUSED_DETERMINISTIC") != "1":
        raise ValueError(
            "deterministic: the fused deterministic (staged) backward is disabled on CUDA until a GPU run "
            "verifies it (a first design returned wrong gradients on an H100). Use impl='chunked' "
            "(deterministic: cuBLAS products and a Triton pass without atomics), or deterministic=False; "
            "DVSFT_FUSED_DETERMINISTIC=1 runs it anyway, to verify it.")


def build_index(flat_t: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, count): idx[j] (int32, j < count) is the position of the j-th labeled target, in order;
    count a 1-element int32 device tensor. No host synchronisation: slots past count hold 0."""
    N = flat_t.numel()
    valid = flat_t != ignore_index
    pos = torch.cumsum(valid, 0, dtype=torch.int32) - 1
    # unlabeled positions all land in the dump slot N, cut off below
    dest = torch.where(valid, pos, N).long()
    idx = torch.zeros(N + 1, dtype=torch.int32, device=flat_t.device)
    idx.scatter_(0, dest, torch.arange(N, dtype=torch.int32, device=flat_t.device))
    count = valid.sum(dtype=torch.int32).reshape(1)
    return idx[:N], count


class FusedSaved(NamedTuple):
    h2: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    flat_t: torch.Tensor  # (N,) by position; soft targets: (N, K)
    idx: torch.Tensor
    count: torch.Tensor
    stat: torch.Tensor
    scale: torch.Tensor | None  # per-position gradient scale; None: 1 ("sum" / "none" unweighted)
    q: torch.Tensor | None = None  # soft targets: (N, K) float32 probabilities


def kernel_targets(x: Inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(targets, probabilities) as the kernels read them: (N,) and None for hard targets, else
    (N, K) contiguous int64 ids and float32 probabilities."""
    if x.target_probs is None:
        return x.targets.reshape(-1).contiguous(), None
    K = x.targets.shape[-1]
    return x.targets.reshape(-1, K).contiguous(), x.target_probs.reshape(-1, K).float().contiguous()


def has_scale(options: LCEOptions, token_weights) -> bool:
    return options.reduction == "mean" or token_weights is not None


def fused_forward_core(x: Inputs, options: LCEOptions, grads: Grads) -> tuple[Forward, FusedSaved]:
    """The op's forward on full positions, and what `fused_backward_core` needs."""
    from dvsft_kernels.ops.kernels import fused_config
    from dvsft_kernels.ops.kernels.lce_fused_fwd import fused_forward

    hidden, weight, bias, token_weights, num_items = x.hidden, x.weight, x.bias, x.token_weights, x.num_items
    D = hidden.shape[-1]
    h2 = hidden.reshape(-1, D)
    flat_t, q = kernel_targets(x)
    N = h2.shape[0]
    dev = hidden.device  # select_backend checked that it can run the kernels
    if any(grads):
        check_deterministic(options.wants_deterministic(), dev)  # at the call, not first in the backward
    idx, count = build_index(x.row_targets(), options.ignore_index)  # soft: slot 0 says labeled
    row_loss, lse, pred, stat = fused_forward(
        h2, weight, bias, flat_t, idx, count, **options.loss_terms(), target_probs=q,
        config=fused_config.default_config(dev, weight.dtype))
    tw = token_weights.reshape(-1).float() if token_weights is not None else None
    if options.reduction == "mean":
        inv = safe_reciprocal(mean_denominator(count, num_items, dev))
        scale = tw * inv if tw is not None else inv.expand(N)
    else:
        scale = tw
    shape = x.row_shape()
    if options.reduction == "none":
        out = row_loss * tw if tw is not None else row_loss.clone()
        out = out.reshape(shape)
    else:
        out = (row_loss * scale).sum() if scale is not None else row_loss.sum()
    fwd = Forward(out, row_loss.reshape(shape), lse.reshape(shape), pred.long().reshape(shape))
    return fwd, FusedSaved(h2, weight, bias, flat_t, idx, count, stat, scale, q)


def fused_backward_core(saved: FusedSaved, g, options: LCEOptions, grads: Grads, meta: Meta, *,
                        cast: bool = True):
    """Gradients for the upstream gradient g of the op's first output (a scalar for mean / sum,
    shaped like targets for none); in the inputs' dtypes, or as the kernels return them (`cast`
    False: dh float32 (N, D) by position, dW / db float32 or, staged, in the weight's dtype)."""
    from dvsft_kernels.ops.kernels import fused_config
    from dvsft_kernels.ops.kernels.lce_fused_bwd import fused_backward

    g = g.float()
    scale = saved.scale
    if options.reduction == "none":
        g = g.reshape(-1)
        scale = g * scale if scale is not None else g
    else:
        scale = scale * g if scale is not None else g.expand(saved.h2.shape[0])
    det = options.wants_deterministic()
    check_deterministic(det, saved.h2.device)
    dh, dW, db = fused_backward(
        saved.h2, saved.weight, saved.bias, saved.flat_t, saved.idx, saved.count, saved.stat, scale,
        **options.loss_terms(),
        grad_h=grads.hidden, grad_w=grads.weight, grad_b=grads.bias, deterministic=det,
        grad_filter=options.grad_filter, target_probs=saved.q, config=fused_config.default_config(saved.h2.device, saved.weight.dtype),
    )
    if not cast:
        return dh, dW, db
    return (dh.to(meta.hidden_dtype).reshape(meta.hidden_shape) if grads.hidden else None,
            dW.to(meta.weight_dtype) if grads.weight else None,
            db.to(meta.bias_dtype) if grads.bias else None)


@register
class FusedBackend(Backend):
    """Forms the gradients in the backward, for every reduction (module docstring)."""

    name = "fused"

    def forward(self, x: Inputs, options: LCEOptions, grads: Grads):
        return fused_forward_core(x, options, grads)

    def backward(self, saved, g, options: LCEOptions, grads: Grads, meta: Meta):
        return fused_backward_core(saved, g, options, grads, meta)

    # custom op: the device index, its count, the per-row statistics and the gradient scale
    def op_forward(self, x: Inputs, options: LCEOptions, grads: Grads):
        fwd, s = fused_forward_core(x, options, grads)
        # clones: outputs may not alias each other or an input (scale can be token_weights itself)
        scale = s.scale.clone(memory_format=torch.contiguous_format) if s.scale is not None else empty_aux(x.hidden)
        return fwd, (s.idx.clone(), s.count, s.stat, scale)

    def fake_aux(self, x: Inputs, options: LCEOptions, grads: Grads):
        ref, N = x.hidden, math.prod(x.row_shape())
        return (ref.new_empty(N, dtype=torch.int32), ref.new_empty(1, dtype=torch.int32),
                ref.new_empty(2, N, dtype=torch.float32),
                ref.new_empty(N, dtype=torch.float32) if has_scale(options, x.token_weights) else empty_aux(ref))

    def op_backward(self, x: Inputs, aux, g, options: LCEOptions, grads: Grads):
        idx, count, stat, scale = aux
        D = x.hidden.shape[-1]
        flat_t, q = kernel_targets(x)
        saved = FusedSaved(x.hidden.reshape(-1, D), x.weight, x.bias, flat_t, idx, count,
                           stat, scale if has_scale(options, x.token_weights) else None, q)
        return self.backward(saved, g, options, grads, Meta.of(x))
