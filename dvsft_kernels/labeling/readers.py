"""OCR readers: engine output -> ``list[OCRWord]`` in original-image pixels.

Every reader returns the words of one page (image) with ``score`` normalised to [0, 1] and drops words
whose score is below ``min_score``. Words with empty text are skipped. Boxes are (x0, y0, x1, y1)
tuples, or 4 (x, y) points where the engine reports quadrilaterals (PaddleOCR, rotated docTR pages).

Formats (``read_ocr(path, format=...)``):

``"tesseract"``  ``tesseract IMG OUT tsv`` / ``pytesseract.image_to_data`` TSV (or its ``Output.DICT``):
                 level-5 rows are words, ``conf`` is 0..100, rows with ``conf == -1`` are skipped.
``"hocr"``       ``<span class="ocrx_word" title="bbox x0 y0 x1 y1; x_wconf N">`` (N in 0..100; a word
                 without ``x_wconf`` gets score 1.0).
``"paddleocr"``  PaddleOCR 2.x ``ocr.ocr(img)`` (``[[ [[x, y] x4], [text, score] ], ...]`` per page), or
                 PaddleOCR 3.x ``predict`` results / ``save_to_json`` files (``rec_texts``, ``rec_scores``
                 and ``rec_polys`` or ``rec_boxes``, optionally under ``"res"``). These are text *lines*;
                 ``split_lines=True`` splits each into words (see :func:`split_line`).
``"doctr"``      docTR ``Document.export()``: ``pages -> blocks -> lines -> words`` with ``value``,
                 ``confidence`` and relative ``geometry`` scaled by the page ``dimensions`` (H, W) or by
                 ``image_size`` when given.
``"json"``       a JSON list (or ``{"words": [...]}``) or JSONL of ``{"text", "box"[, "score"]}`` in pixels;
                 ``score`` defaults to 1.0 and must lie in [0, 1].

Multi-page sources: ``page`` picks one (0-based); with ``page=None`` a source must hold exactly one page.
Malformed input raises ``ValueError`` naming the source and the line or field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from dvsft_kernels.labeling.types import OCRWord

__all__ = [
    "FORMATS",
    "FORMAT_ALIASES",
    "detect_format",
    "parse_doctr",
    "parse_hocr",
    "parse_paddleocr",
    "parse_tesseract_tsv",
    "parse_words_json",
    "read_ocr",
    "split_line",
]

FORMATS = ("tesseract", "hocr", "paddleocr", "doctr", "json")
FORMAT_ALIASES = {"tsv": "tesseract", "paddle": "paddleocr", "jsonl": "json", "words": "json"}
# docTR geometry is relative; allow a little slack for boxes the detector lets spill past the page.
_REL_SLACK = 0.05


# ----------------------------------------------------------------------------------------- helpers


def _check_min_score(min_score: float) -> float:
    try:
        ms = float(min_score)
    except (TypeError, ValueError):
        raise ValueError(f"min_score must be a number in [0, 1], got {min_score!r}") from None
    if not 0.0 <= ms <= 1.0:
        raise ValueError(f"min_score must be in [0, 1], got {min_score!r}")
    return ms


def _num(x: Any, where: str) -> float:
    if isinstance(x, bool):
        raise ValueError(f"{where}: expected a number, got {x!r}")
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {x!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: expected a finite number, got {x!r}")
    return v


def _tolist(x: Any) -> Any:
    # numpy arrays (PaddleOCR 3.x results in memory) -> nested lists, without importing numpy here.
    return x.tolist() if hasattr(x, "tolist") and not isinstance(x, (str, bytes)) else x


def _box(raw: Any, where: str) -> tuple:
    """(x0, y0, x1, y1) or 4 (x, y) points -> validated tuple of floats."""
    raw = _tolist(raw)
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"{where}: expected a box [x0, y0, x1, y1] or 4 [x, y] points, got {raw!r}")
    if len(raw) == 4 and all(isinstance(_tolist(p), (list, tuple)) for p in raw):
        pts = []
        for i, p in enumerate(raw):
            p = _tolist(p)
            if len(p) != 2:
                raise ValueError(f"{where}[{i}]: expected an [x, y] point, got {p!r}")
            pts.append((_num(p[0], f"{where}[{i}][0]"), _num(p[1], f"{where}[{i}][1]")))
        return tuple(pts)
    if len(raw) != 4:
        raise ValueError(f"{where}: expected a box [x0, y0, x1, y1] or 4 [x, y] points, got {raw!r}")
    x0, y0, x1, y1 = (_num(v, f"{where}[{i}]") for i, v in enumerate(raw))
    if x1 < x0 or y1 < y0:
        raise ValueError(f"{where}: box {list(raw)} has x1 < x0 or y1 < y0")
    return (x0, y0, x1, y1)


def _score(raw: Any, where: str, scale: float = 1.0) -> float:
    s = _num(raw, where) / scale
    if not -1e-6 <= s <= 1.0 + 1e-6:
        hi = "100" if scale == 100.0 else "1"
        raise ValueError(f"{where}: score {raw!r} is outside [0, {hi}]")
    return min(max(s, 0.0), 1.0)


def _page_index(pages: Sequence[Any], page: int | None, source: str) -> int | None:
    """Index of the requested page; None for a source with no pages at all."""
    if page is None:
        if len(pages) > 1:
            raise ValueError(f"{source}: holds {len(pages)} pages; pass page=<0-based index> to pick one")
        return 0 if pages else None
    if isinstance(page, bool) or not isinstance(page, int) or not 0 <= page < max(len(pages), 1):
        raise ValueError(f"page={page!r} is out of range: {source} holds {len(pages)} page(s)")
    return page if pages else None


def _pick_page(pages: Sequence[Any], page: int | None, source: str) -> Any:
    i = _page_index(pages, page, source)
    return None if i is None else pages[i]


def _keep(words: Iterable[OCRWord], min_score: float) -> list[OCRWord]:
    return [w for w in words if w.text and w.score >= min_score]


def _json_loads(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None


def split_line(text: str, box: Sequence, score: float = 1.0) -> list[OCRWord]:
    """Split a text line into words, giving each word the slice of the line box proportional to its
    character span (every character, spaces included, takes the same width).

    Exact for monospaced text and a fair estimate otherwise; the box may be axis-aligned or 4 points
    (top-left, top-right, bottom-right, bottom-left, as PaddleOCR orders them), in which case the
    words' quadrilaterals follow the line's slant."""
    n = len(text)
    if len(box) == 4 and isinstance(box[0], (list, tuple)):
        box = tuple((float(p[0]), float(p[1])) for p in box)
    else:
        box = tuple(float(v) for v in box)
    words, i = [], 0
    for part in text.split(" "):
        j = i + len(part)
        if part:
            t0, t1 = i / n, j / n
            if len(box) == 4 and isinstance(box[0], (list, tuple)):
                (ax, ay), (bx, by), (cx, cy), (dx, dy) = box

                def lerp(p, q, t):
                    return (p[0] + (q[0] - p[0]) * t, p[1] + (q[1] - p[1]) * t)

                sub = (lerp((ax, ay), (bx, by), t0), lerp((ax, ay), (bx, by), t1),
                       lerp((dx, dy), (cx, cy), t1), lerp((dx, dy), (cx, cy), t0))
            else:
                x0, y0, x1, y1 = box
                sub = (x0 + (x1 - x0) * t0, y0, x0 + (x1 - x0) * t1, y1)
            words.append(OCRWord(part, sub, score))
        i = j + 1
    return words


# --------------------------------------------------------------------------------------- tesseract


_TSV_COLUMNS = ("level", "page_num", "left", "top", "width", "height", "conf", "text")


def parse_tesseract_tsv(data: str | Mapping[str, Sequence], *, min_score: float = 0.0,
                        page: int | None = None, source: str = "<tesseract tsv>") -> list[OCRWord]:
    """Words from Tesseract ``image_to_data`` output: the TSV text, or pytesseract's ``Output.DICT``."""
    min_score = _check_min_score(min_score)
    if isinstance(data, Mapping):
        missing = [c for c in _TSV_COLUMNS if c not in data]
        if missing:
            raise ValueError(f"{source}: image_to_data dict lacks column(s) {missing}")
        n = len(data["level"])
        rows = [(f"row {i}", {c: data[c][i] for c in _TSV_COLUMNS}) for i in range(n)]
    else:
        lines = data.splitlines()
        while lines and not lines[0].strip():
            lines.pop(0)
        if not lines:
            return []
        header = lines[0].rstrip("\r").split("\t")
        missing = [c for c in _TSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{source}: line 1: TSV header lacks column(s) {missing} "
                             f"(expected Tesseract image_to_data output)")
        rows = []
        for ln, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            # text is the last column and may be empty (trailing tab stripped by some writers)
            cells = line.rstrip("\r\n").split("\t", len(header) - 1)
            if len(cells) == len(header) - 1 and header[-1] == "text":
                cells.append("")
            if len(cells) != len(header):
                raise ValueError(f"{source}: line {ln}: expected {len(header)} tab-separated columns, "
                                 f"got {len(cells)}")
            rows.append((f"line {ln}", dict(zip(header, cells))))

    by_page: dict[int, list[OCRWord]] = {}
    for where, row in rows:
        try:
            level = int(str(row["level"]).strip())
            page_num = int(str(row["page_num"]).strip())
        except ValueError:
            raise ValueError(f"{source}: {where}: level/page_num must be integers, got "
                             f"{row['level']!r}/{row['page_num']!r}") from None
        by_page.setdefault(page_num, [])
        if level != 5:
            continue
        conf = _num(row["conf"], f"{source}: {where}: conf")
        if conf == -1:
            continue
        text = str(row["text"]).strip()
        left, top, width, height = (_num(row[c], f"{source}: {where}: {c}")
                                    for c in ("left", "top", "width", "height"))
        if width < 0 or height < 0:
            raise ValueError(f"{source}: {where}: negative width/height ({width}, {height})")
        score = _score(conf, f"{source}: {where}: conf", scale=100.0)
        by_page[page_num].append(OCRWord(text, (left, top, left + width, top + height), score))
    pages = [by_page[k] for k in sorted(by_page)]
    return _keep(_pick_page(pages, page, source) or [], min_score)


