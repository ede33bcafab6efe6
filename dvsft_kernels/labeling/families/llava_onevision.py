"""LLaVA-OneVision: base view + downsized anyres grid (one image), or one padded view (several)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dvsft_kernels.labeling.families.common import (
    PixelMap,
    ProcessorSettings,
    anyres_tile,
    anyres_view,
    base_view,
    check_image_sizes,
    hw,
    pos_int,
    processor_adapter,
    square_side,
)
from dvsft_kernels.labeling.grid import VisualGrid
from dvsft_kernels.labeling.registry import Family, register

# transformers' processor class default (5.x); checkpoints override it
ONEVISION_PINPOINTS = tuple((h, w) for h in range(384, 2305, 384) for w in range(384, 2305, 384))


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
    H, W = hw(image_size)
    tile, p = pos_int(tile_size, "tile_size"), pos_int(patch_size, "patch_size")
    if vision_feature_select_strategy == "default":
        raise ValueError(
            "vision_feature_select_strategy='default' is not a valid LLaVA-OneVision layout "
            "(SigLIP has no CLS token; the processor count drops one token)"
        )
    n = tile // p
    if num_image_tokens is not None and square_side(int(num_image_tokens), "num_image_tokens") != n:
        raise ValueError(
            f"num_image_tokens={num_image_tokens} does not match tile_size // patch_size = {n}; "
            "pass the vision tower's patch_size"
        )
    if multi_image:
        side = max(H, W)
        mp = PixelMap().shift((side - W) // 2, (side - H) // 2).scale(tile / side, tile / side)
        view = mp.view(H, W, n, n, p, p, 0, n, "image")
        return VisualGrid("llava_onevision", (H, W), (view,), n * n + 1, meta={"multi_image": True})
    try:
        max_num = int(str(vision_aspect_ratio).removeprefix("anyres_max_"))
    except ValueError:
        raise ValueError(
            f"vision_aspect_ratio must look like 'anyres_max_9', got {vision_aspect_ratio!r}"
        ) from None
    base = base_view(H, W, tile, n, p, 0)
    hi, meta = anyres_view(H, W, image_grid_pinpoints, tile, n, p, n * n, max_num)
    total = n * n + hi.rows * (hi.cols + 1)
    return VisualGrid("llava_onevision", (H, W), (base, hi), total, meta=meta)


@processor_adapter
def from_processor(s: ProcessorSettings, H, W, outputs, index):
    check_image_sizes(outputs, index, H, W)
    multi = False
    bni = outputs.get("batch_num_images") if isinstance(outputs, Mapping) else None
    if bni is not None:
        counts = [int(x) for x in (bni.tolist() if hasattr(bni, "tolist") else bni)]
        if index >= sum(counts):
            raise ValueError(f"index={index} is out of range: outputs['batch_num_images'] = {counts}")
        multi = counts[int(np.searchsorted(np.cumsum(counts), index, side="right"))] != 1
    tile = anyres_tile(s)
    nit = s.proc_attr("num_image_tokens", required=True)
    side = square_side(int(nit), "processor.num_image_tokens")
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


FAMILY = register(
    Family(
        name="llava_onevision",
        processors=("LlavaOnevisionProcessor",),
        build=llava_onevision,
        from_processor=from_processor,
        description="LLaVA-OneVision",
    )
)
