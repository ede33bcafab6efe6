"""Per-image labels -> a (B, T) ``vision_labels`` tensor aligned with ``input_ids``.

Each image's placeholder positions are found by scanning ``input_ids`` for ``image_token_id``
(``model.config.image_token_id``) and matching maximal runs, in order, against the grids'
``segments``:

* most families: one segment per image (LLaVA-NeXT / OneVision newlines are placeholder tokens
  too, so they sit inside the segment and stay unlabeled); two adjacent images may share one run;
* Pixtral / Mistral 3: one segment per row, and exactly one other token (``[IMG_BREAK]``) between
  rows; the ``[IMG_END]`` closing the image is outside every segment;
* Idefics3 / SmolVLM / Gemma 3 pan-and-scan: one segment per view; whatever text separates views
  (``<fake_token_around_image>``, ``<row_i_col_j>``, "here are some crops") is skipped.

Any count mismatch (truncated prompt, wrong grid, missing or extra image) raises ValueError; labels
are never shifted silently.

Soft labels (``soft=K``; per image a :class:`SoftLabels` of (num_tokens, K)) are placed the same way
and come back as a :class:`SoftLabels` of (B, T, K): ``ids`` ``ignore_index`` and ``weights`` 0 at
every position that is not a labeled image token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dvsft_kernels.labeling.assign import check_soft_options, label_visual_tokens
from dvsft_kernels.labeling.grid import VisualGrid
from dvsft_kernels.labeling.types import SoftLabels


def placeholder_runs(ids: np.ndarray, image_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the maximal runs of ``image_token_id`` in a 1-D id sequence."""
    m = np.asarray(ids) == image_token_id
    if not m.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d = np.diff(np.concatenate(([False], m, [False])).astype(np.int8))
    starts = np.flatnonzero(d == 1)
    return starts, np.flatnonzero(d == -1) - starts


def _as_ids(input_ids) -> tuple[np.ndarray, bool, torch.device | None]:
    device = input_ids.device if isinstance(input_ids, torch.Tensor) else None
    if isinstance(input_ids, torch.Tensor):
        arr = input_ids.detach().cpu().numpy()
    else:
        try:
            arr = np.asarray(input_ids)
        except ValueError:
            raise ValueError("input_ids must be rectangular (B, T); pad the batch first") from None
    if (
        arr.dtype == object
        or arr.ndim not in (1, 2)
        or (arr.size and not np.issubdtype(arr.dtype, np.integer))
    ):
        raise ValueError(
            f"input_ids must be an integer (B, T) or (T,) tensor / array, got shape {arr.shape} "
            f"dtype {arr.dtype}"
        )
    squeeze = arr.ndim == 1
    return (arr[None] if squeeze else arr), squeeze, device


def _flatten(grids, name: str) -> tuple[list, list[int] | None]:
    """Flat list and, for a nested (per-sample) input, the number of items per sample."""
    if isinstance(grids, (VisualGrid, torch.Tensor)) or not isinstance(grids, Sequence):
        raise TypeError(f"{name} must be a list (flat, in batch order) or a list of per-sample lists")
    # a SoftLabels is a (named) tuple, but one image's labels, not a sample's list
    if len(grids) and all(isinstance(g, (list, tuple)) and not isinstance(g, SoftLabels) for g in grids):
        return [g for sample in grids for g in sample], [len(sample) for sample in grids]
    return list(grids), None


def _segment_plan(ids: np.ndarray, grids: list[VisualGrid], per_sample: list[int] | None, token: int):
    """[(b, grid index, grid start, length, input start)] for every segment; raises on mismatch."""
    plan = []
    B = ids.shape[0]
    if per_sample is not None and len(per_sample) != B:
        raise ValueError(f"grids has {len(per_sample)} samples but input_ids has batch size {B}")
    gi = 0
    for b in range(B):
        starts, lens = placeholder_runs(ids[b], token)
        k, q = 0, 0
        last = gi + per_sample[b] if per_sample is not None else len(grids)
        while k < len(starts):
            if gi >= last:
                raise ValueError(
                    f"sample {b}: image tokens at positions {int(starts[k] + q)}.. "
                    f"({int(lens[k] - q)} of them in that run) have no grid left ({gi} grids consumed); "
                    "missing grid / words, or the grids are for different images"
                )
            g = grids[gi]
            prev = None
            for s, ln in g.segments:
                if q == lens[k]:
                    k, q = k + 1, 0
                if k >= len(starts):
                    raise ValueError(
                        f"sample {b}: image {gi} ({g.family}, {g.num_tokens} tokens, segments "
                        f"{list(g.segments)}) runs past the last image token of the sequence "
                        "(truncated prompt?)"
                    )
                if q + ln > lens[k]:
                    raise ValueError(
                        f"sample {b}: image {gi} ({g.family}) expects {ln} consecutive image tokens at "
                        f"position {int(starts[k] + q)} but the run there has {int(lens[k] - q)}; grid and "
                        "placeholders disagree (wrong processor settings, wrong image, or truncation)"
                    )
                pos = int(starts[k] + q)
                if prev is not None:
                    gap = s - prev[0]
                    if gap > 0 and pos - prev[1] != gap:
                        raise ValueError(
                            f"sample {b}: image {gi} ({g.family}) expects {gap} separator token(s) at "
                            f"position {prev[1]}, found {pos - prev[1]}"
                        )
                plan.append((b, gi, s, ln, pos))
                q += ln
                prev = (s + ln, pos + ln)
            gi += 1
            if q == lens[k]:
                k, q = k + 1, 0
        if per_sample is not None and gi != last:
            raise ValueError(f"sample {b}: {last - gi} grid(s) left over after its last image token")
    if gi != len(grids):
        raise ValueError(
            f"{len(grids) - gi} grid(s) left over after the last image token of the batch "
            f"({len(grids)} grids for {gi} images found in input_ids)"
        )
    return plan


