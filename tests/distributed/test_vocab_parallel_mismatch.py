"""README: "A rank whose inputs disagree with the others' gets a ValueError on every rank, not a hang".

Each case gives one rank different inputs (hidden size, an option, an empty vocabulary slice, other
hidden values or targets, an input that fails validation there) and requires a ValueError on every
rank, then one more all-reduce: a rank left waiting in a collective would make it time out."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dvsft_kernels import DVLoss, linear_cross_entropy
from dvsft_kernels.ops.naive import naive_linear_cross_entropy

from .spawn import run_ranks

pytestmark = pytest.mark.timeout(240)

V, D = 40, 24


def _inputs(D=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 13, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.4
    b = torch.randn(V, generator=g)
    t = torch.randint(0, V, (3, 13), generator=g)
    t[torch.rand(3, 13, generator=g) < 0.3] = -100
    tw = torch.rand(3, 13, generator=g)
    return h, w, b, t, tw


def _first_labeled(t, k=0):
    return [tuple(p) for p in (t != -100).nonzero().tolist()][k]


def _case(name, rank, bounds):
    """(kwargs for linear_cross_entropy on this rank, regex of the error this rank must raise)."""
    h, w, b, t, tw = _inputs()
    lo, hi = bounds[rank]
    odd = rank == len(bounds) - 1  # the rank whose inputs differ
    kw = {"hidden": h, "weight": w[lo:hi], "targets": t}
    want = "^process_group: ranks disagree on .*"
    refused = rf"^process_group: rank\(s\) \[{len(bounds) - 1}\] refused"
    if name == "D":
        if odd:
            h2, w2, *_ = _inputs(D=D + 8)
            kw.update(hidden=h2, weight=w2[lo:hi])
        want += "D"
    elif name in ("label_smoothing", "z_loss", "softcap", "reduction", "ignore_index", "chunk_rows"):
        value = {"label_smoothing": (0.1, 0.2), "z_loss": (1e-3, 2e-3), "softcap": (3.0, None),
                 "reduction": ("mean", "sum"), "ignore_index": (-100, -1), "chunk_rows": (8, 16)}[name]
        if name == "chunk_rows":  # a private option of the stats entry point: the same check applies
            kw["_chunk_rows"] = value[odd]
        else:
            kw[name] = value[odd]
        want += name
    elif name == "bias":
        kw["bias"] = None if odd else b[lo:hi]
        want += "bias"
    elif name == "token_weights":
        kw["token_weights"] = tw * (1.5 if odd else 1.0)
        want += "token_weights"
    elif name == "num_items":
        kw["num_items"] = 41 if odd else 40
        want += "num_items"
    elif name == "hidden_value":  # one element of one labeled row
        if odd:
            h = h.clone()
            h[_first_labeled(t)][3] += 0.5
        kw["hidden"] = h
        want += "hidden"
    elif name == "hidden_rows_swapped":
        if odd:
            h = h.clone()
            a, c = _first_labeled(t, 0), _first_labeled(t, 1)
            h[a], h[c] = h[c].clone(), h[a].clone()
        kw["hidden"] = h
        want += "hidden"
    elif name == "targets_swapped":  # same multiset of targets, another order
        if odd:
            t = t.clone()
            a, c = _first_labeled(t, 0), _first_labeled(t, 1)
            if t[a] == t[c]:
                t[c] = (t[c] + 1) % V
            t[a], t[c] = t[c].clone(), t[a].clone()
        kw["targets"] = t
        want += "targets"
    elif name == "empty_slice":
        if odd:
            kw["weight"] = w[hi:hi]
        want = "^weight: vocabulary size" if odd else refused
    elif name == "invalid_dtype":  # fails validation on one rank only
        if odd:
            kw["targets"] = t.float()
        want = "^targets: expected an integer" if odd else refused
    else:
        raise AssertionError(name)
    return kw, want


CASES = ["D", "label_smoothing", "z_loss", "softcap", "reduction", "ignore_index", "chunk_rows", "bias",
         "token_weights", "num_items", "hidden_value", "hidden_rows_swapped", "targets_swapped", "empty_slice",
         "invalid_dtype"]


def _call(kw):
    from tests.ops.cases import lce_stats

    kw = dict(kw)
    h, w, t = kw.pop("hidden"), kw.pop("weight"), kw.pop("targets")
    h = h.clone().requires_grad_() if h.dtype.is_floating_point else h
    chunk = kw.pop("_chunk_rows", None)
    if chunk is not None:
        return lce_stats(h, w, t, impl="torch", chunk_rows=chunk,
                                               process_group=dist.group.WORLD, **kw).loss
    return linear_cross_entropy(h, w, t, impl="torch", process_group=dist.group.WORLD, **kw)


def _still_usable(world):
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == world


def _check_cases(rank, world, bounds, cases):
    for name in cases:
        kw, want = _case(name, rank, bounds)
        with pytest.raises(ValueError, match=want):
            _call(kw)
        _still_usable(world)
    # the same inputs everywhere still work, and agree with one process (no false alarm)
    h, w, b, t, tw = _inputs()
    lo, hi = bounds[rank]
    got = linear_cross_entropy(h, w[lo:hi], t, b[lo:hi], token_weights=tw, label_smoothing=0.1, impl="torch",
                               process_group=dist.group.WORLD)
    ref = naive_linear_cross_entropy(h.double(), w.double(), t, b.double(), token_weights=tw.double(),
                                     label_smoothing=0.1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_every_mismatch_fails_on_every_rank_two_ranks():
    run_ranks(2, _check_cases, [(0, 17), (17, V)], CASES)


def test_mismatch_on_one_of_three_ranks():
    run_ranks(3, _check_cases, [(0, 9), (9, 30), (30, V)],
              ["D", "hidden_value", "targets_swapped", "empty_slice", "softcap"])


def _check_hidden_outside_labeled_rows(rank, world):
    """Ranks may differ where nothing is labeled (those rows never reach the loss): no error."""
    h, w, _, t, _ = _inputs()
    if rank == 1:
        h = h.clone()
        h[t == -100] += 3.0
    lo, hi = (0, 17) if rank == 0 else (17, V)
    got = linear_cross_entropy(h, w[lo:hi], t, impl="torch", process_group=dist.group.WORLD)
    ref = naive_linear_cross_entropy(h.double(), w.double(), t)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_unlabeled_rows_may_differ():
    run_ranks(2, _check_hidden_outside_labeled_rows)


def _dvloss_inputs(seed):
    """hidden (2, 11, 16), a head, answer labels at the end and vision labels at positions 1-5."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 11, 16, generator=g)
    w = torch.randn(V, 16, generator=g) * 0.5
    labels = torch.full((2, 11), -100)
    labels[:, 8:] = torch.randint(0, V, (2, 3), generator=g)
    vision = torch.full((2, 11), -100)
    vision[:, 1:6] = torch.randint(0, V, (2, 5), generator=g)
    return h, w, labels, vision


