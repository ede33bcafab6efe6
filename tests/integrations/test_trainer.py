"""DVSFTTrainer / patch_trainer: gradient-accumulation equivalence, kept columns, per-stream logs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from dvsft_kernels import DVLoss, attach
from dvsft_kernels.integrations import DVSFTTrainer, get_handle, patch_trainer, unpatch_trainer
from tests.integrations.helpers import IGN, reference_loss, torchrun
from tests.integrations.tiny_models import IMG, qwen2_vl, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/integrations/conftest.py


_PAD = {"input_ids": 0, "attention_mask": 0, "labels": IGN, "vision_labels": IGN, "mm_token_type_ids": 0}


def _samples(tiny):
    """Two samples whose text / vision target counts differ a lot, so any per-micro-batch
    normalisation shows up in the gradients."""
    return _spec_samples(tiny, [(4, 6, 3, 1), (9, 14, 12, 5)])


def _spec_samples(tiny, spec):
    """One sample per (pre, post, n_text, vis_every): n_text answer targets, every vis_every-th visual
    token labeled (0: none, so (.., 0, 0) is a sample without any target)."""
    out = []
    for seed, (pre, post, n_text, vis_every) in enumerate(spec):
        b = tiny.batch(1, pre=pre, post=post, seed=seed)
        ids = b["input_ids"][0]
        labels = torch.full_like(ids, IGN)
        if n_text:
            labels[-n_text:] = ids[-n_text:]
        vision = torch.full_like(ids, IGN)
        if vis_every:
            img_pos = (ids == IMG).nonzero().flatten()[::vis_every]
            vision[img_pos] = (img_pos * 7 + seed) % 900 + 5
        out.append(
            {
                "input_ids": ids,
                "attention_mask": b["attention_mask"][0],
                "labels": labels,
                "vision_labels": vision,
                "mm_token_type_ids": b["mm_token_type_ids"][0],
                "pixel_values": b["pixel_values"],
                "image_grid_thw": b["image_grid_thw"],
            }
        )
    return out


def collate(features):
    """Right padding (positions of real tokens do not depend on the batch), images concatenated."""
    T = max(len(f["input_ids"]) for f in features)
    batch = {}
    for k, pad in _PAD.items():
        if k in features[0]:
            batch[k] = torch.stack(
                [torch.cat([f[k], torch.full((T - len(f[k]),), pad, dtype=f[k].dtype)]) for f in features]
            )
    for k in ("pixel_values", "image_grid_thw"):
        if k in features[0]:
            batch[k] = torch.cat([f[k] for f in features])
    return batch


def _args(tmp_path, bs, ga, **kw):
    d = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": bs,
        "gradient_accumulation_steps": ga,
        "max_steps": 1,
        "learning_rate": 1.0,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    d.update(kw)
    return transformers.TrainingArguments(**d)


@pytest.fixture(scope="module")
def setup():
    tiny = qwen2_vl()
    return tiny.model, _samples(tiny)


def _delta(model_before, model_after):
    before = dict(model_before.named_parameters())
    return {n: (p.detach() - before[n].detach()) for n, p in model_after.named_parameters()}


def _train(model0, data, tmp_path, bs, ga, how="subclass", loss=None, **kw):
    model = copy.deepcopy(model0).train()
    args = _args(tmp_path, bs, ga, **kw)
    if how == "subclass":
        trainer = DVSFTTrainer(model=model, args=args, train_dataset=data, data_collator=collate, loss=loss)
    elif how == "patch":
        trainer = patch_trainer(
            transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate), loss
        )
    else:  # attach only, plain Trainer: what the mixin exists to fix
        attach(model, loss)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    return model, trainer


def _full_batch_reference(model0, data, loss=None):
    """Gradient of the DESIGN 4.2 loss over the whole batch, from full logits: what one SGD step of
    lr 1 subtracts."""
    loss = loss or DVLoss()
    model = copy.deepcopy(model0).train()
    b = collate(data)
    logits = model(**{k: v for k, v in b.items() if k not in ("labels", "vision_labels")}).logits
    ref = reference_loss(
        logits.double(),
        b["labels"],
        b["vision_labels"],
        text_weight=loss.text_weight,
        vision_weight=loss.vision_weight,
        vision_shift=loss.vision_shift,
    )
    ref.backward()
    return {n: -p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}, float(
        ref.detach()
    )


def _close(d1, d2, name=""):
    scale = max(v.abs().max().item() for v in d2.values())
    worst = max((d1[n] - d2[n]).abs().max().item() for n in d2)
    assert worst <= 1e-5 * scale, f"{name}: max diff {worst:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("how", ["subclass", "patch"])
def test_gradient_accumulation_equivalence(setup, tmp_path, how):
    model0, data = setup
    loss = DVLoss(vision_weight=0.5)
    m_one, t_one = _train(model0, data, tmp_path / "one", bs=2, ga=1, how=how, loss=loss)
    m_acc, t_acc = _train(model0, data, tmp_path / "acc", bs=1, ga=2, how=how, loss=loss)
    d_one, d_acc = _delta(model0, m_one), _delta(model0, m_acc)
    _close(d_acc, d_one, "2 x 1 vs 1 x 2")
    ref, ref_loss = _full_batch_reference(model0, data, loss)
    _close({n: d_one[n] for n in ref}, ref, "1 x 2 vs full-logits reference")
    assert all(d_one[n].abs().max() == 0 for n in d_one if n not in ref)

    for t in (t_one, t_acc):
        log = next(x for x in t.state.log_history if "loss" in x)
        assert {"text_loss", "vision_loss", "vision_accuracy", "text_accuracy", "vision_tokens"} <= set(log)
        n_text = sum(int((d["labels"][1:] != IGN).sum()) for d in data)
        n_vis = sum(int((d["vision_labels"][1:] != IGN).sum()) for d in data)
        assert log["text_tokens"] == n_text and log["vision_tokens"] == n_vis
        assert log["loss"] == pytest.approx(ref_loss, rel=1e-4)
        assert log["text_loss"] + 0.5 * log["vision_loss"] == pytest.approx(ref_loss, rel=1e-4)
        assert 0.0 <= log["vision_accuracy"] <= 1.0


def test_without_the_mixin_accumulation_is_wrong(setup, tmp_path):
    """attach() alone under a plain Trainer: vision_labels are dropped by remove_unused_columns, and
    with remove_unused_columns=False the vision stream is normalised per micro-batch."""
    model0, data = setup
    with pytest.warns(UserWarning, match="num_vision_items_in_batch"):
        m_one, _ = _train(model0, data, tmp_path / "one", bs=2, ga=1, how="attach", remove_unused_columns=False)
    with pytest.warns(UserWarning, match="num_vision_items_in_batch"):
        m_acc, _ = _train(model0, data, tmp_path / "acc", bs=1, ga=2, how="attach", remove_unused_columns=False)
    d_one, d_acc = _delta(model0, m_one), _delta(model0, m_acc)
    with pytest.raises(AssertionError):
        _close(d_acc, d_one)
    _, t_drop = _train(model0, data, tmp_path / "drop", bs=2, ga=1, how="attach")
    assert "vision_labels" not in t_drop._signature_columns  # the column the mixin keeps


def test_patch_and_unpatch_restore(setup, tmp_path):
    model0, data = setup
    model = copy.deepcopy(model0)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, 1, 1), train_dataset=data, data_collator=collate
    )
    cls, accepts = type(trainer), trainer.model_accepts_loss_kwargs
    patch_trainer(trainer)
    assert get_handle(model) is not None and type(trainer).__name__ == "DVSFTTrainer"
    with pytest.raises(ValueError):
        patch_trainer(trainer)
    unpatch_trainer(trainer)
    assert type(trainer) is cls and get_handle(model) is None and trainer.model_accepts_loss_kwargs == accepts
    assert not [k for k in trainer.__dict__ if k.startswith("_dvsft")]


def test_refuses_label_smoothing_factor(setup, tmp_path):
    model0, data = setup
    with pytest.raises(ValueError, match="label_smoothing"):
        DVSFTTrainer(
            model=copy.deepcopy(model0),
            args=_args(tmp_path, 1, 1, label_smoothing_factor=0.1),
            train_dataset=data,
            data_collator=collate,
        )
    assert get_handle(model0) is None


def test_evaluate_reports_streams_without_full_logits(setup, tmp_path):
    model0, data = setup
    model = copy.deepcopy(model0)
    trainer = DVSFTTrainer(
        model=model,
        args=_args(tmp_path, 2, 1, per_device_eval_batch_size=2),
        train_dataset=data,
        eval_dataset=data,
        data_collator=collate,
    )
    handle = get_handle(model)
    shapes = []
    probe = model.register_forward_hook(
        lambda m, a, k, o: shapes.append(tuple(o.logits.shape)), with_kwargs=True
    )
    metrics = trainer.evaluate()
    probe.remove()
    b = collate(data)
    with torch.no_grad():
        logits = model(**{k: v for k, v in b.items() if k not in ("labels", "vision_labels")}).logits
    ref = float(reference_loss(logits.double(), b["labels"], b["vision_labels"]))
    assert metrics["eval_loss"] == pytest.approx(ref, rel=1e-4)
    assert {"eval_text_loss", "eval_vision_loss", "eval_vision_accuracy"} <= set(metrics)
    assert shapes and all(s[1] == 1 for s in shapes)  # no compute_metrics: logits were skipped in eval too
    assert handle.skip_logits == "auto"


def test_trl_sft_trainer(setup, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model0, data = setup
    rows = [{k: v.tolist() for k, v in d.items()} for d in data]
    ds = datasets.Dataset.from_list(rows)

    def collate_lists(features):
        return collate([{k: torch.tensor(v) for k, v in f.items()} for f in features])

    deltas = {}
    for bs, ga in ((2, 1), (1, 2)):
        model = copy.deepcopy(model0).train()
        args = trl.SFTConfig(
            **{
                k: getattr(_args(tmp_path, bs, ga), k)
                for k in (
                    "output_dir",
                    "per_device_train_batch_size",
                    "gradient_accumulation_steps",
                    "max_steps",
                    "learning_rate",
                    "optim",
                    "lr_scheduler_type",
                    "weight_decay",
                    "max_grad_norm",
                    "logging_steps",
                    "save_strategy",
                    "report_to",
                    "use_cpu",
                    "seed",
                )
            },
            dataset_kwargs={"skip_prepare_dataset": True},
            remove_unused_columns=False,
            max_length=None,
            bf16=False,
        )
        trainer = trl.SFTTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            data_collator=collate_lists,
            processing_class=tiny_tokenizer(),
        )
        patch_trainer(trainer, DVLoss(vision_weight=0.5))
        trainer.train()
        deltas[(bs, ga)] = _delta(model0, model)
        log = next(x for x in trainer.state.log_history if "loss" in x)
        assert "vision_loss" in log and "vision_accuracy" in log
    _close(deltas[(1, 2)], deltas[(2, 1)], "TRL 2 x 1 vs 1 x 2")
    ref, _ = _full_batch_reference(model0, data, DVLoss(vision_weight=0.5))
    _close({n: deltas[(2, 1)][n] for n in ref}, ref, "TRL vs reference")


def test_two_processes_match_one_batch(setup, tmp_path):
    """2 ranks x 1 sample (gloo, CPU) give the step of 1 process x 2 samples: both streams are
    normalised by the counts of all ranks, and the per-stream logs are global."""
    model0, data = setup
    got = _run_ranks(tmp_path, 2)
    m_one, t_one = _train(model0, data, tmp_path / "one", bs=2, ga=1, loss=DVLoss(vision_weight=0.5))
    _close(got["delta"], _delta(model0, m_one), "2 ranks x 1 vs 1 x 2")
    log_one = next(x for x in t_one.state.log_history if "loss" in x)
    for k in ("loss", "text_loss", "vision_loss", "text_tokens", "vision_tokens", "vision_accuracy"):
        assert got["log"][k] == pytest.approx(log_one[k], rel=1e-4), k


def _run_ranks(tmp_path, world, spec=None):
    """The DDP worker on `world` gloo processes, bounded: ddp_timeout 60 s inside, 300 s for the run."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    torchrun("ddp_worker.py", str(tmp_path), str(root), *([json.dumps(spec)] if spec is not None else []),
             world=world)
    return torch.load(tmp_path / "rank0.pt")


