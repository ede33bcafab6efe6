"""Test-only helpers for the labeling geometry tests: tiny tokenizers, offline processors, a
coordinate-encoding image and per-family decoders that recover, for every visual token, which
original pixels it sees. The decoders follow the *model's* code path (transformers' own
``pack_image_features`` / ``pixel_shuffle`` where the order is non-trivial), never the grid code
under test, so they are an independent oracle for the geometry.

Offline limits of transformers 5.24 without torchvision / num2words (checked, not assumed):
* Qwen2-VL / Qwen2.5-VL / Qwen3-VL and InternVL processors refuse ``video_processor=None`` (their
  type check needs torchvision's video-processor registry): built through a subclass that only
  skips that check for a None video processor; all image/text processing is the real class.
* ``PixtralProcessor``'s module imports the torchvision image processor at import time: imported
  with that one module stubbed by the PIL module's identical ``get_resize_output_image_size``.
* ``SmolVLMProcessor`` needs the ``num2words`` package: SmolVLM is tested through its real image
  processor inside ``Idefics3Processor`` (same placeholder layout) and a bare SmolVLMProcessor
  object for family detection.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import torch
import transformers as T
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "invoice total amount date number page",
    "hello world receipt tax subtotal address phone",
    "Größe café naïve façade 東京 数字 12345 67.89",
] * 30


@functools.cache
def byte_bpe(specials: tuple[str, ...] = (), extra: tuple[tuple[str, str], ...] = (), vocab_size: int = 420):
    """A byte-level BPE tokenizer (GPT-2 / Qwen style) trained in milliseconds on a tiny corpus;
    ``<pad>`` is its padding token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tr = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", *specials],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, tr)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", extra_special_tokens=dict(extra))


def novideo(cls):
    """``cls`` accepting ``video_processor=None`` without torchvision: the package's own
    (dvsft_kernels/readout.py)."""
    from dvsft_kernels.readout import video_free_class

    return video_free_class(cls)


def pixtral_processor_class():
    """PixtralProcessor without torchvision: the package's own loader (dvsft_kernels/readout.py)."""
    from dvsft_kernels.readout import pixtral_processor_class as load

    return load()


QWEN_SPECIALS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
IDEFICS_SPECIALS = ("<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>") + tuple(
    f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)
)


