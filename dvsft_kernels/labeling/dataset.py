"""A ``vision_labels`` column for a Hugging Face ``datasets.Dataset`` (docs/labeling.md, "Labeling a
folder at scale").

:func:`label_dataset` labels every row's image(s) with ``ds.map(batched=True, num_proc=N)``. The
geometry is the one the CLI (``--processor``) and the collator use: each image's grid comes from
:meth:`VisualGrid.from_processor` (the processor's own settings), labels from
:func:`label_visual_tokens`, and with ``input_ids_column`` they are placed on the row's image
placeholders by :func:`build_vision_labels_from_processor`, the collator's function.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dvsft_kernels.labeling.types import OCRWord

__all__ = ["label_dataset"]


def _words_of(cell: Any, where: str) -> list[OCRWord]:
    """One image's words from a dataset cell: a list of ``{"text", "box", "score"?}`` dicts (Arrow
    structs), OCRWord-s or ``(text, box[, score])`` lists; a dict of lists (a ``Sequence`` of structs);
    None / [] for none."""
    if cell is None:
        return []
    if isinstance(cell, Mapping):  # datasets' Sequence(struct) layout: {"text": [...], "box": [...]}
        if "text" not in cell or "box" not in cell:
            raise ValueError(f"{where}: a words cell needs 'text' and 'box', got keys {sorted(cell)}")
        scores = cell.get("score") or [None] * len(cell["text"])
        cell = [{"text": t, "box": b, "score": s} for t, b, s in zip(cell["text"], cell["box"], scores)]
    if not isinstance(cell, (list, tuple)):
        raise ValueError(f"{where}: expected a list of words, got {type(cell).__name__}")
    out = []
    for i, w in enumerate(cell):
        if isinstance(w, OCRWord):
            out.append(w)
        elif isinstance(w, Mapping):
            if "text" not in w or "box" not in w:
                raise ValueError(f"{where}[{i}]: a word needs 'text' and 'box' keys, got {sorted(w)}")
            s = w.get("score")
            out.append(OCRWord(w["text"], w["box"], 1.0 if s is None else float(s)))
        elif isinstance(w, (list, tuple)) and len(w) in (2, 3):
            out.append(OCRWord(w[0], w[1], float(w[2]) if len(w) == 3 and w[2] is not None else 1.0))
        else:
            raise ValueError(f"{where}[{i}]: expected a {{'text', 'box', 'score'}} dict, got {w!r}")
    return out


def _word_record(w: OCRWord) -> dict:
    """An OCR word as a dataset cell: the box as (x0, y0, x1, y1) (a quadrilateral's bounding box,
    which is all the labeling uses)."""
    box = w.box
    if len(box) == 4 and all(isinstance(p, (list, tuple)) for p in box):
        xs, ys = [float(p[0]) for p in box], [float(p[1]) for p in box]
        box = (min(xs), min(ys), max(xs), max(ys))
    return {"text": str(w.text), "box": [float(v) for v in box], "score": float(w.score)}


class _Labeler:
    """The batched map function (picklable: datasets sends it to ``num_proc`` workers)."""

    def __init__(self, processor, tokenizer, *, image_column, words_column, ocr, ocr_options,
                 label_column, input_ids_column, image_token_id, images_kwargs, ignore_index, label_kwargs):
        self.processor, self.tokenizer = processor, tokenizer
        self.image_column, self.words_column, self.label_column = image_column, words_column, label_column
        self.ocr, self.ocr_options = ocr, ocr_options
        self.input_ids_column, self.image_token_id = input_ids_column, image_token_id
        self.images_kwargs, self.ignore_index, self.label_kwargs = images_kwargs, ignore_index, label_kwargs

    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        import torch

        from dvsft_kernels.labeling.assign import label_visual_tokens
        from dvsft_kernels.labeling.batch import build_vision_labels_from_processor
        from dvsft_kernels.labeling.grid import VisualGrid
        from dvsft_kernels.labeling.ocr import load_image, run_ocr

        out: dict[str, list] = {self.label_column: []}
        if self.ocr is not None:
            out[self.words_column] = []
        for k, row in enumerate(indices):
            cell = batch[self.image_column][k]
            multi = isinstance(cell, (list, tuple))
            where = f"{self.image_column}[{row}]"
            images = [load_image(im, f"{where}[{j}]" if multi else where)
                      for j, im in enumerate(cell if multi else [cell])]
            if self.ocr is not None:
                words = [run_ocr(im, self.ocr, **self.ocr_options) for im in images]
                recs = [[_word_record(w) for w in ws] for ws in words]
                out[self.words_column].append(recs if multi else recs[0])
            else:
                wcell = batch[self.words_column][k]
                wwhere = f"{self.words_column}[{row}]"
                if multi:
                    wcell = [None] * len(images) if wcell is None else wcell
                    if not isinstance(wcell, (list, tuple)) or len(wcell) != len(images):
                        raise ValueError(f"{wwhere}: a row with {len(images)} images needs one word list "
                                         "per image")
                    words = [_words_of(w, f"{wwhere}[{j}]") for j, w in enumerate(wcell)]
                else:
                    words = [_words_of(wcell, wwhere)]
            try:
                if self.input_ids_column is not None:
                    ids = torch.as_tensor(batch[self.input_ids_column][k], dtype=torch.long)[None]
                    labels = build_vision_labels_from_processor(
                        self.processor, [images], {"input_ids": ids}, [words], tokenizer=self.tokenizer,
                        image_token_id=self.image_token_id, images_kwargs=self.images_kwargs,
                        ignore_index=self.ignore_index, **self.label_kwargs)
                    out[self.label_column].append(labels[0].tolist())
                    continue
                labs = [
                    label_visual_tokens(ws, VisualGrid.from_processor(self.processor, im,
                                                                      images_kwargs=self.images_kwargs),
                                        self.tokenizer, ignore_index=self.ignore_index,
                                        **self.label_kwargs).tolist()
                    for im, ws in zip(images, words)
                ]
            except ValueError as e:
                raise ValueError(f"row {row}: {e}") from None
            out[self.label_column].append(labs if multi else labs[0])
        return out


def label_dataset(
    ds,
    processor,
    *,
    image_column: str = "image",
    words_column: str = "words",
    ocr: str | None = None,
    num_proc: int | None = None,
    label_column: str = "vision_labels",
    input_ids_column: str | None = None,
    tokenizer=None,
    image_token_id: int | None = None,
    images_kwargs: Mapping[str, Any] | None = None,
    mode: str = "first",
    min_coverage: float = 0.25,
    min_score: float | None = None,
    add_prefix_space: bool | None = None,
    ignore_index: int = -100,
    ocr_lang: str = "eng",
    ocr_cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    **map_kwargs,
):
    """``ds`` with a ``label_column`` (``vision_labels``) column: every row's image labeled from its
    OCR words, as the CLI and the collator label it.

    Args:
        ds: a ``datasets.Dataset`` (or a ``DatasetDict``: every split). ``image_column`` holds one image
            per row (a PIL image, as the ``Image`` feature decodes, or a path) or a list of images.
        processor: the model's processor: its settings decide each image's grid
            (:meth:`VisualGrid.from_processor`); its tokenizer tokenises the words unless ``tokenizer``.
        words_column: the OCR words of each image, a list of ``{"text", "box": [x0, y0, x1, y1] (or 4
            points), "score"?}`` in image pixels (one list per image for a list of images); None or []
            for a page without words (its labels are all ``ignore_index``).
        ocr: an engine (``"tesseract"``, see :func:`~dvsft_kernels.labeling.ocr.run_ocr`) to read the
            words on the fly instead; they are stored in ``words_column`` too (which must not exist),
            boxes as (x0, y0, x1, y1). ``ocr_lang``, ``ocr_cache_dir``: run_ocr's ``lang``, ``cache_dir``.
        num_proc: worker processes of ``ds.map`` (None: this process); the column does not depend on it.
        label_column: the new column's name.
        input_ids_column: None: a row's labels are its image's visual-token run, ``grid.num_tokens``
            long (one list per image for a list of images), what ``dvsft-kernels label`` writes as
            ``labels``; a column of the processor's ``input_ids`` (images expanded): labels aligned
            with it, ``ignore_index`` off the image placeholders (what the model takes as
            ``vision_labels``), placed by :func:`build_vision_labels_from_processor`.
        tokenizer, image_token_id, images_kwargs: as for :func:`build_vision_labels_from_processor`.
        mode, min_coverage, min_score, add_prefix_space, ignore_index: :func:`label_visual_tokens`.
        batch_size: rows per ``map`` batch. ``map_kwargs`` go to ``ds.map`` (``load_from_cache_file``,
            ``desc``, ``cache_file_name``, ...).

    Raises ValueError naming the argument for bad arguments; a bad row (unreadable image, malformed
    words, placeholders that do not match the grid) stops the map with a ValueError naming the column
    and the row index.
    """
    import datasets

    from dvsft_kernels.labeling import registry
    from dvsft_kernels.labeling.ocr import check_engine

    if isinstance(ds, datasets.DatasetDict):
        kw = {"image_column": image_column, "words_column": words_column, "ocr": ocr, "num_proc": num_proc,
              "label_column": label_column, "input_ids_column": input_ids_column, "tokenizer": tokenizer,
              "image_token_id": image_token_id, "images_kwargs": images_kwargs, "mode": mode,
              "min_coverage": min_coverage, "min_score": min_score, "add_prefix_space": add_prefix_space,
              "ignore_index": ignore_index, "ocr_lang": ocr_lang, "ocr_cache_dir": ocr_cache_dir,
              "batch_size": batch_size}
        return datasets.DatasetDict({split: label_dataset(d, processor, **kw, **map_kwargs)
                                     for split, d in ds.items()})
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"ds: expected a datasets.Dataset or DatasetDict, got {type(ds).__name__}")
    cols = ds.column_names

    def need(name: str, value) -> None:
        if value not in cols:
            raise ValueError(f"{name}: {value!r} is not a column of the dataset (columns: {', '.join(cols)})")

    need("image_column", image_column)
    if ocr is None:
        need("words_column", words_column)
    else:
        try:
            check_engine(ocr)
        except ValueError as e:
            raise ValueError(f"ocr: {str(e).removeprefix('engine: ')}") from None
        if words_column in cols:
            raise ValueError(f"ocr: the dataset already has a {words_column!r} column (words_column); pass "
                             "ocr=None to label from it, or another words_column to store the OCR words in")
    if input_ids_column is not None:
        need("input_ids_column", input_ids_column)
    if label_column in cols:
        raise ValueError(f"label_column: {label_column!r} is already a column; remove it "
                         "(ds.remove_columns) or pass another label_column")
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise ValueError(f"num_proc: expected None or an int >= 1, got {num_proc!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if mode not in ("first", "aligned"):
        raise ValueError(f"mode: expected 'first' or 'aligned', got {mode!r}")
    if not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"min_coverage: expected a number in (0, 1], got {min_coverage!r}")
    try:
        registry.for_processor(processor)
    except (TypeError, ValueError) as e:
        raise ValueError(f"processor: {e}") from None
    tok = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
    if tok is None:
        raise ValueError("tokenizer: the processor has no tokenizer; pass tokenizer=")
    if input_ids_column is not None and image_token_id is None:
        from dvsft_kernels.labeling import families

        image_token_id = families.image_token_id(processor)

    labeler = _Labeler(
        processor, tok, image_column=image_column, words_column=words_column, ocr=ocr,
        ocr_options={"lang": ocr_lang, "cache_dir": ocr_cache_dir}, label_column=label_column,
        input_ids_column=input_ids_column, image_token_id=image_token_id,
        images_kwargs=None if images_kwargs is None else dict(images_kwargs), ignore_index=ignore_index,
        label_kwargs={"mode": mode, "min_coverage": min_coverage, "min_score": min_score,
                      "add_prefix_space": add_prefix_space},
    )
    # explicit types: a shard whose rows all have empty lists would otherwise infer a null type
    labels_t = datasets.List(datasets.Value("int64"))
    word_t = datasets.List({"text": datasets.Value("string"), "box": datasets.List(datasets.Value("float64")),
                            "score": datasets.Value("float64")})
    multi = _multi_image(ds.features.get(image_column))
    features = ds.features.copy()
    features[label_column] = datasets.List(labels_t) if multi and input_ids_column is None else labels_t
    if ocr is not None:
        features[words_column] = datasets.List(word_t) if multi else word_t
    map_kwargs.setdefault("desc", "labeling")
    return ds.map(labeler, batched=True, batch_size=batch_size, with_indices=True, num_proc=num_proc,
                  features=features, **map_kwargs)


def _multi_image(feature) -> bool:
    """Whether a column's feature holds a list of images per row."""
    import datasets

    kinds = tuple(k for k in (getattr(datasets, "List", None), getattr(datasets, "LargeList", None),
                              getattr(datasets, "Sequence", None)) if isinstance(k, type))
    return isinstance(feature, (list, *kinds))
