"""Real OCR end to end: render known words with Pillow, OCR them with the `tesseract` binary (TSV),
read the TSV, label for Qwen2-VL, and check the labeled tokens sit on the rendered words.

Oracles are independent of the code under test: the rendered word boxes come from Pillow, and the
page is 672 x 336 px, already a multiple of 28 and inside Qwen2-VL's default pixel bounds, so the
processor keeps its size and token i is the 28 px cell at row i // 24, column i % 24.
"""

import shutil
import subprocess

import pytest
from PIL import Image, ImageDraw, ImageFont

TESSERACT = shutil.which("tesseract")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
pytestmark = [
    pytest.mark.skipif(TESSERACT is None,
                       reason="tesseract binary not installed (apt-get install tesseract-ocr)"),
]

W, H, CELL, COLS = 672, 336, 28, 24
LINES = [["Market", "report", "shows", "strong", "growth"],
         ["Every", "token", "learns", "its", "word"],
         ["Quarterly", "revenue", "exceeded", "forecast"]]
VOCAB = ["[UNK]"] + sorted({w for line in LINES for w in line})


def render(path):
    """Draw LINES in DejaVu Sans 30 px; return [(word, ink box)] from Pillow's text geometry."""
    import os

    if not os.path.exists(FONT):
        pytest.skip(f"DejaVu font missing at {FONT} (apt-get install fonts-dejavu-core)")
    font = ImageFont.truetype(FONT, 30)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    boxes = []
    y = 40
    for line in LINES:
        x = 30
        for word in line:
            d.text((x, y), word, font=font, fill="black")
            boxes.append((word, d.textbbox((x, y), word, font=font)))
            x = boxes[-1][1][2] + 22
        y += 95
    img.save(path)
    return boxes


def area(a):
    return max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])


def inter(a, b):
    return area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


@pytest.fixture(scope="module")
def ocr(tmp_path_factory):
    d = tmp_path_factory.mktemp("tess")
    rendered = render(d / "page.png")
    # `tesseract IMG BASE tsv` writes BASE.tsv in image_to_data format
    r = subprocess.run([TESSERACT, str(d / "page.png"), str(d / "page"), "tsv"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return d, rendered


def test_tesseract_words_are_read(ocr):
    from dvsft_kernels.labeling.readers import read_ocr

    d, rendered = ocr
    words = read_ocr(d / "page.tsv")
    assert words and all(0.0 <= w.score <= 1.0 for w in words)
    found = 0
    for text, box in rendered:
        # a rendered word counts as read when an OCR word with its text overlaps its box mostly
        if any(w.text == text and inter(w.box, box) >= 0.5 * min(area(w.box), area(box)) for w in words):
            found += 1
    assert found >= 0.8 * len(rendered), (found, [w.text for w in words])
    assert read_ocr(d / "page.tsv", min_score=1.0) == [w for w in words if w.score >= 1.0]


def test_labels_fall_on_rendered_words(ocr):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor

    from dvsft_kernels.labeling import VisualGrid, label_visual_tokens
    from dvsft_kernels.labeling.readers import read_ocr

    d, rendered = ocr
    words = read_ocr(d / "page.tsv", min_score=0.5)
    vocab = {w: i for i, w in enumerate(VOCAB)}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")

    image = Image.open(d / "page.png").convert("RGB")
    thw = Qwen2VLImageProcessor()(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert thw == [1, 2 * H // CELL, 2 * W // CELL]  # the page is kept at its size (see module doc)
    grid = VisualGrid.for_qwen2_vl(image_size=(H, W), image_grid_thw=thw, patch_size=14, merge_size=2)
    labels, report = label_visual_tokens(words, grid, tok, mode="first", min_coverage=0.25,
                                         return_report=True)
    assert labels.shape == (grid.num_tokens,) == ((H // CELL) * COLS,)

    labeled = [(i, int(v)) for i, v in enumerate(labels.tolist()) if v != -100]
    assert len(labeled) >= len(rendered)  # every word is at least a cell wide
    right = 0
    hit_words = set()
    for i, tid in labeled:
        r, c = divmod(i, COLS)
        cell = (c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL)
        cov = [(inter(cell, box) / CELL**2, k) for k, (_, box) in enumerate(rendered)]
        best, k = max(cov)
        # the cell lies on a rendered word; Tesseract's boxes differ from Pillow's by a few px,
        # so a cell at the 25 % edge may see a little less of the Pillow box
        assert best >= 0.1, (i, cell, VOCAB[tid])
        if VOCAB[tid] == rendered[k][0]:
            right += 1
            hit_words.add(k)
    assert right >= 0.9 * len(labeled), (right, len(labeled))
    assert len(hit_words) >= 0.8 * len(rendered)
    assert report.words_used >= 0.8 * len(rendered)
