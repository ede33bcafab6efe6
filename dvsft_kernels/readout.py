"""The readout: what a vision-language model reads at each visual token of a page (docs/readout.md).

For one page image, :func:`readout` runs the model once and returns, for every visual token, its
cell on the page (from the labeling grid), the token id the model's head predicts at that token's own
output, its decoded text and probability, and, when OCR words are given, the token the labeling
assigns to that cell; the page's vision-token accuracy is predicted == label over the labeled cells.

No [T, V] logits are made: the model is attached (``attach``) with a ``DVLoss(return_predictions=True)``
and called with a vision target at every visual token (the OCR label where there is one, a
placeholder id elsewhere, so the op computes a prediction there too); the op's per-row statistics
give the argmax and its softmax probability. :func:`draw_readout` draws the result on the page,
``dvsft-kernels readout`` does both for a checkpoint saved with ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import sys
import types
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from dvsft_kernels.labeling import registry

__all__ = [
    "Readout", "ReadoutToken", "add_readout_args", "auto_scale", "cell_color", "default_prompt", "draw_readout",
    "load_checkpoint", "load_processor", "pixtral_processor_class", "processor_class_name", "readout", "run_readout",
    "savable_processor", "video_free_class",
]



def processor_class_name(name: str) -> str | None:
    """The processor class of the family name or alias `name` (also a config's `model_type`), from
    the labeling registry: the family's processor class whose name matches `name`, else its first
    (Mistral 3 checkpoints use PixtralProcessor). None for a name no family has."""
    try:
        fam = registry.get(name)
    except ValueError:
        return None
    key = registry.normalize_name(name).replace("_", "")
    for cls in fam.processors:
        if cls.removesuffix("Processor").lower().replace("_", "") == key:
            return cls
    return fam.processors[0] if fam.processors else None

_PLACEHOLDER = 0  # vision target at unlabeled visual tokens: any valid id makes the op predict there
_IGNORE = -100


# ------------------------------------------------------------------------------------------- result

@dataclass(frozen=True)
class ReadoutToken:
    """One visual token: where it lies, what the model reads there, what the OCR says."""

    index: int  # the token's position in its image's token run (the grid's numbering)
    position: int  # its position in input_ids
    view: int  # index of its view in grid.views
    row: int
    col: int
    box: tuple[float, float, float, float] | None  # its cell (x0, y0, x1, y1) in page pixels; None: padding
    predicted: int  # the token id the model's head predicts at this token's own output
    text: str  # predicted, decoded
    probability: float  # softmax probability of `predicted`
    label: int | None = None  # the OCR word's token the labeling gives this cell (None: no word there)
    label_text: str | None = None

    @property
    def correct(self) -> bool | None:
        """predicted == label; None for a cell without a label."""
        return None if self.label is None else self.predicted == self.label


@dataclass(frozen=True)
class Readout:
    """What :func:`readout` returns: one :class:`ReadoutToken` per visual token (views in order, each
    row-major), the grid they come from, and the page's vision-token accuracy."""

    tokens: tuple[ReadoutToken, ...]
    grid: Any  # dvsft_kernels.labeling.VisualGrid
    family: str
    model_name: str
    image_size: tuple[int, int]  # (H, W)
    has_words: bool = False  # OCR words were given (accuracy is None without them)

    @property
    def labeled(self) -> int:
        return sum(t.label is not None for t in self.tokens)

    @property
    def correct(self) -> int:
        return sum(bool(t.correct) for t in self.tokens)

    @property
    def accuracy(self) -> float | None:
        """Vision-token accuracy: correct / labeled cells (None when no cell is labeled)."""
        return self.correct / self.labeled if self.labeled else None

    def caption(self) -> str:
        if not self.has_words:
            return f"{len(self.tokens)} visual tokens, no OCR words: no accuracy"
        if not self.labeled:
            return f"{len(self.tokens)} visual tokens, none labeled by the OCR words: no accuracy"
        return f"vision-token accuracy {self.accuracy:.2f} ({self.correct}/{self.labeled} labeled cells)"

    def confusions(self, k: int = 5) -> list[tuple[str, str, int]]:
        """The k most frequent (label text, predicted text, count) among wrong cells."""
        c = Counter((t.label_text, t.text) for t in self.tokens if t.correct is False)
        return [(a, b, n) for (a, b), n in c.most_common(k)]

    def to_dict(self) -> dict:
        g = self.grid
        return {
            "model": self.model_name, "family": self.family, "image_size": list(self.image_size),
            "visual_tokens": len(self.tokens), "labeled": self.labeled, "correct": self.correct,
            "accuracy": self.accuracy,
            "grid": {"family": g.family, "num_tokens": g.num_tokens,
                     "views": [{"name": v.name, "rows": v.rows, "cols": v.cols} for v in g.views]},
            "tokens": [{**dataclasses.asdict(t), "box": None if t.box is None else [round(v, 2) for v in t.box],
                        "probability": round(t.probability, 6), "correct": t.correct} for t in self.tokens],
        }


# ------------------------------------------------------------------------------------------ readout

def _check_family(processor, family: str | None) -> str:
    """The processor's labeling family; a given `family` must name the same one."""
    detected = registry.detect_family(processor)  # TypeError for a processor the labeling does not know
    # registry.get raises "family: unknown family ..." first
    if family is not None and registry.get(family).name != detected:
        raise ValueError(f"family: {family!r} but the processor ({type(processor).__name__}) is of "
                         f"family {detected!r}")
    return detected


def _image_token_id(model) -> int:
    """The id of the visual-token placeholders in input_ids: the model config's (Gemma 3: its soft token)."""
    cfg = getattr(model, "config", None)
    for key in ("image_token_id", "image_token_index"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    raise ValueError(f"{type(model).__name__}: its config has no image_token_id; not a vision-language model?")


def default_prompt(processor, family: str) -> str:
    """A user turn holding just the image: the processor's chat template when it has one, else the
    family's image placeholder. Text after the image changes nothing at the visual tokens (causal
    attention), the text before it does: pass `prompt=` to match a training prompt without a template."""
    if getattr(processor, "chat_template", None):
        with contextlib.suppress(Exception):  # a template that wants other message shapes
            return processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}],
                                                 tokenize=False, add_generation_prompt=False)
    tok = processor.tokenizer
    if family == "qwen2_vl":
        vocab = tok.get_vocab()
        start, end = "<|vision_start|>", "<|vision_end|>"
        inner = str(processor.image_token)
        return f"{start}{inner}{end}" if start in vocab and end in vocab else inner
    if family == "gemma3":  # Gemma 3 expands its begin-of-image token into the image's tokens
        return str(processor.boi_token)
    return str(processor.image_token)


