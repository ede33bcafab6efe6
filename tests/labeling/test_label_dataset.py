"""`label_dataset`: a `vision_labels` column on a Hugging Face `datasets.Dataset` of rendered pages.

Oracles: labels computed one image at a time (`VisualGrid.from_processor` + `label_visual_tokens`,
what `dvsft-kernels label --processor` does); `num_proc=1` and `num_proc=2` give the same column; and
an independent geometric one: a 280 x 140 page keeps its size under Qwen2-VL's defaults, so its grid is
5 x 10 cells of 28 px and a word covering cells (1, 1) and (1, 2) labels tokens 11 and 12.
"""

import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

from dvsft_kernels.labeling import (
    OCRWord,
    VisualGrid,
    build_vision_labels_from_processor,
    label_dataset,
    label_visual_tokens,
)
from dvsft_kernels.labeling import families as fam
from tests.labeling._geometry_helpers import make_processor

IGN = -100
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


@pytest.fixture(scope="module")
def proc():
    return make_processor("qwen2_vl")  # (processor, prompt with one image placeholder)


def _page(size, words):
    """A white page with a dark bar where each word is (what a renderer would draw there)."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for w in words or []:
        d.rectangle(w["box"], fill="black")
    return img


QUICK = {"text": "quick", "box": [28.0, 28.0, 84.0, 56.0], "score": 0.9}  # tokens 11, 12 of a 280 x 140 page
FOX = {"text": "fox", "box": [140.0, 84.0, 168.0, 112.0], "score": 0.5}  # token 35
ROWS = [
    ((280, 140), [QUICK, FOX]),
    ((280, 140), []),  # a page without words: all ignore_index
    ((300, 500), [{"text": "invoice", "box": [10.0, 10.0, 200.0, 60.0], "score": None},
                  {"text": "total", "box": [20.0, 300.0, 120.0, 340.0], "score": 1.0}]),
    ((640, 360), [QUICK, {"text": "brown", "box": [300.0, 200.0, 420.0, 240.0], "score": 0.7}]),
    ((200, 120), [FOX]),
    ((280, 140), [QUICK]),
]


def _dataset():
    feats = datasets.Features({
        "image": datasets.Image(),
        "words": datasets.List({"text": datasets.Value("string"),
                                "box": datasets.List(datasets.Value("float64")),
                                "score": datasets.Value("float64")}),
        "id": datasets.Value("int64"),
    })
    return datasets.Dataset.from_dict(
        {"image": [_page(s, w) for s, w in ROWS], "words": [w for _, w in ROWS], "id": list(range(len(ROWS)))},
        features=feats)


def _one_by_one(processor, image, words, **kw):
    ws = [OCRWord(w["text"], w["box"], 1.0 if w["score"] is None else w["score"]) for w in words]
    return label_visual_tokens(ws, VisualGrid.from_processor(processor, image), processor.tokenizer,
                               **kw).tolist()


def test_column_num_proc_and_one_by_one(proc):
    p, _ = proc
    ds = _dataset()
    one = label_dataset(ds, p, num_proc=1)
    two = label_dataset(ds, p, num_proc=2)
    assert one.column_names == ["image", "words", "id", "vision_labels"]
    assert one["id"] == list(range(len(ROWS)))  # the other columns are kept, in order
    assert one["vision_labels"] == two["vision_labels"]
    for k, (size, words) in enumerate(ROWS):
        assert one[k]["vision_labels"] == _one_by_one(p, ds[k]["image"], words), k
    # the independent geometry: 280 x 140 -> 50 tokens, " quick" at 11, 12 and " fox" at 35
    first = {i: t for i, t in enumerate(one[0]["vision_labels"]) if t != IGN}
    assert len(one[0]["vision_labels"]) == 50 and sorted(first) == [11, 12, 35]
    quick = p.tokenizer(" quick", add_special_tokens=False)["input_ids"][0]
    assert first[11] == first[12] == quick and first[35] != quick
    assert one[1]["vision_labels"] == [IGN] * 50
    assert sum(t != IGN for t in one[2]["vision_labels"]) > 0
    # label options reach the labeler: min_score 0.6 drops FOX (0.5)
    hi = label_dataset(ds, p, min_score=0.6)
    assert sorted(i for i, t in enumerate(hi[0]["vision_labels"]) if t != IGN) == [11, 12]


def test_aligned_with_input_ids(proc):
    """With input_ids_column: labels on the row's image placeholders, as the collator places them."""
    p, prompt = proc
    ds = _dataset()
    ids = [p(text=[prompt], images=[ds[k]["image"]], return_tensors="pt")["input_ids"][0].tolist()
           for k in range(len(ROWS))]
    ds = ds.add_column("input_ids", ids)
    out = label_dataset(ds, p, input_ids_column="input_ids", num_proc=2, mode="aligned")
    tid = fam.image_token_id(p)
    for k, (_, words) in enumerate(ROWS):
        got = out[k]["vision_labels"]
        assert len(got) == len(ids[k])
        outputs = p(text=[prompt], images=[ds[k]["image"]], return_tensors="pt")
        want = build_vision_labels_from_processor(
            p, [ds[k]["image"]], outputs, [[OCRWord(w["text"], w["box"]) for w in words]], mode="aligned")
        assert got == want[0].tolist(), k
        # independently: the image's per-token labels, in order, at the placeholder positions
        pos = np.flatnonzero(np.asarray(ids[k]) == tid)
        per_image = _one_by_one(p, ds[k]["image"], words, mode="aligned")
        assert [got[i] for i in pos] == per_image
        assert all(t == IGN for i, t in enumerate(got) if i not in set(pos.tolist()))


