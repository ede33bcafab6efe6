"""`dvsft-kernels label` end to end: main([...]) in process, once through a subprocess, directory mode.

Geometry oracle: a 280 x 140 white image is already a multiple of 28 px and inside Qwen2-VL's
default pixel bounds, so smart_resize keeps it and the grid is 5 x 10 cells of exactly 28 px
(token index = 10 * row + col). A word-level tokenizer gives each word one known id.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from dvsft_kernels.cli import main

VOCAB = ["[UNK]", "<image>", "cat", "dog", "on", "mat"]
ID = {w: i for i, w in enumerate(VOCAB)}
IGN = -100


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(ID, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    d = tmp_path_factory.mktemp("tok")
    t.save(str(d / "tokenizer.json"))
    return d


# cell (r, c) spans x 28c..28c+28, y 28r..28r+28
WORDS = [
    {"text": "cat", "box": [28, 28, 84, 56], "score": 0.9},  # cells (1,1), (1,2) -> tokens 11, 12
    {"text": "dog", "box": [140, 84, 168, 112], "score": 0.8},  # cell (3,5) -> token 35
    {"text": "mat", "box": [224, 0, 230, 5], "score": 0.95},  # 6x5 px: covers 4% of a cell -> unused
    {"text": "on", "box": [0, 112, 28, 140], "score": 0.1},  # cell (4,0) -> token 40, unless min score
]


def write_sample(d: Path, stem="page", words=WORDS, ext=".json"):
    d.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (280, 140), "white").save(d / f"{stem}.png")
    (d / f"{stem}{ext}").write_text(json.dumps(words))
    return d / f"{stem}.png", d / f"{stem}{ext}"


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_label_single(tmp_path, tok_dir, capsys):
    img, ocr = write_sample(tmp_path)
    out, ov = tmp_path / "o" / "labels.json", tmp_path / "o" / "overlay.png"
    code, stdout, err = run(["label", img, ocr, "--family", "qwen2_vl", "--tokenizer", tok_dir,
                             "--out", out, "--overlay", ov], capsys)
    assert code == 0, err
    assert "50 visual tokens, 4 labeled (8.0%)" in stdout
    assert "4 words: 3 used, 1 dropped (low_coverage: 1)" in stdout
    rec = json.loads(out.read_text())
    expected = {11: ID["cat"], 12: ID["cat"], 35: ID["dog"], 40: ID["on"]}
    assert rec["labels"] == [expected.get(i, IGN) for i in range(50)]
    assert rec["tokens"]["11"]["id"] == ID["cat"] and rec["tokens"]["11"]["text"] == "cat"
    assert rec["tokens"]["35"]["box"] == pytest.approx([140, 84, 168, 112])
    assert set(rec["tokens"]) == {"11", "12", "35", "40"}
    g = rec["grid"]
    assert g["num_tokens"] == 50 and g["image_size"] == [140, 280]
    assert (g["views"][0]["rows"], g["views"][0]["cols"]) == (5, 10)
    assert rec["summary"]["labeled_tokens"] == 4
    with Image.open(ov) as im:
        assert im.format == "PNG" and im.size == (280, 140)


def test_min_score_mode_and_tokenizer_file(tmp_path, tok_dir, capsys):
    img, ocr = write_sample(tmp_path)
    out = tmp_path / "l.json"
    code, stdout, err = run(["label", img, ocr, "--family", "qwen2-vl",
                             "--tokenizer", tok_dir / "tokenizer.json",
                             "--out", out, "--min-score", "0.5", "--mode", "aligned"], capsys)
    assert code == 0, err
    assert "low_score: 1" in stdout
    labels = json.loads(out.read_text())["labels"]
    assert labels[40] == IGN and labels[11] == ID["cat"]


def test_min_coverage(tmp_path, tok_dir, capsys):
    # "dog" moved half a cell right covers (3,5) and (3,6) by 50 % each: kept at 0.5, gone above
    img, ocr = write_sample(tmp_path, words=[{"text": "dog", "box": [154, 84, 182, 112]}])
    out = tmp_path / "l.json"
    for cov, want in (("0.5", {35, 36}), ("0.6", set())):
        code, _, err = run(["label", img, ocr, "--family", "qwen2_vl", "--tokenizer", tok_dir,
                            "--out", out, "--min-coverage", cov], capsys)
        assert code == 0, err
        assert set(json.loads(out.read_text())["tokens"]) == {str(i) for i in want}


def test_prefix_space(tmp_path, capsys):
    # byte-level pre-tokenizer: " cat" is the piece "Ġcat" (id 2), a bare "cat" is id 1
    vocab = {"[UNK]": 0, "cat": 1, "\u0120cat": 2}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.save(str(tmp_path / "tokenizer.json"))
    img, ocr = write_sample(tmp_path, words=WORDS[:1])
    out = tmp_path / "l.json"
    for flag, want in (("auto", 2), ("yes", 2), ("no", 1)):
        code, _, err = run(["label", img, ocr, "--family", "qwen2_vl",
                            "--tokenizer", tmp_path / "tokenizer.json",
                            "--out", out, "--prefix-space", flag], capsys)
        assert code == 0, err
        assert json.loads(out.read_text())["labels"][11] == want, flag


def test_processor_dir(tmp_path, capsys):
    # a LLaVA processor saved locally: 112 px crops, 14 px patches -> 8 x 8 cells of 14 px at scale 1
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(ID, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    ip = CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, image_token="<image>").save_pretrained(
        tmp_path / "proc")
    Image.new("RGB", (112, 112), "white").save(tmp_path / "p.png")
    (tmp_path / "p.json").write_text(json.dumps([{"text": "mat", "box": [14, 14, 42, 28]}]))
    out = tmp_path / "l.json"
    code, stdout, err = run(["label", tmp_path / "p.png", tmp_path / "p.json",
                             "--processor", tmp_path / "proc",
                             "--out", out], capsys)
    assert code == 0, err
    assert "64 visual tokens, 2 labeled" in stdout
    labels = json.loads(out.read_text())["labels"]
    assert [i for i, t in enumerate(labels) if t != IGN] == [9, 10] and labels[9] == ID["mat"]


def test_directory_mode(tmp_path, tok_dir, capsys):
    imgs, ocrs = tmp_path / "imgs", tmp_path / "ocr"
    write_sample(imgs, "a")
    write_sample(imgs, "b", words=WORDS[:1])
    for stem, words in (("a", WORDS), ("b", WORDS[:1])):
        (ocrs).mkdir(exist_ok=True)
        (ocrs / f"{stem}.json").write_text(json.dumps(words))
    for f in imgs.glob("*.json"):
        f.unlink()
    out, ov = tmp_path / "labels", tmp_path / "overlays"
    code, stdout, err = run(["label", imgs, ocrs, "--family", "qwen2_vl", "--tokenizer", tok_dir,
                             "--out", out, "--overlay", ov], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json"]
    assert sorted(p.name for p in ov.iterdir()) == ["a.png", "b.png"]
    assert json.loads((out / "b.json").read_text())["summary"]["labeled_tokens"] == 2
    assert "2 images: 100 visual tokens, 6 labeled" in stdout
    assert "labeling" in err  # tqdm progress bar on stderr

    # an image without OCR: an error naming it, unless skipped
    Image.new("RGB", (280, 140), "white").save(imgs / "c.png")
    base = ["label", imgs, ocrs, "--family", "qwen2_vl", "--tokenizer", tok_dir, "--out", out]
    code, _, err = run(base, capsys)
    assert code == 2 and "OCR_FILE" in err and "c.png" in err and "--skip-missing" in err
    code, stdout, err = run([*base, "--skip-missing"], capsys)
    assert code == 0, err
    assert "2 images" in stdout


@pytest.mark.parametrize("extra, needle", [
    (["--family", "qwen9"], "--family: unknown family 'qwen9'"),
    (["--family", "qwen2_vl"], "--tokenizer is required"),
    (["--family", "qwen2_vl", "--tokenizer", "NOPE"], "--tokenizer: 'NOPE' does not exist"),
    (["--processor", "NOPE"], "--processor: 'NOPE' is not a directory"),
    (["--family", "qwen2_vl", "--tokenizer", "TOK", "--min-coverage", "2"],
     "--min-coverage must be in (0, 1]"),
    (["--family", "qwen2_vl", "--tokenizer", "TOK", "--min-score", "-1"], "--min-score must be in [0, 1]"),
    (["--family", "qwen2_vl", "--tokenizer", "TOK", "--format", "abbyy"], "--format must be auto or one of"),
    ([], "one of the arguments --family --processor is required"),
    (["--family", "qwen2_vl", "--processor", "x"], "not allowed with argument"),
    (["--family", "qwen2_vl", "--tokenizer", "TOK", "--mode", "last"], "invalid choice: 'last'"),
])
def test_usage_errors(tmp_path, tok_dir, capsys, extra, needle):
    img, ocr = write_sample(tmp_path)
    extra = [str(tok_dir) if a == "TOK" else a for a in extra]
    code, _, err = run(["label", img, ocr, *extra], capsys)
    assert code == 2
    assert needle in err
    # argparse's errors and ours alike: one short usage line, the error, a pointer to -h; not the
    # whole usage block (which lists every option)
    assert err.splitlines() == [SHORT_USAGE, err.splitlines()[1], "run 'dvsft-kernels label -h' for help"]
    assert err.splitlines()[1].startswith("dvsft-kernels label: error: ")
    assert "--min-coverage" not in SHORT_USAGE


SHORT_USAGE = "usage: dvsft-kernels label IMAGE OCR_FILE (--family FAMILY | --processor DIR) [options]"


def test_top_level_usage_error_is_short(capsys):
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == "usage: dvsft-kernels COMMAND [options]"
    assert lines[1].startswith("dvsft-kernels: error: argument COMMAND: invalid choice: 'frobnicate'")
    assert lines[2:] == ["run 'dvsft-kernels -h' for help"]


@pytest.mark.parametrize("extra", [["--family", "qwen2_vl", "--tokenizer", "TOK"],  # image processor
                                   ["--family", "llava", "--tokenizer", "TOK"],  # tokenizer
                                   ["--processor", "DIR"]])  # AutoProcessor
def test_missing_transformers_is_an_error_not_a_traceback(tmp_path, tok_dir, capsys, monkeypatch, extra):
    """A base install (no [hf] extra): the command names the package and the pip command, exit 2."""
    img, ocr = write_sample(tmp_path)
    extra = [{"TOK": str(tok_dir), "DIR": str(tmp_path)}.get(a, a) for a in extra]
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    code, out, err = run(["label", img, ocr, *extra], capsys)
    assert code == 2
    assert err == ("dvsft-kernels label: error: this command needs the 'transformers' package, which is "
                   'not installed; install it with: pip install "dvsft-kernels[hf]"\n')
    assert out == ""


def test_missing_transformers_through_the_entry_point(tmp_path, tok_dir):
    """The same in a fresh interpreter through the module entry point: no traceback, status 2."""
    img, ocr = write_sample(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    code = ("import runpy, sys; sys.modules['transformers'] = None; "
            "sys.argv[0] = 'dvsft-kernels'; runpy.run_module('dvsft_kernels.cli', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, "label", str(img), str(ocr), "--family", "qwen2_vl",
                        "--tokenizer", str(tok_dir)], check=False, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert 'pip install "dvsft-kernels[hf]"' in r.stderr


def test_missing_and_malformed_inputs(tmp_path, tok_dir, capsys):
    img, ocr = write_sample(tmp_path)
    base = ["--family", "qwen2_vl", "--tokenizer", tok_dir]
    code, _, err = run(["label", tmp_path / "none.png", ocr, *base], capsys)
    assert code == 2 and "IMAGE: " in err and "none.png" in err and "does not exist" in err
    code, _, err = run(["label", img, tmp_path / "none.json", *base], capsys)
    assert code == 2 and "OCR_FILE: " in err and "none.json" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "cat", "box": [0, 0, 1, 1]}\n{"text": "dog", "box": [0, 0]}\n')
    code, _, err = run(["label", img, bad, *base], capsys)
    assert code == 2 and "OCR_FILE: " in err and "bad.jsonl: line 2" in err and "box" in err
    notimg = tmp_path / "x.png"
    notimg.write_text("not a png")
    code, _, err = run(["label", notimg, ocr, *base], capsys)
    assert code == 2 and "IMAGE: cannot open" in err
    code, _, err = run(["label", tmp_path, ocr, *base], capsys)
    assert code == 2 and "OCR_FILE" in err and "must be a directory" in err
    code, _, err = run(["label", img, ocr, *base, "--out", tmp_path], capsys)
    assert code == 2 and "--out" in err and "is a directory" in err
    code, stdout, _ = run(["--help"], capsys)
    assert code == 0 and "label" in stdout
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2 and "invalid choice" in err


def test_subprocess_module_entry(tmp_path, tok_dir):
    img, ocr = write_sample(tmp_path)
    out = tmp_path / "labels.json"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    r = subprocess.run([sys.executable, "-m", "dvsft_kernels.cli", "label", str(img), str(ocr), "--family",
                        "qwen2_vl", "--tokenizer", str(tok_dir), "--out", str(out)],
                       check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "page.png: 50 visual tokens, 4 labeled" in r.stdout
    assert json.loads(out.read_text())["labels"][12] == ID["cat"]
