"""InternVL (GotOcr2 image processor with ``crop_to_patches``): tiles, then a thumbnail."""

from __future__ import annotations

from dvsft_kernels.labeling.families.common import (
    PixelMap,
    ProcessorSettings,
    hw,
    hw_of,
    mismatch,
    output_row,
    pos_int,
    processor_adapter,
    square_side,
    tf_attr,
)
from dvsft_kernels.labeling.grid import VisualGrid
from dvsft_kernels.labeling.registry import Family, register


def _optimal_tiled_canvas():
    return tf_attr(
        (
            "transformers.models.got_ocr2.image_processing_pil_got_ocr2",
            "transformers.models.got_ocr2.image_processing_got_ocr2",
        ),
        "get_optimal_tiled_canvas",
    )


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
    H, W = hw(image_size)
    th, tw = hw_of(tile_size, "tile_size")
    seq = pos_int(image_seq_length, "image_seq_length")
    side = square_side(seq, "image_seq_length")
    views, cell_h, cell_w = [], th / side, tw / side
    if crop_to_patches and max_patches > 1:
        cols, rows = _optimal_tiled_canvas()((H, W), (th, tw), int(min_patches), int(max_patches))
        for i in range(rows * cols):
            r, c = divmod(i, cols)
            mp = PixelMap().scale(cols * tw / W, rows * th / H).shift(-c * tw, -r * th)
            views.append(mp.view(H, W, side, side, cell_h, cell_w, i * seq, side, f"tile r{r} c{c}"))
        if rows * cols > 1:
            mp = PixelMap().scale(tw / W, th / H)
            views.append(mp.view(H, W, side, side, cell_h, cell_w, len(views) * seq, side, "thumbnail"))
        meta = {"tiles": (rows, cols)}
    else:
        views.append(
            PixelMap().scale(tw / W, th / H).view(H, W, side, side, cell_h, cell_w, 0, side, "image")
        )
        meta = {"tiles": (1, 1)}
    return VisualGrid("internvl", (H, W), tuple(views), len(views) * seq, meta=meta)


@processor_adapter
def from_processor(s: ProcessorSettings, H, W, outputs, index):
    g = internvl(
        (H, W),
        tile_size=s("size"),
        image_seq_length=s.proc_attr("image_seq_length", required=True),
        crop_to_patches=bool(s("crop_to_patches", False)),
        min_patches=int(s("min_patches", 1)),
        max_patches=int(s("max_patches", 12)),
    )
    got = output_row(outputs, "num_patches", index)
    if got is not None and int(got) != len(g.views):
        mismatch("num_patches", got, len(g.views))
    return g


FAMILY = register(
    Family(
        name="internvl",
        processors=("InternVLProcessor",),
        build=internvl,
        from_processor=from_processor,
        description="InternVL",
    )
)
