"""OCR words -> one label per visual token (docs/labeling.md).

coverage(token, word) = area(cell ∩ word box) / area(cell), the cell in original pixels (clipped to
the view's content). A token gets the word of largest coverage if that is >= ``min_coverage``
(1e-9 slack for float error), else ``ignore_index``. Ties: the word with the smaller box area (the
more specific one, e.g. a word over its line), then the word listed first. Separator / newline /
padding positions of the grid are never labeled.

Punctuation: a word's leading and trailing punctuation (Unicode categories P*, plus quote-like
symbols such as ``\u0060`` and ``\u00b4``) is not its content: ``\u2018Total:`` is tokenised and labeled as
``Total`` (``first``: every cell gets ``Total``'s first token; ``aligned``: a cell over a stripped
character gets the nearest content token). A word that is only punctuation keeps its own tokens.

Soft labels (``soft=K``): the same tokens are labeled, each with up to K (id, weight) targets: every
word passing ``min_coverage`` in the cell contributes its coverage, split over its sub-tokens in
``aligned`` mode by the part of the word box each one spans; ``spread`` adds each word to the 8
neighbours of its cells; the K largest are kept and renormalised (docs/labeling.md, "Soft labels").

Speed: cells of a view form a separable grid (column x-spans times row y-spans), so each word's
touched columns / rows come from two ``searchsorted`` calls and only (word, touched cell) pairs are
scored; all words of a page are tokenised in one batched call.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import unicodedata
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch

from dvsft_kernels.labeling.grid import VisualGrid
from dvsft_kernels.labeling.types import OCRWord, SoftLabels

DROP_REASONS = (
    "empty_text",
    "non_finite",
    "low_score",
    "inverted",
    "degenerate",
    "outside_image",
    "no_tokens",
)
_COVERAGE_SLACK = 1e-9


@dataclass
class LabelReport:
    """What :func:`label_visual_tokens` did with one image's words."""

    num_words: int  # words given
    words_valid: int  # passed every check and tokenised to >= 1 token
    words_used: int  # labeled at least one token (soft labels: is among some token's kept targets)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count (reasons in DROP_REASONS)
    labeled_tokens: int = 0
    num_cells: int = 0  # labelable positions (cells of the grid)
    num_tokens: int = 0  # grid.num_tokens

    @property
    def labeled_fraction(self) -> float:
        """Labeled tokens / grid.num_tokens."""
        return self.labeled_tokens / self.num_tokens if self.num_tokens else 0.0

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())


# ------------------------------------------------------------------------------------------------
# words
def word_fields(w, i):
    """(text, box, score) of words[i], an OCRWord, a (text, box[, score]) tuple or a dict."""
    if isinstance(w, OCRWord):
        return w.text, w.box, w.score
    if isinstance(w, Mapping):
        if "text" not in w or "box" not in w:
            raise ValueError(f"words[{i}]: a dict word needs 'text' and 'box' keys, got {sorted(w)}")
        return w["text"], w["box"], w.get("score", 1.0)
    if isinstance(w, (tuple, list)) and len(w) in (2, 3):
        return (w[0], w[1], w[2] if len(w) == 3 else 1.0)
    raise TypeError(
        f"words[{i}] must be an OCRWord, a (text, box[, score]) tuple or a dict, got {type(w).__name__}"
    )


def word_box(box, i) -> np.ndarray:
    """words[i]'s box as float64 (x0, y0, x1, y1), checked (a ValueError naming words[i])."""
    try:
        b = np.asarray(box, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"words[{i}].box must be numbers (x0, y0, x1, y1) or 4 (x, y) points, got {box!r}"
        ) from None
    if b.shape == (4,):
        return b
    if b.shape in ((4, 2), (8,)):
        q = b.reshape(4, 2)
        return np.array([q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max()])
    raise ValueError(f"words[{i}].box must be (x0, y0, x1, y1) or 4 (x, y) points, got shape {b.shape}")