# Sequential sampling, one sample per micro-batch: rank r gets samples r, r + world, ... In both cases the
# last rank's whole accumulation window has no target at all (no text, no vision): its loss is 0, its
# gradients are zeros, it still joins every DDP all-reduce, and the step equals one process over all samples.
_NO_TARGETS = (5, 7, 0, 0)
_RANK_CASES = {
    "2x2": (2, 2, [(4, 6, 3, 1), _NO_TARGETS, (9, 14, 12, 5), _NO_TARGETS]),
    "3x1": (3, 1, [(4, 6, 3, 1), (9, 14, 12, 5), _NO_TARGETS]),
}


@pytest.mark.parametrize("case", list(_RANK_CASES))
def test_ranks_with_accumulation_and_a_rank_without_targets(tmp_path, case):
    """N ranks x ga micro-batches (one sample each) give the step of one process over the whole batch,
    with one rank that never sees a labeled row; per-stream logs are global."""
    world, ga, spec = _RANK_CASES[case]
    got = _run_ranks(tmp_path, world, {"ga": ga, "samples": spec})
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in range(world)]
    assert seen[-1][:ga] == [0] * ga and all(s[0] > 0 for s in seen[:-1]), seen
    tiny = qwen2_vl()
    data = _spec_samples(tiny, spec)
    loss = DVLoss(vision_weight=0.5)
    m_one, t_one = _train(tiny.model, data, tmp_path / "one", bs=len(spec), ga=1, loss=loss)
    _close(got["delta"], _delta(tiny.model, m_one), f"{case} vs 1 x {len(spec)}")
    ref, _ = _full_batch_reference(tiny.model, data, loss)
    _close({n: got["delta"][n] for n in ref}, ref, f"{case} vs reference")
    log_one = next(x for x in t_one.state.log_history if "loss" in x)
    for k in ("loss", "text_loss", "vision_loss", "text_tokens", "vision_tokens", "vision_accuracy"):
        assert got["log"][k] == pytest.approx(log_one[k], rel=1e-4), k


