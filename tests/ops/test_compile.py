"""torch.compile(fullgraph=True) over models that call the op (ops/custom_op.py), and the custom
op's own forward / backward against the eager autograd.Function."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

from dvsft_kernels import linear_cross_entropy
from dvsft_kernels.ops.backends import Inputs
from dvsft_kernels.ops.custom_op import lce_custom_op
from dvsft_kernels.ops.naive import naive_linear_cross_entropy
from dvsft_kernels.ops.options import LCEOptions

from .cases import OPTION_SETS, lce_stats, make_case, run, to_device
from .errors import assert_error_rule

_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


class Head(torch.nn.Module):
    """A tiny LM tail: a projection, then the op against the head's weight."""

    def __init__(self, d=24, v=97, impl="auto", **op_kwargs):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, v, bias=False)
        self.impl, self.op_kwargs = impl, op_kwargs

    def forward(self, x, targets):
        h = torch.tanh(self.proj(x))
        return linear_cross_entropy(h, self.head.weight, targets, impl=self.impl, **self.op_kwargs)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _step(model, x, t):
    model.zero_grad()
    loss = model(x, t)
    loss.sum().backward()
    return loss.detach(), _grads(model)


def _naive_step(model, x, t, dtype, upcast_dtype):
    """The model's step with the op replaced by the spec (ops/naive.py), parameters and input cast
    to dtype, the loss upcast after the head to upcast_dtype."""
    m = copy.deepcopy(model).to(dtype)
    m.zero_grad()
    h = torch.tanh(m.proj(x.to(dtype)))
    loss = naive_linear_cross_entropy(h, m.head.weight, t, upcast_dtype=upcast_dtype, **m.op_kwargs)
    loss.sum().backward()
    return loss.detach(), _grads(m)


def assert_step_matches_spec(model, x, t, loss, grads):
    """A step's loss and parameter gradients (of `model`, in its dtype) under the error rule: the
    float64 spec as the reference, plain PyTorch in the model's dtype (upcast to float32 after
    the head) as the baseline; a tolerance relative to each gradient's own magnitude."""
    dtype = model.head.weight.dtype
    ref_loss, ref_grads = _naive_step(model, x, t, torch.float64, torch.float64)
    base_loss, base_grads = _naive_step(model, x, t, dtype, torch.float32)
    assert_error_rule("loss", loss.cpu(), ref_loss.cpu(), base_loss.cpu(), loss.dtype)
    for (name, _), g, r, b in zip(model.named_parameters(), grads, ref_grads, base_grads):
        assert_error_rule(name, g.cpu(), r.cpu(), b.cpu(), g.dtype)


@pytest.mark.parametrize("reduction, kwargs", [
    ("mean", {}),
    ("sum", {"label_smoothing": 0.1, "softcap": 5.0}),
    ("none", {"z_loss": 1e-3}),
])
def test_compile_fullgraph_cpu(reduction, kwargs):
    torch.manual_seed(0)
    model = Head(reduction=reduction, **kwargs)
    x = torch.randn(3, 9, 24)
    t = torch.randint(0, 97, (3, 9))
    t[:, :2] = -100
    ref_loss, ref_grads = _step(model, x, t)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, grads = _step(compiled, x, t)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_fullgraph_inductor_cpu():
    torch.manual_seed(0)
    model = Head()
    x = torch.randn(2, 7, 24)
    t = torch.randint(0, 97, (2, 7))
    t[0, 0] = -100
    ref_loss, ref_grads = _step(model, x, t)
    loss, grads = _step(torch.compile(model, fullgraph=True), x, t)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_compile_stats_token_weights_num_items_tensor():
    """DVLoss's use of the op: per-position weights, a tensor num_items, the statistics."""
    torch.manual_seed(1)
    d, v = 16, 50
    weight = torch.nn.Parameter(torch.randn(v, d) * 0.3)
    hidden = torch.randn(2, 8, d, requires_grad=True)
    targets = torch.randint(0, v, (2, 8))
    targets[:, :3] = -100
    tw = torch.rand(2, 8)

    def f(h, w, t, tw, n):
        out = lce_stats(h, w, t, reduction="mean", token_weights=tw, num_items=n)
        return out.loss, out.correct.sum() / (t != -100).sum(), out.lse, out.row_loss

    ref = f(hidden, weight, targets, tw, torch.tensor(7))
    ref[0].backward()
    ref_grads = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(hidden, weight, targets, tw, torch.tensor(7))
    got[0].backward()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, ref_grads[1], rtol=1e-5, atol=1e-7)


_IMPLS = ["torch"] + (["chunked", "fused"] if (_INTERPRETER or torch.cuda.is_available()) else [])


