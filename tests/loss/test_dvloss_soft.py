"""DVLoss with soft vision labels: `vision_labels` (B, T, K) + `vision_label_weights` (B, T, K),
against a float64 reference built from full logits by hand; K = 1 equal to hard labels; accuracy
against the highest-weight id; the vision shift; the attach hook; bad input."""

from __future__ import annotations

import pytest
import torch

from dvsft_kernels import DVLoss, attach
from tests.integrations.helpers import make_targets
from tests.integrations.tiny_models import qwen2_vl

IGN = -100


def _case(B=2, T=11, D=24, V=61, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.4
    labels = torch.full((B, T), IGN)
    labels[:, 7:] = torch.randint(0, V, (B, T - 7), generator=g)
    vis = torch.full((B, T, K), IGN)
    vis[:, 1:6] = torch.randint(0, V, (B, 5, K), generator=g)
    vis[0, 2, 1:] = IGN  # one used slot
    vis[1, 3, 0] = IGN  # slot 0 unused, others used
    w = torch.rand(B, T, K, generator=g, dtype=torch.float64).float().double()
    return hidden, weight, labels, vis, w


def _reference(hidden, weight, labels, vis, w, *, text_weight=1.0, vision_weight=1.0, vision_shift=False):
    """Text: CE at hidden[t-1] for labels[t]; vision: sum_k w_k CE(vis[t, k]) at hidden[t] (or t-1
    with vision_shift); each stream averaged over its labeled positions; float64 from full logits."""
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)
    B, T = labels.shape
    text = [(-logp[b, t - 1, labels[b, t]]).item() for b in range(B) for t in range(1, T) if labels[b, t] != IGN]
    vrows = []
    for b in range(B):
        for t in range(T):
            src = t - 1 if vision_shift else t
            if src < 0 or not (vis[b, t] != IGN).any():
                continue
            vrows.append(sum(w[b, t, k].item() * -logp[b, src, vis[b, t, k]].item()
                             for k in range(vis.shape[-1]) if vis[b, t, k] != IGN))
    return text_weight * sum(text) / len(text) + vision_weight * sum(vrows) / len(vrows)


@pytest.mark.parametrize("vision_shift", [False, True])
def test_soft_dvloss_matches_hand_reference(vision_shift):
    hidden, weight, labels, vis, w = _case()
    if vision_shift:  # keep the shifted streams disjoint
        labels[:, 7] = IGN
    ref = _reference(hidden, weight, labels, vis, w, text_weight=0.7, vision_weight=2.0, vision_shift=vision_shift)
    out = DVLoss(vision_weight=2.0, text_weight=0.7, vision_shift=vision_shift)(
        hidden.float(), weight.float(), labels, vis, vision_label_weights=w.float())
    assert abs(out.loss.item() - ref) <= 1e-5 * abs(ref)
    n_vis = int((vis != IGN).any(-1)[:, 1:].sum()) if vision_shift else int((vis != IGN).any(-1).sum())
    assert out.vision_tokens.item() == n_vis


def test_k1_weight_one_equals_hard_labels_exactly():
    hidden, weight, labels, vis, _ = _case(K=1)
    h = hidden.float().requires_grad_()
    hard = DVLoss()(h, weight.float(), labels, vis[..., 0])
    (gh,) = torch.autograd.grad(hard.loss, h)
    soft = DVLoss()(h, weight.float(), labels, vis, vision_label_weights=torch.ones(vis.shape))
    (gs,) = torch.autograd.grad(soft.loss, h)
    assert torch.equal(hard.loss, soft.loss) and torch.equal(gh, gs)
    for k in ("text_loss", "vision_loss", "text_accuracy", "vision_accuracy", "vision_tokens"):
        assert torch.equal(getattr(hard, k), getattr(soft, k)), k


def test_vision_accuracy_counts_the_highest_weight_id():
    """Every vision row's argmax is made id 5; a row is correct only where 5 has the top weight."""
    D, V = 8, 20
    weight = torch.zeros(V, D)
    weight[5, 0] = 1.0
    hidden = torch.zeros(1, 4, D)
    hidden[..., 0] = 10.0
    vis = torch.tensor([[[5, 6], [6, 5], [5, IGN], [IGN, 5]]])
    w = torch.tensor([[[0.6, 0.4], [0.6, 0.4], [0.1, 0.9], [1.0, 0.2]]])
    out = DVLoss()(hidden, weight, None, vis, vision_label_weights=w)
    # correct: rows 0 (5 top), 2 (5 only used), 3 (slot 0 unused: 5 is the only used id) -> 3 of 4
    assert out.vision_accuracy.item() == pytest.approx(0.75)


@pytest.mark.parametrize("kwargs, match", [
    ({"vision_label_weights": None}, "vision_label_weights: required"),
    ({"vis": "2d"}, "vision_label_weights: given"),
    ({"w_shape": (2, 11, 2)}, "vision_label_weights: expected shape"),
    ({"w_dtype": torch.int64}, "vision_label_weights: expected a floating dtype"),
    ({"neg": True}, "target_weights: expected finite values >= 0"),
    ({"vis_shape": (2, 10, 3)}, "vision_labels: expected shape"),
])
def test_bad_soft_input_names_the_argument(kwargs, match):
    hidden, weight, labels, vis, w = _case()
    w = w.float()
    if "w_shape" in kwargs:
        w = w[..., :2]
    if "w_dtype" in kwargs:
        w = (w * 10).long()
    if kwargs.get("neg"):
        w = -w
    if kwargs.get("vis") == "2d":
        vis = vis[..., 0]
    if "vis_shape" in kwargs:
        vis, w = vis[:, :10], w[:, :10]
    if "vision_label_weights" in kwargs:
        w = None
    with pytest.raises(ValueError, match=match):
        DVLoss()(hidden.float(), weight.float(), labels, vis, vision_label_weights=w)


def test_attach_passes_soft_vision_labels_through():
    tiny = qwen2_vl()
    batch = tiny.batch(2)
    labels, vision = make_targets(batch)
    model = tiny.model.train()
    g = torch.Generator().manual_seed(3)
    K = 3
    soft = torch.where((vision != IGN)[..., None], torch.randint(0, 50, (*vision.shape, K), generator=g), IGN)
    soft[..., 0] = vision
    w = torch.rand(*vision.shape, K, generator=g)
    with attach(model, DVLoss()) as handle:
        out = model(**batch, labels=labels, vision_labels=soft, vision_label_weights=w)
        hidden_probe = handle.last_output
    with torch.no_grad():
        logits = model(**batch).logits.double()
    logp = torch.log_softmax(logits, -1)
    t_mask = labels[:, 1:] != IGN
    text = -logp[:, :-1].gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0][t_mask].mean()
    used = soft != IGN
    rows = (-(logp.gather(-1, soft.clamp_min(0))) * torch.where(used, w.double(), 0)).sum(-1)
    vis_rows = used.any(-1)
    ref = text + rows[vis_rows].mean()
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * ref.item()
    assert hidden_probe.vision_tokens.item() == int(vis_rows.sum())
