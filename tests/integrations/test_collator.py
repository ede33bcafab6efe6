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

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/integrations/conftest.py


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
    _, h, w = batch["image_grid_thw"][0].tolist()
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


# ---- edge cases on two processor families: Qwen2-VL (word-level) and LLaVA (byte-level BPE) -----------

CHAT = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _llava_processor():
    from tests.labeling._geometry_helpers import make_processor

    proc, _ = make_processor(
        "llava", size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    proc.chat_template = CHAT
    return proc


@pytest.fixture(scope="module", params=["qwen2_vl", "llava"])
def fam_proc(request):
    return request.param, (qwen2_vl_processor(WORDS) if request.param == "qwen2_vl" else _llava_processor())


def _image_token(proc):
    from dvsft_kernels.labeling import families

    return families.image_token_id(proc)


def _first_token_ids(proc, words):
    """Ids a word's first piece may have ("first" labeling mode): the word tokenized alone or after a
    space as in running text, a bare space piece skipped. Disjoint across the words used here."""
    tok = proc.tokenizer
    out = set()
    for w in words:
        for text in (w, " " + w):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            out.add(ids[1] if tok.decode(ids[:1]).strip() == "" else ids[0])
    return out


def _answer_text(proc, labels_row):
    ids = labels_row[labels_row != IGN].tolist()
    return proc.tokenizer.decode(ids).replace(" ", "")


def test_empty_batch(fam_proc):
    _, proc = fam_proc
    with pytest.raises(ValueError, match="^samples: empty batch"):
        DVSFTCollator(proc)([])


def test_text_only_samples(fam_proc):
    """No image anywhere: no pixel inputs, no vision_labels; labels on the answers only."""
    _, proc = fam_proc
    data = [sample(["alpha", "beta"]), sample(["gamma"], seed=1)]
    for s in data:
        del s["image"], s["words"]
    batch = DVSFTCollator(proc)(data)
    assert "vision_labels" not in batch and "pixel_values" not in batch
    assert not (batch["input_ids"] == _image_token(proc)).any()
    for b, answer in enumerate(["alphabeta", "gamma"]):
        assert _answer_text(proc, batch["labels"][b]).startswith(answer)
        assert "Read" not in _answer_text(proc, batch["labels"][b])  # the user turn is not a target
    assert bool((batch["labels"][batch["attention_mask"] == 0] == IGN).all())


def test_mixed_text_only_and_image_samples_are_refused(fam_proc):
    _, proc = fam_proc
    text_only = sample(["gamma"], seed=1)
    del text_only["image"], text_only["words"]
    for data in ([sample(["alpha"]), text_only], [text_only, sample(["alpha"])]):
        with pytest.raises(ValueError, match="^samples: a batch mixes samples with and without images"):
            DVSFTCollator(proc)(data)


def test_several_images_per_sample(fam_proc):
    """Two images with their own word lists: each image's placeholder run carries only its own words,
    and both runs carry some; the single-image sample next to it is labeled as usual."""
    _, proc = fam_proc
    (img1, w1), (img2, w2) = render(["alpha", "beta"]), render(["gamma", "delta"], seed=1)
    two = sample(["alpha", "beta", "gamma", "delta"])
    two.pop("image")
    two.update(images=[img1, img2], words=[w1, w2])
    batch = DVSFTCollator(proc)([two, sample(["omega", "sigma"], seed=2)])
    ids, vision = batch["input_ids"], batch["vision_labels"]
    pos = (ids[0] == _image_token(proc)).nonzero().flatten()
    assert len(pos) % 2 == 0 and len(pos) > 0
    runs = pos.view(2, -1)  # same image size: equal runs, in order
    assert not _first_token_ids(proc, ["alpha", "beta"]) & _first_token_ids(proc, ["gamma", "delta"])
    for run, words in zip(runs, (["alpha", "beta"], ["gamma", "delta"])):
        got = set(vision[0, run].tolist()) - {IGN}
        assert got and got <= _first_token_ids(proc, words), (got, words)
    assert bool((vision[0][(ids[0] != _image_token(proc))] == IGN).all())
    got1 = set(vision[1].tolist()) - {IGN}
    assert got1 and got1 <= _first_token_ids(proc, ["omega", "sigma"])


def test_image_and_word_list_count_mismatches(fam_proc):
    _, proc = fam_proc
    (img1, w1), (img2, w2) = render(["alpha"]), render(["beta"], seed=1)
    base = sample(["alpha", "beta"])
    base.pop("image")
    coll = DVSFTCollator(proc)
    for words, n in (([w1], 1), ([w1, w2, w1], 3)):
        with pytest.raises(ValueError, match=rf"^sample 0: 2 images but {n} word lists"):
            coll([{**base, "images": [img1, img2], "words": words}])
    # the messages already hold image parts, but not one per image
    one_part = {**base, "images": [img1, img2], "words": [w1, w2]}
    one_part["messages"] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the text ."}]},
        base["messages"][1],
    ]
    with pytest.raises(ValueError, match="^sample 0: messages hold 1 image parts for 2 images"):
        coll([one_part])
    # words=None with two images: allowed, no vision labels
    batch = coll([{**base, "images": [img1, img2], "words": None}])
    assert bool((batch["vision_labels"] == IGN).all()) and bool((batch["labels"] != IGN).any())
