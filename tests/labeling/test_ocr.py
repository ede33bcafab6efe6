"""run_ocr: real Tesseract on a rendered page, the content-keyed cache (memory LRU and disk), engines
that are missing or unknown, bad images, and the PaddleOCR / docTR wiring through stand-in modules.

Oracles: the rendered words and their boxes come from Pillow; engine runs are counted by a spy on
``subprocess.run`` (Tesseract) or by fake engines, never by the cache's own bookkeeping.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
from PIL import Image, ImageDraw, ImageFont

from dvsft_kernels.labeling import OCREngineMissing, OCRWord, clear_ocr_cache, run_ocr
from dvsft_kernels.labeling import ocr as ocr_mod

TESSERACT = shutil.which("tesseract")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
needs_tesseract = pytest.mark.skipif(
    TESSERACT is None, reason="tesseract binary not installed (apt-get install tesseract-ocr)")
LINES = [["Market", "report", "shows", "growth"], ["Every", "token", "learns", "words"]]


def render(lines=LINES, size=(480, 200), background="white", mode="RGB"):
    """Words in DejaVu Sans 30 px; returns the image and [(word, ink box)] from Pillow."""
    if not os.path.exists(FONT):
        pytest.skip(f"DejaVu font missing at {FONT} (apt-get install fonts-dejavu-core)")
    font = ImageFont.truetype(FONT, 30)
    img = Image.new(mode, size, background)
    d = ImageDraw.Draw(img)
    boxes, y = [], 30
    for line in lines:
        x = 20
        for word in line:
            d.text((x, y), word, font=font, fill="black")
            boxes.append((word, d.textbbox((x, y), word, font=font)))
            x = boxes[-1][1][2] + 22
        y += 80
    return img, boxes


def _inter(a, b):
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _area(a):
    return (a[2] - a[0]) * (a[3] - a[1])


def _read_back(words, rendered) -> int:
    return sum(any(w.text == t and _inter(w.box, b) >= 0.5 * min(_area(w.box), _area(b)) for w in words)
               for t, b in rendered)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_ocr_cache()
    yield
    clear_ocr_cache()


@pytest.fixture
def spy(monkeypatch):
    """Counts the Tesseract OCR runs (``... tsv``), not ``--list-langs``."""
    calls = []
    real = subprocess.run

    def run(args, *a, **k):
        if args and args[-1] == "tsv":
            calls.append(list(args))
        return real(args, *a, **k)

    monkeypatch.setattr(ocr_mod.subprocess, "run", run)
    return calls


@pytest.fixture
def fake_engine(monkeypatch):
    """Tesseract replaced by a counter returning one word per call (for cache mechanics)."""
    calls = []

    def fake(img, opts, timeout):
        calls.append((img.size, dict(opts)))
        return [OCRWord(f"w{len(calls)}", (1.0, 2.0, 30.0, 12.0), 0.4), OCRWord("hi", (40, 2, 60, 12), 0.9)]

    monkeypatch.setattr(ocr_mod, "_run_tesseract", fake)
    monkeypatch.setattr(ocr_mod, "_tesseract_cmd", lambda: "/bin/true")
    return calls


# ------------------------------------------------------------------------------------ real Tesseract


@needs_tesseract
def test_tesseract_reads_a_rendered_page(tmp_path, spy):
    img, rendered = render()
    img.save(tmp_path / "page.png")
    words = run_ocr(tmp_path / "page.png")
    assert all(isinstance(w, OCRWord) and 0.0 <= w.score <= 1.0 for w in words)
    assert _read_back(words, rendered) >= 0.8 * len(rendered), [w.text for w in words]
    assert len(spy) == 1 and spy[0][-1] == "tsv" and "-l" in spy[0] and "eng" in spy[0]
    # the same pixels as a PIL image: a cache hit (the key is the content, not the path)
    assert run_ocr(img) == words and len(spy) == 1


@needs_tesseract
def test_transparent_page_is_read_on_white():
    """RGBA with transparent background and black text: composed on white before OCR (converting
    to RGB alone would make the page black and the text invisible)."""
    img, rendered = render(background=(0, 0, 0, 0), mode="RGBA")
    assert _read_back(run_ocr(img), rendered) >= 0.8 * len(rendered)


@needs_tesseract
def test_second_call_does_not_run_tesseract_and_other_inputs_miss(spy):
    img, _ = render()
    first = run_ocr(img)
    assert len(spy) == 1
    assert run_ocr(img) == first and len(spy) == 1  # second epoch: no OCR
    assert run_ocr(img, min_confidence=0.9) == [w for w in first if w.score >= 0.9] and len(spy) == 1
    other, _ = render([["Other", "page"]])
    run_ocr(other)
    assert len(spy) == 2  # another image
    run_ocr(img, psm=6)
    assert len(spy) == 3 and spy[-1][-3:] == ["--psm", "6", "tsv"]  # other options
    run_ocr(img.convert("L"))
    assert len(spy) == 4  # same picture, other mode: other pixel bytes
    run_ocr(img, cache=False)
    assert len(spy) == 5


@needs_tesseract
def test_unknown_language_names_lang():
    img, _ = render([["x"]], size=(60, 60))
    with pytest.raises(ValueError, match=r"^lang: 'xyz' is not installed for tesseract .*tesseract-ocr-xyz"):
        run_ocr(img, lang="xyz", cache=False)


# ---------------------------------------------------------------------------------------- the cache


def test_disk_cache_survives_the_memory_cache_and_is_written_atomically(tmp_path, fake_engine):
    img, _ = render([["a"]], size=(64, 32))
    d = tmp_path / "cache"
    words = run_ocr(img, cache_dir=d)
    files = list(d.rglob("*"))
    jsons = [f for f in files if f.suffix == ".json"]
    assert len(fake_engine) == 1 and len(jsons) == 1
    assert not [f for f in files if f.name.endswith(".tmp")]
    assert jsons[0].stem == ocr_mod.ocr_cache_key(img)
    clear_ocr_cache()  # a new process / worker: only the disk holds it
    assert run_ocr(img, cache_dir=d) == words and len(fake_engine) == 1
    clear_ocr_cache()
    jsons[0].write_text("{not json")  # a damaged file: OCR runs again and rewrites it
    assert [w.text for w in run_ocr(img, cache_dir=d)] == ["w2", "hi"] and len(fake_engine) == 2
    assert json.loads(jsons[0].read_text())["words"][0]["text"] == "w2"


def test_disk_write_failure_leaves_no_partial_file(tmp_path, fake_engine, monkeypatch):
    img, _ = render([["a"]], size=(64, 32))

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ocr_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        run_ocr(img, cache_dir=tmp_path)
    assert [f for f in tmp_path.rglob("*") if f.is_file()] == []


def test_memory_cache_is_a_bounded_lru(fake_engine, monkeypatch):
    monkeypatch.setattr(ocr_mod, "MEMORY_CACHE_SIZE", 2)
    pages = [Image.new("L", (20 + k, 20), "white") for k in range(3)]
    for p in pages[:2]:
        run_ocr(p)
    run_ocr(pages[0])  # refreshes page 0: page 1 is now the oldest
    assert len(fake_engine) == 2
    run_ocr(pages[2])  # evicts page 1
    assert len(fake_engine) == 3 and len(ocr_mod._MEMO) == 2
    run_ocr(pages[0])
    assert len(fake_engine) == 3
    run_ocr(pages[1])
    assert len(fake_engine) == 4


def test_palette_images_with_other_palettes_are_other_pages(fake_engine):
    """P mode pixels are palette indices: the same indices under another palette are another picture."""
    a = Image.new("P", (30, 20), 0)
    a.putpalette([255, 255, 255] + [0, 0, 0] * 255)
    b = a.copy()
    b.putpalette([0, 0, 0] * 256)
    assert a.tobytes() == b.tobytes()
    run_ocr(a)
    run_ocr(b)
    run_ocr(a.copy())
    assert len(fake_engine) == 2


def test_min_confidence_filters_after_the_cache(fake_engine):
    img = Image.new("RGB", (50, 20), "white")
    assert [w.text for w in run_ocr(img)] == ["w1", "hi"]
    assert [w.text for w in run_ocr(img, min_confidence=0.5)] == ["hi"]
    assert len(fake_engine) == 1


# --------------------------------------------------------------------------------- engines and input


def test_unknown_engine_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"^engine: unknown OCR engine 'easyocr'; known engines: "
                                         r"tesseract, paddleocr, doctr"):
        run_ocr(Image.new("RGB", (8, 8)), engine="easyocr")


def test_missing_engines_name_the_install_command(monkeypatch):
    img = Image.new("RGB", (8, 8))
    for engine, cmd in (("paddleocr", "pip install paddleocr"), ("doctr", "pip install python-doctr")):
        if importlib.util.find_spec(engine) is None:
            with pytest.raises(OCREngineMissing, match=rf"^engine: '{engine}' is not installed.*{cmd}"):
                run_ocr(img, engine=engine)
    monkeypatch.setattr(ocr_mod.shutil, "which", lambda name: None)
    with pytest.raises(OCREngineMissing, match=r"^engine: .*apt-get install tesseract-ocr"):
        run_ocr(img)
    assert issubclass(OCREngineMissing, ValueError)


def test_bad_images_and_options(tmp_path, fake_engine, monkeypatch):
    ok = Image.new("RGB", (40, 20), "white")
    with pytest.raises(ValueError, match=r"^image: expected a path or a PIL image, got int"):
        run_ocr(3)
    with pytest.raises(ValueError, match=r"^image: .*nope\.png: no such file") as e:
        run_ocr(tmp_path / "nope.png")
    assert e.value.reason == "missing_file"
    (tmp_path / "bad.png").write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=r"^image: .*bad\.png: not a readable image") as e:
        run_ocr(tmp_path / "bad.png")
    assert e.value.reason == "unreadable_image"
    render([["a", "b"]], size=(300, 100))[0].save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"^image: .*cut\.png: not a readable image") as e:
        run_ocr(tmp_path / "cut.png")
    assert e.value.reason == "unreadable_image"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over twice this
    with pytest.raises(ValueError, match=r"^image: .*full\.png: over Pillow's decompression-bomb limit") as e:
        run_ocr(tmp_path / "full.png")
    assert e.value.reason == "decompression_bomb"
    for kw, name in (({"min_confidence": 1.5}, "min_confidence"), ({"min_confidence": True}, "min_confidence"),
                     ({"psm": 14}, "psm"), ({"lang": ""}, "lang"), ({"cache": 1}, "cache"),
                     ({"timeout": 0}, "timeout"), ({"cache_dir": 5}, "cache_dir")):
        with pytest.raises(ValueError, match=rf"^{name}: "):
            run_ocr(ok, **kw)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"^cache_dir: .* is not a directory"):
        run_ocr(ok, cache_dir=tmp_path / "f")
    assert fake_engine == []  # nothing above reached the engine


def test_engine_failure_is_ocr_failed(monkeypatch, tmp_path):
    script = tmp_path / "tesseract"
    script.write_text("#!/bin/sh\nif [ \"$1\" = --list-langs ]; then echo 'List'; echo eng; exit 0; fi\n"
                      "echo 'Error in pixReadStream' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setattr(ocr_mod, "_tesseract_cmd", lambda: str(script))
    with pytest.raises(ocr_mod.OCRFailed, match=r"tesseract exited with status 1: Error in pixReadStream"):
        run_ocr(Image.new("RGB", (8, 8)), cache=False)


def _module(monkeypatch, name, **attrs):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(m, k, v)
    monkeypatch.setitem(sys.modules, name, m)
    return m


def test_paddleocr_wiring_through_a_stand_in(monkeypatch, tmp_path):
    """A stand-in ``paddleocr`` (2.x API): the image reaches it as an RGB array, the language is mapped,
    its text lines are split into words, and the result is cached."""
    seen = []

    class PaddleOCR:
        def __init__(self, lang):
            seen.append(("init", lang))

        def ocr(self, arr):
            seen.append(("ocr", arr.shape))
            return [[[[[10, 5], [110, 5], [110, 25], [10, 25]], ["Total due", 0.9]]]]

    _module(monkeypatch, "paddleocr", PaddleOCR=PaddleOCR)
    img = Image.new("L", (120, 30), "white")
    words = run_ocr(img, engine="paddleocr")
    assert seen == [("init", "en"), ("ocr", (30, 120, 3))]
    assert [w.text for w in words] == ["Total", "due"] and words[0].score == 0.9
    assert run_ocr(img, engine="paddleocr") == words and len(seen) == 2
    assert [w.text for w in run_ocr(img, engine="paddleocr", split_lines=False)] == ["Total due"]
    assert len(seen) == 3
    # a page read without cache_dir is written there when asked with it; quadrilaterals survive the disk
    assert run_ocr(img, engine="paddleocr", cache_dir=tmp_path) == words and len(seen) == 3
    assert len(list(tmp_path.rglob("*.json"))) == 1
    clear_ocr_cache()
    assert run_ocr(img, engine="paddleocr", cache_dir=tmp_path) == words and len(seen) == 3
    assert len(words[0].box) == 4 and len(words[0].box[0]) == 2


def test_doctr_wiring_through_a_stand_in(monkeypatch):
    class Doc:
        def export(self):
            word = {"value": "Hello", "confidence": 0.8, "geometry": ((0.1, 0.2), (0.5, 0.6))}
            return {"pages": [{"dimensions": (1, 1), "blocks": [{"lines": [{"words": [word]}]}]}]}

    models = _module(monkeypatch, "doctr.models", ocr_predictor=lambda pretrained: lambda pages: Doc())
    _module(monkeypatch, "doctr", models=models)
    words = run_ocr(Image.new("RGB", (200, 100), "white"), engine="doctr")
    assert words == [OCRWord("Hello", (20.0, 20.0, 100.0, 60.0), 0.8)]  # scaled by the image, not the page
