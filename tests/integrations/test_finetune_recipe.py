"""examples/finetune_vlm.py, the fine-tuning recipe, run in-process through its `main(argv)` on tiny
random Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision checkpoints (model + processor written with
save_pretrained, loaded back from the directory by the script) and pages rendered with Pillow:
it trains and logs both streams, freezes what it should (vision encoder; everything but the
adapters with --lora), resumes to the same weights as an uninterrupted run, skips and counts bad
records (fails naming the first with --strict), and reads pages with Tesseract under --ocr."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
import transformers as T
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file

from tests.integrations import tiny_models as tm
from tests.labeling._geometry_helpers import make_processor, novideo

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = pathlib.Path(__file__).resolve().parents[2]
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
WORDS = ["apple", "river", "stone", "cloud", "green", "house", "light", "table"]
PAGE = (224, 112)
ONEVISION_TEMPLATE = tm.QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")


def _load_script():
    spec = importlib.util.spec_from_file_location("finetune_vlm", ROOT / "examples" / "finetune_vlm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ft = _load_script()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---- tiny checkpoints: the model's vocabulary, image token and patching match the processor ----------------


def _qwen(family: str):
    base = tm.qwen2_vl_processor(WORDS)
    cls = {"qwen2_5_vl": T.Qwen2_5_VLProcessor, "qwen3_vl": T.Qwen3VLProcessor}[family]
    proc = novideo(cls)(image_processor=base.image_processor, tokenizer=base.tokenizer,
                        chat_template=base.chat_template)
    tok = proc.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in tm.QWEN_SPECIALS}
    text = tm._text(vocab_size=len(tok), pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|im_start|>"],
                    eos_token_id=ids["<|im_end|>"],
                    rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                     "rope_theta": 10000.0})
    vis = {"depth": 2, "hidden_size": 32, "out_hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
           "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if family == "qwen2_5_vl":
        vis.update(window_size=56, fullatt_block_indexes=[1])
        cfg_cls, model_cls = T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration
    else:
        text["head_dim"] = 8
        text["rope_parameters"]["mrope_interleaved"] = True
        vis.update(num_position_embeddings=16, deepstack_visual_indexes=[0])
        cfg_cls, model_cls = T.Qwen3VLConfig, T.Qwen3VLForConditionalGeneration
    cfg = cfg_cls(text_config=text, vision_config=vis, image_token_id=ids["<|image_pad|>"],
                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    return proc, model_cls(cfg)


def _onevision():
    pins = [[32, 64], [64, 32], [64, 64]]
    proc, _ = make_processor("llava_onevision", size={"height": 32, "width": 32}, image_grid_pinpoints=pins,
                             num_image_tokens=64, vision_feature_select_strategy="full")
    proc.chat_template = ONEVISION_TEMPLATE
    tok = proc.tokenizer
    cfg = T.LlavaOnevisionConfig(vision_config=tm._siglip(image_size=32),
                                 text_config=tm._llama(vocab_size=len(tok), model_type="qwen2"),
                                 image_token_id=tok.convert_tokens_to_ids("<image>"),
                                 video_token_id=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                 vision_feature_select_strategy="full", image_grid_pinpoints=pins)
    return proc, T.LlavaOnevisionForConditionalGeneration(cfg)


FAMILIES = {"qwen2_5_vl": lambda: _qwen("qwen2_5_vl"), "qwen3_vl": lambda: _qwen("qwen3_vl"),
            "llava_onevision": _onevision}
TOWER = {"qwen2_5_vl": "model.visual.", "qwen3_vl": "model.visual.", "llava_onevision": "model.vision_tower."}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> directory of a tiny random checkpoint (model + processor, save_pretrained)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fam, build in FAMILIES.items():
        torch.manual_seed(0)
        proc, model = build()
        d = root / fam
        model.save_pretrained(d)
        ft.save_processor(proc, d)
        out[fam] = d
    return out


# ---- data: pages rendered with DejaVu, words inline --------------------------------------------------------


def _page(i: int, size: int = 20):
    font = ImageFont.truetype(FONT, size)
    img = Image.new("RGB", PAGE, "white")
    d = ImageDraw.Draw(img)
    words, answer = [], []
    for line in range(2):
        w = WORDS[(3 * i + line) % len(WORDS)]
        xy = (8 + 28 * ((i + line) % 2), 10 + 56 * line)
        d.text(xy, w, font=font, fill="black")
        words.append({"text": w, "box": list(d.textbbox(xy, w, font=font))})
        answer.append(w)
    return img, words, " ".join(answer)


def _record(image: str, answer: str, words=None) -> dict:
    rec = {"image": image, "messages": [{"role": "user", "content": "Read the text ."},
                                        {"role": "assistant", "content": answer}]}
    if words is not None:
        rec["words"] = words
    return rec


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """data.jsonl: 8 good pages (relative image paths, inline words) and one record whose image is
    missing; plain.jsonl: the same pages without words (for --ocr)."""
    d = tmp_path_factory.mktemp("data")
    (d / "pages").mkdir()
    good, plain = [], []
    for i in range(8):
        img, words, answer = _page(i)
        img.save(d / "pages" / f"{i}.png")
        good.append(_record(f"pages/{i}.png", answer, words))
        plain.append(_record(f"pages/{i}.png", answer))
    rows = good[:3] + [_record("pages/missing.png", "apple")] + good[3:]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    return d


def run(ckpt, data_file, out, *extra):
    argv = ["--model", str(ckpt), "--data", str(data_file), "--output-dir", str(out), "--cpu",
            "--batch-size", "2", "--grad-accum", "1", "--lr", "5e-3", "--warmup-ratio", "0",
            "--logging-steps", "1", "--save-steps", "100", *map(str, extra)]
    return ft.main(argv)


def weights(d: pathlib.Path) -> dict[str, torch.Tensor]:
    """The state dict of the model saved in `d`, loaded with from_pretrained (which maps the saved
    names of some families, e.g. Qwen2.5-VL's `visual.*`, onto the module names)."""
    return T.AutoModelForImageTextToText.from_pretrained(str(d)).state_dict()


def changed(a, b, keys) -> list[str]:
    return [k for k in keys if not torch.equal(a[k], b[k])]


# ---- tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_finetune_freezes_the_vision_encoder(family, checkpoints, data, tmp_path):
    out = tmp_path / "out"
    trainer = run(checkpoints[family], data / "data.jsonl", out, "--max-steps", 3)
    tower = TOWER[family]
    grads = {n: p.requires_grad for n, p in trainer.model.named_parameters()}
    frozen = [n for n, g in grads.items() if not g]
    assert frozen and all(n.startswith(tower) for n in frozen), frozen[:5]
    if family.startswith("qwen"):  # the merger (projector) inside `visual` trains
        merger = [g for n, g in grads.items() if n.startswith("model.visual.merger.")]
        assert merger and all(merger)
    # trained 3 steps on both streams; the saved model: vision encoder unchanged, the LM changed
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert len(rows) == 3 and all(h["vision_tokens"] > 0 and h["text_tokens"] > 0 for h in rows), rows
    assert {"text_loss", "vision_loss", "text_accuracy", "vision_accuracy"} <= set(rows[0])
    before, after = weights(checkpoints[family]), weights(out)
    assert before.keys() == after.keys()
    vision = [k for k in before if k.startswith(tower) and "merger" not in k]
    lm = [k for k in before if k.startswith("model.language_model.")]
    assert vision and not changed(before, after, vision)
    assert len(changed(before, after, lm)) == len(lm)
    # the missing image was counted and skipped; the output loads like the input
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["records"] == 8 and summary["skipped"] == 1
    assert "missing.png" in summary["skipped_reasons"][0] and "data.jsonl:4" in summary["skipped_reasons"][0]
    from dvsft_kernels.readout import load_checkpoint

    model, proc = load_checkpoint(out, device="cpu")
    _, proc0 = load_checkpoint(checkpoints[family], device="cpu")
    assert type(model).__name__ == type(trainer.model).__name__
    assert type(proc).__name__ == type(proc0).__name__ and len(proc.tokenizer) == len(proc0.tokenizer)
    assert (out / "checkpoint-3" / "processor_config.json").is_file()  # each checkpoint holds the processor


def test_lora_trains_only_adapters_outside_the_vision_encoder(checkpoints, data, tmp_path):
    out = tmp_path / "out"
    trainer = run(checkpoints["qwen2_5_vl"], data / "data.jsonl", out, "--lora", "--lora-r", 4,
                  "--max-steps", 2, "--gradient-checkpointing")
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable[:5]
    adapted = {n.split(".lora_")[0] for n in trainable}
    # the LM's linear layers and the projector (merger) carry adapters; the vision blocks do not
    assert any(".language_model." in n for n in adapted)
    assert any(".visual.merger." in n for n in adapted)
    assert not any(".visual.blocks." in n for n in adapted)
    # only the adapters moved: the base weights the trainer holds are the checkpoint's
    base = weights(checkpoints["qwen2_5_vl"])
    held = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach()
            for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert held.keys() == base.keys() and not changed(base, held, base)
    adapters = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapters.items())


