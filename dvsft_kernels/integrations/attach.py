"""`attach(model, loss)`: make a Hugging Face model compute the DV-SFT loss without full logits.

One generic mechanism, hooks only (the model's code, class and `forward` are never replaced):

* a forward pre-hook (with kwargs) on the module the caller invokes takes `labels`, `vision_labels`,
  `num_items_in_batch` and `num_vision_items_in_batch` out of the call and, when training with
  targets, passes `logits_to_keep=1`, so the model's head projects one position per row;
* for that call only, a forward hook on the decoder (`get_decoder()`) keeps its last hidden state;
* a forward hook (always called, so it also cleans up after an exception) removes the decoder hook,
  runs DVLoss on the captured hidden state and the head's weight, and returns the model's own
  output with `loss` set and the per-stream figures in `outputs.dvsft_metrics`.

A call without `labels` / `vision_labels` (evaluation without labels, every `generate` step) is
left exactly as it was: nothing is registered on the decoder and no argument changes.

Post-head transforms are read from the config and reproduced: `final_logit_softcapping`
(softcap), `logit_scale` (logits * s) and `logits_scaling` (logits / s); a scale is folded into the
hidden state, since s * (h @ W^T) = (s * h) @ W^T. On the first call with targets the head and the
transforms are checked against the model's own logits of the last position (which the model
computes anyway), so a model that does something else after its head fails loudly rather than
training on a different function.

Contract: docs/attach.md
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from dvsft_kernels.loss import METRIC_NAMES, DVLoss, DVLossOutput

_OUR_KEYS = ("labels", "vision_labels", "vision_label_weights", "num_items_in_batch", "num_vision_items_in_batch")

# model -> handle, so a model is never attached twice; weak, so attach() keeps nothing alive
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, AttachHandle] = weakref.WeakKeyDictionary()


class AttachError(TypeError):
    """The model cannot be attached (no `logits_to_keep`, no decoder or head, ...)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside PEFT / DDP / FSDP1 / DeepSpeed / torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif isinstance(model, nn.Module) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
            "FullyShardedDataParallel",
            "DeepSpeedEngine",
        ) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
    return model


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    try:
        return get() if callable(get) else config
    except Exception:  # noqa: BLE001 - some configs raise when several text configs exist
        return config


