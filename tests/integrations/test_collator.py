"""DVSFTCollator on a tiny offline Qwen2-VL processor: keys, answer-only labels, vision labels at
visual tokens, padding, multi-turn, no-word samples; end to end through attach() and DVSFTTrainer."""

from __future__ import annotations

import pytest
import torch
import transformers
from PIL import Image, ImageDraw, ImageFont

from dvsft_kernels import DVLoss, attach
from dvsft_kernels.integrations import DVSFTCollator, DVSFTTrainer
from dvsft_kernels.labeling import OCRWord
from tests.integrations.helpers import IGN
from tests.integrations.tiny_models import qwen2_vl_for_processor, qwen2_vl_processor


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; restored after the test (not module-wide: that would
    make the whole suite single-threaded)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def render(words, size=(224, 112), seed=0):
    """White page, words in black on two lines; returns the image and the words' boxes."""
    font = ImageFont.truetype(FONT, 22)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    out, x, y = [], 6, 10
    for w in words:
        x0, y0, x1, y1 = d.textbbox((x, y), w, font=font)
        if x1 > size[0] - 4:
            x, y = 6, y + 50
            x0, y0, x1, y1 = d.textbbox((x, y), w, font=font)
        d.text((x, y), w, fill="black", font=font)
        out.append(OCRWord(w, (x0, y0, x1, y1)))
        x = x1 + 12
    return img, out


def sample(words, answer=None, seed=0):
    img, ocr = render(words, seed=seed)
    return {
        "image": img,
        "words": ocr,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Read the text ."}]},
            {"role": "assistant", "content": answer if answer is not None else " ".join(words)},
        ],
    }


@pytest.fixture(scope="module")
def proc():
    return qwen2_vl_processor(WORDS)


def _decode(tok, ids):
    return tok.convert_ids_to_tokens([int(i) for i in ids])


def test_batch_keys_labels_and_vision_labels(proc):
    tok = proc.tokenizer
    coll = DVSFTCollator(proc)
    batch = coll([sample(["alpha", "beta", "gamma"]), sample(["delta", "omega"], seed=1)])
    assert {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
        "labels",
        "vision_labels",
    } <= set(batch)
    assert "offset_mapping" not in batch and "text_replacement_offsets" not in batch
    ids, labels, vision = batch["input_ids"], batch["labels"], batch["vision_labels"]
    assert labels.shape == vision.shape == ids.shape
    img_tok = proc.image_token_id
    for b, answer in enumerate([["alpha", "beta", "gamma"], ["delta", "omega"]]):
        # text labels: exactly the answer words and the end-of-turn marker, equal to the input ids there
        lab_pos = (labels[b] != IGN).nonzero().flatten()
        assert _decode(tok, labels[b, lab_pos]) == answer + ["<|im_end|>"]
        assert torch.equal(labels[b, lab_pos], ids[b, lab_pos])
        # vision labels: only on visual tokens, only ids of the words on the page, every word seen
        vis_pos = (vision[b] != IGN).nonzero().flatten()
        assert len(vis_pos) > 0 and bool((ids[b, vis_pos] == img_tok).all())
        assert set(_decode(tok, vision[b, vis_pos])) == set(answer)
        assert bool(((labels[b] != IGN) & (vision[b] != IGN)).sum() == 0)
    assert bool((labels[batch["attention_mask"] == 0] == IGN).all())


def test_word_geometry_first_row_left_to_right(proc):
    """One word per line region: alpha on the left of the top row, beta on the right: the labeled
    token columns of alpha lie left of beta's, and both lie in the top half of the grid."""
    coll = DVSFTCollator(proc)
    batch = coll([sample(["alpha", "beta"])])
    t, h, w = batch["image_grid_thw"][0].tolist()
    gh, gw = h // 2, w // 2
    ids, vision = batch["input_ids"][0], batch["vision_labels"][0]
    run = (ids == proc.image_token_id).nonzero().flatten()
    grid = vision[run].view(gh, gw)
    tok = proc.tokenizer
    a, b = tok.convert_tokens_to_ids("alpha"), tok.convert_tokens_to_ids("beta")
    cols_a = (grid == a).nonzero()[:, 1]
    cols_b = (grid == b).nonzero()[:, 1]
    rows = (grid != IGN).nonzero()[:, 0]
    assert cols_a.max() < cols_b.min() and rows.max() < gh // 2 + 1


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_sides(side):
    proc = qwen2_vl_processor(WORDS, padding_side=side)
    batch = DVSFTCollator(proc)(
        [sample(["alpha"]), sample(["beta", "gamma", "delta", "omega", "sigma"], seed=1)]
    )
    pad = batch["attention_mask"] == 0
    assert (
        pad.any()
        and bool((batch["labels"][pad] == IGN).all())
        and bool((batch["vision_labels"][pad] == IGN).all())
    )
    assert _decode(proc.tokenizer, batch["labels"][0][batch["labels"][0] != IGN]) == ["alpha", "<|im_end|>"]


def test_multi_turn_and_train_on_last(proc):
    s = sample(["alpha", "beta"])
    s["messages"] += [
        {"role": "user", "content": "Read the text ."},
        {"role": "assistant", "content": "gamma delta"},
    ]
    tok = proc.tokenizer
    both = DVSFTCollator(proc)([s])["labels"][0]
    last = DVSFTCollator(proc, train_on="last")([s])["labels"][0]
    assert _decode(tok, both[both != IGN]) == ["alpha", "beta", "<|im_end|>", "gamma", "delta", "<|im_end|>"]
    assert _decode(tok, last[last != IGN]) == ["gamma", "delta", "<|im_end|>"]


def test_samples_without_words_and_bad_samples(proc):
    s = sample(["alpha"])
    s["words"] = []
    batch = DVSFTCollator(proc)([s])
    assert bool((batch["vision_labels"] == IGN).all()) and bool((batch["labels"] != IGN).any())
    with pytest.raises(ValueError, match="messages"):
        DVSFTCollator(proc)([{"image": s["image"]}])
    with pytest.raises(ValueError, match="max_length"):
        DVSFTCollator(proc, max_length=10)([s])
    with pytest.raises(ValueError, match="train_on"):
        DVSFTCollator(proc, train_on="everything")


def test_end_to_end_attach_and_trainer(proc, tmp_path):
    data = [sample(WORDS[i : i + 3], seed=i) for i in range(4)]
    coll = DVSFTCollator(proc)
    model = qwen2_vl_for_processor(proc).train()
    batch = coll(data[:2])
    with attach(model, DVLoss(vision_weight=0.5)) as h:
        out = model(**batch)
        out.loss.backward()
        assert torch.isfinite(out.loss) and h.last_metrics["vision_tokens"] > 0
    # raw samples through a Trainer with remove_unused_columns=True (default): the mixin keeps them
    model.zero_grad(set_to_none=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DVSFTTrainer(model=model, args=args, train_dataset=data, data_collator=coll)
    trainer.train()
    logs = [x for x in trainer.state.log_history if "vision_loss" in x]
    assert len(logs) == 2 and all(x["vision_tokens"] > 0 and x["text_tokens"] > 0 for x in logs)