def test_no_freeze_vision_with_trl_trains_the_vision_encoder(checkpoints, data, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "out"
    trainer = run(checkpoints["qwen2_5_vl"], data / "data.jsonl", out, "--trainer", "trl",
                  "--no-freeze-vision", "--max-steps", 2, "--bf16", "--gradient-checkpointing")
    assert type(trainer).__name__ == "DVSFTSFTTrainer"
    assert all(p.requires_grad for p in trainer.model.parameters())
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert len(rows) == 2 and all(h["vision_tokens"] > 0 for h in rows)
    before, after = weights(checkpoints["qwen2_5_vl"]), weights(out)
    vision = [k for k in before if k.startswith("model.visual.blocks.")]
    assert len(changed(before, after, vision)) == len(vision)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(mode, checkpoints, data, tmp_path):
    """An uninterrupted run of 4 steps (checkpoints at 2 and 4) against a run interrupted after its
    step-2 checkpoint: the output dir holds only checkpoint-2 (the files the uninterrupted run wrote
    there, so exactly what an interrupted run leaves), and `--resume` continues to step 4. The
    weights (LoRA: the adapter), the optimizer, the scheduler, the RNG and the data position come from
    the checkpoint, and the same operations run in the same order on one thread: the weights are
    bitwise equal (tolerance 0)."""
    ckpt = checkpoints["qwen2_5_vl"]
    args = ("--max-steps", 4, "--save-steps", 2, *(("--lora", "--lora-r", 4) if mode == "lora" else ()))
    full = tmp_path / "full"
    run(ckpt, data / "data.jsonl", full, *args)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    trainer = run(ckpt, data / "data.jsonl", part, *args, "--resume")
    summary = json.loads((part / "finetune_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4
    assert trainer.state.global_step == 4
    load = (lambda d: load_file(str(d / "adapter_model.safetensors"))) if mode == "lora" else weights
    a, b, mid = load(full), load(part), load(full / "checkpoint-2")
    assert a.keys() == b.keys()
    assert changed(mid, a, a), "steps 3-4 changed nothing: the comparison would be empty"
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, {k: (a[k] - b[k]).abs().max().item() for k in bad[:5]}
    # resuming a finished run does nothing more
    again = run(ckpt, data / "data.jsonl", part, *args, "--resume")
    assert again.state.global_step == 4


def test_bad_records_are_counted_and_skipped_and_strict_names_the_first(data, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    good = json.loads((data / "data.jsonl").read_text().splitlines()[0])
    good["image"] = str(data / good["image"])
    rows = [
        good,
        {**good, "image": str(tmp_path / "broken.png")},  # unreadable image
        {**good, "messages": []},  # no messages
        {**good, "image": str(tmp_path / "nowhere.png")},  # missing file
        {**good, "words": [{"text": "x"}]},  # a word without a box
        {"messages": good["messages"]},  # no image
    ]
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    records, skipped = ft.load_records(str(f))
    assert len(records) == 1 and len(skipped) == 6
    reasons = ("unreadable", "no messages", "not found", "bad `words`", "no image", "not JSON")
    for n, why in zip(range(2, 8), reasons):
        assert f"bad.jsonl:{n}:" in skipped[n - 2] and why in skipped[n - 2], skipped[n - 2]
    # an `ocr` file (any read_ocr format; here the plain words JSON) instead of inline words
    (tmp_path / "words.json").write_text(json.dumps(good["words"]))
    (tmp_path / "bad_words.json").write_text("{")
    plain = {k: v for k, v in good.items() if k != "words"}
    g = tmp_path / "ocr.jsonl"
    g.write_text(json.dumps({**plain, "ocr": "words.json"}) + "\n" + json.dumps({**plain, "ocr": "bad_words.json"}))
    records, skipped = ft.load_records(str(g))
    assert records[0]["words"] == good["words"]
    assert len(skipped) == 1 and "ocr.jsonl:2: OCR file" in skipped[0] and "bad_words.json" in skipped[0]
    # --strict stops at the first bad record, naming it, before any model is loaded
    with pytest.raises(SystemExit, match=r"--strict: .*bad\.jsonl:2: image .*broken\.png.* is unreadable"):
        ft.main(["--model", str(tmp_path / "no_model"), "--data", str(f), "--strict"])
    # every record bad: nothing to train on
    f.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(SystemExit, match="no usable record"):
        ft.main(["--model", str(tmp_path / "no_model"), "--data", str(f)])


def test_datasets_directory(data, tmp_path):
    """A `save_to_disk` directory: image paths (a missing one skipped), or an Image column (kept
    encoded until a batch is made)."""
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(x) for x in (data / "data.jsonl").read_text().splitlines()]
    for r in rows:
        r["image"] = str(data / r["image"])
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "paths"))
    records, skipped = ft.load_records(str(tmp_path / "paths"))
    assert len(records) == 8 and len(skipped) == 1 and "row 3" in skipped[0] and "not found" in skipped[0]
    good = [r for r in rows if "missing" not in r["image"]]
    pil = [{**r, "image": Image.open(r["image"]).convert("RGB")} for r in good]
    datasets.Dataset.from_list(pil).save_to_disk(str(tmp_path / "images"))
    records, skipped = ft.load_records(str(tmp_path / "images"))
    assert len(records) == 8 and not skipped
    assert isinstance(records[0]["images"][0], dict)  # still encoded
    for rec, row in zip(records, good):
        sample = ft.RecordCollator(None).sample(rec)
        assert sample["images"][0].size == PAGE
        assert [w.text for w in sample["words"]] == [w["text"] for w in row["words"]]
        assert list(sample["images"][0].getdata()) == list(Image.open(row["image"]).convert("RGB").getdata())


def test_ocr_tesseract_labels_the_pages(checkpoints, data, tmp_path):
    try:
        from dvsft_kernels.labeling import run_ocr
    except ImportError:
        pytest.skip("dvsft_kernels.labeling.run_ocr (labeling/ocr.py) has not landed")
    if shutil.which("tesseract") is None:
        pytest.skip("no tesseract binary")
    img = Image.open(data / "pages" / "0.png")
    read = [w.text for w in run_ocr(img, "tesseract")]
    assert set(_page(0)[2].split()) <= set(read), read
    out = tmp_path / "out"
    trainer = run(checkpoints["qwen2_5_vl"], data / "plain.jsonl", out, "--ocr", "tesseract",
                  "--max-steps", 2)
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert len(rows) == 2 and all(h["vision_tokens"] > 0 for h in rows), rows
    # without --ocr the same records have no words: text loss only
    trainer = run(checkpoints["qwen2_5_vl"], data / "plain.jsonl", tmp_path / "no_ocr", "--max-steps", 1)
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert rows[0]["vision_tokens"] == 0


@pytest.mark.slow
def test_torchrun_two_processes(checkpoints, data, tmp_path):
    """`torchrun --nproc-per-node 2 examples/finetune_vlm.py ...`: 2 gloo CPU processes train, rank 0
    writes the output once, the vision encoder stays as it was."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "finetune_vlm.py"), "--model", str(checkpoints["qwen3_vl"]),
           "--data", str(data / "data.jsonl"), "--output-dir", str(out), "--cpu", "--batch-size", "1",
           "--grad-accum", "1", "--lr", "5e-3", "--max-steps", "2", "--logging-steps", "1",
           "--save-steps", "2"]
    res = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("'vision_loss'") == 2, res.stdout[-3000:]  # 2 steps, logged by rank 0 only
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["skipped"] == 1
    before, after = weights(checkpoints["qwen3_vl"]), weights(out)
    vision = [k for k in before if k.startswith("model.visual.blocks.")]
    lm = [k for k in before if k.startswith("model.language_model.layers.")]
    assert vision and not changed(before, after, vision)
    assert len(changed(before, after, lm)) == len(lm)


def test_soft_labels_flag_trains_on_soft_vision_labels(checkpoints, data, tmp_path, monkeypatch):
    """--soft 3 --spread 0.2: the collator's batches carry (B, T, 3) vision labels with weights, and
    the run trains on both streams."""
    from dvsft_kernels.integrations import DVSFTCollator

    shapes = []
    real = DVSFTCollator.__call__

    def spy(self, records):
        batch = real(self, records)
        shapes.append((tuple(batch["vision_labels"].shape), tuple(batch["vision_label_weights"].shape)))
        return batch

    monkeypatch.setattr(DVSFTCollator, "__call__", spy)
    trainer = run(checkpoints["qwen2_5_vl"], data / "data.jsonl", tmp_path / "out", "--max-steps", 2,
                  "--soft", 3, "--spread", 0.2)
    assert shapes and all(v[-1] == 3 and v == w for v, w in shapes), shapes
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert len(rows) == 2 and all(h["vision_tokens"] > 0 and h["text_tokens"] > 0 for h in rows), rows
