"""`dvsft-kernels label DIR` at scale: --jobs N worker processes, resume / --force, atomic outputs,
per-input failures (exit 1, one line each, every other output written), --ocr ENGINE, progress.

Geometry oracle as in test_cli.py: a 280 x 140 white page keeps its size under Qwen2-VL's defaults, so
the grid is 5 x 10 cells of 28 px (token index = 10 * row + col); a word-level tokenizer gives each
word one known id.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from dvsft_kernels import cli
from dvsft_kernels.cli import main

VOCAB = ["[UNK]", "cat", "dog", "on", "mat", "Market", "report", "shows", "growth"]
ID = {w: i for i, w in enumerate(VOCAB)}
IGN = -100
W, H = 280, 140
CAT = {"text": "cat", "box": [28, 28, 84, 56], "score": 0.9}  # tokens 11, 12
DOG = {"text": "dog", "box": [140, 84, 168, 112], "score": 0.8}  # token 35


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(ID, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    d = tmp_path_factory.mktemp("tok")
    t.save(str(d / "tokenizer.json"))
    return d


def page(imgs: Path, ocrs: Path, stem: str, words, size=(W, H)) -> None:
    imgs.mkdir(parents=True, exist_ok=True)
    ocrs.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "white").save(imgs / f"{stem}.png")
    (ocrs / f"{stem}.json").write_text(json.dumps(words))


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def labeled(path: Path) -> dict[int, int]:
    labels = json.loads(path.read_text())["labels"]
    return {i: t for i, t in enumerate(labels) if t != IGN}


def failures(err: str) -> dict[str, str]:
    """The per-input failure lines of stderr: image file name -> reason."""
    lines = err.splitlines()
    head = [i for i, x in enumerate(lines) if "images failed" in x]
    assert len(head) == 1, err
    out = {}
    for x in lines[head[0] + 1:]:
        assert x.startswith("  "), x
        path, why = x.strip().split(": ", 1)
        out[Path(path).name] = why
    return out


def test_jobs_resume_force(tmp_path, tok_dir, capsys):
    imgs, ocrs = tmp_path / "imgs", tmp_path / "ocr"
    for k in range(4):
        page(imgs, ocrs, f"p{k}", [CAT, DOG][: k % 2 + 1])
    base = ["label", imgs, ocrs, "--family", "qwen2_vl", "--tokenizer", tok_dir, "--no-progress"]
    a, b = tmp_path / "a", tmp_path / "b"
    code, out, err = run([*base, "--out", a, "--jobs", "2", "--overlay", tmp_path / "ov"], capsys)
    assert code == 0, err
    assert err == ""  # --no-progress: nothing on stderr
    assert "4 images: 200 visual tokens, 10 labeled" in out  # 2 + 3 + 2 + 3
    assert sorted(p.name for p in a.iterdir()) == ["p0.json", "p1.json", "p2.json", "p3.json"]
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["p0.png", "p1.png", "p2.png", "p3.png"]
    assert labeled(a / "p1.json") == {11: ID["cat"], 12: ID["cat"], 35: ID["dog"]}
    assert labeled(a / "p2.json") == {11: ID["cat"], 12: ID["cat"]}
    # the worker processes give what one process gives, file for file
    code, out, err = run([*base, "--out", b], capsys)
    assert code == 0, err
    for k in range(4):
        assert json.loads((a / f"p{k}.json").read_text()) == json.loads((b / f"p{k}.json").read_text())

    # resume: complete outputs are skipped (not rewritten); a missing or unparsable one is redone
    stamps = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    code, out, err = run([*base, "--out", a, "--overlay", tmp_path / "ov"], capsys)
    assert code == 0, err
    assert "skipped 4 of 4 images" in out and out.startswith("0 images:")
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == stamps
    (a / "p1.json").unlink()
    (a / "p2.json").write_text('{"labels": [1, 2')  # as a non-atomic writer killed midway would leave it
    (tmp_path / "ov" / "p3.png").unlink()  # the overlay of p3 is missing: p3 is not complete
    code, out, err = run([*base, "--out", a, "--overlay", tmp_path / "ov"], capsys)
    assert code == 0, err
    assert out.startswith("3 images: 150 visual tokens, 8 labeled") and "skipped 1 of 4 images" in out
    assert (a / "p0.json").stat().st_mtime_ns == stamps["p0.json"]
    assert labeled(a / "p2.json") == {11: ID["cat"], 12: ID["cat"]}
    assert (tmp_path / "ov" / "p3.png").is_file()
    code, out, err = run([*base, "--out", a, "--force"], capsys)
    assert code == 0, err
    assert out.startswith("4 images:") and "skipped" not in out
    assert (a / "p0.json").stat().st_mtime_ns != stamps["p0.json"]
    assert not [p for p in a.iterdir() if p.name.startswith(".")]  # no temporary file left


def _bad_inputs(imgs: Path, ocrs: Path) -> None:
    page(imgs, ocrs, "a_good", [CAT])
    page(imgs, ocrs, "b_empty", [])  # a page with no words: an output with zero labels, not a failure
    page(imgs, ocrs, "c_corrupt", [CAT])
    (imgs / "c_corrupt.png").write_bytes(b"this is not a png")
    page(imgs, ocrs, "d_truncated", [CAT])
    Image.effect_noise((W, H), 64).save(imgs / "d_truncated.png")  # noise: a PNG that does not compress
    data = (imgs / "d_truncated.png").read_bytes()
    (imgs / "d_truncated.png").write_bytes(data[: len(data) // 2])
    (ocrs / "e_dangling.json").write_text(json.dumps([CAT]))
    (imgs / "e_dangling.png").symlink_to(imgs / "nowhere.png")  # a listed file that is not there
    page(imgs, ocrs, "f_bad_ocr", [CAT])
    (ocrs / "f_bad_ocr.json").write_text('[{"text": "cat", "box": [1, 2]}]')
    page(imgs, ocrs, "g_huge", [CAT], size=(700, 700))  # 490,000 px: over 2 x --max-pixels (error)
    page(imgs, ocrs, "h_big", [CAT], size=(400, 300))  # 120,000 px: over --max-pixels (Pillow warns)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_bad_inputs_fail_alone(tmp_path, tok_dir, capsys, jobs):
    imgs, ocrs, out = tmp_path / "imgs", tmp_path / "ocr", tmp_path / "out"
    _bad_inputs(imgs, ocrs)
    code, stdout, err = run(["label", imgs, ocrs, "--family", "qwen2_vl", "--tokenizer", tok_dir,
                             "--out", out, "--jobs", jobs, "--max-pixels", "100000"], capsys)
    assert code == 1
    failed = failures(err)
    assert sorted(failed) == ["c_corrupt.png", "d_truncated.png", "e_dangling.png", "f_bad_ocr.png",
                              "g_huge.png", "h_big.png"]
    assert "cannot open" in failed["c_corrupt.png"] and "c_corrupt.png" in failed["c_corrupt.png"]
    assert "truncated" in failed["d_truncated.png"]
    assert "does not exist" in failed["e_dangling.png"] and "e_dangling.png" in failed["e_dangling.png"]
    assert failed["f_bad_ocr.png"].startswith("OCR_FILE: ") and "f_bad_ocr.json" in failed["f_bad_ocr.png"]
    for name in ("g_huge.png", "h_big.png"):
        assert "too large" in failed[name] and name in failed[name] and "--max-pixels" in failed[name]
    assert "6 of 8 images failed" in err
    # every other output is written; none for the failures
    assert sorted(p.name for p in out.iterdir()) == ["a_good.json", "b_empty.json"]
    assert labeled(out / "a_good.json") == {11: ID["cat"], 12: ID["cat"]}
    rec = json.loads((out / "b_empty.json").read_text())
    assert rec["labels"] == [IGN] * 50 and rec["summary"]["words"] == 0
    assert stdout.startswith("2 images: 100 visual tokens, 2 labeled")


def test_pillow_limit_is_the_default(tmp_path, tok_dir, capsys, monkeypatch):
    """Without --max-pixels, Pillow's own decompression-bomb limit applies (and is left as it was)."""
    imgs, ocrs = tmp_path / "imgs", tmp_path / "ocr"
    page(imgs, ocrs, "a", [CAT])
    page(imgs, ocrs, "b", [CAT], size=(560, 280))  # 156,800 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    code, _, err = run(["label", imgs, ocrs, "--family", "qwen2_vl", "--tokenizer", tok_dir,
                        "--no-progress"], capsys)
    assert code == 1
    assert list(failures(err)) == ["b.png"] and "too large" in failures(err)["b.png"]
    assert Image.MAX_IMAGE_PIXELS == 100_000
    code, _, err = run(["label", imgs, ocrs, "--family", "qwen2_vl", "--tokenizer", tok_dir,
                        "--no-progress", "--max-pixels", "0"], capsys)  # 0: no limit
    assert code == 0, err


