"""Visual token grids: where each visual token of an image lies, in original-image pixels.

An image becomes one or more *views* (the whole image, tiles, a thumbnail). A view is an affine map
from original pixels to view pixels, ``x' = x * sx - ox``, ``y' = y * sy - oy``, and a token grid
of ``rows x cols`` cells of ``cell_h x cell_w`` view pixels. Tokens of a view are laid out row-major
in the image's token run, starting at ``offset``, with ``row_stride`` run positions between row
starts (``cols``, or ``cols + 1`` where a newline / break token follows each row). Every run
position that is not a cell of some view (newlines, breaks, separators) is never labeled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GridView:
    sx: float
    sy: float
    ox: float
    oy: float
    rows: int
    cols: int
    cell_h: float
    cell_w: float
    offset: int
    row_stride: int
    # view-pixel rectangle (x0, y0, x1, y1) that holds image content; cells are clipped to it
    # (padding added by the processor lies outside). None: the whole grid is content.
    content: tuple[float, float, float, float] | None = None

    def cell_box_view(self, r: int, c: int) -> tuple[float, float, float, float]:
        x0, y0 = c * self.cell_w, r * self.cell_h
        x1, y1 = x0 + self.cell_w, y0 + self.cell_h
        if self.content is not None:
            cx0, cy0, cx1, cy1 = self.content
            x0, y0, x1, y1 = max(x0, cx0), max(y0, cy0), min(x1, cx1), min(y1, cy1)
        return x0, y0, x1, y1


@dataclass(frozen=True)
class VisualGrid:
    family: str
    image_size: tuple[int, int]  # (H, W) of the original image
    views: tuple[GridView, ...]
    num_tokens: int  # length of this image's token run, separators included
    meta: dict = field(default_factory=dict, compare=False)

    def token_boxes(self) -> torch.Tensor:
        """(num_tokens, 4) float64 boxes (x0, y0, x1, y1) in original pixels; NaN for run positions
        that are not cells (newline / break / separator tokens) and for cells wholly in padding."""
        out = torch.full((self.num_tokens, 4), float("nan"), dtype=torch.float64)
        for v in self.views:
            for r in range(v.rows):
                for c in range(v.cols):
                    x0, y0, x1, y1 = v.cell_box_view(r, c)
                    if x1 <= x0 or y1 <= y0:
                        continue
                    out[v.offset + r * v.row_stride + c] = torch.tensor(
                        [(x0 + v.ox) / v.sx, (y0 + v.oy) / v.sy, (x1 + v.ox) / v.sx, (y1 + v.oy) / v.sy],
                        dtype=torch.float64,
                    )
        return out
