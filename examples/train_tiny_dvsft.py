"""Train a tiny Qwen2-VL with DV-SFT on a synthetic OCR set, on CPU, in a few minutes.

Everything is local: the model is built from a config (random weights), the tokenizer is a
word-level vocabulary over the synthetic words plus Qwen2-VL's special tokens, the image
processor is a `Qwen2VLImageProcessor` with small min/max pixels, and the pages are rendered with
Pillow and the DejaVu fonts, so every word's box is known exactly.

Each page shows 4 random words (of 24) on two lines; the assistant answers with the words in reading
order. `DVSFTCollator` labels the answer tokens (text stream) and, for every visual token whose
cell shows a word, that word's id (vision stream); `DVSFTTrainer` trains with `DVLoss`. The script
prints and plots (PNG) the text loss, the vision loss and the vision-token accuracy, and evaluates
on held-out pages against chance (1 / number of words).

    python examples/train_tiny_dvsft.py                 # 600 steps, ~35 s on 2 cores
    python examples/train_tiny_dvsft.py --steps 100 --out /tmp/dvsft_tiny

--out receives the curves, summary.json and the trained model with its processor (save_pretrained),
which `dvsft-kernels readout --model OUT` reads (docs/readout.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass

import torch

try:
    import dvsft_kernels  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FONT_DIR = "/usr/share/fonts/truetype/dejavu"
FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"]
WORDS = [
    "apple", "river", "stone", "cloud", "green", "house", "light", "table", "water", "north", "paper", "smile",
    "tiger", "piano", "candle", "forest", "bridge", "garden", "silver", "rocket", "window", "yellow", "dragon",
    "mirror",
]
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PAGE = (224, 112)  # (W, H): 16 x 8 patches of 14 px -> 8 x 4 = 32 visual tokens of 28 px cells
CELL = 28


@dataclass(frozen=True)
class Task:
    """A synthetic reading task: what the pages show and how the words are tokenised."""

    name: str
    lines: int = 2  # text lines on a page
    words_per_line: int = 2
    font_size: int = 20
    line_step: int = 2  # cell rows from one line to the next
    subword: bool = False  # every word is two tokens (first half, "##" second half)


TASKS = {
    t.name: t
    for t in (
        Task("read"),  # 4 words of 20 px glyphs on two lines: the default
        Task("subword", subword=True),  # the same pages, each word two tokens: `aligned` labeling differs
        Task("dense", lines=4, words_per_line=3, font_size=13, line_step=1),  # 12 words of 13 px glyphs
    )
}


def word_pieces(word: str) -> list[str]:
    """The subword tasks' tokens of a word: its first ceil(n/2) characters, then '##' + the rest."""
    k = (len(word) + 1) // 2
    return [word[:k], "##" + word[k:]]


# ---- processor and model -----------------------------------------------------------------------------------


