"""Inputs and runners shared by the op tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvsft_kernels import linear_cross_entropy
from dvsft_kernels.ops.naive import naive_linear_cross_entropy

from .errors import assert_error_rule

OPTION_SETS = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 4.0},
    "z_loss": {"z_loss": 1e-3},
    "smoothing": {"label_smoothing": 0.1},
    "token_weights": {"token_weights": True},
    "num_items": {"num_items": 50},
    "all": {"bias": True, "softcap": 4.0, "z_loss": 1e-3, "label_smoothing": 0.1, "token_weights": True,
            "num_items": 50},
}


@dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    bias: torch.Tensor | None
    token_weights: torch.Tensor | None
    kwargs: dict
    cotangent: torch.Tensor  # for reduction="none"


def make_case(*, lead=(3, 37), D=72, V=517, ignore_frac=0.3, options=None, reduction="mean",
              seed=0, ignore_index=-100) -> Case:
    """Float64 master inputs; logits of a realistic spread (std ~3) so softmax is neither flat
    nor one-hot."""
    options = dict(options or {})
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * (3.0 / D**0.5)
    targets = torch.randint(0, V, lead, generator=g)
    drop = torch.rand(lead, generator=g) < ignore_frac
    if ignore_frac >= 1.0:
        drop[:] = True
    targets[drop] = ignore_index
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if options.pop("bias", False) else None
    tw = torch.rand(lead, generator=g, dtype=torch.float64) * 2 if options.pop("token_weights", False) else None
    cot = torch.randn(lead, generator=g, dtype=torch.float64)
    kwargs = dict(options, reduction=reduction, ignore_index=ignore_index)
    return Case(hidden, weight, targets, bias, tw, kwargs, cot)


def to_device(case: Case, device) -> Case:
    """The case with its tensors moved to device (in place; returned for chaining)."""
    for name in ("hidden", "weight", "bias", "targets", "token_weights", "cotangent"):
        v = getattr(case, name)
        if v is not None:
            setattr(case, name, v.to(device))
    return case


def run(fn, case: Case, dtype: torch.dtype, **extra):
    """Loss and gradients of fn on the case's inputs cast to dtype (leaves of their own)."""
    h = case.hidden.to(dtype, copy=True).requires_grad_()
    w = case.weight.to(dtype, copy=True).requires_grad_()
    b = case.bias.to(dtype, copy=True).requires_grad_() if case.bias is not None else None
    tw = case.token_weights.to(torch.float32 if dtype != torch.float64 else dtype) \
        if case.token_weights is not None else None
    loss = fn(h, w, case.targets, b, token_weights=tw, **case.kwargs, **extra)
    if loss.dim() == 0:
        loss.backward()
    else:
        (loss * case.cotangent.to(loss.dtype)).sum().backward()
    return {
        "loss": loss.detach(),
        "hidden": h.grad,
        "weight": w.grad,
        "bias": b.grad if b is not None else None,
    }


def quantized(case: Case, dtype: torch.dtype) -> Case:
    """The case with its float inputs rounded to dtype (and kept in float64), so that the
    reference sees exactly the inputs the implementation sees: input rounding is not error."""
    def q(t):
        return None if t is None else t.to(dtype).to(torch.float64)
    tw_dtype = torch.float32 if dtype != torch.float64 else dtype
    tw = None if case.token_weights is None else case.token_weights.to(tw_dtype).double()
    return Case(q(case.hidden), q(case.weight), case.targets, q(case.bias), tw, case.kwargs, case.cotangent)


def reference(case: Case, dtype: torch.dtype = torch.float64):
    """float64 spec on the inputs rounded to dtype."""
    return run(naive_linear_cross_entropy, quantized(case, dtype), torch.float64)


def baseline(case: Case, dtype: torch.dtype):
    """Plain PyTorch in the input dtype, upcast to float32 after the head (the HF way)."""
    return run(lambda *a, **k: naive_linear_cross_entropy(*a, **k, upcast_dtype=torch.float32), case, dtype)


def check_against_spec(case: Case, dtype: torch.dtype, fn):
    """fn's loss and gradients on the case in dtype, each of the output dtype and within the error
    rule of the float64 spec (baseline: plain PyTorch in dtype); returns them."""
    got = run(fn, case, dtype)
    ref = reference(case, dtype)
    base = baseline(case, dtype)
    for key in ("loss", "hidden", "weight", "bias"):
        if ref[key] is None:
            assert got[key] is None
            continue
        out_dtype = torch.float32 if key == "loss" else dtype
        assert got[key].dtype == out_dtype, f"{key}: dtype {got[key].dtype}"
        assert_error_rule(key, got[key].cpu(), ref[key].cpu(), base[key].cpu(), out_dtype)
    return got


def lce_stats(*args, **kwargs):
    """The op with its per-position statistics (`return_stats=True`)."""
    return linear_cross_entropy(*args, **kwargs, return_stats=True)
