"""Visual token grids: where each visual token of an image lies, in original-image pixels.

An image becomes one or more *views* (the whole image, tiles, a thumbnail). A view is an affine map
from original pixels to view pixels, ``x' = x * sx - ox``, ``y' = y * sy - oy``, and a token grid
of ``rows x cols`` cells of ``cell_h x cell_w`` view pixels. Tokens of a view are laid out row-major
in the image's token run, starting at ``offset``, with ``row_stride`` run positions between row
starts (``cols``, or ``cols + 1`` where a newline / break token follows each row). Every run
position that is not a cell of some view (newlines, breaks, separators) is never labeled.

Two optional refinements, both keeping the meaning above:

* ``col_spans`` / ``row_spans`` give each column / row its own ``(start, end)`` in view pixels,
  for grids whose cells are not evenly spaced (LLaVA-OneVision: 27 cells of 14 px per 384 px tile,
  then bilinear downsizing of the assembled grid). When absent, column ``c`` spans
  ``[c * cell_w, (c + 1) * cell_w)``.
* ``VisualGrid.segments`` lists the ``(start, length)`` stretches of the run that are contiguous
  runs of the image placeholder token in ``input_ids``. One segment covering everything for most
  families; one per row for Pixtral (``[IMG_BREAK]`` between rows is a different token id); one
  per view for Idefics3 / SmolVLM / Gemma 3 pan-and-scan, whose views are separated by text whose
  tokenisation the grid does not know (there ``num_tokens`` counts placeholder positions only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dvsft_kernels.labeling import registry


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
    # optional per-column / per-row (start, end) in view pixels; override cell_w / cell_h
    col_spans: tuple[tuple[float, float], ...] | None = None
    row_spans: tuple[tuple[float, float], ...] | None = None
    name: str = ""  # e.g. "image", "tile r0 c1", "thumbnail": for reports and overlays

    def __post_init__(self):
        if self.rows < 0 or self.cols < 0:
            raise ValueError(f"GridView: rows and cols must be >= 0, got {self.rows} x {self.cols}")
        if not (self.sx > 0 and self.sy > 0):
            raise ValueError(f"GridView: scales sx, sy must be > 0, got {self.sx}, {self.sy}")
        if self.row_stride < self.cols:
            raise ValueError(f"GridView: row_stride {self.row_stride} < cols {self.cols}")
        if self.col_spans is not None and len(self.col_spans) != self.cols:
            raise ValueError(f"GridView: {len(self.col_spans)} col_spans for {self.cols} cols")
        if self.row_spans is not None and len(self.row_spans) != self.rows:
            raise ValueError(f"GridView: {len(self.row_spans)} row_spans for {self.rows} rows")

    @property
    def num_cells(self) -> int:
        return self.rows * self.cols

    @property
    def last_position(self) -> int:
        """Run position one past this view's last cell."""
        if self.num_cells == 0:
            return self.offset
        return self.offset + (self.rows - 1) * self.row_stride + self.cols

    def _spans_view(self, axis: int) -> np.ndarray:
        spans = self.col_spans if axis == 0 else self.row_spans
        n = self.cols if axis == 0 else self.rows
        if spans is not None:
            return np.asarray(spans, dtype=np.float64).reshape(n, 2)
        size = self.cell_w if axis == 0 else self.cell_h
        k = np.arange(n, dtype=np.float64)
        return np.stack([k * size, (k + 1) * size], axis=1)

    def col_bounds(self) -> np.ndarray:
        """(cols, 2) float64 [x0, x1) of each column in original pixels, clipped to ``content``
        (a column wholly in padding has x1 == x0)."""
        return self._bounds(0)

    def row_bounds(self) -> np.ndarray:
        """(rows, 2) float64 [y0, y1) of each row in original pixels, clipped to ``content``."""
        return self._bounds(1)

    def _bounds(self, axis: int) -> np.ndarray:
        s = self._spans_view(axis)
        if self.content is not None:
            lo, hi = (self.content[0], self.content[2]) if axis == 0 else (self.content[1], self.content[3])
            s = np.clip(s, lo, hi)
        if axis == 0:
            return (s + self.ox) / self.sx
        return (s + self.oy) / self.sy

    def positions(self) -> np.ndarray:
        """(rows, cols) int64 run position of each cell."""
        r = np.arange(self.rows, dtype=np.int64)[:, None]
        c = np.arange(self.cols, dtype=np.int64)[None, :]
        return self.offset + r * self.row_stride + c

    def cell_box_view(self, r: int, c: int) -> tuple[float, float, float, float]:
        (x0, x1), (y0, y1) = self._spans_view(0)[c], self._spans_view(1)[r]
        if self.content is not None:
            cx0, cy0, cx1, cy1 = self.content
            x0, y0, x1, y1 = max(x0, cx0), max(y0, cy0), min(x1, cx1), min(y1, cy1)
        return float(x0), float(y0), float(x1), float(y1)


