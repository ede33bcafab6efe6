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
    assert_error_rule,
    attached_run,
    compare_to_reference,
    make_targets,
    plain_run,
    reference_loss,
    to_double,
    torchrun,
)
from tests.integrations.tiny_models import ALL_FAMILIES, VLM_FAMILIES, V, gemma3, llama_causal, qwen2_vl
from tests.memory import AllocationRecorder

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/integrations/conftest.py


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
    gen_kw = {"max_new_tokens": 4, "do_sample": False}
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


def test_tied_head_gradient_is_embedding_plus_head():
    """Gemma 3's tied weight: its gradient is the embedding's contribution plus the head's dW; both
    are compared to the plain full-logits float64 reference, and the head's share alone is far above
    the tolerance, so an attach() that dropped it fails."""
    tiny = gemma3()
    batch = tiny.batch(2)
    labels, vision = make_targets(batch)
    base = tiny.model.train()
    name = next(n for n, p in base.named_parameters() if p is base.get_input_embeddings().weight)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    m32, m64 = copy.deepcopy(base), copy.deepcopy(base).double()
    _, g_plain = plain_run(m32, batch, labels, vision)
    _, g_ref = plain_run(m64, to_double(batch), labels, vision)
    with attach(m32):
        _, g_att = attached_run(m32, batch, labels, vision)
    assert_error_rule(name, g_att[name], g_plain[name], g_ref[name])
    for n in g_ref:  # and every other parameter
        assert_error_rule(n, g_att[n], g_plain[n], g_ref[n])

    # the head's share: untie a float64 copy, so the head's dW lands on its own parameter
    untied = copy.deepcopy(base).double()
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    _, g_split = plain_run(untied, to_double(batch), labels, vision)
    head_dw = g_split["lm_head.weight"]
    torch.testing.assert_close(g_split[name] + head_dw, g_ref[name], rtol=1e-9, atol=1e-12)
    with pytest.raises(AssertionError):  # the embedding's share alone is not the gradient
        assert_error_rule(name, g_ref[name] - head_dw, g_plain[name], g_ref[name])


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


# ---- attach()'s options, a head with a bias, inputs_embeds, refusals -------------------------------------


def _logits_len(out):
    return out.logits.shape[1]


@pytest.mark.parametrize("skip_logits", ["auto", True, False])
def test_skip_logits_option(skip_logits):
    """skip_logits: "auto" skips the full logits in training mode only, True always, False never; the
    loss is the full-logits reference in every case."""
    tiny = llama_causal()
    model = tiny.model
    batch = tiny.batch(2)
    labels, _ = make_targets(batch)
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        ref = reference_loss(model(**batch).logits.double(), labels, None)
    with attach(model, skip_logits=skip_logits) as h:
        assert h.skip_logits == skip_logits
        for training in (True, False):
            model.train(training)
            with torch.no_grad():
                out = model(**batch, labels=labels)
            skipped = skip_logits is True or (skip_logits == "auto" and training)
            assert _logits_len(out) == (1 if skipped else T), (skip_logits, training)
            torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    model.train()


def test_bad_skip_logits_and_logit_transforms():
    model = llama_causal().model
    for bad in ("yes", 1.5, None):
        with pytest.raises(ValueError, match="^skip_logits: expected 'auto', True or False"):
            attach(model, skip_logits=bad)
    for bad in ((1.0,), "ab", (None, None), 3.0):
        with pytest.raises(ValueError, match=r"^logit_transforms: expected \(scale, softcap or None\)"):
            attach(model, logit_transforms=bad)
    for cap in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="^logit_transforms: softcap must be a finite number > 0"):
            attach(model, logit_transforms=(1.0, cap))
    for scale in (0.0, -1.0, float("inf")):
        with pytest.raises(AttachError, match="logit scale from the config is"):
            attach(model, logit_transforms=(scale, None))
    assert get_handle(model) is None  # no failed attach() left a handle behind


def test_bad_logit_scale_in_config_is_refused():
    tiny = ALL_FAMILIES["cohere"]()
    tiny.model.config.logit_scale = -0.5
    with pytest.raises(AttachError, match=r"logit scale from the config is -0\.5"):
        attach(tiny.model)


def test_verify_false_skips_the_head_check():
    """verify=False: a config transform the forward does not apply is no longer caught (the loss uses
    the config's scale); verify=True (default) refuses it on the first call."""
    tiny = llama_causal()
    model = tiny.model.train()
    model.config.logit_scale = 3.0  # LlamaForCausalLM never reads it
    batch = tiny.batch(2)
    labels, _ = make_targets(batch)
    with torch.no_grad():
        logits = model(**batch).logits.double()
    with attach(model, verify=False) as h:
        out = model(**batch, labels=labels)
        assert not h._verified
    torch.testing.assert_close(out.loss.double(), reference_loss(3.0 * logits, labels, None), rtol=1e-5,
                               atol=1e-6)
    with attach(model), pytest.raises(RuntimeError, match="does not reproduce"):
        model(**batch, labels=labels)


