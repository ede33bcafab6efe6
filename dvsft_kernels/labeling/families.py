"""Per-family geometry: how each Hugging Face VLM processor turns an image into visual tokens.

Every constructor returns a :class:`VisualGrid` whose views map original pixels to the processor's
view pixels. Defaults are the transformers processor *class* defaults (checkpoints differ: pass the
checkpoint's values, or use :func:`grid_from_processor`, which reads them from the processor).
Resize arithmetic calls transformers' own functions (``smart_resize``, ``select_best_resolution``,
``get_patch_output_size``, ``get_optimal_tiled_canvas``, ...) on zero-stride stand-in images;
LLaVA-NeXT unpadding calls the modeling file's ``unpad_image``. The two steps transformers only has
as methods (OneVision's downsizing in ``LlavaOnevisionProcessor._get_unpadded_features``, Idefics3's
``resize_for_vision_encoder``) are called unbound with a stand-in ``self`` holding the one attribute
each reads; tests pin all of it against the real processors.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from dvsft_kernels.labeling.grid import GridView, VisualGrid

# transformers' processor class defaults (5.x); checkpoints override most of them
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION_PINPOINTS = tuple((h, w) for h in range(384, 2305, 384) for w in range(384, 2305, 384))


# ------------------------------------------------------------------------------------------------
# transformers imports (guarded: the PIL modules need no torchvision; fall back to the others)
def _tf_attr(modules: Sequence[str], name: str):
    errors = []
    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:  # pragma: no cover - depends on install
            errors.append(f"{mod}: {e}")
    raise ImportError(
        f"dvsft_kernels.labeling needs transformers>=5.0 for `{name}` (tried {', '.join(modules)}): "
        + "; ".join(errors)
    )


def _tf(name: str):
    table = {
        "smart_resize": (
            "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
            "transformers.models.qwen2_vl.image_processing_qwen2_vl",
        ),
        "get_resize_output_image_size": ("transformers.image_transforms",),
        "get_size_with_aspect_ratio": ("transformers.image_transforms",),
        "select_best_resolution": ("transformers.image_processing_utils",),
        "get_patch_output_size": ("transformers.image_processing_utils",),
        "get_image_size_for_max_height_width": ("transformers.image_utils",),
        "ChannelDimension": ("transformers.image_utils",),
        "unpad_image": ("transformers.models.llava_next.modeling_llava_next",),
        "get_optimal_tiled_canvas": (
            "transformers.models.got_ocr2.image_processing_pil_got_ocr2",
            "transformers.models.got_ocr2.image_processing_got_ocr2",
        ),
        "idefics3_output_size": (
            "transformers.models.idefics3.image_processing_pil_idefics3",
            "transformers.models.idefics3.image_processing_idefics3",
        ),
        "Gemma3ImageProcessorPil": ("transformers.models.gemma3.image_processing_pil_gemma3",),
        "Idefics3ImageProcessorPil": ("transformers.models.idefics3.image_processing_pil_idefics3",),
        "LlavaOnevisionProcessor": ("transformers.models.llava_onevision.processing_llava_onevision",),
        "pixtral_output_size": (
            "transformers.models.pixtral.image_processing_pil_pixtral",
            "transformers.models.pixtral.image_processing_pixtral",
        ),
    }
    real = {
        "idefics3_output_size": "get_resize_output_image_size",
        "pixtral_output_size": "get_resize_output_image_size",
    }.get(name, name)
    return _tf_attr(table[name], real)


def _dummy(h: int, w: int, fill=None) -> np.ndarray:
    """A (1, h, w) channels-first 'image' with zero strides: transformers' size helpers only read
    its shape, so no pixel memory is allocated."""
    base = np.zeros((), np.uint8) if fill is None else fill
    return np.broadcast_to(base, (1, h, w))


# ------------------------------------------------------------------------------------------------
# argument checking
def _pos_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _hw(image_size, name: str = "image_size") -> tuple[int, int]:
    try:
        h, w = image_size
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (H, W), got {image_size!r}") from None
    return _pos_int(_as_int(h, name), f"{name}[0] (H)"), _pos_int(_as_int(w, name), f"{name}[1] (W)")


def _as_int(v, name):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must hold ints, got {v!r}")  # noqa: TRY004 (ValueError, as DESIGN asks)
    return int(v)


_SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")


def _size(v, name: str, *, square_int: bool) -> dict:
    """Normalise a processor size (int, (h, w), dict or SizeDict) to a dict of the set keys.
    ``square_int``: an int means height = width (else shortest_edge)."""
    if v is None:
        return {}
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return {"height": int(v), "width": int(v)} if square_int else {"shortest_edge": int(v)}
    if isinstance(v, Mapping):
        d = {k: v[k] for k in _SIZE_KEYS if v.get(k) is not None}
    elif isinstance(v, (tuple, list)) and len(v) == 2:
        d = {"height": v[0], "width": v[1]}
    elif any(getattr(v, k, None) is not None for k in _SIZE_KEYS):  # SizeDict
        d = {k: getattr(v, k) for k in _SIZE_KEYS if getattr(v, k, None) is not None}
    else:
        raise ValueError(f"{name} must be an int, (height, width) or a size dict, got {v!r}")
    return {k: _pos_int(_as_int(x, name), f"{name}[{k!r}]") for k, x in d.items()}


def _hw_of(v, name: str) -> tuple[int, int]:
    d = _size(v, name, square_int=True)
    if "height" not in d or "width" not in d:
        raise ValueError(f"{name} must give height and width, got {v!r}")
    return d["height"], d["width"]


def _square_side(n: int, name: str) -> int:
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"{name}={n} is not a square number of tokens per view")
    return s


# ------------------------------------------------------------------------------------------------
class _Map:
    """Axis-aligned affine map original px -> current px, x' = x * sx - ox (composed step by step)."""

    def __init__(self):
        self.sx, self.sy, self.ox, self.oy = 1.0, 1.0, 0.0, 0.0

    def scale(self, kx: float, ky: float) -> _Map:
        self.sx, self.ox, self.sy, self.oy = self.sx * kx, self.ox * kx, self.sy * ky, self.oy * ky
        return self

    def shift(self, dx: float, dy: float) -> _Map:  # content moves by (+dx, +dy): paste / pad
        self.ox, self.oy = self.ox - dx, self.oy - dy
        return self

    def copy(self) -> _Map:
        m = _Map()
        m.sx, m.sy, m.ox, m.oy = self.sx, self.sy, self.ox, self.oy
        return m

    def rect(self, H: int, W: int) -> tuple[float, float, float, float]:
        """The image rectangle (x0, y0, x1, y1) in current px."""
        return (float(-self.ox), float(-self.oy), float(W * self.sx - self.ox), float(H * self.sy - self.oy))

    def content(self, H: int, W: int, extent_h: float, extent_w: float):
        """The image rectangle in current px, or None when it covers [0, extent) fully."""
        x0, y0, x1, y1 = self.rect(H, W)
        eps = 1e-9 * max(extent_h, extent_w, 1.0)
        if x0 <= eps and y0 <= eps and x1 >= extent_w - eps and y1 >= extent_h - eps:
            return None
        return (float(x0), float(y0), float(x1), float(y1))

    def view(self, H, W, rows, cols, cell_h, cell_w, offset, row_stride, name, **kw) -> GridView:
        extent_h = kw["row_spans"][-1][1] if kw.get("row_spans") else rows * cell_h
        extent_w = kw["col_spans"][-1][1] if kw.get("col_spans") else cols * cell_w
        return GridView(
            sx=float(self.sx),
            sy=float(self.sy),
            ox=float(self.ox),
            oy=float(self.oy),
            rows=int(rows),
            cols=int(cols),
            cell_h=float(cell_h),
            cell_w=float(cell_w),
            offset=int(offset),
            row_stride=int(row_stride),
            content=kw.pop("content", self.content(H, W, extent_h, extent_w)),
            name=name,
            **kw,
        )


