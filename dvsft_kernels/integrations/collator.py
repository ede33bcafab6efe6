"""`DVSFTCollator`: samples `{image, words, messages}` -> a model batch with `labels` (answer
tokens only) and `vision_labels` (the OCR word under each visual token).

The processor is the only source of truth for the token layout: the chat template renders each
conversation, the processor expands image placeholders and tokenises, and

* answer tokens are found through the processor's own offsets: each assistant turn's character span
  (the text between the generation prompt and the end of the turn, end-of-turn marker included) is
  mapped through `text_replacement_offsets` (where image placeholders were expanded) onto the
  expanded text, and a token is a label when its `offset_mapping` start lies in a span;
* vision labels come from `dvsft_kernels.labeling.build_vision_labels_from_processor`, which
  rebuilds each image's visual-token grid from the processor and places the words' token ids at
  the image's placeholder positions.

Everything else the processor returns (pixel values, `image_grid_thw`, `mm_token_type_ids`,
`token_type_ids`, `image_sizes`, `pixel_attention_mask`, ...) passes through unchanged.

Bad records (docs/labeling.md, "Collating with OCR"): a record without messages, or whose image is
missing, unreadable, truncated or over Pillow's decompression-bomb limit, is left out of the batch,
counted in `collator.skipped` (reason -> count) and logged; an image where OCR finds no words, where
the OCR engine fails, or whose given words are malformed keeps its text labels and gets no vision
labels (`collator.vision_stats`).
`strict=True` raises a ValueError naming the record instead of skipping it.
"""

from __future__ import annotations

import logging
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

_DROP = ("offset_mapping", "text_replacement_offsets")
log = logging.getLogger(__name__)

#: reasons a record is left out of a batch (keys of ``DVSFTCollator.skipped``)
SKIP_REASONS = ("no_messages", "missing_file", "unreadable_image", "decompression_bomb")


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _record_name(s, i: int) -> str:
    rid = s.get("id") if isinstance(s, Mapping) else None
    return f"sample {i}" if rid is None else f"sample {i} (id {rid!r})"


def _listify(x) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