def test_write_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "d" / "x.json"

    def killed(p: Path):
        p.write_text('{"labels": [1, 2')  # half written, then the writer dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli._write_atomic(target, killed)
    assert list(target.parent.iterdir()) == []
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        cli._write_atomic(target, killed)
    assert target.read_text() == "old" and list(target.parent.iterdir()) == [target]
    cli._write_atomic(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new" and list(target.parent.iterdir()) == [target]


def test_progress(tmp_path, tok_dir, capsys, monkeypatch):
    imgs, ocrs = tmp_path / "imgs", tmp_path / "ocr"
    page(imgs, ocrs, "a", [CAT])
    base = ["label", imgs, ocrs, "--family", "qwen2_vl", "--tokenizer", tok_dir, "--force"]
    code, _, err = run(base, capsys)  # not a terminal: no bar, one timing line
    assert code == 0
    assert err.startswith("labeling: 1 images in ") and "images/s" in err and "|" not in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = run(base, capsys)
    assert code == 0
    assert "labeling: 100%" in err and "1/1" in err  # tqdm's bar
    code, _, err = run([*base, "--no-progress"], capsys)
    assert code == 0 and err == ""


@pytest.mark.parametrize("extra, needle", [
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--max-pixels", "-1"], "--max-pixels must be >= 0"),
    (["OCR", "--ocr", "tesseract"], "OCR_FILE: "),
    (["--ocr", "abbyy"], "--ocr must be one of tesseract"),
    ([], "OCR_FILE: required"),
])
def test_usage_errors(tmp_path, tok_dir, capsys, extra, needle):
    imgs, ocrs = tmp_path / "imgs", tmp_path / "ocr"
    page(imgs, ocrs, "a", [CAT])
    extra = [str(ocrs) if a == "OCR" else a for a in extra]
    code, _, err = run(["label", imgs, *extra, "--family", "qwen2_vl", "--tokenizer", tok_dir], capsys)
    assert code == 2
    assert needle in err, err
    assert err.splitlines()[1].startswith("dvsft-kernels label: error: ")


def test_same_stem_is_a_usage_error(tmp_path, tok_dir, capsys):
    imgs, ocrs = tmp_path / "imgs", tmp_path / "ocr"
    page(imgs, ocrs, "a", [CAT])
    Image.new("RGB", (W, H), "white").save(imgs / "a.jpg")
    code, _, err = run(["label", imgs, ocrs, "--family", "qwen2_vl", "--tokenizer", tok_dir], capsys)
    assert code == 2 and "IMAGE: images with the same stem" in err and "a.jpg, a.png" in err


def test_ocr_engine_errors_are_per_image(tmp_path, tok_dir, capsys, monkeypatch):
    """--ocr: the words come from run_ocr (called with --ocr-lang / --ocr-cache); an engine failure on
    one image fails that image only."""
    from dvsft_kernels.labeling import ocr as ocr_mod

    calls = []

    def fake_run_ocr(image, engine="tesseract", *, lang="eng", cache=True, cache_dir=None, **kw):
        calls.append((image.size, engine, lang, cache_dir))
        if image.size == (W + 28, H):
            raise ocr_mod.OCRFailed("tesseract exited with status 1: boom\nsecond line")
        return [ocr_mod.OCRWord(**DOG)]

    monkeypatch.setattr(ocr_mod, "run_ocr", fake_run_ocr)
    monkeypatch.setattr(ocr_mod, "check_engine", lambda e: e)
    imgs, out = tmp_path / "imgs", tmp_path / "out"
    page(imgs, tmp_path / "unused", "a", [])
    page(imgs, tmp_path / "unused", "b", [], size=(W + 28, H))
    code, stdout, err = run(["label", imgs, "--ocr", "tesseract", "--ocr-lang", "deu", "--ocr-cache",
                             tmp_path / "cache", "--family", "qwen2_vl", "--tokenizer", tok_dir,
                             "--out", out, "--no-progress"], capsys)
    assert code == 1
    assert stdout.startswith("1 images: 50 visual tokens, 1 labeled")
    assert failures(err) == {"b.png": f"IMAGE: OCR (tesseract) failed on {str(imgs / 'b.png')!r}: "
                                      "tesseract exited with status 1: boom second line"}
    rec = json.loads((out / "a.json").read_text())
    assert labeled(out / "a.json") == {35: ID["dog"]}
    assert rec["ocr_file"] is None and rec["ocr"] == {"engine": "tesseract", "lang": "deu"}
    # the blank page of the language check, then one call per image
    assert [c[1:] for c in calls] == [("tesseract", "deu", None)] + [
        ("tesseract", "deu", str(tmp_path / "cache"))] * 2
    assert not (out / "b.json").exists()


def test_ocr_lang_missing_is_a_usage_error(tmp_path, tok_dir, capsys):
    if shutil.which("tesseract") is None:
        pytest.skip("tesseract binary not installed (apt-get install tesseract-ocr)")
    imgs = tmp_path / "imgs"
    page(imgs, tmp_path / "ocr", "a", [])
    code, _, err = run(["label", imgs, "--ocr", "tesseract", "--ocr-lang", "xyz", "--family", "qwen2_vl",
                        "--tokenizer", tok_dir], capsys)
    assert code == 2 and "--ocr-lang: 'xyz' is not installed for tesseract" in err


LINES = [["Market", "report", "shows", "growth"], ["cat", "on", "mat", "dog"]]
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def render_text_page(path: Path, lines, size=(672, 336), font_px=30) -> list[tuple[str, tuple]]:
    """Draw ``lines`` of words in DejaVu Sans; [(word, ink box)] from Pillow's text geometry."""
    font = ImageFont.truetype(FONT, font_px)
    img = Image.new("L", size, 255)
    d = ImageDraw.Draw(img)
    boxes, y = [], 40
    for line in lines:
        x = 30
        for word in line:
            d.text((x, y), word, font=font, fill=0)
            boxes.append((word, d.textbbox((x, y), word, font=font)))
            x = boxes[-1][1][2] + 24
        y += 100
    img.save(path)
    return boxes


@pytest.mark.slow
def test_tesseract_jobs_2_end_to_end(tmp_path, tok_dir, capsys):
    """Real OCR in two worker processes: every rendered word's token id lands on a cell inside the
    word's rendered box, and the result equals a one-process run."""
    if shutil.which("tesseract") is None:
        pytest.skip("tesseract binary not installed (apt-get install tesseract-ocr)")
    if not os.path.exists(FONT):
        pytest.skip(f"DejaVu font missing at {FONT} (apt-get install fonts-dejavu-core)")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rendered = {}
    for k in range(3):
        rendered[f"p{k}"] = render_text_page(imgs / f"p{k}.png", [LINES[k % 2], LINES[(k + 1) % 2]])
    base = ["label", imgs, "--ocr", "tesseract", "--family", "qwen2_vl", "--tokenizer", tok_dir]
    code, out, err = run([*base, "--out", tmp_path / "a", "--jobs", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert out.startswith("3 images: 864 visual tokens")  # 12 x 24 cells of 28 px a page
    for stem, boxes in rendered.items():
        rec = json.loads((tmp_path / "a" / f"{stem}.json").read_text())
        found = {t["id"] for t in rec["tokens"].values()}
        assert found >= {ID[w] for w in ("Market", "report", "growth", "cat", "dog")}, (stem, found)
        for t in rec["tokens"].values():  # each labeled cell overlaps the rendered box of its word
            x0, y0, x1, y1 = t["box"]
            assert any(ID[w] == t["id"] and min(x1, b[2]) > max(x0, b[0]) and min(y1, b[3]) > max(y0, b[1])
                       for w, b in boxes), t
    code, _, err = run([*base, "--out", tmp_path / "b", "--no-progress"], capsys)
    assert code == 0, err
    for stem in rendered:
        ra, rb = (json.loads((tmp_path / d / f"{stem}.json").read_text()) for d in ("a", "b"))
        assert ra["labels"] == rb["labels"]


def crashy_job(job):
    """A stand-in for _label_job that kills its worker process on one image (as the OOM killer would)."""
    import time

    if job.image.name == "boom.png":
        os._exit(3)
    time.sleep(0.05)
    return "ok", job.image.name


DIED = "worker process died while labeling this image (killed, out of memory, or a crash in native code)"


@pytest.mark.slow
def test_a_dying_worker_fails_only_its_image(tmp_path, tok_dir):
    """The pool breaks; the images that were in flight are retried one at a time in a fresh pool, so
    only the one that kills its worker again fails, with the reason, and the run goes on."""
    args = cli.build_parser().parse_args(["label", str(tmp_path), "--ocr", "tesseract", "--family",
                                          "qwen2_vl", "--tokenizer", str(tok_dir), "--jobs", "2"])
    names = ["a.png", "b.png", "boom.png", "c.png", "d.png", "e.png", "f.png"]
    todo = [cli._Job(tmp_path / n, None, None, None) for n in names]
    results = {}
    cli._run_pool(args, todo, results, None, fn=crashy_job)
    assert sorted(results) == list(range(len(names)))
    for i, n in enumerate(names):
        if n == "boom.png":
            assert results[i] == ("failed", DIED)
        else:
            assert results[i] == ("ok", n), n


def test_worker_set_up_failure_is_reported_per_image(monkeypatch):
    """A worker whose set-up fails labels nothing and says why for each image, without breaking the pool."""
    monkeypatch.setattr(cli, "_WORKER", None)

    def boom(opts, geometry=None):
        raise OSError("disk gone")

    monkeypatch.setattr(cli, "_geometry", boom)
    cli._init_worker(cli.argparse.Namespace())
    job = cli._Job(Path("x.png"), None, None, None)
    assert cli._label_job(job) == ("failed", "worker set-up failed: OSError: disk gone")
