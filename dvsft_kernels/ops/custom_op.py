"""`linear_cross_entropy` as a torch.library custom op, for torch.compile.

`function.linear_cross_entropy` calls `lce_custom_op` while dynamo traces (eager calls use the
autograd.Function). The op is opaque to the compiler: host synchronisations of the compacting
backends happen inside it, so `fullgraph=True` traces through, and the fake implementation gives
every output's shape from the input shapes alone. Forward and backward run the backends' code;
what the eager Function keeps on its context (with data-dependent shapes for the compacting
backends) becomes four fixed-shape auxiliary outputs, laid out by the backend (`op_forward`,
`fake_aux`): gradients formed in the forward ("torch", "chunked", run-time "auto"; mean / sum),
nothing ("none": the backward op recomputes), or the fused backend's index, count, row statistics
and gradient scale.

The schema lists the input tensors, the gradient switches, the backend's name and then every field
of `LCEOptions`, derived from the dataclass: a new option needs no edit here.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import torch

from dvsft_kernels.ops.backends import Forward, Grads, Inputs, Meta, get_backend
from dvsft_kernels.ops.backends.base import empty_aux
from dvsft_kernels.ops.options import LCEOptions

_LIB = torch.library.Library("dvsft_kernels", "FRAGMENT")
_FWD, _BWD = "linear_cross_entropy", "linear_cross_entropy_backward"
_SCALARS = {int: "int", float: "float", str: "str", bool: "bool"}


def _option_schema() -> str:
    """`LCEOptions`' fields as schema arguments: "int ignore_index, str reduction, float? softcap, ..."."""
    hints = typing.get_type_hints(LCEOptions)
    args = []
    for f in dataclasses.fields(LCEOptions):
        tp = hints[f.name]
        optional = isinstance(tp, types.UnionType) and type(None) in tp.__args__
        base = next(a for a in tp.__args__ if a is not type(None)) if optional else tp
        args.append(f"{_SCALARS[base]}{'?' if optional else ''} {f.name}")
    return ", ".join(args)


_HEAD = "Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? token_weights, Tensor? target_probs"
_SWITCHES = "bool grad_hidden, bool grad_weight, bool grad_bias, str backend"
_LIB.define(f"{_FWD}({_HEAD}, Tensor? num_items, {_SWITCHES}, {_option_schema()}) -> "
            "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIB.define(f"{_BWD}({_HEAD}, Tensor g, Tensor a0, Tensor a1, Tensor a2, Tensor a3, {_SWITCHES}, "
            f"{_option_schema()}) -> (Tensor, Tensor, Tensor)")


def _forward_impl(hidden, weight, bias, targets, token_weights, target_probs, num_items, gh, gw, gb, backend, *opts):
    x = Inputs(hidden, weight, bias, targets, token_weights, num_items, target_probs)
    fwd, aux = get_backend(backend).op_forward(x, LCEOptions(*opts), Grads(gh, gw, gb))
    return (*fwd, *aux)


def _forward_fake(hidden, weight, bias, targets, token_weights, target_probs, num_items, gh, gw, gb, backend, *opts):
    options = LCEOptions(*opts)
    x = Inputs(hidden, weight, bias, targets, token_weights, num_items, target_probs)
    shape = x.row_shape()
    f32 = torch.float32
    out = hidden.new_empty(shape if options.reduction == "none" else (), dtype=f32)
    stats = (hidden.new_empty(shape, dtype=f32), hidden.new_empty(shape, dtype=f32),
             hidden.new_empty(shape, dtype=torch.int64))
    return (out, *stats, *get_backend(backend).fake_aux(x, options, Grads(gh, gw, gb)))


def _backward_impl(hidden, weight, bias, targets, token_weights, target_probs, g, a0, a1, a2, a3, gh, gw, gb,
                   backend, *opts):
    """Gradients of hidden, weight, bias (empty where not requested), for backends whose autograd
    formula cannot use the auxiliary outputs directly."""
    x = Inputs(hidden, weight, bias, targets, token_weights, None, target_probs)
    d = get_backend(backend).op_backward(x, (a0, a1, a2, a3), g, LCEOptions(*opts), Grads(gh, gw, gb))
    return tuple(v if v is not None else empty_aux(hidden) for v in d)


def _backward_fake(hidden, weight, bias, targets, token_weights, target_probs, g, a0, a1, a2, a3, gh, gw, gb, backend, *opts):
    return (torch.empty_like(hidden) if gh else empty_aux(hidden),
            torch.empty_like(weight) if gw else empty_aux(hidden),
            torch.empty_like(bias) if gb else empty_aux(hidden))


_LIB.impl(_FWD, _forward_impl, "CompositeExplicitAutograd")
_LIB.impl(_BWD, _backward_impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"dvsft_kernels::{_FWD}", _forward_fake, lib=_LIB)
torch.library.register_fake(f"dvsft_kernels::{_BWD}", _backward_fake, lib=_LIB)

_N_INPUTS = 7  # hidden, weight, bias, targets, token_weights, target_probs, num_items


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, token_weights, target_probs, _ = inputs[:_N_INPUTS]
    ctx.rest = inputs[_N_INPUTS:]  # switches, backend, options
    ctx.meta = Meta(hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.save_for_backward(hidden, weight, bias, targets, token_weights, target_probs, *output[4:])


def _backward(ctx, g, *_unused):
    hidden, weight, bias, targets, token_weights, target_probs, *aux = ctx.saved_tensors
    gh, gw, gb, backend, *opts = ctx.rest
    grads, options = Grads(gh, gw, gb), LCEOptions(*opts)
    d = get_backend(backend).op_formula(tuple(aux), g, options, grads, ctx.meta)
    if d is None:
        d = torch.ops.dvsft_kernels.linear_cross_entropy_backward(
            hidden, weight, bias, targets, token_weights, target_probs, g, *aux, *ctx.rest)
        d = tuple(v if need else None for v, need in zip(d, grads))
    return (*d,) + (None,) * (len(ctx.rest) + _N_INPUTS - 3)


torch.library.register_autograd(f"dvsft_kernels::{_FWD}", _backward, setup_context=_setup_context, lib=_LIB)


def lce_custom_op(x: Inputs, options: LCEOptions, backend: str) -> Forward:
    """The op's outputs through the custom op; the statistics come back detached."""
    grad_on = torch.is_grad_enabled()
    grads = (grad_on and x.hidden.requires_grad, grad_on and x.weight.requires_grad,
             grad_on and x.bias is not None and x.bias.requires_grad)
    num_items = x.num_items
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        num_items = torch.tensor(num_items, dtype=torch.int64)
    out = torch.ops.dvsft_kernels.linear_cross_entropy(
        x.hidden, x.weight, x.bias, x.targets, x.token_weights, x.target_probs, num_items, *grads, backend,
        *dataclasses.astuple(options))
    loss, row_loss, lse, predicted = out[:4]
    return Forward(loss, row_loss.detach(), lse.detach(), predicted)