def test_several_images_per_row_and_dataset_dict(proc):
    p, _ = proc
    ds = datasets.Dataset.from_dict({
        "images": [[_page(ROWS[0][0], ROWS[0][1]), _page(ROWS[4][0], ROWS[4][1])], [_page(ROWS[2][0], [])]],
        "words": [[ROWS[0][1], ROWS[4][1]], [None]],
    }, features=datasets.Features({
        "images": datasets.List(datasets.Image()),
        "words": datasets.List(datasets.List({"text": datasets.Value("string"),
                                              "box": datasets.List(datasets.Value("float64")),
                                              "score": datasets.Value("float64")})),
    }))
    out = label_dataset(datasets.DatasetDict({"train": ds, "test": ds.select([1])}), p,
                        image_column="images")
    train = out["train"]
    assert train[0]["vision_labels"] == [_one_by_one(p, ds[0]["images"][0], ROWS[0][1]),
                                         _one_by_one(p, ds[0]["images"][1], ROWS[4][1])]
    n = len(_one_by_one(p, ds[1]["images"][0], []))
    assert train[1]["vision_labels"] == [[IGN] * n]
    assert out["test"]["vision_labels"] == [train[1]["vision_labels"]]


def test_ocr_on_the_fly(proc, monkeypatch):
    """ocr=ENGINE: words from run_ocr (with ocr_lang / ocr_cache_dir), stored in the words column."""
    from dvsft_kernels.labeling import ocr as ocr_mod

    p, _ = proc
    calls = []

    def fake_run_ocr(image, engine="tesseract", *, lang="eng", cache=True, cache_dir=None, **kw):
        calls.append((image.size, engine, lang, cache_dir))
        if image.size == (280, 140):
            return [OCRWord("quick", ((28, 28), (84, 28), (84, 56), (28, 56)), 0.75)]  # a quadrilateral
        return []

    monkeypatch.setattr(ocr_mod, "run_ocr", fake_run_ocr)
    monkeypatch.setattr(ocr_mod, "check_engine", lambda e: e)
    ds = _dataset().remove_columns("words")
    out = label_dataset(ds, p, ocr="tesseract", ocr_lang="deu", ocr_cache_dir="/tmp/x")
    assert sorted(calls) == sorted((s, "tesseract", "deu", "/tmp/x") for s, _ in ROWS)
    assert out[0]["words"] == [{"text": "quick", "box": [28.0, 28.0, 84.0, 56.0], "score": 0.75}]
    assert out[2]["words"] == []
    assert sorted(i for i, t in enumerate(out[0]["vision_labels"]) if t != IGN) == [11, 12]
    assert out[0]["vision_labels"] == _one_by_one(p, ds[0]["image"], out[0]["words"])


