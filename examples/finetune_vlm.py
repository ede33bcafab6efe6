"""Fine-tune a Hugging Face vision-language model with DV-SFT: text loss on the answer tokens plus
cross-entropy on every visual token that shows a word, labeled with that word.

    python examples/finetune_vlm.py --model Qwen/Qwen2.5-VL-3B-Instruct --data train.jsonl \\
        --output-dir out --bf16 --gradient-checkpointing
    accelerate launch examples/finetune_vlm.py --model ... --data ...      # or: torchrun --nproc-per-node 8
    python examples/finetune_vlm.py --model ... --data ... --output-dir out --resume   # from its last one

--data is a JSONL file, one record a line, or a `datasets` directory (`save_to_disk`) with the same fields:

    {"image": "pages/001.png",                      # a path (relative to the JSONL file) or a list of paths
     "messages": [{"role": "user", "content": "Read the page."},
                  {"role": "assistant", "content": "..."}],
     "words": [{"text": "Total", "box": [x0, y0, x1, y1]}, ...],   # optional: the OCR words, pixels
     "ocr": "pages/001.tsv"}                        # optional instead: an OCR file (read_ocr's formats)

A record without `words` / `ocr` gets its words from `--ocr tesseract` (else: text loss only). Records
with no image, a missing or unreadable image, bad `words`, an unreadable OCR file or no messages are
counted and skipped (logged, listed in OUT/finetune_summary.json); `--strict` stops at the first, naming
it (file:line, or the datasets row).

Defaults follow the DV-SFT recipe: full fine-tuning of the language model and the projector, vision
encoder frozen (`--no-freeze-vision` trains it too), vision weight 1, `--lora` (PEFT LoRA on the
linear layers outside the vision encoder) for models too large to fine-tune fully. The vision encoder is
the model's `visual` (Qwen2/2.5/3-VL; its `merger` / `deepstack_merger_list`, the projector, stays
trainable), `vision_tower` (LLaVA family, InternVL, Gemma 3, Mistral 3) or `vision_model` (Idefics3,
SmolVLM). The trainer logs `text_loss`, `vision_loss`, `text_accuracy`, `vision_accuracy`; checkpoints
(`--save-steps`) hold the model (or the LoRA adapter), the processor, the optimizer, the scheduler and
the data position.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path

try:
    import dvsft_kernels  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

log = logging.getLogger("finetune_vlm")

#: where each family keeps its vision encoder (first match wins), and the parts of it that are the
#: projector (trainable with --freeze-vision)
VISION_TOWERS = ("visual", "vision_tower", "vision_model")
PROJECTOR_PARTS = ("merger", "deepstack_merger_list")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (save_pretrained) or Hub id")
    p.add_argument("--data", required=True, help="JSONL file or datasets directory (load_from_disk)")
    p.add_argument("--output-dir", default="dvsft_out")
    p.add_argument("--ocr", choices=("tesseract",), default=None,
                   help="OCR engine for records without `words` / `ocr` (labeling.run_ocr, cached)")
    p.add_argument("--lora", action="store_true", help="train PEFT LoRA adapters instead of all weights")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the vision encoder frozen (default: yes)")
    p.add_argument("--vision-weight", type=float, default=1.0, help="weight of the vision-token loss")
    p.add_argument("--label-mode", choices=("first", "aligned"), default="first",
                   help="which token of a word labels its visual tokens (see label_visual_tokens)")
    p.add_argument("--soft", type=int, default=None,
                   help="soft vision labels: K coverage-weighted ids per visual token (docs/labeling.md)")
    p.add_argument("--spread", type=float, default=0.0,
                   help="with --soft: a word's labeled neighbouring cells also get it at this weight")
    p.add_argument("--trainer", choices=("hf", "trl"), default="hf",
                   help="hf: DVSFTTrainer; trl: TRL's SFTTrainer through patch_trainer")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=1, help="per device")
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                   help="dtype the weights are loaded in (bfloat16 with --lora for large models)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--save-total-limit", type=int, default=2)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record, not skip it")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--report-to", default="none", help="tensorboard, wandb, ... (default: none)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    return p.parse_args(argv)


# ---- data --------------------------------------------------------------------------------------------------


class BadRecord(ValueError):
    pass


def _words(raw, where: str) -> list[dict]:
    if not isinstance(raw, list):
        raise BadRecord(f"{where}: `words` must be a list of {{'text', 'box'}}")
    try:
        return [{"text": str(w["text"]), "box": [float(v) for v in w["box"]][:4]} for w in raw]
    except (KeyError, TypeError, ValueError) as e:
        raise BadRecord(f"{where}: bad `words` entry ({e!r})") from None


def _open(im):
    """An image of a checked record: a path, datasets' {"bytes", "path"} or a PIL image."""
    from PIL import Image

    if isinstance(im, str):
        return Image.open(im)
    if isinstance(im, dict):
        return Image.open(io.BytesIO(im["bytes"]))
    return im


