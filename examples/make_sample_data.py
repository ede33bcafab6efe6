"""Regenerate examples/data: a rendered page, its real Tesseract TSV, and a small BPE tokenizer.

    python examples/make_sample_data.py          # needs the `tesseract` binary (apt: tesseract-ocr)

It also redraws docs/img/labeling_overlay.png with `dvsft-kernels label` (palette PNG, to stay small).

The tokenizer is a 1000-token byte-level BPE trained on English prose that ships with Python (the
Zen of Python and stdlib docstrings), never on the page: a stand-in for a model's tokenizer.json,
small enough to ship, so docs/labeling.md runs offline. Like a real vocabulary it keeps common
words whole and splits rarer ones into pieces, which shows the two labeling modes apart.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import io
import os
import shutil
import subprocess
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
FONTS = Path("/usr/share/fonts/truetype/dejavu")
LINES = [
    ("Direct vision supervision", "DejaVuSans-Bold.ttf", 34),
    ("Every visual token that shows a word", "DejaVuSans.ttf", 26),
    ("is trained to predict that word.", "DejaVuSans.ttf", 26),
    ("Invoice 4721    Total: 318.40 EUR", "DejaVuSerif.ttf", 26),
    ("Shipped to Alice Martin, Lyon", "DejaVuSerif.ttf", 26),
]


def render_page(path: Path) -> None:
    img = Image.new("L", (640, 360), 255)
    d = ImageDraw.Draw(img)
    y = 30
    for text, font, size in LINES:
        d.text((36, y), text, font=ImageFont.truetype(str(FONTS / font), size), fill=0)
        y += int(size * 2.1)
    img.save(path, optimize=True)


def train_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    corpus = [codecs.decode(this.s, "rot13")]
    for name in ("argparse", "json", "collections", "logging", "pathlib", "subprocess", "textwrap",
                 "random", "datetime", "csv", "decimal", "unittest", "email.message", "http.client"):
        mod = importlib.import_module(name)
        corpus += [o.__doc__ for o in vars(mod).values() if isinstance(getattr(o, "__doc__", None), str)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def main() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    render_page(DATA / "page.png")
    if shutil.which("tesseract") is None:
        raise SystemExit("tesseract not found (apt-get install tesseract-ocr)")
    # `tesseract IMG BASE tsv` writes BASE.tsv (image_to_data format)
    subprocess.run(["tesseract", str(DATA / "page.png"), str(DATA / "page"), "--psm", "3", "tsv"],
                   check=True, capture_output=True)
    train_tokenizer(DATA / "tokenizer" / "tokenizer.json")
    overlay = ROOT / "docs" / "img" / "labeling_overlay.png"
    overlay.parent.mkdir(parents=True, exist_ok=True)
    from dvsft_kernels.cli import main as cli

    rel = lambda p: str(p.relative_to(ROOT))
    os.chdir(ROOT)
    code = cli(["label", rel(DATA / "page.png"), rel(DATA / "page.tsv"), "--family", "qwen2_vl",
                "--tokenizer", rel(DATA / "tokenizer"), "--mode", "aligned", "--overlay", rel(overlay),
                "--overlay-scale", "2"])
    if code:
        raise SystemExit(code)
    Image.open(overlay).quantize(colors=96).save(overlay, optimize=True)
    for p in [*sorted(DATA.rglob("*")), overlay]:
        if p.is_file():
            print(f"{rel(p)}  {p.stat().st_size} B")


if __name__ == "__main__":
    main()