def scatter_vision_labels(
    input_ids, grids, image_labels, *, image_token_id: int, ignore_index: int = -100
) -> torch.Tensor | SoftLabels:
    """Place per-image labels (each a (grid.num_tokens,) tensor) at their placeholder positions.

    ``grids`` / ``image_labels``: flat lists in batch order, or per-sample lists. Returns a LongTensor
    shaped like ``input_ids`` (on its device), ``ignore_index`` everywhere else. When every image's
    labels are a :class:`SoftLabels` (all with the same K), returns a :class:`SoftLabels` of
    ``input_ids.shape + (K,)``, ids ``ignore_index`` and weights 0 everywhere else."""
    if isinstance(image_token_id, bool) or not isinstance(image_token_id, (int, np.integer)):
        raise ValueError(f"image_token_id must be an int, got {image_token_id!r}")
    ids, squeeze, device = _as_ids(input_ids)
    flat, per_sample = _flatten(grids, "grids")
    labs, per_sample_l = _flatten(image_labels, "image_labels")
    if len(labs) != len(flat) or (
        per_sample is not None and per_sample_l is not None and per_sample != per_sample_l
    ):
        raise ValueError(f"image_labels has {len(labs)} images, grids {len(flat)}")
    is_soft = [isinstance(lab, SoftLabels) for lab in labs]
    if any(is_soft) and not all(is_soft):
        raise ValueError("image_labels: mixes soft (SoftLabels) and hard labels; label every image alike")
    K = int(labs[0].ids.shape[-1]) if labs and is_soft[0] and labs[0].ids.dim() == 2 else None
    for i, (g, lab) in enumerate(zip(flat, labs)):
        if not isinstance(g, VisualGrid):
            raise TypeError(f"grids[{i}] must be a VisualGrid, got {type(g).__name__}")
        if is_soft[i]:
            if tuple(lab.ids.shape) != (g.num_tokens, K) or tuple(lab.weights.shape) != (g.num_tokens, K):
                raise ValueError(
                    f"image_labels[{i}]: soft ids {tuple(lab.ids.shape)} / weights {tuple(lab.weights.shape)}, "
                    f"expected ({g.num_tokens}, K) with the same K = {K} for every image"
                )
        elif tuple(lab.shape) != (g.num_tokens,):
            raise ValueError(f"image_labels[{i}] has shape {tuple(lab.shape)}, expected ({g.num_tokens},)")
    plan = _segment_plan(ids, flat, per_sample, int(image_token_id))
    if labs and is_soft[0]:
        return _scatter_soft(ids, plan, labs, K, int(ignore_index), squeeze, device)
    out = np.full(ids.shape, int(ignore_index), dtype=np.int64)
    lab_np = [
        lab.detach().cpu().numpy() if isinstance(lab, torch.Tensor) else np.asarray(lab) for lab in labs
    ]
    for b, gi, s, ln, pos in plan:
        out[b, pos : pos + ln] = lab_np[gi][s : s + ln]
    res = torch.from_numpy(out[0] if squeeze else out)
    return res.to(device) if device is not None else res


def _scatter_soft(ids, plan, labs, K, ignore_index, squeeze, device) -> SoftLabels:
    out_ids = np.full(ids.shape + (K,), ignore_index, dtype=np.int64)
    out_w = np.zeros(ids.shape + (K,), dtype=np.float32)
    src = [(lab.ids.detach().cpu().numpy(), lab.weights.detach().cpu().float().numpy()) for lab in labs]
    for b, gi, s, ln, pos in plan:
        out_ids[b, pos : pos + ln] = src[gi][0][s : s + ln]
        out_w[b, pos : pos + ln] = src[gi][1][s : s + ln]
    res = SoftLabels(torch.from_numpy(out_ids[0] if squeeze else out_ids),
                     torch.from_numpy(out_w[0] if squeeze else out_w))
    return res.to(device) if device is not None else res