def check_record(rec, where: str, base: Path) -> dict:
    """The record in the collator's form (image paths resolved, words parsed), or BadRecord naming why.
    Images are opened and verified here, and loaded again when the record is used."""
    from PIL import Image

    if not isinstance(rec, dict):
        raise BadRecord(f"{where}: not a JSON object")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord(f"{where}: no messages")
    images = rec.get("image", rec.get("images"))
    images = images if isinstance(images, list) else [images] if images is not None else []
    out = {"messages": msgs, "images": [], "words": None}
    if not images:
        raise BadRecord(f"{where}: no image")
    for im in images:
        if isinstance(im, dict) and im.get("bytes") is None:  # datasets' Image(decode=False): a path
            im = im.get("path")
        if isinstance(im, str):
            path = Path(im) if os.path.isabs(im) else base / im
            if not path.is_file():
                raise BadRecord(f"{where}: image file {str(path)!r} not found")
            im, name = str(path), repr(str(path))
        elif isinstance(im, dict):  # datasets' Image(decode=False): the encoded file
            name = "bytes"
        elif isinstance(im, Image.Image):
            out["images"].append(im)
            continue
        else:
            raise BadRecord(f"{where}: `image` must be a path or a list of paths, got {type(im).__name__}")
        try:
            with _open(im) as f:
                f.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
            raise BadRecord(f"{where}: image {name} is unreadable ({type(e).__name__}: {e})") from None
        out["images"].append(im)
    if rec.get("words") is not None:
        out["words"] = _words(rec["words"], where)
    elif rec.get("ocr"):
        from dvsft_kernels.labeling import read_ocr

        ocr = Path(rec["ocr"]) if os.path.isabs(rec["ocr"]) else base / rec["ocr"]
        try:
            out["words"] = [{"text": w.text, "box": list(w.box)} for w in read_ocr(ocr)]
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {e}"
            raise BadRecord(f"{where}: OCR file {str(ocr)!r} is unreadable ({why})") from None
    if out["words"] is not None and len(out["images"]) != 1:
        n = len(out["images"])
        raise BadRecord(f"{where}: `words` / `ocr` need exactly one image, the record has {n}")
    return out


