"""Batch assembly: per-image labels land on exactly the image's placeholder positions of
``input_ids`` (padded batches, several images per sample, per-row / per-view runs), and every count
mismatch raises instead of shifting labels."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dvsft_kernels.labeling import (
    OCRWord,
    VisualGrid,
    build_vision_labels,
    build_vision_labels_from_processor,
    label_visual_tokens,
    placeholder_runs,
    scatter_vision_labels,
)
from dvsft_kernels.labeling import families as fam
from tests.labeling._geometry_helpers import coord_image, make_processor

TEXTS = ["the", "quick", "brown", "fox", "Größe", "12345", "invoice", "total"]


def _words(rng, H, W, n=8):
    out = []
    for i in range(n):
        x0, y0 = rng.uniform(0, 0.8 * W), rng.uniform(0, 0.8 * H)
        out.append(
            OCRWord(
                TEXTS[i % len(TEXTS)],
                (x0, y0, x0 + rng.uniform(0.1, 0.3) * W, y0 + rng.uniform(0.1, 0.3) * H),
            )
        )
    return out


def _expected(ids: np.ndarray, tid: int, grids, labels):
    """Independent placement: the k-th image token of a sample takes the k-th in-segment position of
    that sample's images, in order."""
    out = np.full(ids.shape, -100)
    for b in range(ids.shape[0]):
        pos = np.flatnonzero(ids[b] == tid)
        vals = np.concatenate(
            [lab.numpy()[s : s + n] for g, lab in zip(grids[b], labels[b]) for s, n in g.segments]
        )
        assert len(pos) == len(vals)
        out[b, pos] = vals
    return out


BATCH_CASES = [
    ("qwen2_vl", {"max_pixels": 120 * 28 * 28}, {}, [[(300, 500)], [(200, 120), (90, 400)]]),
    (
        "llava",
        {
            "size": {"shortest_edge": 56},
            "crop_size": {"height": 56, "width": 56},
            "patch_size": 14,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        },
        {},
        [[(300, 500), (200, 100)], [(120, 90)]],
    ),
    (
        "llava_next",
        {
            "size": {"shortest_edge": 56},
            "crop_size": {"height": 56, "width": 56},
            "image_grid_pinpoints": [[56 * i, 56 * j] for i in range(1, 4) for j in range(1, 4)],
            "patch_size": 14,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        },
        {},
        [[(300, 500)], [(200, 100), (120, 330)]],
    ),
    (
        "internvl",
        {"size": {"height": 64, "width": 64}, "image_seq_length": 16},
        {},
        [[(300, 500)], [(200, 100)]],
    ),
    (
        "idefics3",
        {"size": {"longest_edge": 336}, "max_image_size": {"longest_edge": 112}, "image_seq_len": 16},
        {},
        [[(300, 500), (100, 100)], [(200, 90)]],
    ),
    (
        "gemma3",
        {},
        {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 64},
        [[(100, 450)], [(300, 90), (80, 80)]],
    ),
    (
        "pixtral",
        {"size": {"longest_edge": 224}, "patch_size": 14, "spatial_merge_size": 2},
        {},
        [[(300, 500)], [(200, 100), (60, 70)]],
    ),
]