def _as_image(image) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if not isinstance(image, Image.Image):
        raise ValueError(f"image: expected a PIL image or a path, got {type(image).__name__}")
    return image.convert("RGB")


def _model_name(model) -> str:
    hf = getattr(model, "config", None)
    name = getattr(hf, "_name_or_path", "") or getattr(model, "name_or_path", "")
    return Path(str(name)).name if name else type(model).__name__


def _decoder(tokenizer):
    cache: dict[int, str] = {}

    def decode(t: int) -> str:
        if t not in cache:
            try:
                cache[t] = tokenizer.decode([t])
            except Exception:  # noqa: BLE001 - a tokenizer that cannot decode this id: show the id
                cache[t] = f"<{t}>"
        return cache[t]

    return decode


def readout(model, processor, image, words=None, *, family: str | None = None, prompt: str | None = None,
            mode: str = "first", min_coverage: float = 0.25, model_name: str | None = None) -> Readout:
    """What `model` reads at each visual token of `image` (a PIL image or a path).

    `words`: the page's OCR words (``OCRWord``-s, or a file ``read_ocr`` reads); each visual token then
    also carries its label, as DV-SFT training labels it (`mode`, `min_coverage`: see
    ``label_visual_tokens``), and the readout its vision-token accuracy. `family`: checked against the
    processor's. `prompt`: the text holding the image placeholder (default: :func:`default_prompt`).
    The model runs once, in eval mode under no_grad, attached only for this call; it is left as it was.
    """
    import torch

    from dvsft_kernels import DVLoss, attach
    from dvsft_kernels.labeling import VisualGrid, label_visual_tokens, read_ocr, scatter_vision_labels

    image = _as_image(image)
    H, W = image.height, image.width
    fam = _check_family(processor, family)
    if isinstance(words, (str, os.PathLike)):
        words = read_ocr(words, image_size=(H, W))
    if prompt is None:
        prompt = default_prompt(processor, fam)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    grid = VisualGrid.from_processor(processor, image, inputs, 0)
    tokenizer = processor.tokenizer
    n = grid.num_tokens
    if words is not None:
        labels = label_visual_tokens(words, grid, tokenizer, mode=mode, min_coverage=min_coverage,
                                     ignore_index=_IGNORE)
    else:
        labels = torch.full((n,), _IGNORE, dtype=torch.long)
    cells = torch.from_numpy(grid.cell_positions())
    # vision targets of the run: the label at labeled cells, the placeholder at the other cells,
    # nothing at separators / newlines; placed at the image's placeholders like training does
    targets = torch.full((n,), _IGNORE, dtype=torch.long)
    targets[cells] = torch.where(labels[cells] != _IGNORE, labels[cells], _PLACEHOLDER)
    tid = _image_token_id(model)
    ids = inputs["input_ids"]
    vision_labels = scatter_vision_labels(ids, [grid], [targets], image_token_id=tid)
    # where each run position sits in input_ids: the same placement applied to the run's own indices
    where = scatter_vision_labels(ids, [grid], [torch.arange(n)], image_token_id=tid, ignore_index=-1)[0]
    position_of = torch.full((n,), -1, dtype=torch.long)
    at = (where >= 0).nonzero().flatten()
    position_of[where[at]] = at

    param = next(model.parameters())
    feed = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
            if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    loss = DVLoss(vision_weight=1.0, text_weight=0.0, return_predictions=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), attach(model, loss, skip_logits=True) as handle:
            model(**feed, vision_labels=vision_labels.to(param.device))
            out = handle.last_output
    finally:
        model.train(was_training)
    if out is None or getattr(out, "predicted", None) is None:
        raise RuntimeError("readout: the attached loss returned no predictions (DVLoss(return_predictions=True) "
                           "and attach's last_output must carry `predicted` / `probability`)")
    predicted = out.predicted[0].cpu()
    probability = out.probability[0].float().cpu()

    pos = position_of[cells]
    if (pos < 0).any() or (predicted[pos] < 0).any():
        raise RuntimeError("readout: the loss returned no prediction at some visual tokens; "
                           "DVLoss(return_predictions=True) must predict at every vision target")
    decode = _decoder(tokenizer)
    boxes = grid.token_boxes().tolist()
    toks = []
    for k, v in enumerate(grid.views):
        for r in range(v.rows):
            for c in range(v.cols):
                i = v.offset + r * v.row_stride + c
                t = int(position_of[i])
                p, lab = int(predicted[t]), int(labels[i])
                box = None if any(math.isnan(x) for x in boxes[i]) else tuple(boxes[i])
                toks.append(ReadoutToken(
                    index=i, position=t, view=k, row=r, col=c, box=box, predicted=p, text=decode(p),
                    probability=float(probability[t]), label=None if lab == _IGNORE else lab,
                    label_text=None if lab == _IGNORE else decode(lab)))
    return Readout(tuple(toks), grid, fam, model_name or _model_name(model), (H, W), has_words=words is not None)


