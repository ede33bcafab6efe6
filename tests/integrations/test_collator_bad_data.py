"""DVSFTCollator(ocr=...) and bad records: words read by OCR for records without them (once per page:
the second epoch reads the cache), and records that are skipped and counted — or raise with
strict=True — instead of stopping an epoch (docs/labeling.md, "Collating with OCR").

Oracles: the vision labels the collator builds from OCR are compared with those it builds when the
same run_ocr words are given as ``words``; engine runs are counted with a spy on subprocess.run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from dvsft_kernels.integrations import DVSFTCollator
from dvsft_kernels.labeling import OCREngineMissing, OCRWord, clear_ocr_cache, run_ocr
from dvsft_kernels.labeling import ocr as ocr_mod
from tests.integrations.helpers import IGN
from tests.integrations.tiny_models import qwen2_vl_processor

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/integrations/conftest.py

WORDS = ["Market", "report", "shows", "growth", "alpha", "beta"]
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None, reason="tesseract binary not installed (apt-get install tesseract-ocr)")


def page(words, size=(336, 112)):
    if not os.path.exists(FONT):
        pytest.skip(f"DejaVu font missing at {FONT} (apt-get install fonts-dejavu-core)")
    font = ImageFont.truetype(FONT, 28)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x, y = 10, 20
    for w in words:
        x1 = d.textbbox((x, y), w, font=font)[2]
        if x1 > size[0] - 6:
            x, y = 10, y + 50
        d.text((x, y), w, fill="black", font=font)
        x = d.textbbox((x, y), w, font=font)[2] + 16
    return img


def record(image, answer="Market report", **extra):
    return {
        "image": image,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Read the text ."}]},
            {"role": "assistant", "content": answer},
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def proc():
    return qwen2_vl_processor(WORDS, max_pixels=336 * 112)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_ocr_cache()
    yield
    clear_ocr_cache()


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = subprocess.run

    def run(args, *a, **k):
        if args and args[-1] == "tsv":
            calls.append(args)
        return real(args, *a, **k)

    monkeypatch.setattr(ocr_mod.subprocess, "run", run)
    return calls


def _ids(proc, words):
    return {proc.tokenizer.convert_tokens_to_ids(w) for w in words}


# ------------------------------------------------------------------------------------------- ocr=


@needs_tesseract
def test_records_without_words_are_read_by_tesseract_once(proc, spy, tmp_path):
    img = page(["Market", "report", "shows", "growth"])
    img.save(tmp_path / "p.png")
    data = [record(img), record(str(tmp_path / "p.png"), answer="shows growth")]  # a path: opened here
    coll = DVSFTCollator(proc, ocr="tesseract")
    batch = coll(data)
    assert len(spy) == 1  # the path holds the same pixels: one OCR run for both records
    words = run_ocr(img)
    given = DVSFTCollator(proc)([{**r, "words": words} for r in data])
    assert torch.equal(batch["vision_labels"], given["vision_labels"])
    got = set(batch["vision_labels"][0].tolist()) - {IGN}
    assert got and got <= _ids(proc, WORDS) and len(got & _ids(proc, ["Market", "report", "shows", "growth"])) >= 3
    assert coll.vision_stats == {"ocr_pages": 2} and not coll.skipped
    again = coll(data)  # the second epoch: no OCR
    assert len(spy) == 1 and torch.equal(again["vision_labels"], batch["vision_labels"])


def test_words_given_or_empty_are_not_read_and_a_callable_gets_the_image(proc, tmp_path):
    img = page(["alpha", "beta"])
    seen = []

    def reader(image):
        seen.append(image)
        return [OCRWord("beta", (0, 0, 336, 112))]

    coll = DVSFTCollator(proc, ocr=reader)
    img.save(tmp_path / "p.png")
    batch = coll([record(str(tmp_path / "p.png")), record(img, words=[]),
                  record(img, words=[OCRWord("alpha", (0, 0, 336, 112), np.float32(0.9))])])  # numpy score: fine
    assert len(seen) == 1 and isinstance(seen[0], Image.Image) and seen[0].size == img.size
    v = batch["vision_labels"]
    assert set(v[0].tolist()) - {IGN} == _ids(proc, ["beta"])
    assert set(v[1].tolist()) == {IGN}
    assert set(v[2].tolist()) - {IGN} == _ids(proc, ["alpha"])
    assert coll.vision_stats == {"ocr_pages": 1}


def test_several_images_none_entries_are_read(proc):
    a, b = page(["alpha"]), page(["beta"])
    reader_calls = []

    def reader(image):
        reader_calls.append(image)
        return [OCRWord("beta", (0, 0, 336, 112))]

    r = record(None, words=[[OCRWord("alpha", (0, 0, 336, 112))], None])
    r.pop("image")
    r["images"] = [a, b]
    batch = DVSFTCollator(proc, ocr=reader)([r])
    assert reader_calls == [b]
    ids, v = batch["input_ids"][0], batch["vision_labels"][0]
    run = (ids == proc.image_token_id).nonzero().flatten().view(2, -1)
    assert set(v[run[0]].tolist()) == _ids(proc, ["alpha"]) and set(v[run[1]].tolist()) == _ids(proc, ["beta"])


# -------------------------------------------------------------------------------------- bad records


def _bad_files(tmp_path):
    good = page(["alpha"])
    good.save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"definitely not an image")
    return {
        "missing_file": tmp_path / "nope.png",
        "unreadable_image": tmp_path / "junk.png",
        "truncated": tmp_path / "cut.png",
    }


@pytest.mark.parametrize("kind", ["missing_file", "unreadable_image", "truncated", "decompression_bomb",
                                  "no_messages"])
def test_a_bad_record_is_skipped_counted_and_logged(proc, tmp_path, kind, monkeypatch, caplog):
    files = _bad_files(tmp_path)
    good = record(page(["alpha"]), answer="alpha", words=[OCRWord("alpha", (0, 0, 336, 112))])
    if kind == "decompression_bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses a file over twice this
        bad = record(tmp_path / "good.png", id="p7")
    elif kind == "no_messages":
        bad = {"image": page(["beta"]), "id": "p7"}
    else:
        bad = record(files[kind], id="p7")
    reason = "unreadable_image" if kind == "truncated" else kind
    coll = DVSFTCollator(proc)
    with caplog.at_level(logging.WARNING, logger="dvsft_kernels.integrations.collator"):
        batch = coll([good, bad, good])
    assert batch["input_ids"].shape[0] == 2  # the bad record is left out, the others are kept
    assert coll.skipped == {reason: 1}
    assert any("sample 1 (id 'p7')" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    coll([bad, good])
    assert coll.skipped == {reason: 2}  # counts add up over batches
    with pytest.raises(ValueError, match=r"^sample 1 \(id 'p7'\): "):
        DVSFTCollator(proc, strict=True)([good, bad])


def test_a_batch_of_only_bad_records_raises_naming_the_reasons(proc, tmp_path):
    files = _bad_files(tmp_path)
    with pytest.raises(ValueError, match=r"^samples: every record of the batch was skipped "
                                         r"\(missing_file: 1, no_messages: 1\); first: sample 0: image: "):
        DVSFTCollator(proc)([record(files["missing_file"]), {"messages": []}])


@needs_tesseract
def test_a_page_without_words_keeps_its_text_labels(proc, spy):
    """Blank page: OCR finds nothing; not an error, even with strict=True: no vision labels."""
    blank = Image.new("RGB", (336, 112), "white")
    for strict in (False, True):
        coll = DVSFTCollator(proc, ocr="tesseract", strict=strict)
        batch = coll([record(blank), record(page(["Market", "report"]))])
        assert set(batch["vision_labels"][0].tolist()) == {IGN}
        assert (batch["labels"][0] != IGN).any() and (batch["vision_labels"][1] != IGN).any()
        assert coll.vision_stats == {"ocr_pages": 2, "no_words": 1} and not coll.skipped
    assert len(spy) == 2  # one run per page, the second collator reads the cache


def test_an_ocr_failure_costs_the_vision_labels_only(proc, caplog):
    def reader(image):
        raise RuntimeError("engine crashed")

    coll = DVSFTCollator(proc, ocr=reader)
    with caplog.at_level(logging.WARNING, logger="dvsft_kernels.integrations.collator"):
        batch = coll([record(page(["alpha"]), id="x")])
    assert set(batch["vision_labels"][0].tolist()) == {IGN} and (batch["labels"][0] != IGN).any()
    assert coll.vision_stats == {"ocr_pages": 1, "ocr_failed": 1} and not coll.skipped
    assert any("engine crashed" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"^sample 0 \(id 'x'\): OCR failed: engine crashed"):
        DVSFTCollator(proc, ocr=reader, strict=True)([record(page(["alpha"]), id="x")])
    # a reader returning malformed words: checked like given words
    coll = DVSFTCollator(proc, ocr=lambda image: [("alpha", (0, 0))])
    batch = coll([record(page(["alpha"]))])
    assert set(batch["vision_labels"][0].tolist()) == {IGN}
    assert coll.vision_stats == {"ocr_pages": 1, "bad_words": 1}


@pytest.mark.parametrize(("words", "message"), [
    ([OCRWord("alpha", (0, 0, 10))], r"words\[0\]\.box must be \(x0, y0, x1, y1\) or 4 \(x, y\) points"),
    ([("alpha",)], r"words\[0\] must be an OCRWord"),
    ([{"text": "alpha"}], r"words\[0\]: a dict word needs 'text' and 'box'"),
    ([OCRWord(3, (0, 0, 10, 10))], r"words\[0\]\.text must be a str"),
    ([OCRWord("alpha", (0, 0, 10, 10), "high")], r"words\[0\]\.score must be a number"),
    ("alpha beta", r"words: expected a list of words, got str"),
])
def test_malformed_words_cost_that_images_vision_labels(proc, caplog, words, message):
    good = record(page(["beta"]), words=[OCRWord("beta", (0, 0, 336, 112))])
    coll = DVSFTCollator(proc)
    with caplog.at_level(logging.WARNING, logger="dvsft_kernels.integrations.collator"):
        batch = coll([good, record(page(["alpha"]), id="w", words=words)])
    v = batch["vision_labels"]
    assert set(v[1].tolist()) == {IGN} and (batch["labels"][1] != IGN).any()
    assert set(v[0].tolist()) - {IGN} == _ids(proc, ["beta"])
    assert coll.vision_stats == {"bad_words": 1} and not coll.skipped
    assert any(re.search(message, r.getMessage()) for r in caplog.records)
    with pytest.raises(ValueError, match=r"^sample 1 \(id 'w'\): " + message):
        DVSFTCollator(proc, strict=True)([good, record(page(["alpha"]), id="w", words=words)])


def test_bad_ocr_arguments(proc, monkeypatch):
    with pytest.raises(ValueError, match=r"^ocr: unknown OCR engine 'easyocr'; known engines: tesseract"):
        DVSFTCollator(proc, ocr="easyocr")
    with pytest.raises(ValueError, match=r"^ocr: expected an engine name, a callable or None, got int"):
        DVSFTCollator(proc, ocr=3)
    with pytest.raises(ValueError, match=r"^ocr_kwargs: only used with an OCR engine name"):
        DVSFTCollator(proc, ocr_kwargs={"lang": "eng"})
    with pytest.raises(ValueError, match=r"^strict: "):
        DVSFTCollator(proc, strict="yes")
    monkeypatch.setattr(ocr_mod, "_tesseract_cmd", lambda: "/bin/true")
    with pytest.raises(ValueError, match=r"^ocr_kwargs: .*unexpected keyword argument 'language'"):
        DVSFTCollator(proc, ocr="tesseract", ocr_kwargs={"language": "eng"})
    with pytest.raises(ValueError, match=r"^ocr_kwargs: psm: "):
        DVSFTCollator(proc, ocr="tesseract", ocr_kwargs={"psm": 99})
    monkeypatch.setattr(ocr_mod, "_tesseract_cmd", lambda: None)
    with pytest.raises(OCREngineMissing, match=r"^ocr: .*apt-get install tesseract-ocr"):
        DVSFTCollator(proc, ocr="tesseract")
