"""The punctuation rule of label_visual_tokens: a word's leading / trailing punctuation does not take
its first token; its cells are labeled from its content (docs/labeling.md, "Which token a cell gets").

Tokenizer: the repo's byte-level BPE (examples/data/tokenizer/tokenizer.json), where a curly quote is
three byte pieces, so the old rule labeled ``‘Total:`` with a byte fragment. Oracle: the content,
written out by hand, tokenised here with the backend tokenizer (``" " + content``, the bare space piece
dropped) and its offsets; the grid is one row of 28 px cells, one cell per character of the word.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from transformers import PreTrainedTokenizerFast

from dvsft_kernels.labeling import OCRWord, VisualGrid, label_visual_tokens
from dvsft_kernels.labeling.assign import content_span

TOKENIZER = Path(__file__).resolve().parents[2] / "examples" / "data" / "tokenizer" / "tokenizer.json"
CELL, IGN = 28, -100
# word, its content (the oracle), characters stripped before the content
CASES = [
    ("\u2018Total:", "Total", 1),
    ('"quoted"', "quoted", 1),
    ("(a)", "a", 1),
    ("...", "...", 0),  # only punctuation: its own tokens
    ("\u2014", "\u2014", 0),  # an em dash alone, likewise
    ("\u00abd\u00e9j\u00e0\u00bb", "d\u00e9j\u00e0", 1),  # guillemets
    ("`code\u00b4", "code", 1),  # quote-like symbols outside the P* categories
    ("don't", "don't", 0),  # inner punctuation stays
    ("Total", "Total", 0),  # no punctuation: unchanged
]


@pytest.fixture(scope="module")
def tok():
    if not TOKENIZER.exists():
        pytest.skip(f"{TOKENIZER} missing (python examples/make_sample_data.py)")
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))


def pieces(tok, content):
    """[(id, char start in content)] of ``" " + content`` without the pieces spelling only the space."""
    enc = tok.backend_tokenizer.encode(" " + content, add_special_tokens=False)
    out = [(i, max(a - 1, 0)) for i, (a, b) in zip(enc.ids, enc.offsets) if b > 1]
    assert out, content
    return out


def one_row(n):
    return VisualGrid.for_qwen2_vl(image_size=(CELL, CELL * n), image_grid_thw=[1, 2, 2 * n],
                                   patch_size=14, merge_size=2)


@pytest.mark.parametrize(("word", "content", "lead"), CASES)
def test_content_span(word, content, lead):
    a, b = content_span(word)
    assert word[a:b] == content and a == lead


@pytest.mark.parametrize(("word", "content", "lead"), CASES)
def test_first_mode_labels_every_cell_with_the_contents_first_token(tok, word, content, lead):
    n = len(word)
    labels = label_visual_tokens([OCRWord(word, (0, 0, CELL * n, CELL))], one_row(n), tok, mode="first")
    assert labels.tolist() == [pieces(tok, content)[0][0]] * n


@pytest.mark.parametrize(("word", "content", "lead"), CASES)
def test_aligned_mode_stripped_characters_take_the_nearest_content_token(tok, word, content, lead):
    """Cell k shows character k of the word; over a stripped character it gets the content token
    nearest to it (the first for leading punctuation, the last for trailing)."""
    n = len(word)
    labels = label_visual_tokens([OCRWord(word, (0, 0, CELL * n, CELL))], one_row(n), tok, mode="aligned")
    ps = pieces(tok, content)
    want = []
    for k in range(n):
        ch = min(max(k - lead, 0), len(content) - 1)
        # the piece holding character ch: the last start <= ch; of a character split over byte
        # pieces (same start), the first piece
        s = max(start for _, start in ps if start <= ch)
        want.append(next(i for i, start in ps if start == s))
    assert labels.tolist() == want


def test_no_byte_fragment_of_a_quote(tok):
    """The motivating case: before the rule, every cell of ‘Total: got the first byte of the quote."""
    quote_first = tok.backend_tokenizer.encode(" \u2018", add_special_tokens=False).ids
    labels = label_visual_tokens([OCRWord("\u2018Total:", (0, 0, CELL * 7, CELL))], one_row(7), tok)
    assert not set(labels.tolist()) & set(quote_first)
    assert tok.convert_ids_to_tokens(labels.tolist()[:1]) == ["\u0120T"]


def test_punctuation_words_dropped_only_by_geometry(tok):
    """Words of only punctuation are not dropped by the rule: they take their own tokens."""
    words = [OCRWord("...", (0, 0, 56, 28)), OCRWord("\u2014", (56, 0, 112, 28))]
    labels, report = label_visual_tokens(words, one_row(4), tok, return_report=True)
    assert report.words_used == 2 and report.dropped == {}
    assert labels.tolist() == [pieces(tok, "...")[0][0]] * 2 + [pieces(tok, "\u2014")[0][0]] * 2


FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


@pytest.mark.skipif(shutil.which("tesseract") is None,
                    reason="tesseract binary not installed (apt-get install tesseract-ocr)")
def test_real_tesseract_text_is_labeled_from_its_content(tok):
    """Tesseract keeps quotes and punctuation on the words it reads; the labels are the content's."""
    from PIL import Image, ImageDraw, ImageFont

    from dvsft_kernels.labeling import run_ocr

    if not os.path.exists(FONT):
        pytest.skip(f"DejaVu font missing at {FONT}")
    font = ImageFont.truetype(FONT, 30)
    img = Image.new("RGB", (560, 140), "white")  # 20 x 5 cells of 28 px: Qwen2-VL keeps the size
    d = ImageDraw.Draw(img)
    d.text((20, 30), '\u2018Total: "quoted" (a)', font=font, fill="black")
    d.text((20, 85), "Market report.", font=font, fill="black")
    words = run_ocr(img)
    texts = [w.text for w in words]
    assert {"\u2018Total:", '"quoted"', "(a)", "report."} <= set(texts), texts
    grid = VisualGrid.for_qwen2_vl(image_size=(140, 560), image_grid_thw=[1, 10, 40], patch_size=14,
                                   merge_size=2)
    labels = label_visual_tokens(words, grid, tok, mode="first")
    got = set(labels.tolist()) - {IGN}
    assert got == {pieces(tok, c)[0][0] for c in ("Total", "quoted", "a", "Market", "report")}
    aligned = set(label_visual_tokens(words, grid, tok, mode="aligned").tolist()) - {IGN}
    content_ids = {i for c in ("Total", "quoted", "a", "Market", "report") for i, _ in pieces(tok, c)}
    assert aligned and aligned <= content_ids
