"""Overlay picture of a labeling: the visual-token grid drawn on the image, labeled cells filled with
the colour of their word, word boxes outlined, optionally each labeled cell's decoded token text
(with soft labels, its top targets and their weights).

Meant for eyeballing a labeling (does each token land on its word?), not for training.
"""

from __future__ import annotations

import colorsys
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from dvsft_kernels.labeling.grid import VisualGrid
from dvsft_kernels.labeling.types import OCRWord, SoftLabels

__all__ = ["describe_targets", "draw_overlay", "word_color"]

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


_CAPTION_H = 20  # px strip above each panel of a multi-view montage
_MIN_TEXT_CELL = 18  # cells narrower than this (px) get no token text: it would be unreadable


def draw_overlay(image: Image.Image | str | os.PathLike, grid: VisualGrid, labels: Any,
                 words: Sequence[OCRWord] | None = None, tokenizer: Any = None,
                 path: str | os.PathLike | None = None, *, ignore_index: int = -100,
                 views: Sequence[int] | None = None, scale: float = 1.0, top: int = 2) -> Image.Image:
    """Draw ``grid`` and ``labels`` on ``image`` and return the picture (RGB); save it as PNG at
    ``path`` when given.

    Every cell is outlined; a labeled cell is filled (semi-transparent) with the colour of the word it
    overlaps most (by area, as the labeling's coverage does), or of its token id without ``words``.
    Word boxes are outlined in their colour. With ``tokenizer``, labeled cells at least 18 px wide
    show their decoded token (spaces as ``·``).

    ``views``: which of the grid's views to draw, all on one picture of the image's size. Default:
    every view; a grid with several views (tiles, thumbnail, base view) then gives a montage with
    one captioned panel per view, since their cells overlap on the image.

    ``scale``: draw on the image resized by this factor (e.g. 2 to make token text readable on a
    small page); cells and boxes are scaled with it.

    ``labels`` may be a :class:`SoftLabels` (``label_visual_tokens(..., soft=K)``): a cell is labeled
    when its first target is; with ``tokenizer`` it shows its ``top`` targets with the largest weights,
    one per line, as ``token weight`` (the token text shortened to fit, the weight kept).
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
    targets = None
    if isinstance(labels, SoftLabels):
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be an int >= 1, got {top!r}")
        targets = soft_targets(labels, grid.num_tokens, ignore_index=ignore_index, top=top)
        labels = labels.ids[:, 0]
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() != grid.num_tokens or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor of shape ({grid.num_tokens},) "
                         f"(grid.num_tokens), got {tuple(labels.shape)} {labels.dtype}")
    if views is not None:
        views = list(views)
        for v in views:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(grid.views):
                raise ValueError(f"views must hold indices in [0, {len(grid.views)}), got {views}")

    boxes = grid.token_boxes().tolist()
    labels_l = labels.tolist()
    for i, t in enumerate(labels_l):
        if t != ignore_index and any(math.isnan(x) for x in boxes[i]):
            raise ValueError(f"labels[{i}] = {t} but token {i} is not an image cell (a separator, "
                             f"newline or padding position): labels do not belong to this grid")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 16:
        raise ValueError(f"scale must be a number in (0, 16], got {scale!r}")
    base = image.convert("RGBA")
    if scale != 1:
        base = base.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        boxes = [[v * scale for v in b] for b in boxes]
    w, h = base.size
    args = (base, grid, boxes, labels_l, list(words or []), tokenizer, ignore_index, scale, targets)
    if views is not None or len(grid.views) <= 1:
        out = _panel(*args, views if views is not None else range(len(grid.views)))
    else:
        panels = [(v.name or f"view {k}", _panel(*args, [k])) for k, v in enumerate(grid.views)]
        ncol = math.ceil(math.sqrt(len(panels)))
        nrow = math.ceil(len(panels) / ncol)
        out = Image.new("RGB", (ncol * w, nrow * (h + _CAPTION_H)), (255, 255, 255))
        draw = ImageDraw.Draw(out)
        font = _font(13)
        for k, (name, pic) in enumerate(panels):
            x, y = (k % ncol) * w, (k // ncol) * (h + _CAPTION_H)
            draw.text((x + 4, y + 3), f"{k}: {name}", font=font, fill=(0, 0, 0))
            out.paste(pic, (x, y + _CAPTION_H))
    if path is not None:
        out.save(path, format="PNG")
    return out


def soft_targets(labels: SoftLabels, num_tokens: int, *, ignore_index: int = -100,
                 top: int = 2) -> list[list[tuple[int, float]]]:
    """Per position, up to ``top`` (id, weight) targets of ``labels``, largest weight first (slots
    holding ``ignore_index`` or weight 0 left out); checks the shapes."""
    ids, w = torch.as_tensor(labels.ids), torch.as_tensor(labels.weights)
    if (ids.dim() != 2 or ids.shape[0] != num_tokens or ids.dtype.is_floating_point
            or tuple(w.shape) != tuple(ids.shape)):
        raise ValueError(f"labels: soft ids / weights must both be ({num_tokens}, K) (grid.num_tokens), ids "
                         f"integer, got {tuple(ids.shape)} {ids.dtype} / {tuple(w.shape)} {w.dtype}")
    out = []
    for row_i, row_w in zip(ids.tolist(), w.tolist()):
        pairs = [(t, x) for t, x in zip(row_i, row_w) if t != ignore_index and x > 0]
        pairs.sort(key=lambda p: -p[1])  # stable: equal weights keep the labeler's order
        out.append(pairs[:top])
    return out


def describe_targets(labels: SoftLabels, index: int, tokenizer: Any = None, *, top: int = 2,
                     ignore_index: int = -100) -> str:
    """A position's top targets as text, e.g. ``·word 0.7 / ·other 0.3`` (decoded with ``tokenizer``,
    spaces as ``·``; ids without one); ``""`` when it has none."""
    n = int(torch.as_tensor(labels.ids).shape[0])
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise ValueError(f"index must be a position in [0, {n}), got {index!r}")
    pairs = soft_targets(labels, n, ignore_index=ignore_index, top=top)[index]
    return " / ".join(f"{_decode(tokenizer, t) if tokenizer is not None else t} {_weight(x)}" for t, x in pairs)


def _weight(x: float) -> str:
    return format(x, ".2g")


def _panel(base, grid, boxes, labels_l, words, tokenizer, ignore_index, scale, targets, views) -> Image.Image:
    word_boxes = [tuple(v * scale for v in _aabb(wd.box)) for wd in words]
    view_tokens = _view_token_ranges(grid)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    texts = []  # (x0, y0, x1, y1, token id), drawn last, on top of everything
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
                if tokenizer is not None and x1 - x0 >= _MIN_TEXT_CELL:
                    texts.append((x0, y0, x1, y1, int(t) if targets is None else targets[i]))
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=_GRID_RGBA, width=1)
    out = Image.alpha_composite(base, layer)
    draw = ImageDraw.Draw(out)
    for k, wd in enumerate(words):
        rgb = word_color(k)
        if len(wd.box) == 4 and isinstance(wd.box[0], (list, tuple)):
            draw.polygon([(float(p[0]) * scale, float(p[1]) * scale) for p in wd.box], outline=rgb + (255,),
                         width=2)
        else:
            x0, y0, x1, y1 = word_boxes[k]
            draw.rectangle([x0, y0, x1, y1], outline=rgb + (255,), width=2)
    if texts:
        cell_h = min(y1 - y0 for _, y0, _, y1, _ in texts)
        # soft labels: one line per target, so the lines share the cell's height
        lines = 1 if targets is None else max(1, max(len(t) for *_, t in texts))
        size = max(8, min(18, int(cell_h * (0.5 if lines == 1 else 0.9 / lines))))
        font = _font(size)
        halo = 1 if size >= 11 else 0  # a white halo keeps text legible, but swamps tiny glyphs
        decoded: dict[int, str] = {}
        for x0, y0, x1, y1, t in texts:
            pairs = [(t, None)] if targets is None else t
            for k, (tid, wt) in enumerate(pairs):
                if tid not in decoded:
                    decoded[tid] = _decode(tokenizer, tid)
                if wt is None:
                    s = _fit(decoded[tid], font, x1 - x0 - 2)
                else:  # keep the weight whole; shorten the token text
                    tail = " " + _weight(wt)
                    s = _fit(decoded[tid], font, x1 - x0 - 2 - font.getlength(tail))
                    s = s + tail if s else _fit(tail.strip(), font, x1 - x0 - 2)
                if s:
                    draw.text((x0 + 1 + halo, y0 + k * size), s, font=font, fill=(0, 0, 0, 255),
                              stroke_width=halo, stroke_fill=(255, 255, 255, 255))
    return out.convert("RGB")


def _best_word(word_boxes, cell) -> int | None:
    """Word overlapping the cell most; ties go to the smaller box, then the earlier word (as the
    labeling breaks them)."""
    x0, y0, x1, y1 = cell
    best, best_key = None, None
    for k, (a0, b0, a1, b1) in enumerate(word_boxes):
        area = max(0.0, min(x1, a1) - max(x0, a0)) * max(0.0, min(y1, b1) - max(y0, b0))
        if area > 0:
            key = (-area, (a1 - a0) * (b1 - b0))
            if best_key is None or key < best_key:
                best, best_key = k, key
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