# -------------------------------------------------------------------------------------------- hOCR


class _HOCRParser(HTMLParser):
    def __init__(self, source: str):
        super().__init__(convert_charrefs=True)
        self.source = source
        self.pages: list[list[tuple[str, str, int]]] = []  # per page: (text, title, line)
        self._word: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if "ocr_page" in classes:
            self.pages.append([])
        if self._word is not None:
            if tag == self._word["tag"]:
                self._word["depth"] += 1
            if "ocrx_word" in classes:
                raise ValueError(f"{self.source}: line {self.getpos()[0]}: ocrx_word nested in the "
                                 f"ocrx_word opened at line {self._word['line']}")
            return
        if "ocrx_word" in classes:
            self._word = {"tag": tag, "depth": 1, "title": a.get("title") or "",
                          "line": self.getpos()[0], "text": []}

    def handle_startendtag(self, tag, attrs):
        # <br/> and friends inside a word add nothing; a self-closed ocr_page is an empty page and
        # a self-closed ocrx_word an empty word (skipped later).
        classes = (dict(attrs).get("class") or "").split()
        if self._word is None and "ocr_page" in classes:
            self.pages.append([])
        elif self._word is None and "ocrx_word" in classes:
            self._add("", dict(attrs).get("title") or "", self.getpos()[0])

    def handle_endtag(self, tag):
        if self._word is not None and tag == self._word["tag"]:
            self._word["depth"] -= 1
            if self._word["depth"] == 0:
                w, self._word = self._word, None
                self._add("".join(w["text"]), w["title"], w["line"])

    def handle_data(self, data):
        if self._word is not None:
            self._word["text"].append(data)

    def _add(self, text, title, line):
        if not self.pages:
            self.pages.append([])  # words outside any ocr_page: one implicit page
        self.pages[-1].append((text, title, line))


