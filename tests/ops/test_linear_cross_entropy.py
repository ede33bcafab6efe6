"""`linear_cross_entropy` against the float64 spec (ops/naive.py) under the error rule of tests/ops/errors.py."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dvsft_kernels import linear_cross_entropy
from dvsft_kernels.ops.naive import naive_linear_cross_entropy
from tests.ops.cases import lce_stats

from .cases import OPTION_SETS, check_against_spec, make_case, reference, run, to_device
from .errors import assert_error_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def torch_impl(chunk_rows=None):
    def fn(*a, **k):
        return lce_stats(*a, **k, impl="torch", chunk_rows=chunk_rows).loss
    return fn


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_impl_matches_spec(dtype, ignore_frac, reduction, options):
    case = make_case(ignore_frac=ignore_frac, options=OPTION_SETS[options], reduction=reduction,
                     seed=zlib.crc32(f"{options}/{reduction}".encode()) % 1000)  # hash() varies per process
    # chunk of 16 rows: several chunks, the last one partial
    got = check_against_spec(case, dtype, torch_impl(chunk_rows=16))
    if ignore_frac == 1.0:
        for key in ("loss", "hidden", "weight", "bias"):
            if got[key] is not None:
                assert torch.count_nonzero(got[key]) == 0, f"{key} must be exactly zero when all ignored"


@pytest.mark.parametrize("options", ["plain", "all"])
def test_public_function_default_chunking(options):
    case = make_case(lead=(2, 61), D=40, V=1031, options=OPTION_SETS[options])
    check_against_spec(case, torch.float32, linear_cross_entropy)


def test_stats_match_spec():
    case = make_case(options={"softcap": 4.0, "bias": True})
    # random targets are almost never the argmax: make every third labeled one the spec's argmax
    # (softcap is monotone) so that `correct` holds both values and its equality is a check
    top = (case.hidden @ case.weight.T + case.bias).argmax(-1)
    pick = (case.targets != -100) & (torch.arange(case.targets.numel()).reshape(case.targets.shape) % 3 == 0)
    case.targets[pick] = top[pick]
    out = lce_stats(case.hidden.float(), case.weight.float(), case.targets,
                                          case.bias.float(), softcap=4.0, impl="torch", chunk_rows=8)
    _, lse, correct = naive_linear_cross_entropy(case.hidden, case.weight, case.targets, case.bias,
                                                 softcap=4.0, return_stats=True)
    torch.testing.assert_close(out.lse, lse.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.correct, correct)
    assert correct.any() and not correct.all()
    # predicted: the spec's argmax at every labeled position (checked beyond the rows where it is
    # the target), -1 at ignored ones
    labeled = case.targets != -100
    assert torch.equal(out.predicted[labeled], top[labeled]) and bool((out.predicted[~labeled] == -1).all())
    ref_rows = naive_linear_cross_entropy(case.hidden, case.weight, case.targets, case.bias, softcap=4.0,
                                          reduction="none")
    torch.testing.assert_close(out.row_loss, ref_rows.float(), rtol=1e-5, atol=1e-5)


def test_argmax_accuracy_counts_correct_rows():
    # make the target the argmax on purpose for half of the rows: accuracy must see exactly those
    D, V = 16, 50
    weight = torch.eye(V, D) * 10
    hidden = torch.zeros(20, D)
    targets = torch.arange(20) % D
    hidden[torch.arange(20), targets] = 1.0
    targets[10:] = (targets[10:] + 1) % D
    out = lce_stats(hidden, weight, targets, impl="torch")
    assert out.correct[:10].all() and not out.correct[10:].any()


@pytest.mark.parametrize("impl", ["torch"])
def test_all_ignored_is_zero_not_nan(impl):
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    t = torch.full((4,), -100)
    for reduction in ("mean", "sum", "none"):
        for num_items in (None, 0, torch.tensor(0)):
            loss = linear_cross_entropy(h, w, t, b, reduction=reduction, num_items=num_items, impl=impl)
            assert torch.isfinite(loss).all() and torch.count_nonzero(loss) == 0
            loss.sum().backward()
            for p in (h, w, b):
                assert p.grad is not None and torch.count_nonzero(p.grad) == 0
                p.grad = None


def test_num_items_zero_with_labeled_rows_is_zero():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.arange(5), num_items=0, impl="torch")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_num_items_tensor_and_int_agree():
    case = make_case(options={"num_items": 123})
    a = run(torch_impl(), case, torch.float32)
    case.kwargs["num_items"] = torch.tensor(123)
    b = run(torch_impl(), case, torch.float32)
    for key in ("loss", "hidden", "weight"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_non_contiguous_inputs_and_any_leading_shape():
    case = make_case(lead=(2, 3, 11), D=24, V=97, options={"bias": True, "token_weights": True})
    ref = reference(case)
    # transposed storage for hidden and weight, strided targets
    h = case.hidden.float().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    w = case.weight.float().T.contiguous().T.requires_grad_()
    assert not h.is_contiguous() and not w.is_contiguous()
    t_big = torch.stack([case.targets, case.targets], -1)
    t = t_big[..., 0]
    assert not t.is_contiguous()
    b = case.bias.float().requires_grad_()
    loss = linear_cross_entropy(h, w, t, b, token_weights=case.token_weights.float(), impl="torch")
    loss.backward()
    torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), ref["hidden"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), ref["weight"], rtol=1e-4, atol=1e-6)


def test_tied_weight_gets_both_gradients():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 16)
    ids = torch.randint(0, 50, (3, 7))
    targets = torch.randint(0, 50, (3, 7))
    targets[:, 0] = -100
    grads = []
    for impl in ("naive", "torch"):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids))
        if impl == "naive":
            loss = naive_linear_cross_entropy(hidden.double(), emb.weight.double(), targets)
        else:
            loss = linear_cross_entropy(hidden, emb.weight, targets, impl="torch")
        loss.backward()
        grads.append(emb.weight.grad.clone().double())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bias_grad", [True, False])
def test_bias_with_and_without_grad(bias_grad):
    case = make_case(options={"bias": True})
    h = case.hidden.float().requires_grad_()
    w = case.weight.float().requires_grad_()
    b = case.bias.float().requires_grad_(bias_grad)
    loss = linear_cross_entropy(h, w, case.targets, b, impl="torch")
    loss.backward()
    assert (b.grad is not None) == bias_grad
    ref = reference(case)
    torch.testing.assert_close(h.grad.double(), ref["hidden"], rtol=1e-4, atol=1e-6)


def test_frozen_weight_skips_weight_gradient():
    case = make_case()
    h = case.hidden.float().requires_grad_()
    w = case.weight.float()  # frozen head (LoRA): no dW work, no grad
    linear_cross_entropy(h, w, case.targets, impl="torch").backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad.double(), reference(case)["hidden"], rtol=1e-4, atol=1e-6)


def test_no_grad_inputs_forward_only():
    case = make_case(options={"bias": True})
    with torch.no_grad():
        loss = linear_cross_entropy(case.hidden.float(), case.weight.float(), case.targets, case.bias.float(),
                                    impl="torch")
    torch.testing.assert_close(loss.double(), reference(case)["loss"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- property test
@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    D=st.integers(1, 40),
    V=st.integers(1, 300),
    ignore_frac=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    bias=st.booleans(),
    softcap=st.sampled_from([None, 0.5, 30.0]),
    z_loss=st.sampled_from([0.0, 1e-2]),
    label_smoothing=st.sampled_from([0.0, 0.05, 1.0]),
    token_weights=st.booleans(),
    num_items=st.sampled_from([None, 0, 1, 17]),
    chunk_rows=st.sampled_from([None, 1, 3, 64]),
    seed=st.integers(0, 2**16),
)
def test_property_torch_impl(lead, D, V, ignore_frac, reduction, bias, softcap, z_loss, label_smoothing,
                             token_weights, num_items, chunk_rows, seed):
    opts = {"bias": bias, "z_loss": z_loss, "label_smoothing": label_smoothing, "token_weights": token_weights}
    if softcap is not None:
        opts["softcap"] = softcap
    if num_items is not None:
        opts["num_items"] = num_items
    case = make_case(lead=tuple(lead), D=D, V=V, ignore_frac=ignore_frac, options=opts, reduction=reduction,
                     seed=seed)
    check_against_spec(case, torch.float32, torch_impl(chunk_rows))


# ---------------------------------------------------------------- validation
def _args():
    return torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))


@pytest.mark.parametrize(
    "mutate, name",
    [
        (lambda a: a.update(hidden=torch.randn(4, 8, dtype=torch.float64)), "hidden"),
        (lambda a: a.update(hidden=torch.randint(0, 3, (4, 8))), "hidden"),
        (lambda a: a.update(weight=torch.randn(11, 9)), "weight"),
        (lambda a: a.update(weight=torch.randn(11, 8, dtype=torch.bfloat16)), "weight"),
        (lambda a: a.update(weight=torch.randn(88)), "weight"),
        (lambda a: a.update(targets=torch.randint(0, 11, (5,))), "targets"),
        (lambda a: a.update(targets=torch.rand(4)), "targets"),
        (lambda a: a.update(targets=torch.tensor([0, 1, 11, 2])), "targets"),
        (lambda a: a.update(targets=torch.tensor([0, 1, -1, 2])), "targets"),
        (lambda a: a.update(bias=torch.randn(10)), "bias"),
        (lambda a: a.update(reduction="avg"), "reduction"),
        (lambda a: a.update(impl="cuda"), "impl"),
        (lambda a: a.update(impl="chunked_typo"), "impl"),
        (lambda a: a.update(label_smoothing=-0.1), "label_smoothing"),
        (lambda a: a.update(label_smoothing=1.5), "label_smoothing"),
        (lambda a: a.update(z_loss=-1.0), "z_loss"),
        (lambda a: a.update(z_loss=float("nan")), "z_loss"),
        (lambda a: a.update(softcap=0.0), "softcap"),
        (lambda a: a.update(softcap=-3.0), "softcap"),
        (lambda a: a.update(token_weights=torch.ones(5)), "token_weights"),
        (lambda a: a.update(num_items=-1), "num_items"),
        (lambda a: a.update(num_items=torch.ones(2)), "num_items"),
        (lambda a: a.update(num_items=2.5), "num_items"),
        (lambda a: a.update(ignore_index=None), "ignore_index"),
    ],
)
def test_invalid_input_names_the_argument(mutate, name):
    h, w, t = _args()
    kw = {"hidden": h, "weight": w, "targets": t}
    mutate(kw)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        linear_cross_entropy(**kw)


def test_chunked_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, t = _args()
    with pytest.raises(ValueError, match="^impl"):
        linear_cross_entropy(h, w, t, impl="chunked")


# ---------------------------------------------------------------- impl="chunked" (Triton)
def _chunked_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import os
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _on_device(case):
    return to_device(case, "cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.interpreter
@pytest.mark.skipif(not _chunked_available(), reason="needs triton and CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("options, ignore_frac", [("plain", 0.3), ("all", 0.3), ("all", 1.0), ("plain", 0.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_impl_matches_spec(dtype, reduction, options, ignore_frac):
    # odd shapes: 37 rows in chunks of 16 (last chunk partial), V = 517 not a multiple of any tile
    case = _on_device(make_case(lead=(37,), ignore_frac=ignore_frac, options=OPTION_SETS[options],
                                reduction=reduction, seed=11))

    def fn(*a, **k):
        return lce_stats(*a, **k, impl="chunked", chunk_rows=16).loss

    check_against_spec(case, dtype, fn)


@pytest.mark.interpreter
@pytest.mark.skipif(not _chunked_available(), reason="needs triton and CUDA or TRITON_INTERPRET=1")
def test_chunked_stats_match_torch_impl():
    case = _on_device(make_case(lead=(29,), options={"softcap": 4.0}, seed=5))
    args = (case.hidden.float(), case.weight.float(), case.targets)
    a = lce_stats(*args, softcap=4.0, impl="chunked", chunk_rows=8)
    b = lce_stats(*args, softcap=4.0, impl="torch", chunk_rows=8)
    torch.testing.assert_close(a.lse, b.lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.row_loss, b.row_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.correct, b.correct)
    top = (case.hidden.double() @ case.weight.double().T).argmax(-1)
    labeled = case.targets != -100
    assert torch.equal(a.predicted, b.predicted) and torch.equal(a.predicted[labeled].cpu(), top[labeled].cpu())
    assert bool((a.predicted[~labeled] == -1).all())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss_with_negative_lse_takes_the_explicit_gradient_path(reduction):
    # a large z-loss and very negative logits make 1 + 2 z_loss lse <= 0 on some rows, where the
    # torch impl cannot fold the row factor into its GEMMs
    case = make_case(lead=(31,), options={"bias": True, "z_loss": 0.5}, reduction=reduction)
    case.bias = case.bias - 12.0
    check_against_spec(case, torch.float32, torch_impl(chunk_rows=8))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_upstream_gradient_other_than_one(reduction):
    case = make_case(options={"bias": True}, reduction=reduction)
    got = run(lambda *a, **k: 2.5 * linear_cross_entropy(*a, **k, impl="torch"), case, torch.float32)
    ref = run(lambda *a, **k: 2.5 * naive_linear_cross_entropy(*a, **k), case, torch.float64)
    base = run(lambda *a, **k: 2.5 * naive_linear_cross_entropy(*a, **k, upcast_dtype=torch.float32), case,
               torch.float32)
    for key in ("hidden", "weight", "bias"):
        assert_error_rule(key, got[key], ref[key], base[key], torch.float32)


def test_second_backward_is_a_clear_error():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.arange(5), impl="torch") * 2
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
