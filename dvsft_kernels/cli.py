"""``dvsft-kernels`` command line (also ``python -m dvsft_kernels.cli``).

Subcommands register themselves in :data:`SUBCOMMANDS` (name -> (add_arguments, run)); ``run``
returns the exit status. Usage errors exit with status 2 and a message naming the argument; so does
a missing optional dependency (the message names the package and the pip command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvsft_kernels.errors import UsageError

EXIT_USAGE = 2
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
OCR_EXTS = (".tsv", ".hocr", ".html", ".htm", ".xhtml", ".json", ".jsonl", ".txt")


# optional dependencies by top-level module: the pip command that installs each
_EXTRAS = {"transformers": "hf", "tokenizers": "hf", "accelerate": "hf", "peft": "hf",
           "pytesseract": "ocr", "triton": "triton"}


def _missing_module(name: str) -> str:
    extra = _EXTRAS.get(name)
    cmd = f'pip install "dvsft-kernels[{extra}]"' if extra else f"pip install {name}"
    return f"this command needs the {name!r} package, which is not installed; install it with: {cmd}"


class _Parser(argparse.ArgumentParser):
    """Errors as one short usage line, the message and a pointer to -h, not the whole usage block."""

    def short_usage(self) -> str:
        """prog, positionals, required options; the optional ones folded into [options]."""
        grouped = {a for g in self._mutually_exclusive_groups if g.required for a in g._group_actions}

        def flag(a: argparse.Action) -> str:
            if not a.option_strings:
                return a.metavar or a.dest.upper()
            return a.option_strings[0] + ("" if a.nargs == 0 else f" {a.metavar or a.dest.upper()}")

        parts = [flag(a) for a in self._actions
                 if not a.option_strings or (a.required and a not in grouped)]
        parts += ["(" + " | ".join(flag(a) for a in g._group_actions) + ")"
                  for g in self._mutually_exclusive_groups if g.required]
        if any(a.option_strings and not a.required and a not in grouped for a in self._actions):
            parts.append("[options]")
        return " ".join([self.prog, *parts])

    def report(self, message: str) -> None:
        print(f"usage: {self.short_usage()}\n{self.prog}: error: {message}\n"
              f"run '{self.prog} -h' for help", file=sys.stderr)

    def error(self, message: str):  # argparse's hook for bad flags; exits like argparse does
        self.report(message)
        self.exit(EXIT_USAGE)


# ------------------------------------------------------------------------------------------- label

# --family NAME: default geometry of a family in dvsft_kernels.labeling.registry (its names and aliases).
# A family with a default_processor runs it on the image (Qwen: transformers' own image processor class
# with its default settings, which gives image_grid_thw); the others use the family's builder, whose
# defaults are the processor class defaults. Checkpoints often differ (LLaVA-1.5 crops 336 px, the
# class 224): `--processor DIR` reads a checkpoint's own settings.
def _family_names() -> tuple[str, ...]:
    from dvsft_kernels.labeling import registry

    return registry.names(aliases=True)


@dataclass
class _Geometry:
    """How a grid is made for an image: with a checkpoint's processor, or a family's defaults."""

    family: str | None  # --family given without --processor
    processor: Any = None  # ProcessorMixin (--processor) or the family's default_processor (--family)

    def grid(self, image):
        from dvsft_kernels.labeling import VisualGrid

        if self.processor is None:
            return VisualGrid.for_family(self.family, (image.height, image.width))
        if self.family is not None:  # a family's default processor (Qwen: its own image_grid_thw)
            outputs = self.processor(images=[image], return_tensors="pt")
            return VisualGrid.from_processor(self.processor, image, outputs)
        # a checkpoint's processor: from_processor reads the settings a processor call would use
        # (including the processor class's own image defaults, which calling its image processor
        # alone would miss), so no separate call is made here
        return VisualGrid.from_processor(self.processor, image)


def _geometry(args) -> _Geometry:
    if args.processor is not None:
        d = Path(args.processor)
        if not d.is_dir():
            raise UsageError(f"--processor: {str(d)!r} is not a directory")
        from transformers import AutoProcessor

        try:
            proc = AutoProcessor.from_pretrained(str(d), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many types; report, don't crash
            hint = ""
            if "video" in str(e).lower():
                hint = " (processors with a video processor, e.g. Qwen2-VL, InternVL, need torchvision)"
            raise UsageError(f"--processor: cannot load a processor from {str(d)!r}: {e}{hint}") from None
        from dvsft_kernels.labeling.registry import detect_family

        try:
            detect_family(proc)
        except TypeError as e:
            raise UsageError(f"--processor: {e}") from None
        return _Geometry(None, proc)
    from dvsft_kernels.labeling import registry

    try:
        family = registry.get(args.family, argument="--family")
    except ValueError as e:
        raise UsageError(str(e)) from None
    fam = registry.normalize_name(args.family)
    if family.default_processor is not None:
        return _Geometry(fam, family.default_processor(fam))
    return _Geometry(fam)


def _tokenizer(args, geometry: _Geometry):
    if args.tokenizer is None:
        tok = getattr(geometry.processor, "tokenizer", None)
        if tok is None:
            raise UsageError("--tokenizer is required with --family (a directory holding tokenizer.json, "
                             "or the tokenizer.json file itself)")
        return tok
    p = Path(args.tokenizer)
    if p.is_file():
        from transformers import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast(tokenizer_file=str(p))
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--tokenizer: cannot load {str(p)!r}: {e}") from None
    if not p.is_dir():
        raise UsageError(f"--tokenizer: {str(p)!r} does not exist")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        if (p / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))
        raise UsageError(f"--tokenizer: cannot load a tokenizer from {str(p)!r} "
                         f"(no tokenizer.json there?): {e}") from None


def _pairs(args) -> tuple[list[tuple[Path, Path | None, str]], bool]:
    """[(image, OCR file or None with --ocr, stem)] and whether this is directory mode."""
    img = Path(args.image)
    if not img.exists():
        raise UsageError(f"IMAGE: {str(img)!r} does not exist")
    if args.ocr is not None:  # OCR runs on the images: no OCR files
        if args.ocr_file is not None:
            raise UsageError(f"OCR_FILE: {args.ocr_file!r} given with --ocr {args.ocr}; OCR_FILE reads "
                             "existing OCR output, --ocr runs OCR on the images: give one of them")
        if img.is_file():
            return [(img, None, img.stem)], False
        return [(p, None, p.stem) for p in _list_images(img)], True
    if args.ocr_file is None:
        raise UsageError("OCR_FILE: required (an OCR file, or a directory of them named like the images), "
                         "unless --ocr ENGINE runs OCR on the images")
    ocr = Path(args.ocr_file)
    if not ocr.exists():
        raise UsageError(f"OCR_FILE: {str(ocr)!r} does not exist")
    if img.is_file():
        if not ocr.is_file():
            raise UsageError(f"OCR_FILE: {str(ocr)!r} is a directory but IMAGE is a file")
        return [(img, ocr, img.stem)], False
    if not ocr.is_dir():
        raise UsageError(f"OCR_FILE: {str(ocr)!r} must be a directory when IMAGE is a directory")
    images = _list_images(img)
    by_stem: dict[str, list[Path]] = {}
    for p in ocr.iterdir():
        if (p.is_file() or p.is_symlink()) and p.suffix.lower() in OCR_EXTS:
            by_stem.setdefault(p.stem, []).append(p)
    pairs, missing = [], []
    for p in images:
        cands = by_stem.get(p.stem, [])
        if len(cands) > 1:
            raise UsageError(f"OCR_FILE: several OCR files for image {p.name!r}: "
                             f"{', '.join(sorted(c.name for c in cands))}")
        if not cands:
            missing.append(p.name)
            continue
        pairs.append((p, cands[0], p.stem))
    if missing and not args.skip_missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UsageError(f"OCR_FILE: no OCR file in {str(ocr)!r} for {shown} (same stem, one of "
                         f"{', '.join(OCR_EXTS)}); pass --skip-missing to skip those images")
    if not pairs:
        raise UsageError(f"OCR_FILE: no OCR file in {str(ocr)!r} matches an image in {str(img)!r}")
    return pairs, True


def _list_images(d: Path) -> list[Path]:
    """The images of a directory, sorted; a dangling link is listed too (it fails as a missing file)."""
    images = sorted(p for p in d.iterdir()
                    if (p.is_file() or p.is_symlink()) and not p.is_dir() and p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise UsageError(f"IMAGE: directory {str(d)!r} holds no images ({', '.join(IMAGE_EXTS)})")
    by_stem: dict[str, list[str]] = {}
    for p in images:
        by_stem.setdefault(p.stem, []).append(p.name)
    same = [names for names in by_stem.values() if len(names) > 1]
    if same:  # their outputs (STEM.json, STEM.png) and OCR files would be one file
        raise UsageError(f"IMAGE: images with the same stem in {str(d)!r} would share their outputs: "
                         + "; ".join(", ".join(names) for names in same[:5]))
    return images


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x if isinstance(x, (int, float, str, bool, type(None))) else str(x)


def _grid_info(grid) -> dict:
    """The grid as plain JSON: enough to map every token index back to its pixel cell."""
    views = [{f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)} for v in grid.views]
    return {"family": grid.family, "image_size": list(grid.image_size), "num_tokens": grid.num_tokens,
            "segments": _jsonable(getattr(grid, "segments", None)), "views": views,
            "meta": _jsonable(grid.meta or {})}


def _decode(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _open_image(image_path: Path, max_pixels: int | None):
    """The decoded image (its own mode), or a UsageError naming the file: missing, not an image,
    truncated or corrupt, or over the pixel limit (Pillow's decompression-bomb guard; its warning counts
    as the limit too)."""
    import warnings

    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels or None  # 0: no limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(image_path) as im:
                im.load()
                return im.copy()
    except FileNotFoundError:
        raise UsageError(f"IMAGE: {str(image_path)!r} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UsageError(f"IMAGE: {str(image_path)!r} is too large: {e} (--max-pixels N raises the limit, "
                         "0 removes it)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises several types for unreadable files
        raise UsageError(f"IMAGE: cannot open {str(image_path)!r} as an image: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file next to ``path``, then rename it over ``path``: a run killed midway
    leaves the old file or none, never a half-written one (at worst a hidden ``.NAME.*.tmp``)."""
    import os
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _run_ocr(raw, image_path: Path, args) -> list:
    """--ocr ENGINE on the decoded image (transparency is the engine's business: run_ocr puts it on
    white), cached in memory and, with --ocr-cache DIR, on disk."""
    from dvsft_kernels.labeling.ocr import run_ocr

    try:
        return list(run_ocr(raw, engine=args.ocr, lang=args.ocr_lang, cache_dir=args.ocr_cache))
    except Exception as e:  # noqa: BLE001 - the engine's own errors (a subprocess, a library), reported per image
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"IMAGE: OCR ({args.ocr}) failed on {str(image_path)!r}: {msg}") from None