def load_records(path: str, *, strict: bool = False) -> tuple[list[dict], list[str]]:
    """(good records, reasons the others were skipped). JSONL or a datasets directory."""
    src = Path(path)
    if src.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(src))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        for col in ("image", "images"):  # keep images encoded: decoded when a batch is made
            feat = ds.features.get(col)
            feat = feat.feature if isinstance(feat, (datasets.Sequence, datasets.List)) else feat
            if isinstance(feat, datasets.Image):
                ds = ds.cast_column(col, _undecoded(ds.features[col], datasets))
        rows, base = ((f"{src} row {i}", r) for i, r in enumerate(ds)), src
    else:
        def jsonl():
            with open(src, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield f"{src}:{n}", json.loads(line)
                        except json.JSONDecodeError as e:
                            yield f"{src}:{n}", BadRecord(f"{src}:{n}: not JSON ({e})")

        rows, base = jsonl(), src.parent
    good, skipped = [], []
    for where, rec in rows:
        try:
            if isinstance(rec, BadRecord):
                raise rec
            good.append(check_record(rec, where, base))
        except BadRecord as e:
            if strict:
                raise
            skipped.append(str(e))
            log.warning("skipping %s", e)
    return good, skipped


def _undecoded(feature, datasets):
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    return type(feature)(datasets.Image(decode=False))


class RecordCollator:
    """Loads the checked records' images (and, with `ocr`, reads their words) when a batch is made,
    then hands the samples to `DVSFTCollator`."""

    dvsft_input_columns = ("messages", "images", "words")

    def __init__(self, collator, ocr: str | None = None):
        self.collator, self.ocr = collator, ocr

    def sample(self, r: dict) -> dict:
        from dvsft_kernels.labeling import OCRWord

        images = [_open(im).convert("RGB") for im in r["images"]]
        words = r.get("words")
        if words is not None:
            words = [OCRWord(w["text"], tuple(w["box"])) for w in words]
        elif self.ocr and len(images) == 1:
            from dvsft_kernels.labeling import run_ocr

            words = list(run_ocr(images[0], self.ocr))
        return {"messages": r["messages"], "images": images, "words": words}

    def __call__(self, rows):
        return self.collator([self.sample(r) for r in rows])


# ---- model -------------------------------------------------------------------------------------------------


def vision_tower(model):
    """(name, module) of the vision encoder, searched in the model and its inner `model`; None if none."""
    for prefix, m in (("", model), ("model.", getattr(model, "model", None))):
        for name in VISION_TOWERS:
            sub = getattr(m, name, None) if m is not None else None
            if sub is not None:
                return prefix + name, sub
    return None


def freeze_vision(model) -> list[str]:
    """Freeze the vision encoder (not its projector parts); returns the frozen parameter names."""
    found = vision_tower(model)
    if found is None:
        raise ValueError(f"--freeze-vision: no vision encoder ({', '.join(VISION_TOWERS)}) found in "
                         f"{type(model).__name__}; pass --no-freeze-vision")
    name, tower = found
    frozen = []
    for n, p in tower.named_parameters():
        if not n.split(".")[0] in PROJECTOR_PARTS:
            p.requires_grad_(False)
            frozen.append(f"{name}.{n}")
    return frozen


def lora_targets(model, include_vision: bool) -> list[str]:
    """Names of the Linear layers LoRA adapts: all but the output head, the vision encoder's only with
    `include_vision` (its projector parts always)."""
    import torch

    found = vision_tower(model)
    tower = found[0] + "." if found else None
    head = model.get_output_embeddings()
    names = []
    for n, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or m is head:
            continue
        in_encoder = tower and n.startswith(tower) and n[len(tower):].split(".")[0] not in PROJECTOR_PARTS
        if in_encoder and not include_vision:
            continue
        names.append(n)
    return names


def save_processor(processor, out_dir) -> None:
    from dvsft_kernels.readout import savable_processor

    savable_processor(processor).save_pretrained(out_dir)


# ---- run ---------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    import torch
    import transformers as tf
    from transformers.trainer_utils import get_last_checkpoint

    from dvsft_kernels import DVLoss
    from dvsft_kernels.integrations import DVSFTCollator, DVSFTTrainer, patch_trainer
    from dvsft_kernels.readout import load_checkpoint, savable_processor

    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    if args.ocr:
        try:
            from dvsft_kernels.labeling import run_ocr  # noqa: F401
        except ImportError:
            raise SystemExit("--ocr: this dvsft_kernels has no labeling.run_ocr") from None

    # data first: a bad file fails before the model loads
    try:
        records, skipped = load_records(args.data, strict=args.strict)
    except BadRecord as e:
        raise SystemExit(f"--strict: {e}") from None
    log.info("%d records, %d skipped", len(records), len(skipped))
    if not records:
        raise SystemExit(f"--data {args.data}: no usable record ({len(skipped)} skipped)")

    # one process per device under torchrun / accelerate launch: load onto this process's device
    local, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = "cpu" if args.cpu or not torch.cuda.is_available() else f"cuda:{local}"
    tf.set_seed(args.seed)
    path = args.model
    if not os.path.isdir(path):  # a Hub id: the files, then the same loader
        from huggingface_hub import snapshot_download

        path = snapshot_download(path)
    resume = None
    if args.resume:
        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if resume:
            log.info("resuming from %s", resume)
        else:
            log.warning("--resume: no checkpoint in %s; starting fresh", args.output_dir)
    # Trainer's own resume loads a checkpoint's weights with load_state_dict, without the key renaming
    # from_pretrained applies: for models whose saved names differ from their module names (Qwen2/2.5-VL,
    # LLaVA-OneVision, ... in transformers 5) nothing matches and the run would silently go on from
    # --model's weights. A full-weights checkpoint is therefore loaded with from_pretrained here, and
    # Trainer's weight loading skipped (optimizer, scheduler, RNG and data position still come from it).
    # (huggingface/transformers#43701; still so in 5.24.)
    weights_from = resume if resume and not args.lora else path
    model, processor = load_checkpoint(weights_from, device=device, dtype=args.dtype)
    processor = savable_processor(processor)
    model.train()
    if args.freeze_vision:
        frozen = freeze_vision(model)
        log.info("vision encoder frozen: %d tensors", len(frozen))
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model, include_vision=not args.freeze_vision)
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                 target_modules=targets))
        if args.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: let checkpointed blocks see a grad
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100 * n_train / max(n_all, 1))

    common = {
        "output_dir": args.output_dir,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "num_train_epochs": args.epochs,
        "max_steps": args.max_steps,
        "learning_rate": args.lr,
        "warmup_steps": args.warmup_ratio,  # a float < 1 is a fraction of the steps
        "lr_scheduler_type": "cosine",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "logging_steps": args.logging_steps,
        "save_strategy": "steps",
        "save_steps": args.save_steps,
        "save_total_limit": args.save_total_limit,
        "report_to": args.report_to,
        "seed": args.seed,
        "use_cpu": device == "cpu",
        "remove_unused_columns": False,  # the collator reads the raw records
        "dataloader_num_workers": 0,
        "ddp_backend": "gloo" if device == "cpu" and world > 1 else None,  # CPU processes: gloo
    }
    image_token_id = getattr(model.config, "image_token_id", None)
    collator = DVSFTCollator(processor, mode=args.label_mode, image_token_id=image_token_id, soft=args.soft,
                             spread=args.spread)
    loss = DVLoss(vision_weight=args.vision_weight)
    collator = RecordCollator(collator, ocr=args.ocr)
    if args.trainer == "trl":
        import datasets
        import trl

        targs = trl.SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
        trainer = trl.SFTTrainer(model=model, args=targs, train_dataset=datasets.Dataset.from_list(records),
                                 data_collator=collator, processing_class=processor)
        patch_trainer(trainer, loss)
    else:
        trainer = DVSFTTrainer(model=model, args=tf.TrainingArguments(**common), train_dataset=records,
                               data_collator=collator, processing_class=processor, loss=loss)
    if weights_from == resume and resume is not None:
        trainer._load_from_checkpoint = lambda *a, **k: None  # the model was loaded from it above

    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():  # save_model wrote the model and the processor
        summary = {"records": len(records), "skipped": len(skipped), "skipped_reasons": skipped,
                   "global_step": trainer.state.global_step, "train_loss": result.training_loss,
                   "resumed_from": resume}
        with open(os.path.join(args.output_dir, "finetune_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return trainer


if __name__ == "__main__":
    main()
