"""DV-SFT with the Hugging Face `Trainer` (and TRL's `SFTTrainer`): `DVSFTTrainer`, `patch_trainer`.

What the plain Trainer gets wrong for two streams, and what the mixin does about it:

* Normalisation. Trainer counts `num_items_in_batch` from `labels` only, over the accumulation
  window and (with `average_tokens_across_devices`) over ranks, then multiplies the loss by the
  number of processes because DDP averages gradients. The mixin counts the shifted text *and* vision
  targets of the whole window with the same gather, puts both counts into every micro-batch
  (`num_items_in_batch`, `num_vision_items_in_batch`, which `attach()` consumes) and returns the text
  count to Trainer so its own scaling stays in force. Hence 2 micro-batches of 1 give the gradients
  of 1 batch of 2, and N ranks the gradients of one process with the whole batch.
* Columns. Trainer drops batch keys that are not parameters of `model.forward` (`remove_unused_columns`,
  through `RemoveColumnsCollator` for non-`datasets` data); `vision_labels` is not one. The mixin
  adds `vision_labels`, `num_vision_items_in_batch` and the raw columns a DV-SFT collator declares
  (`dvsft_input_columns`) to the kept columns.
* Logs. The per-stream losses, target counts and accuracies of every micro-batch are summed on
  device and logged with Trainer's `loss` (`text_loss`, `vision_loss`, `text_accuracy`,
  `vision_accuracy`, `text_tokens`, `vision_tokens`; `eval_*` after evaluation), gathered over ranks.
* TRL's `SFTTrainer` computes its own loss with its fused head; a patched SFTTrainer uses DV-SFT's
  loss instead (Trainer's `compute_loss`, which reads `outputs.loss`), and keeps the rest of TRL.
"""

from __future__ import annotations

import warnings

import torch
import transformers

from dvsft_kernels.integrations.attach import attach, get_handle
from dvsft_kernels.loss import METRIC_NAMES, DVLoss

_EXTRA_COLUMNS = ("vision_labels", "vision_label_weights", "num_vision_items_in_batch")
# window sums: text_loss, vision_loss, text_tokens, vision_tokens, text_correct, vision_correct
_N_ACC = 6


def _is_trl_sft(cls) -> bool:
    return any(c.__name__ == "SFTTrainer" and c.__module__.startswith("trl") for c in cls.__mro__)