def post_head_transforms(config) -> tuple[float, float | None]:
    """(scale, softcap) the model applies after its head: logits = softcap(scale * (h @ W^T + b)).

    Read from the text config, then the top-level config: `logit_scale` multiplies (Cohere),
    `logits_scaling` divides (Granite, MiniCPM3), `final_logit_softcapping` caps (Gemma 2, PaliGemma,
    Gemma 3n). With a bias the scale would also scale the bias; no such model exists, so attach refuses
    that combination rather than guessing.
    """
    scale, softcap = 1.0, None
    for cfg in (_text_config(config), config):
        if cfg is None:
            continue
        s = getattr(cfg, "logit_scale", None)
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            scale = float(s)
            break
        s = getattr(cfg, "logits_scaling", None)
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            scale = 1.0 / float(s)
            break
    for cfg in (_text_config(config), config):
        c = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
        if isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0:
            softcap = float(c)
            break
    return scale, softcap


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole head weight (or bias), differentiable, whatever shards it.

    FSDP2 (`fully_shard`): outside its unit's forward the parameter is a DTensor `Shard(0)`.
    `full_tensor()` all-gathers it (V x D per step, as FSDP's own forward would) and its backward
    reduce-scatters dW into the shard's gradient, where FSDP's optimizer step expects it. We gather
    rather than compute on the local shard: FSDP's `Shard(0)` is a vocabulary split, but FSDP ranks hold
    different batches, so a vocabulary-parallel loss (`ops/backends/vocab_parallel.py`) would first have to
    all-gather every rank's labeled rows, hidden states (rows x D) and targets, and all-reduce the
    hidden gradient back; for the usual rows x D > V x D / ranks that costs more than the weight
    gather, which the head's own unit does for its forward anyway. The gathered weight lives only
    for the loss.

    DeepSpeed ZeRO-3: outside the head's forward the parameter is an empty partition (`ds_id`,
    `ds_shape`). `deepspeed.zero.GatheredParameters` gathers it for a copy that lives only for the
    loss; `_ZeroGathered` routes dW (full shape) to the parameter's gradient, which ZeRO-3's own
    gradient hooks reduce-scatter into the partitions. The copy, not the parameter, is what the op may
    save for backward (the parameter's data is released when the context exits).
    """
    if t is None:
        return None
    if hasattr(t, "full_tensor"):
        return t.full_tensor()
    if hasattr(t, "ds_id"):
        import deepspeed  # a ds_id attribute means DeepSpeed partitioned it, so DeepSpeed is installed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return _ZeroGathered.apply(t)
    return t


class _ZeroGathered(torch.autograd.Function):
    """A copy of a gathered ZeRO-3 parameter that outlives the gather; the gradient goes to the parameter
    unchanged (full shape, as in DeepSpeed's own backward)."""

    @staticmethod
    def forward(ctx, p):
        ctx.param = p
        return p.detach().clone()

    @staticmethod
    def backward(ctx, g):
        # autograd accumulates g into the parameter in the parameter's current shape, so ZeRO-3 must hold
        # it whole now, as its own backward pre-hooks would; ZeRO-3's gradient hook then reduce-scatters
        # the gradient, and ours, registered after it, releases the gathered data again
        p = ctx.param
        if _zero_available(
            p
        ):  # a tied head whose embedding's backward holds it already: DeepSpeed releases it
            return g
        p.all_gather()
        handle = None

        def release(_p):
            handle.remove()
            if not getattr(p, "ds_active_sub_modules", None):  # a module gathered it meanwhile: it releases
                p.partition()

        handle = p.register_post_accumulate_grad_hook(release)
        return g


def _zero_available(p) -> bool:
    return getattr(getattr(p, "ds_status", None), "name", "") == "AVAILABLE"


def _resolve_head(hf: nn.Module) -> nn.Module:
    head = hf.get_output_embeddings() if callable(getattr(hf, "get_output_embeddings", None)) else None
    if head is None:
        raise AttachError(
            f"{type(hf).__name__}: get_output_embeddings() returns no LM head; attach() needs one"
        )
    if isinstance(head, nn.Linear) or type(head).__name__ == "ModulesToSaveWrapper":
        # a ModulesToSaveWrapper forwards .weight / .bias to the active trainable copy
        return head
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise AttachError(
            f"the LM head of {type(hf).__name__} is wrapped by an adapter ({type(head).__name__}); attach() "
            "projects with the head's weight and would miss the adapter's delta. Leave lm_head out of "
            "target_modules (use modules_to_save to train it), or merge the adapter first."
        )
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise AttachError(f"the LM head of {type(hf).__name__} ({type(head).__name__}) has no weight tensor")
    return head


def _positional_index(fn, name: str) -> int | None:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if params and params[0].name == "self":  # functools.wraps(type(model).forward) on an instance attribute
        params = params[1:]
    for i, p in enumerate(params):
        if p.name == name:
            return i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else None
        if p.kind in (p.VAR_POSITIONAL, p.KEYWORD_ONLY, p.VAR_KEYWORD):
            return None
    return None


class AttachHandle:
    """Returned by `attach()`. `remove()` (or leaving a `with` block) detaches; `last_output` is the
    DVLossOutput of the latest call (detached), `last_metrics` its figures as floats."""

    def __init__(
        self,
        model: nn.Module,
        loss: DVLoss,
        *,
        skip_logits: bool | str,
        verify: bool,
        logit_transforms: tuple[float, float | None] | None = None,
    ):
        if skip_logits not in ("auto", True, False):
            raise ValueError(f"skip_logits: expected 'auto', True or False, got {skip_logits!r}")
        hf = unwrap_model(model)
        if getattr(getattr(hf, "config", None), "is_encoder_decoder", False):
            raise AttachError(
                f"{type(hf).__name__} is an encoder-decoder model; attach() supports decoder-only "
                "(causal) language models and VLMs"
            )
        fwd_params = inspect.signature(hf.forward).parameters
        if "logits_to_keep" not in fwd_params:
            raise AttachError(
                f"{type(hf).__name__}.forward has no `logits_to_keep` argument, so the model would compute "
                "full [B, T, V] logits on every training call; attach() refuses rather than doing that "
                "silently. Use a model class whose forward accepts logits_to_keep (every *ForCausalLM / "
                "*ForConditionalGeneration of transformers >= 4.50), or call DVLoss yourself on the hidden "
                "states."
            )
        get_decoder = getattr(hf, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        if not isinstance(decoder, nn.Module) or decoder is hf:
            raise AttachError(
                f"{type(hf).__name__}: get_decoder() returns no decoder module distinct from the "
                "model, so there is no hidden state to capture"
            )
        head = _resolve_head(hf)
        if logit_transforms is None:
            self.scale, cfg_softcap = post_head_transforms(getattr(hf, "config", None))
        else:
            try:
                scale, cfg_softcap = logit_transforms
                self.scale = float(scale)
                cfg_softcap = None if cfg_softcap is None else float(cfg_softcap)
            except (TypeError, ValueError):
                raise ValueError(
                    f"logit_transforms: expected (scale, softcap or None), got {logit_transforms!r}"
                ) from None
            if cfg_softcap is not None and not (math.isfinite(cfg_softcap) and cfg_softcap > 0):
                raise ValueError(f"logit_transforms: softcap must be a finite number > 0, got {cfg_softcap}")
        if self.scale != 1.0 and getattr(head, "bias", None) is not None:
            raise AttachError("a logit scale together with a head bias is not supported")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise AttachError(
                f"logit scale from the config is {self.scale}; expected a finite positive number"
            )
        self.user_loss = loss
        user_cap = getattr(loss, "softcap", None)
        if cfg_softcap is not None and user_cap is not None and float(user_cap) != cfg_softcap:
            raise ValueError(
                f"loss: softcap={user_cap} but the model's config declares final_logit_softcapping="
                f"{cfg_softcap}; leave DVLoss.softcap unset to take the config's value"
            )
        if cfg_softcap is not None and user_cap is None:
            loss = copy.copy(loss)  # the caller's module is left as it was
            loss.softcap = cfg_softcap
        self.loss = loss
        self.softcap = cfg_softcap
        self.model, self.hf, self.decoder, self.skip_logits = model, hf, decoder, skip_logits
        self.verify = verify
        self.last_output: DVLossOutput | None = None
        self._verified = False
        self._warned_counts = False
        self._stack: list[dict | None] = []
        self._labels_pos = _positional_index(model.forward, "labels")
        self._handles = [
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            model.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True),
        ]
        self._removed = False
        _ATTACHED[model] = self

    # ---- hooks ---------------------------------------------------------------------------------------

    def _pre_hook(self, module, args, kwargs):
        # pushed first: the post-hook is always called, even when this hook raises, and pops one entry
        self._stack.append(None)
        kwargs = dict(kwargs)
        labels = kwargs.pop("labels", None)
        if labels is None and self._labels_pos is not None and len(args) > self._labels_pos:
            labels = args[self._labels_pos]
            args = args[: self._labels_pos] + (None,) + args[self._labels_pos + 1 :]
        vision_labels = kwargs.pop("vision_labels", None)
        vision_label_weights = kwargs.pop("vision_label_weights", None)
        n_text = kwargs.pop("num_items_in_batch", None)
        n_vis = kwargs.pop("num_vision_items_in_batch", None)
        if labels is None and vision_labels is None:
            # not a loss call: leave it untouched (generate, evaluation without labels)
            if n_text is not None:
                kwargs["num_items_in_batch"] = n_text
            return args, kwargs
        self._check_shapes(labels, vision_labels, args, kwargs)
        skip = self.skip_logits is True or (self.skip_logits == "auto" and module.training)
        if skip and "logits_to_keep" not in kwargs:
            kwargs["logits_to_keep"] = 1
        state: dict[str, Any] = {
            "labels": labels,
            "vision_labels": vision_labels,
            "vision_label_weights": vision_label_weights,
            "n_text": n_text,
            "n_vis": n_vis,
            "hidden": None,
        }

        def capture(_mod, _args, out):
            h = out if isinstance(out, torch.Tensor) else getattr(out, "last_hidden_state", None)
            if h is None and isinstance(out, (tuple, list)) and out:
                h = out[0]
            state["hidden"] = h

        state["hook"] = self.decoder.register_forward_hook(capture)
        self._stack[-1] = state
        if vision_labels is not None and n_text is not None and n_vis is None and not self._warned_counts:
            self._warned_counts = True
            warnings.warn(
                "attach: num_items_in_batch was given without num_vision_items_in_batch, so the vision loss "
                "is normalised per call while the text loss is normalised over the accumulation window; use "
                "dvsft_kernels.integrations.patch_trainer / DVSFTTrainer for gradient accumulation",
                stacklevel=3,
            )
        return args, kwargs

    def _post_hook(self, module, args, kwargs, output):
        state = self._stack.pop() if self._stack else None
        if state is None:
            return None
        state["hook"].remove()
        hidden = state.pop("hidden")
        if output is None:  # the forward raised: cleaned up, let the exception through
            return None
        if hidden is None:
            raise RuntimeError(
                f"attach: the decoder ({type(self.decoder).__name__}) did not run during the call"
            )
        head = _resolve_head(self.hf)
        weight, bias = _full(head.weight), _full(getattr(head, "bias", None))
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[-1] != weight.shape[1]:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise RuntimeError(
                f"attach: the decoder ({type(self.decoder).__name__}) returned {got}, not the (B, T, "
                f"{weight.shape[1]}) hidden state the head projects; get_decoder() of "
                f"{type(self.hf).__name__} is not the module that feeds its head"
            )
        if weight.dtype != hidden.dtype:  # as autocast would: project in the activations' dtype
            weight = weight.to(hidden.dtype)
            bias = bias.to(hidden.dtype) if bias is not None else None
        if self.verify and not self._verified:
            self._check_head(hidden, weight, bias, output, kwargs.get("logits_to_keep", 0))
        h = hidden * self.scale if self.scale != 1.0 else hidden
        with contextlib.ExitStack() as stack:
            if torch.is_autocast_enabled(h.device.type):
                stack.enter_context(torch.autocast(h.device.type, enabled=False))
            res = self.loss(
                h,
                weight,
                state["labels"],
                state["vision_labels"],
                vision_label_weights=state["vision_label_weights"],
                bias=bias,
                num_text_items=state["n_text"],
                num_vision_items=state["n_vis"],
            )
        metrics = {k: getattr(res, k).detach() for k in METRIC_NAMES}
        # per-position predictions too, when the loss was asked for them (what readout() draws)
        self.last_output = DVLossOutput(loss=res.loss.detach(), **metrics, predicted=res.predicted,
                                        probability=res.probability)
        return self._with_loss(output, res.loss, metrics)

    # ---- helpers -------------------------------------------------------------------------------------

    @staticmethod
    def _with_loss(output, loss, metrics):
        if isinstance(output, tuple):
            return (loss,) + output
        try:  # rebuild so `loss` is the first field (to_tuple(), outputs[0]) as in a normal HF output
            items = {k: v for k, v in output.items() if k != "loss"}
            new = type(output)(loss=loss, **items)
        except Exception:  # noqa: BLE001 - an output class that cannot be rebuilt: set the item instead
            new = output
            new["loss"] = loss
        new.dvsft_metrics = metrics  # an attribute, not an item: Trainer's logits gathering never sees it
        return new

    def _check_shapes(self, labels, vision_labels, args, kwargs):
        ref = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if ref is None and isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
            ref = kwargs["inputs_embeds"][..., 0]
        for name, lab in (("labels", labels), ("vision_labels", vision_labels)):
            if lab is None:
                continue
            # soft vision labels are (B, T, K) (with vision_label_weights; DVLoss checks the pair)
            dims = (2, 3) if name == "vision_labels" else (2,)
            if not isinstance(lab, torch.Tensor) or lab.dim() not in dims:
                want = "(B, T) or (B, T, K)" if name == "vision_labels" else "(B, T)"
                raise ValueError(f"{name}: expected a {want} integer tensor aligned with input_ids")
            if ref is not None and tuple(lab.shape[:2]) != tuple(ref.shape[:2]):
                raise ValueError(
                    f"{name}: shape {tuple(lab.shape)} does not match input_ids {tuple(ref.shape[:2])}"
                )

    @torch.no_grad()
    def _check_head(self, hidden, weight, bias, output, logits_to_keep):
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            logits = output[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not isinstance(logits_to_keep, int):
            return
        ref = logits[:, -1].float()
        z = hidden[:, -1].float() @ weight.float().t()
        if bias is not None:
            z = z + bias.float()
        z = z * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        # half-precision activations or logits (bf16 models, autocast): the model's own logits are rounded
        low = hidden.dtype != torch.float32 or logits.dtype != torch.float32
        tol = (3e-2 if low else 1e-3) * (1.0 + float(ref.abs().max()))
        err = float((z - ref).abs().max())
        if not err <= tol:
            raise RuntimeError(
                f"attach: the head of {type(self.hf).__name__} with the config's post-head transforms "
                f"(scale={self.scale}, softcap={self.softcap}) does not reproduce the model's own logits "
                f"(max abs difference {err:.3g}, tolerance {tol:.3g}); the model transforms its logits in a "
                "way attach() does not know, so training with it would optimise a different function"
            )
        self._verified = True

    # ---- public --------------------------------------------------------------------------------------

    @property
    def last_metrics(self) -> dict[str, float] | None:
        """Figures of the latest call as floats (one host sync), or None before the first call."""
        return None if self.last_output is None else self.last_output.metrics()

    def remove(self) -> None:
        if self._removed:
            return
        for h in self._handles:
            h.remove()
        while self._stack:
            st = self._stack.pop()
            if st is not None:
                st["hook"].remove()
        self._removed = True
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]

    def __enter__(self) -> AttachHandle:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "attached"
        return (
            f"AttachHandle({type(self.hf).__name__}, {state}, scale={self.scale}, softcap={self.softcap}, "
            f"skip_logits={self.skip_logits!r})"
        )


def attach(
    model: nn.Module,
    loss: DVLoss | None = None,
    *,
    skip_logits: bool | str = "auto",
    verify: bool = True,
    logit_transforms: tuple[float, float | None] | None = None,
) -> AttachHandle:
    """Make `model(**batch)` return the DV-SFT loss (docs/dvloss.md).

    The batch may carry `labels`, `vision_labels`, `num_items_in_batch` (text-target divisor) and
    `num_vision_items_in_batch` (vision-target divisor). `skip_logits`: "auto" runs the model with
    `logits_to_keep=1` when it is in training mode and the call has targets (in eval mode the model's
    own full logits are returned, for metrics; the loss never uses them); True always, False never.
    `verify` checks the head against the model's own last-position logits on the first call.
    `logit_transforms=(scale, softcap)` overrides what is read from the config (`post_head_transforms`),
    for a model whose forward does not do what its config says.
    Works on PEFT-wrapped models (pass the PeftModel) and tied heads.
    """
    if not isinstance(model, nn.Module):
        raise AttachError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if model in _ATTACHED:
        raise AttachError("model: already attached; remove() the first handle before attaching again")
    if loss is None:
        loss = DVLoss()
    elif not isinstance(loss, DVLoss):
        raise ValueError(f"loss: expected a DVLoss or None, got {type(loss).__name__}")
    return AttachHandle(
        model, loss, skip_logits=skip_logits, verify=verify, logit_transforms=logit_transforms
    )


def get_handle(model: nn.Module) -> AttachHandle | None:
    """The live handle attached to `model` (or to a PEFT / DDP wrapper around the same model), if any."""
    h = _ATTACHED.get(model)
    if h is None:
        inner = unwrap_model(model)
        for m, cand in list(_ATTACHED.items()):
            if unwrap_model(m) is inner:
                return cand
    return h