# -------------------------------------------------------------------------------------------- picture

GREEN = (22, 150, 60)  # the cell reads its OCR label
RED = (215, 40, 40)  # the cell reads another token
GREY = (130, 130, 130)  # the cell has no label
_TEXT = {GREEN: (0, 95, 30), RED: (160, 0, 0), GREY: (80, 80, 80)}
_FILL_ALPHA = {GREEN: 85, RED: 95, GREY: 35}
CAPTION_H = 46  # px: the header strip (accuracy, model, legend) above the page
PANEL_CAPTION_H = 20  # px: above each view's panel when the grid has several views
_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
_TARGET_CELL_PX = 72  # auto scale: the narrowest cell is drawn about this wide
_MAX_SIDE_PX = 2400


def cell_color(token: ReadoutToken) -> tuple[int, int, int]:
    """GREEN where the prediction equals the OCR label, RED where it differs, GREY without a label."""
    return GREY if token.correct is None else GREEN if token.correct else RED


def _font(size: int):
    try:
        return ImageFont.truetype(_FONT, size)
    except OSError:  # no DejaVu: Pillow's own font
        return ImageFont.load_default(size)


def _shown(s: str) -> str:
    return s.replace(" ", "\u00b7").replace("\n", "\u21b5") or "\u2205"


def _truncated(s: str, font, width: float) -> str:
    while s and font.getlength(s) > width:
        s = s[:-1]
    return s


