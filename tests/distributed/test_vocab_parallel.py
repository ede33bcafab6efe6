"""Vocabulary-parallel op (process_group=...) against the single-process op, on gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dvsft_kernels import linear_cross_entropy

from .spawn import run_ranks

pytestmark = pytest.mark.timeout(240)

OPTIONS = [
    {},
    {"bias": True, "label_smoothing": 0.1, "z_loss": 1e-3, "token_weights": True, "num_items": 40},
    {"softcap": 3.0, "bias": True},
]


def _inputs(seed, V, ignore_frac=0.3, bias=False, token_weights=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 13, 24, generator=g)
    w = torch.randn(V, 24, generator=g) * 0.4
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (3, 13), generator=g)
    t[torch.rand(3, 13, generator=g) < ignore_frac] = -100
    tw = torch.rand(3, 13, generator=g) if token_weights else None
    return h, w, b, t, tw


def _loss_and_grads(h, w, b, t, tw, reduction, opts, group=None):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    loss = linear_cross_entropy(h, w, t, b, reduction=reduction, token_weights=tw, impl="torch",
                                process_group=group, **opts)
    cot = torch.linspace(-1, 1, loss.numel()).reshape(loss.shape) if loss.dim() else torch.tensor(1.0)
    (loss * cot).sum().backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _check_matrix(rank, world, splits):
    V = sum(splits)
    lo = sum(splits[:rank])
    hi = lo + splits[rank]
    for seed, options in enumerate(OPTIONS):
        opts = dict(options)
        bias, tw = opts.pop("bias", False), opts.pop("token_weights", False)
        for ignore_frac in (0.3, 1.0):
            for reduction in ("mean", "sum", "none"):
                h, w, b, t, tws = _inputs(seed, V, ignore_frac, bias, tw)
                ref = _loss_and_grads(h, w, b, t, tws, reduction, opts)
                got = _loss_and_grads(h, w[lo:hi], b[lo:hi] if b is not None else None, t, tws, reduction, opts,
                                      group=dist.group.WORLD)
                where = f"rank {rank} splits {splits} {options} ignore {ignore_frac} {reduction}"
                torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6, msg=where)
                torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-6, msg=where)
                torch.testing.assert_close(got[2], ref[2][lo:hi], rtol=1e-4, atol=1e-6, msg=where)
                if b is not None:
                    torch.testing.assert_close(got[3], ref[3][lo:hi], rtol=1e-4, atol=1e-6, msg=where)


@pytest.mark.parametrize("splits", [[29, 38], [7, 50, 4]], ids=["2-ranks-uneven", "3-ranks-uneven"])
def test_matches_single_process(splits):
    run_ranks(len(splits), _check_matrix, splits)


def _check_dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    V = 61  # not divisible by 2: the last shard is smaller
    h, w, b, t, _ = _inputs(7, V, bias=True)
    ref = _loss_and_grads(h, w, b, t, None, "mean", {})
    wd = distribute_tensor(w.clone(), mesh, [Shard(0)]).requires_grad_()
    bd = distribute_tensor(b.clone(), mesh, [Shard(0)]).requires_grad_()
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, wd, t, bd, impl="torch")
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hh.grad, ref[1], rtol=1e-4, atol=1e-6)
    # the gradient is a DTensor with the weight's placements; gathered it equals the full gradient
    assert wd.grad.placements == wd.placements
    torch.testing.assert_close(wd.grad.full_tensor(), ref[2], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bd.grad.full_tensor(), ref[3], rtol=1e-4, atol=1e-6)


def test_dtensor_sharded_head():
    run_ranks(2, _check_dtensor)


def _check_mismatch(rank, world):
    h, w, _, t, _ = _inputs(0, 40)
    if rank == 1:
        t = t.clone()
        t[0, 0] = (t[0, 0].clamp_min(0) + 1) % 40  # different targets on one rank
    lo, hi = (0, 20) if rank == 0 else (20, 40)
    with pytest.raises(ValueError, match="^process_group"):
        linear_cross_entropy(h, w[lo:hi], t, impl="torch", process_group=dist.group.WORLD)
    # and the group is still usable afterwards: no rank is stuck in a collective
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == world


def test_mismatched_inputs_fail_on_every_rank_without_hanging():
    run_ranks(2, _check_mismatch)


def _check_dvloss(rank, world):
    from dvsft_kernels import DVLoss

    V, lo, hi = 40, (0, 25)[rank], (25, 40)[rank]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 11, 16, generator=g)
    w = torch.randn(V, 16, generator=g) * 0.5
    labels = torch.full((2, 11), -100)
    labels[:, 8:] = torch.randint(0, V, (2, 3), generator=g)
    vision = torch.full((2, 11), -100)
    vision[:, 1:6] = torch.randint(0, V, (2, 5), generator=g)
    ref = DVLoss(0.5, impl="torch")(h, w, labels, vision)
    got = DVLoss(0.5, impl="torch", process_group=dist.group.WORLD)(h, w[lo:hi], labels, vision)
    for k in ("loss", "text_loss", "vision_loss", "text_accuracy", "vision_accuracy"):
        torch.testing.assert_close(getattr(got, k), getattr(ref, k), rtol=1e-5, atol=1e-6, msg=k)


def test_dvloss_with_process_group():
    run_ranks(2, _check_dvloss)


def _check_refusals_and_second_backward(rank, world):
    V, lo, hi = 40, (0, 25)[rank], (25, 40)[rank]
    h, w, _, t, _ = _inputs(3, V)
    group = dist.group.WORLD
    # a Triton impl or grad_filter cannot run a vocabulary-parallel head: refused on every rank, not
    # silently replaced by the PyTorch path
    for impl in ("chunked", "fused"):
        with pytest.raises(ValueError, match=rf"^impl: '{impl}' cannot run a vocabulary-parallel head"):
            linear_cross_entropy(h, w[lo:hi], t, impl=impl, process_group=group)
    with pytest.raises(ValueError, match="^grad_filter: the vocabulary-parallel backend"):
        linear_cross_entropy(h, w[lo:hi], t, grad_filter=True, process_group=group)
    # the gradients are formed in the forward and scaled in place: a second backward raises
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, w[lo:hi], t, process_group=group)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        loss.backward()
    # the per-position statistics: the global argmax, as the single-process op finds it
    got = linear_cross_entropy(h, w[lo:hi], t, return_stats=True, process_group=group)
    ref = linear_cross_entropy(h, w, t, return_stats=True)
    labeled = t != -100
    assert torch.equal(got.predicted, ref.predicted) and bool((got.predicted[labeled] >= 0).all())
    assert torch.equal(got.predicted[labeled], (h @ w.T).argmax(-1)[labeled])
    assert torch.equal(got.correct, ref.correct)
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == world


def test_refusals_second_backward_and_predicted():
    run_ranks(2, _check_refusals_and_second_backward)