def _label_one(image_path: Path, ocr_path: Path | None, geometry: _Geometry, tokenizer, args,
               out_json: Path | None, out_png: Path | None) -> dict:
    """Label one image (OCR from ``ocr_path``, or run by ``--ocr`` when it is None) and write its outputs
    atomically. Bad input raises UsageError naming the file."""
    from dvsft_kernels.labeling import label_visual_tokens
    from dvsft_kernels.labeling.readers import read_ocr

    raw = _open_image(image_path, getattr(args, "max_pixels", None))
    image = raw if raw.mode == "RGB" else raw.convert("RGB")
    h, w = image.height, image.width
    if ocr_path is None:
        words = _run_ocr(raw, image_path, args)
    else:
        try:
            # the score threshold is applied by the labeler so that the report counts those words
            words = read_ocr(ocr_path, format=args.format, image_size=(h, w), page=args.page,
                             split_lines=args.split_lines)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"OCR_FILE: {e}") from None
    try:
        grid = geometry.grid(image)
    except ValueError as e:
        raise UsageError(f"IMAGE {str(image_path)!r}: {e}") from None
    prefix = {"auto": None, "yes": True, "no": False}[args.prefix_space]
    soft = getattr(args, "soft", None)
    soft_kw = {"soft": soft, "spread": args.spread} if soft else {}
    labels, report = label_visual_tokens(words, grid, tokenizer, mode=args.mode,
                                         min_coverage=args.min_coverage, ignore_index=args.ignore_index,
                                         min_score=args.min_score or None, add_prefix_space=prefix,
                                         return_report=True, **soft_kw)
    drawn = labels
    if soft:  # "labels" keeps one id per token (the highest-weight one); "soft" holds all K
        soft_ids, soft_w = labels.ids.tolist(), [[round(v, 6) for v in r] for r in labels.weights.tolist()]
        labels = labels.ids[:, 0]
    labels_l = [int(t) for t in labels.tolist()]
    boxes = grid.token_boxes().tolist()
    tokens, texts = {}, {}
    for i, t in enumerate(labels_l):
        if t != args.ignore_index:
            if t not in texts:
                texts[t] = _decode(tokenizer, t)
            tokens[str(i)] = {"id": t, "text": texts[t], "box": [round(v, 2) for v in boxes[i]]}
            if soft:
                tokens[str(i)]["targets"] = [
                    {"id": j, "text": _decode(tokenizer, j), "weight": wt}
                    for j, wt in zip(soft_ids[i], soft_w[i]) if j != args.ignore_index]
    summary = {"visual_tokens": grid.num_tokens, "cells": report.num_cells, "labeled_tokens": len(tokens),
               "labeled_fraction": report.labeled_fraction, "words": report.num_words,
               "words_used": report.words_used, "words_dropped": dict(report.dropped)}
    if report.words_valid > report.words_used:  # valid words that cover no cell enough
        summary["words_dropped"]["low_coverage"] = report.words_valid - report.words_used
    record = {"image": str(image_path), "ocr_file": None if ocr_path is None else str(ocr_path)}
    if ocr_path is None:
        record["ocr"] = {"engine": args.ocr, "lang": args.ocr_lang}
    record.update({"mode": args.mode, "min_coverage": args.min_coverage, "min_score": args.min_score,
                   "ignore_index": args.ignore_index, "grid": _grid_info(grid), "summary": summary,
                   "tokens": tokens, "labels": labels_l})
    if soft:
        record["soft"] = {"k": soft, "spread": args.spread, "ids": soft_ids, "weights": soft_w}
    # the overlay first: an image counts as done (resume) when all its outputs exist, and the JSON
    # is the last one renamed into place
    if out_png is not None:
        from dvsft_kernels.labeling.overlay import draw_overlay

        pic = draw_overlay(image, grid, drawn, words=words, tokenizer=tokenizer,
                           ignore_index=args.ignore_index, scale=args.overlay_scale)
        _write_atomic(out_png, lambda p: pic.save(p, format="PNG"))
    if out_json is not None:
        text = json.dumps(record, ensure_ascii=False, indent=1) + "\n"
        _write_atomic(out_json, lambda p: p.write_text(text, encoding="utf-8"))
    return summary