def _hocr_props(title: str) -> dict[str, list[str]]:
    props = {}
    for part in title.split(";"):
        fields = part.split()
        if fields:
            props[fields[0]] = fields[1:]
    return props


def parse_hocr(text: str, *, min_score: float = 0.0, page: int | None = None,
               source: str = "<hocr>") -> list[OCRWord]:
    """Words from hOCR (Tesseract ``hocr`` output and other engines writing ``ocrx_word`` spans)."""
    min_score = _check_min_score(min_score)
    p = _HOCRParser(source)
    p.feed(text)
    p.close()
    if p._word is not None:
        raise ValueError(f"{source}: line {p._word['line']}: ocrx_word is never closed")
    words = []
    for text_, title, line in _pick_page(p.pages, page, source) or []:
        where = f"{source}: line {line}: ocrx_word title"
        props = _hocr_props(title)
        if "bbox" not in props:
            raise ValueError(f"{where} {title!r} has no bbox")
        if len(props["bbox"]) != 4:
            raise ValueError(f"{where}: bbox needs 4 numbers, got {props['bbox']}")
        box = _box(props["bbox"], f"{where} bbox")
        score = 1.0
        if "x_wconf" in props:
            if len(props["x_wconf"]) != 1:
                raise ValueError(f"{where}: x_wconf needs 1 number, got {props['x_wconf']}")
            score = _score(props["x_wconf"][0], f"{where} x_wconf", scale=100.0)
        words.append(OCRWord(text_.strip(), box, score))
    return _keep(words, min_score)