@pytest.mark.parametrize("case", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_labels_land_on_each_images_placeholders(case):
    family, cfg, call_kw, sizes = case
    proc, prompt = make_processor(family, **dict(cfg))
    placeholder = prompt.split()[1]
    texts = [" and ".join(["see " + placeholder] * len(s)) + " end" for s in sizes]
    if family == "llava":  # two adjacent images share one run of <image> tokens
        texts[0] = f"see {placeholder}{placeholder} end"
    images = [[coord_image(h, w) for h, w in s] for s in sizes]
    flat = [im for s in images for im in s]
    kwargs = dict(call_kw)
    if family in ("idefics3", "gemma3"):
        out = proc(images=images, text=texts, padding=True, **kwargs)
    else:
        out = proc(images=flat, text=texts, padding=True, **kwargs)
    rng = np.random.default_rng(0)
    words = [[_words(rng, im.height, im.width) for im in s] for s in images]
    vl = build_vision_labels_from_processor(proc, images, out, words, images_kwargs=call_kw)
    ids = np.asarray(out["input_ids"])
    assert vl.shape == ids.shape and vl.dtype == torch.int64
    tid = fam.image_token_id(proc)
    grids = [
        [VisualGrid.from_processor(proc, im, out, i, images_kwargs=call_kw) for i, im in enumerate(flat)][
            sum(map(len, images[:b])) :
        ][: len(images[b])]
        for b in range(len(images))
    ]
    labels = [
        [label_visual_tokens(w, g, proc.tokenizer) for w, g in zip(ws, gs)] for ws, gs in zip(words, grids)
    ]
    np.testing.assert_array_equal(vl.numpy(), _expected(ids, tid, grids, labels))
    assert (vl != -100).sum() > 0
    # only image-token positions are ever labeled
    assert ((vl.numpy() != -100) <= (ids == tid)).all()
    # the flat form gives the same
    flat_grids = [g for gs in grids for g in gs]
    flat_words = [w for ws in words for w in ws]
    vl2 = build_vision_labels(out["input_ids"], flat_grids, flat_words, proc.tokenizer, image_token_id=tid)
    assert torch.equal(vl, vl2)

    # any truncation is caught: cut inside the last image's placeholders
    cut = int(np.flatnonzero(ids[-1] == tid)[-1])
    with pytest.raises(ValueError):
        build_vision_labels(torch.as_tensor(ids[:, :cut]), grids, words, proc.tokenizer, image_token_id=tid)
    # a grid for another layout is caught: one computed for a 60 x 60 image (every family but LLaVA's
    # fixed resolution lays that out differently: asserted, so this cannot skip itself), and one
    # whose last segment expects 4 more placeholders than the processor wrote (any family)
    g0 = grids[0][0]
    other = VisualGrid.from_processor(proc, (60, 60), images_kwargs=call_kw)
    assert (other.segments == g0.segments) == (family == "llava"), (family, other.segments, g0.segments)
    s_last, n_last = g0.segments[-1]
    longer = replace(g0, num_tokens=g0.num_tokens + 4, segments=(*g0.segments[:-1], (s_last, n_last + 4)))
    for bad in ([] if family == "llava" else [other]) + [longer]:
        wrong = [list(gs) for gs in grids]
        wrong[0][0] = bad
        with pytest.raises(ValueError):
            build_vision_labels(out["input_ids"], wrong, words, proc.tokenizer, image_token_id=tid)
    # a missing image is caught
    with pytest.raises(ValueError):
        build_vision_labels(
            out["input_ids"], flat_grids[:-1], flat_words[:-1], proc.tokenizer, image_token_id=tid
        )


def _qwen_batch():
    proc, prompt = make_processor("qwen2_vl", max_pixels=60 * 28 * 28)
    imgs = [coord_image(200, 300), coord_image(100, 100)]
    out = proc(images=imgs, text=[prompt, prompt], padding=True, return_tensors="pt")
    grids = [VisualGrid.from_processor(proc, im, out, i) for i, im in enumerate(imgs)]
    return proc, out, grids, fam.image_token_id(proc)


def test_count_mismatches_raise():
    _, out, grids, tid = _qwen_batch()
    ids = out["input_ids"]
    labs = [torch.zeros(g.num_tokens, dtype=torch.long) for g in grids]
    ok = scatter_vision_labels(ids, grids, labs, image_token_id=tid)
    assert ((ok == 0) == (ids == tid)).all()
    with pytest.raises(ValueError, match="no grid left"):
        scatter_vision_labels(ids, grids[:1], labs[:1], image_token_id=tid)
    with pytest.raises(ValueError, match="left over"):
        scatter_vision_labels(ids, grids + grids[:1], labs + labs[:1], image_token_id=tid)
    with pytest.raises(ValueError, match="expects"):
        scatter_vision_labels(ids, grids[::-1], labs[::-1], image_token_id=tid)
    with pytest.raises(ValueError, match="image_labels"):
        scatter_vision_labels(ids, grids, labs[:1], image_token_id=tid)
    with pytest.raises(ValueError, match="shape"):
        scatter_vision_labels(ids, grids, [labs[0][:-1], labs[1]], image_token_id=tid)
    with pytest.raises(ValueError, match="image_token_id"):
        scatter_vision_labels(ids, grids, labs, image_token_id=None)
    with pytest.raises(ValueError, match="input_ids"):
        scatter_vision_labels(ids.float(), grids, labs, image_token_id=tid)
    with pytest.raises(ValueError, match="batch size"):
        scatter_vision_labels(
            ids, [[grids[0]], [grids[1]], []], [[labs[0]], [labs[1]], []], image_token_id=tid
        )
    with pytest.raises(ValueError, match="left over"):  # per-sample: both images claimed by sample 0
        scatter_vision_labels(ids, [grids, []], [labs, []], image_token_id=tid)
    with pytest.raises(TypeError, match="grids"):
        scatter_vision_labels(ids, grids[0], labs[0], image_token_id=tid)
    # one extra placeholder token (e.g. a stray <|image_pad|> in the text) is caught
    ids2 = ids.clone()
    first = int((ids2[0] == tid).nonzero()[0])
    ids2[0, first - 1] = tid
    with pytest.raises(ValueError):
        scatter_vision_labels(ids2, grids, labs, image_token_id=tid)


def test_words_structure_must_follow_grids():
    proc, out, grids, tid = _qwen_batch()
    with pytest.raises(ValueError, match="words_per_image"):
        build_vision_labels(out["input_ids"], grids, [[]], proc.tokenizer, image_token_id=tid)
    with pytest.raises(ValueError, match="words_per_image"):
        build_vision_labels(
            out["input_ids"], [[grids[0]], [grids[1]]], [[[]], []], proc.tokenizer, image_token_id=tid
        )
    with pytest.raises(ValueError, match="return_report"):
        build_vision_labels(
            out["input_ids"], grids, [[], []], proc.tokenizer, image_token_id=tid, return_report=True
        )
    vl = build_vision_labels(
        out["input_ids"], [[grids[0]], [grids[1]]], [[[]], [[]]], proc.tokenizer, image_token_id=tid
    )
    assert (vl == -100).all()


def test_pixtral_break_tokens_are_checked():
    proc, prompt = make_processor("pixtral", size={"longest_edge": 224}, patch_size=14, spatial_merge_size=2)
    img = coord_image(150, 200)
    out = proc(images=[img], text=[prompt])
    g = VisualGrid.from_processor(proc, img, out, 0)
    tid = fam.image_token_id(proc)
    ids = out["input_ids"].clone()
    lab = torch.arange(g.num_tokens)
    vl = scatter_vision_labels(ids, [g], [lab], image_token_id=tid)
    start = int((ids[0] == tid).nonzero()[0])
    cells = torch.as_tensor(g.cell_positions())
    assert torch.equal(vl[0, start + cells], lab[cells])
    breaks = ids[0] == proc.image_break_token_id
    assert breaks.sum() == g.views[0].rows - 1 and (vl[0, breaks] == -100).all()
    first_break = int(breaks.nonzero()[0])
    doubled = torch.cat([ids[:, : first_break + 1], ids[:, first_break:]], dim=1)
    with pytest.raises(ValueError, match="separator"):  # two breaks where the grid has one
        scatter_vision_labels(doubled, [g], [lab], image_token_id=tid)
    dropped = torch.cat([ids[:, :first_break], ids[:, first_break + 1 :]], dim=1)
    with pytest.raises(ValueError):  # rows 0 and 1 merge into one run
        scatter_vision_labels(dropped, [g], [lab], image_token_id=tid)


def test_one_dimensional_input_and_placeholder_runs():
    proc, out, grids, tid = _qwen_batch()
    ids = out["input_ids"][0]
    lab = label_visual_tokens([OCRWord("the", (0, 0, 300, 200))], grids[0], proc.tokenizer)
    vl = scatter_vision_labels(ids, [grids[0]], [lab], image_token_id=tid)
    assert vl.shape == ids.shape
    starts, lens = placeholder_runs(ids.numpy(), tid)
    assert lens.tolist() == [grids[0].num_tokens]
    assert torch.equal(vl[starts[0] : starts[0] + lens[0]], lab)
    s, n = placeholder_runs(np.array([1, 2, 3]), 9)
    assert s.size == 0 and n.size == 0


def test_gemma3_uses_the_soft_image_token():
    proc, _ = make_processor("gemma3")
    assert fam.image_token_id(proc) == proc.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert fam.image_token_id(proc) != proc.image_token_id  # processor.image_token_id is begin-of-image