# ---- refusals and patch / unpatch misuse ------------------------------------------------------------------


def _plain_trainer(model, tmp_path, data, **kw):
    return transformers.Trainer(model=model, args=_args(tmp_path, 1, 1, **kw.pop("args", {})), train_dataset=data,
                                data_collator=collate, **kw)


def test_refusals_leave_the_model_unattached(setup, tmp_path, monkeypatch):
    """Each configuration the DV-SFT trainer cannot honour is a ValueError naming it; neither the
    subclass nor patch_trainer leaves a handle on the model or a swapped class behind."""
    model0, data = setup
    cases = [
        ({"args": {"label_smoothing_factor": 0.1}}, "args.label_smoothing_factor"),
        ({"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs.loss},
         "compute_loss_func needs full logits"),
    ]
    for kw, match in cases:
        model = copy.deepcopy(model0)
        with pytest.raises(ValueError, match=f"^DV-SFT trainer: {match}"):
            DVSFTTrainer(model=model, args=_args(tmp_path, 1, 1, **kw.get("args", {})), train_dataset=data,
                         data_collator=collate, **{k: v for k, v in kw.items() if k != "args"})
        assert get_handle(model) is None
        trainer = _plain_trainer(model, tmp_path, data, **dict(kw))
        cls = type(trainer)
        with pytest.raises(ValueError, match=f"^DV-SFT trainer: {match}"):
            patch_trainer(trainer)
        assert type(trainer) is cls and get_handle(model) is None
        assert not [k for k in trainer.__dict__ if k.startswith("_dvsft")]

    # a loss that is not a DVLoss, with the model unattached and attached
    model = copy.deepcopy(model0)
    with pytest.raises(ValueError, match="^loss: expected a DVLoss or None, got str"):
        DVSFTTrainer(model=model, args=_args(tmp_path, 1, 1), train_dataset=data, data_collator=collate,
                     loss="dvloss")
    assert get_handle(model) is None
    with attach(model) as h:
        trainer = _plain_trainer(model, tmp_path, data)
        with pytest.raises(ValueError, match="^loss: expected a DVLoss or None, got CrossEntropyLoss"):
            patch_trainer(trainer, torch.nn.CrossEntropyLoss())
        assert type(trainer) is transformers.Trainer and get_handle(model) is h

    # several GPUs in one process (DataParallel)
    model = copy.deepcopy(model0)
    trainer = _plain_trainer(model, tmp_path, data)
    monkeypatch.setattr(transformers.TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match="^DV-SFT trainer: torch.nn.DataParallel"):
        patch_trainer(trainer)
    assert type(trainer) is transformers.Trainer and get_handle(model) is None


def test_model_attached_with_another_loss(setup, tmp_path):
    model0, data = setup
    model = copy.deepcopy(model0)
    mine = DVLoss(vision_weight=0.2)
    with attach(model, mine) as h:
        with pytest.raises(ValueError, match="^DV-SFT trainer: the model is already attached with another loss"):
            DVSFTTrainer(model=model, args=_args(tmp_path, 1, 1), train_dataset=data, data_collator=collate,
                         loss=DVLoss())
        # the same loss (or none): the trainer uses the caller's handle and leaves it attached
        trainer = patch_trainer(_plain_trainer(model, tmp_path, data), mine)
        assert trainer._dvsft_handle is h
        unpatch_trainer(trainer)
        assert get_handle(model) is h
        trainer = DVSFTTrainer(model=model, args=_args(tmp_path, 1, 1), train_dataset=data, data_collator=collate)
        assert trainer._dvsft_handle is h and trainer._dvsft_handle.user_loss is mine
    assert get_handle(model) is None


def test_patch_and_unpatch_misuse(setup, tmp_path):
    model0, data = setup
    for bad in (object(), "trainer", copy.deepcopy(model0)):
        with pytest.raises(TypeError, match="^trainer: expected a transformers.Trainer, got "):
            patch_trainer(bad)
    for bad in (object(), "trainer", None):
        with pytest.raises(ValueError, match="^trainer: not patched by patch_trainer"):
            unpatch_trainer(bad)

    model = copy.deepcopy(model0)
    trainer = _plain_trainer(model, tmp_path, data)
    with pytest.raises(ValueError, match="^trainer: not patched by patch_trainer"):
        unpatch_trainer(trainer)  # never patched
    assert type(trainer) is transformers.Trainer and get_handle(model) is None
    patch_trainer(trainer)
    handle = get_handle(model)
    with pytest.raises(ValueError, match="^trainer: already a DV-SFT trainer"):
        patch_trainer(trainer)  # double patch: nothing changes
    assert get_handle(model) is handle and trainer._dvsft_handle is handle
    unpatch_trainer(trainer)
    with pytest.raises(ValueError, match="^trainer: not patched by patch_trainer"):
        unpatch_trainer(trainer)  # twice
    assert type(trainer) is transformers.Trainer and get_handle(model) is None

    sub = DVSFTTrainer(model=copy.deepcopy(model0), args=_args(tmp_path, 1, 1), train_dataset=data,
                       data_collator=collate)
    with pytest.raises(ValueError, match="^trainer: already a DV-SFT trainer"):
        patch_trainer(sub)
    with pytest.raises(ValueError, match="^trainer: not patched by patch_trainer"):
        unpatch_trainer(sub)  # a DVSFTTrainer is a class of its own, not a patched one
    assert type(sub) is DVSFTTrainer


def test_patch_twice_after_unpatch_reuses_one_class(setup, tmp_path):
    """patch -> unpatch -> patch: the same generated class each time, and it trains like the first."""
    model0, data = setup
    trainer = _plain_trainer(copy.deepcopy(model0), tmp_path, data)
    first = type(patch_trainer(trainer))
    unpatch_trainer(trainer)
    assert type(patch_trainer(trainer)) is first
    unpatch_trainer(trainer)
