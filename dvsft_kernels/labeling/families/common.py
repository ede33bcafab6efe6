"""Helpers shared by the family modules: transformers look-ups, argument checks, the pixel map that
views are built from, the LLaVA anyres pieces, and reading a processor's settings.

Resize arithmetic calls transformers' own functions (``smart_resize``, ``select_best_resolution``,
``get_patch_output_size``, ``get_optimal_tiled_canvas``, ...) on zero-stride stand-in images
(:func:`dummy`); LLaVA-NeXT unpadding calls the modeling file's ``unpad_image``. The steps
transformers only has as methods (OneVision's downsizing in
``LlavaOnevisionProcessor._get_unpadded_features``, Idefics3's ``resize_for_vision_encoder``) are
called unbound with a stand-in ``self`` holding the one attribute each reads; tests pin all of it
against the real processors.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from dvsft_kernels.labeling.grid import GridView, VisualGrid


# ------------------------------------------------------------------------------------------------
# transformers imports (guarded: the PIL modules need no torchvision; fall back to the others)
def tf_attr(modules: Sequence[str], name: str):
    """``name`` from the first of ``modules`` that has it (ImportError naming all tried otherwise)."""
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


# the transformers names used by more than one family; a family's own ones are looked up in its module
_TF_SHARED = {
    "get_resize_output_image_size": ("transformers.image_transforms",),
    "get_size_with_aspect_ratio": ("transformers.image_transforms",),
    "select_best_resolution": ("transformers.image_processing_utils",),
    "get_patch_output_size": ("transformers.image_processing_utils",),
    "get_image_size_for_max_height_width": ("transformers.image_utils",),
    "ChannelDimension": ("transformers.image_utils",),
    "unpad_image": ("transformers.models.llava_next.modeling_llava_next",),
    "LlavaOnevisionProcessor": ("transformers.models.llava_onevision.processing_llava_onevision",),
}


def tf(name: str):
    """One of the shared transformers names (``ChannelDimension``, ``select_best_resolution``, ...)."""
    return tf_attr(_TF_SHARED[name], name)


def dummy(h: int, w: int, fill=None) -> np.ndarray:
    """A (1, h, w) channels-first 'image' with zero strides: transformers' size helpers only read
    its shape, so no pixel memory is allocated."""
    base = np.zeros((), np.uint8) if fill is None else fill
    return np.broadcast_to(base, (1, h, w))


# ------------------------------------------------------------------------------------------------
# argument checking
def pos_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def hw(image_size, name: str = "image_size") -> tuple[int, int]:
    """``(H, W)`` as two positive ints (ValueError naming ``name`` otherwise)."""
    try:
        h, w = image_size
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (H, W), got {image_size!r}") from None
    return pos_int(as_int(h, name), f"{name}[0] (H)"), pos_int(as_int(w, name), f"{name}[1] (W)")


def as_int(v, name):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must hold ints, got {v!r}")
    return int(v)


_SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")


def size_dict(v, name: str, *, square_int: bool) -> dict:
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
    return {k: pos_int(as_int(x, name), f"{name}[{k!r}]") for k, x in d.items()}


def hw_of(v, name: str) -> tuple[int, int]:
    """(height, width) of a processor size that must give both."""
    d = size_dict(v, name, square_int=True)
    if "height" not in d or "width" not in d:
        raise ValueError(f"{name} must give height and width, got {v!r}")
    return d["height"], d["width"]


def square_side(n: int, name: str) -> int:
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"{name}={n} is not a square number of tokens per view")
    return s


# ------------------------------------------------------------------------------------------------
class PixelMap:
    """Axis-aligned affine map original px -> current px, x' = x * sx - ox (composed step by step)."""

    def __init__(self):
        self.sx, self.sy, self.ox, self.oy = 1.0, 1.0, 0.0, 0.0

    def scale(self, kx: float, ky: float) -> PixelMap:
        self.sx, self.ox, self.sy, self.oy = self.sx * kx, self.ox * kx, self.sy * ky, self.oy * ky
        return self

    def shift(self, dx: float, dy: float) -> PixelMap:  # content moves by (+dx, +dy): paste / pad
        self.ox, self.oy = self.ox - dx, self.oy - dy
        return self

    def copy(self) -> PixelMap:
        m = PixelMap()
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


def resized(cur: tuple[int, int], size: dict) -> tuple[int, int]:
    """Output size of the PIL/torchvision backends' ``resize`` for a size dict (same branch order)."""
    h, w = cur
    first = tf("ChannelDimension").FIRST
    if size.get("shortest_edge") and size.get("longest_edge"):
        return tuple(tf("get_size_with_aspect_ratio")((h, w), size["shortest_edge"], size["longest_edge"]))
    if size.get("shortest_edge"):
        return tuple(
            tf("get_resize_output_image_size")(
                dummy(h, w), size=size["shortest_edge"], default_to_square=False, input_data_format=first
            )
        )
    if size.get("max_height") and size.get("max_width"):
        return tuple(tf("get_image_size_for_max_height_width")((h, w), size["max_height"], size["max_width"]))
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise ValueError(f"size must have shortest_edge, max_height/max_width or height/width, got {size}")