@pytest.mark.filterwarnings("ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_custom_op_matches_function(impl, reduction):
    """The custom op path (used under torch.compile) gives the eager Function's loss, statistics
    and gradients, and passes torch.library's consistency checks (fake shapes, autograd)."""
    case = make_case(lead=(2, 13), options=OPTION_SETS["all"], reduction=reduction, seed=3)
    if impl != "torch" and torch.cuda.is_available():
        to_device(case, "cuda")

    def via_op(h, w, t, b, **kw):
        x = Inputs(h, w, b, t, kw.pop("token_weights"), kw.pop("num_items"))
        return lce_custom_op(x, LCEOptions(**kw, impl=impl, deterministic=True), impl)[0]

    def via_function(*a, **k):
        return lce_stats(*a, **k, impl=impl, deterministic=True).loss

    a = run(via_op, case, torch.float32)
    b = run(via_function, case, torch.float32)
    for key in ("loss", "hidden", "weight", "bias"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)

    h = case.hidden.float().requires_grad_()
    w = case.weight.float().requires_grad_()
    bias = case.bias.float().requires_grad_()
    options = LCEOptions(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, impl=impl,
                         deterministic=True)
    args = (h, w, bias, case.targets, case.token_weights.float(), None, torch.tensor(50), True, True, True, impl,
            *dataclasses.astuple(options))
    torch.library.opcheck(torch.ops.dvsft_kernels.linear_cross_entropy.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.skipif(not (_INTERPRETER or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")
def test_compile_fullgraph_fused():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Head(impl="fused", softcap=4.0).to(device)
    x = torch.randn(2, 11, 24, device=device)
    t = torch.randint(0, 97, (2, 11), device=device)
    t[:, 3] = -100
    ref_loss, ref_grads = _step(model, x, t)
    loss, grads = _step(torch.compile(model, fullgraph=True, backend="aot_eager"), x, t)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_reduce_overhead_cuda():
    """Inductor with CUDA graphs: "auto" picks "fused" inside the custom op while the graph is
    captured (it never syncs), "chunked" in the warm-up runs."""
    torch.manual_seed(0)
    model = Head(d=64, v=1000).cuda().to(torch.bfloat16)
    x = torch.randn(4, 33, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (4, 33), device="cuda")
    t[:, ::4] = -100
    ref_loss, ref_grads = _step(model, x, t)
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, recording, replay
        loss, grads = _step(compiled, x, t)
    # the replayed backward (the fused kernels inside the graph) against the spec, and against eager
    assert_step_matches_spec(model, x, t, loss, grads)
    assert_step_matches_spec(model, x, t, ref_loss, ref_grads)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_default_mode_chunked_cuda():
    """Inductor without CUDA graphs: impl="chunked" (which syncs inside the custom op) compiles
    with fullgraph=True and matches eager (README: the faster choice when nothing is captured)."""
    torch.manual_seed(0)
    model = Head(d=64, v=1000, impl="chunked").cuda().to(torch.bfloat16)
    x = torch.randn(4, 33, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (4, 33), device="cuda")
    t[:, ::4] = -100
    ref_loss, ref_grads = _step(model, x, t)
    loss, grads = _step(torch.compile(model, fullgraph=True), x, t)
    assert_step_matches_spec(model, x, t, loss, grads)
    assert_step_matches_spec(model, x, t, ref_loss, ref_grads)


def _bf16_head_step(device):
    """The CUDA tests' model, input and eager step, on `device`."""
    torch.manual_seed(0)
    model = Head(d=64, v=1000, impl="torch").to(device).to(torch.bfloat16)
    x = torch.randn(4, 33, 64, device=device, dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (4, 33), device=device)
    t[:, ::4] = -100
    return model, x, t, *_step(model, x, t)


def test_step_spec_check_catches_planted_faults():
    """The CUDA compile tests' comparison (assert_step_matches_spec), dry-run on CPU with the same
    bf16 model and eager impl="torch": the real step passes, and each planted fault fails it: the
    head's gradient 10 % off (whole, or on every fourth vocabulary row), one of its target rows
    zeroed, the projection's bias gradient dropped, the loss 10 % off. (The former tolerance,
    rtol 5e-2 + atol 5e-3 on gradients whose largest entry is ~2e-2, let both 10 % faults through.)"""
    model, x, t, loss, grads = _bf16_head_step("cpu")
    assert_step_matches_spec(model, x, t, loss, grads)
    names = [n for n, _ in model.named_parameters()]
    head = names.index("head.weight")
    row = int(t[t != -100][0])

    def rows_10pct(g):
        g = g.clone()
        g[1::4] *= 1.1
        return g

    def zero_row(g):
        g = g.clone()
        g[row] = 0
        return g

    planted = {"head 10 %": (head, lambda g: g * 1.1), "head rows 10 %": (head, rows_10pct),
               "head target row zeroed": (head, zero_row),
               "proj bias dropped": (names.index("proj.bias"), torch.zeros_like)}
    for what, (i, fault) in planted.items():
        bad = list(grads)
        bad[i] = fault(grads[i])
        with pytest.raises(AssertionError, match=rf"^{names[i]}: "):
            assert_step_matches_spec(model, x, t, loss, bad)
            pytest.fail(f"{what}: not caught")
    with pytest.raises(AssertionError, match="^loss: "):
        assert_step_matches_spec(model, x, t, loss * 1.1, grads)
