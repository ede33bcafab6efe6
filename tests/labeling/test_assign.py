"""label_visual_tokens against a brute-force oracle (pixel-lattice rasterisation of cells and boxes,
tie rule re-implemented in a loop), plus tokenisation rules and messy input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dvsft_kernels.labeling import DROP_REASONS, GridView, OCRWord, VisualGrid, label_visual_tokens
from dvsft_kernels.labeling.assign import clear_token_cache, default_add_prefix_space
from tests.labeling._geometry_helpers import byte_bpe, oracle_winners, rasterised_coverage

VOCAB = [f"word{i}" for i in range(64)]


def word_level(words=VOCAB):
    """One id per word: labels say which word won."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


WL = word_level()


def _random_integer_grid(rng) -> VisualGrid:
    """Views whose cells fall on integer original pixels (scales 1, 1/2, 1/4: exact in binary)."""
    views, offset, W, H = [], 0, 0, 0
    for vi in range(int(rng.integers(1, 4))):
        k = int(rng.choice([1, 2, 4]))
        rows, cols = int(rng.integers(1, 7)), int(rng.integers(1, 7))
        ch, cw = int(rng.integers(2, 9)), int(rng.integers(2, 9))
        ox, oy = int(rng.integers(0, 6)), int(rng.integers(0, 6))
        stride = cols + int(rng.integers(0, 2))
        kw = {}
        if rng.random() < 0.4:  # non-uniform spans with gaps
            xs = np.cumsum(rng.integers(0, 3, cols) + cw)
            kw["col_spans"] = tuple((int(a - cw), int(a)) for a in xs)
            ys = np.cumsum(rng.integers(0, 3, rows) + ch)
            kw["row_spans"] = tuple((int(a - ch), int(a)) for a in ys)
        ext_w = kw["col_spans"][-1][1] if "col_spans" in kw else cols * cw
        ext_h = kw["row_spans"][-1][1] if "row_spans" in kw else rows * ch
        if rng.random() < 0.5:  # padding: content is a sub-rectangle
            x0, y0 = int(rng.integers(0, ext_w // 2 + 1)), int(rng.integers(0, ext_h // 2 + 1))
            kw["content"] = (
                x0,
                y0,
                int(rng.integers(x0 + 1, ext_w + 1)),
                int(rng.integers(y0 + 1, ext_h + 1)),
            )
        views.append(
            GridView(
                sx=1 / k,
                sy=1 / k,
                ox=ox,
                oy=oy,
                rows=rows,
                cols=cols,
                cell_h=ch,
                cell_w=cw,
                offset=offset,
                row_stride=stride,
                name=f"v{vi}",
                **kw,
            )
        )
        offset += (rows - 1) * stride + cols + int(rng.integers(0, 3))
        W, H = max(W, (ox + ext_w) * k), max(H, (oy + ext_h) * k)
    W, H = W + int(rng.integers(0, 5)), H + int(rng.integers(0, 5))
    return VisualGrid("test", (H, W), tuple(views), offset)


def _random_words(rng, H, W, n, integer=True):
    out = []
    for i in range(n):
        x0, y0 = rng.uniform(-0.2 * W, W), rng.uniform(-0.2 * H, H)
        x1, y1 = x0 + rng.uniform(1, 0.6 * W), y0 + rng.uniform(1, 0.6 * H)
        box = tuple(round(v) for v in (x0, y0, x1, y1)) if integer else (x0, y0, x1, y1)
        if integer and (box[2] <= box[0] or box[3] <= box[1]):
            box = (box[0], box[1], box[0] + 1, box[1] + 1)
        out.append(OCRWord(VOCAB[i], box))
    return out


def _expected(cov, words, min_cov, H, W, ignore=-100):
    boxes = np.array([w.box for w in words], dtype=np.float64)
    clipped = np.stack(
        [
            np.maximum(boxes[:, 0], 0),
            np.maximum(boxes[:, 1], 0),
            np.minimum(boxes[:, 2], W),
            np.minimum(boxes[:, 3], H),
        ],
        1,
    )
    win = oracle_winners(cov, clipped, min_cov)
    ids = np.array([WL.convert_tokens_to_ids(w.text) for w in words])
    return np.where(win >= 0, ids[np.maximum(win, 0)], ignore)


@pytest.mark.parametrize("seed", range(40))
def test_matches_exact_rasterisation_oracle(seed):
    rng = np.random.default_rng(seed)
    grid = _random_integer_grid(rng)
    H, W = grid.image_size
    words = _random_words(rng, H, W, int(rng.integers(1, 25)))
    # duplicates and nested boxes exercise the tie rule
    words.append(OCRWord(VOCAB[40], words[0].box))
    b = words[0].box
    words.append(OCRWord(VOCAB[41], (b[0] - 3, b[1] - 3, b[2] + 3, b[3] + 3)))
    min_cov = float(rng.choice([0.1, 0.25, 0.5, 1.0]))
    clipped = [(max(w.box[0], 0), max(w.box[1], 0), min(w.box[2], W), min(w.box[3], H)) for w in words]
    cov = rasterised_coverage(grid, clipped, samples=1)
    expect = _expected(cov, words, min_cov, H, W)
    got = label_visual_tokens(words, grid, WL, min_coverage=min_cov).numpy()
    np.testing.assert_array_equal(got, expect)


def _clear(cov, min_cov, margin):
    s = np.sort(cov, axis=1)
    best, second = s[:, -1], (s[:, -2] if cov.shape[1] > 1 else np.zeros(len(cov)))
    return ((best >= min_cov + margin) & (best - second > margin)) | (best < min_cov - margin)


@pytest.mark.parametrize("seed", range(12))
def test_matches_supersampled_oracle_on_real_family_grids(seed):
    rng = np.random.default_rng(100 + seed)
    H, W = int(rng.integers(60, 500)), int(rng.integers(60, 500))
    grid = [
        lambda: VisualGrid.for_qwen2_vl((H, W), (1, 2 * max(1, H // 28), 2 * max(1, W // 28))),
        lambda: VisualGrid.for_llava((H, W), do_pad=True),
        lambda: VisualGrid.for_llava_next(
            (H, W),
            tile_size=56,
            image_grid_pinpoints=[[56 * i, 56 * j] for i in range(1, 5) for j in range(1, 5)],
        ),
        lambda: VisualGrid.for_llava_onevision(
            (H, W),
            tile_size=60,
            num_image_tokens=16,
            patch_size=14,
            image_grid_pinpoints=[[60 * i, 60 * j] for i in range(1, 7) for j in range(1, 7)],
        ),
        lambda: VisualGrid.for_internvl((H, W), tile_size=64, image_seq_length=16),
        lambda: VisualGrid.for_idefics3((H, W), longest_edge=448, max_image_size=112, image_seq_len=16),
        lambda: VisualGrid.for_gemma3((H, W), do_pan_and_scan=True, pan_and_scan_min_crop_size=32),
        lambda: VisualGrid.for_pixtral((H, W), patch_size=14, spatial_merge_size=2, longest_edge=300),
    ][seed % 8]()
    words = _random_words(rng, H, W, 12, integer=False)
    min_cov = float(rng.choice([0.25, 0.5]))
    cov = rasterised_coverage(grid, [w.box for w in words], samples=4)
    expect = _expected(cov, words, min_cov, H, W)
    got = label_visual_tokens(words, grid, WL, min_coverage=min_cov).numpy()
    clear = _clear(cov, min_cov, 0.06)
    assert clear.mean() > 0.5  # most tokens are decided clearly; those are compared exactly
    np.testing.assert_array_equal(got[clear], expect[clear])
    # non-cell positions are never labeled
    noncell = np.ones(grid.num_tokens, bool)
    noncell[grid.cell_positions()] = False
    assert (got[noncell] == -100).all()


def test_tie_rules():
    grid = VisualGrid.for_qwen2_vl((56, 56), (1, 4, 4))  # 2 x 2 cells of 28 px
    same = [OCRWord("word1", (0, 0, 28, 28)), OCRWord("word2", (0, 0, 28, 28))]
    assert label_visual_tokens(same, grid, WL)[0] == WL.convert_tokens_to_ids("word1")  # first listed
    nested = [OCRWord("word1", (0, 0, 56, 56)), OCRWord("word2", (0, 0, 28, 28))]
    lab = label_visual_tokens(nested, grid, WL)
    assert lab[0] == WL.convert_tokens_to_ids("word2")  # both cover fully: the smaller box
    assert (lab[1:] == WL.convert_tokens_to_ids("word1")).all()
    more = [OCRWord("word1", (0, 0, 20, 28)), OCRWord("word2", (10, 0, 28, 28))]
    assert label_visual_tokens(more, grid, WL)[0] == WL.convert_tokens_to_ids("word1")  # 20/28 > 18/28


def test_min_coverage_boundary_and_ignore_index():
    grid = VisualGrid.for_qwen2_vl((28, 56), (1, 2, 4))  # 1 x 2 cells
    w = [OCRWord("word3", (0, 0, 7, 28))]  # exactly 1/4 of cell 0
    assert label_visual_tokens(w, grid, WL, min_coverage=0.25).tolist() == [4, -100]
    assert label_visual_tokens(w, grid, WL, min_coverage=0.26, ignore_index=-1).tolist() == [-1, -1]
    out = label_visual_tokens(w, grid, WL)
    assert out.dtype == torch.int64 and out.shape == (grid.num_tokens,)


def test_messy_words_are_dropped_and_counted():
    grid = VisualGrid.for_qwen2_vl((280, 280), (1, 20, 20))
    nan = float("nan")
    words = [
        OCRWord("word0", (10, 10, 60, 40)),  # fine
        OCRWord("word1", (300, 10, 350, 40)),  # outside (right)
        OCRWord("word2", (-50, -50, -1, -1)),  # outside (top-left)
        OCRWord("word3", (60, 10, 10, 40)),  # inverted
        OCRWord("word4", (10, 10, 10, 40)),  # zero width
        OCRWord("word5", (nan, 10, 60, 40)),  # NaN
        OCRWord("word6", (10, 10, float("inf"), 40)),  # inf
        OCRWord("   ", (10, 10, 60, 40)),  # whitespace text
        OCRWord("", (10, 10, 60, 40)),  # empty text
        OCRWord("word9", (100, 100, 150, 130), score=0.1),  # low score
        OCRWord("word10", (-20, 200, 40, 260)),  # partly outside: clipped, used
    ]
    lab, rep = label_visual_tokens(words, grid, WL, min_score=0.5, return_report=True)
    assert rep.dropped == {
        "outside_image": 2,
        "inverted": 1,
        "degenerate": 1,
        "non_finite": 2,
        "empty_text": 2,
        "low_score": 1,
    }
    assert rep.num_words == 11 and rep.words_valid == 2 and rep.words_used == 2
    assert set(lab.unique().tolist()) == {-100, 1, 11}
    assert rep.labeled_tokens == int((lab != -100).sum())
    assert rep.labeled_fraction == pytest.approx(rep.labeled_tokens / grid.num_tokens)
    assert set(rep.dropped) <= set(DROP_REASONS)
    # partly-outside word labels the clipped part: column 0, rows 200..260 -> rows 14..18
    assert lab.view(10, 10)[7:9, 0].tolist() == [11, 11]
    # without min_score the score is ignored
    _, rep2 = label_visual_tokens(words, grid, WL, return_report=True)
    assert "low_score" not in rep2.dropped


def test_untokenisable_words_are_dropped():
    vocab = {"a": 0, "b": 1, "ab": 2}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))  # no unk token: unknown text -> nothing
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    grid = VisualGrid.for_qwen2_vl((56, 56), (1, 4, 4))
    lab, rep = label_visual_tokens(
        [OCRWord("zz", (0, 0, 28, 28)), OCRWord("ab", (28, 0, 56, 28))],
        grid,
        hf,
        add_prefix_space=False,
        return_report=True,
    )
    assert rep.dropped == {"no_tokens": 1} and lab.tolist() == [-100, 2, -100, -100]


def test_quadrilaterals_tuples_and_dicts():
    grid = VisualGrid.for_qwen2_vl((280, 280), (1, 20, 20))
    ref = label_visual_tokens([OCRWord("word1", (30, 40, 120, 90))], grid, WL)
    quad = [(30, 40), (120, 45), (115, 90), (35, 85)]  # bounding box (30, 40, 120, 90)
    for w in (
        [OCRWord("word1", quad)],
        [OCRWord("word1", [c for p in quad for c in p])],
        [("word1", quad)],
        [{"text": "word1", "box": np.array(quad)}],
        [("word1", (30, 40, 120, 90), 0.9)],
    ):
        assert torch.equal(label_visual_tokens(w, grid, WL), ref)
    mixed = [OCRWord("word1", quad), OCRWord("word2", (200, 200, 250, 250))]  # ragged box shapes
    lab = label_visual_tokens(mixed, grid, WL)
    assert (lab == 2).sum() > 0 and (lab == 3).sum() > 0


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda g: label_visual_tokens([OCRWord("a", (1, 2, 3))], g, WL), ValueError, r"words\[0\].box"),
        (lambda g: label_visual_tokens([OCRWord("a", "oops")], g, WL), ValueError, r"words\[0\].box"),
        (lambda g: label_visual_tokens([OCRWord(None, (1, 2, 3, 4))], g, WL), TypeError, r"words\[0\].text"),
        (lambda g: label_visual_tokens([42], g, WL), TypeError, r"words\[0\]"),
        (lambda g: label_visual_tokens("word1", g, WL), TypeError, "words"),
        (lambda g: label_visual_tokens([], g, WL, mode="middle"), ValueError, "mode"),
        (lambda g: label_visual_tokens([], g, WL, min_coverage=0), ValueError, "min_coverage"),
        (lambda g: label_visual_tokens([], g, WL, min_coverage=1.5), ValueError, "min_coverage"),
        (lambda g: label_visual_tokens([], g, WL, ignore_index=0.5), ValueError, "ignore_index"),
        (lambda g: label_visual_tokens([], object(), WL), TypeError, "grid"),
        (lambda g: label_visual_tokens([], g, None), TypeError, "tokenizer"),
        (lambda g: label_visual_tokens([], g, WL, add_prefix_space="yes"), ValueError, "add_prefix_space"),
        (lambda g: label_visual_tokens([], g, WL, min_score=float("nan")), ValueError, "min_score"),
    ],
)
def test_bad_arguments_raise_naming_them(call, exc, match):
    grid = VisualGrid.for_qwen2_vl((56, 56), (1, 4, 4))
    with pytest.raises(exc, match=match):
        call(grid)


