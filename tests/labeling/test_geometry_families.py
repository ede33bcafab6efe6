"""Every family's grid against the real transformers processor, built offline (see
_geometry_helpers for the few construction workarounds). For random image sizes and aspect ratios:

* placeholder count and run structure in ``input_ids`` equal the grid's segments;
* an image whose colours encode original coordinates goes through the processor; each token's mean
  colour, gathered in the model's own token order (transformers' ``pack_image_features`` /
  ``pixel_shuffle`` / merger order), decodes to a point that must lie in the grid's cell box; tokens
  that see no pixels (CLS, newlines, breaks) must be the grid's non-cell positions;
* a word box equal to one cell labels exactly that token in its view.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dvsft_kernels.labeling import OCRWord, VisualGrid, label_visual_tokens
from dvsft_kernels.labeling import families as fam
from tests.labeling._geometry_helpers import (
    BLUE,
    coord_image,
    decode_colour,
    make_processor,
    rasterised_coverage,
    token_colours,
)

EXTREME = [(12, 900), (900, 12), (5, 7), (2, 400), (28, 28), (1400, 230), (1, 1), (3, 1000)]


def _sizes(seed: int, n: int, lo: int = 40, hi: int = 1400, max_aspect: float = 6.0) -> list[tuple[int, int]]:
    """Random sizes and aspect ratios, plus two extreme ones (thin strips, a few pixels)."""
    rng = np.random.default_rng(seed)
    out = [EXTREME[seed % len(EXTREME)], EXTREME[(seed // 3) % len(EXTREME)]]
    while len(out) < n + 2:
        h = int(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        w = int(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        if max(h, w) / min(h, w) <= max_aspect:
            out.append((h, w))
    return out


def _pinpoints(t: int, k: int):
    return [[t * i, t * j] for i in range(1, k + 1) for j in range(1, k + 1)]


LLAVA15 = {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
# (case id, family, processor config, call images_kwargs, number of sizes, size range hi)
CASES = [
    ("qwen2_vl-class-defaults", "qwen2_vl", {}, {}, 3, 700),
    (
        "qwen2_vl-small-max-pixels",
        "qwen2_vl",
        {"min_pixels": 8 * 28 * 28, "max_pixels": 300 * 28 * 28},
        {},
        24,
        1400,
    ),
    ("qwen2_5_vl", "qwen2_5_vl", {"max_pixels": 200 * 28 * 28}, {}, 6, 1400),
    ("qwen3_vl-patch16", "qwen3_vl", {"patch_size": 16, "max_pixels": 250 * 32 * 32}, {}, 10, 1400),
    (
        "llava-1.5",
        "llava",
        dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, **LLAVA15),
        {},
        10,
        1400,
    ),
    (
        "llava-1.5-clip-image-processor",
        "llava",
        dict(size={"shortest_edge": 336}, clip=True, crop_size={"height": 336, "width": 336}, **LLAVA15),
        {},
        4,
        1400,
    ),
    ("llava-class-defaults-pad", "llava", {"do_pad": True, "patch_size": 14}, {}, 10, 1400),
    (
        "llava-full-cls",
        "llava",
        {"patch_size": 14, "vision_feature_select_strategy": "full", "num_additional_image_tokens": 1},
        {},
        4,
        900,
    ),
    (
        "llava_next-1.6",
        "llava_next",
        dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, **LLAVA15),
        {},
        8,
        1400,
    ),
    (
        "llava_next-tiny-tiles",
        "llava_next",
        dict(
            size={"shortest_edge": 56},
            crop_size={"height": 56, "width": 56},
            image_grid_pinpoints=_pinpoints(56, 4),
            **LLAVA15,
        ),
        {},
        24,
        900,
    ),
    (
        "llava_onevision-class-defaults",
        "llava_onevision",
        {"num_image_tokens": 729, "vision_feature_select_strategy": "full"},
        {},
        3,
        1400,
    ),
    (
        "llava_onevision-tiny-tiles",
        "llava_onevision",
        {
            "size": {"height": 56, "width": 56},
            "image_grid_pinpoints": _pinpoints(56, 6),
            "num_image_tokens": 16,
            "vision_feature_select_strategy": "full",
        },
        {},
        30,
        1400,
    ),
    (
        "internvl-448",
        "internvl",
        {"size": {"height": 448, "width": 448}, "image_seq_length": 256},
        {},
        6,
        1400,
    ),
    (
        "internvl-tiny-tiles",
        "internvl",
        {"size": {"height": 64, "width": 64}, "image_seq_length": 16},
        {},
        24,
        1400,
    ),
    ("idefics3-class-defaults", "idefics3", {}, {}, 4, 1400),
    (
        "idefics3-small",
        "idefics3",
        {"size": {"longest_edge": 448}, "max_image_size": {"longest_edge": 112}, "image_seq_len": 16},
        {},
        24,
        1400,
    ),
    (
        "smolvlm-small",
        "smolvlm",
        {"size": {"longest_edge": 384}, "max_image_size": {"longest_edge": 128}, "image_seq_len": 64},
        {},
        12,
        1400,
    ),
    ("gemma3-896", "gemma3", {"size": {"height": 896, "width": 896}}, {}, 3, 1400),
    ("gemma3-class-defaults", "gemma3", {}, {}, 10, 1400),
    ("gemma3-pan-and-scan", "gemma3", {}, {"do_pan_and_scan": True}, 16, 1400),
    ("pixtral-class-defaults", "pixtral", {}, {}, 12, 1400),
    (
        "mistral3",
        "pixtral",
        {"size": {"longest_edge": 560}, "patch_size": 14, "spatial_merge_size": 2},
        {},
        16,
        1400,
    ),
]


def _runs(ids: np.ndarray, tid: int) -> tuple[list[int], list[int]]:
    starts, lens, i = [], [], 0
    while i < len(ids):
        if ids[i] == tid:
            j = i
            while j < len(ids) and ids[j] == tid:
                j += 1
            starts.append(i)
            lens.append(j - i)
            i = j
        else:
            i += 1
    return starts, lens


def _decode_patch(family: str, processor, cfg) -> int | None:
    if family in ("llava_next", "llava_onevision"):
        return 14
    return None


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_grid_matches_processor(case):
    cid, family, cfg, call_kw, n, hi = case
    proc, prompt = make_processor(family, **dict(cfg))
    tok = proc.tokenizer
    tid = fam.image_token_id(proc)
    seed = sum(map(ord, cid))
    sizes = _sizes(seed, n, hi=hi)
    if family == "gemma3" and call_kw.get("do_pan_and_scan"):
        sizes = [(h, min(4 * h, 1400)) if i % 2 else (min(4 * w, 1400), w) for i, (h, w) in enumerate(sizes)]
    rng = np.random.default_rng(seed)
    word_id = None
    for H, W in sizes:
        img = coord_image(H, W)
        try:
            out = proc(images=[img], text=[prompt], **call_kw)
        except ValueError:  # the processor rejects the image (Qwen: aspect ratio >= 200): so must we
            with pytest.raises(ValueError):
                VisualGrid.from_processor(proc, img, None, 0, images_kwargs=call_kw)
            continue
        grid = VisualGrid.from_processor(proc, img, out, 0, images_kwargs=call_kw)
        assert grid.image_size == (H, W)
        ids = np.asarray(out["input_ids"][0])

        # 1. placeholder count and run structure
        starts, lens = _runs(ids, tid)
        assert lens == [ln for _, ln in grid.segments], (cid, H, W)
        if family == "pixtral":  # rows separated by exactly one [IMG_BREAK], the image closed by [IMG_END]
            run0 = starts[0]
            nc = np.ones(grid.num_tokens, bool)
            nc[grid.cell_positions()] = False
            sep_ids = ids[run0 + np.flatnonzero(nc)]
            assert (sep_ids[:-1] == proc.image_break_token_id).all() and sep_ids[
                -1
            ] == proc.image_end_token_id
            assert [s - run0 for s in starts] == [s for s, _ in grid.segments]

        # 2. every token's pixels come from inside its cell (decoded in the model's order)
        col = token_colours(family, proc, out, 0, cell_patch=_decode_patch(family, proc, cfg))
        assert col.shape[0] == grid.num_tokens, (cid, H, W, col.shape, grid.num_tokens)
        dec = decode_colour(col, H, W).numpy()
        boxes = grid.token_boxes().numpy()
        no_pixels = np.isnan(dec[:, 0])
        is_cell = np.isfinite(boxes[:, 0])
        assert not (no_pixels & is_cell).any(), "grid labels a position that sees no pixels"
        pure = ~no_pixels & (np.abs(dec[:, 2] - BLUE) < 0.75)  # sees image content only (no padding)
        assert (is_cell | ~pure).all(), "a position that sees image content is not a cell of the grid"
        # errors in view pixels (each token's own view scale): colour quantisation (W / 255 orig px),
        # 1.5 px of resampling, and half a source pixel where resizing clamps at the image border
        # (large for tiny, upscaled images); the mean must show no shift
        owner = grid.view_of_position()
        sx = np.array([grid.views[o].sx for o in owner[pure]])
        sy = np.array([grid.views[o].sy for o in owner[pure]])
        b = boxes[pure]
        ex = (dec[pure, 0] - np.clip(dec[pure, 0], b[:, 0], b[:, 2])) * sx  # distance outside the box
        ey = (dec[pure, 1] - np.clip(dec[pure, 1], b[:, 1], b[:, 3])) * sy
        assert (np.abs(ex) <= (0.75 * W / 255 + 0.5) * sx + 1.5).all(), (cid, H, W, np.abs(ex).max())
        assert (np.abs(ey) <= (0.75 * H / 255 + 0.5) * sy + 1.5).all(), (cid, H, W, np.abs(ey).max())
        if pure.any():
            mx = np.mean((dec[pure, 0] - (b[:, 0] + b[:, 2]) / 2) * sx)
            my = np.mean((dec[pure, 1] - (b[:, 1] + b[:, 3]) / 2) * sy)
            assert abs(mx) < 0.15 + 0.25 * sx.max() and abs(my) < 0.15 + 0.25 * sy.max(), (cid, H, W, mx, my)

        # 3. a box equal to one cell labels exactly that token (in its view)
        if word_id is None:
            ids_h = tok(" hello", add_special_tokens=False)["input_ids"]
            word_id = next(i for i in ids_h if tok.decode([i]).strip())  # first piece past the prefix space
        cells = np.flatnonzero(is_cell)
        for k in rng.choice(cells, size=min(4, cells.size), replace=False):
            bx = boxes[k]
            labels = label_visual_tokens([OCRWord("hello", tuple(bx))], grid, tok)
            assert labels[k] == word_id
            same_view = owner == owner[k]
            hit = (labels != -100).numpy()
            assert np.flatnonzero(hit & same_view).tolist() == [k]
            # other views: whatever the brute-force coverage says (clear cases only)
            cov = rasterised_coverage(grid, [bx], samples=max(1, -(-160 // min(H, W))))[:, 0]
            other = ~same_view
            assert not (hit & other & (cov < 0.2)).any()
            assert (hit | ~(other & (cov > 0.3))).all()


def test_family_detection_and_settings_come_from_the_processor():
    proc, _ = make_processor("qwen2_vl", min_pixels=8 * 28 * 28, max_pixels=64 * 28 * 28)
    g = VisualGrid.from_processor(proc, (1000, 1000))
    assert g.num_tokens == 64  # the object's max_pixels, not the class default
    # the image processor alone works for Qwen (all settings live there)
    assert VisualGrid.from_processor(proc.image_processor, (1000, 1000)).num_tokens == 64
    # SmolVLMProcessor needs num2words to be constructed; detection and settings on a bare object
    smol_cls = __import__("transformers").SmolVLMProcessor
    smol = object.__new__(smol_cls)
    smol.image_processor = __import__("transformers").SmolVLMImageProcessor(
        size={"longest_edge": 384}, max_image_size={"longest_edge": 128}
    )
    smol.image_seq_len = 64
    assert fam.detect_family(smol) == "idefics3"
    g = VisualGrid.from_processor(smol, (300, 500))
    assert g.family == "idefics3" and g.num_tokens == 64 * (len(g.views))
    with pytest.raises(TypeError, match="unsupported"):
        VisualGrid.from_processor(object(), (10, 10))


def test_from_processor_cross_checks_outputs():
    proc, prompt = make_processor("qwen2_vl", max_pixels=100 * 28 * 28)
    img = coord_image(300, 500)
    out = proc(images=[img], text=[prompt])
    with pytest.raises(ValueError, match="image_grid_thw"):
        VisualGrid.from_processor(proc, (500, 300), out, 0)  # transposed size
    with pytest.raises(ValueError, match="index"):
        VisualGrid.from_processor(proc, img, out, 1)
    # settings passed at call time must be declared
    out2 = proc(
        images=[img], text=[prompt], images_kwargs={"size": {"shortest_edge": 3136, "longest_edge": 50 * 784}}
    )
    with pytest.raises(ValueError, match="images_kwargs"):
        VisualGrid.from_processor(proc, img, out2, 0)
    g = VisualGrid.from_processor(
        proc, img, out2, 0, images_kwargs={"size": {"shortest_edge": 3136, "longest_edge": 50 * 784}}
    )
    assert g.num_tokens == int(out2["image_grid_thw"][0].prod()) // 4


def test_onevision_multi_image_layout():
    proc, _ = make_processor(
        "llava_onevision",
        size={"height": 56, "width": 56},
        image_grid_pinpoints=_pinpoints(56, 4),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
    )
    imgs = [coord_image(120, 300), coord_image(260, 90)]
    out = proc(images=[imgs], text=["a <image> b <image> c"])
    tid = fam.image_token_id(proc)
    _, lens = _runs(np.asarray(out["input_ids"][0]), tid)
    grids = [VisualGrid.from_processor(proc, im, out, i) for i, im in enumerate(imgs)]
    assert [g.num_tokens for g in grids] == lens == [17, 17]
    for i, (im, g) in enumerate(zip(imgs, grids)):
        col = token_colours("llava_onevision", proc, out, i, cell_patch=14)
        dec = decode_colour(col, im.height, im.width).numpy()
        boxes = g.token_boxes().numpy()
        assert np.isnan(dec[-1, 0]) and np.isnan(boxes[-1, 0])  # trailing newline
        pure = np.abs(dec[:, 2] - BLUE) < 0.75
        assert np.isfinite(boxes[pure, 0]).all()
        x, b = dec[pure, 0], boxes[pure]
        assert ((x >= b[:, 0] - 3) & (x <= b[:, 2] + 3)).all()


def test_token_order_of_merging_functions():
    """The row-major claims, on transformers' own functions with position-coded features."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    from transformers.models.internvl.modeling_internvl import InternVLModel

    n = 6
    pos = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"), -1).double()  # (r, c)
    iv = InternVLModel.pixel_shuffle(None, pos[None], 0.5).view(n // 2, n // 2, 4, 2)
    idf = Idefics3Connector.pixel_shuffle(None, pos.view(1, n * n, 2), 2).view(n // 2, n // 2, 4, 2)
    for out in (iv, idf):
        centre = out.mean(dim=2)  # each token's 2x2 block centre, in token order
        expect = (
            torch.stack(torch.meshgrid(torch.arange(n // 2), torch.arange(n // 2), indexing="ij"), -1) * 2
            + 0.5
        )
        assert torch.equal(centre, expect.double())


@pytest.mark.parametrize(
    "bad",
    [
        {"image_size": (0, 10)},
        {"image_size": (10,)},
        {"image_grid_thw": (2, 4, 4)},
        {"image_grid_thw": (1, 3, 4)},
        {"patch_size": 0},
        {"image_size": (10.5, 3)},
    ],
)
def test_qwen_constructor_rejects_bad_input(bad):
    kw = {"image_size": (100, 100), "image_grid_thw": (1, 4, 4), "patch_size": 14, "merge_size": 2}
    kw.update(bad)
    with pytest.raises(ValueError):
        VisualGrid.for_qwen2_vl(**kw)


def test_constructors_reject_inconsistent_configs():
    with pytest.raises(ValueError, match="num_additional_image_tokens"):
        VisualGrid.for_llava(
            (100, 100), vision_feature_select_strategy="default", num_additional_image_tokens=0
        )
    with pytest.raises(ValueError, match="multiple of the tile"):
        VisualGrid.for_llava_next((300, 500), tile_size=224)  # class default pinpoints are 336-multiples
    with pytest.raises(ValueError, match="OneVision"):
        VisualGrid.for_llava_onevision((300, 500), vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="square"):
        VisualGrid.for_internvl((300, 500), image_seq_length=200)
