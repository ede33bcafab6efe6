"""The examples run and do what they say: the tiny DV-SFT example end to end (a few steps; the full
run is documented in its docstring), README's torchrun command, and examples/make_sample_data.py."""

import csv
import difflib
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")


def test_train_tiny_dvsft_smoke(tmp_path, monkeypatch):
    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_tiny_dvsft.py"
    spec = importlib.util.spec_from_file_location("train_tiny_dvsft", path)
    mod = importlib.util.module_from_spec(spec)
    # registered while it runs, as an import would: its dataclasses look their module up there
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    summary = mod.main(
        [
            "--steps",
            "4",
            "--train-pages",
            "32",
            "--eval-pages",
            "16",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert (tmp_path / "dvsft_tiny_curves.png").stat().st_size > 0
    assert (tmp_path / "summary.json").exists()
    after = summary["held_out_after"]
    assert all(math.isfinite(v) for v in after.values())
    assert summary["first_train_window"]["vision_loss"] > 0


ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(cmd, cwd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_readme_torchrun_command_prints_its_line(tmp_path):
    """README "Scaling out": `torchrun --nproc_per_node 2 examples/train_tiny_dvsft.py --steps 20
    --train-pages 64 --eval-pages 16` runs on 2 gloo CPU processes and prints the line README shows
    (--standalone: a free rendezvous port instead of the fixed 29500, nothing else changed)."""
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "examples" / "train_tiny_dvsft.py"), "--steps", "20", "--train-pages", "64",
                "--eval-pages", "16"], cwd=tmp_path)
    lines = [ln for ln in out.splitlines() if ln.startswith("held-out vision-token accuracy")]
    assert len(lines) == 1, out[-3000:]  # one report, from rank 0
    m = re.fullmatch(r"held-out vision-token accuracy (\d\.\d{3}) vs chance (\d\.\d{3}) \((\d+\.\d)x\); "
                     r"\d+ s on 2 threads, 2 process\(es\)", lines[0])
    assert m, lines[0]
    acc, chance, ratio = float(m[1]), float(m[2]), m[3]
    assert chance == 0.042  # 1 / 24 words
    assert ratio == f"{acc / (1 / 24):.1f}"
    # README shows 0.043 (chance: 20 steps teach nothing yet); a broken run (NaN, 0) is far from it
    assert abs(acc - 0.043) <= 0.01, lines[0]
    summary = json.loads((tmp_path / "dvsft_tiny_out" / "summary.json").read_text())
    assert summary["steps"] == 20 and round(summary["held_out_after"]["vision_accuracy"], 3) == acc


# words of examples/make_sample_data.py's page, in reading order
PAGE_WORDS = [
    "Direct", "vision", "supervision",
    "Every", "visual", "token", "that", "shows", "a", "word",
    "is", "trained", "to", "predict", "that", "word.",
    "Invoice", "4721", "Total:", "318.40", "EUR",
    "Shipped", "to", "Alice", "Martin,", "Lyon",
]


@pytest.mark.timeout(600)
def test_make_sample_data_outputs(tmp_path):
    """examples/make_sample_data.py, run on a copy (it writes next to itself): a 640 x 360 grey page,
    its Tesseract TSV with the page's words, a 1000-token byte-level BPE tokenizer, the overlay as a
    palette PNG of at most 96 colours at twice the page's size; it prints every file with its size."""
    if shutil.which("tesseract") is None:
        pytest.skip("the tesseract binary is not installed (apt-get install tesseract-ocr)")
    from PIL import Image
    from tokenizers import Tokenizer

    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "make_sample_data.py", tmp_path / "examples")
    out = _run([sys.executable, str(tmp_path / "examples" / "make_sample_data.py")], cwd=tmp_path)
    data = tmp_path / "examples" / "data"

    page = Image.open(data / "page.png")
    assert page.size == (640, 360) and page.mode == "L"
    with open(data / "page.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    words = [r["text"] for r in rows if r["level"] == "5" and r["text"].strip()]
    match = difflib.SequenceMatcher(a=PAGE_WORDS, b=words).ratio()
    assert match >= 0.9, (match, words)  # real OCR of the rendered page
    for r in rows:
        if r["level"] == "5":
            x, y, w, h = (int(r[k]) for k in ("left", "top", "width", "height"))
            assert 0 <= x and 0 <= y and x + w <= 640 and y + h <= 360 and w > 0 and h > 0

    tok = Tokenizer.from_file(str(data / "tokenizer" / "tokenizer.json"))
    assert tok.get_vocab_size() == 1000 and tok.token_to_id("<|endoftext|>") == 0
    assert tok.decode(tok.encode("Invoice 4721 Total").ids) == "Invoice 4721 Total"  # byte-level round trip
    assert len(tok.encode(" the").ids) == 1  # common words stay whole

    overlay = Image.open(tmp_path / "docs" / "img" / "labeling_overlay.png")
    assert overlay.mode == "P" and overlay.size == (1280, 720)
    assert len(overlay.getcolors(256)) <= 96

    printed = dict(re.fullmatch(r"(\S+)  (\d+) B", ln).groups() for ln in out.splitlines()
                   if re.fullmatch(r"\S+  \d+ B", ln))
    assert set(printed) == {"examples/data/page.png", "examples/data/page.tsv",
                            "examples/data/tokenizer/tokenizer.json", "docs/img/labeling_overlay.png"}
    for rel, size in printed.items():
        assert (tmp_path / rel).stat().st_size == int(size), rel