def _format_summary(name: str, s: dict) -> str:
    drops = ", ".join(f"{k}: {v}" for k, v in sorted(s["words_dropped"].items())) or "none"
    n_drop = sum(s["words_dropped"].values())
    return (f"{name}: {s['visual_tokens']} visual tokens, {s['labeled_tokens']} labeled "
            f"({100 * s['labeled_fraction']:.1f}%); {s['words']} words: {s['words_used']} used, "
            f"{n_drop} dropped ({drops})")


def _add_label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="image file, or a directory of images")
    p.add_argument("ocr_file", metavar="OCR_FILE", nargs="?", default=None,
                   help="OCR output for IMAGE (Tesseract TSV, hOCR, PaddleOCR / docTR / words JSON), "
                        "or a directory of them named like the images (same stem); not with --ocr")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--family", help=f"model family, default geometry ({', '.join(_family_names())})")
    g.add_argument("--processor", metavar="DIR", help="local checkpoint dir for AutoProcessor (no hub)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="dir with tokenizer.json (or the file); required with --family")
    p.add_argument("--out", metavar="PATH", help="labels JSON file (a directory in directory mode)")
    p.add_argument("--overlay", metavar="PATH", help="overlay PNG (a directory in directory mode)")
    p.add_argument("--overlay-scale", type=float, default=1.0, metavar="F",
                   help="draw the overlay on the image scaled by F (e.g. 2 for readable token text)")
    p.add_argument("--mode", choices=("first", "aligned"), default="first",
                   help="which sub-token of a word a cell gets (default: first)")
    p.add_argument("--prefix-space", choices=("auto", "yes", "no"), default="auto",
                   help="tokenise each word with a leading space, as inside running text (default auto: "
                        "yes unless the tokenizer already marks a lone word as word-initial)")
    p.add_argument("--min-coverage", type=float, default=0.25,
                   help="least share of a cell a word must cover to label it (default 0.25)")
    p.add_argument("--min-score", type=float, default=0.0, help="drop OCR words below this confidence (0-1)")
    p.add_argument("--soft", type=int, default=None, metavar="K",
                   help="soft labels: K coverage-weighted ids per visual token (JSON 'soft', overlay: top 2)")
    p.add_argument("--spread", type=float, default=0.0, metavar="S",
                   help="with --soft: a word's labeled neighbouring cells also get it at weight S, in [0, 1)")
    p.add_argument("--format", default="auto",
                   help="OCR format: auto, tesseract, hocr, paddleocr, doctr, json")
    p.add_argument("--page", type=int, default=None, help="page of a multi-page OCR file (0-based)")
    p.add_argument("--split-lines", action="store_true", help="split line-level OCR (PaddleOCR) into words")
    p.add_argument("--ignore-index", type=int, default=-100, help="label of unlabeled tokens (default -100)")
    p.add_argument("--skip-missing", action="store_true",
                   help="directory mode: skip images without an OCR file instead of failing")
    p.add_argument("--ocr", metavar="ENGINE",
                   help="run OCR on the images with ENGINE (tesseract, paddleocr, doctr) instead of "
                        "reading OCR_FILE")
    p.add_argument("--ocr-lang", default="eng", metavar="LANG",
                   help="Tesseract language(s) for --ocr, e.g. deu+eng (default eng)")
    p.add_argument("--ocr-cache", metavar="DIR",
                   help="keep --ocr results on disk in DIR (keyed by the pixels): a rerun reuses them")
    p.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                   help="directory mode: label N images at a time in worker processes (default 1)")
    p.add_argument("--force", action="store_true",
                   help="directory mode: redo images whose outputs exist (default: skip them, so an "
                        "interrupted run resumes)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is off anyway when stderr is not a terminal)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse images over N pixels (default: Pillow's decompression-bomb limit, "
                        "about 89.5 million; 0: no limit)")