def _llama_with_bias_head(seed=0):
    tiny = llama_causal(seed)
    m = tiny.model
    old = m.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.copy_(torch.randn(old.out_features, generator=g))
    m.lm_head = head
    return tiny


def test_head_with_a_bias():
    """A head with a bias: the loss and every gradient (the bias's included) match the plain
    full-logits loss of the model's own forward."""
    tiny = _llama_with_bias_head()
    batch = tiny.batch(2)
    labels, _ = make_targets(batch)
    _, handle = compare_to_reference(lambda: copy.deepcopy(tiny.model).train(), batch, labels, None)
    assert handle._verified
    # the bias reaches the loss: without it the result differs
    m = copy.deepcopy(tiny.model).train()
    with torch.no_grad():
        with attach(m):
            with_bias = m(**batch, labels=labels).loss
        m.lm_head.bias.zero_()
        with attach(m, verify=False):
            without = m(**batch, labels=labels).loss
    assert abs(with_bias.item() - without.item()) > 1e-3


def test_head_bias_with_a_logit_scale_is_refused():
    tiny = _llama_with_bias_head()
    with pytest.raises(AttachError, match="logit scale together with a head bias"):
        attach(tiny.model, logit_transforms=(2.0, None))


def test_inputs_embeds_only_call():
    """model(inputs_embeds=..., labels=...) without input_ids: the same loss and gradients as the
    plain loss over the full logits of the same call; labels are checked against inputs_embeds."""
    tiny = llama_causal()
    model = tiny.model.train()
    batch = tiny.batch(2)
    labels, _ = make_targets(batch)
    emb = model.get_input_embeddings()(batch["input_ids"]).detach()
    kw = {"inputs_embeds": emb, "attention_mask": batch["attention_mask"]}

    def run(attached):
        model.zero_grad(set_to_none=True)
        e = emb.clone().requires_grad_()
        if attached:
            out = model(**{**kw, "inputs_embeds": e}, labels=labels)
            loss = out.loss
            assert _logits_len(out) == 1
        else:
            loss = reference_loss(model(**{**kw, "inputs_embeds": e}).logits.double(), labels, None)
        loss.backward()
        return loss.detach().double(), e.grad.double(), model.model.layers[0].mlp.up_proj.weight.grad.double()

    ref = run(False)
    with attach(model):
        got = run(True)
        with pytest.raises(ValueError, match=r"^labels: shape \(2, \d+\) does not match input_ids"):
            model(**kw, labels=labels[:, :-1])
    for name, a, b in zip(("loss", "d_inputs_embeds", "d_up_proj"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert ref[1].abs().max() > 0


def test_labels_must_be_two_dimensional(qwen):
    batch = qwen.batch(2)
    labels, _ = make_targets(batch)
    with attach(qwen.model) as h:
        for bad in (labels.flatten(), labels[None], [[1, 2]]):
            with pytest.raises(ValueError, match=r"^labels: expected a \(B, T\) integer tensor"):
                qwen.model(**batch, labels=bad)
            _assert_clean(qwen.model, h)


def test_refusal_messages():
    """Each documented refusal of attach(): an AttachError (a TypeError) naming the problem."""
    assert issubclass(AttachError, TypeError)
    with pytest.raises(AttachError, match="^model: expected a torch.nn.Module, got str"):
        attach("not a model")
    tiny = llama_causal()
    for bad in ("DVLoss", torch.nn.CrossEntropyLoss()):
        with pytest.raises(ValueError, match="^loss: expected a DVLoss or None, got "):
            attach(tiny.model, bad)
        assert get_handle(tiny.model) is None

    class Decoder(torch.nn.Module):
        def forward(self, x):
            return x

    class NoHead(torch.nn.Module):  # has a decoder and logits_to_keep, but no LM head
        def __init__(self):
            super().__init__()
            self.model = Decoder()

        def get_decoder(self):
            return self.model

        def get_output_embeddings(self):
            return None

        def forward(self, input_ids=None, logits_to_keep=0):
            return input_ids

    with pytest.raises(AttachError, match=r"NoHead: get_output_embeddings\(\) returns no LM head"):
        attach(NoHead())

    class WeightlessHead(torch.nn.Module):
        def forward(self, x):
            return x

    class OddHead(NoHead):
        def __init__(self):
            super().__init__()
            self.head = WeightlessHead()

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(AttachError, match=r"OddHead \(WeightlessHead\) has no weight tensor"):
        attach(OddHead())

    class NoDecoder(NoHead):
        def get_decoder(self):
            return self

    with pytest.raises(AttachError, match=r"NoDecoder: get_decoder\(\) returns no decoder module distinct"):
        attach(NoDecoder())