class DVSFTTrainerMixin:
    """Goes before a `transformers.Trainer` subclass in the MRO (see `patch_trainer`)."""

    def _dvsft_setup(self, loss: DVLoss | None) -> None:
        if loss is not None and not isinstance(loss, DVLoss):
            raise ValueError(f"loss: expected a DVLoss or None, got {type(loss).__name__}")
        if self.args.n_gpu > 1:
            raise ValueError(
                "DV-SFT trainer: torch.nn.DataParallel (several GPUs in one process) is not supported; "
                "launch one process per GPU (torchrun / accelerate launch)"
            )
        if getattr(self, "label_smoother", None) is not None:
            raise ValueError(
                "DV-SFT trainer: args.label_smoothing_factor computes a loss from full logits; set it to "
                "0 and use DVLoss(label_smoothing=...)"
            )
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError("DV-SFT trainer: compute_loss_func needs full logits; the loss is DVLoss's")
        handle = get_handle(self.model)
        if handle is None:
            handle = attach(self.model, loss)
            self._dvsft_owns_handle = True
        else:
            if loss is not None and handle.user_loss is not loss:
                raise ValueError("DV-SFT trainer: the model is already attached with another loss")
            self._dvsft_owns_handle = False
        self._dvsft_handle = handle
        self._dvsft_saved = {
            k: self.__dict__.get(k, _MISSING) for k in ("model_accepts_loss_kwargs", "loss_is_scaled_for_ga")
        }
        # attach() consumes the loss kwargs, and the loss is normalised over the window by the counts below
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._dvsft_acc = {"train": None, "eval": None}
        self._dvsft_windows = 0
        self._dvsft_eval_batches = 0
        self._dvsft_keep_columns()

    # ---- columns -------------------------------------------------------------------------------------

    def _dvsft_columns(self) -> list[str]:
        return [*_EXTRA_COLUMNS, *(getattr(self.data_collator, "dvsft_input_columns", ()) or ())]

    def _dvsft_keep_columns(self) -> None:
        if not self.args.remove_unused_columns:
            return
        if not hasattr(self, "_set_signature_columns_if_needed") or not hasattr(self, "_signature_columns"):
            warnings.warn(
                "DV-SFT trainer: this Trainer version has no signature-columns hook; setting "
                "args.remove_unused_columns=False so vision_labels reach the model",
                stacklevel=3,
            )
            self.args.remove_unused_columns = False
            return
        if self._signature_columns is not None:  # already computed: extend in place
            for c in self._dvsft_columns():
                if c not in self._signature_columns:
                    self._signature_columns.append(c)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for c in self._dvsft_columns():
            if c not in self._signature_columns:
                self._signature_columns.append(c)

    # ---- target counts -------------------------------------------------------------------------------

    def _dvsft_counts(self, batches, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Text and vision targets of `batches`, as DVLoss will count them (shifted), summed over ranks
        when Trainer averages tokens across devices; divided by the ranks that share a batch (TP/CP/SP)."""
        loss = self._dvsft_handle.loss
        ign = loss.ignore_index

        def count(key, shift):
            n = torch.zeros((), dtype=torch.long, device=device)
            for b in batches:
                lab = b.get(key) if hasattr(b, "get") else None
                if isinstance(lab, torch.Tensor):
                    lab = lab[:, 1:] if shift else lab
                    has = lab != ign
                    # soft vision labels (B, T, K): a position counts once if any slot is used
                    n = n + (has.any(-1) if has.dim() == 3 else has).sum().to(device)
            return n

        counts = torch.stack([count("labels", loss.shift), count("vision_labels", loss.vision_shift)])
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts).view(-1, 2).sum(0)
        counts = counts.float()
        div = 1
        for name in ("get_tp_size", "get_cp_size", "get_sp_size"):
            fn = getattr(self, name, None)
            div *= int(fn()) if callable(fn) else 1
        if div > 1:
            counts = counts / div
        return counts[0], counts[1]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        n_text, n_vis = self._dvsft_counts(batch_samples, device)
        for b in batch_samples:
            b["num_items_in_batch"] = n_text
            b["num_vision_items_in_batch"] = n_vis
        self._dvsft_windows += 1
        return batch_samples, n_text

    # ---- loss ----------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        has_targets = inputs.get("labels") is not None or inputs.get("vision_labels") is not None
        if has_targets and "num_vision_items_in_batch" not in inputs:
            # a batch that did not come through get_batch_samples (evaluation): normalise over it alone
            device = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).device
            n_text, n_vis = self._dvsft_counts([inputs], device)
            inputs = {**inputs, "num_items_in_batch": n_text, "num_vision_items_in_batch": n_vis}
        if "num_items_in_batch" in inputs:
            num_items_in_batch = inputs["num_items_in_batch"]
        handle = self._dvsft_handle
        handle.last_output = None
        if _is_trl_sft(type(self)):
            # TRL's SFTTrainer computes its own loss through its fused head; DV-SFT's comes from outputs.loss
            result = transformers.Trainer.compute_loss(
                self, model, inputs, return_outputs, num_items_in_batch
            )
        else:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        out = handle.last_output
        if out is not None:
            mode = "train" if model.training else "eval"
            row = torch.stack(
                [
                    out.text_loss.float(),
                    out.vision_loss.float(),
                    out.text_tokens.float(),
                    out.vision_tokens.float(),
                    out.text_accuracy.float() * out.text_tokens.float(),
                    out.vision_accuracy.float() * out.vision_tokens.float(),
                ]
            )
            acc = self._dvsft_acc[mode]
            self._dvsft_acc[mode] = row if acc is None else acc + row.to(acc.device)
            if mode == "eval":
                self._dvsft_eval_batches += 1
        return result

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        handle = self._dvsft_handle
        if prediction_loss_only and handle.skip_logits == "auto":
            handle.skip_logits = True  # no one reads the logits: do not build them
            try:
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
            finally:
                handle.skip_logits = "auto"
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # ---- logs ----------------------------------------------------------------------------------------

    def _dvsft_figures(self, acc: torch.Tensor, steps: int, prefix: str) -> dict[str, float]:
        """Gather the window sums of every rank; losses per optimizer step (eval: per batch)."""
        world = self.args.world_size
        rows = (
            self.accelerator.gather(acc.unsqueeze(0)).view(-1, _N_ACC) if world > 1 else acc.view(1, _N_ACC)
        )
        total = rows.sum(0)
        # the per-rank losses are normalised by global counts when Trainer averages tokens across devices
        # (they add up over ranks), else by local counts (DDP averages them)
        global_norm = self.args.average_tokens_across_devices and world > 1
        losses = total[:2] if global_norm else rows[:, :2].mean(0)
        vals = torch.cat(
            [losses / max(steps, 1), total[2:4] / max(steps, 1), total[4:6] / total[2:4].clamp_min(1)]
        ).tolist()
        return {prefix + k: round(v, 6) for k, v in zip(METRIC_NAMES, vals)}

    def log(self, logs, *args, **kwargs):
        acc = self._dvsft_acc.get("train") if hasattr(self, "_dvsft_acc") else None
        if acc is not None and "loss" in logs and self._dvsft_windows > 0:
            logs.update(self._dvsft_figures(acc, self._dvsft_windows, ""))
            self._dvsft_acc["train"] = None
            self._dvsft_windows = 0
        return super().log(logs, *args, **kwargs)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._dvsft_acc["eval"], self._dvsft_eval_batches = None, 0
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        acc = self._dvsft_acc["eval"]
        if acc is not None and output.metrics is not None:
            output.metrics.update(self._dvsft_figures(acc, self._dvsft_eval_batches, f"{metric_key_prefix}_"))
        self._dvsft_acc["eval"] = None
        return output


_MISSING = object()
_PATCHED_CLASSES: dict[type, type] = {}


class DVSFTTrainer(DVSFTTrainerMixin, transformers.Trainer):
    """`transformers.Trainer` training with the DV-SFT loss: `DVSFTTrainer(model, args, ..., loss=DVLoss())`.

    The model is attached (`attach(model, loss)`) unless it already is. Batches carry `labels` and/or
    `vision_labels` (e.g. from `DVSFTCollator`).
    """

    def __init__(self, *args, loss: DVLoss | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._dvsft_setup(loss)


def patch_trainer(trainer: transformers.Trainer, loss: DVLoss | None = None) -> transformers.Trainer:
    """Make an existing `Trainer` (or subclass instance, e.g. TRL's `SFTTrainer`) train with DV-SFT.

    Its class is swapped for a subclass with the DV-SFT mixin first in the MRO (nothing else about the
    instance changes); `unpatch_trainer` undoes it. Returns the same object.
    """
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(f"trainer: expected a transformers.Trainer, got {type(trainer).__name__}")
    if isinstance(trainer, DVSFTTrainerMixin):
        raise ValueError("trainer: already a DV-SFT trainer")
    base = type(trainer)
    cls = _PATCHED_CLASSES.get(base)
    if cls is None:
        cls = type(
            f"DVSFT{base.__name__}",
            (DVSFTTrainerMixin, base),
            {"__module__": __name__, "_dvsft_base_class": base},
        )
        _PATCHED_CLASSES[base] = cls
    trainer.__class__ = cls
    try:
        trainer._dvsft_setup(loss)
    except Exception:
        trainer.__class__ = base
        raise
    return trainer


def unpatch_trainer(trainer) -> transformers.Trainer:
    """Undo `patch_trainer`: detach the model (if the patch attached it) and restore the class."""
    base = getattr(type(trainer), "_dvsft_base_class", None)
    if base is None:
        raise ValueError("trainer: not patched by patch_trainer")
    if trainer._dvsft_owns_handle:
        trainer._dvsft_handle.remove()
    for k, v in trainer._dvsft_saved.items():
        if v is _MISSING:
            trainer.__dict__.pop(k, None)
        else:
            setattr(trainer, k, v)
    if trainer._signature_columns is not None:
        for c in trainer._dvsft_columns():
            if c in trainer._signature_columns:
                trainer._signature_columns.remove(c)
    for k in [k for k in trainer.__dict__ if k.startswith("_dvsft_")]:
        del trainer.__dict__[k]
    trainer.__class__ = base
    return trainer
