"""Soft labels (``label_visual_tokens(..., soft=K, spread=...)``, the batch builders, the overlay).

Expected ids and weights are worked out by hand on small synthetic grids (10 px cells unless said
otherwise; the arithmetic is in the comments), or, for the family grids, by a plain per-cell loop over
the cells' boxes (``oracle_soft``) that shares no code with the labeler.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dvsft_kernels.labeling import (
    GridView,
    OCRWord,
    SoftLabels,
    VisualGrid,
    build_vision_labels,
    build_vision_labels_from_processor,
    label_visual_tokens,
    scatter_vision_labels,
)
from dvsft_kernels.labeling import families as fam
from dvsft_kernels.labeling.overlay import describe_targets, draw_overlay
from tests.labeling._geometry_helpers import coord_image, make_processor

IGN = -100
NAMES = ["alpha", "beta", "gamma", "delta", "x"] + [f"w{i}" for i in range(64)]
ID = {w: i + 1 for i, w in enumerate(NAMES)}  # alpha 1, beta 2, gamma 3, delta 4, x 5, w0 6, ...
A, B, C, D, X = (ID[w] for w in ("alpha", "beta", "gamma", "delta", "x"))


def _fast(model) -> PreTrainedTokenizerFast:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


# one id per word: a target's id says which word it is
WL = _fast(models.WordLevel({"[UNK]": 0, **ID}, unk_token="[UNK]"))
# "abcd" -> "ab" (chars 0-2) + "##cd" (chars 2-4): two sub-tokens for the aligned mode
AB, CD = 1, 2
WP = _fast(
    models.WordPiece({"[UNK]": 0, "ab": AB, "##cd": CD, "x": X}, unk_token="[UNK]", continuing_subword_prefix="##")
)


def grid(rows, cols, cell=10, stride=None):
    """One view, ``cell`` px square cells, identity map; the image is exactly the grid."""
    stride = cols if stride is None else stride
    v = GridView(sx=1, sy=1, ox=0, oy=0, rows=rows, cols=cols, cell_h=cell, cell_w=cell, offset=0,
                 row_stride=stride)
    return VisualGrid("hand", (rows * cell, cols * cell), (v,), (rows - 1) * stride + cols)


def assert_soft(out, expected: dict[int, list[tuple[int, float]]], num_tokens: int, K: int):
    """``expected``: position -> [(id, weight)] best first; every other position and slot unlabeled."""
    assert isinstance(out, SoftLabels)
    ids, w = out
    assert ids.shape == (num_tokens, K) and w.shape == (num_tokens, K)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    for p in range(num_tokens):
        exp = expected.get(p, [])
        assert ids[p].tolist() == [t for t, _ in exp] + [IGN] * (K - len(exp)), f"position {p}"
        assert w[p].tolist() == pytest.approx([x for _, x in exp] + [0.0] * (K - len(exp)), abs=1e-6), p


# ------------------------------------------------------------------------------------------------
# first mode: coverage of each word
# 1 x 4 cells (+ an empty second row); alpha x 0-16 covers cell 0 fully and 6/10 of cell 1, beta x 16-40
# covers 4/10 of cell 1 and cells 2, 3 fully
ROW_GRID = grid(2, 4)
ROW_WORDS = [OCRWord("alpha", (0, 0, 16, 10)), OCRWord("beta", (16, 0, 40, 10))]


def test_two_words_share_a_cell():
    out = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, soft=2)
    assert_soft(out, {0: [(A, 1.0)], 1: [(A, 0.6), (B, 0.4)], 2: [(B, 1.0)], 3: [(B, 1.0)]}, 8, 2)
    # K = 1: only the larger share, renormalised to 1
    out = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, soft=1)
    assert_soft(out, {0: [(A, 1.0)], 1: [(A, 1.0)], 2: [(B, 1.0)], 3: [(B, 1.0)]}, 8, 1)
    # slots beyond the targets a cell has stay ignore / 0
    out = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, soft=4)
    assert_soft(out, {0: [(A, 1.0)], 1: [(A, 0.6), (B, 0.4)], 2: [(B, 1.0)], 3: [(B, 1.0)]}, 8, 4)
    # min_coverage applies to each word of a cell, as for hard labels: beta's 0.4 < 0.5 is left out
    out = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, soft=2, min_coverage=0.5)
    assert_soft(out, {0: [(A, 1.0)], 1: [(A, 1.0)], 2: [(B, 1.0)], 3: [(B, 1.0)]}, 8, 2)


def test_soft_none_is_the_hard_labeling():
    # by hand: cell 1 goes to alpha (0.6 > 0.4); row 1 is empty
    hard = label_visual_tokens(ROW_WORDS, ROW_GRID, WL)
    assert isinstance(hard, torch.Tensor) and hard.dtype == torch.int64
    assert hard.tolist() == [A, A, B, B, IGN, IGN, IGN, IGN]
    same = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, soft=None, spread=0.0)
    assert torch.equal(same, hard)
    lab, rep = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, soft=None, return_report=True)
    assert torch.equal(lab, hard) and rep.labeled_tokens == 4 and rep.words_used == 2
    # the soft labeling labels exactly the tokens the hard one does
    soft = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, soft=3, min_coverage=0.05)
    hard = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, min_coverage=0.05)
    assert torch.equal(soft.ids[:, 0] != IGN, hard != IGN)


# three words in cell 0 (x 0-5, 5-8, 8-10: 0.5, 0.3, 0.2), min_coverage 0.1
THREE = [OCRWord("alpha", (0, 0, 5, 10)), OCRWord("beta", (5, 0, 8, 10)), OCRWord("gamma", (8, 0, 10, 10))]
THREE_K2 = {0: [(A, 0.5 / 0.8), (B, 0.3 / 0.8)]}  # the two largest, renormalised: 0.625, 0.375


def test_truncation_keeps_the_largest_and_renormalises():
    g = grid(1, 1)
    out = label_visual_tokens(THREE, g, WL, soft=3, min_coverage=0.1)
    assert_soft(out, {0: [(A, 0.5), (B, 0.3), (C, 0.2)]}, 1, 3)
    assert_soft(label_visual_tokens(THREE, g, WL, soft=2, min_coverage=0.1), THREE_K2, 1, 2)
    assert_soft(label_visual_tokens(THREE, g, WL, soft=1, min_coverage=0.1), {0: [(A, 1.0)]}, 1, 1)
    # listing order does not matter: the weights do
    out = label_visual_tokens(THREE[::-1], g, WL, soft=2, min_coverage=0.1)
    assert_soft(out, THREE_K2, 1, 2)


def test_planted_faults_are_caught():
    """The checks above fail on the mistakes an implementation could make."""
    g = grid(1, 1)
    full = label_visual_tokens(THREE, g, WL, soft=3, min_coverage=0.1)
    # not renormalising after truncation: weights 0.5, 0.3
    unnormalised = SoftLabels(full.ids[:, :2].clone(), full.weights[:, :2].clone())
    with pytest.raises(AssertionError):
        assert_soft(unnormalised, THREE_K2, 1, 2)
    # a 10 % error in one coverage
    good = label_visual_tokens(THREE, g, WL, soft=2, min_coverage=0.1)
    off = good.weights.clone()
    off[0, 0] *= 1.1
    with pytest.raises(AssertionError):
        assert_soft(SoftLabels(good.ids, off), THREE_K2, 1, 2)
    # keeping the smallest instead of the largest
    smallest = SoftLabels(torch.tensor([[C, B]]), torch.tensor([[0.4, 0.6]]))
    with pytest.raises(AssertionError):
        assert_soft(smallest, THREE_K2, 1, 2)


def test_equal_ids_merge_and_ties():
    g = grid(1, 1)
    # alpha twice (x 0-4 and 6-10, 0.4 each) and beta between (0.2): one alpha target of 0.8, so K=2
    # holds both words; unmerged, the two alphas would fill the slots (0.5 / 0.5)
    words = [OCRWord("alpha", (0, 0, 4, 10)), OCRWord("beta", (4, 0, 6, 10)), OCRWord("alpha", (6, 0, 10, 10))]
    out = label_visual_tokens(words, g, WL, soft=2, min_coverage=0.1)
    assert_soft(out, {0: [(A, 0.8), (B, 0.2)]}, 1, 2)
    # equal coverage (0.5 each): the smaller box comes first, whatever the order of the words
    small, big = OCRWord("alpha", (0, 0, 5, 10)), OCRWord("beta", (5, 0, 20, 10))
    for words in ([small, big], [big, small]):
        out = label_visual_tokens(words, grid(1, 2), WL, soft=1)
        assert out.ids[0].tolist() == [A]
    # equal coverage and equal boxes: the word listed first
    left, right = OCRWord("alpha", (0, 0, 5, 10)), OCRWord("beta", (5, 0, 10, 10))
    assert label_visual_tokens([left, right], grid(1, 1), WL, soft=1).ids[0].tolist() == [A]
    assert label_visual_tokens([right, left], grid(1, 1), WL, soft=1).ids[0].tolist() == [B]


# ------------------------------------------------------------------------------------------------
# spread
def test_spread_along_a_row():
    # min_coverage 0.5: alpha labels cells 0 (1.0) and 1 (0.6); beta cells 2 and 3 (its 0.4 in cell 1
    # fails). spread 0.5: cell 1 is next to beta's cell 2, so beta joins it with 0.5 (a full cell's
    # coverage x spread, not its own 0.4); cell 2 is next to alpha's cell 1; cells 0 and 3 are next to
    # no other word's cell; row 1 is next to both words but shows none, so it stays unlabeled
    out = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, soft=2, spread=0.5, min_coverage=0.5)
    exp = {
        0: [(A, 1.0)],
        1: [(A, 0.6 / 1.1), (B, 0.5 / 1.1)],
        2: [(B, 1.0 / 1.5), (A, 0.5 / 1.5)],
        3: [(B, 1.0)],
    }
    assert_soft(out, exp, 8, 2)
    # spread 0 is no spread
    a = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, soft=2, spread=0.0, min_coverage=0.5)
    b = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, soft=2, min_coverage=0.5)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)


def test_spread_reaches_the_eight_neighbours_only():
    # 3 x 4 grid; alpha fills the centre-left cell (1, 1), beta the corner (0, 0) (a diagonal
    # neighbour), gamma (2, 2) (the other diagonal), delta (0, 3) (two columns away from alpha)
    g = grid(3, 4)
    words = [
        OCRWord("alpha", (10, 10, 20, 20)),
        OCRWord("beta", (0, 0, 10, 10)),
        OCRWord("gamma", (20, 20, 30, 30)),
        OCRWord("delta", (30, 0, 40, 10)),
    ]
    out = label_visual_tokens(words, g, WL, soft=3, spread=0.25)
    exp = {
        0: [(B, 1 / 1.25), (A, 0.25 / 1.25)],  # (0, 0): beta 1 + alpha 0.25
        3: [(D, 1.0)],  # (0, 3): no labeled neighbour word
        5: [(A, 1 / 1.5), (B, 0.25 / 1.5), (C, 0.25 / 1.5)],  # (1, 1): beta before gamma (listed first)
        10: [(C, 1 / 1.25), (A, 0.25 / 1.25)],  # (2, 2)
    }
    assert_soft(out, exp, 12, 3)
    # K = 2 drops gamma at (1, 1) and renormalises: 1 / 1.25, 0.25 / 1.25
    out = label_visual_tokens(words, g, WL, soft=2, spread=0.25)
    assert out.ids[5].tolist() == [A, B]
    assert out.weights[5].tolist() == pytest.approx([0.8, 0.2], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# aligned mode: each sub-token's share of the word box
def test_aligned_sub_tokens_share_a_cell():
    # "abcd" over x 2-42, 10 px a character: ab spans 2-22, cd 22-42; 1 x 5 cells
    words = [OCRWord("abcd", (2, 0, 42, 10))]
    out = label_visual_tokens(words, grid(1, 5), WP, mode="aligned", soft=2, add_prefix_space=False)
    # cell 2 (20-30): ab 20-22 = 0.2, cd 22-30 = 0.8; cell 4 (40-50): 0.2 < min_coverage
    exp = {0: [(AB, 1.0)], 1: [(AB, 1.0)], 2: [(CD, 0.8), (AB, 0.2)], 3: [(CD, 1.0)]}
    assert_soft(out, exp, 5, 2)
    # hard aligned labels agree with the larger share (cell 2's centre, x 25, is over "c")
    hard = label_visual_tokens(words, grid(1, 5), WP, mode="aligned", add_prefix_space=False)
    assert hard.tolist() == [AB, AB, CD, CD, IGN]
    # first mode: the whole coverage goes to the first sub-token
    out = label_visual_tokens(words, grid(1, 5), WP, mode="first", soft=2, add_prefix_space=False)
    assert_soft(out, {0: [(AB, 1.0)], 1: [(AB, 1.0)], 2: [(AB, 1.0)], 3: [(AB, 1.0)]}, 5, 2)


def test_aligned_punctuation_goes_to_the_nearest_sub_token():
    # "(abcd)" over x 0-60, 10 px a character: ( 0-10, ab 10-30, cd 30-50, ) 50-60; cells of 25 px
    # cell 0 (0-25): "(" and ab -> ab; cell 1 (25-50): ab 25-30 (0.2), cd (0.8); cell 2 (50-75):
    # ")" covers 10 of 25 px (0.4), taken by cd, the last content sub-token
    words = [OCRWord("(abcd)", (0, 0, 60, 25))]
    out = label_visual_tokens(words, grid(1, 3, cell=25), WP, mode="aligned", soft=2, add_prefix_space=False)
    assert_soft(out, {0: [(AB, 1.0)], 1: [(CD, 0.8), (AB, 0.2)], 2: [(CD, 1.0)]}, 3, 2)


def test_aligned_spread():
    # row 0: "abcd" over x 2-42 (ab 2-22, cd 22-42) labels cells 0-3 (cell 4's 0.2 fails); row 1: "x"
    # over the whole row. spread 0.5; a neighbour gets 0.5 split by the share of its width under each
    # sub-token (ab extends left, cd right, without bound)
    g = grid(2, 5)
    words = [OCRWord("abcd", (2, 0, 42, 10)), OCRWord("x", (0, 10, 50, 20))]
    out = label_visual_tokens(words, g, WP, mode="aligned", soft=3, spread=0.5, add_prefix_space=False)
    exp = {
        0: [(AB, 0.8 / 1.3), (X, 0.5 / 1.3)],  # ab 0.8 (2-10), x 0.5
        1: [(AB, 1 / 1.5), (X, 0.5 / 1.5)],
        2: [(CD, 0.8 / 1.5), (X, 0.5 / 1.5), (AB, 0.2 / 1.5)],
        3: [(CD, 1 / 1.5), (X, 0.5 / 1.5)],
        # cell (0, 4) shows only 0.2 of abcd: unlabeled, so x does not spread there
        5: [(X, 1 / 1.5), (AB, 0.5 / 1.5)],  # (1, 0): x 0-10 all left of 22 -> ab
        6: [(X, 1 / 1.5), (AB, 0.5 / 1.5)],
        7: [(X, 1 / 1.5), (CD, 0.4 / 1.5), (AB, 0.1 / 1.5)],  # (1, 2): 20-30, ab 2 px, cd 8 px
        8: [(X, 1 / 1.5), (CD, 0.5 / 1.5)],
        9: [(X, 1 / 1.5), (CD, 0.5 / 1.5)],  # (1, 4): diagonal neighbour of (0, 3)
    }
    assert_soft(out, exp, 10, 3)


# ------------------------------------------------------------------------------------------------
def test_views_and_separators():
    # view 0: 2 x 2 cells of 10 px with a newline after each row (positions 0 1 [2] 3 4); view 1: one
    # cell at half scale (20 original px), position 5. alpha (0, 0)-(10, 10), beta (10, 10)-(20, 20)
    v0 = GridView(sx=1, sy=1, ox=0, oy=0, rows=2, cols=2, cell_h=10, cell_w=10, offset=0, row_stride=3)
    v1 = GridView(sx=0.5, sy=0.5, ox=0, oy=0, rows=1, cols=1, cell_h=10, cell_w=10, offset=5, row_stride=1)
    g = VisualGrid("hand", (20, 20), (v0, v1), 6)
    words = [OCRWord("alpha", (0, 0, 10, 10)), OCRWord("beta", (10, 10, 20, 20))]
    out, rep = label_visual_tokens(words, g, WL, soft=2, spread=0.5, return_report=True)
    exp = {
        0: [(A, 1 / 1.5), (B, 0.5 / 1.5)],  # beta's (1, 1) is a diagonal neighbour
        4: [(B, 1 / 1.5), (A, 0.5 / 1.5)],
        5: [(A, 0.5), (B, 0.5)],  # view 1: each word 1/4 of the cell; equal boxes: alpha first
    }
    assert_soft(out, exp, 6, 2)  # (0, 1), (1, 0) show no word; position 2 is a newline
    assert rep.labeled_tokens == 3 and rep.words_used == 2 and rep.num_tokens == 6


def test_report_and_empty_inputs():
    out, rep = label_visual_tokens([], ROW_GRID, WL, soft=3, return_report=True)
    assert_soft(out, {}, 8, 3)
    assert rep.labeled_tokens == 0 and rep.words_used == 0
    # a word whose only cell share is truncated away everywhere is not used
    out, rep = label_visual_tokens(THREE, grid(1, 1), WL, soft=1, min_coverage=0.1, return_report=True)
    assert rep.words_valid == 3 and rep.words_used == 1 and rep.labeled_tokens == 1
    # dropped words are counted as for hard labels
    words = [*ROW_WORDS, OCRWord("", (0, 0, 5, 5)), OCRWord("gamma", (5, 5, 5, 9))]
    out, rep = label_visual_tokens(words, ROW_GRID, WL, soft=2, return_report=True)
    assert rep.dropped == {"empty_text": 1, "degenerate": 1} and rep.words_used == 2
    assert_soft(out, {0: [(A, 1.0)], 1: [(A, 0.6), (B, 0.4)], 2: [(B, 1.0)], 3: [(B, 1.0)]}, 8, 2)
    # ignore_index fills the unused slots
    out = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, soft=2, ignore_index=-1)
    assert out.ids[0].tolist() == [A, -1] and out.ids[7].tolist() == [-1, -1]


# ------------------------------------------------------------------------------------------------
# every family's default grid against a plain per-cell loop
def oracle_soft(grid_, boxes, min_cov, K, spread):
    """{position: [(word index, weight)]} by the documented rule, one cell at a time."""
    tb = grid_.token_boxes().numpy()
    boxes = np.asarray(boxes, dtype=np.float64)
    mass = np.zeros((grid_.num_tokens, len(boxes)))
    for p in range(grid_.num_tokens):
        x0, y0, x1, y1 = tb[p]
        if np.isnan(x0):
            continue
        for w, (a0, b0, a1, b1) in enumerate(boxes):
            ix = max(0.0, min(x1, a1) - max(x0, a0))
            iy = max(0.0, min(y1, b1) - max(y0, b0))
            cov = ix * iy / ((x1 - x0) * (y1 - y0))
            if cov >= min_cov:
                mass[p, w] = cov
    labeled = mass.max(axis=1) > 0
    own = mass > 0
    if spread:
        for v in grid_.views:
            for r in range(v.rows):
                for c in range(v.cols):
                    p = v.offset + r * v.row_stride + c
                    if not labeled[p]:
                        continue
                    for w in range(len(boxes)):
                        if own[p, w]:
                            continue
                        near = [
                            own[v.offset + rr * v.row_stride + cc, w]
                            for rr in range(max(r - 1, 0), min(r + 2, v.rows))
                            for cc in range(max(c - 1, 0), min(c + 2, v.cols))
                        ]
                        if any(near):
                            mass[p, w] = spread
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    out = {}
    for p in np.flatnonzero(labeled):
        ws = sorted(np.flatnonzero(mass[p]), key=lambda w: (-mass[p, w], area[w], w))[:K]
        tot = sum(mass[p, w] for w in ws)
        out[int(p)] = [(int(w), mass[p, w] / tot) for w in ws]
    return out


FAMILY_GRIDS = {
    name: (lambda n=name: VisualGrid.for_family(n, (120, 200)))
    for name in ("gemma3", "idefics3", "internvl", "llava", "llava_next", "llava_onevision", "pixtral")
}
FAMILY_GRIDS["qwen2_vl"] = lambda: VisualGrid.for_qwen2_vl((120, 200), (1, 8, 14))


@pytest.mark.parametrize("spread", [0.0, 0.3])
@pytest.mark.parametrize("family", sorted(FAMILY_GRIDS))
def test_family_grids_against_a_per_cell_loop(family, spread):
    g = FAMILY_GRIDS[family]()
    rng = np.random.default_rng(7)
    boxes = []
    for _ in range(14):
        x0, y0 = rng.uniform(0, 160), rng.uniform(0, 95)
        boxes.append((x0, y0, x0 + rng.uniform(6, 40), y0 + rng.uniform(4, 25)))
    words = [OCRWord(f"w{i}", b) for i, b in enumerate(boxes)]
    out = label_visual_tokens(words, g, WL, soft=3, spread=spread, min_coverage=0.2)
    exp = oracle_soft(g, boxes, 0.2, 3, spread)
    assert len(exp) >= 8
    assert_soft(out, {p: [(ID[f"w{w}"], x) for w, x in t] for p, t in exp.items()}, g.num_tokens, 3)
    hard = label_visual_tokens(words, g, WL, min_coverage=0.2)
    assert torch.equal(out.ids[:, 0] != IGN, hard != IGN)


# "p3q3" -> "p3" + "##q3": two sub-tokens per word, no id shared between words
PQ_VOCAB = {"[UNK]": 0, **{f"p{i}": 2 * i + 1 for i in range(20)}, **{f"##q{i}": 2 * i + 2 for i in range(20)}}
PQ = _fast(models.WordPiece(PQ_VOCAB, unk_token="[UNK]", continuing_subword_prefix="##"))


@pytest.mark.parametrize("family", sorted(FAMILY_GRIDS))
def test_family_grids_aligned_splits_each_words_weight(family):
    """In aligned mode a word's sub-tokens share out exactly the weight the word has in first mode
    (nothing truncated: K = 2 x words), spread included."""
    g = FAMILY_GRIDS[family]()
    rng = np.random.default_rng(11)
    words = []
    for i in range(14):
        x0, y0 = rng.uniform(0, 160), rng.uniform(0, 95)
        words.append(OCRWord(f"p{i}q{i}", (x0, y0, x0 + rng.uniform(6, 40), y0 + rng.uniform(4, 25))))
    kw = {"soft": 28, "spread": 0.3, "min_coverage": 0.2, "add_prefix_space": False}
    first = label_visual_tokens(words, g, PQ, mode="first", **kw)
    aligned = label_visual_tokens(words, g, PQ, mode="aligned", **kw)

    def per_word(out):
        tot = np.zeros((g.num_tokens, 14))
        for p, (ids, ws) in enumerate(zip(out.ids.tolist(), out.weights.tolist())):
            for t, x in zip(ids, ws):
                if t != IGN:
                    tot[p, (t - 1) // 2] += x  # p_i, q_i -> word i
        return tot

    np.testing.assert_allclose(per_word(aligned), per_word(first), atol=1e-6)
    assert set(np.unique(first.ids)) <= {IGN} | {2 * i + 1 for i in range(14)}  # first pieces only
    assert (aligned.ids % 2 == 0).any()  # some cell does get a second piece


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"soft": 0}, "soft"),
        ({"soft": -2}, "soft"),
        ({"soft": 1.5}, "soft"),
        ({"soft": True}, "soft"),
        ({"soft": "2"}, "soft"),
        ({"soft": 2, "spread": 1.0}, "spread"),
        ({"soft": 2, "spread": -0.1}, "spread"),
        ({"soft": 2, "spread": float("nan")}, "spread"),
        ({"soft": 2, "spread": True}, "spread"),
        ({"spread": 0.2}, "spread"),
    ],
)
def test_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        label_visual_tokens(ROW_WORDS, ROW_GRID, WL, **kwargs)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=f"^{name}"):
        build_vision_labels(ids, [], [], WL, image_token_id=9, **kwargs)


# ------------------------------------------------------------------------------------------------
# batches
TID = 99


def test_batch_shapes_and_padding():
    # sample 0: a 1 x 2 image (alpha 1.0 | alpha 0.4 + beta 0.6), then text, then padding (0);
    # sample 1: a 1 x 1 image with no words
    g0, g1 = grid(1, 2), grid(1, 1)
    words0 = [OCRWord("alpha", (0, 0, 14, 10)), OCRWord("beta", (14, 0, 20, 10))]
    ids = torch.tensor([[5, TID, TID, 7, 0, 0], [5, 6, TID, 8, 0, 0]])
    out = build_vision_labels(ids, [g0, g1], [words0, []], WL, image_token_id=TID, soft=2)
    assert isinstance(out, SoftLabels)
    exp_ids = torch.full((2, 6, 2), IGN)
    exp_w = torch.zeros(2, 6, 2)
    exp_ids[0, 1, 0], exp_w[0, 1, 0] = A, 1.0
    exp_ids[0, 2], exp_w[0, 2] = torch.tensor([B, A]), torch.tensor([0.6, 0.4])
    assert torch.equal(out.ids, exp_ids)
    torch.testing.assert_close(out.weights, exp_w, rtol=0, atol=1e-6)
    assert out.weights.dtype == torch.float32
    # hard labels of the same batch are unchanged: the larger share
    hard = build_vision_labels(ids, [g0, g1], [words0, []], WL, image_token_id=TID)
    assert hard.tolist() == [[IGN, A, B, IGN, IGN, IGN], [IGN] * 6]
    # per-sample lists give the same; a 1-D sequence gives (T, K)
    nested = build_vision_labels(ids, [[g0], [g1]], [[words0], [[]]], WL, image_token_id=TID, soft=2)
    assert torch.equal(nested.ids, out.ids) and torch.equal(nested.weights, out.weights)
    one = build_vision_labels(ids[0], [g0], [words0], WL, image_token_id=TID, soft=2)
    assert one.ids.shape == (6, 2) and torch.equal(one.ids, out.ids[0])
    # spread passes through: cell 0 is next to beta's cell 1
    sp = build_vision_labels(ids, [g0, g1], [words0, []], WL, image_token_id=TID, soft=2, spread=0.5)
    assert sp.ids[0, 1].tolist() == [A, B]
    assert sp.weights[0, 1].tolist() == pytest.approx([1 / 1.5, 0.5 / 1.5], abs=1e-6)
    # no image in the batch: all ignore, still (B, T, K)
    none = build_vision_labels(torch.tensor([[5, 6, 7]]), [], [], WL, image_token_id=TID, soft=3)
    assert none.ids.shape == (1, 3, 3) and (none.ids == IGN).all() and (none.weights == 0).all()


def test_scatter_checks_soft_labels():
    g0, g1 = grid(1, 2), grid(1, 1)
    ids = torch.tensor([[TID, TID, TID]])
    s0 = SoftLabels(torch.tensor([[A, IGN], [B, A]]), torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    s1 = SoftLabels(torch.tensor([[C, IGN]]), torch.tensor([[1.0, 0.0]]))
    out = scatter_vision_labels(ids, [g0, g1], [s0, s1], image_token_id=TID)
    assert out.ids.tolist() == [[[A, IGN], [B, A], [C, IGN]]]
    with pytest.raises(ValueError, match="mixes soft"):
        scatter_vision_labels(ids, [g0, g1], [s0, torch.tensor([C])], image_token_id=TID)
    k3 = SoftLabels(torch.full((1, 3), IGN), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="same K"):
        scatter_vision_labels(ids, [g0, g1], [s0, k3], image_token_id=TID)


def test_from_processor_soft_labels():
    proc, prompt = make_processor("qwen2_vl", max_pixels=60 * 28 * 28)
    imgs = [coord_image(200, 300), coord_image(100, 100)]
    out = proc(images=imgs, text=[prompt, prompt], padding=True, return_tensors="pt")
    words = [[OCRWord("the", (10, 10, 150, 60)), OCRWord("fox", (150, 40, 290, 120))], []]
    soft = build_vision_labels_from_processor(proc, imgs, out, words, soft=2, spread=0.2)
    ids = out["input_ids"]
    assert soft.ids.shape == (*ids.shape, 2) and soft.weights.shape == (*ids.shape, 2)
    tid = fam.image_token_id(proc)
    labeled = soft.ids[..., 0] != IGN
    assert labeled.any() and not (labeled & (ids != tid)).any()
    torch.testing.assert_close(soft.weights.sum(-1)[labeled], torch.ones(int(labeled.sum())))
    assert (soft.weights[~labeled] == 0).all() and (soft.ids[~labeled] == IGN).all()
    # the same labeled positions as the hard labels, and each image's labels in place
    hard = build_vision_labels_from_processor(proc, imgs, out, words)
    assert torch.equal(labeled, hard != IGN)
    g0 = VisualGrid.from_processor(proc, imgs[0], out, 0)
    per_image = label_visual_tokens(words[0], g0, proc.tokenizer, soft=2, spread=0.2)
    pos = torch.nonzero(ids[0] == tid).ravel()[: g0.num_tokens]
    assert torch.equal(soft.ids[0, pos], per_image.ids)


# ------------------------------------------------------------------------------------------------
# overlay
def test_overlay_shows_top_targets():
    soft = label_visual_tokens(ROW_WORDS, ROW_GRID, WL, soft=2)
    assert describe_targets(soft, 1, WL) == "alpha 0.6 / beta 0.4"
    assert describe_targets(soft, 1, WL, top=1) == "alpha 0.6"
    assert describe_targets(soft, 0) == f"{A} 1"
    assert describe_targets(soft, 5, WL) == ""
    with pytest.raises(ValueError, match="index"):
        describe_targets(soft, 8, WL)
    # 40 px cells (the same layout at 4x), so the text is drawn: the second line (beta 0.4) lies in the
    # lower half of cell 1, which top=1 leaves empty
    g = grid(2, 4, cell=40)
    words = [OCRWord("alpha", (0, 0, 64, 40)), OCRWord("beta", (64, 0, 160, 40))]
    soft = label_visual_tokens(words, g, WL, soft=2)
    page = Image.new("RGB", (160, 80), "white")
    two = np.asarray(draw_overlay(page, g, soft, words=words, tokenizer=WL, top=2)).astype(int)
    one = np.asarray(draw_overlay(page, g, soft, words=words, tokenizer=WL, top=1)).astype(int)
    lower = (slice(22, 38), slice(42, 78))  # rows, cols of cell 1's lower half, inside its border
    assert np.abs(two[lower] - one[lower]).sum() > 0
    # cells 0, 2, 3 have one target: top does not change them
    assert np.array_equal(two[:, :40], one[:, :40]) and np.array_equal(two[:, 82:], one[:, 82:])
    # the hard labels draw as before
    hard = label_visual_tokens(words, g, WL)
    assert draw_overlay(page, g, hard, words=words, tokenizer=WL).size == (160, 80)
    bad = SoftLabels(soft.ids[:5], soft.weights[:5])
    with pytest.raises(ValueError, match="labels"):
        draw_overlay(page, g, bad)
    with pytest.raises(ValueError, match="top"):
        draw_overlay(page, g, soft, top=0)