def make_processor(family: str, **cfg):
    """(processor, prompt with one image placeholder) built offline from classes."""
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        cls = {
            "qwen2_vl": T.Qwen2VLProcessor,
            "qwen2_5_vl": T.Qwen2_5_VLProcessor,
            "qwen3_vl": T.Qwen3VLProcessor,
        }[family]
        p = novideo(cls)(image_processor=T.Qwen2VLImageProcessor(**cfg), tokenizer=byte_bpe(QWEN_SPECIALS))
        return p, "hi <|vision_start|><|image_pad|><|vision_end|> there"
    if family == "llava":
        ip_cfg = {k: cfg.pop(k) for k in list(cfg) if k in ("size", "crop_size", "do_pad", "do_center_crop")}
        ip_cls = (
            T.CLIPImageProcessor if cfg.pop("clip", False) else T.LlavaImageProcessor
        )  # llava-1.5-hf uses CLIP's
        p = T.LlavaProcessor(image_processor=ip_cls(**ip_cfg), tokenizer=byte_bpe(("<image>",)), **cfg)
        return p, "hi <image> there"
    if family == "llava_next":
        ip_cfg = {k: cfg.pop(k) for k in list(cfg) if k in ("size", "crop_size", "image_grid_pinpoints")}
        p = T.LlavaNextProcessor(
            image_processor=T.LlavaNextImageProcessor(**ip_cfg), tokenizer=byte_bpe(("<image>",)), **cfg
        )
        return p, "hi <image> there"
    if family == "llava_onevision":
        ip_cfg = {k: cfg.pop(k) for k in list(cfg) if k in ("size", "image_grid_pinpoints")}
        p = novideo(T.LlavaOnevisionProcessor)(
            image_processor=T.LlavaOnevisionImageProcessor(**ip_cfg),
            tokenizer=byte_bpe(("<image>", "<video>")),
            **cfg,
        )
        return p, "hi <image> there"
    if family == "internvl":
        ip_cfg = {k: cfg.pop(k) for k in list(cfg) if k in ("size", "min_patches", "max_patches")}
        tok = byte_bpe(
            ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
            (
                ("start_image_token", "<img>"),
                ("end_image_token", "</img>"),
                ("context_image_token", "<IMG_CONTEXT>"),
                ("video_token", "<video>"),
            ),
        )
        p = novideo(T.InternVLProcessor)(
            image_processor=T.GotOcr2ImageProcessor(**ip_cfg), tokenizer=tok, **cfg
        )
        return p, "hi <IMG_CONTEXT> there"
    if family in ("idefics3", "smolvlm"):
        ip_cls = T.Idefics3ImageProcessor if family == "idefics3" else T.SmolVLMImageProcessor
        ip_cfg = {k: cfg.pop(k) for k in list(cfg) if k in ("size", "max_image_size", "do_image_splitting")}
        p = T.Idefics3Processor(image_processor=ip_cls(**ip_cfg), tokenizer=byte_bpe(IDEFICS_SPECIALS), **cfg)
        return p, "hi <image> there"
    if family == "gemma3":
        ip_cfg = {k: cfg.pop(k) for k in list(cfg) if k in ("size",)}
        tok = byte_bpe(
            ("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
            (
                ("boi_token", "<start_of_image>"),
                ("eoi_token", "<end_of_image>"),
                ("image_token", "<image_soft_token>"),
            ),
        )
        p = T.Gemma3Processor(image_processor=T.Gemma3ImageProcessor(**ip_cfg), tokenizer=tok, **cfg)
        return p, "hi <start_of_image> there"
    if family == "pixtral":
        ip_cfg = {k: cfg.pop(k) for k in list(cfg) if k in ("size",)}
        p = pixtral_processor_class()(
            image_processor=T.PixtralImageProcessor(**ip_cfg),
            tokenizer=byte_bpe(("[IMG]", "[IMG_BREAK]", "[IMG_END]")),
            **cfg,
        )
        return p, "hi [IMG] there"
    raise KeyError(family)


# ------------------------------------------------------------------------------------------------
# coordinate image and decoding
BLUE = 128  # constant blue channel: padding (zeros or mean colour) changes it


def coord_image(h: int, w: int) -> Image.Image:
    """R encodes the pixel-centre x, G the y, linearly over the image; B is constant."""
    x = ((np.arange(w) + 0.5) / w * 255.0).round()
    y = ((np.arange(h) + 0.5) / h * 255.0).round()
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = x[None, :]
    img[..., 1] = y[:, None]
    img[..., 2] = BLUE
    return Image.fromarray(img)


def unnormalize(pv, ip) -> torch.Tensor:
    """Processor pixel values (..., 3, h, w) back to 0..255 colour values."""
    pv = torch.as_tensor(np.asarray(pv), dtype=torch.float64)
    mean = torch.tensor(ip.image_mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float64).view(3, 1, 1)
    return (pv * std + mean) / ip.rescale_factor


def decode_colour(rgb: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(..., 3) colours -> (..., 3): original x, y (continuous coordinates: pixel i spans [i, i+1))
    and blue."""
    out = rgb.clone()
    out[..., 0] = rgb[..., 0] / 255.0 * W
    out[..., 1] = rgb[..., 1] / 255.0 * H
    return out


def patch_means(img: torch.Tensor, p: int) -> torch.Tensor:
    """(N, 3, h, w) -> (N, h//p, w//p, 3): mean colour of each p x p patch (a conv's patch grid)."""
    n, c, h, w = img.shape
    hp, wp = h // p, w // p
    x = img[:, :, : hp * p, : wp * p].reshape(n, c, hp, p, wp, p)
    return x.mean(dim=(3, 5)).permute(0, 2, 3, 1).contiguous()


def _nan(d):
    return torch.full((d,), float("nan"), dtype=torch.float64)


def token_colours(
    family: str, processor, outputs, index: int = 0, *, cell_patch: int | None = None
) -> torch.Tensor:
    """(run length, 3) mean colour seen by each run position of image ``index``, NaN rows for
    positions that see no pixels (CLS, newlines, breaks), in the model's token order."""
    ip = processor.image_processor
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        thw = outputs["image_grid_thw"]
        counts = [int(t.prod()) for t in thw]
        start = sum(counts[:index])
        rows = torch.as_tensor(np.asarray(outputs["pixel_values"]))[start : start + counts[index]]
        p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        x = rows.view(-1, 3, tp, p, p).to(torch.float64).mean(dim=(2, 3, 4))  # (patches, 3) normalised
        x = unnormalize(x[..., None, None], ip)[..., 0, 0]
        return x.view(-1, m * m, 3).mean(dim=1)  # the patch merger takes m*m consecutive rows
    if family == "llava":
        img = unnormalize(outputs["pixel_values"][index], ip)[None]
        p = processor.patch_size
        toks = patch_means(img, p).reshape(-1, 3)
        lead = (processor.num_additional_image_tokens or 0) - (
            processor.vision_feature_select_strategy == "default"
        )
        return torch.cat([_nan(3)[None].expand(lead, 3), toks]) if lead else toks
    if family in ("llava_next", "llava_onevision"):
        from transformers.models.llava_next.modeling_llava_next import (
            LlavaNextModel,
            image_size_to_num_patches,
        )
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

        size = [int(v) for v in outputs["image_sizes"][index]]
        tile = outputs["pixel_values"][index].shape[-1]
        multi = family == "llava_onevision" and any(int(n) != 1 for n in outputs["batch_num_images"])
        n_views = 1 if multi else image_size_to_num_patches(size, ip.image_grid_pinpoints, tile)
        img = unnormalize(outputs["pixel_values"][index][:n_views], ip)
        p = cell_patch or 14
        feats = patch_means(img, p).reshape(n_views, -1, 3)
        cfg = types.SimpleNamespace(
            vision_config=types.SimpleNamespace(image_size=tile, patch_size=p),
            image_grid_pinpoints=ip.image_grid_pinpoints,
        )
        fake = types.SimpleNamespace(config=cfg)
        if family == "llava_next":
            out, _ = LlavaNextModel.pack_image_features(
                fake,
                [feats.float()],
                torch.tensor([size]),
                processor.vision_feature_select_strategy,
                _nan(3).float(),
            )
        else:
            out, _ = LlavaOnevisionModel.pack_image_features(
                fake, [feats.float()], torch.tensor([size]), _nan(3).float(), processor.vision_aspect_ratio
            )
        return out[0].to(torch.float64)
    if family == "internvl":
        from transformers.models.internvl.modeling_internvl import InternVLModel

        assert index == 0, "one image per call: num_patches is not in the processor outputs"
        img = unnormalize(outputs["pixel_values"], ip)
        side = round(processor.image_seq_length**0.5)
        p = img.shape[-1] // (2 * side)
        f = patch_means(img, p)  # (views, 2s, 2s, 3)
        sh = InternVLModel.pixel_shuffle(None, f, scale_factor=0.5)  # (views, s, s, 12)
        return sh.reshape(-1, 4, 3).mean(dim=1)
    if family in ("idefics3", "smolvlm"):
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

        views = outputs["pixel_values"][index]
        mask = np.asarray(outputs["pixel_attention_mask"][index]).reshape(len(views), -1).any(axis=1)
        img = unnormalize(np.asarray(views)[mask], ip)
        side = round(processor.image_seq_len**0.5)
        p = img.shape[-1] // (2 * side)
        f = patch_means(img, p).reshape(img.shape[0], -1, 3)
        sh = Idefics3Connector.pixel_shuffle(None, f, 2)  # (views, s*s, 12)
        return sh.reshape(-1, 4, 3).mean(dim=1)
    if family == "gemma3":
        assert index == 0, "one image per call: num_crops is not in the processor outputs"
        img = unnormalize(np.asarray(outputs["pixel_values"]), ip)
        side = round(processor.image_seq_length**0.5)
        pooled = torch.nn.functional.avg_pool2d(img, kernel_size=img.shape[-1] // side)
        return pooled.flatten(2).transpose(1, 2).reshape(-1, 3)  # the projector's order
    if family == "pixtral":
        rh, rw = (int(v) for v in outputs["image_sizes"][index])
        img = unnormalize(outputs["pixel_values"][index][:, :rh, :rw], ip)[None]
        p, m = processor.patch_size, processor.spatial_merge_size
        f = patch_means(img, p)[0]  # (gh*m, gw*m, 3)
        grid = f.permute(2, 0, 1)[None]
        merged = torch.nn.functional.unfold(grid, kernel_size=m, stride=m)  # Mistral3PatchMerger order
        toks = merged.view(3, m * m, -1).mean(dim=1).t()
        gh, gw = rh // (p * m), rw // (p * m)
        out = []
        for r in range(gh):
            out.append(toks[r * gw : (r + 1) * gw])
            out.append(_nan(3)[None])
        return torch.cat(out)
    raise KeyError(family)


# ------------------------------------------------------------------------------------------------
def rasterised_coverage(grid, boxes, samples: int = 1, pixel_lattice: bool = True):
    """Brute force: (num_tokens, n_words) coverage by sampling points. With ``pixel_lattice`` the points
    are the original image's pixel centres (x + 0.5, y + 0.5) refined ``samples`` times per pixel;
    each point is tested against a cell *in view coordinates* (x' = x * sx - ox), so this shares no
    arithmetic with the grid's own original-pixel bounds."""
    H, W = grid.image_size
    k = samples
    xs = (np.arange(W * k) + 0.5) / k
    ys = (np.arange(H * k) + 0.5) / k
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    inx = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] < boxes[:, 2:3])  # (n, W*k)
    iny = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] < boxes[:, 3:4])
    cov = np.zeros((grid.num_tokens, len(boxes)))
    for v in grid.views:
        vx, vy = xs * v.sx - v.ox, ys * v.sy - v.oy
        if v.rows * v.cols == 0:  # e.g. an anyres grid whose rows were all padding
            continue
        cx = (
            np.asarray(v.col_spans)
            if v.col_spans is not None
            else np.stack([np.arange(v.cols) * v.cell_w, (np.arange(v.cols) + 1) * v.cell_w], 1)
        )
        cy = (
            np.asarray(v.row_spans)
            if v.row_spans is not None
            else np.stack([np.arange(v.rows) * v.cell_h, (np.arange(v.rows) + 1) * v.cell_h], 1)
        )
        okx = np.ones_like(vx, dtype=bool)
        oky = np.ones_like(vy, dtype=bool)
        if v.content is not None:
            okx = (vx >= v.content[0]) & (vx < v.content[2])
            oky = (vy >= v.content[1]) & (vy < v.content[3])
        colm = (vx[None, :] >= cx[:, 0:1]) & (vx[None, :] < cx[:, 1:2]) & okx[None, :]  # (cols, W*k)
        rowm = (vy[None, :] >= cy[:, 0:1]) & (vy[None, :] < cy[:, 1:2]) & oky[None, :]
        # points in cell (r, c) = rowm[r] x colm[c]; in word w = iny[w] x inx[w]: separable counts
        area = rowm.sum(1)[:, None] * colm.sum(1)[None, :]  # (rows, cols)
        ix = colm.astype(np.int64) @ inx.T.astype(np.int64)  # (cols, n)
        iy = rowm.astype(np.int64) @ iny.T.astype(np.int64)  # (rows, n)
        inter = iy[:, None, :] * ix[None, :, :]  # (rows, cols, n)
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.where(area[..., None] > 0, inter / np.maximum(area[..., None], 1), 0.0)
        pos = v.positions().ravel()
        cov[pos] = c.reshape(-1, len(boxes))
    return cov


def oracle_winners(cov: np.ndarray, boxes, min_coverage: float):
    """Documented rule, independently: max coverage >= min; ties -> smaller box area, then first."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    out = np.full(cov.shape[0], -1)
    for t in range(cov.shape[0]):
        best = None
        for w in range(cov.shape[1]):
            c = cov[t, w]
            if c < min_coverage:
                continue
            key = (-c, area[w], w)
            if best is None or key < best[0]:
                best = (key, w)
        if best is not None:
            out[t] = best[1]
    return out