def auto_scale(readout: Readout) -> float:
    """Scale at which the narrowest cell is about 72 px wide (1..8), with the page at most 2400 px
    (never below 1 for one view); a montage of several views at most 4800 px on its longer side."""
    widths = [t.box[2] - t.box[0] for t in readout.tokens if t.box is not None]
    H, W = readout.image_size
    s = min(max(_TARGET_CELL_PX / max(min(widths), 1e-6), 1.0), 8.0) if widths else 1.0
    s = min(s, max(_MAX_SIDE_PX / max(H, W), 1.0))
    nv = len(readout.grid.views)
    if nv > 1:
        ncol = math.ceil(math.sqrt(nv))
        nrow = math.ceil(nv / ncol)
        s = min(s, 2 * _MAX_SIDE_PX / max(ncol * W, nrow * H))
    return float(s)


def draw_readout(readout: Readout, image, out_path: str | os.PathLike | None = None, *,
                 scale: float | None = None) -> Image.Image:
    """Draw each visual token's predicted text in its cell on the page: GREEN where it equals the
    OCR label, RED where it differs (the label below it when the cell has room), GREY where the cell
    has no label. The header gives the vision-token accuracy and the model. A grid of several views
    (tiles, thumbnail) gives one panel per view. Returns the picture; saved as PNG at `out_path`.

    `scale`: the page is drawn at this size factor (default: :func:`auto_scale`). The page of view
    k's panel starts at (col * W', CAPTION_H + row * (H' + PANEL_CAPTION_H) [+ PANEL_CAPTION_H with
    several views]) of a ceil(sqrt(views))-column montage, W' x H' the scaled page."""
    import torch

    from dvsft_kernels.labeling import draw_overlay

    image = _as_image(image)
    H, W = readout.image_size
    if image.size != (W, H):
        raise ValueError(f"image is {image.width}x{image.height} (W x H) but the readout is of a "
                         f"{W}x{H} page")
    s = auto_scale(readout) if scale is None else scale
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 16:
        raise ValueError(f"scale must be a number in (0, 16], got {scale!r}")
    grid = readout.grid
    nv = len(grid.views)
    no_labels = torch.full((grid.num_tokens,), _IGNORE, dtype=torch.long)
    by_view: dict[int, list[ReadoutToken]] = {}
    for t in readout.tokens:
        by_view.setdefault(t.view, []).append(t)
    panels = []
    for k in range(nv):
        # the page with this view's cell outlines (the labeling's overlay, with no label fills)
        base = draw_overlay(image, grid, no_labels, views=[k], scale=s)
        panels.append(_draw_cells(base, by_view.get(k, []), s))
    pw, ph = panels[0].size
    ncol = math.ceil(math.sqrt(nv))
    nrow = math.ceil(nv / ncol)
    cap = PANEL_CAPTION_H if nv > 1 else 0
    head_font, small = _font(15), _font(12)
    line1 = f"{readout.caption()}  \u2014  model {readout.model_name} ({readout.family})"
    line2 = "in each cell the token read there:  green = its OCR label,  red \u2260 (label below),  grey: no label"
    width = max(ncol * pw, int(head_font.getlength(line1)) + 12, int(small.getlength(line2)) + 12)
    out = Image.new("RGB", (width, CAPTION_H + nrow * (ph + cap)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    draw.text((6, 5), line1, font=head_font, fill=(0, 0, 0))
    draw.text((6, 26), line2, font=small, fill=(70, 70, 70))
    for k, pic in enumerate(panels):
        x, y = (k % ncol) * pw, CAPTION_H + (k // ncol) * (ph + cap)
        if nv > 1:
            v = grid.views[k]
            lab = [t for t in by_view.get(k, []) if t.label is not None]
            acc = f", {sum(bool(t.correct) for t in lab)}/{len(lab)} right" if lab else ""
            draw.text((x + 4, y + 3), f"{k}: {v.name or 'view'} ({v.rows}x{v.cols}{acc})", font=small,
                      fill=(0, 0, 0))
        out.paste(pic, (x, y + cap))
        if nv > 1:  # the panels are pages: a frame tells them apart
            draw.rectangle([x, y + cap, x + pw - 1, y + cap + ph - 1], outline=(160, 160, 160), width=1)
    if out_path is not None:
        out.save(out_path, format="PNG")
    return out


def _draw_cells(base: Image.Image, tokens: Sequence[ReadoutToken], s: float) -> Image.Image:
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cells = []
    for t in tokens:
        if t.box is None:  # wholly in padding: not on the page
            continue
        x0, y0, x1, y1 = (v * s for v in t.box)
        color = cell_color(t)
        d.rectangle([x0 + 1, y0 + 1, x1 - 2, y1 - 2], fill=color + (_FILL_ALPHA[color],))
        cells.append((x0, y0, x1, y1, t, color))
    out = Image.alpha_composite(base.convert("RGBA"), layer)
    if not cells:
        return out.convert("RGB")
    d = ImageDraw.Draw(out)
    cell_h = min(y1 - y0 for _, y0, _, y1, _, _ in cells)
    size = max(7, min(20, int(cell_h * 0.26)))
    font, font2 = _font(size), _font(max(7, int(size * 0.8)))
    for x0, y0, x1, y1, t, color in cells:
        if x1 - x0 < 12:
            continue
        text = _truncated(_shown(t.text), font, x1 - x0 - 4)
        d.text((x0 + 2, y0 + 1), text, font=font, fill=_TEXT[color] + (255,), stroke_width=1,
               stroke_fill=(255, 255, 255, 255))
        if color == RED and y1 - y0 >= 2.3 * size and t.label_text is not None:
            label = _truncated("\u2260" + _shown(t.label_text), font2, x1 - x0 - 4)
            d.text((x0 + 2, y0 + 2 + size), label, font=font2, fill=(60, 60, 60, 255))
    return out.convert("RGB")


# ---------------------------------------------------------------------------------------- checkpoints

@contextlib.contextmanager
def _quiet_transformers():
    """transformers' notes about backends (e.g. the PIL image processor used without torchvision) are
    not errors of the readout: silenced while loading and running."""
    from transformers.utils import logging as tf_logging

    level, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()  # "Loading weights" of every from_pretrained
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def pixtral_processor_class():
    """PixtralProcessor. Its module imports the torchvision image processor's module for one size
    helper, so without torchvision transformers exports a placeholder that refuses to build; the
    module is imported here with that one module stood in by the PIL image processor's module, whose
    `get_resize_output_image_size` is the same function."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    cls = getattr(transformers, "PixtralProcessor", None)
    if isinstance(cls, type) and issubclass(cls, ProcessorMixin):  # torchvision installed
        return cls
    import transformers.models.pixtral.image_processing_pil_pixtral as pil

    name = "transformers.models.pixtral.image_processing_pixtral"
    saved = sys.modules.get(name)
    stub = types.ModuleType(name)
    stub.get_resize_output_image_size = pil.get_resize_output_image_size
    sys.modules[name] = stub
    try:
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved
    return PixtralProcessor


def _processor_class(name: str):
    import transformers
    from transformers.processing_utils import ProcessorMixin

    if name == "PixtralProcessor":
        return pixtral_processor_class()
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ProcessorMixin)):
        raise ValueError(f"transformers has no processor class {name!r} that loads here")
    return cls


def video_free_class(cls):
    """`cls` accepting video_processor=None: without torchvision there is no video processor, and the
    processor classes that have one refuse None in their type check. Images and text go through the
    class's own code; only the check is skipped, for a None video processor."""
    if "video_processor" not in cls.get_attributes():
        return cls

    class NoVideo(cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    NoVideo.__name__ = NoVideo.__qualname__ = cls.__name__
    return NoVideo


def savable_processor(processor):
    """`processor`, or, where its video processor is None (no torchvision: `load_processor` loads it
    so) and save_pretrained cannot save that, a copy whose class leaves the attribute out of what it
    saves (the class keeps its name, so the saved processor_config.json names the real class)."""
    cls = type(processor)
    if "video_processor" not in cls.get_attributes() or getattr(processor, "video_processor", None) is not None:
        return processor

    class Savable(cls):
        @classmethod
        def get_attributes(klass):
            return [a for a in super().get_attributes() if a != "video_processor"]

    Savable.__name__ = Savable.__qualname__ = cls.__name__
    processor = copy.copy(processor)
    processor.__class__ = Savable
    return processor


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_processor(path: str | os.PathLike, family: str | None = None):
    """The processor saved in checkpoint directory `path`.

    AutoProcessor first. Without torchvision it fails for processors that have a video processor
    (Qwen2-VL, LLaVA-OneVision, InternVL) or import a torchvision module (Pixtral); the processor is
    then built from its saved parts: AutoImageProcessor (transformers picks the PIL backend) and
    AutoTokenizer, the processor-level settings of processor_config.json and the chat template, in
    the processor class named by processor_config.json, else by `family`, else by the model config's
    model_type."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    d = Path(path)
    with _quiet_transformers():
        try:
            proc = AutoProcessor.from_pretrained(str(d), local_files_only=True)
            if isinstance(proc, ProcessorMixin):
                return proc
            # no processor_config.json: AutoProcessor falls back to the tokenizer or image processor
            auto_error: Exception = ValueError(f"AutoProcessor gave a {type(proc).__name__}, not a processor")
        except Exception as e:  # noqa: BLE001 - transformers raises many types; try the parts
            auto_error = e
        # ---- the fallback: image processor + tokenizer + settings, in the processor class
        settings = _read_json(d / "processor_config.json")
        model_type = _read_json(d / "config.json").get("model_type")
        name = (settings.get("processor_class") or _read_json(d / "tokenizer_config.json").get("processor_class")
                or (processor_class_name(family) if family else None)
                or (processor_class_name(model_type) if isinstance(model_type, str) else None))
        if not name:
            raise ValueError(f"AutoProcessor cannot load it ({_short(auto_error)}) and nothing there names "
                             "the processor class; pass the family")
        try:
            cls = video_free_class(_processor_class(str(name).removesuffix("Fast")))
            image_processor = AutoImageProcessor.from_pretrained(str(d), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            accepted = set(inspect.signature(cls.__init__).parameters) - set(cls.get_attributes())
            kwargs = {k: v for k, v in settings.items() if k in accepted and k not in ("self", "chat_template")}
            template = _chat_template(d, settings) or getattr(tokenizer, "chat_template", None)
            return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot load a processor: AutoProcessor: {_short(auto_error)}; from its parts "
                             f"({name}): {_short(e)}") from None


def _chat_template(d: Path, settings: dict) -> str | None:
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    legacy = _read_json(d / "chat_template.json").get("chat_template")
    return legacy if isinstance(legacy, str) else settings.get("chat_template")


def _short(e: BaseException, n: int = 300) -> str:
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= n else s[: n - 3] + "..."


def _dtype(dtype, device: str):
    import torch

    if dtype in (None, "default"):
        return torch.float32 if device == "cpu" else "auto"
    if dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_checkpoint(path: str | os.PathLike, *, family: str | None = None, device: str | None = None,
                    dtype=None):
    """(model, processor) of a checkpoint directory saved with ``save_pretrained``: the model through
    AutoModelForImageTextToText (else the class its config's `architectures` names), in eval mode on
    `device` (default: cuda when available), in `dtype` (default float32 on the CPU, the checkpoint's
    dtype elsewhere); the processor through :func:`load_processor`. ValueError when either fails."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"{str(d)!r} is not a directory")
    if not (d / "config.json").is_file():
        raise ValueError(f"{str(d)!r} holds no config.json (save the model with save_pretrained)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = _dtype(dtype, torch.device(device).type)
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(str(d), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read its config.json: {_short(e)}") from None
        try:
            model = AutoModelForImageTextToText.from_pretrained(str(d), local_files_only=True, dtype=dt)
        except Exception as auto_error:  # noqa: BLE001
            archs = getattr(config, "architectures", None) or []
            cls = getattr(transformers, archs[0], None) if archs else None
            if not isinstance(cls, type):
                raise ValueError(f"cannot load a model: {_short(auto_error)}") from None
            try:
                model = cls.from_pretrained(str(d), local_files_only=True, dtype=dt)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"cannot load a model ({archs[0]}): {_short(e)}") from None
    model.to(device).eval()
    return model, load_processor(d, family)


# ------------------------------------------------------------------------------------------------ CLI

def add_readout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="checkpoint directory saved with save_pretrained (model + processor files)")
    p.add_argument("--image", required=True, metavar="PAGE", help="the page image")
    p.add_argument("--ocr", metavar="FILE",
                   help="the page's OCR words (Tesseract TSV, hOCR, PaddleOCR / docTR / words JSON): each "
                        "cell then gets its label and the page its vision-token accuracy")
    p.add_argument("--family", metavar="NAME",
                   help=f"model family, when the checkpoint does not name its processor class "
                        f"({', '.join(registry.names(aliases=True))}); checked against the processor")
    p.add_argument("--out", required=True, metavar="PNG", help="the picture: predicted text in each cell")
    p.add_argument("--json", metavar="FILE", help="also write the readout as JSON (every visual token)")
    p.add_argument("--prompt", metavar="TEXT",
                   help="text holding the image placeholder (default: the chat template's user turn with "
                        "the image, or the bare placeholder)")
    p.add_argument("--mode", choices=("first", "aligned"), default="first",
                   help="which sub-token of a word labels a cell, as in training (default: first)")
    p.add_argument("--min-coverage", type=float, default=0.25,
                   help="least share of a cell a word must cover to label it (default 0.25)")
    p.add_argument("--scale", type=float, default=None, metavar="F",
                   help="draw the page scaled by F (default: cells about 72 px wide)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default: float32 on the CPU, the checkpoint's elsewhere)")


def _out_path(flag: str, value: str | None) -> Path | None:
    from dvsft_kernels.errors import UsageError

    if value is None:
        return None
    p = Path(value)
    if p.is_dir():
        raise UsageError(f"{flag}: {str(p)!r} is a directory; give a file path")
    if not p.parent.exists():
        raise UsageError(f"{flag}: the directory {str(p.parent)!r} does not exist")
    return p


def run_readout(args) -> int:
    """`dvsft-kernels readout`: bad input is a UsageError naming its flag (exit 2, no traceback)."""
    import torch

    from dvsft_kernels.errors import UsageError
    from dvsft_kernels.labeling import read_ocr

    if not 0.0 < args.min_coverage <= 1.0:
        raise UsageError(f"--min-coverage must be in (0, 1], got {args.min_coverage}")
    if args.scale is not None and not 0 < args.scale <= 16:
        raise UsageError(f"--scale must be in (0, 16], got {args.scale}")
    if args.family is not None and processor_class_name(args.family) is None:
        raise UsageError(f"--family: unknown family {args.family!r}; known: {', '.join(registry.names(aliases=True))}")
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise UsageError(f"--model: {str(model_dir)!r} is not a directory")
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model: {str(model_dir)!r} holds no config.json (a directory saved with "
                         "save_pretrained: model and processor files)")
    img_path = Path(args.image)
    if not img_path.is_file():
        raise UsageError(f"--image: {str(img_path)!r} does not exist")
    try:
        image = _as_image(img_path)
    except Exception as e:  # noqa: BLE001 - PIL raises several types for unreadable files
        raise UsageError(f"--image: cannot open {str(img_path)!r} as an image: {_short(e)}") from None
    words = None
    if args.ocr is not None:
        if not Path(args.ocr).is_file():
            raise UsageError(f"--ocr: {args.ocr!r} does not exist")
        try:
            words = read_ocr(args.ocr, image_size=(image.height, image.width))
        except (ValueError, OSError) as e:
            raise UsageError(f"--ocr: {_short(e)}") from None
    out_png, out_json = _out_path("--out", args.out), _out_path("--json", args.json)
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError as e:
            raise UsageError(f"--device: {_short(e)}") from None
    try:
        model, processor = load_checkpoint(model_dir, family=args.family, device=args.device, dtype=args.dtype)
    except ValueError as e:
        raise UsageError(f"--model: {str(model_dir)!r}: {_short(e, 600)}") from None
    try:
        _check_family(processor, args.family)
    except TypeError as e:
        raise UsageError(f"--model: {_short(e)}") from None
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    try:
        with _quiet_transformers():
            r = readout(model, processor, image, words, prompt=args.prompt, mode=args.mode,
                        min_coverage=args.min_coverage, model_name=model_dir.resolve().name)
    except ValueError as e:  # processor / grid / placeholder disagreements: the checkpoint's, or the prompt's
        flag = "--prompt" if args.prompt is not None else "--model"
        raise UsageError(f"{flag}: the readout failed on this checkpoint and page: {_short(e, 600)}") from None
    draw_readout(r, image, out_png, scale=args.scale)
    if out_json is not None:
        record = {"image": str(img_path), "ocr": args.ocr, **r.to_dict()}
        out_json.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{img_path.name}: {len(r.tokens)} visual tokens ({r.model_name}, {r.family}); {r.caption()}")
    wrong = r.confusions()
    if wrong:
        print("misread (label -> predicted): " + ", ".join(f"{a!r} -> {b!r}" + (f" x{n}" if n > 1 else "")
                                                          for a, b, n in wrong))
    for p in (out_png, out_json):
        if p is not None:
            print(f"wrote {p}")
    return 0
