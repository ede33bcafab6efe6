"""Pixtral / Mistral 3: one view, ``[IMG_BREAK]`` after each row (one placeholder segment per row)."""

from __future__ import annotations

from dvsft_kernels.labeling.families.common import (
    PixelMap,
    ProcessorSettings,
    dummy,
    hw,
    mismatch,
    output_row,
    pos_int,
    processor_adapter,
    size_dict,
    tf,
    tf_attr,
)
from dvsft_kernels.labeling.grid import VisualGrid
from dvsft_kernels.labeling.registry import Family, register


def _output_size():
    return tf_attr(
        (
            "transformers.models.pixtral.image_processing_pil_pixtral",
            "transformers.models.pixtral.image_processing_pixtral",
        ),
        "get_resize_output_image_size",
    )


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
    H, W = hw(image_size)
    f = pos_int(patch_size, "patch_size") * pos_int(spatial_merge_size, "spatial_merge_size")
    if resized_size is None:
        first = tf("ChannelDimension").FIRST
        le = pos_int(longest_edge, "longest_edge")
        rh, rw = _output_size()(dummy(H, W), size=(le, le), patch_size=(f, f), input_data_format=first)
    else:
        rh, rw = hw(resized_size, "resized_size")
    gh, gw = rh // f, rw // f
    view = PixelMap().scale(rw / W, rh / H).view(H, W, gh, gw, f, f, 0, gw + 1, "image")
    segments = tuple((r * (gw + 1), gw) for r in range(gh))
    return VisualGrid(
        "pixtral", (H, W), (view,), gh * (gw + 1), meta={"resized": (rh, rw)}, segments=segments
    )


@processor_adapter
def from_processor(s: ProcessorSettings, H, W, outputs, index):
    p, m = int(s.proc_attr("patch_size", 16)), int(s.proc_attr("spatial_merge_size", 1))
    size = size_dict(s("size"), "size", square_int=False)
    g = pixtral((H, W), patch_size=p, spatial_merge_size=m, longest_edge=size.get("longest_edge", 1024))
    got = output_row(outputs, "image_sizes", index)
    if got is not None and tuple(int(x) for x in got) != tuple(g.meta["resized"]):
        mismatch("image_sizes", list(got), list(g.meta["resized"]))
    return g


FAMILY = register(
    Family(
        name="pixtral",
        aliases=("mistral3",),
        processors=("PixtralProcessor",),
        build=pixtral,
        from_processor=from_processor,
        description="Pixtral / Mistral 3",
    )
)
