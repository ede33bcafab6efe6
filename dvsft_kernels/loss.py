"""DVLoss: the DV-SFT loss over a text stream and a vision stream (docs/dvloss.md).

Both streams go through one call of the op: their targets are merged into one (B, T) target tensor
and each row carries its stream's weight / normalizer as a token weight, so

    loss = text_weight * sum(text CE) / n_text + vision_weight * sum(vision CE) / n_vision

is the op's "sum" reduction. The per-stream figures come from the same pass's per-row statistics.

Soft vision labels (`vision_labels` (B, T, K) with `vision_label_weights` (B, T, K), e.g. from
`label_visual_tokens(..., soft=K)`) make the merged targets (B, T, K): a text row holds its label in
slot 0 with weight 1 (the hard op exactly), a vision row its K weighted ids. The vision row loss is
then sum_k w_k CE(t_k), and a vision row counts as correct when the argmax is its highest-weight id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dvsft_kernels.ops.backends.vocab_parallel import refusing_on_error
from dvsft_kernels.ops.function import linear_cross_entropy
from dvsft_kernels.ops.options import mean_denominator, no_host_sync_allowed, safe_reciprocal

# DVLossOutput's detached per-stream figures, in the order metrics() and the trainer report them
METRIC_NAMES = ("text_loss", "vision_loss", "text_tokens", "vision_tokens", "text_accuracy", "vision_accuracy")


@dataclass
class DVLossOutput:
    loss: torch.Tensor  # differentiable
    text_loss: torch.Tensor
    vision_loss: torch.Tensor
    text_tokens: torch.Tensor
    vision_tokens: torch.Tensor
    text_accuracy: torch.Tensor
    vision_accuracy: torch.Tensor
    # with DVLoss(return_predictions=True), per position (B, T), detached: the argmax token id of the
    # logits where either stream has a target (-1 elsewhere), and its softmax probability (0 elsewhere)
    predicted: torch.Tensor | None = None
    probability: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """Plain floats for logging (one host sync)."""
        vals = torch.stack([getattr(self, k).float() for k in METRIC_NAMES]).tolist()
        return dict(zip(METRIC_NAMES, vals))


def _check_weight(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    return float(v)


def _shifted(labels: torch.Tensor, shift: bool, ignore_index: int) -> torch.Tensor:
    """Targets aligned with hidden: with shift, hidden[:, t-1] predicts labels[:, t]."""
    if not shift:
        return labels
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


class DVLoss(nn.Module):
    """The DV-SFT loss: `text_weight * text_loss + vision_weight * vision_loss` in one op call.

    `labels` (answer tokens) and `vision_labels` (the word in each visual token's patch) are (B, T),
    aligned with `input_ids`; soft vision labels are `vision_labels` (B, T, K) with
    `vision_label_weights` (B, T, K) floats >= 0 (-100 pads unused slots). With `shift=True` (the HF convention) hidden[:, t-1] predicts
    labels[:, t]. `vision_shift=False` (default): hidden[:, t] predicts vision_labels[:, t], each
    visual token's own output; True shifts the vision stream like the text; None follows `shift`.

    `impl`, `chunk_rows`, `deterministic`, `grad_filter` and `process_group` go to the op
    (`linear_cross_entropy`). `return_predictions=True` adds the per-position argmax token and its
    probability to the output (what `dvsft_kernels.readout` draws).
    """

    def __init__(self, vision_weight: float = 1.0, *, text_weight: float = 1.0, ignore_index: int = -100,
                 shift: bool = True, vision_shift: bool | None = False, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, impl: str = "auto",
                 chunk_rows: int | None = None, deterministic: bool | None = None, grad_filter: bool = False,
                 return_predictions: bool = False, process_group=None):
        super().__init__()
        # vocabulary-parallel head: `weight` is this rank's slice (ops/backends/vocab_parallel.py)
        self.process_group = process_group
        self.vision_weight = _check_weight("vision_weight", vision_weight)
        self.text_weight = _check_weight("text_weight", text_weight)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
        self.ignore_index = ignore_index
        self.shift = bool(shift)
        # Vision targets are not shifted by default: visual token t's own output predicts the word in
        # its patch (direct supervision). Shifted, hidden[t-1] would have to predict the next patch's
        # word, which trained badly (docs/dvloss.md has the comparison). None follows `shift`.
        self.vision_shift = self.shift if vision_shift is None else bool(vision_shift)
        self.label_smoothing, self.z_loss, self.softcap, self.impl = label_smoothing, z_loss, softcap, impl
        self.chunk_rows, self.deterministic, self.grad_filter = chunk_rows, deterministic, grad_filter
        if not isinstance(return_predictions, bool):
            raise ValueError(f"return_predictions: expected a bool, got {return_predictions!r}")
        if return_predictions and process_group is not None:
            # the gathered logit of the predicted token lives on one rank's slice of the head
            raise ValueError("return_predictions: not supported with process_group (vocabulary-parallel head)")
        self.return_predictions = return_predictions

    def extra_repr(self) -> str:
        return (f"vision_weight={self.vision_weight}, text_weight={self.text_weight}, shift={self.shift}, "
                f"vision_shift={self.vision_shift}, impl={self.impl!r}")

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None,
                vision_labels: torch.Tensor | None = None, *, vision_label_weights: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, num_text_items=None, num_vision_items=None) -> DVLossOutput:
        ign = self.ignore_index
        # with a process group, the other ranks wait in the op's agreement check: a refusal reaches them
        with refusing_on_error(self.process_group, hidden):
            targets, target_weights, text_mask, vis_mask, both, sync_free = self._merge_streams(
                hidden, weight, labels, vision_labels, vision_label_weights)
            n_text = text_mask.sum()
            n_vis = vis_mask.sum()
            d_text = self._denominator("num_text_items", num_text_items, n_text)
            d_vis = self._denominator("num_vision_items", num_vision_items, n_vis)
        inv_text, inv_vis = safe_reciprocal(d_text), safe_reciprocal(d_vis)
        token_weights = (text_mask * (self.text_weight * inv_text) + vis_mask * (self.vision_weight * inv_vis))

        out = linear_cross_entropy(
            hidden, weight, targets, bias, ignore_index=ign, reduction="sum", token_weights=token_weights,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap, impl=self.impl,
            chunk_rows=self.chunk_rows, deterministic=self.deterministic, grad_filter=self.grad_filter,
            return_stats=True, process_group=self.process_group, target_weights=target_weights,
        )
        loss = torch.where(both, float("nan"), out.loss) if sync_free else out.loss
        rows = out.row_loss
        text_loss = (rows * text_mask).sum() * inv_text
        vision_loss = (rows * vis_mask).sum() * inv_vis
        text_acc = (out.correct & text_mask).sum() / n_text.clamp_min(1)
        vis_acc = (out.correct & vis_mask).sum() / n_vis.clamp_min(1)
        return DVLossOutput(
            loss=loss, text_loss=text_loss.detach(), vision_loss=vision_loss.detach(),
            text_tokens=n_text, vision_tokens=n_vis,
            text_accuracy=text_acc.float().detach(), vision_accuracy=vis_acc.float().detach(),
            **(self._predictions(hidden, weight, bias, out) if self.return_predictions else {}),
        )

    @torch.no_grad()
    def _predictions(self, hidden, weight, bias, out) -> dict:
        """predicted (the op's argmax) and its probability exp(z_pred - lse), z_pred from one gathered
        dot per position (no logits)."""
        pred = out.predicted
        has = pred >= 0
        rows = pred.clamp_min(0)
        z = (hidden.float() * weight[rows].float()).sum(-1)
        if bias is not None:
            z = z + bias[rows].float()
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        prob = torch.where(has, torch.exp(z - out.lse), torch.zeros_like(z))
        return {"predicted": pred, "probability": prob}

    def _merge_streams(self, hidden, weight, labels, vision_labels, vision_label_weights=None):
        """Checks the streams; returns (targets, target_weights, text_mask, vis_mask, both, sync_free)
        aligned with hidden: targets (B, T) and target_weights None, or both (B, T, K) for soft
        vision labels."""
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError("hidden: expected a (B, T, D) tensor")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight: expected a (V, D) tensor")
        if labels is None and vision_labels is None:
            raise ValueError("labels: at least one of labels / vision_labels is required")
        ign = self.ignore_index
        B, T = hidden.shape[:2]
        soft = self._check_soft(vision_labels, vision_label_weights, hidden, B, T)
        # Value checks read the labels on the host. Under CUDA-graph capture or torch.compile they
        # cannot: an id outside [0, V) then gives its row a NaN loss (the fused op's contract; the
        # compacting impls still raise, inside the op) and a position in both streams a NaN loss.
        sync_free = no_host_sync_allowed()
        streams = []
        for name, lab, shift in (("labels", labels, self.shift), ("vision_labels", vision_labels, self.vision_shift)):
            if lab is None:
                streams.append(None)
                continue
            want = (B, T, lab.shape[-1]) if (soft and name == "vision_labels") else (B, T)
            if not isinstance(lab, torch.Tensor) or tuple(lab.shape) != want:
                got = tuple(lab.shape) if isinstance(lab, torch.Tensor) else type(lab).__name__
                raise ValueError(f"{name}: expected shape {want} aligned with hidden, got {got}")
            if lab.dtype.is_floating_point or lab.dtype == torch.bool:
                raise ValueError(f"{name}: expected an integer dtype, got {lab.dtype}")
            if lab.device != hidden.device:
                raise ValueError(f"{name}: on {lab.device}, hidden on {hidden.device}")
            lab = lab.long()
            # with a process group the local weight holds a slice: the op checks the global range
            if not sync_free and self.process_group is None:
                valid = lab[lab != ign]
                if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= weight.shape[0]):
                    raise ValueError(f"{name}: ids must lie in [0, {weight.shape[0]}) or equal ignore_index={ign}")
            streams.append(_shifted(lab, shift, ign))
        tt, vt = streams
        dev = hidden.device
        no_rows = torch.zeros(B, T, dtype=torch.bool, device=dev)
        text_mask = tt != ign if tt is not None else no_rows
        vis_mask = (vt != ign if not soft else (vt != ign).any(-1)) if vt is not None else no_rows
        both = (text_mask & vis_mask).any()
        if not sync_free and bool(both):
            raise ValueError("vision_labels: a position is a target in both the text and the vision stream")
        if not soft:
            targets = torch.full((B, T), ign, dtype=torch.long, device=dev)
            if tt is not None:
                targets = torch.where(text_mask, tt, targets)
            if vt is not None:
                targets = torch.where(vis_mask, vt, targets)
            return targets, None, text_mask, vis_mask, both, sync_free
        # soft: a text row is its label in slot 0 with weight 1 (exactly the hard row)
        K = vt.shape[-1]
        vw = _shifted(vision_label_weights.float(), self.vision_shift, 0)
        targets = torch.where(vis_mask[..., None], vt, torch.full_like(vt, ign))
        weights = torch.where(vis_mask[..., None], vw, torch.zeros_like(vw))
        if tt is not None:
            slot0 = text_mask[..., None] & (torch.arange(K, device=dev) == 0)
            targets = torch.where(slot0, tt[..., None], targets)
            weights = torch.where(slot0, 1.0, weights)
        return targets, weights, text_mask, vis_mask, both, sync_free

    @staticmethod
    def _check_soft(vision_labels, vision_label_weights, hidden, B, T) -> bool:
        """Whether the vision stream is soft; checks that labels and weights come together."""
        soft3d = isinstance(vision_labels, torch.Tensor) and vision_labels.dim() == 3
        if vision_label_weights is None:
            if soft3d:
                raise ValueError("vision_label_weights: required with (B, T, K) vision_labels")
            return False
        if not soft3d:
            raise ValueError("vision_label_weights: given, but vision_labels is not a (B, T, K) tensor")
        if tuple(vision_labels.shape[:2]) != (B, T):
            raise ValueError(f"vision_labels: expected shape ({B}, {T}, K) aligned with hidden, got "
                             f"{tuple(vision_labels.shape)}")
        w = vision_label_weights
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (B, T, vision_labels.shape[-1]):
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"vision_label_weights: expected shape {(B, T, vision_labels.shape[-1])} like "
                             f"vision_labels, got {got}")
        if not w.dtype.is_floating_point:
            raise ValueError(f"vision_label_weights: expected a floating dtype, got {w.dtype}")
        if w.device != hidden.device:
            raise ValueError(f"vision_label_weights: on {w.device}, hidden on {hidden.device}")
        if vision_labels.shape[-1] < 1:
            raise ValueError("vision_labels: K (the last dimension) must be >= 1")
        return True

    @staticmethod
    def _denominator(name, given, count):
        if isinstance(given, torch.Tensor):
            if given.dim() != 0:
                raise ValueError(f"{name}: expected an int or a 0-dim tensor")
            given = given.detach()
        elif given is not None and (isinstance(given, bool) or not isinstance(given, (int, float)) or given < 0
                                    or not math.isfinite(given)):
            raise ValueError(f"{name}: expected a number >= 0 or a 0-dim tensor, got {given!r}")
        return mean_denominator(count, given, count.device)