def _check_dvloss(rank, world):
    """DVLoss(process_group=...): vision labels that differ on one rank raise on both."""
    h, w, labels, vision = _dvloss_inputs(1)
    if rank == 1:
        vision[0, 2] = (vision[0, 2] + 1) % V
    lo, hi = (0, 25) if rank == 0 else (25, V)
    with pytest.raises(ValueError, match="^process_group: ranks disagree on targets"):
        DVLoss(impl="torch", process_group=dist.group.WORLD)(h, w[lo:hi], labels, vision)
    _still_usable(world)


def test_dvloss_mismatch_fails_on_every_rank():
    run_ranks(2, _check_dvloss)


def _check_dvloss_refusal(rank, world):
    """DVLoss's own checks failing on one rank (a position in both streams, a bad item count, labels
    of another shape) raise on that rank with its message and on the others too, not a hang."""
    h, w, labels, vision = _dvloss_inputs(2)
    lo, hi = (0, 25) if rank == 0 else (25, V)
    loss = DVLoss(impl="torch", process_group=dist.group.WORLD)
    overlap = vision.clone()
    overlap[0, 7] = 3  # the shifted text target of labels[0, 8] lands on position 7
    cases = [
        ({"vision_labels": overlap}, "vision_labels: a position is a target in both"),
        ({"num_vision_items": -1}, "num_vision_items: expected a number >= 0"),
        ({"labels": labels[:, :10]}, "labels: expected shape"),
    ]
    for bad, own in cases:
        kw = {"labels": labels, "vision_labels": vision, **(bad if rank == 1 else {})}
        match = own if rank == 1 else r"^process_group: rank\(s\) \[1\] refused their inputs"
        with pytest.raises(ValueError, match=match):
            loss(h, w[lo:hi], kw.pop("labels"), kw.pop("vision_labels"), **kw)
        _still_usable(world)


def test_dvloss_refusal_on_one_rank_fails_on_every_rank():
    run_ranks(2, _check_dvloss_refusal)