def build_vision_labels(
    input_ids,
    grids,
    words_per_image,
    tokenizer,
    *,
    image_token_id: int,
    ignore_index: int = -100,
    soft: int | None = None,
    spread: float = 0.0,
    **label_kwargs,
) -> torch.Tensor | SoftLabels:
    """Label every image of a batch and place the labels: (B, T) LongTensor aligned with input_ids.

    ``grids`` and ``words_per_image`` are flat lists in batch order (or per-sample lists) of
    VisualGrid and word lists; ``label_kwargs`` go to :func:`label_visual_tokens` (mode,
    min_coverage, add_prefix_space, min_score, ...).

    ``soft=K`` (and ``spread``): soft labels (:func:`label_visual_tokens`); returns a
    :class:`SoftLabels` of (B, T, K) ``ids`` / ``weights`` — a model's ``vision_labels`` and
    ``vision_label_weights`` — padded with ``ignore_index`` / 0."""
    check_soft_options(soft, spread)
    flat, per_sample = _flatten(grids, "grids")
    if isinstance(words_per_image, (str, bytes)) or not isinstance(words_per_image, Sequence):
        raise TypeError("words_per_image must be a list with one word list per image")
    if per_sample is None:  # words follow the grids' structure: image -> words
        words = list(words_per_image)
    else:  # sample -> image -> words
        if len(words_per_image) != len(per_sample) or any(
            len(ws) != c for ws, c in zip(words_per_image, per_sample)
        ):
            raise ValueError(
                "words_per_image must have the same per-sample structure as grids: "
                f"grids {per_sample} images per sample"
            )
        words = [w for sample in words_per_image for w in sample]
    if len(words) != len(flat):
        raise ValueError(f"words_per_image has {len(words)} images but grids has {len(flat)}")
    if label_kwargs.get("return_report"):
        raise ValueError("return_report is not available here; call label_visual_tokens per image")
    if soft is not None:
        label_kwargs.update(soft=soft, spread=spread)
    labs = [
        label_visual_tokens(w, g, tokenizer, ignore_index=ignore_index, **label_kwargs)
        for w, g in zip(words, flat)
    ]
    nested_labs = labs if per_sample is None else _renest(labs, per_sample)
    out = scatter_vision_labels(
        input_ids, grids, nested_labs, image_token_id=image_token_id, ignore_index=ignore_index
    )
    if soft is not None and not labs:  # no image: nothing told scatter the labels are soft
        ids = out.unsqueeze(-1).expand(*out.shape, soft).contiguous()
        return SoftLabels(ids, torch.zeros(ids.shape, dtype=torch.float32, device=ids.device))
    return out


def _is_size(x) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, (int, np.integer)) for v in x)


def _flatten_images(images) -> tuple[list, list[int] | None]:
    if _is_size(images) or not isinstance(images, Sequence):
        images = [images]  # a single image
    if len(images) and all(isinstance(x, (list, tuple)) and not _is_size(x) for x in images):
        return [im for sample in images for im in sample], [len(sample) for sample in images]
    return list(images), None


def _renest(items: list, counts: list[int]) -> list[list]:
    out, i = [], 0
    for c in counts:
        out.append(items[i : i + c])
        i += c
    return out


def build_vision_labels_from_processor(
    processor,
    images,
    outputs,
    words_per_image,
    *,
    tokenizer=None,
    image_token_id: int | None = None,
    images_kwargs=None,
    ignore_index: int = -100,
    soft: int | None = None,
    spread: float = 0.0,
    **label_kwargs,
) -> torch.Tensor | SoftLabels:
    """The same from a processor call (``soft=K``: a :class:`SoftLabels` of (B, T, K)): ``images`` are the images given to the processor (flat in
    batch order, or per-sample lists; (H, W) pairs also do), ``outputs`` its BatchFeature (with
    ``input_ids``), ``words_per_image`` one word list per image in the same structure. Grids come
    from :meth:`VisualGrid.from_processor`; the tokenizer and image token id from the processor
    unless given (Gemma 3: its ``<image_soft_token>``)."""
    from dvsft_kernels.labeling import families

    check_soft_options(soft, spread)
    if outputs is None or "input_ids" not in outputs:
        raise ValueError("outputs must be the processor's output with 'input_ids' (call it with text)")
    flat_images, per_sample = _flatten_images(images)
    grids = [
        VisualGrid.from_processor(processor, im, outputs, i, images_kwargs=images_kwargs)
        for i, im in enumerate(flat_images)
    ]
    tok = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
    if tok is None:
        raise ValueError("processor has no tokenizer; pass tokenizer=")
    tid = families.image_token_id(processor) if image_token_id is None else image_token_id
    return build_vision_labels(
        outputs["input_ids"],
        grids if per_sample is None else _renest(grids, per_sample),
        words_per_image,
        tok,
        image_token_id=tid,
        ignore_index=ignore_index,
        soft=soft,
        spread=spread,
        **label_kwargs,
    )