def test_empty_page():
    grid = VisualGrid.for_qwen2_vl((56, 56), (1, 4, 4))
    lab, rep = label_visual_tokens([], grid, WL, return_report=True)
    assert (lab == -100).all() and rep.labeled_tokens == 0 and rep.labeled_fraction == 0.0


# ------------------------------------------------------------------------------------------------
# tokenisation
def _pieces(tok, text):
    """Independent view of a word's pieces: ids of ' ' + text, minus leading whitespace-only pieces."""
    ids = tok(" " + text, add_special_tokens=False)["input_ids"]
    while len(ids) > 1 and not tok.decode([ids[0]]).strip():
        ids = ids[1:]
    return ids


def test_prefix_space_default_and_options():
    tok = byte_bpe()
    assert default_add_prefix_space(tok) is True  # byte-level BPE
    grid = VisualGrid.for_qwen2_vl((28, 28), (1, 2, 2))
    for text in ("the", "quick", "Größe", "東京", "12345", "zz-top!"):
        w = [OCRWord(text, (0, 0, 28, 28))]
        assert label_visual_tokens(w, grid, tok)[0] == _pieces(tok, text)[0]
        assert (
            label_visual_tokens(w, grid, tok, add_prefix_space=False)[0]
            == tok(text, add_special_tokens=False)["input_ids"][0]
        )
    assert label_visual_tokens([OCRWord("the", (0, 0, 28, 28))], grid, tok)[0] == tok.convert_tokens_to_ids(
        "Ġthe"
    )

    def wrap(pre=None, norm=None):
        t = Tokenizer(models.WordLevel({"[UNK]": 0, "▁a": 1}, unk_token="[UNK]"))
        if pre is not None:
            t.pre_tokenizer = pre
        if norm is not None:
            t.normalizer = norm
        return PreTrainedTokenizerFast(tokenizer_object=t)

    assert (
        default_add_prefix_space(wrap(pre=pre_tokenizers.Metaspace(prepend_scheme="first"))) is False
    )  # Llama 2
    assert default_add_prefix_space(wrap(pre=pre_tokenizers.ByteLevel(add_prefix_space=True))) is False
    assert default_add_prefix_space(wrap(norm=normalizers.Replace(" ", "▁"))) is True  # Gemma style
    assert (
        default_add_prefix_space(
            wrap(norm=normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]))
        )
        is False
    )