@pytest.mark.slow
def test_ocr_tesseract(proc, tmp_path):
    if shutil.which("tesseract") is None:
        pytest.skip("tesseract binary not installed (apt-get install tesseract-ocr)")
    if not os.path.exists(FONT):
        pytest.skip(f"DejaVu font missing at {FONT} (apt-get install fonts-dejavu-core)")
    p, _ = proc
    font, x, rendered = ImageFont.truetype(FONT, 30), 30, []
    img = Image.new("L", (672, 336), 255)
    d = ImageDraw.Draw(img)
    for word in ("the", "quick", "brown", "fox"):
        d.text((x, 40), word, font=font, fill=0)
        rendered.append(word)
        x = d.textbbox((x, 40), word, font=font)[2] + 24
    img.save(tmp_path / "p.png")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "p.png")]})  # paths also do
    out = label_dataset(ds, p, ocr="tesseract")
    assert [w["text"] for w in out[0]["words"]] == rendered
    assert out[0]["vision_labels"] == _one_by_one(p, Image.open(tmp_path / "p.png"), out[0]["words"])
    assert sum(t != IGN for t in out[0]["vision_labels"]) >= 4


def test_bad_arguments_and_rows(proc, tmp_path):
    p, _ = proc
    ds = _dataset()
    with pytest.raises(ValueError, match=r"^image_column: 'img' is not a column"):
        label_dataset(ds, p, image_column="img")
    with pytest.raises(ValueError, match=r"^words_column: 'ocr' is not a column"):
        label_dataset(ds, p, words_column="ocr")
    with pytest.raises(ValueError, match=r"^label_column: 'id' is already a column"):
        label_dataset(ds, p, label_column="id")
    with pytest.raises(ValueError, match=r"^ocr: the dataset already has a 'words' column"):
        label_dataset(ds, p, ocr="tesseract")
    with pytest.raises(ValueError, match=r"^ocr: unknown OCR engine 'abbyy'"):
        label_dataset(ds, p, ocr="abbyy")
    with pytest.raises(ValueError, match=r"^num_proc: expected None or an int >= 1, got 0"):
        label_dataset(ds, p, num_proc=0)
    with pytest.raises(ValueError, match=r"^mode: expected 'first' or 'aligned'"):
        label_dataset(ds, p, mode="last")
    with pytest.raises(ValueError, match=r"^processor: "):
        label_dataset(ds, object())
    with pytest.raises(ValueError, match=r"^ds: expected a datasets.Dataset"):
        label_dataset([{"image": None}], p)
    # a bad row: the error names the column and the row
    (tmp_path / "bad.png").write_bytes(b"not a png")
    bad = datasets.Dataset.from_dict({"image": [str(tmp_path / "bad.png")], "words": [[QUICK]]})
    with pytest.raises(ValueError, match=r"image\[0\]: .*bad.png: not a readable image"):
        label_dataset(bad, p)
    broken = datasets.Dataset.from_dict({"image": [_page((280, 140), [])], "words": [[{"text": "x"}]]},
                                        features=datasets.Features({
                                            "image": datasets.Image(),
                                            "words": datasets.List({"text": datasets.Value("string")})}))
    with pytest.raises(ValueError, match=r"words\[0\]\[0\]: a word needs 'text' and 'box'"):
        label_dataset(broken, p)
