"""OCR on the fly: an image -> ``list[OCRWord]``, cached by the image's content (docs/labeling.md).

``run_ocr(image, engine="tesseract")`` runs an OCR engine on a path or a PIL image and parses its output
with the readers of ``readers.py``:

``"tesseract"``  the ``tesseract`` binary (``tesseract IMG stdout [-l LANG] [--psm N] tsv``), or the
                 command ``pytesseract.pytesseract.tesseract_cmd`` names when the binary is not on PATH;
                 read by :func:`~dvsft_kernels.labeling.readers.parse_tesseract_tsv`.
``"paddleocr"``  ``paddleocr.PaddleOCR`` (3.x ``predict``, 2.x ``ocr``); text lines, split into words
                 unless ``split_lines=False``; read by ``parse_paddleocr``.
``"doctr"``      ``doctr.models.ocr_predictor(pretrained=True)``; read by ``parse_doctr``.

Results are cached by the image's content (sha256 of the pixel bytes, size and mode) plus the engine and
the options that change its output: in memory (an LRU of :data:`MEMORY_CACHE_SIZE` pages per process) and,
with ``cache_dir=``, on disk (one JSON file per page, written to a temporary file and renamed, so
parallel workers never read half a file). ``min_confidence`` filters after the cache, so changing it
does not rerun OCR.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dvsft_kernels.labeling.readers import parse_doctr, parse_paddleocr, parse_tesseract_tsv
from dvsft_kernels.labeling.types import OCRWord

__all__ = [
    "ENGINES",
    "MEMORY_CACHE_SIZE",
    "ImageError",
    "OCREngineMissing",
    "OCRFailed",
    "check_engine",
    "clear_ocr_cache",
    "load_image",
    "ocr_cache_key",
    "run_ocr",
]

log = logging.getLogger(__name__)

ENGINES = ("tesseract", "paddleocr", "doctr")
INSTALL = {
    "tesseract": "apt-get install tesseract-ocr tesseract-ocr-eng (or brew install tesseract)",
    "paddleocr": "pip install paddleocr paddlepaddle",
    "doctr": "pip install python-doctr[torch]",
}
MEMORY_CACHE_SIZE = 4096
_CACHE_VERSION = 1  # bump when the cached word format or a parser's output changes


class OCREngineMissing(ValueError):
    """The engine asked for is not installed; the message names the install command."""


class OCRFailed(RuntimeError):
    """The engine ran on a readable image and failed (non-zero exit, crash, time-out)."""


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is one of ``missing_file``, ``unreadable_image``,
    ``decompression_bomb``."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------------------------- images


def load_image(image: Any, name: str = "image"):
    """A decoded PIL image from a path or a PIL image (loaded now, so a truncated file fails here).

    Raises :class:`ImageError` (a ValueError starting with ``name``) for a missing file, a file Pillow
    cannot decode or that is truncated, or one over Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, which Pillow refuses at twice the value)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{name}: {path}: no such file", "missing_file")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: {path}: over Pillow's decompression-bomb limit ({e})",
                             "decompression_bomb") from None
        except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
            raise ImageError(f"{name}: {path}: not a readable image ({e})", "unreadable_image") from None
    if isinstance(image, Image.Image):
        try:
            image.load()
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: over Pillow's decompression-bomb limit ({e})",
                             "decompression_bomb") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: not a readable image ({e})", "unreadable_image") from None
        return image
    raise ValueError(f"{name}: expected a path or a PIL image, got {type(image).__name__}")


def _for_engine(img):
    """RGB or L image for an engine: transparency composed over white (a transparent page would
    otherwise read as black), other modes converted to RGB."""
    from PIL import Image

    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        page = Image.new("RGB", rgba.size, "white")
        page.paste(rgba, mask=rgba.getchannel("A"))
        return page
    return img.convert("RGB")


def _digest(img) -> str:
    h = hashlib.sha256()
    h.update(f"{img.mode}|{img.size[0]}x{img.size[1]}|".encode())
    if img.mode in ("P", "PA"):  # the bytes are palette indices: the palette is part of the picture
        h.update(bytes(img.getpalette() or []))
        h.update(repr(img.info.get("transparency")).encode())
    h.update(img.tobytes())
    return h.hexdigest()


def ocr_cache_key(image: Any, engine: str = "tesseract", **options) -> str:
    """The cache key :func:`run_ocr` uses: sha256 of the pixels, size and mode, the engine and the
    options that change the engine's output."""
    return _key(_digest(load_image(image)), engine, engine_options(engine, options))