# One worker process's geometry, tokenizer and options (--jobs N > 1), set by _init_worker; or the
# reason its set-up failed (reported for every image it gets, instead of breaking the pool).
_WORKER: tuple[Any, Any, Any] | str | None = None
_POOL_WINDOW = 4  # images in flight per worker (bounds the parent's memory for huge folders)


@dataclass(frozen=True)
class _Job:
    """One input of directory mode and where its outputs go."""

    image: Path
    ocr_file: Path | None
    out_json: Path | None
    out_png: Path | None

    def done(self) -> bool:
        """Its outputs all exist (a JSON one also parses): skipped on resume."""
        outs = [p for p in (self.out_json, self.out_png) if p is not None]
        if not outs or not all(p.is_file() for p in outs):
            return False
        if self.out_json is None:
            return True
        try:
            return "labels" in json.loads(self.out_json.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False


def _worker_options(args) -> argparse.Namespace:
    """The picklable part of the parsed arguments (no parser, no functions)."""
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_")})


def _init_worker(opts: argparse.Namespace) -> None:
    import os

    global _WORKER
    # one thread per worker: the pool is the parallelism (Tesseract's OpenMP threads would oversubscribe)
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    try:
        import torch

        torch.set_num_threads(1)
        geometry = _geometry(opts)
        _WORKER = (geometry, _tokenizer(opts, geometry), opts)
    except Exception as e:  # noqa: BLE001 - reported per image by _label_job
        _WORKER = f"worker set-up failed: {type(e).__name__}: {' '.join(str(e).split())}"


def _label_job(job: _Job, geometry=None, tokenizer=None, args=None) -> tuple[str, Any]:
    """("ok", summary) or ("failed", one-line reason); never raises for bad input."""
    if geometry is None:
        if _WORKER is None or isinstance(_WORKER, str):
            return "failed", _WORKER or "worker not initialised"
        geometry, tokenizer, args = _WORKER
    try:
        return "ok", _label_one(job.image, job.ocr_file, geometry, tokenizer, args, job.out_json, job.out_png)
    except UsageError as e:
        return "failed", " ".join(str(e).split())
    except Exception as e:  # noqa: BLE001 - one bad input never stops the run; it is reported with its reason
        return "failed", f"{type(e).__name__}: {' '.join(str(e).split())}"


def _check_ocr_engine(args) -> None:
    """An unknown or missing engine, or (Tesseract) a language it lacks, is one usage error up front
    rather than one failure per image."""
    from PIL import Image

    from dvsft_kernels.labeling.ocr import ENGINES, check_engine, run_ocr

    if args.ocr not in ENGINES:
        raise UsageError(f"--ocr must be one of {', '.join(ENGINES)}, got {args.ocr!r}")
    try:
        check_engine(args.ocr)
    except ValueError as e:
        raise UsageError(f"--ocr {args.ocr}: {str(e).removeprefix('engine: ')}") from None
    if args.ocr_cache is not None and Path(args.ocr_cache).exists() and not Path(args.ocr_cache).is_dir():
        raise UsageError(f"--ocr-cache: {args.ocr_cache!r} is not a directory")
    if args.ocr == "tesseract":  # a blank 32 x 32 page: checks --ocr-lang (paddle / doctr would load models)
        try:
            run_ocr(Image.new("L", (32, 32), 255), engine="tesseract", lang=args.ocr_lang, cache=False)
        except ValueError as e:
            raise UsageError(f"--ocr-lang: {str(e).removeprefix('lang: ')}") from None
        except Exception as e:  # noqa: BLE001 - the binary itself fails: say so once
            raise UsageError(f"--ocr tesseract: the engine fails on a blank page: {e}") from None


def _run_label(args) -> int:
    if not 0.0 < args.min_coverage <= 1.0:
        raise UsageError(f"--min-coverage must be in (0, 1], got {args.min_coverage}")
    if not 0.0 <= args.min_score <= 1.0:
        raise UsageError(f"--min-score must be in [0, 1], got {args.min_score}")
    from dvsft_kernels.labeling.readers import FORMAT_ALIASES, FORMATS

    if args.format != "auto" and args.format.lower() not in FORMATS + tuple(FORMAT_ALIASES):
        raise UsageError(f"--format must be auto or one of {', '.join(FORMATS)}, got {args.format!r}")
    if not 0 < args.overlay_scale <= 16:
        raise UsageError(f"--overlay-scale must be in (0, 16], got {args.overlay_scale}")
    if args.page is not None and args.page < 0:
        raise UsageError(f"--page must be >= 0, got {args.page}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    if args.soft is not None and args.soft < 1:
        raise UsageError(f"--soft must be >= 1, got {args.soft}")
    if not 0.0 <= args.spread < 1.0:
        raise UsageError(f"--spread must be in [0, 1), got {args.spread}")
    if args.spread and args.soft is None:
        raise UsageError("--spread needs --soft K (hard labels have one id per token)")
    if args.max_pixels is not None and args.max_pixels < 0:
        raise UsageError(f"--max-pixels must be >= 0 (0: no limit), got {args.max_pixels}")
    pairs, dir_mode = _pairs(args)
    if args.ocr is not None:
        _check_ocr_engine(args)
    out, ov = (Path(args.out) if args.out else None), (Path(args.overlay) if args.overlay else None)
    for flag, p in (("--out", out), ("--overlay", ov)):
        if p is not None and dir_mode and p.exists() and not p.is_dir():
            raise UsageError(f"{flag}: {str(p)!r} must be a directory in directory mode")
        if p is not None and not dir_mode and p.is_dir():
            raise UsageError(f"{flag}: {str(p)!r} is a directory; give a file path")
    geometry = _geometry(args)
    tokenizer = _tokenizer(args, geometry)

    if not dir_mode:
        img, ocr, _ = pairs[0]
        s = _label_one(img, ocr, geometry, tokenizer, args, out, ov)
        print(_format_summary(img.name, s))
        for p in (out, ov):
            if p is not None:
                print(f"wrote {p}")
        return 0
    return _run_label_dir(args, pairs, out, ov, geometry, tokenizer)


def _run_label_dir(args, pairs, out: Path | None, ov: Path | None, geometry, tokenizer) -> int:
    """Directory mode: every image labeled (in --jobs worker processes), the ones whose outputs exist
    skipped unless --force, each failure reported with its reason; status 1 if any failed."""
    import time

    jobs = [_Job(img, ocr, out / f"{stem}.json" if out else None, ov / f"{stem}.png" if ov else None)
            for img, ocr, stem in pairs]
    todo = jobs if args.force else [j for j in jobs if not j.done()]
    n_skipped = len(jobs) - len(todo)
    results: dict[int, tuple[str, Any]] = {}
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="labeling", unit="image", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        if args.jobs == 1 or len(todo) <= 1:
            for i, job in enumerate(todo):
                results[i] = _label_job(job, geometry, tokenizer, args)
                if bar is not None:
                    bar.update()
        else:
            _run_pool(args, todo, results, bar)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0

    total = {"visual_tokens": 0, "labeled_tokens": 0, "words": 0, "words_used": 0, "words_dropped": {}}
    failed = []
    for i, job in enumerate(todo):
        status, s = results[i]
        if status != "ok":
            failed.append((job.image, s))
            continue
        for k in ("visual_tokens", "labeled_tokens", "words", "words_used"):
            total[k] += s[k]
        for r, n in s["words_dropped"].items():
            total["words_dropped"][r] = total["words_dropped"].get(r, 0) + n
    n_ok = len(todo) - len(failed)
    total["labeled_fraction"] = total["labeled_tokens"] / max(total["visual_tokens"], 1)
    print(_format_summary(f"{n_ok} images", total))
    if n_skipped:
        print(f"skipped {n_skipped} of {len(jobs)} images: their outputs exist (--force redoes them)")
    for p in (out, ov):
        if p is not None:
            print(f"wrote {n_ok} files to {p}")
    if not args.no_progress:
        rate = f" ({len(todo) / seconds:.2f} images/s)" if todo and seconds > 0 else ""
        print(f"labeling: {len(todo)} images in {seconds:.1f} s{rate}, --jobs {args.jobs}", file=sys.stderr)
    if failed:
        print(f"{args._parser.prog}: {len(failed)} of {len(jobs)} images failed (their outputs are not "
              "written; every other output is):", file=sys.stderr)
        for img, why in failed:
            print(f"  {img}: {why}", file=sys.stderr)
        return 1
    return 0


def _run_pool(args, todo: list[_Job], results: dict, bar, fn: Callable[[_Job], tuple[str, Any]] | None = None
              ) -> None:
    """Label ``todo`` in a pool of --jobs spawned processes (each loads the geometry and tokenizer once),
    at most _POOL_WINDOW images per worker in flight.

    A worker that dies (killed, out of memory, a crash in native code) breaks the pool: the images in
    flight become suspects and are retried one at a time in a fresh pool, so the one that kills its
    worker again fails ("worker process died") and the others are labeled; the rest go on."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    fn = fn or _label_job
    pending, suspects = deque(range(len(todo))), deque()
    strikes: dict[int, int] = {}
    fruitless = 0  # pools in a row that broke before labeling any image (workers dying at start-up?)
    labeled = [0]
    died = ("worker process died while labeling this image (killed, out of memory, or a crash in native "
            "code)")

    def finish(i: int, result: tuple[str, Any]) -> None:
        results[i] = result
        labeled[0] += result[0] == "ok"
        if bar is not None:
            bar.update()

    def settle(f, i: int) -> bool:
        """Record a finished future; True when it found the pool broken."""
        try:
            finish(i, f.result())
        except BrokenProcessPool:
            # in flight when a worker died: a suspect, retried alone; failed when it breaks a pool again
            strikes[i] = strikes.get(i, 0) + 1
            if strikes[i] >= 2:
                finish(i, ("failed", died))
            else:
                suspects.append(i)
            return True
        except Exception as e:  # noqa: BLE001 - e.g. a job that cannot be pickled
            finish(i, ("failed", f"{type(e).__name__}: {' '.join(str(e).split())}"))
        return False

    while pending or suspects:
        if fruitless >= 3:
            for i in (*suspects, *pending):
                finish(i, ("failed", "not labeled: 3 worker pools in a row died before labeling any image"))
            return
        labeled_before = labeled[0]
        ex = ProcessPoolExecutor(max_workers=min(args.jobs, len(pending) + len(suspects)),
                                 mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(_worker_options(args),))
        inflight: dict[Any, int] = {}
        broken = False
        try:
            while (pending or suspects or inflight) and not broken:
                while not broken:  # suspects run alone; the others fill the window
                    if suspects:
                        if inflight:
                            break
                        i = suspects.popleft()
                    elif pending and len(inflight) < _POOL_WINDOW * args.jobs:
                        i = pending.popleft()
                    else:
                        break
                    try:
                        inflight[ex.submit(fn, todo[i])] = i
                    except BrokenProcessPool:
                        (suspects if i in strikes else pending).appendleft(i)
                        broken = True
                if not inflight:
                    break
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for f in done:
                    broken |= settle(f, inflight.pop(f))
            if broken:  # the pool sets every future still in flight to BrokenProcessPool
                for f in wait(inflight).done:
                    settle(f, inflight.pop(f))
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        ex.shutdown(wait=not broken, cancel_futures=broken)
        fruitless = fruitless + 1 if broken and labeled[0] == labeled_before else 0


# -------------------------------------------------------------------------------------------- main

def _add_readout_args(p: argparse.ArgumentParser) -> None:  # the readout lives in dvsft_kernels/readout.py
    from dvsft_kernels.readout import add_readout_args

    add_readout_args(p)


def _run_readout(args) -> int:
    from dvsft_kernels.readout import run_readout

    return run_readout(args)


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[Any], int]]] = {
    "label": ("label the visual tokens of an image (or a directory of images) from OCR words",
              _add_label_args, _run_label),
    "readout": ("what a checkpoint reads at each visual token of a page (picture, JSON, accuracy)",
                _add_readout_args, _run_readout),
}


def build_parser() -> argparse.ArgumentParser:
    from dvsft_kernels import __version__

    parser = _Parser(prog="dvsft-kernels",
                     description="DV-SFT tools: visual-token labeling from OCR.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, add, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(_run=run, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage error) instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help / bad flags; report the status instead
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    try:
        return args._run(args)
    except UsageError as e:
        args._parser.report(str(e))
        return EXIT_USAGE
    except ModuleNotFoundError as e:  # an optional dependency (e.g. transformers without [hf])
        name = (e.name or "").split(".")[0]
        if name in ("", "dvsft_kernels"):  # a bug of ours, not a missing install
            raise
        print(f"{args._parser.prog}: error: {_missing_module(name)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
