"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL: one view, the image squashed by ``smart_resize``."""

from __future__ import annotations

import numpy as np

from dvsft_kernels.labeling.families.common import (
    PixelMap,
    ProcessorSettings,
    as_int,
    hw,
    mismatch,
    output_row,
    pos_int,
    processor_adapter,
    size_dict,
    tf_attr,
)
from dvsft_kernels.labeling.grid import VisualGrid
from dvsft_kernels.labeling.registry import Family, register


def qwen2_vl(image_size, image_grid_thw, *, patch_size: int = 14, merge_size: int = 2) -> VisualGrid:
    """One view: the image squashed to (grid_h * patch, grid_w * patch) (``smart_resize``), cells of
    patch * merge px, ``grid_h * grid_w / merge**2`` tokens row-major over the merged grid."""
    H, W = hw(image_size)
    p, m = pos_int(patch_size, "patch_size"), pos_int(merge_size, "merge_size")
    thw = np.asarray(
        image_grid_thw.tolist() if hasattr(image_grid_thw, "tolist") else image_grid_thw
    ).reshape(-1)
    if thw.size != 3:
        raise ValueError(f"image_grid_thw must be (t, grid_h, grid_w), got {image_grid_thw!r}")
    t, gh, gw = (pos_int(as_int(x, "image_grid_thw"), "image_grid_thw") for x in thw)
    if t != 1:
        raise ValueError(f"image_grid_thw: t={t}; only still images (t == 1) are labeled")
    if gh % m or gw % m:
        raise ValueError(f"image_grid_thw grid {gh}x{gw} is not divisible by merge_size={m}")
    rows, cols, cell = gh // m, gw // m, p * m
    mp = PixelMap().scale(gw * p / W, gh * p / H)
    view = mp.view(H, W, rows, cols, cell, cell, 0, cols, "image")
    return VisualGrid("qwen2_vl", (H, W), (view,), rows * cols, meta={"resized": (gh * p, gw * p)})


def _smart_resize():
    return tf_attr(
        (
            "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
            "transformers.models.qwen2_vl.image_processing_qwen2_vl",
        ),
        "smart_resize",
    )


@processor_adapter
def from_processor(s: ProcessorSettings, H, W, outputs, index):
    p, m = int(s("patch_size", 14)), int(s("merge_size", 2))
    size = size_dict(s("size"), "size", square_int=False)
    lo = s("min_pixels") or size.get("shortest_edge")
    hi = s("max_pixels") or size.get("longest_edge")
    rh, rw = _smart_resize()(H, W, factor=p * m, min_pixels=lo, max_pixels=hi)
    thw = output_row(outputs, "image_grid_thw", index)
    if thw is None:
        thw = (1, rh // p, rw // p)
    elif tuple(int(x) for x in thw)[1:] != (rh // p, rw // p):
        mismatch("image_grid_thw", list(thw), [1, rh // p, rw // p])
    return qwen2_vl((H, W), thw, patch_size=p, merge_size=m)


# Qwen3-VL is the one Qwen model whose patch differs from the image processor class default (16, not 14)
_NAME_SETTINGS = {"qwen3_vl": {"patch_size": 16}}


def default_processor(name: str):
    """transformers' Qwen2-VL image processor with its class defaults (``image_grid_thw`` for an
    image), Qwen3-VL's patch for ``qwen3_vl``. The PIL backend computes the same sizes and needs no
    torchvision (nor warns about it)."""
    import transformers

    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return cls(**_NAME_SETTINGS.get(name, {}))


FAMILY = register(
    Family(
        name="qwen2_vl",
        aliases=("qwen2_5_vl", "qwen3_vl"),
        processors=("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor"),
        image_processors=("Qwen2VLImageProcessor",),
        build=qwen2_vl,
        from_processor=from_processor,
        default_processor=default_processor,
        description="Qwen2-VL / Qwen2.5-VL / Qwen3-VL",
    )
)