def build_processor(task: Task = TASKS["read"]):
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    base = ["[UNK]", "user", "assistant", "Read", "the", "text", "."]
    if task.subword:  # WordPiece's greedy longest match splits each word into exactly its two pieces
        pieces = list(dict.fromkeys(p for w in WORDS for p in word_pieces(w)))
        tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(base + pieces)}, unk_token="[UNK]"))
        tok.decoder = decoders.WordPiece()
    else:
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(base + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIALS[1:],
    )

    # Without torchvision, Qwen2VLProcessor's type check refuses video_processor=None (it looks the class up
    # in torchvision's video registry); skip only that check, images and text go through the real class.
    class Qwen2VLProcessor(tf.Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

        @classmethod
        def get_attributes(cls):  # no video processor to save: save_pretrained writes the other parts
            return [a for a in super().get_attributes() if a != "video_processor"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = tf.Qwen2VLImageProcessor(
            min_pixels=56 * 56,
            max_pixels=PAGE[0] * PAGE[1],
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
        )
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATE)


def build_model(processor, hidden=96, layers=2, vision_depth=2):
    import transformers as tf

    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    head_dim = hidden // 4
    text = {
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
        },
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    vision = {
        "depth": vision_depth,
        "embed_dim": hidden,
        "hidden_size": hidden,
        "num_heads": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "mlp_ratio": 2,
    }
    cfg = tf.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return tf.Qwen2VLForConditionalGeneration(cfg)


# ---- synthetic OCR pages ------------------------------------------------------------------------------------


def render_page(rng: random.Random, fonts, task: Task = TASKS["read"]):
    """`task.lines` lines of up to `task.words_per_line` random words; returns (image, OCR words,
    answer text). The default task: 4 words on two lines.

    Lines sit on the visual-token rows and words start at cell boundaries (with 1-3 px jitter), so
    a cell always shows about the same part of a word and a 0.6 M-parameter model learns to read in
    a few hundred CPU steps. (With free placement the same model stayed at chance for 400 steps:
    it needs far more steps, not a different loss.)
    """
    from PIL import Image, ImageDraw

    from dvsft_kernels.labeling import OCRWord

    cell = CELL
    img = Image.new("RGB", PAGE, (255, 255, 255))
    d = ImageDraw.Draw(img)
    words, order = [], []
    top = 4 if task.font_size >= 16 else 8  # small glyphs sit mid-row
    for line in range(task.lines):
        y = top + task.line_step * cell * line + rng.randint(-3, 3)
        x = rng.choice([0, cell]) + rng.randint(1, 3)
        for _ in range(task.words_per_line):
            for _attempt in range(10):
                w, font = rng.choice(WORDS), rng.choice(fonts)
                x0, y0, x1, y1 = d.textbbox((x, y), w, font=font)
                if x1 <= PAGE[0] - 2:
                    break
            else:
                continue
            shade = rng.randint(0, 60)
            d.text((x, y), w, fill=(shade, shade, shade), font=font)
            words.append(OCRWord(w, (x0, y0, x1, y1)))
            order.append(w)
            x = -(-(x1 + 8) // cell) * cell + rng.randint(1, 3)  # next cell boundary after a gap
    return img, words, " ".join(order)


def make_dataset(n: int, seed: int, task: Task = TASKS["read"]):
    from PIL import ImageFont

    rng = random.Random(seed)
    fonts = [ImageFont.truetype(os.path.join(FONT_DIR, f), task.font_size) for f in FONTS]
    out = []
    for _ in range(n):
        img, words, answer = render_page(rng, fonts, task)
        out.append(
            {
                "image": img,
                "words": words,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "Read the text ."}],
                    },
                    {"role": "assistant", "content": answer},
                ],
            }
        )
    return out


# ---- run --------------------------------------------------------------------------------------------------