def test_aligned_mode_picks_the_piece_under_each_cell():
    tok = byte_bpe()
    text = "zqxjkvbpwy"  # rare letters: one byte-level piece per character or so
    pieces = _pieces(tok, text)
    assert len(pieces) >= 5
    # character span of each piece, from decoding the pieces (independent of offsets)
    lens = [
        len(tok.decode([p]).lstrip(" ")) if i == 0 else len(tok.decode([p])) for i, p in enumerate(pieces)
    ]
    assert sum(lens) == len(text)
    piece_of_char = np.repeat(np.arange(len(pieces)), lens)
    grid = VisualGrid.for_qwen2_vl((28, 28 * 20), (1, 2, 40))  # 1 x 20 cells
    box = (28 * 3, 0, 28 * 13, 28)  # 10 cells, one character each
    lab = label_visual_tokens([OCRWord(text, box)], grid, tok, mode="aligned")
    for c in range(20):
        if 3 <= c < 13:
            assert lab[c] == pieces[piece_of_char[c - 3]]
        else:
            assert lab[c] == -100
    first = label_visual_tokens([OCRWord(text, box)], grid, tok, mode="first")
    assert (first[3:13] == pieces[0]).all()


def test_aligned_mode_non_ascii_and_many_pieces():
    tok = byte_bpe()
    text = "東京Größe"  # multi-byte characters split over several byte-level pieces
    pieces = _pieces(tok, text)
    grid = VisualGrid.for_qwen2_vl((28, 28 * 7), (1, 2, 14))  # 7 cells, one character each
    lab = label_visual_tokens([OCRWord(text, (0, 0, 28 * 7, 28))], grid, tok, mode="aligned")
    assert set(lab.tolist()) <= set(pieces)
    # the piece under each character's cell decodes to bytes of that character (or its first byte)
    enc = tok.backend_tokenizer.encode(" " + text, add_special_tokens=False)
    for c, ch in enumerate(text):
        holders = [i for i, (s, e) in zip(enc.ids, enc.offsets) if s <= c + 1 < e]
        assert lab[c].item() == holders[0]


def test_batched_tokenisation_matches_per_word_calls_and_cache_tracks_vocab():
    tok = byte_bpe(("<x>",))
    clear_token_cache()
    texts = ["alpha", "beta", "alpha", "Größe", "12345", "x" * 30]
    grid = VisualGrid.for_qwen2_vl((28, 28 * 6), (1, 2, 12))
    words = [OCRWord(t, (28 * i, 0, 28 * (i + 1), 28)) for i, t in enumerate(texts)]
    lab = label_visual_tokens(words, grid, tok)
    assert lab.tolist() == [_pieces(tok, t)[0] for t in texts]
    assert torch.equal(label_visual_tokens(words, grid, tok), lab)  # from the cache
    assert torch.equal(label_visual_tokens(words, grid, tok, token_cache=False), lab)
    tok.add_tokens(["alpha"])  # vocabulary changes: cached pieces must not be reused
    lab2 = label_visual_tokens(words, grid, tok)
    assert lab2[0] == lab2[2] == tok.convert_tokens_to_ids("alpha") != lab[0]
