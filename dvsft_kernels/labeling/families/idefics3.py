"""Idefics3 / SmolVLM: tiles of ``max_image_size`` then a global view, each its own placeholder run."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

from dvsft_kernels.labeling.families.common import (
    PixelMap,
    ProcessorSettings,
    dummy,
    hw,
    mismatch,
    pos_int,
    processor_adapter,
    size_dict,
    square_side,
    tf_attr,
)
from dvsft_kernels.labeling.grid import GridView, VisualGrid
from dvsft_kernels.labeling.registry import Family, register

_MODULES = (
    "transformers.models.idefics3.image_processing_pil_idefics3",
    "transformers.models.idefics3.image_processing_idefics3",
)


def _vision_encoder_size(h: int, w: int, m: int) -> tuple[int, int]:
    # transformers' Idefics3 resize_for_vision_encoder (a method, no size-only helper): called with a
    # stand-in self whose resize returns the size it is asked for instead of resizing
    stub = SimpleNamespace(resize=lambda image, size, resample=None: (size.height, size.width))
    pil = tf_attr(_MODULES[:1], "Idefics3ImageProcessorPil")
    return pil.resize_for_vision_encoder(stub, dummy(h, w), m)


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
    H, W = hw(image_size)
    M = pos_int(max_image_size, "max_image_size")
    seq = pos_int(image_seq_len, "image_seq_len")
    side = square_side(seq, "image_seq_len")
    cell = M / side
    h, w = H, W
    if do_resize:
        h, w = tf_attr(_MODULES, "get_resize_output_image_size")(
            dummy(H, W), resolution_max_side=pos_int(longest_edge, "longest_edge")
        )
    rows = cols = 0
    views: list[GridView] = []
    if do_image_splitting:
        h, w = _vision_encoder_size(h, w, M)
        if h > M or w > M:
            rows, cols = (h - M) // M + 1, (w - M) // M + 1
            for r in range(rows):
                for c in range(cols):
                    mp = PixelMap().scale(w / W, h / H).shift(-c * M, -r * M)
                    views.append(
                        mp.view(H, W, side, side, cell, cell, len(views) * seq, side, f"tile r{r} c{c}")
                    )
            views.append(
                PixelMap()
                .scale(M / W, M / H)
                .view(H, W, side, side, cell, cell, len(views) * seq, side, "global")
            )
        else:
            views.append(
                PixelMap().scale(w / W, h / H).view(H, W, side, side, h / side, w / side, 0, side, "image")
            )
    else:
        views.append(PixelMap().scale(M / W, M / H).view(H, W, side, side, cell, cell, 0, side, "image"))
    segments = tuple((i * seq, seq) for i in range(len(views)))
    return VisualGrid(
        "idefics3",
        (H, W),
        tuple(views),
        len(views) * seq,
        meta={"rows": rows, "cols": cols},
        segments=segments,
    )


@processor_adapter
def from_processor(s: ProcessorSettings, H, W, outputs, index):
    size = size_dict(s("size"), "size", square_int=False)
    mis = size_dict(s("max_image_size"), "max_image_size", square_int=False)
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
            mismatch("rows/cols", flat[index], (g.meta["rows"], g.meta["cols"]))
    return g


FAMILY = register(
    Family(
        name="idefics3",
        aliases=("smolvlm",),
        processors=("Idefics3Processor", "SmolVLMProcessor"),
        build=idefics3,
        from_processor=from_processor,
        description="Idefics3 / SmolVLM",
    )
)