def plot(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "vision_loss" in h and "loss" in h]
    steps = [h["step"] for h in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [h["text_loss"] for h in rows], label="text loss")
    a.plot(steps, [h["vision_loss"] for h in rows], label="vision loss")
    a.set_xlabel("step"), a.set_ylabel("cross-entropy"), a.legend(), a.grid(alpha=0.3)
    b.plot(steps, [h["vision_accuracy"] for h in rows], label="vision-token accuracy", color="C2")
    b.plot(steps, [h["text_accuracy"] for h in rows], label="text-token accuracy", color="C3")
    b.axhline(1 / len(WORDS), ls="--", color="gray", label=f"chance (1/{len(WORDS)})")
    b.set_ylim(0, 1), b.set_xlabel("step"), b.legend(), b.grid(alpha=0.3)
    fig.suptitle("Tiny Qwen2-VL, DV-SFT on synthetic OCR (train, per logging window)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _printer(tf):
    class Printer(tf.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "vision_loss" in logs and "loss" in logs:
                print(
                    f"step {state.global_step:4d}  loss {logs['loss']:.3f}  text {logs['text_loss']:.3f}  "
                    f"vision {logs['vision_loss']:.3f}  vision acc {logs['vision_accuracy']:.3f}  "
                    f"text acc {logs['text_accuracy']:.3f}",
                    flush=True,
                )

    return Printer()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--train-pages", type=int, default=1024)
    p.add_argument("--eval-pages", type=int, default=64)
    p.add_argument("--vision-weight", type=float, default=1.0)
    p.add_argument(
        "--vision-shift",
        choices=("none", "same"),
        default="none",
        help="'none' (DVLoss default): each visual token's own hidden state predicts its word; "
        "'same': hidden[t-1] predicts the word at visual token t, shifted like the text",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="dvsft_tiny_out")
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore", message=".*torchvision.*")
    import transformers as tf

    from dvsft_kernels import DVLoss
    from dvsft_kernels.integrations import DVSFTCollator, DVSFTTrainer

    tf.logging.set_verbosity_error()
    # under torchrun / accelerate launch (WORLD_SIZE > 1): DDP over gloo on CPU, the threads split
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(max(1, args.threads // world))
    tf.set_seed(args.seed)
    t0 = time.time()
    processor = build_processor()
    model = build_model(processor)
    train, held_out = make_dataset(args.train_pages, args.seed), make_dataset(args.eval_pages, args.seed + 1)
    collator = DVSFTCollator(processor, mode="first", min_coverage=0.25)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: tiny Qwen2-VL, {n_params / 1e6:.2f} M parameters, vocab {len(processor.tokenizer)}; "
        f"{len(train)} train / {len(held_out)} held-out pages of {PAGE[0]}x{PAGE[1]} px (32 visual tokens)"
    )

    targs = tf.TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=16,
        learning_rate=args.lr,
        warmup_steps=20,
        lr_scheduler_type="constant_with_warmup",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=min(20, max(1, args.steps // 2)),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None,
    )
    trainer = DVSFTTrainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=collator,
        loss=DVLoss(
            vision_weight=args.vision_weight, vision_shift=args.vision_shift == "same"
        ),
    )
    trainer.remove_callback(tf.PrinterCallback)
    before = trainer.evaluate()
    trainer.add_callback(_printer(tf))
    trainer.train()
    after = trainer.evaluate()
    elapsed = time.time() - t0
    trainer.save_model(args.out)  # the model and, below, its processor: `dvsft-kernels readout --model OUT`

    if rank != 0:  # one report, from rank 0
        return None
    os.makedirs(args.out, exist_ok=True)
    processor.save_pretrained(args.out)
    history = [h for h in trainer.state.log_history if "vision_loss" in h and "loss" in h]
    png = os.path.join(args.out, "dvsft_tiny_curves.png")
    plot(trainer.state.log_history, png)
    chance = 1 / len(WORDS)
    summary = {
        "steps": args.steps,
        "seconds": round(elapsed, 1),
        "chance_vision_accuracy": round(chance, 4),
        "first_train_window": {k: history[0][k] for k in ("text_loss", "vision_loss", "vision_accuracy")},
        "last_train_window": {
            k: history[-1][k] for k in ("text_loss", "vision_loss", "vision_accuracy", "text_accuracy")
        },
        "held_out_before": {
            k: round(before[f"eval_{k}"], 4) for k in ("text_loss", "vision_loss", "vision_accuracy")
        },
        "held_out_after": {
            k: round(after[f"eval_{k}"], 4)
            for k in ("text_loss", "vision_loss", "vision_accuracy", "text_accuracy")
        },
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    print(f"curves: {png}")
    acc = after["eval_vision_accuracy"]
    print(
        f"held-out vision-token accuracy {acc:.3f} vs chance {chance:.3f} ({acc / chance:.1f}x); "
        f"{elapsed:.0f} s on {args.threads} threads, {world} process(es)"
    )
    return summary


if __name__ == "__main__":
    main()