def _boxes(raw_boxes) -> np.ndarray:
    """(n, 4) float64 from 4-number boxes or quadrilaterals (reduced to their bounding box)."""
    n = len(raw_boxes)
    if n == 0:
        return np.zeros((0, 4))
    try:
        b = np.asarray(raw_boxes, dtype=np.float64)
    except (TypeError, ValueError):
        b = None  # ragged or mixed: one by one
    if b is not None:
        if b.shape == (n, 4):
            return b
        if b.shape in ((n, 4, 2), (n, 8)):
            q = b.reshape(n, 4, 2)
            return np.concatenate([q.min(axis=1), q.max(axis=1)], axis=1)
    return np.stack([word_box(bx, i) for i, bx in enumerate(raw_boxes)])


# ------------------------------------------------------------------------------------------------
# a word's content: the text without leading / trailing punctuation
#: symbols OCR engines return for quotes that are not in a Unicode punctuation category (P*)
QUOTE_LIKE = frozenset("`\u00b4\u02b9\u02ba\u02bb\u02bc\u02dd\u02ee\u2032\u2033\u2034\u2035\u2036\u2037\uff02\uff07\uff40")


def _is_punct(ch: str) -> bool:
    return ch in QUOTE_LIKE or ch.isspace() or unicodedata.category(ch).startswith("P")


@functools.lru_cache(maxsize=1 << 16)
def content_span(text: str) -> tuple[int, int]:
    """``(start, end)``: ``text[start:end]`` is the word without its leading and trailing punctuation
    (Unicode categories P*, :data:`QUOTE_LIKE`, whitespace); ``(0, len(text))`` when nothing else is
    left (a word that is only punctuation keeps its own tokens)."""
    a, b = 0, len(text)
    while a < b and _is_punct(text[a]):
        a += 1
    while b > a and _is_punct(text[b - 1]):
        b -= 1
    return (a, b) if a < b else (0, len(text))


# ------------------------------------------------------------------------------------------------
# tokenisation
_PREFIX_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _marks_word_start(state) -> bool:
    """Whether a normalizer / pre-tokenizer already makes a lone word word-initial."""
    if not isinstance(state, Mapping):
        return False
    typ = state.get("type")
    if typ == "Sequence":
        parts = state.get("pretokenizers") or state.get("normalizers") or []
        return any(_marks_word_start(p) for p in parts)
    if typ == "ByteLevel":
        return bool(state.get("add_prefix_space", False))
    if typ == "Metaspace":
        scheme = state.get("prepend_scheme")
        if scheme is None:
            scheme = "always" if state.get("add_prefix_space", True) else "never"
        return scheme in ("always", "first")
    return typ == "Prepend"


def default_add_prefix_space(tokenizer) -> bool:
    """The ``add_prefix_space=None`` choice: prepend a space unless the tokenizer already marks a lone
    word as word-initial (SentencePiece ``Metaspace`` / ``Prepend`` / ByteLevel(add_prefix_space)).

    Why: in running text (what the model reads and predicts) a word follows a space, and byte-level
    BPE (GPT-2, Qwen, Llama 3, Mistral tekken) and Gemma's SentencePiece spell that space into the
    word's first token (``Ġword`` / ``▁word``); a bare ``word`` is the rarer line-initial spelling."""
    try:
        return _PREFIX_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    result = True
    for comp in (getattr(backend, "normalizer", None), getattr(backend, "pre_tokenizer", None)):
        if comp is None:
            continue
        try:
            raw = comp.__getstate__()
            state = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except (AttributeError, TypeError, ValueError):  # an exotic component: keep the default
            continue
        if _marks_word_start(state):
            result = False
    try:
        _PREFIX_CACHE[tokenizer] = result
    except TypeError:
        pass
    return result


@dataclass
class _Tokens:
    ids: np.ndarray  # (P,) int64 all pieces, words in order
    start: np.ndarray  # (n,) first piece of each word
    count: np.ndarray  # (n,) pieces per word (0: untokenisable)
    char_start: np.ndarray | None  # (P,) piece start in the word's text (aligned mode)


# tokenisation is most of the cost of labeling a page, and page vocabularies repeat: results are kept
# per tokenizer (weakly), keyed by (text, prefix), and dropped when the vocabulary size changes
_TOKEN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKEN_CACHE_MAX = 1 << 16


def clear_token_cache() -> None:
    """Forget cached word tokenisations (they are also dropped when a tokenizer's vocabulary grows)."""
    _TOKEN_CACHE.clear()