# --------------------------------------------------------------------------------------- PaddleOCR


def _is_point(p) -> bool:
    p = _tolist(p)
    return isinstance(p, (list, tuple)) and len(p) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)


def _is_classic_line(x) -> bool:
    # [ [[x, y] x4], [text, score] ]
    x = _tolist(x)
    return (isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(_tolist(x[0]), (list, tuple))
            and len(_tolist(x[0])) == 4 and all(_is_point(p) for p in _tolist(x[0]))
            and isinstance(x[1], (list, tuple)) and len(x[1]) == 2 and isinstance(x[1][0], str))


def _is_v3_page(x) -> bool:
    return isinstance(x, Mapping) and ("rec_texts" in x or (isinstance(x.get("res"), Mapping)
                                                             and "rec_texts" in x["res"]))


def _paddle_pages(data: Any, source: str) -> list[tuple[str, Any]]:
    """Normalise the accepted PaddleOCR shapes to [(field path, page)]."""
    data = _tolist(data)
    if _is_v3_page(data):
        return [("", data)]
    if isinstance(data, (list, tuple)):
        if not data:
            return [("", [])]
        if all(_is_v3_page(p) for p in data):
            return [(f"[{i}]", p) for i, p in enumerate(data)]
        if all(_is_classic_line(x) for x in data):  # one page saved as result[0]
            return [("", data)]
        # result of ocr.ocr(): one entry per page; an empty page is None (2.x) or []
        if all(p is None or (isinstance(p, (list, tuple)) and all(_is_classic_line(x) for x in p))
               for p in data):
            return [(f"[{i}]", p or []) for i, p in enumerate(data)]
        for i, p in enumerate(data):  # name the first entry that is neither shape
            if p is None or _is_v3_page(p) or _is_classic_line(p):
                continue
            if isinstance(p, (list, tuple)):
                for j, x in enumerate(p):
                    if not _is_classic_line(x):
                        raise ValueError(f"{source}: [{i}][{j}]: expected a PaddleOCR line "
                                         f"[[[x, y] x4], [text, score]], got {str(x)[:80]}")
            raise ValueError(f"{source}: [{i}]: expected a PaddleOCR page or line, got {str(p)[:80]}")
    raise ValueError(f"{source}: not a PaddleOCR result (expected a list of pages of "
                     f"[[[x, y] x4], [text, score]] lines, or a dict with rec_texts)")


