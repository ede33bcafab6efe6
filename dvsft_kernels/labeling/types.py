"""OCR words: the input of labeling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class OCRWord:
    """A word and its box in original-image pixels.

    ``box`` is (x0, y0, x1, y1), or a quadrilateral of 4 (x, y) points (PaddleOCR), which is
    reduced to its axis-aligned bounding box when labeling.
    """

    text: str
    box: Sequence[float] | Sequence[Sequence[float]]
    score: float = 1.0