def _key(digest: str, engine: str, options: Mapping[str, Any]) -> str:
    blob = json.dumps({"v": _CACHE_VERSION, "image": digest, "engine": engine, "options": options},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# -------------------------------------------------------------------------------------------- cache

_MEMO: OrderedDict[str, tuple[OCRWord, ...]] = OrderedDict()
_MEMO_LOCK = threading.Lock()


def clear_ocr_cache() -> None:
    """Forget the OCR results kept in memory (files under a ``cache_dir`` stay)."""
    with _MEMO_LOCK:
        _MEMO.clear()


def _memo_get(key: str):
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
        if hit is not None:
            _MEMO.move_to_end(key)
        return hit


def _memo_put(key: str, words: tuple[OCRWord, ...]) -> None:
    with _MEMO_LOCK:
        _MEMO[key] = words
        _MEMO.move_to_end(key)
        while len(_MEMO) > MEMORY_CACHE_SIZE:
            _MEMO.popitem(last=False)


def _disk_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.json"


def _disk_get(cache_dir: Path, key: str):
    p = _disk_path(cache_dir, key)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        return tuple(OCRWord(w["text"], tuple(w["box"]) if not isinstance(w["box"][0], list)
                             else tuple(tuple(q) for q in w["box"]), float(w["score"]))
                     for w in data["words"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("OCR cache file %s is unreadable (%s); running OCR again", p, e)
        return None


def _disk_put(cache_dir: Path, key: str, words: tuple[OCRWord, ...]) -> None:
    p = _disk_path(cache_dir, key)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {"words": [{"text": w.text, "box": [list(q) if isinstance(q, (list, tuple)) else q
                                               for q in w.box], "score": w.score} for w in words]}
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        os.replace(tmp, p)  # atomic: readers see the old file, or none, or the whole new one
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ------------------------------------------------------------------------------------------ engines


def _tesseract_cmd() -> str | None:
    cmd = shutil.which("tesseract")
    if cmd:
        return cmd
    try:
        import pytesseract  # optional: only for the command it is configured with
    except ImportError:
        return None
    return shutil.which(str(getattr(pytesseract.pytesseract, "tesseract_cmd", "tesseract")))


_LANGS: dict[str, frozenset[str]] = {}


def _tesseract_langs(cmd: str) -> frozenset[str]:
    if cmd not in _LANGS:
        r = subprocess.run([cmd, "--list-langs"], capture_output=True, text=True, timeout=60, check=False)
        lines = (r.stdout or r.stderr).splitlines()
        _LANGS[cmd] = frozenset(x.strip() for x in lines[1:] if x.strip())
    return _LANGS[cmd]


def engine_options(engine: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``engine`` that change its output (the cache key's part), validated."""
    lang = options.get("lang", "eng")
    if not isinstance(lang, str) or not lang:
        raise ValueError(f"lang: expected a language code such as 'eng', got {lang!r}")
    if engine == "tesseract":
        psm = options.get("psm")
        if psm is not None and (isinstance(psm, bool) or not isinstance(psm, int) or not 0 <= psm <= 13):
            raise ValueError(f"psm: expected None or a Tesseract page segmentation mode 0..13, got {psm!r}")
        return {"lang": lang, "psm": psm}
    if engine == "paddleocr":
        split = options.get("split_lines", True)
        if not isinstance(split, bool):
            raise ValueError(f"split_lines: expected True or False, got {split!r}")
        return {"lang": lang, "split_lines": split}
    return {"lang": lang}


def check_engine(engine: Any) -> str:
    """``engine`` if it is known and installed, else a ValueError naming it (:class:`OCREngineMissing`,
    with the install command, when it is known but not installed)."""
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ValueError(f"engine: unknown OCR engine {engine!r}; known engines: {', '.join(ENGINES)}")
    if engine == "tesseract":
        if _tesseract_cmd() is None:
            raise OCREngineMissing(f"engine: 'tesseract' needs the tesseract binary on PATH, which is "
                                   f"missing; install it: {INSTALL['tesseract']}")
    else:
        import importlib.util

        module = "paddleocr" if engine == "paddleocr" else "doctr"
        if importlib.util.find_spec(module) is None:
            raise OCREngineMissing(f"engine: {engine!r} is not installed; install it: {INSTALL[engine]}")
    return engine


def _run_tesseract(img, opts: Mapping[str, Any], timeout: float) -> list[OCRWord]:
    cmd = _tesseract_cmd()
    langs = _tesseract_langs(cmd)
    missing = [x for x in opts["lang"].split("+") if langs and x not in langs]
    if missing:
        raise ValueError(f"lang: {'+'.join(missing)!r} is not installed for tesseract (installed: "
                         f"{', '.join(sorted(langs))}); e.g. apt-get install tesseract-ocr-{missing[0]}")
    env = dict(os.environ)
    env.setdefault("OMP_THREAD_LIMIT", "1")  # one thread per page: parallel workers do not oversubscribe
    with tempfile.TemporaryDirectory(prefix="dvsft-ocr-") as d:
        src = os.path.join(d, "page.png")
        img.save(src, format="PNG")
        args = [cmd, src, "stdout", "-l", opts["lang"]]
        if opts["psm"] is not None:
            args += ["--psm", str(opts["psm"])]
        args.append("tsv")
        try:
            r = subprocess.run(args, capture_output=True, timeout=timeout, check=False, env=env)
        except subprocess.TimeoutExpired:
            raise OCRFailed(f"tesseract did not finish within {timeout} s") from None
    if r.returncode != 0:
        err = r.stderr.decode("utf-8", "replace").strip()
        raise OCRFailed(f"tesseract exited with status {r.returncode}: {err[-500:]}")
    return parse_tesseract_tsv(r.stdout.decode("utf-8", "replace"), source="tesseract output")


_MODELS: dict[tuple, Any] = {}


def _run_paddleocr(img, opts: Mapping[str, Any]) -> list[OCRWord]:
    import numpy as np
    from paddleocr import PaddleOCR

    lang = {"eng": "en", "chi_sim": "ch", "fra": "fr", "deu": "german", "jpn": "japan",
            "kor": "korean"}.get(opts["lang"], opts["lang"])
    key = ("paddleocr", lang)
    if key not in _MODELS:
        _MODELS[key] = PaddleOCR(lang=lang)
    model, arr = _MODELS[key], np.asarray(img.convert("RGB"))
    result = model.predict(arr) if hasattr(model, "predict") else model.ocr(arr)
    return parse_paddleocr(result, split_lines=opts["split_lines"], source="paddleocr result")


def _run_doctr(img, opts: Mapping[str, Any]) -> list[OCRWord]:
    import numpy as np
    from doctr.models import ocr_predictor

    key = ("doctr", opts["lang"])
    if key not in _MODELS:
        _MODELS[key] = ocr_predictor(pretrained=True)
    doc = _MODELS[key]([np.asarray(img.convert("RGB"))])
    return parse_doctr(doc.export(), image_size=(img.height, img.width), source="doctr result")


# --------------------------------------------------------------------------------------------- API


def run_ocr(
    image: Any,
    engine: str = "tesseract",
    *,
    lang: str = "eng",
    cache: bool = True,
    min_confidence: float = 0.0,
    cache_dir: str | os.PathLike | None = None,
    psm: int | None = None,
    split_lines: bool = True,
    timeout: float = 300.0,
) -> list[OCRWord]:
    """The words of one image, read by an OCR engine, in original-image pixels.

    Args:
        image: a path or a PIL image.
        engine: ``"tesseract"``, ``"paddleocr"`` or ``"doctr"`` (:data:`ENGINES`).
        lang: the language, Tesseract style (``"eng"``, ``"deu+eng"``); mapped for PaddleOCR.
        cache: reuse an earlier result for the same pixels, engine and options (in memory, and under
            ``cache_dir`` when given); ``False`` always runs the engine (and stores nothing).
        min_confidence: drop words whose score (normalised to [0, 1]) is below it; applied after the
            cache. The default keeps every word (pass ``min_score`` to the labeler to count drops).
        cache_dir: a directory for on-disk results, shared safely by parallel workers.
        psm: Tesseract ``--psm`` (page segmentation mode), None for Tesseract's default.
        split_lines: PaddleOCR only: split its text lines into words.
        timeout: seconds one Tesseract run may take.

    Raises:
        ValueError naming the argument for bad input (:class:`ImageError` for a missing, unreadable or
        oversized image; :class:`OCREngineMissing` when the engine is not installed);
        :class:`OCRFailed` when the engine itself fails on a readable image.
    """
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) or not (
            0.0 <= min_confidence <= 1.0):
        raise ValueError(f"min_confidence: expected a number in [0, 1], got {min_confidence!r}")
    if not isinstance(cache, bool):
        raise ValueError(f"cache: expected True or False, got {cache!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    engine = check_engine(engine)
    opts = engine_options(engine, {"lang": lang, "psm": psm, "split_lines": split_lines})
    if cache_dir is not None:
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise ValueError(f"cache_dir: expected a directory path, got {type(cache_dir).__name__}")
        cache_dir = Path(cache_dir)
        if cache_dir.exists() and not cache_dir.is_dir():
            raise ValueError(f"cache_dir: {cache_dir} is not a directory")
    img = load_image(image)

    words = None
    key = None
    if cache:
        key = _key(_digest(img), engine, opts)
        words = _memo_get(key)
        if words is not None and cache_dir is not None and not _disk_path(cache_dir, key).exists():
            _disk_put(cache_dir, key, words)  # read earlier without cache_dir: share it now
        elif words is None and cache_dir is not None:
            words = _disk_get(cache_dir, key)
            if words is not None:
                _memo_put(key, words)
    if words is None:
        page = _for_engine(img)
        if engine == "tesseract":
            got = _run_tesseract(page, opts, float(timeout))
        elif engine == "paddleocr":
            got = _run_paddleocr(page, opts)
        else:
            got = _run_doctr(page, opts)
        words = tuple(got)
        if cache:
            _memo_put(key, words)
            if cache_dir is not None:
                _disk_put(cache_dir, key, words)
    return [w for w in words if w.score >= min_confidence]