def parse_paddleocr(data: Any, *, min_score: float = 0.0, page: int | None = None,
                    split_lines: bool = False, source: str = "<paddleocr>") -> list[OCRWord]:
    """Words (text lines, unless ``split_lines``) from a PaddleOCR result: JSON text or the Python
    object returned by ``PaddleOCR.ocr`` (2.x) / ``PaddleOCR.predict`` (3.x, dicts or result objects
    whose ``.json`` is such a dict)."""
    min_score = _check_min_score(min_score)
    if isinstance(data, str):
        data = _json_loads(data, source)
    if isinstance(data, (list, tuple)):
        data = [getattr(p, "json", p) if not isinstance(p, (list, tuple, Mapping)) else p for p in data]
    pages = _paddle_pages(data, source)
    prefix, pg = _pick_page(pages, page, source) or ("", [])
    words: list[OCRWord] = []
    if isinstance(pg, Mapping):
        if isinstance(pg.get("res"), Mapping) and "rec_texts" in pg["res"]:
            pg, prefix = pg["res"], prefix + ".res"
        texts = _tolist(pg["rec_texts"])
        scores = _tolist(pg.get("rec_scores"))
        key = "rec_polys" if pg.get("rec_polys") is not None else "rec_boxes"
        boxes = _tolist(pg.get(key))
        if scores is None or boxes is None:
            raise ValueError(f"{source}: {prefix or 'result'}: rec_texts needs rec_scores and "
                             f"rec_polys or rec_boxes")
        if not (len(texts) == len(scores) == len(boxes)):
            raise ValueError(f"{source}: {prefix}.rec_texts/rec_scores/{key}: lengths differ "
                             f"({len(texts)}, {len(scores)}, {len(boxes)})")
        for i, (t, s, b) in enumerate(zip(texts, scores, boxes)):
            if not isinstance(t, str):
                raise ValueError(f"{source}: {prefix}.rec_texts[{i}]: expected a string, got {t!r}")
            words.append(OCRWord(t.strip(), _box(b, f"{source}: {prefix}.{key}[{i}]"),
                                 _score(s, f"{source}: {prefix}.rec_scores[{i}]")))
    else:
        for i, (poly, (t, s)) in enumerate(_tolist(x) for x in pg):
            words.append(OCRWord(t.strip(), _box(poly, f"{source}: {prefix}[{i}][0]"),
                                 _score(s, f"{source}: {prefix}[{i}][1][1]")))
    if split_lines:
        words = [sw for w in words for sw in split_line(w.text, w.box, w.score)]
    return _keep(words, min_score)


# -------------------------------------------------------------------------------------------- docTR


def _rel_geometry(geom: Any, h: float, w: float, where: str) -> tuple:
    geom = _tolist(geom)
    if not isinstance(geom, (list, tuple)) or len(geom) not in (2, 4):
        raise ValueError(f"{where}: expected ((x0, y0), (x1, y1)) or 4 (x, y) points, got {geom!r}")
    pts = []
    for i, p in enumerate(geom):
        p = _tolist(p)
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise ValueError(f"{where}[{i}]: expected an (x, y) pair, got {p!r}")
        x, y = _num(p[0], f"{where}[{i}][0]"), _num(p[1], f"{where}[{i}][1]")
        if not (-_REL_SLACK <= x <= 1 + _REL_SLACK and -_REL_SLACK <= y <= 1 + _REL_SLACK):
            raise ValueError(f"{where}[{i}]: ({x}, {y}) is not a relative coordinate in [0, 1] "
                             f"(docTR exports geometry relative to the page size)")
        pts.append((x * w, y * h))
    if len(pts) == 2:
        (x0, y0), (x1, y1) = pts
        if x1 < x0 or y1 < y0:
            raise ValueError(f"{where}: (xmax, ymax) < (xmin, ymin)")
        return (x0, y0, x1, y1)
    return tuple(pts)