def crop_origin(cur: int, crop: int, backend: str) -> int:
    """Where ``center_crop`` starts along one axis (negative: the image is padded by -result).
    The PIL backend pads ceil(d/2) before, torchvision floor(d/2)."""
    if crop <= cur:
        return (cur - crop) // 2
    d = crop - cur
    return -((d + 1) // 2) if backend == "pil" else -(d // 2)


# ------------------------------------------------------------------------------------------------
# LLaVA family (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision)
def lead_tokens(num_additional_image_tokens, vision_feature_select_strategy) -> int:
    """Leading positions of a CLIP-style run that are no patch (CLS kept by the ``"full"`` strategy)."""
    extra = int(num_additional_image_tokens or 0)
    lead = extra - (1 if vision_feature_select_strategy == "default" else 0)
    if lead < 0:
        raise ValueError(
            "vision_feature_select_strategy='default' drops a CLS token but "
            f"num_additional_image_tokens={extra}: the processor's placeholder count would be one "
            "short of the patch grid; set num_additional_image_tokens=1 (CLIP) as in LLaVA checkpoints"
        )
    return lead


def anyres_view(H, W, pinpoints, tile, n, patch, offset, max_num_patches, name="anyres"):
    """The high-resolution view: best pinpoint canvas, aspect-preserving resize + centred zero pad,
    tiles of ``tile`` px holding n x n cells of ``patch`` px each, assembled into one grid; padding
    rows/cols removed as the processor counts them; optional OneVision downsizing; a newline
    position after every kept row."""
    pinpoints = [tuple(int(x) for x in pp) for pp in pinpoints]
    bh, bw = tf("select_best_resolution")((H, W), pinpoints)
    if bh % tile or bw % tile:
        raise ValueError(f"image_grid_pinpoints entry {(bh, bw)} is not a multiple of the tile size {tile}")
    first = tf("ChannelDimension").FIRST
    nh, nw = tf("get_patch_output_size")(dummy(H, W), (bh, bw), first)
    mp = PixelMap().scale(nw / W, nh / H).shift((bw - nw) // 2, (bh - nh) // 2)
    cur_h, cur_w = n * (bh // tile), n * (bw // tile)
    # transformers' own unpadding of the feature grid (it crops the same padding from both sides)
    kh, kw = tf("unpad_image")(dummy(cur_h, cur_w), (H, W)).shape[1:]
    r0, c0 = (cur_h - kh) // 2, (cur_w - kw) // 2
    oh, ow = kh, kw
    if max_num_patches is not None:  # OneVision: bilinear downsizing when above max_num_patches tiles
        # the processor's own count (its unpadding, then the downsized rows x cols) for a stand-in
        # processor holding only the attribute the method reads
        stub = SimpleNamespace(vision_aspect_ratio=f"anyres_max_{int(max_num_patches)}")
        feats, oh = tf("LlavaOnevisionProcessor")._get_unpadded_features(
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


def base_view(H, W, tile, n, patch, offset):
    """The anyres base view: the whole image squashed to one tile, n x n cells of ``patch`` px."""
    return PixelMap().scale(tile / W, tile / H).view(H, W, n, n, patch, patch, offset, n, "base")


# ------------------------------------------------------------------------------------------------
# from_processor
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
            return hw(tuple(arr.shape), "image_or_size")
        get_size = tf_attr(("transformers.image_utils",), "get_image_size")
        a = arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr)
        return hw(tuple(get_size(a)), "image_or_size")
    if isinstance(image_or_size, (tuple, list)) and len(image_or_size) == 2:
        return hw(image_or_size, "image_or_size")
    raise ValueError(
        f"image_or_size must be a PIL image, an image array or (H, W), got {type(image_or_size).__name__}"
    )


def output_row(outputs, key: str, index: int):
    """``outputs[key][index]`` as a list (None when the processor output has no such key)."""
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


class ProcessorSettings:
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


def mismatch(what, got, expected, hint=""):
    """Raise: a processor output disagrees with the grid computed from the settings."""
    raise ValueError(
        f"outputs[{what!r}] = {got} does not match the image size under this processor's settings "
        f"(expected {expected}): wrong image / index, or processor call kwargs not passed as images_kwargs"
        + (f"; {hint}" if hint else "")
    )


def processor_adapter(
    fn: Callable[[ProcessorSettings, int, int, Any, int], VisualGrid],
) -> Callable[..., VisualGrid]:
    """A ``Family.from_processor`` from ``fn(settings, H, W, outputs, index)``: the wrapper takes
    ``(processor, image_or_size, outputs=None, index=0, *, images_kwargs=None)``, reads (H, W),
    checks ``index`` and gathers the call's :class:`ProcessorSettings`."""

    @functools.wraps(fn)
    def from_processor(processor, image_or_size, outputs=None, index: int = 0, *, images_kwargs=None):
        H, W = image_hw(image_or_size)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"index must be a non-negative int, got {index!r}")
        return fn(ProcessorSettings(processor, images_kwargs), H, W, outputs, int(index))

    return from_processor


def anyres_tile(s: ProcessorSettings) -> int:
    """The tile side of a LLaVA-NeXT / OneVision processor (size, crop and tile one square)."""
    size = size_dict(s("size"), "size", square_int=False)
    crop = size_dict(s("crop_size"), "crop_size", square_int=True)
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


def check_image_sizes(outputs, index, H, W):
    """Cross-check ``outputs['image_sizes'][index]`` (the original size) against (H, W)."""
    got = output_row(outputs, "image_sizes", index)
    if got is not None and tuple(int(x) for x in got) != (H, W):
        mismatch("image_sizes", list(got), [H, W])
