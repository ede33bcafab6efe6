"""LLaVA-1.5: optional pad to square, resize, centre crop, one patch grid."""

from __future__ import annotations

import numpy as np

from dvsft_kernels.labeling.families.common import (
    PixelMap,
    ProcessorSettings,
    crop_origin,
    hw,
    hw_of,
    lead_tokens,
    mismatch,
    output_row,
    pos_int,
    processor_adapter,
    resized,
    size_dict,
)
from dvsft_kernels.labeling.grid import VisualGrid
from dvsft_kernels.labeling.registry import Family, register


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
    H, W = hw(image_size)
    p = pos_int(patch_size, "patch_size")
    lead = lead_tokens(num_additional_image_tokens, vision_feature_select_strategy)
    mp, cur = PixelMap(), (H, W)
    if do_pad and H != W:  # pad_to_square: centred, before resizing
        side = max(H, W)
        mp.shift((side - W) // 2, (side - H) // 2)
        cur = (side, side)
    if do_resize:
        new = resized(cur, size_dict(size, "size", square_int=False))
        mp.scale(new[1] / cur[1], new[0] / cur[0])
        cur = new
    if do_center_crop:
        ch, cw = hw_of(crop_size, "crop_size")
        mp.shift(-crop_origin(cur[1], cw, backend), -crop_origin(cur[0], ch, backend))
        cur = (ch, cw)
    rows, cols = cur[0] // p, cur[1] // p
    view = mp.view(H, W, rows, cols, p, p, lead, cols, "image")
    return VisualGrid("llava", (H, W), (view,), lead + rows * cols, meta={"view_size": cur, "lead": lead})


@processor_adapter
def from_processor(s: ProcessorSettings, H, W, outputs, index):
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
    pv = output_row(outputs, "pixel_values", index)
    if pv is not None:
        got = tuple(np.shape(pv)[-2:])
        if got != tuple(g.meta["view_size"]):
            mismatch("pixel_values", f"shape {got}", tuple(g.meta["view_size"]))
    return g


FAMILY = register(
    Family(
        name="llava",
        processors=("LlavaProcessor",),
        build=llava,
        from_processor=from_processor,
        description="LLaVA-1.5",
    )
)
