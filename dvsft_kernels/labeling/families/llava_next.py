"""LLaVA-NeXT (anyres): a base view, then the anyres grid with a newline after each kept row."""

from __future__ import annotations

from dvsft_kernels.labeling.families.common import (
    ProcessorSettings,
    anyres_tile,
    anyres_view,
    base_view,
    check_image_sizes,
    hw,
    lead_tokens,
    pos_int,
    processor_adapter,
)
from dvsft_kernels.labeling.grid import VisualGrid
from dvsft_kernels.labeling.registry import Family, register

# transformers' processor class default (5.x); checkpoints override it
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


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
    H, W = hw(image_size)
    tile, p = pos_int(tile_size, "tile_size"), pos_int(patch_size, "patch_size")
    lead = lead_tokens(num_additional_image_tokens, vision_feature_select_strategy)
    n = tile // p
    base = base_view(H, W, tile, n, p, lead)
    hi, meta = anyres_view(H, W, image_grid_pinpoints, tile, n, p, lead + n * n, None)
    total = lead + n * n + hi.rows * (hi.cols + 1)
    return VisualGrid("llava_next", (H, W), (base, hi), total, meta={**meta, "lead": lead})


@processor_adapter
def from_processor(s: ProcessorSettings, H, W, outputs, index):
    check_image_sizes(outputs, index, H, W)
    return llava_next(
        (H, W),
        image_grid_pinpoints=s("image_grid_pinpoints", list(LLAVA_NEXT_PINPOINTS)),
        tile_size=anyres_tile(s),
        patch_size=s.proc_attr("patch_size", required=True),
        num_additional_image_tokens=s.proc_attr("num_additional_image_tokens", 0),
        vision_feature_select_strategy=s.proc_attr("vision_feature_select_strategy"),
    )


FAMILY = register(
    Family(
        name="llava_next",
        processors=("LlavaNextProcessor",),
        build=llava_next,
        from_processor=from_processor,
        description="LLaVA-NeXT",
    )
)
