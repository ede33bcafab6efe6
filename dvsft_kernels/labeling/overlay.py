"""Overlay picture of a labeling: the visual-token grid drawn on the image, labeled cells filled with
the colour of their word, word boxes outlined, optionally each labeled cell's decoded token text.

Meant for eyeballing a labeling (does each token land on its word?), not for training.
"""

from __future__ import annotations

import colorsys
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from dvsft_kernels.labeling.grid import VisualGrid
from dvsft_kernels.labeling.types import OCRWord

__all__ = ["draw_overlay", "word_color"]

_FONT_PATHS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf")
_GRID_RGBA = (90, 90, 90, 110)  # thin cell outlines, visible on white and on dark scans
_FILL_ALPHA = 120  # labeled cells: the page stays readable under the fill


def word_color(i: int) -> tuple[int, int, int]:
    """Colour of the i-th word: hues stepped by the golden ratio so neighbours differ strongly."""
    h = (i * 0.6180339887498949) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def _label_color(token_id: int) -> tuple[int, int, int]:
    # no words given: colour by token id, so equal ids share a colour across the picture
    return word_color((token_id * 2654435761) % 1000003)


def _aabb(box: Sequence) -> tuple[float, float, float, float]:
    if len(box) == 4 and isinstance(box[0], (list, tuple)):
        xs, ys = [float(p[0]) for p in box], [float(p[1]) for p in box]
        return min(xs), min(ys), max(xs), max(ys)
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0, y0, x1, y1


def _font(size: int):
    for p in _FONT_PATHS:
        try:
            return ImageFont.truetype(p, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _view_token_ranges(grid: VisualGrid) -> list[list[int]]:
    out = []
    for v in grid.views:
        out.append([v.offset + r * v.row_stride + c for r in range(v.rows) for c in range(v.cols)])
    return out


def draw_overlay(image: Image.Image | str | os.PathLike, grid: VisualGrid, labels: Any,
                 words: Sequence[OCRWord] | None = None, tokenizer: Any = None,
                 path: str | os.PathLike | None = None, *, ignore_index: int = -100,
                 views: Sequence[int] | None = None) -> Image.Image:
    """Draw ``grid`` and ``labels`` on ``image`` and return the picture (RGB); save it as PNG at
    ``path`` when given.

    A labeled cell takes the colour of the word it overlaps most (by area, as the labeling's coverage
    does); without ``words``, the colour of its token id. With ``tokenizer``, each labeled cell shows
    its decoded token. ``views`` picks which of the grid's views to draw (default all; for tiled
    families the thumbnail view's large cells otherwise lie over the tiles).
    """
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image {str(image)!r} does not exist")
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL Image or a path, got {type(image).__name__}")
    if not isinstance(grid, VisualGrid):
        raise ValueError(f"grid must be a VisualGrid, got {type(grid).__name__}")
    h, w = grid.image_size
    if image.size != (w, h):
        raise ValueError(f"image is {image.size[0]}x{image.size[1]} (W x H) but grid.image_size is "
                         f"(H, W) = {grid.image_size}: the grid was built for another image")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() != grid.num_tokens or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor of shape ({grid.num_tokens},) "
                         f"(grid.num_tokens), got {tuple(labels.shape)} {labels.dtype}")
    if views is None:
        views = range(len(grid.views))
    view_tokens = _view_token_ranges(grid)
    for v in views:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(grid.views):
            raise ValueError(f"views must hold indices in [0, {len(grid.views)}), got {list(views)}")

    boxes = grid.token_boxes().tolist()
    labels_l = labels.tolist()
    for i, t in enumerate(labels_l):
        if t != ignore_index and any(math.isnan(x) for x in boxes[i]):
            raise ValueError(f"labels[{i}] = {t} but token {i} is not an image cell (a separator, "
                             f"newline or padding position): labels do not belong to this grid")
    word_boxes = [_aabb(wd.box) for wd in words] if words else []

    base = image.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    texts = []  # (x0, y0, x1, y1, text), drawn last, on top of everything
    for v in views:
        for i in view_tokens[v]:
            x0, y0, x1, y1 = boxes[i]
            if math.isnan(x0):
                continue
            t = labels_l[i]
            if t != ignore_index:
                k = _best_word(word_boxes, (x0, y0, x1, y1))
                rgb = word_color(k) if k is not None else _label_color(int(t))
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=rgb + (_FILL_ALPHA,))
                if tokenizer is not None:
                    texts.append((x0, y0, x1, y1, _decode(tokenizer, int(t))))
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=_GRID_RGBA, width=1)
    out = Image.alpha_composite(base, layer)
    draw = ImageDraw.Draw(out)
    for k, wd in enumerate(words or []):
        rgb = word_color(k)
        if len(wd.box) == 4 and isinstance(wd.box[0], (list, tuple)):
            draw.polygon([tuple(map(float, p)) for p in wd.box], outline=rgb + (255,), width=2)
        else:
            x0, y0, x1, y1 = word_boxes[k]
            draw.rectangle([x0, y0, x1, y1], outline=rgb + (255,), width=2)
    if texts:
        cell_h = min(y1 - y0 for _, y0, _, y1, _ in texts)
        size = max(8, min(18, int(cell_h * 0.5)))
        font = _font(size)
        halo = 1 if size >= 11 else 0  # a white halo keeps text legible, but swamps tiny glyphs
        for x0, y0, x1, y1, s in texts:
            s = _fit(s, font, x1 - x0 - 2)
            if s:
                draw.text((x0 + 1 + halo, y0), s, font=font, fill=(0, 0, 0, 255), stroke_width=halo,
                          stroke_fill=(255, 255, 255, 255))
    out = out.convert("RGB")
    if path is not None:
        out.save(path, format="PNG")
    return out


def _best_word(word_boxes, cell) -> int | None:
    x0, y0, x1, y1 = cell
    best, best_area = None, 0.0
    for k, (a0, b0, a1, b1) in enumerate(word_boxes):
        area = max(0.0, min(x1, a1) - max(x0, a0)) * max(0.0, min(y1, b1) - max(y0, b0))
        if area > best_area:
            best, best_area = k, area
    return best


def _decode(tokenizer, token_id: int) -> str:
    try:
        s = tokenizer.decode([token_id])
    except Exception:  # noqa: BLE001 - a tokenizer without decode: fall back to the raw id
        s = str(token_id)
    # make leading spaces / control characters visible in a cell
    return s.replace(" ", "\u00b7").replace("\n", "\u21b5") or f"<{token_id}>"


def _fit(s: str, font, width: float) -> str:
    while s and font.getlength(s) > width:
        s = s[:-1]
    return s
