"""OCR words (the input of labeling) and soft labels (an output)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class OCRWord:
    """A word and its box in original-image pixels.

    ``box`` is (x0, y0, x1, y1), or a quadrilateral of 4 (x, y) points (PaddleOCR), which is
    reduced to its axis-aligned bounding box when labeling.
    """

    text: str
    box: Sequence[float] | Sequence[Sequence[float]]
    score: float = 1.0


class SoftLabels(NamedTuple):
    """Soft vision labels (``label_visual_tokens(..., soft=K)``, ``build_vision_labels(..., soft=K)``).

    ``ids``: (..., K) int64 token ids, best first; ``ignore_index`` in unused slots and at unlabeled
    positions. ``weights``: (..., K) float32, 0 where ``ids`` is ``ignore_index``; the K weights of a
    labeled position sum to 1. The shapes are those of the hard labels plus a last axis of K (one
    image: (num_tokens, K); a batch: (B, T, K)). A NamedTuple, so ``ids, weights = soft`` works; it
    is what ``linear_cross_entropy(targets=ids, target_weights=weights)`` and DVLoss'
    ``vision_labels`` / ``vision_label_weights`` take.
    """

    ids: torch.Tensor
    weights: torch.Tensor

    def to(self, device) -> SoftLabels:
        return SoftLabels(self.ids.to(device), self.weights.to(device))