def parse_doctr(data: Any, *, min_score: float = 0.0, page: int | None = None,
                image_size: tuple[int, int] | None = None, source: str = "<doctr>") -> list[OCRWord]:
    """Words from a docTR ``Document.export()`` dict (or its JSON text). Relative geometry is scaled by
    ``image_size`` (H, W) when given, else by the page's ``dimensions`` (H, W)."""
    min_score = _check_min_score(min_score)
    if isinstance(data, str):
        data = _json_loads(data, source)
    if not isinstance(data, Mapping) or not isinstance(data.get("pages"), list):
        raise ValueError(f"{source}: not a docTR export (expected a dict with a 'pages' list)")
    pages = data["pages"]
    pi = _page_index(pages, page, source)
    if pi is None:
        return []
    pg = pages[pi]
    where = f"{source}: pages[{pi}]"
    if not isinstance(pg, Mapping):
        raise ValueError(f"{where}: expected a page object, got {str(pg)[:80]}")
    if image_size is not None:
        h, w = _image_size(image_size)
    elif pg.get("dimensions") is not None:
        dims = _tolist(pg["dimensions"])
        if not isinstance(dims, (list, tuple)) or len(dims) != 2:
            raise ValueError(f"{where}.dimensions: expected (H, W), got {dims!r}")
        h, w = _num(dims[0], f"{where}.dimensions[0]"), _num(dims[1], f"{where}.dimensions[1]")
    else:
        raise ValueError(f"{where}: no 'dimensions'; pass image_size=(H, W) to scale relative geometry")
    words = []
    for bi, block in enumerate(_field(pg, "blocks", list, where)):
        bw = f"{where}.blocks[{bi}]"
        for li, line in enumerate(_field(block, "lines", list, bw)):
            lw = f"{bw}.lines[{li}]"
            for wi, word in enumerate(_field(line, "words", list, lw)):
                ww = f"{lw}.words[{wi}]"
                value = _field(word, "value", str, ww)
                conf = _score(_field(word, "confidence", None, ww), f"{ww}.confidence")
                box = _rel_geometry(_field(word, "geometry", None, ww), h, w, f"{ww}.geometry")
                words.append(OCRWord(value.strip(), box, conf))
    return _keep(words, min_score)


def _field(obj: Any, key: str, typ, where: str):
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected an object, got {str(obj)[:80]}")
    if key not in obj:
        raise ValueError(f"{where}: missing field '{key}'")
    v = obj[key]
    if typ is not None and not isinstance(v, typ):
        raise ValueError(f"{where}.{key}: expected {typ.__name__}, got {type(v).__name__}")
    return v


def _image_size(image_size) -> tuple[float, float]:
    try:
        h, w = image_size
        h, w = float(h), float(w)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (H, W), got {image_size!r}") from None
    if not (h > 0 and w > 0 and math.isfinite(h) and math.isfinite(w)):
        raise ValueError(f"image_size must be positive (H, W), got {image_size!r}")
    return h, w


# ------------------------------------------------------------------------------------- plain JSON


def _plain_word(obj: Any, where: str) -> OCRWord:
    text = _field(obj, "text", str, where)
    box = _box(_field(obj, "box", None, where), f"{where}.box")
    score = _score(obj["score"], f"{where}.score") if obj.get("score") is not None else 1.0
    return OCRWord(text.strip(), box, score)


