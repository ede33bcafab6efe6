"""Soft targets (`target_weights`) on a vocabulary-parallel head, on gloo ranks: against the float64
spec under the error rule (tests/ops/errors.py) with uneven slices and rows whose slots lie in
different ranks' slices, ranks that disagree on soft targets, K or the probabilities (a ValueError on
every rank, no hang), and planted faults the comparison must catch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dvsft_kernels import linear_cross_entropy
from dvsft_kernels.ops.backends import vocab_parallel
from dvsft_kernels.ops.naive import naive_linear_cross_entropy

from ..ops.cases import OPTION_SETS, baseline, reference, run
from ..ops.errors import assert_error_rule
from ..ops.test_soft_targets import soft_case
from .spawn import run_ranks

pytestmark = pytest.mark.timeout(240)

V = 517  # soft_case's vocabulary


def _bounds(splits, rank):
    lo = sum(splits[:rank])
    return lo, lo + splits[rank]


def _sharded_fn(lo, hi):
    """The op on rows [lo, hi) of the head (the leaf is the whole head: its gradient outside the
    slice stays 0 and is not compared)."""
    def fn(h, w, t, b, **kw):
        return linear_cross_entropy(h, w[lo:hi], t, b[lo:hi] if b is not None else None, impl="torch",
                                    chunk_rows=16, process_group=dist.group.WORLD, **kw)
    return fn


def _compare(case, dtype, lo, hi) -> None:
    """The op on this rank's slice against the float64 spec (loss, dh; dW and db on the slice).
    All collectives run before the first comparison, so a failure on one rank leaves no other
    rank waiting."""
    got = run(_sharded_fn(lo, hi), case, dtype)
    ref, base = reference(case, dtype), baseline(case, dtype)
    for key in ("loss", "hidden", "weight", "bias"):
        if ref[key] is None:
            assert got[key] is None, key
            continue
        g, r, b = got[key], ref[key], base[key]
        if key in ("weight", "bias"):
            g, r, b = g[lo:hi], r[lo:hi], b[lo:hi]
        out_dtype = torch.float32 if key == "loss" else dtype
        assert g.dtype == out_dtype, f"{key}: dtype {g.dtype}"
        assert_error_rule(key, g, r, b, out_dtype)


def _coverage(case, splits) -> tuple[bool, bool]:
    """(some row has used slots in two ranks' slices, some row repeats an id): what the case must
    exercise."""
    t = case.targets.reshape(-1, case.targets.shape[-1])
    used = t != case.kwargs["ignore_index"]
    owner = torch.bucketize(t, torch.tensor(splits).cumsum(0), right=True)
    lo_owner = torch.where(used, owner, len(splits)).amin(1)
    hi_owner = torch.where(used, owner, -1).amax(1)
    spans = bool((used.any(1) & (lo_owner != hi_owner)).any())
    dup = any(len(set(r[u].tolist())) < int(u.sum()) for r, u in zip(t, used))
    return spans, dup


def _check_matrix(rank, world, splits):
    lo, hi = _bounds(splits, rank)
    failures = []
    combos = [(K, opt, red, torch.float32) for K in (1, 4) for opt in ("plain", "all")
              for red in ("mean", "sum", "none")]
    combos.append((4, "all", "sum", torch.bfloat16))
    for seed, (K, opt, red, dtype) in enumerate(combos):
        case = soft_case(K=K, options=OPTION_SETS[opt], reduction=red, seed=seed)
        if K > 1:
            assert _coverage(case, splits) == (True, True), "the case must span slices and repeat an id"
        try:
            _compare(case, dtype, lo, hi)
        except AssertionError as e:
            failures.append(f"K={K} {opt} {red} {dtype}: {e}")
    assert not failures, f"rank {rank} splits {splits}:\n" + "\n".join(failures)


@pytest.mark.parametrize("splits", [[200, 317], [61, 400, 56]], ids=["2-ranks-uneven", "3-ranks-uneven"])
def test_soft_targets_match_spec(splits):
    run_ranks(len(splits), _check_matrix, splits)


# ------------------------------------------------------------------ disagreement
def _still_usable(world):
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == world


def _check_disagreement(rank, world):
    splits = [200, 317]
    lo, hi = _bounds(splits, rank)
    case = soft_case(K=4, seed=5)
    h, w, t, tw = case.hidden.float(), case.weight.float()[lo:hi], case.targets, case.kwargs["target_weights"]
    group = dist.group.WORLD
    odd = rank == 1
    # a row with every slot used: its weights squared and rescaled to the same total keep the ids'
    # order and the total, so only the probabilities differ
    r = int(((t != -100).all(1) & (tw > 0).all(1)).nonzero()[0])
    tw_other = tw.clone()
    tw_other[r] = tw[r] ** 2 * (tw[r].sum() / (tw[r] ** 2).sum())
    cases = [
        # soft here, hard (the top target) there
        ({"targets": t[:, 0], "target_weights": None} if odd else {}, "^process_group: ranks disagree on .*target_weights"),
        ({"targets": t[:, :3], "target_weights": tw[:, :3]} if odd else {}, r"^process_group: ranks disagree on .*\bK\b"),
        ({"target_weights": tw_other} if odd else {}, r"^process_group: ranks disagree on target_probs \("),
        ({"target_weights": -tw} if odd else {},
         "^target_weights: expected finite values >= 0" if odd else r"^process_group: rank\(s\) \[1\] refused"),
    ]
    for bad, match in cases:
        kw = {"targets": t, "target_weights": tw, **bad}
        with pytest.raises(ValueError, match=match):
            linear_cross_entropy(h, w, kw["targets"], target_weights=kw["target_weights"], impl="torch",
                                 process_group=group)
        _still_usable(world)
    # identical inputs: no false alarm, and the spec's value
    got = linear_cross_entropy(h, w, t, target_weights=tw, impl="torch", process_group=group)
    ref = naive_linear_cross_entropy(case.hidden, case.weight, t, target_weights=tw)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_disagreement_fails_on_every_rank_without_hanging():
    run_ranks(2, _check_disagreement)


# ------------------------------------------------------------------ planted faults
def _slots_of_slot0_rank_only(real):
    """Fault: a rank uses a row's slots only if it also holds slot 0, so the target logit and one-hot
    terms of slots in other ranks' slices are dropped."""
    def fake(t, vocab_start, V_local):
        tl, mine = real(t, vocab_start, V_local)
        if t.dim() == 2:
            mine = mine & mine[:, :1]
        return torch.where(mine, tl, 0), mine
    return fake


def _one_hot_top_slot_only(real):
    """Fault: the gradient's one-hot term keeps slot 0 only (the loss stays right)."""
    def fake(*args, q=None, **kw):
        if q is not None:
            q = torch.where(torch.arange(q.shape[1]) == 0, q, 0.0)
        return real(*args, q=q, **kw)
    return fake


FAULTS = {"slots_of_slot0_rank_only": ("slice_targets", _slots_of_slot0_rank_only),
          "one_hot_top_slot_only": ("explicit_grad_gemms", _one_hot_top_slot_only)}


def _check_faults(rank, world, splits):
    lo, hi = _bounds(splits, rank)
    case = soft_case(K=4, options=OPTION_SETS["plain"], reduction="mean", seed=11)
    _compare(case, torch.float32, lo, hi)  # passes without a fault
    for name, (attr, make) in FAULTS.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(vocab_parallel, attr, make(getattr(vocab_parallel, attr)))
            with pytest.raises(AssertionError):
                _compare(case, torch.float32, lo, hi)
            print(f"rank {rank}: {name} caught")


def test_planted_faults_are_caught():
    run_ranks(3, _check_faults, [61, 400, 56])
