"""attach(): exactness against the plain full-logits loss, no [B, T, V] allocation, exact removal,
PEFT, gradient checkpointing, post-head transforms, bad input."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from dvsft_kernels import DVLoss, attach
from dvsft_kernels.integrations import AttachError, get_handle
from tests.integrations.helpers import (
    IGN,
    attached_run,
    compare_to_reference,
    grads,
    make_targets,
    plain_run,
    reference_loss,
    torchrun,
)
from tests.integrations.tiny_models import ALL_FAMILIES, VLM_FAMILIES, V, gemma3, llama_causal, qwen2_vl
from tests.memory import AllocationRecorder


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; restored after the test (not module-wide: that would
    make the whole suite single-threaded)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hook_state(model):
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    return {(mn, a): tuple(getattr(m, a, {}).keys()) for mn, m in model.named_modules() for a in names}


@pytest.mark.parametrize("family", list(ALL_FAMILIES))
def test_matches_full_logits_and_allocates_no_btv(family):
    tiny = ALL_FAMILIES[family]()
    batch = tiny.batch(2)
    labels, vision = make_targets(batch)
    B, T = batch["input_ids"].shape
    assert int((labels != IGN).sum() + (vision != IGN).sum()) < B * T / 2  # else the op's chunk is B*T*V/2

    def make():
        m = copy.deepcopy(tiny.model)
        m.train()
        return m

    out, handle = compare_to_reference(make, batch, labels, vision)
    assert out.logits.shape == (B, 1, V)  # logits_to_keep=1 reached the head
    m = handle.last_output
    assert int(m.text_tokens) == int((labels[:, 1:] != IGN).sum())
    assert int(m.vision_tokens) == int((vision[:, 1:] != IGN).sum())
    assert set(out.dvsft_metrics) >= {"text_loss", "vision_loss", "vision_accuracy"}
    if tiny.multimodal:
        assert int(m.vision_tokens) > 0

    # allocation: every new tensor made during forward and backward of the attached call
    model = make()
    with attach(model), AllocationRecorder() as rec:
        attached_run(model, batch, labels, vision)
    limit = B * T * V // 2
    big = [s for s in rec.sizes if s[2] >= limit]
    assert not big, f"tensors of >= B*T*V/2 = {limit} elements: {big[:5]}"


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "llama"])
def test_remove_restores_model_exactly(family):
    tiny = ALL_FAMILIES[family]()
    model = tiny.model.train()
    batch = tiny.batch(2)
    labels, vision = make_targets(batch)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hook_state(model)
    dict_keys = {n: set(m.__dict__) for n, m in model.named_modules()}
    sig = inspect.signature(model.forward)
    fwd_func = type(model).forward
    with torch.no_grad():
        before = model(**batch).logits

    with attach(model) as h:
        assert get_handle(model) is h
        attached_run(model, batch, labels, vision)
        with pytest.raises(AttachError, match="already attached"):
            attach(model)
    model.zero_grad(set_to_none=True)
    h.remove()  # idempotent

    assert get_handle(model) is None
    assert _hook_state(model) == hooks
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == dict_keys
    assert "forward" not in model.__dict__ and type(model).forward is fwd_func
    assert inspect.signature(model.forward) == sig
    after_sd = model.state_dict()
    assert after_sd.keys() == sd.keys() and all(torch.equal(sd[k], after_sd[k]) for k in sd)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after)
    # the model's own loss path is back: labels give its cross-entropy over full logits
    out = model(**batch, labels=labels)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] and out.loss is not None


def test_hook_only_inside_loss_calls_generate_untouched():
    tiny = qwen2_vl()
    model = tiny.model.eval()
    batch = tiny.batch(1)
    labels, vision = make_targets(batch)
    decoder = model.get_decoder()
    seen = []
    probe = decoder.register_forward_pre_hook(lambda mod, args: seen.append(len(mod._forward_hooks)))
    gen_kw = dict(max_new_tokens=4, do_sample=False)
    ref = model.generate(**batch, **gen_kw)
    seen.clear()
    with attach(model) as h:
        got = model.generate(**batch, **gen_kw)
        assert seen and all(n == 0 for n in seen)  # no capture hook on the decoder during generate
        assert h.last_output is None
        with torch.no_grad():
            plain = model(**batch)  # eval call without labels: untouched
        seen.clear()
        with torch.no_grad():
            out = model(
                **batch, labels=labels, vision_labels=vision
            )  # eval with labels: full logits, DV loss
        assert seen == [1]
        assert out.logits.shape == plain.logits.shape
        ref_loss = reference_loss(plain.logits.double(), labels, vision)
        torch.testing.assert_close(out.loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    probe.remove()
    assert torch.equal(ref, got)
    assert len(decoder._forward_hooks) == 0


def test_tuple_output_and_positional_labels():
    tiny = llama_causal()
    model = tiny.model.train()
    batch = tiny.batch(2)
    labels, _ = make_targets(batch)
    with attach(model):
        out = model(**batch, labels=labels, return_dict=False)
        assert isinstance(out, tuple) and out[0].dim() == 0 and out[1].shape[1] == 1
        pos = model(batch["input_ids"], batch["attention_mask"], None, None, None, labels)
    ref = reference_loss(model(**batch).logits.double(), labels, None)
    torch.testing.assert_close(out[0].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pos.loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vision_shift", [False, True])
def test_weights_and_num_items_are_applied(vision_shift):
    tiny = qwen2_vl()
    batch = tiny.batch(2)
    labels, vision = make_targets(batch)
    model = tiny.model.train()
    loss = DVLoss(vision_weight=0.3, text_weight=2.0, vision_shift=vision_shift)
    with attach(model, loss):
        out = model(
            **batch,
            labels=labels,
            vision_labels=vision,
            num_items_in_batch=torch.tensor(40),
            num_vision_items_in_batch=torch.tensor(30),
        )
    ref = reference_loss(
        model(**batch).logits.double(),
        labels,
        vision,
        text_weight=2.0,
        vision_weight=0.3,
        num_text=40,
        num_vision=30,
        vision_shift=vision_shift,
    )
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl", "llama"])
def test_peft_lora(family):
    peft = pytest.importorskip("peft")
    tiny = ALL_FAMILIES[family]()
    batch = tiny.batch(2)
    labels, vision = make_targets(batch)

    def make():
        cfg = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
        )  # B != 0, so LoRA gradients are informative
        return peft.get_peft_model(copy.deepcopy(tiny.model), cfg).train()

    out, handle = compare_to_reference(make, batch, labels, vision)
    assert out.logits.shape[1] == 1
    assert handle.model is not handle.hf  # hooks on the PeftModel, head and decoder from the base model


def test_peft_lora_on_head_is_refused_and_modules_to_save_works():
    peft = pytest.importorskip("peft")
    tiny = llama_causal()
    lora_head = peft.get_peft_model(
        copy.deepcopy(tiny.model), peft.LoraConfig(r=2, target_modules=["lm_head"])
    )
    with pytest.raises(AttachError, match="adapter"):
        attach(lora_head)
    batch = tiny.batch(2)
    labels, _ = make_targets(batch)

    def make():
        cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
        m = peft.get_peft_model(copy.deepcopy(tiny.model), cfg).train()
        with torch.no_grad():  # make the trainable copy differ from the frozen original
            m.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
        return m

    compare_to_reference(make, batch, labels, None)


@pytest.mark.parametrize("family", ["qwen2_vl", "llama"])
def test_gradient_checkpointing(family):
    tiny = ALL_FAMILIES[family]()
    batch = tiny.batch(2)
    labels, vision = make_targets(batch)

    def prepare(m):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return m.train()

    compare_to_reference(lambda: copy.deepcopy(tiny.model), batch, labels, vision, prepare=prepare)


def test_gradient_checkpointing_reentrant_with_peft():
    peft = pytest.importorskip("peft")
    tiny = qwen2_vl()
    batch = tiny.batch(2)
    labels, vision = make_targets(batch)

    def make():
        m = copy.deepcopy(tiny.model)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        m.enable_input_require_grads()
        cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        return peft.get_peft_model(m, cfg).train()

    compare_to_reference(make, batch, labels, vision)


def test_post_head_transforms_read_from_config():
    from dvsft_kernels.integrations.attach import post_head_transforms

    for family, want in (
        ("gemma2", (1.0, 0.5)),
        ("cohere", (0.25, None)),
        ("granite", (0.25, None)),
        ("llama", (1.0, None)),
        ("gemma3", (1.0, None)),
    ):
        assert post_head_transforms(ALL_FAMILIES[family]().model.config) == want, family
    g = gemma3(final_logit_softcapping=30.0)  # declared in the text config of a VLM
    assert post_head_transforms(g.model.config) == (1.0, 30.0)


def test_config_declares_a_transform_the_forward_does_not_apply():
    tiny = llama_causal()
    model = tiny.model.train()
    model.config.logit_scale = 3.0  # LlamaForCausalLM never reads it
    batch = tiny.batch(2)
    labels, _ = make_targets(batch)
    with attach(model) as h:
        with pytest.raises(RuntimeError, match="does not reproduce the model's own logits"):
            model(**batch, labels=labels)
        assert len(model.get_decoder()._forward_hooks) == 0 and not h._stack
    with attach(model, logit_transforms=(1.0, None)):  # the override: what the forward really does
        out = model(**batch, labels=labels)
    torch.testing.assert_close(
        out.loss.double(), reference_loss(model(**batch).logits.double(), labels, None), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="logit_transforms"):
        attach(model, logit_transforms=(1.0, -2.0))


def test_softcap_conflict_with_loss_option():
    tiny = ALL_FAMILIES["gemma2"]()
    with pytest.raises(ValueError, match="softcap"):
        attach(tiny.model, DVLoss(softcap=7.0))
    user = DVLoss()
    with attach(tiny.model, user) as h:
        assert h.loss.softcap == 0.5 and user.softcap is None


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen():
    tiny = qwen2_vl()
    tiny.model.train()
    return tiny


def _assert_clean(model, h):
    assert len(model.get_decoder()._forward_hooks) == 0 and not h._stack


def test_vision_labels_wrong_shape(qwen):
    batch = qwen.batch(2)
    labels, vision = make_targets(batch)
    with attach(qwen.model) as h:
        for bad in (vision[:, :-1], vision[:1], vision.flatten()):
            with pytest.raises(ValueError, match="vision_labels"):
                qwen.model(**batch, labels=labels, vision_labels=bad)
            _assert_clean(qwen.model, h)


def test_out_of_vocab_ids(qwen):
    batch = qwen.batch(2)
    labels, vision = make_targets(batch)
    with attach(qwen.model) as h:
        for bad in (V, V + 5, -3):
            v = vision.clone()
            v[v != IGN] = bad
            with pytest.raises(ValueError, match="vision_labels.*ids must lie in"):
                qwen.model(**batch, labels=labels, vision_labels=v)
            _assert_clean(qwen.model, h)
        lab = labels.clone()
        lab[0, -1] = V
        with pytest.raises(ValueError, match="labels"):
            qwen.model(**batch, labels=lab)
        _assert_clean(qwen.model, h)
        out = qwen.model(**batch, labels=labels, vision_labels=vision)  # still works after the errors
        assert torch.isfinite(out.loss)


def test_overlapping_streams(qwen):
    batch = qwen.batch(2)
    labels, vision = make_targets(batch)
    vision[0, -2] = 7  # unshifted vision target where the shifted text target of labels[0, -1] lands
    with attach(qwen.model) as h:
        with pytest.raises(ValueError, match="both"):
            qwen.model(**batch, labels=labels, vision_labels=vision)
        _assert_clean(qwen.model, h)


def test_no_vision_targets_and_no_targets_at_all(qwen):
    batch = qwen.batch(2)
    labels, _ = make_targets(batch)
    empty = torch.full_like(labels, IGN)
    model = qwen.model
    with attach(model):
        out, g = attached_run(model, batch, labels, empty)
        assert torch.isfinite(out.loss) and out.dvsft_metrics["vision_loss"] == 0
        assert all(torch.isfinite(t).all() for t in g.values())
        ref, _ = plain_run(model, batch, labels, None)
        torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
        out, g = attached_run(model, batch, empty, empty)  # nothing to learn: zero loss, zero gradients
        assert float(out.loss) == 0.0 and all(float(t.abs().max()) == 0 for t in g.values())


def test_models_that_cannot_be_attached():
    import transformers as tf

    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    )
    with pytest.raises(AttachError, match="encoder-decoder"):
        attach(t5)

    class NoKeep(torch.nn.Module):  # a causal LM whose forward cannot skip logits
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Embedding(10, 4)
            self.lm_head = torch.nn.Linear(4, 10)

        def forward(self, input_ids, labels=None):
            return self.lm_head(self.model(input_ids))

    with pytest.raises(AttachError, match="logits_to_keep"):
        attach(NoKeep())
    vit = tf.ViTModel(
        tf.ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
        )
    )
    with pytest.raises(AttachError):
        attach(vit)
    with pytest.raises(AttachError):
        attach("not a model")


def test_vlm_family_list_is_complete():
    want = {
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "llava",
        "llava_next",
        "llava_onevision",
        "internvl",
        "idefics3",
        "smolvlm",
        "gemma3",
        "mistral3",
    }
    assert set(VLM_FAMILIES) == want
    g = gemma3().model
    assert g.get_output_embeddings().weight is g.get_input_embeddings().weight  # the tied case is covered


def test_tied_head_gradient_reaches_embedding():
    tiny = gemma3()
    model = tiny.model.train()
    batch = tiny.batch(2)
    labels, vision = make_targets(batch)
    with attach(model):
        _, g = attached_run(model, batch, labels, vision)
    name = [n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight][0]
    assert g[name].abs().max() > 0
    assert grads  # keep import used


def test_under_bf16_autocast():
    """Autocast (Trainer bf16 on CPU / GPU): the model's head runs in bf16; the attached loss stays
    within bf16 rounding of the plain autocast loss, and the head check accepts rounded logits."""
    tiny = qwen2_vl()
    model = tiny.model.train()
    batch = tiny.batch(2)
    labels, vision = make_targets(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = reference_loss(model(**batch).logits.double(), labels, vision)
        with attach(model) as h:
            out = model(**batch, labels=labels, vision_labels=vision)
    assert h._verified and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.double(), plain, rtol=2e-2, atol=0)


def _two_process_run(worker: str, family: str, tmp_path, result: str) -> dict:
    """Runs tests/integrations/<worker> on 2 gloo CPU processes (torch.distributed.run) and
    returns what rank 0 saved in tmp_path/<result>."""
    import pathlib

    torchrun(worker, family, str(tmp_path), str(pathlib.Path(__file__).resolve().parents[2]))
    return torch.load(tmp_path / result)


def _unwrapped_run(family: str):
    """The same step on the plain model in this process: (outputs, float64 gradients (zeros where
    none flowed), names of the parameters a gradient reached)."""
    tiny = ALL_FAMILIES[family]()
    model = tiny.model.train()
    batch = tiny.batch(2)
    labels, vision = make_targets(batch)
    with attach(model):
        out, g = attached_run(model, batch, labels, vision)
    return out, g, {n for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2_vl"])
def test_fsdp2_sharded_head(family, tmp_path):
    """FSDP2 (2 CPU processes, gloo, same batch on both): the loss and every gradient equal the
    unsharded model's; llama's head is its own FSDP unit, resharded after its forward, so attach()
    must gather the DTensor weight (.full_tensor()); gemma3's tied head lives in the root unit."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    got = _two_process_run("fsdp_worker.py", family, tmp_path, "fsdp.pt")
    out, g, with_grad = _unwrapped_run(family)
    torch.testing.assert_close(got["loss"], out.loss.detach(), rtol=1e-6, atol=1e-6)
    assert got["grads"].keys() == with_grad
    for n, grad in got["grads"].items():
        torch.testing.assert_close(grad.double(), g[n], rtol=1e-5, atol=1e-7 * (1 + g[n].abs().max().item()))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_deepspeed_zero3_partitioned_head(family, tmp_path):
    """DeepSpeed ZeRO-3 on 2 CPU processes (gloo): the head weight is an empty partition outside its
    forward; attach() gathers it, and the loss and every gathered gradient equal the unwrapped model's
    (llama: own head; gemma3: tied to the embedding). Skipped where DeepSpeed is not installed."""
    pytest.importorskip("deepspeed")
    got = _two_process_run("deepspeed_worker.py", family, tmp_path, "ds.pt")
    out, g, _ = _unwrapped_run(family)
    torch.testing.assert_close(got["loss"], out.loss.detach(), rtol=1e-6, atol=1e-6)
    assert got["grads"].keys() <= g.keys()
    for n in g.keys() - got["grads"].keys():  # no gradient under ZeRO-3: none in the plain run either
        assert not g[n].any(), n
    for n, grad in got["grads"].items():
        torch.testing.assert_close(
            grad.double(), g[n], rtol=1e-5, atol=1e-6 * (1 + g[n].abs().max().item())
        )  # reduce order


def test_wrong_decoder_is_caught():
    """A get_decoder() that does not feed the head: a wrong shape, or the right shape with other values
    (caught by the first-call check against the model's own logits)."""
    tiny = llama_causal()
    model = tiny.model.train()
    batch = tiny.batch(2)
    labels, _ = make_targets(batch)
    for wrong, match in (
        (model.model.rotary_emb, "not the module that feeds its head"),
        (model.model.layers[0], "does not reproduce the model's own logits"),
    ):
        model.get_decoder = lambda w=wrong: w  # instance attribute, removed below
        try:
            with attach(model) as h:
                with pytest.raises(RuntimeError, match=match):
                    model(**batch, labels=labels)
                assert not h._stack and len(wrong._forward_hooks) == 0
        finally:
            del model.get_decoder