def parse_words_json(text: str, *, min_score: float = 0.0, source: str = "<words json>") -> list[OCRWord]:
    """Words from a JSON list (or ``{"words": [...]}``) or JSONL of ``{"text", "box"[, "score"]}``."""
    min_score = _check_min_score(min_score)
    stripped = text.lstrip()
    try:
        data = json.loads(text) if stripped else []
    except json.JSONDecodeError:
        data = None
    if isinstance(data, Mapping) and "words" not in data and "text" in data:
        data = [data]  # a single word object
    if data is None:
        # not one JSON document: JSONL, one word object per line
        words = []
        for ln, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}: line {ln} column {e.colno}: invalid JSON ({e.msg})") from None
            words.append(_plain_word(obj, f"{source}: line {ln}"))
        return _keep(words, min_score)
    items = data["words"] if isinstance(data, Mapping) and "words" in data else data
    where = f"{source}: words" if isinstance(data, Mapping) else f"{source}: "
    if not isinstance(items, list):
        raise ValueError(f"{source}: expected a list (or {{\"words\": [...]}}) of "
                         f"{{text, box[, score]}} objects, got {type(items).__name__}")
    return _keep([_plain_word(o, f"{where}[{i}]") for i, o in enumerate(items)], min_score)


# ------------------------------------------------------------------------------------------ dispatch


def detect_format(path: str | os.PathLike, text: str | None = None) -> str:
    """Guess the format of an OCR file from its extension and content (one of :data:`FORMATS`)."""
    p = Path(path)
    if text is None:
        text = p.read_text(encoding="utf-8")
    ext = p.suffix.lower()
    head = text.lstrip()[:4096]
    if ext == ".tsv" or head.startswith("level\tpage_num"):
        return "tesseract"
    if ext in (".hocr", ".html", ".htm", ".xhtml", ".xml") or "ocrx_word" in head or head.startswith("<"):
        return "hocr"
    if ext == ".jsonl":
        return "json"
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        first = head.splitlines()[0] if head else ""
        try:  # JSONL with a .json (or any) extension
            json.loads(first)
            return "json"
        except json.JSONDecodeError:
            raise ValueError(f"{p}: cannot detect the OCR format (not TSV, hOCR or JSON); "
                             f"pass format= one of {FORMATS}") from None
    if isinstance(data, Mapping):
        if isinstance(data.get("pages"), list):
            return "doctr"
        if _is_v3_page(data):
            return "paddleocr"
        if "words" in data or "text" in data:
            return "json"
    if isinstance(data, list):
        if not data or all(isinstance(x, Mapping) and "text" in x for x in data):
            return "json"
        return "paddleocr"
    raise ValueError(f"{p}: cannot detect the OCR format of this JSON; pass format= one of {FORMATS}")


def read_ocr(path: str | os.PathLike, format: str = "auto", min_score: float = 0.0,
             image_size: tuple[int, int] | None = None, *, page: int | None = None,
             split_lines: bool = False) -> list[OCRWord]:
    """Read the OCR words of one image from ``path``.

    ``format``: ``"auto"`` (detect from extension and content) or one of :data:`FORMATS`
    (aliases: ``tsv``, ``paddle``, ``jsonl``). ``image_size`` (H, W) scales relative coordinates
    (docTR); pixel formats ignore it. ``split_lines`` splits line-level results (PaddleOCR) into words.
    """
    min_score = _check_min_score(min_score)
    if not isinstance(format, str):
        raise ValueError(f"format must be a string, got {format!r}")
    fmt = FORMAT_ALIASES.get(format.lower(), format.lower())
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    if image_size is not None:
        _image_size(image_size)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"OCR file {str(p)!r} does not exist or is not a file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if fmt == "auto":
        fmt = detect_format(p, text)
    src = str(p)
    if fmt == "tesseract":
        return parse_tesseract_tsv(text, min_score=min_score, page=page, source=src)
    if fmt == "hocr":
        return parse_hocr(text, min_score=min_score, page=page, source=src)
    if fmt == "paddleocr":
        return parse_paddleocr(text, min_score=min_score, page=page, split_lines=split_lines, source=src)
    if fmt == "doctr":
        return parse_doctr(text, min_score=min_score, page=page, image_size=image_size, source=src)
    return parse_words_json(text, min_score=min_score, source=src)