def _resized(cur: tuple[int, int], size: dict) -> tuple[int, int]:
    """Output size of the PIL/torchvision backends' ``resize`` for a size dict (same branch order)."""
    h, w = cur
    first = _tf("ChannelDimension").FIRST
    if size.get("shortest_edge") and size.get("longest_edge"):
        return tuple(_tf("get_size_with_aspect_ratio")((h, w), size["shortest_edge"], size["longest_edge"]))
    if size.get("shortest_edge"):
        return tuple(
            _tf("get_resize_output_image_size")(
                _dummy(h, w), size=size["shortest_edge"], default_to_square=False, input_data_format=first
            )
        )
    if size.get("max_height") and size.get("max_width"):
        return tuple(
            _tf("get_image_size_for_max_height_width")((h, w), size["max_height"], size["max_width"])
        )
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise ValueError(f"size must have shortest_edge, max_height/max_width or height/width, got {size}")


def _crop_origin(cur: int, crop: int, backend: str) -> int:
    """Where ``center_crop`` starts along one axis (negative: the image is padded by -result).
    The PIL backend pads ceil(d/2) before, torchvision floor(d/2)."""
    if crop <= cur:
        return (cur - crop) // 2
    d = crop - cur
    return -((d + 1) // 2) if backend == "pil" else -(d // 2)


# ------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL / Qwen3-VL
def qwen2_vl(image_size, image_grid_thw, *, patch_size: int = 14, merge_size: int = 2) -> VisualGrid:
    """One view: the image squashed to (grid_h * patch, grid_w * patch) (``smart_resize``), cells of
    patch * merge px, ``grid_h * grid_w / merge**2`` tokens row-major over the merged grid."""
    H, W = _hw(image_size)
    p, m = _pos_int(patch_size, "patch_size"), _pos_int(merge_size, "merge_size")
    thw = np.asarray(
        image_grid_thw.tolist() if hasattr(image_grid_thw, "tolist") else image_grid_thw
    ).reshape(-1)
    if thw.size != 3:
        raise ValueError(f"image_grid_thw must be (t, grid_h, grid_w), got {image_grid_thw!r}")
    t, gh, gw = (_pos_int(_as_int(x, "image_grid_thw"), "image_grid_thw") for x in thw)
    if t != 1:
        raise ValueError(f"image_grid_thw: t={t}; only still images (t == 1) are labeled")
    if gh % m or gw % m:
        raise ValueError(f"image_grid_thw grid {gh}x{gw} is not divisible by merge_size={m}")
    rows, cols, cell = gh // m, gw // m, p * m
    mp = _Map().scale(gw * p / W, gh * p / H)
    view = mp.view(H, W, rows, cols, cell, cell, 0, cols, "image")
    return VisualGrid("qwen2_vl", (H, W), (view,), rows * cols, meta={"resized": (gh * p, gw * p)})


# ------------------------------------------------------------------------------------------------
# LLaVA-1.5
def _lead_tokens(num_additional_image_tokens, vision_feature_select_strategy) -> int:
    extra = int(num_additional_image_tokens or 0)
    lead = extra - (1 if vision_feature_select_strategy == "default" else 0)
    if lead < 0:
        raise ValueError(
            "vision_feature_select_strategy='default' drops a CLS token but "
            f"num_additional_image_tokens={extra}: the processor's placeholder count would be one "
            "short of the patch grid; set num_additional_image_tokens=1 (CLIP) as in LLaVA checkpoints"
        )
    return lead


def llava(
    image_size,
    *,
    size=224,
    crop_size=224,
    do_resize: bool = True,
    do_center_crop: bool = True,
    do_pad: bool = False,
    patch_size: int = 14,
    num_additional_image_tokens: int = 0,
    vision_feature_select_strategy: str | None = None,
    backend: str = "torchvision",
) -> VisualGrid:
    """Optional pad-to-square (centred), resize (``size``: int = shortest edge, or a size dict),
    centre crop, then a (crop_h // patch) x (crop_w // patch) patch grid. LLaVA-1.5 checkpoints:
    size=336, crop_size=336, num_additional_image_tokens=1, vision_feature_select_strategy="default".
    Leading CLS positions (``"full"`` strategy) are never labeled. ``backend`` ("pil" or
    "torchvision") only matters when the crop is larger than the resized image (padding split)."""
    H, W = _hw(image_size)
    p = _pos_int(patch_size, "patch_size")
    lead = _lead_tokens(num_additional_image_tokens, vision_feature_select_strategy)
    mp, cur = _Map(), (H, W)
    if do_pad and H != W:  # pad_to_square: centred, before resizing
        side = max(H, W)
        mp.shift((side - W) // 2, (side - H) // 2)
        cur = (side, side)
    if do_resize:
        new = _resized(cur, _size(size, "size", square_int=False))
        mp.scale(new[1] / cur[1], new[0] / cur[0])
        cur = new
    if do_center_crop:
        ch, cw = _hw_of(crop_size, "crop_size")
        mp.shift(-_crop_origin(cur[1], cw, backend), -_crop_origin(cur[0], ch, backend))
        cur = (ch, cw)
    rows, cols = cur[0] // p, cur[1] // p
    view = mp.view(H, W, rows, cols, p, p, lead, cols, "image")
    return VisualGrid("llava", (H, W), (view,), lead + rows * cols, meta={"view_size": cur, "lead": lead})


# ------------------------------------------------------------------------------------------------
# LLaVA-NeXT / LLaVA-OneVision (anyres)
def _anyres_view(H, W, pinpoints, tile, n, patch, offset, max_num_patches, name="anyres"):
    """The high-resolution view: best pinpoint canvas, aspect-preserving resize + centred zero pad,
    tiles of ``tile`` px holding n x n cells of ``patch`` px each, assembled into one grid; padding
    rows/cols removed as the processor counts them; optional OneVision downsizing; a newline
    position after every kept row."""
    pinpoints = [tuple(int(x) for x in pp) for pp in pinpoints]
    bh, bw = _tf("select_best_resolution")((H, W), pinpoints)
    if bh % tile or bw % tile:
        raise ValueError(f"image_grid_pinpoints entry {(bh, bw)} is not a multiple of the tile size {tile}")
    first = _tf("ChannelDimension").FIRST
    nh, nw = _tf("get_patch_output_size")(_dummy(H, W), (bh, bw), first)
    mp = _Map().scale(nw / W, nh / H).shift((bw - nw) // 2, (bh - nh) // 2)
    cur_h, cur_w = n * (bh // tile), n * (bw // tile)
    # transformers' own unpadding of the feature grid (it crops the same padding from both sides)
    kh, kw = _tf("unpad_image")(_dummy(cur_h, cur_w), (H, W)).shape[1:]
    r0, c0 = (cur_h - kh) // 2, (cur_w - kw) // 2
    oh, ow = kh, kw
    if max_num_patches is not None:  # OneVision: bilinear downsizing when above max_num_patches tiles
        # the processor's own count (its unpadding, then the downsized rows x cols) for a stand-in
        # processor holding only the attribute the method reads
        stub = SimpleNamespace(vision_aspect_ratio=f"anyres_max_{int(max_num_patches)}")
        feats, oh = _tf("LlavaOnevisionProcessor")._get_unpadded_features(
            stub, H, W, n, n, bh // tile, bw // tile)
        ow = feats // oh if oh else 0  # a sliver image can lose every row: no cells, no newlines

    def g(u: float, end: bool) -> float:  # feature coordinate -> canvas px (cells end short of tiles)
        t = (math.ceil(u / n) - 1) if end else math.floor(u / n)
        return t * tile + (u - t * n) * patch

    def spans(lo, k, out):
        return tuple((g(lo + i * k / out, False), g(lo + (i + 1) * k / out, True)) for i in range(out))

    view = mp.view(
        H,
        W,
        oh,
        ow,
        patch,
        patch,
        offset,
        ow + 1,
        name,
        content=mp.rect(H, W),
        row_spans=spans(r0, kh, oh),
        col_spans=spans(c0, kw, ow),
    )
    return view, {
        "best_resolution": (bh, bw),
        "resized": (nh, nw),
        "features": (cur_h, cur_w),
        "kept": (kh, kw),
        "grid": (oh, ow),
    }


def _base_view(H, W, tile, n, patch, offset):
    return _Map().scale(tile / W, tile / H).view(H, W, n, n, patch, patch, offset, n, "base")


def llava_next(
    image_size,
    *,
    image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    tile_size: int = 336,
    patch_size: int = 14,
    num_additional_image_tokens: int = 0,
    vision_feature_select_strategy: str | None = None,
) -> VisualGrid:
    """Base view (image squashed to tile_size^2) then the anyres grid with a newline after each kept
    row. Run: [lead CLS] + (tile/patch)^2 base + kept_rows * (kept_cols + 1).
    ``tile_size`` defaults to the llava-v1.6 checkpoints' 336: the processor class default 224 does not
    tile its own default pinpoints."""
    H, W = _hw(image_size)
    tile, p = _pos_int(tile_size, "tile_size"), _pos_int(patch_size, "patch_size")
    lead = _lead_tokens(num_additional_image_tokens, vision_feature_select_strategy)
    n = tile // p
    base = _base_view(H, W, tile, n, p, lead)
    hi, meta = _anyres_view(H, W, image_grid_pinpoints, tile, n, p, lead + n * n, None)
    total = lead + n * n + hi.rows * (hi.cols + 1)
    return VisualGrid("llava_next", (H, W), (base, hi), total, meta={**meta, "lead": lead})


def llava_onevision(
    image_size,
    *,
    image_grid_pinpoints=ONEVISION_PINPOINTS,
    tile_size: int = 384,
    num_image_tokens: int | None = None,
    patch_size: int = 14,
    vision_aspect_ratio: str = "anyres_max_9",
    multi_image: bool = False,
    vision_feature_select_strategy: str | None = None,
) -> VisualGrid:
    """Single image: base view (27 x 27 cells of 14 px in the 384^2 squash; the last 6 px of each
    tile are not covered by any SigLIP patch) + anyres grid, bilinearly downsized when it exceeds
    ``anyres_max_N`` tiles, a newline after each row. Multi-image samples (``multi_image=True``):
    pad to square (centred), squash to the tile, 729 cells + one trailing newline."""
    H, W = _hw(image_size)
    tile, p = _pos_int(tile_size, "tile_size"), _pos_int(patch_size, "patch_size")
    if vision_feature_select_strategy == "default":
        raise ValueError(
            "vision_feature_select_strategy='default' is not a valid LLaVA-OneVision layout "
            "(SigLIP has no CLS token; the processor count drops one token)"
        )
    n = tile // p
    if num_image_tokens is not None and _square_side(int(num_image_tokens), "num_image_tokens") != n:
        raise ValueError(
            f"num_image_tokens={num_image_tokens} does not match tile_size // patch_size = {n}; "
            "pass the vision tower's patch_size"
        )
    if multi_image:
        side = max(H, W)
        mp = _Map().shift((side - W) // 2, (side - H) // 2).scale(tile / side, tile / side)
        view = mp.view(H, W, n, n, p, p, 0, n, "image")
        return VisualGrid("llava_onevision", (H, W), (view,), n * n + 1, meta={"multi_image": True})
    try:
        max_num = int(str(vision_aspect_ratio).removeprefix("anyres_max_"))
    except ValueError:
        raise ValueError(
            f"vision_aspect_ratio must look like 'anyres_max_9', got {vision_aspect_ratio!r}"
        ) from None
    base = _base_view(H, W, tile, n, p, 0)
    hi, meta = _anyres_view(H, W, image_grid_pinpoints, tile, n, p, n * n, max_num)
    total = n * n + hi.rows * (hi.cols + 1)
    return VisualGrid("llava_onevision", (H, W), (base, hi), total, meta=meta)


# ------------------------------------------------------------------------------------------------
# InternVL (GotOcr2 image processor with crop_to_patches)
def internvl(
    image_size,
    *,
    tile_size=384,
    image_seq_length: int = 256,
    crop_to_patches: bool = True,
    min_patches: int = 1,
    max_patches: int = 12,
) -> VisualGrid:
    """Tiles of tile_size (closest-aspect canvas of min..max tiles, image squashed onto it), row-major,
    then a thumbnail (whole image squashed to one tile) when there is more than one tile. Each view
    has ``image_seq_length`` tokens on a square grid (pixel shuffle 0.5). InternVL checkpoints use
    tile_size=448; 384 is the GotOcr2ImageProcessor class default."""
    H, W = _hw(image_size)
    th, tw = _hw_of(tile_size, "tile_size")
    seq = _pos_int(image_seq_length, "image_seq_length")
    side = _square_side(seq, "image_seq_length")
    views, cell_h, cell_w = [], th / side, tw / side
    if crop_to_patches and max_patches > 1:
        cols, rows = _tf("get_optimal_tiled_canvas")((H, W), (th, tw), int(min_patches), int(max_patches))
        for i in range(rows * cols):
            r, c = divmod(i, cols)
            mp = _Map().scale(cols * tw / W, rows * th / H).shift(-c * tw, -r * th)
            views.append(mp.view(H, W, side, side, cell_h, cell_w, i * seq, side, f"tile r{r} c{c}"))
        if rows * cols > 1:
            mp = _Map().scale(tw / W, th / H)
            views.append(mp.view(H, W, side, side, cell_h, cell_w, len(views) * seq, side, "thumbnail"))
        meta = {"tiles": (rows, cols)}
    else:
        views.append(_Map().scale(tw / W, th / H).view(H, W, side, side, cell_h, cell_w, 0, side, "image"))
        meta = {"tiles": (1, 1)}
    return VisualGrid("internvl", (H, W), tuple(views), len(views) * seq, meta=meta)


# ------------------------------------------------------------------------------------------------
# Idefics3 / SmolVLM
def _vision_encoder_size(h: int, w: int, m: int) -> tuple[int, int]:
    # transformers' Idefics3 resize_for_vision_encoder (a method, no size-only helper): called with a
    # stand-in self whose resize returns the size it is asked for instead of resizing
    stub = SimpleNamespace(resize=lambda image, size, resample=None: (size.height, size.width))
    return _tf("Idefics3ImageProcessorPil").resize_for_vision_encoder(stub, _dummy(h, w), m)


def idefics3(
    image_size,
    *,
    longest_edge: int = 4 * 364,
    max_image_size: int = 364,
    image_seq_len: int = 169,
    do_resize: bool = True,
    do_image_splitting: bool = True,
) -> VisualGrid:
    """Resize the longest edge to ``longest_edge``, stretch to multiples of ``max_image_size`` (M),
    cut M x M tiles row-major, then a global view (whole image squashed to M^2) last; a single view
    when the image fits one tile. Each view is its own placeholder run of ``image_seq_len`` tokens
    (separators and ``<row_i_col_j>`` tags between runs are not part of ``num_tokens``).
    SmolVLM checkpoints: e.g. longest_edge=1536, max_image_size=384, image_seq_len=64."""
    H, W = _hw(image_size)
    M = _pos_int(max_image_size, "max_image_size")
    seq = _pos_int(image_seq_len, "image_seq_len")
    side = _square_side(seq, "image_seq_len")
    cell = M / side
    h, w = H, W
    if do_resize:
        h, w = _tf("idefics3_output_size")(
            _dummy(H, W), resolution_max_side=_pos_int(longest_edge, "longest_edge")
        )
    rows = cols = 0
    views: list[GridView] = []
    if do_image_splitting:
        h, w = _vision_encoder_size(h, w, M)
        if h > M or w > M:
            rows, cols = (h - M) // M + 1, (w - M) // M + 1
            for r in range(rows):
                for c in range(cols):
                    mp = _Map().scale(w / W, h / H).shift(-c * M, -r * M)
                    views.append(
                        mp.view(H, W, side, side, cell, cell, len(views) * seq, side, f"tile r{r} c{c}")
                    )
            views.append(
                _Map()
                .scale(M / W, M / H)
                .view(H, W, side, side, cell, cell, len(views) * seq, side, "global")
            )
        else:
            views.append(
                _Map().scale(w / W, h / H).view(H, W, side, side, h / side, w / side, 0, side, "image")
            )
    else:
        views.append(_Map().scale(M / W, M / H).view(H, W, side, side, cell, cell, 0, side, "image"))
    segments = tuple((i * seq, seq) for i in range(len(views)))
    return VisualGrid(
        "idefics3",
        (H, W),
        tuple(views),
        len(views) * seq,
        meta={"rows": rows, "cols": cols},
        segments=segments,
    )


# ------------------------------------------------------------------------------------------------
# Gemma 3
def _pan_and_scan_crops(H, W, min_crop, max_crops, min_ratio):
    """(top, left, h, w) of each pan-and-scan crop, from Gemma3ImageProcessor.pan_and_scan itself:
    fed index images (row / column numbers), the slices it returns tell where they start."""
    pas = _tf("Gemma3ImageProcessorPil").pan_and_scan
    kw = {
        "pan_and_scan_min_crop_size": min_crop,
        "pan_and_scan_max_num_crops": max_crops,
        "pan_and_scan_min_ratio_to_activate": min_ratio,
    }
    ys = pas(None, _dummy(H, W, np.arange(H, dtype=np.int64)[:, None]), **kw)
    xs = pas(None, _dummy(H, W, np.arange(W, dtype=np.int64)[None, :]), **kw)
    return [(int(y[0, 0, 0]), int(x[0, 0, 0]), y.shape[1], y.shape[2]) for y, x in zip(ys, xs)]


def gemma3(
    image_size,
    *,
    size=224,
    image_seq_length: int = 256,
    do_pan_and_scan: bool = False,
    pan_and_scan_min_crop_size: int = 256,
    pan_and_scan_max_num_crops: int = 4,
    pan_and_scan_min_ratio_to_activate: float = 1.2,
) -> VisualGrid:
    """The image squashed to ``size`` (Gemma 3 checkpoints: 896), ``image_seq_length`` tokens on a
    square grid (4x4 average pooling of 14 px patches). With pan-and-scan, each crop is a further
    view, squashed the same way; every view is its own placeholder run (text sits between them)."""
    H, W = _hw(image_size)
    sh, sw = _hw_of(size, "size")
    seq = _pos_int(image_seq_length, "image_seq_length")
    side = _square_side(seq, "image_seq_length")
    views = [_Map().scale(sw / W, sh / H).view(H, W, side, side, sh / side, sw / side, 0, side, "image")]
    if do_pan_and_scan:
        for i, (t, l, ch, cw) in enumerate(
            _pan_and_scan_crops(
                H,
                W,
                pan_and_scan_min_crop_size,
                pan_and_scan_max_num_crops,
                pan_and_scan_min_ratio_to_activate,
            )
        ):
            mp = _Map().shift(-l, -t).scale(sw / cw, sh / ch)
            views.append(
                mp.view(
                    H, W, side, side, sh / side, sw / side, (i + 1) * seq, side, f"crop {i}", content=None
                )
            )
    segments = tuple((i * seq, seq) for i in range(len(views)))
    return VisualGrid(
        "gemma3",
        (H, W),
        tuple(views),
        len(views) * seq,
        meta={"num_crops": len(views) - 1},
        segments=segments,
    )


# ------------------------------------------------------------------------------------------------
# Pixtral / Mistral 3
def pixtral(
    image_size,
    *,
    patch_size: int = 16,
    spatial_merge_size: int = 1,
    longest_edge: int = 1024,
    resized_size=None,
) -> VisualGrid:
    """Scale down (floor) to fit ``longest_edge``, round up to multiples of patch * merge (the image is
    stretched onto that size); ``gw`` tokens then ``[IMG_BREAK]`` per row, the last row ending in
    ``[IMG_END]``: position r * (gw + 1) + c. ``resized_size``: the processor's ``image_sizes`` entry,
    used instead of recomputing. Mistral 3 checkpoints: patch_size=14, spatial_merge_size=2,
    longest_edge=1540."""
    H, W = _hw(image_size)
    f = _pos_int(patch_size, "patch_size") * _pos_int(spatial_merge_size, "spatial_merge_size")
    if resized_size is None:
        first = _tf("ChannelDimension").FIRST
        le = _pos_int(longest_edge, "longest_edge")
        rh, rw = _tf("pixtral_output_size")(
            _dummy(H, W), size=(le, le), patch_size=(f, f), input_data_format=first
        )
    else:
        rh, rw = _hw(resized_size, "resized_size")
    gh, gw = rh // f, rw // f
    view = _Map().scale(rw / W, rh / H).view(H, W, gh, gw, f, f, 0, gw + 1, "image")
    segments = tuple((r * (gw + 1), gw) for r in range(gh))
    return VisualGrid(
        "pixtral", (H, W), (view,), gh * (gw + 1), meta={"resized": (rh, rw)}, segments=segments
    )


# ------------------------------------------------------------------------------------------------
# from_processor
_PROCESSORS = {
    "Qwen2VLProcessor": "qwen2_vl",
    "Qwen2_5_VLProcessor": "qwen2_vl",
    "Qwen3VLProcessor": "qwen2_vl",
    "LlavaProcessor": "llava",
    "LlavaNextProcessor": "llava_next",
    "LlavaOnevisionProcessor": "llava_onevision",
    "InternVLProcessor": "internvl",
    "Idefics3Processor": "idefics3",
    "SmolVLMProcessor": "idefics3",
    "Gemma3Processor": "gemma3",
    "PixtralProcessor": "pixtral",
}
_IMAGE_PROCESSORS = {"Qwen2VLImageProcessor": "qwen2_vl"}


def detect_family(processor) -> str:
    """Family name of a processor (or of a Qwen2-VL image processor), by class hierarchy."""
    for klass in type(processor).__mro__:
        if klass.__name__ in _PROCESSORS:
            return _PROCESSORS[klass.__name__]
    for klass in type(processor).__mro__:
        name = klass.__name__
        for suffix in ("Pil", "Fast"):
            name = name.removesuffix(suffix)
        if name in _IMAGE_PROCESSORS:
            return _IMAGE_PROCESSORS[name]
    raise TypeError(
        f"processor: unsupported class {type(processor).__name__}; supported processors: "
        f"{', '.join(sorted(_PROCESSORS))} (image processors alone: Qwen2VLImageProcessor). Mllama and "
        "Florence-2 have no per-patch visual tokens in the decoder sequence."
    )


def image_hw(image_or_size) -> tuple[int, int]:
    """(H, W) of a PIL image, an array / tensor ((H, W), (H, W, C) or (C, H, W)) or an (H, W) pair."""
    if (
        hasattr(image_or_size, "size")
        and hasattr(image_or_size, "mode")
        and hasattr(image_or_size, "getbands")
    ):
        return int(image_or_size.height), int(image_or_size.width)  # PIL
    if hasattr(image_or_size, "shape") and len(image_or_size.shape) in (2, 3):
        arr = image_or_size
        if len(arr.shape) == 2:
            return _hw(tuple(arr.shape), "image_or_size")
        get_size = _tf_attr(("transformers.image_utils",), "get_image_size")
        a = arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr)
        return _hw(tuple(get_size(a)), "image_or_size")
    if isinstance(image_or_size, (tuple, list)) and len(image_or_size) == 2:
        return _hw(image_or_size, "image_or_size")
    raise ValueError(
        f"image_or_size must be a PIL image, an image array or (H, W), got {type(image_or_size).__name__}"
    )


def _row(outputs, key: str, index: int):
    if outputs is None:
        return None
    try:
        val = outputs[key]
    except (KeyError, TypeError):
        return None
    if val is None:
        return None
    try:
        n = len(val)
    except TypeError:
        return None
    if not 0 <= index < n:
        raise ValueError(f"index={index} is out of range: outputs[{key!r}] has {n} images")
    row = val[index]
    return row.tolist() if hasattr(row, "tolist") else row


class _Settings:
    """Effective image-processing settings of a processor call: call kwargs > the processor's class
    defaults (``images_kwargs``) > the image processor's attributes (transformers' merge order)."""

    def __init__(self, processor, images_kwargs):
        self.proc = processor
        self.ip = getattr(processor, "image_processor", processor)
        self.call = dict(images_kwargs or {})
        pk = getattr(type(processor), "images_kwargs", None)
        self.defaults = dict(pk) if isinstance(pk, Mapping) else {}

    def __call__(self, key: str, default: Any = None) -> Any:
        for src in (self.call, self.defaults):
            if key in src and src[key] is not None:
                return src[key]
        v = getattr(self.ip, key, None)
        return default if v is None else v

    def proc_attr(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        v = getattr(self.proc, key, None)
        if v is None and required:
            raise ValueError(f"processor.{key} is not set; build the processor with it (checkpoints set it)")
        return default if v is None else v


def _mismatch(what, got, expected, hint=""):
    raise ValueError(
        f"outputs[{what!r}] = {got} does not match the image size under this processor's settings "
        f"(expected {expected}): wrong image / index, or processor call kwargs not passed as images_kwargs"
        + (f"; {hint}" if hint else "")
    )


def grid_from_processor(
    processor, image_or_size, outputs=None, index: int = 0, *, images_kwargs=None
) -> VisualGrid:
    """Build the grid of image ``index`` (flat over the batch) from a processor, the image (or its
    (H, W)) and the processor's outputs. Settings come from the processor object (not class
    defaults); values present in ``outputs`` are used and cross-checked (a mismatch raises).
    ``images_kwargs``: image kwargs you passed to the processor call, if any."""
    fam = detect_family(processor)
    H, W = image_hw(image_or_size)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    s = _Settings(processor, images_kwargs)
    return _FROM_PROCESSOR[fam](s, H, W, outputs, int(index))


def _fp_qwen(s: _Settings, H, W, outputs, index):
    p, m = int(s("patch_size", 14)), int(s("merge_size", 2))
    size = _size(s("size"), "size", square_int=False)
    lo = s("min_pixels") or size.get("shortest_edge")
    hi = s("max_pixels") or size.get("longest_edge")
    rh, rw = _tf("smart_resize")(H, W, factor=p * m, min_pixels=lo, max_pixels=hi)
    thw = _row(outputs, "image_grid_thw", index)
    if thw is None:
        thw = (1, rh // p, rw // p)
    elif tuple(int(x) for x in thw)[1:] != (rh // p, rw // p):
        _mismatch("image_grid_thw", list(thw), [1, rh // p, rw // p])
    return qwen2_vl((H, W), thw, patch_size=p, merge_size=m)


def _fp_llava(s: _Settings, H, W, outputs, index):
    g = llava(
        (H, W),
        size=s("size"),
        crop_size=s("crop_size"),
        do_resize=bool(s("do_resize", True)),
        do_center_crop=bool(s("do_center_crop", False)),
        do_pad=bool(s("do_pad", False)),
        patch_size=s.proc_attr("patch_size", required=True),
        num_additional_image_tokens=s.proc_attr("num_additional_image_tokens", 0),
        vision_feature_select_strategy=s.proc_attr("vision_feature_select_strategy"),
        backend=str(getattr(s.ip, "backend", "pil")),
    )
    pv = _row(outputs, "pixel_values", index)
    if pv is not None:
        got = tuple(np.shape(pv)[-2:])
        if got != tuple(g.meta["view_size"]):
            _mismatch("pixel_values", f"shape {got}", tuple(g.meta["view_size"]))
    return g


def _anyres_tile(s: _Settings) -> int:
    size = _size(s("size"), "size", square_int=False)
    crop = _size(s("crop_size"), "crop_size", square_int=True)
    tile = crop.get("height") or size.get("height") or size.get("shortest_edge")
    s_tuple = (size["height"], size["width"]) if size.get("height") else (size.get("shortest_edge"),) * 2
    ok = s_tuple == (tile, tile) and (
        not s("do_center_crop") or (crop.get("height"), crop.get("width")) == (tile, tile)
    )
    if not ok:
        raise ValueError(
            f"unsupported anyres config: size={size}, crop_size={crop}; tiles are only a uniform "
            "grid when size, crop and tile are the same square"
        )
    return int(tile)


def _check_image_sizes(outputs, index, H, W):
    got = _row(outputs, "image_sizes", index)
    if got is not None and tuple(int(x) for x in got) != (H, W):
        _mismatch("image_sizes", list(got), [H, W])


def _fp_llava_next(s: _Settings, H, W, outputs, index):
    _check_image_sizes(outputs, index, H, W)
    return llava_next(
        (H, W),
        image_grid_pinpoints=s("image_grid_pinpoints", list(LLAVA_NEXT_PINPOINTS)),
        tile_size=_anyres_tile(s),
        patch_size=s.proc_attr("patch_size", required=True),
        num_additional_image_tokens=s.proc_attr("num_additional_image_tokens", 0),
        vision_feature_select_strategy=s.proc_attr("vision_feature_select_strategy"),
    )


def _fp_onevision(s: _Settings, H, W, outputs, index):
    _check_image_sizes(outputs, index, H, W)
    multi = False
    bni = outputs.get("batch_num_images") if isinstance(outputs, Mapping) else None
    if bni is not None:
        counts = [int(x) for x in (bni.tolist() if hasattr(bni, "tolist") else bni)]
        if index >= sum(counts):
            raise ValueError(f"index={index} is out of range: outputs['batch_num_images'] = {counts}")
        multi = counts[int(np.searchsorted(np.cumsum(counts), index, side="right"))] != 1
    tile = _anyres_tile(s)
    nit = s.proc_attr("num_image_tokens", required=True)
    side = _square_side(int(nit), "processor.num_image_tokens")
    return llava_onevision(
        (H, W),
        image_grid_pinpoints=s("image_grid_pinpoints", list(ONEVISION_PINPOINTS)),
        tile_size=tile,
        num_image_tokens=nit,
        patch_size=tile // side,
        vision_aspect_ratio=s.proc_attr("vision_aspect_ratio", "anyres_max_9"),
        multi_image=multi,
        vision_feature_select_strategy=s.proc_attr("vision_feature_select_strategy"),
    )


def _fp_internvl(s: _Settings, H, W, outputs, index):
    g = internvl(
        (H, W),
        tile_size=s("size"),
        image_seq_length=s.proc_attr("image_seq_length", required=True),
        crop_to_patches=bool(s("crop_to_patches", False)),
        min_patches=int(s("min_patches", 1)),
        max_patches=int(s("max_patches", 12)),
    )
    got = _row(outputs, "num_patches", index)
    if got is not None and int(got) != len(g.views):
        _mismatch("num_patches", got, len(g.views))
    return g


def _fp_idefics3(s: _Settings, H, W, outputs, index):
    size = _size(s("size"), "size", square_int=False)
    mis = _size(s("max_image_size"), "max_image_size", square_int=False)
    g = idefics3(
        (H, W),
        longest_edge=size.get("longest_edge", 4 * 364),
        max_image_size=mis.get("longest_edge", 364),
        image_seq_len=s.proc_attr("image_seq_len", required=True),
        do_resize=bool(s("do_resize", True)),
        do_image_splitting=bool(s("do_image_splitting", True)),
    )
    if isinstance(outputs, Mapping) and outputs.get("rows") is not None and outputs.get("cols") is not None:
        flat = [(int(r), int(c)) for rs, cs in zip(outputs["rows"], outputs["cols"]) for r, c in zip(rs, cs)]
        if index >= len(flat):
            raise ValueError(f"index={index} is out of range: outputs['rows'] has {len(flat)} images")
        if flat[index] != (g.meta["rows"], g.meta["cols"]):
            _mismatch("rows/cols", flat[index], (g.meta["rows"], g.meta["cols"]))
    return g


def _fp_gemma3(s: _Settings, H, W, outputs, index):
    g = gemma3(
        (H, W),
        size=s("size"),
        image_seq_length=s.proc_attr("image_seq_length", required=True),
        do_pan_and_scan=bool(s("do_pan_and_scan", False)),
        pan_and_scan_min_crop_size=int(s("pan_and_scan_min_crop_size", 256)),
        pan_and_scan_max_num_crops=int(s("pan_and_scan_max_num_crops", 4)),
        pan_and_scan_min_ratio_to_activate=float(s("pan_and_scan_min_ratio_to_activate", 1.2)),
    )
    got = _row(outputs, "num_crops", index)
    if got is not None and int(got) != g.meta["num_crops"]:
        _mismatch("num_crops", got, g.meta["num_crops"])
    return g


def _fp_pixtral(s: _Settings, H, W, outputs, index):
    p, m = int(s.proc_attr("patch_size", 16)), int(s.proc_attr("spatial_merge_size", 1))
    size = _size(s("size"), "size", square_int=False)
    g = pixtral((H, W), patch_size=p, spatial_merge_size=m, longest_edge=size.get("longest_edge", 1024))
    got = _row(outputs, "image_sizes", index)
    if got is not None and tuple(int(x) for x in got) != tuple(g.meta["resized"]):
        _mismatch("image_sizes", list(got), list(g.meta["resized"]))
    return g


_FROM_PROCESSOR = {
    "qwen2_vl": _fp_qwen,
    "llava": _fp_llava,
    "llava_next": _fp_llava_next,
    "llava_onevision": _fp_onevision,
    "internvl": _fp_internvl,
    "idefics3": _fp_idefics3,
    "gemma3": _fp_gemma3,
    "pixtral": _fp_pixtral,
}


def image_token_id(processor) -> int:
    """The id that marks visual-token positions in ``input_ids`` (``config.image_token_id``). Gemma 3's
    ``processor.image_token_id`` is the begin-of-image token, so its tokenizer's soft token is used."""
    fam = detect_family(processor)
    tok = getattr(processor, "tokenizer", None)
    if fam == "gemma3":
        tid = getattr(tok, "image_token_id", None)
    else:
        tid = getattr(processor, "image_token_id", None)
    if tid is None:
        raise ValueError(f"cannot find the image token id of {type(processor).__name__}; pass image_token_id")
    return int(tid)