def _encode(tokenizer, strings: list[str]):
    """ids and character offsets per string, special tokens off, one batched call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        encs = backend.encode_batch(strings, add_special_tokens=False)
        return [e.ids for e in encs], [e.offsets for e in encs]
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    try:
        enc = tokenizer(strings, add_special_tokens=False, return_offsets_mapping=True)
        offs = [[tuple(o) for o in x] for x in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        enc, offs = tokenizer(strings, add_special_tokens=False), None
    return [list(x) for x in enc["input_ids"]], offs


def _pieces(tokenizer, text: str, ids, offs, prefix: bool):
    """(ids, char starts in text) of one word, without leading pieces that spell only the prefix."""
    plen = 1 if prefix else 0
    j = 0
    if prefix:
        if offs is not None:
            while j < len(ids) - 1 and offs[j][1] <= plen:
                j += 1
        else:
            while j < len(ids) - 1 and not tokenizer.decode([ids[j]]).strip():
                j += 1
    ids = tuple(ids[j:])
    nt = max(len(text), 1)
    if offs is not None:
        cs = tuple(min(max(o[0] - plen, 0), nt - 1) for o in offs[j:])
    else:  # no offsets (slow tokenizer): spread the characters evenly over the pieces
        cs = tuple((q * nt) // len(ids) for q in range(len(ids))) if ids else ()
    return ids, cs


def _tokenize(tokenizer, texts: list[str], prefix: bool, want_offsets: bool, use_cache: bool) -> _Tokens:
    table = None
    if use_cache:
        try:
            vocab = len(tokenizer)
            hit = _TOKEN_CACHE.get(tokenizer)
            if hit is None or hit[0] != vocab or len(hit[1][prefix]) > _TOKEN_CACHE_MAX:
                hit = (vocab, {False: {}, True: {}})
                _TOKEN_CACHE[tokenizer] = hit
            table = hit[1][prefix]
        except TypeError:  # not weak-referenceable / no len(): no cache
            table = None
    src = {} if table is None else table
    todo = [t for t in dict.fromkeys(texts) if t not in src]
    if todo:
        ids_l, offs_l = _encode(tokenizer, [" " + t for t in todo] if prefix else todo)
        for k, t in enumerate(todo):
            src[t] = _pieces(tokenizer, t, ids_l[k], None if offs_l is None else offs_l[k], prefix)
    entries = list(map(src.__getitem__, texts))
    id_t = [e[0] for e in entries]
    count = np.fromiter(map(len, id_t), np.int64, len(id_t))
    ids = np.fromiter(chain.from_iterable(id_t), np.int64, int(count.sum()))
    cs = (
        np.fromiter(chain.from_iterable([e[1] for e in entries]), np.int64, ids.size)
        if want_offsets
        else None
    )
    return _Tokens(ids, np.cumsum(count) - count, count, cs)


# ------------------------------------------------------------------------------------------------
def _geometry(grid: VisualGrid):
    """Per view: (offset, row_stride, col bounds (cols, 2), row bounds (rows, 2)) in original px."""
    cached = grid.__dict__.get("_label_geometry")
    if cached is None:
        cached = [(v.offset, v.row_stride, v.col_bounds(), v.row_bounds()) for v in grid.views if v.num_cells]
        object.__setattr__(grid, "_label_geometry", cached)
    return cached


def _touched_cells(a0, b0, a1, b1, X0, X1, Y0, Y1):
    """(word, row, col) of every cell of one view that each box (a0, b0, a1, b1) touches, from two
    ``searchsorted`` calls per axis (column / row spans are sorted); None when there is none."""
    c_lo = np.searchsorted(X1, a0, side="right")
    c_hi = np.searchsorted(X0, a1, side="left")
    r_lo = np.searchsorted(Y1, b0, side="right")
    r_hi = np.searchsorted(Y0, b1, side="left")
    nc = np.maximum(c_hi - c_lo, 0)
    cnt = nc * np.maximum(r_hi - r_lo, 0)
    total = int(cnt.sum())
    if total == 0:
        return None
    wi = np.repeat(np.arange(a0.size), cnt)
    k = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    ncw = nc[wi]
    return wi, r_lo[wi] + k // ncw, c_lo[wi] + k % ncw


def label_visual_tokens(
    words,
    grid: VisualGrid,
    tokenizer,
    mode: str = "first",
    min_coverage: float = 0.25,
    ignore_index: int = -100,
    *,
    add_prefix_space: bool | None = None,
    min_score: float | None = None,
    return_report: bool = False,
    token_cache: bool = True,
    soft: int | None = None,
    spread: float = 0.0,
):
    """Label every visual token of one image with the id of the word it shows.

    Args:
        words: OCRWord-s (or ``(text, box[, score])`` tuples / dicts) in original-image pixels; a box
            is (x0, y0, x1, y1) or 4 (x, y) points (its bounding box is used). Words with empty text,
            non-finite / inverted / zero-area boxes, boxes wholly outside the image, ``score <
            min_score`` or no tokens are skipped and counted in the report; boxes partly outside
            are clipped to the image.
        grid: the image's :class:`VisualGrid`.
        tokenizer: a Hugging Face tokenizer (fast ones use one batched backend call and offsets).
        mode: ``"first"`` — the first sub-token of the word's content (the text without leading /
            trailing punctuation, see :func:`content_span`); ``"aligned"`` — the content sub-token
            holding the character under the token's horizontal centre (centre x mapped into the word
            box, proportional to the characters of the whole text; a stripped character takes the
            nearest content character; character spans from the tokenizer's offsets, evenly spread
            when it has none).
        min_coverage: in (0, 1].
        add_prefix_space: tokenise ``" " + text`` (dropping pieces that spell only that space).
            None: :func:`default_add_prefix_space` (True for byte-level BPE and Gemma).
        return_report: also return a :class:`LabelReport`.
        token_cache: reuse word tokenisations across calls (per tokenizer; see ``clear_token_cache``).
        soft: None (default): one id per token, as above. An int K >= 1: up to K ids per token,
            weighted by how much of the cell each (word, sub-token) covers (docs/labeling.md, "Soft
            labels"); the tokens labeled are the same as with ``soft=None``.
        spread: in [0, 1), only with ``soft``: the 8 neighbouring cells of each cell a word labels
            also get that word with weight ``spread`` x a full cell's coverage (vision smoothing).

    Returns:
        LongTensor (grid.num_tokens,), or with ``soft=K`` a :class:`SoftLabels` of ``ids`` (int64)
        and ``weights`` (float32), each (grid.num_tokens, K); ``(labels, report)`` with
        ``return_report``.
    """
    if not isinstance(grid, VisualGrid):
        raise TypeError(f"grid must be a VisualGrid, got {type(grid).__name__}")
    if mode not in ("first", "aligned"):
        raise ValueError(f"mode must be 'first' or 'aligned', got {mode!r}")
    if (
        isinstance(min_coverage, bool)
        or not isinstance(min_coverage, (int, float))
        or not 0 < min_coverage <= 1
    ):
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if min_score is not None and (
        isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or math.isnan(min_score)
    ):
        raise ValueError(f"min_score must be a number or None, got {min_score!r}")
    if add_prefix_space is not None and not isinstance(add_prefix_space, bool):
        raise ValueError(f"add_prefix_space must be True, False or None, got {add_prefix_space!r}")
    check_soft_options(soft, spread)
    soft = None if soft is None else int(soft)
    if isinstance(words, (str, bytes)) or not hasattr(words, "__iter__"):
        raise TypeError(f"words must be a sequence of OCRWord, got {type(words).__name__}")
    if tokenizer is None:
        raise TypeError("tokenizer must be a Hugging Face tokenizer, got None")

    words = words if isinstance(words, (list, tuple)) else list(words)
    n = len(words)
    if set(map(type, words)) <= {OCRWord}:  # the common case, without per-word dispatch
        texts = [w.text for w in words]
        raw_boxes = [w.box for w in words]
        scores = [w.score for w in words] if min_score is not None else None
    else:
        fields = [word_fields(w, i) for i, w in enumerate(words)]
        texts = [f[0] for f in fields]
        raw_boxes = [f[1] for f in fields]
        scores = [f[2] for f in fields] if min_score is not None else None
    labels = np.full(grid.num_tokens, int(ignore_index), dtype=np.int64)
    report = LabelReport(n, 0, 0, {}, 0, grid.num_cells, grid.num_tokens)
    if soft is not None:
        soft_ids = np.full((grid.num_tokens, soft), int(ignore_index), dtype=np.int64)
        soft_w = np.zeros((grid.num_tokens, soft), dtype=np.float32)
    if n == 0:
        if soft is not None:
            out = SoftLabels(torch.from_numpy(soft_ids), torch.from_numpy(soft_w))
            return (out, report) if return_report else out
        return (torch.from_numpy(labels), report) if return_report else torch.from_numpy(labels)

    if set(map(type, texts)) != {str}:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"words[{i}].text must be a str, got {type(t).__name__}")
    box = _boxes(raw_boxes)
    H, W = grid.image_size

    reason = np.full(n, -1, np.int8)  # index into DROP_REASONS; first failing check wins

    def flag(mask, k):
        reason[(reason < 0) & mask] = k

    flag(np.fromiter(map(operator.not_, map(str.strip, texts)), bool, n), 0)
    flag(~np.isfinite(box).all(axis=1), 1)
    if min_score is not None:
        try:
            score = np.array([1.0 if x is None else float(x) for x in scores])
        except (TypeError, ValueError):
            raise ValueError("words[*].score must be numbers") from None
        flag(~(score >= min_score), 2)
    with np.errstate(invalid="ignore"):
        flag((box[:, 2] < box[:, 0]) | (box[:, 3] < box[:, 1]), 3)
        flag((box[:, 2] == box[:, 0]) | (box[:, 3] == box[:, 1]), 4)
        clip = np.stack(
            [
                np.maximum(box[:, 0], 0),
                np.maximum(box[:, 1], 0),
                np.minimum(box[:, 2], W),
                np.minimum(box[:, 3], H),
            ],
            axis=1,
        )
        flag((clip[:, 2] <= clip[:, 0]) | (clip[:, 3] <= clip[:, 1]), 5)

    ok = np.flatnonzero(reason < 0)
    prefix = default_add_prefix_space(tokenizer) if add_prefix_space is None else add_prefix_space
    spans = [content_span(texts[i]) for i in ok]
    contents = [texts[i][a:b] for i, (a, b) in zip(ok.tolist(), spans)]
    toks = _tokenize(tokenizer, contents, prefix, mode == "aligned", bool(token_cache))
    no_tok = toks.count == 0
    reason[ok[no_tok]] = 6
    keep = ~no_tok  # over ok
    wids = ok[keep]  # original word indices that take part
    report.words_valid = int(wids.size)
    per_reason = np.bincount(reason[reason >= 0], minlength=len(DROP_REASONS))
    report.dropped = {DROP_REASONS[k]: int(c) for k, c in enumerate(per_reason) if c}

    if wids.size and soft is not None:
        kept = np.flatnonzero(keep)
        tok, slot, tid, wt, used = _soft_assign(
            grid, clip[wids], box[wids], toks, keep, mode, min_coverage, spread, soft,
            nchar=np.array([len(contents[k]) for k in kept], np.int64).reshape(-1),
            full=np.array([len(texts[i]) for i in wids], np.int64).reshape(-1),
            lead=np.array([spans[k][0] for k in kept], np.int64).reshape(-1),
        )
        soft_ids[tok, slot] = tid
        soft_w[tok, slot] = wt
        report.labeled_tokens = int(np.unique(tok).size)
        report.words_used = used
    elif wids.size:
        a0, b0, a1, b1 = (clip[wids, k] for k in range(4))
        warea = (a1 - a0) * (b1 - b0)
        tok_l, cov_l, w_l, xc_l = [], [], [], []
        for offset, stride, xb, yb in _geometry(grid):
            hit = _covered_cells(a0, b0, a1, b1, xb, yb, min_coverage)
            if hit is None:
                continue
            tok_l.append(offset + hit.r * stride + hit.c)
            cov_l.append(hit.cov)
            w_l.append(hit.wi)
            if mode == "aligned":
                xc_l.append(0.5 * (hit.cx0 + hit.cx1))
        if tok_l:
            tok, cov, wi = np.concatenate(tok_l), np.concatenate(cov_l), np.concatenate(w_l)
            order = np.lexsort((wi, warea[wi], -cov, tok))
            ts = tok[order]
            best = order[np.concatenate(([True], ts[1:] != ts[:-1]))]
            bw = wi[best]
            pos = toks.start[keep][bw]
            if mode == "aligned":
                kept = np.flatnonzero(keep)
                pos = pos + _aligned_piece(
                    np.concatenate(xc_l)[best], bw, box[wids], toks, keep,
                    nchar=np.array([len(contents[k]) for k in kept], np.int64).reshape(-1),
                    full=np.array([len(texts[i]) for i in wids], np.int64).reshape(-1),
                    lead=np.array([spans[k][0] for k in kept], np.int64).reshape(-1),
                )
            labels[tok[best]] = toks.ids[pos]
            report.labeled_tokens = int(best.size)
            report.words_used = int(np.count_nonzero(np.bincount(bw)))
    if soft is not None:
        out = SoftLabels(torch.from_numpy(soft_ids), torch.from_numpy(soft_w))
        return (out, report) if return_report else out
    out = torch.from_numpy(labels)
    return (out, report) if return_report else out


def check_soft_options(soft, spread) -> None:
    """ValueError naming the argument unless ``soft`` is None or an int >= 1 and ``spread`` a number
    in [0, 1), nonzero only with ``soft``."""
    if soft is not None and (isinstance(soft, bool) or not isinstance(soft, (int, np.integer)) or soft < 1):
        raise ValueError(f"soft must be an int >= 1 (targets per token) or None, got {soft!r}")
    if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not 0 <= spread < 1:
        raise ValueError(f"spread must be a number in [0, 1), got {spread!r}")
    if spread and soft is None:
        raise ValueError(f"spread={spread!r} needs soft labels (soft=K): hard labels have one id per token")


class _Covered(NamedTuple):
    """The (word, cell) pairs of one view whose coverage reaches min_coverage, and their geometry."""

    wi: np.ndarray
    r: np.ndarray
    c: np.ndarray
    cov: np.ndarray  # the word's share of the cell's area
    cx0: np.ndarray
    cx1: np.ndarray
    oy: np.ndarray  # vertical overlap of word and cell
    area: np.ndarray  # the cell's area


def _covered_cells(a0, b0, a1, b1, xb, yb, min_coverage) -> _Covered | None:
    X0, X1, Y0, Y1 = xb[:, 0], xb[:, 1], yb[:, 0], yb[:, 1]
    touched = _touched_cells(a0, b0, a1, b1, X0, X1, Y0, Y1)
    if touched is None:
        return None
    wi, r, c = touched
    cx0, cx1, cy0, cy1 = X0[c], X1[c], Y0[r], Y1[r]
    ox = np.minimum(cx1, a1[wi]) - np.maximum(cx0, a0[wi])
    oy = np.minimum(cy1, b1[wi]) - np.maximum(cy0, b0[wi])
    area = (cx1 - cx0) * (cy1 - cy0)
    cov = np.where(area > 0, ox * oy / np.where(area > 0, area, 1.0), 0.0)
    sel = cov >= min_coverage - _COVERAGE_SLACK
    if not sel.any():
        return None
    return _Covered(wi[sel], r[sel], c[sel], cov[sel], cx0[sel], cx1[sel], oy[sel], area[sel])


def _piece_intervals(rbox, toks: _Tokens, keep, mode, *, nchar, full, lead):
    """Each word's pieces and the x-interval of the word box each one spans, in original pixels.

    Returns (piece index in its word, left, right, first entry of each word, entries per word), the
    entries of a word consecutive.
    ``first``: one piece per word spanning everything. ``aligned``: the box is spread over the
    characters of the whole text, as for hard labels, and a piece spans from its first character to
    the next piece's; the first piece extends left and the last right without bound, so stripped
    punctuation and cells beyond the box go to the nearest piece, as the hard rule does. Pieces
    sharing a start character (one character split over bytes) give it to the first of them."""
    nw = nchar.size
    if mode == "first":
        pw = np.arange(nw)
        local = np.zeros(nw, np.int64)
        left, right = np.full(nw, -np.inf), np.full(nw, np.inf)
    else:
        start, count = toks.start[keep], toks.count[keep]
        wpiece = np.repeat(np.arange(nw), count)
        local = np.arange(wpiece.size) - start[wpiece]
        cs = toks.char_start
        o = np.lexsort((local, cs, wpiece))
        wpiece, cs, local = wpiece[o], cs[o], local[o]
        first = np.concatenate(([True], (wpiece[1:] != wpiece[:-1]) | (cs[1:] != cs[:-1])))
        pw, cs, local = wpiece[first], cs[first], local[first]
        x0, x1 = rbox[pw, 0], rbox[pw, 2]
        left = x0 + (lead[pw] + cs) / full[pw] * (x1 - x0)
        new_word = np.concatenate(([True], pw[1:] != pw[:-1]))
        left[new_word] = -np.inf
        right = np.concatenate((left[1:], [np.inf]))
        right[np.concatenate((new_word[1:], [True]))] = np.inf
    return local, left, right, np.searchsorted(pw, np.arange(nw)), np.bincount(pw, minlength=nw)


_NEIGHBOURS = np.array([(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc], np.int64)


def _soft_assign(grid, cbox, rbox, toks: _Tokens, keep, mode, min_coverage, spread, K, *, nchar, full, lead):
    """Soft labels: (token, slot, id, weight, words used) of every kept target.

    A (cell, word) pair whose coverage passes ``min_coverage`` (the hard rule's test) puts the
    coverage on the word's pieces, each getting the part of the cell ∩ box that lies in its
    x-interval; with ``spread``, each such cell's 8 neighbours that some word labels get the word
    with ``spread`` x the pieces' shares of the neighbour's width (a full cell's coverage, 1).
    Equal ids of a cell are merged (summed); the K largest are kept (ties: smaller word box, earlier
    word, earlier piece) and divided by their sum."""
    a0, b0, a1, b1 = (cbox[:, k] for k in range(4))
    warea = (a1 - a0) * (b1 - b0)
    plocal, pleft, pright, pstart, pcount = _piece_intervals(
        rbox, toks, keep, mode, nchar=nchar, full=full, lead=lead
    )
    tok_l, wi_l, lo_l, hi_l, scale_l = [], [], [], [], []
    for offset, stride, xb, yb in _geometry(grid):
        hit = _covered_cells(a0, b0, a1, b1, xb, yb, min_coverage)
        if hit is None:
            continue
        wi, r, c = hit.wi, hit.r, hit.c
        # a piece's share is scale * (its x-overlap with [lo, hi]); summed over pieces: the coverage
        tok_l.append(offset + r * stride + c)
        wi_l.append(wi)
        lo_l.append(np.maximum(hit.cx0, a0[wi]))
        hi_l.append(np.minimum(hit.cx1, a1[wi]))
        scale_l.append(hit.oy / hit.area)
        if spread:
            rows, cols = yb.shape[0], xb.shape[0]
            cell = r * cols + c
            labeled = np.zeros(rows * cols, bool)
            labeled[cell] = True
            nr = (r[:, None] + _NEIGHBOURS[None, :, 0]).ravel()
            nc = (c[:, None] + _NEIGHBOURS[None, :, 1]).ravel()
            nwi = np.repeat(wi, len(_NEIGHBOURS))
            inside = (nr >= 0) & (nr < rows) & (nc >= 0) & (nc < cols)
            ncell = nr[inside] * cols + nc[inside]
            pair = nwi[inside] * (rows * cols) + ncell
            pair = np.unique(pair[labeled[ncell]])
            # a word's own cells keep their coverage: spread only reaches cells it does not label
            pair = pair[~np.isin(pair, wi * (rows * cols) + cell)]
            if pair.size:
                swi, scell = pair // (rows * cols), pair % (rows * cols)
                sr, sc = scell // cols, scell % cols
                tok_l.append(offset + sr * stride + sc)
                wi_l.append(swi)
                x0, x1 = xb[sc, 0], xb[sc, 1]
                lo_l.append(x0)
                hi_l.append(x1)
                scale_l.append(spread / (x1 - x0))
    empty = np.zeros(0, np.int64)
    if not tok_l:
        return empty, empty, empty, np.zeros(0, np.float32), 0
    tok, wi = np.concatenate(tok_l), np.concatenate(wi_l)
    lo, hi, scale = np.concatenate(lo_l), np.concatenate(hi_l), np.concatenate(scale_l)
    # one entry per (pair, piece of its word)
    npc = pcount[wi]
    e = np.repeat(np.arange(tok.size), npc)
    j = pstart[wi][e] + (np.arange(e.size) - np.repeat(np.cumsum(npc) - npc, npc))
    mass = scale[e] * np.maximum(np.minimum(hi[e], pright[j]) - np.maximum(lo[e], pleft[j]), 0.0)
    pos = mass > 0
    e, j, mass = e[pos], j[pos], mass[pos]
    tok, wi, piece = tok[e], wi[e], plocal[j]
    tid = toks.ids[toks.start[keep][wi] + piece]
    # merge equal ids of a cell; the group's first entry (after sorting) carries the tie keys
    o = np.lexsort((piece, wi, warea[wi], tid, tok))
    tok, wi, piece, tid, mass = tok[o], wi[o], piece[o], tid[o], mass[o]
    head = np.concatenate(([True], (tok[1:] != tok[:-1]) | (tid[1:] != tid[:-1])))
    g_start = np.flatnonzero(head)
    g_mass = np.add.reduceat(mass, g_start)
    g_tok, g_tid, g_wi, g_piece = tok[g_start], tid[g_start], wi[g_start], piece[g_start]
    # rank the targets of each cell; masses rounded so float noise does not break exact ties
    o2 = np.lexsort((g_piece, g_wi, warea[g_wi], -np.round(g_mass, 12), g_tok))
    st = g_tok[o2]
    cell_head = np.concatenate(([True], st[1:] != st[:-1]))
    first_of_cell = np.maximum.accumulate(np.where(cell_head, np.arange(st.size), 0))
    rank = np.arange(st.size) - first_of_cell
    kept_sorted = rank < K
    kg = o2[kept_sorted]
    k_tok, k_rank, k_mass = g_tok[kg], rank[kept_sorted], g_mass[kg]
    k_head = np.concatenate(([True], k_tok[1:] != k_tok[:-1]))
    cell_total = np.add.reduceat(k_mass, np.flatnonzero(k_head))
    weight = (k_mass / cell_total[np.cumsum(k_head) - 1]).astype(np.float32)
    group_kept = np.zeros(g_start.size, bool)
    group_kept[kg] = True
    used = int(np.unique(wi[group_kept[np.cumsum(head) - 1]]).size)
    return k_tok, k_rank, g_tid[kg], weight, used


def _aligned_piece(xc, bw, raw_box, toks: _Tokens, keep, *, nchar, full, lead) -> np.ndarray:
    """Piece offset (within its word) under horizontal position xc, for tokens won by words bw.

    ``full``: characters of each word's text, over which the box is spread; ``nchar`` / ``lead``: the
    length and start of its content (the tokenised part); a position over a stripped character is
    moved to the nearest content character."""
    x0, x1 = raw_box[bw, 0], raw_box[bw, 2]
    frac = np.clip((xc - x0) / (x1 - x0), 0.0, 1.0)
    ch = np.minimum((frac * full[bw]).astype(np.int64), full[bw] - 1)
    ch = np.clip(ch - lead[bw], 0, nchar[bw] - 1)
    # pieces of the kept words, keyed by (word, char start): the last piece starting at or before the
    # character holds it; among pieces with the same start (a character split over bytes) the first
    start, count = toks.start[keep], toks.count[keep]  # dropped words have no pieces: all pieces are kept
    base = np.concatenate(([0], np.cumsum(nchar)[:-1]))
    wpiece = np.repeat(np.arange(start.size), count)
    key = base[wpiece] + toks.char_start
    o = np.argsort(key, kind="stable")  # offsets are monotonic in practice; be safe
    key, wpiece, local = key[o], wpiece[o], (np.arange(key.size) - start[wpiece])[o]
    first = np.concatenate(([True], key[1:] != key[:-1]))
    ukey, upiece, uword = key[first], local[first], wpiece[first]
    j = np.searchsorted(ukey, base[bw] + ch, side="right") - 1
    j = np.maximum(j, 0)
    wrong = uword[j] != bw  # no piece of this word starts at or before ch: its first piece
    return np.where(wrong, 0, upiece[j])