@dataclass(frozen=True)
class VisualGrid:
    family: str
    image_size: tuple[int, int]  # (H, W) of the original image
    views: tuple[GridView, ...]
    num_tokens: int  # length of this image's token run, separators included
    meta: dict = field(default_factory=dict, compare=False)
    # (start, length) stretches of the run that are contiguous placeholder runs in input_ids;
    # empty means one segment covering the whole run
    segments: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "views", tuple(self.views))
        if not self.segments:
            object.__setattr__(self, "segments", ((0, int(self.num_tokens)),))
        else:
            object.__setattr__(self, "segments", tuple((int(s), int(n)) for s, n in self.segments))
        self._validate()

    def _validate(self) -> None:
        n = self.num_tokens
        if n < 0:
            raise ValueError(f"VisualGrid: num_tokens must be >= 0, got {n}")
        prev_end = 0
        for s, ln in self.segments:
            if s < prev_end or ln <= 0 or s + ln > n:
                raise ValueError(f"VisualGrid: bad segments {self.segments} for num_tokens={n}")
            prev_end = s + ln
        pos = self.cell_positions()
        if pos.size:
            if pos.min() < 0 or pos.max() >= n:
                raise ValueError(f"VisualGrid: cell positions outside [0, {n})")
            if np.bincount(pos, minlength=n).max() > 1:
                raise ValueError("VisualGrid: two cells share a run position")
            in_segment = np.zeros(n, dtype=bool)
            for s, ln in self.segments:
                in_segment[s : s + ln] = True
            if not in_segment[pos].all():
                raise ValueError("VisualGrid: a cell lies outside every placeholder segment")

    # ---------------------------------------------------------------------------------------
    @property
    def num_cells(self) -> int:
        return sum(v.num_cells for v in self.views)

    def cell_positions(self) -> np.ndarray:
        """Run positions of all cells (views in order, each row-major), int64."""
        pos = [v.positions().ravel() for v in self.views]
        return np.concatenate(pos) if pos else np.zeros(0, np.int64)

    def token_boxes(self) -> torch.Tensor:
        """(num_tokens, 4) float64 boxes (x0, y0, x1, y1) in original pixels; NaN for run positions
        that are not cells (newline / break / separator tokens) and for cells wholly in padding."""
        out = np.full((self.num_tokens, 4), np.nan, dtype=np.float64)
        for v in self.views:
            if v.num_cells == 0:
                continue
            xb, yb = v.col_bounds(), v.row_bounds()
            boxes = np.empty((v.rows, v.cols, 4), dtype=np.float64)
            boxes[..., 0] = xb[None, :, 0]
            boxes[..., 2] = xb[None, :, 1]
            boxes[..., 1] = yb[:, None, 0]
            boxes[..., 3] = yb[:, None, 1]
            empty = (boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1])
            boxes[empty] = np.nan
            out[v.positions().ravel()] = boxes.reshape(-1, 4)
        return torch.from_numpy(out)

    def view_of_position(self) -> np.ndarray:
        """(num_tokens,) int64: index of the view owning each run position, -1 for separators."""
        out = np.full(self.num_tokens, -1, dtype=np.int64)
        for i, v in enumerate(self.views):
            out[v.positions().ravel()] = i
        return out

    # ---------------------------------------------------------------------------------------
    # family constructors: geometry lives in the family modules (dvsft_kernels/labeling/families/),
    # found through the registry (dvsft_kernels/labeling/registry.py); these only look it up
    @classmethod
    def for_family(cls, family: str, image_size, *args: Any, **kwargs: Any) -> VisualGrid:
        """Grid of an image of ``image_size`` (H, W) under a registered family's geometry builder;
        ``family`` is its name or an alias (``registry.names(aliases=True)``), further arguments are
        the builder's (``registry.get(family).build``). Unknown family: ValueError listing the known."""
        fam = registry.get(family)
        return cls._checked(fam, fam.build(image_size, *args, **kwargs))

    @classmethod
    def for_qwen2_vl(
        cls, image_size, image_grid_thw, patch_size: int = 14, merge_size: int = 2
    ) -> VisualGrid:
        """Qwen2-VL / Qwen2.5-VL / Qwen3-VL (Qwen3-VL checkpoints: ``patch_size=16``)."""
        return cls.for_family(
            "qwen2_vl", image_size, image_grid_thw, patch_size=patch_size, merge_size=merge_size
        )

    @classmethod
    def for_llava(cls, image_size, **kwargs: Any) -> VisualGrid:
        """LLaVA-1.5; see :func:`dvsft_kernels.labeling.families.llava.llava` for the arguments."""
        return cls.for_family("llava", image_size, **kwargs)

    @classmethod
    def for_llava_next(cls, image_size, **kwargs: Any) -> VisualGrid:
        """LLaVA-NeXT (anyres); see :func:`dvsft_kernels.labeling.families.llava_next.llava_next`."""
        return cls.for_family("llava_next", image_size, **kwargs)

    @classmethod
    def for_llava_onevision(cls, image_size, **kwargs: Any) -> VisualGrid:
        """LLaVA-OneVision; see :func:`dvsft_kernels.labeling.families.llava_onevision.llava_onevision`."""
        return cls.for_family("llava_onevision", image_size, **kwargs)

    @classmethod
    def for_internvl(cls, image_size, **kwargs: Any) -> VisualGrid:
        """InternVL (GotOcr2 tiling); see :func:`dvsft_kernels.labeling.families.internvl.internvl`."""
        return cls.for_family("internvl", image_size, **kwargs)

    @classmethod
    def for_idefics3(cls, image_size, **kwargs: Any) -> VisualGrid:
        """Idefics3 and SmolVLM; see :func:`dvsft_kernels.labeling.families.idefics3.idefics3`."""
        return cls.for_family("idefics3", image_size, **kwargs)

    @classmethod
    def for_gemma3(cls, image_size, **kwargs: Any) -> VisualGrid:
        """Gemma 3 (pan-and-scan optional); see :func:`dvsft_kernels.labeling.families.gemma3.gemma3`."""
        return cls.for_family("gemma3", image_size, **kwargs)

    @classmethod
    def for_pixtral(cls, image_size, **kwargs: Any) -> VisualGrid:
        """Pixtral and Mistral 3; see :func:`dvsft_kernels.labeling.families.pixtral.pixtral`."""
        return cls.for_family("pixtral", image_size, **kwargs)

    @classmethod
    def from_processor(
        cls, processor, image_or_size, outputs=None, index: int = 0, *, images_kwargs=None
    ) -> VisualGrid:
        """Grid of image ``index`` of ``outputs`` (the processor's BatchFeature), for any registered
        family; see :func:`dvsft_kernels.labeling.registry.grid_from_processor`."""
        fam = registry.for_processor(processor)
        return cls._checked(
            fam, fam.from_processor(processor, image_or_size, outputs, index, images_kwargs=images_kwargs)
        )

    @classmethod
    def _checked(cls, fam: registry.Family, grid: Any) -> VisualGrid:
        if not isinstance(grid, VisualGrid):
            raise TypeError(f"family {fam.name!r} built a {type(grid).__name__}, not a VisualGrid")
        return grid