class DVSFTCollator:
    """Collate DV-SFT samples with a Hugging Face processor (fast tokenizer required).

    A sample is a mapping with
      * ``messages``: a chat in the processor's format (``{"role", "content"}``; content a string or
        a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts). When no message holds
        an image part, one is put before the first user message's text for each image;
      * ``image`` (one image) or ``images`` (a list);
      * ``words``: the OCR words of the image (``OCRWord`` / ``(text, box[, score])`` / dicts), or one such
        list per image when there are several; ``[]``: no vision labels for that image; absent or
        ``None``: read by ``ocr`` when it is set, else no vision labels;
      * ``id`` (optional): named in warnings and errors.

    Images given as paths are opened here (a PIL image is loaded here), so an unreadable one is a
    skipped record rather than an error inside the processor.

    Args:
        processor: the model's processor (image processor + tokenizer + chat template).
        train_on: ``"assistant"`` (every assistant turn) or ``"last"`` (the final assistant turn only).
        mode, min_coverage, label_kwargs: labeling options (see ``label_visual_tokens``).
        soft, spread: soft vision labels (``label_visual_tokens(..., soft=K, spread=...)``): the
            batch then holds ``vision_labels`` (B, T, K) and ``vision_label_weights`` (B, T, K),
            which ``DVLoss`` / ``attach`` / ``DVSFTTrainer`` take as they are.
        image_token_id: the model's ``config.image_token_id`` if it differs from the processor's.
        max_length: refuse batches longer than this (truncation would cut image runs).
        processor_kwargs: extra keyword arguments for the processor call.
        ocr: words for records without them: an engine name (``"tesseract"``, ``"paddleocr"``,
            ``"doctr"``; ``dvsft_kernels.labeling.run_ocr``, cached by the image's content, so later
            epochs do not rerun it), a callable ``image -> words`` (called with the PIL image), or None.
        ocr_kwargs: keyword arguments for ``run_ocr`` (``lang``, ``cache_dir``, ``min_confidence``, ...).
        strict: raise a ValueError naming the record on bad data instead of skipping it (see the
            module docstring); an empty page is never an error.

    Attributes:
        skipped: ``Counter`` of records left out, by reason (:data:`SKIP_REASONS`).
        vision_stats: ``Counter``: ``ocr_pages`` (images read by OCR), and images kept without vision
            labels: ``no_words`` (OCR found none), ``ocr_failed`` (the engine failed), ``bad_words``
            (the record's words are malformed: not a list of words, a bad box or text).
    """

    #: raw sample keys a Trainer must not drop before collation (read by the DV-SFT trainer mixin)
    dvsft_input_columns = ("image", "images", "words", "messages", "id")

    def __init__(
        self,
        processor,
        *,
        train_on: str = "assistant",
        mode: str = "first",
        min_coverage: float = 0.25,
        image_token_id: int | None = None,
        ignore_index: int = -100,
        max_length: int | None = None,
        processor_kwargs: Mapping[str, Any] | None = None,
        label_kwargs: Mapping[str, Any] | None = None,
        soft: int | None = None,
        spread: float = 0.0,
        ocr=None,
        ocr_kwargs: Mapping[str, Any] | None = None,
        strict: bool = False,
    ):
        if not isinstance(strict, bool):
            raise ValueError(f"strict: expected True or False, got {strict!r}")
        self.ocr, self.ocr_kwargs = self._check_ocr(ocr, ocr_kwargs)
        self.strict = strict
        self.skipped: Counter = Counter()
        self.vision_stats: Counter = Counter()
        if train_on not in ("assistant", "last"):
            raise ValueError(f"train_on: expected 'assistant' or 'last', got {train_on!r}")
        tok = getattr(processor, "tokenizer", None)
        if tok is None or not getattr(tok, "is_fast", False):
            raise ValueError("processor: needs a fast tokenizer (offset mappings locate the answer tokens)")
        if getattr(processor, "chat_template", None) is None and getattr(tok, "chat_template", None) is None:
            raise ValueError("processor: has no chat template to render `messages` with")
        self.processor, self.tokenizer = processor, tok
        self.train_on, self.ignore_index, self.max_length = train_on, int(ignore_index), max_length
        self.image_token_id = image_token_id
        self.processor_kwargs = dict(processor_kwargs or {})
        from dvsft_kernels.labeling.assign import check_soft_options

        check_soft_options(soft, spread)
        soft_kwargs = {"soft": soft, "spread": spread} if soft is not None else {}
        self.label_kwargs = {"mode": mode, "min_coverage": min_coverage, **soft_kwargs, **dict(label_kwargs or {})}

    @staticmethod
    def _check_ocr(ocr, ocr_kwargs):
        import inspect

        from dvsft_kernels.labeling.ocr import check_engine, engine_options, run_ocr

        kwargs = dict(ocr_kwargs or {})
        if ocr is None or callable(ocr):
            if kwargs:
                raise ValueError("ocr_kwargs: only used with an OCR engine name (ocr='tesseract', ...)")
            return ocr, kwargs
        if not isinstance(ocr, str):
            raise ValueError(f"ocr: expected an engine name, a callable or None, got {type(ocr).__name__}")
        try:
            check_engine(ocr)
        except ValueError as e:  # OCREngineMissing keeps its type
            raise type(e)(f"ocr: {str(e).removeprefix('engine: ')}") from None
        try:
            inspect.signature(run_ocr).bind(None, ocr, **kwargs)
        except TypeError as e:
            raise ValueError(f"ocr_kwargs: {e}") from None
        if "engine" in kwargs:
            raise ValueError("ocr_kwargs: pass the engine as ocr=, not in ocr_kwargs")
        try:
            engine_options(ocr, kwargs)  # bad values fail now, not in the first batch
        except ValueError as e:
            raise ValueError(f"ocr_kwargs: {e}") from None
        return ocr, kwargs

    # ---- per sample ----------------------------------------------------------------------------------

    def _sample(self, s: Mapping, i: int):
        from dvsft_kernels.labeling.ocr import ImageError, load_image

        name = _record_name(s, i)
        if not isinstance(s, Mapping) or not s.get("messages"):
            raise _Skip("no_messages", f"{name}: expected a mapping with 'messages' (and 'image' / 'images', "
                        "'words')")
        images = _listify(s.get("images")) or _listify(s.get("image"))
        loaded = []
        for k, img in enumerate(images):
            if isinstance(img, str) or hasattr(img, "__fspath__") or hasattr(img, "load"):
                where = f"{name}: image" if len(images) == 1 else f"{name}: images[{k}]"
                try:
                    img = load_image(img, name=where)
                except ImageError as e:
                    raise _Skip(e.reason, str(e)) from None
            loaded.append(img)
        images = loaded
        words = s.get("words")
        if len(images) <= 1:
            words = [words] if images else []
        else:
            words = list(words) if words is not None else [None] * len(images)
            if len(words) != len(images):
                raise ValueError(f"sample {i}: {len(images)} images but {len(words)} word lists")
        words = [
            self._ocr(img, name) if w is None else self._given_words(w, name if len(images) == 1 else
                                                                     f"{name}: images[{k}]")
            for k, (img, w) in enumerate(zip(images, words))
        ]
        messages = self._with_image_parts([dict(m) for m in s["messages"]], len(images), i)
        return images, words, messages

    def _given_words(self, words, name: str) -> list:
        """``words`` as a list when every word has a str text and a usable box, else [] (counted and
        logged; ``strict``: a ValueError naming the record)."""
        from dvsft_kernels.labeling.assign import word_box, word_fields

        try:
            if isinstance(words, (str, bytes, Mapping)) or not hasattr(words, "__iter__"):
                raise ValueError(f"words: expected a list of words, got {type(words).__name__}")
            words = list(words)
            for j, w in enumerate(words):
                text, box, score = word_fields(w, j)
                if not isinstance(text, str):
                    raise ValueError(f"words[{j}].text must be a str, got {type(text).__name__}")
                word_box(box, j)
                if score is not None and (isinstance(score, bool) or not isinstance(score, numbers.Real)):
                    raise ValueError(f"words[{j}].score must be a number, got {score!r}")
        except (TypeError, ValueError) as e:
            if self.strict:
                raise ValueError(f"{name}: {e}") from None
            self.vision_stats["bad_words"] += 1
            log.warning("DVSFTCollator: %s: %s; the image gets no vision labels", name, e)
            return []
        return words

    def _ocr(self, image, name: str) -> list:
        """The words of a record's image read by ``self.ocr`` ([] without one, or when it fails)."""
        if self.ocr is None:
            return []
        from dvsft_kernels.labeling.ocr import OCRFailed, run_ocr

        self.vision_stats["ocr_pages"] += 1
        try:
            if callable(self.ocr):
                words = list(self.ocr(image) or [])
            else:
                from PIL import Image

                if not isinstance(image, Image.Image):
                    raise OCRFailed(f"OCR needs a path or a PIL image, got {type(image).__name__}")
                words = run_ocr(image, self.ocr, **self.ocr_kwargs)
        except Exception as e:  # an engine's failure on one page must not stop the epoch
            if not callable(self.ocr) and isinstance(e, ValueError):
                raise  # a configuration error (e.g. a language not installed): every page would fail
            if self.strict:
                raise ValueError(f"{name}: OCR failed: {e}") from e
            self.vision_stats["ocr_failed"] += 1
            log.warning("DVSFTCollator: %s: OCR failed (%s); the image gets no vision labels", name, e)
            return []
        if callable(self.ocr) and words:
            words = self._given_words(words, name)  # a user's reader may return anything
            if not words:
                return []  # counted as bad_words
        if not words:
            self.vision_stats["no_words"] += 1
        return words

    @staticmethod
    def _with_image_parts(messages, n_images, i):
        def n_parts(m):
            c = m.get("content")
            return 0 if isinstance(c, str) or c is None else sum(1 for p in c if p.get("type") == "image")

        have = sum(n_parts(m) for m in messages)
        if have == n_images:
            return messages
        if have != 0:
            raise ValueError(f"sample {i}: messages hold {have} image parts for {n_images} images")
        for m in messages:
            if m.get("role") == "user":
                c = m.get("content")
                parts = [{"type": "text", "text": c}] if isinstance(c, str) else list(c or [])
                m["content"] = [{"type": "image"} for _ in range(n_images)] + parts
                return messages
        raise ValueError(f"sample {i}: no user message to put the image in")

    def _render(self, messages, **kw) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, **kw)

    def _answer_spans(self, messages, text: str, i: int) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in the rendered text."""
        turns = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
        if self.train_on == "last":
            turns = turns[-1:]
        spans = []
        for k in turns:
            prefix = self._render(messages[:k], add_generation_prompt=True)
            upto = self._render(messages[: k + 1])
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise ValueError(
                    f"sample {i}: the chat template is not prefix-stable (rendering the conversation up to "
                    f"turn {k} is not a prefix of the whole), so the answer tokens cannot be located; use a "
                    "template that renders earlier turns identically"
                )
            spans.append((len(prefix), len(upto)))
        return spans

    # ---- batch ---------------------------------------------------------------------------------------

    def __call__(self, samples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        from dvsft_kernels.labeling import SoftLabels, build_vision_labels_from_processor

        if not samples:
            raise ValueError("samples: empty batch")
        parsed, index, skipped = [], [], Counter()
        first = None
        for i, s in enumerate(samples):
            try:
                parsed.append(self._sample(s, i))
                index.append(i)
            except _Skip as e:
                if self.strict:
                    raise ValueError(str(e)) from None
                skipped[e.reason] += 1
                first = first or str(e)
                log.warning("DVSFTCollator: skipped %s (%s)", e, e.reason)
        self.skipped.update(skipped)
        if not parsed:
            why = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
            raise ValueError(f"samples: every record of the batch was skipped ({why}); first: {first}")
        texts, spans = [], []
        for i, (_, _, messages) in zip(index, parsed):
            text = self._render(messages)
            texts.append(text)
            spans.append(self._answer_spans(messages, text, i))
        images = [p[0] for p in parsed]
        any_image = any(images)
        kwargs = {
            "padding": True,
            "return_tensors": "pt",
            "return_offsets_mapping": True,
            "return_text_replacement_offsets": True,
            **self.processor_kwargs,
        }
        if any_image:
            if not all(images):
                raise ValueError("samples: a batch mixes samples with and without images; keep them apart")
            out = self.processor(text=texts, images=images, **kwargs)
        else:
            out = self.processor(text=texts, **kwargs)
        input_ids = out["input_ids"]
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"batch length {input_ids.shape[1]} > max_length={self.max_length}; truncating would cut "
                "image placeholder runs, so shorten the text or raise max_length"
            )

        labels = self._labels(out, spans, any_image)
        batch = {k: v for k, v in out.items() if k not in _DROP}
        batch["labels"] = labels
        if any_image:
            words = [p[1] for p in parsed]
            vision = build_vision_labels_from_processor(
                self.processor,
                images,
                out,
                words,
                image_token_id=self.image_token_id,
                ignore_index=self.ignore_index,
                **self.label_kwargs,
            )
            if isinstance(vision, SoftLabels):  # (ids, weights), each (B, T, K)
                batch["vision_labels"], batch["vision_label_weights"] = vision.to(input_ids.device)
            else:
                batch["vision_labels"] = vision.to(input_ids.device)
        return dict(batch)

    def _labels(self, out, spans, any_image: bool) -> torch.Tensor:
        if "offset_mapping" not in out:
            raise ValueError("processor: did not return offset_mapping (a fast tokenizer is required)")
        offsets = out["offset_mapping"]
        reps = out.get("text_replacement_offsets")
        if reps is None and any_image:
            raise ValueError(
                "processor: did not return text_replacement_offsets; cannot map the answer spans past "
                "the expanded image placeholders (transformers >= 5.x processors do)"
            )
        ids = out["input_ids"]
        mask = out.get("attention_mask", torch.ones_like(ids))
        labels = torch.full_like(ids, self.ignore_index)
        for b, sample_spans in enumerate(spans):
            if not sample_spans:
                continue
            shifts = (
                []
                if reps is None
                else [
                    (r["span"][1], (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]))
                    for r in reps[b]
                ]
            )

            def expanded(p, shifts=shifts):
                return p + sum(d for end, d in shifts if end <= p)

            starts = offsets[b, :, 0]
            ends = offsets[b, :, 1]
            real = (mask[b] == 1) & (ends > starts)
            keep = torch.zeros_like(real)
            for a, z in sample_spans:
                ea, ez = expanded(a), expanded(z)
                keep |= real & (starts >= ea) & (starts < ez)
            labels[b] = torch.where(keep, ids[b], labels[b])
        return labels
