"""Gemma 3: the image squashed to one square view, plus one view per pan-and-scan crop."""

from __future__ import annotations

import numpy as np

from dvsft_kernels.labeling.families.common import (
    PixelMap,
    ProcessorSettings,
    dummy,
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


def _pan_and_scan_crops(H, W, min_crop, max_crops, min_ratio):
    """(top, left, h, w) of each pan-and-scan crop, from Gemma3ImageProcessor.pan_and_scan itself:
    fed index images (row / column numbers), the slices it returns tell where they start."""
    pil = tf_attr(("transformers.models.gemma3.image_processing_pil_gemma3",), "Gemma3ImageProcessorPil")
    kw = {
        "pan_and_scan_min_crop_size": min_crop,
        "pan_and_scan_max_num_crops": max_crops,
        "pan_and_scan_min_ratio_to_activate": min_ratio,
    }
    ys = pil.pan_and_scan(None, dummy(H, W, np.arange(H, dtype=np.int64)[:, None]), **kw)
    xs = pil.pan_and_scan(None, dummy(H, W, np.arange(W, dtype=np.int64)[None, :]), **kw)
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
    H, W = hw(image_size)
    sh, sw = hw_of(size, "size")
    seq = pos_int(image_seq_length, "image_seq_length")
    side = square_side(seq, "image_seq_length")
    views = [PixelMap().scale(sw / W, sh / H).view(H, W, side, side, sh / side, sw / side, 0, side, "image")]
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
            mp = PixelMap().shift(-l, -t).scale(sw / cw, sh / ch)
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


@processor_adapter
def from_processor(s: ProcessorSettings, H, W, outputs, index):
    g = gemma3(
        (H, W),
        size=s("size"),
        image_seq_length=s.proc_attr("image_seq_length", required=True),
        do_pan_and_scan=bool(s("do_pan_and_scan", False)),
        pan_and_scan_min_crop_size=int(s("pan_and_scan_min_crop_size", 256)),
        pan_and_scan_max_num_crops=int(s("pan_and_scan_max_num_crops", 4)),
        pan_and_scan_min_ratio_to_activate=float(s("pan_and_scan_min_ratio_to_activate", 1.2)),
    )
    got = output_row(outputs, "num_crops", index)
    if got is not None and int(got) != g.meta["num_crops"]:
        mismatch("num_crops", got, g.meta["num_crops"])
    return g


def image_token_id(processor) -> int | None:
    """Gemma 3's ``processor.image_token_id`` is the begin-of-image token; the placeholder run is
    its tokenizer's ``<image_soft_token>``."""
    return getattr(getattr(processor, "tokenizer", None), "image_token_id", None)


FAMILY = register(
    Family(
        name="gemma3",
        processors=("Gemma3Processor",),
        build=gemma3,
        from_processor=from_processor,
        image_token_id=image_token_id,
        description="Gemma 3",
    )
)
