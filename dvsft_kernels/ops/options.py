"""`LCEOptions`: every option of `linear_cross_entropy`, checked once, and the environment probes
the backends share.

The options object is what travels: through the autograd Function, into the custom op (whose
schema is derived from these fields, ops/custom_op.py) and into every backend. Tensors
(`token_weights`, `num_items`, `bias`) and the process group are arguments, not options.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "chunked", "fused")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class LCEOptions:
    """Options of one `linear_cross_entropy` call (docs/linear_cross_entropy.md). Construction
    checks every field and raises a ValueError naming it; floats are stored as float."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    impl: str = "auto"
    # rows per logits chunk ("torch", "chunked", vocabulary-parallel); None sizes it from a budget
    chunk_rows: int | None = None
    # "fused": bitwise repeatable gradients; None follows torch.are_deterministic_algorithms_enabled()
    deterministic: bool | None = None
    # "fused": skip gradient tiles below the output dtype's resolution
    grad_filter: bool = False
    # the per-position argmax (`predicted`, `correct`) is wanted; without it "torch" skips the index
    return_stats: bool = False

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {self.reduction!r}")
        for name in ("label_smoothing", "z_loss"):
            v = getattr(self, name)
            if not _is_number(v) or not (v >= 0) or v == float("inf"):
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        if self.label_smoothing > 1:
            raise ValueError(f"label_smoothing: expected a value in [0, 1], got {self.label_smoothing!r}")
        cap = self.softcap
        if cap is not None and (not _is_number(cap) or not (cap > 0) or cap == float("inf")):
            raise ValueError(f"softcap: expected None or a finite number > 0, got {cap!r}")
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise ValueError(f"ignore_index: expected an int, got {self.ignore_index!r}")
        if self.deterministic is not None and not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic: expected None or a bool, got {self.deterministic!r}")
        if not isinstance(self.grad_filter, bool):
            raise ValueError(f"grad_filter: expected a bool, got {self.grad_filter!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {self.impl!r}")
        if self.grad_filter and self.impl in ("torch", "chunked"):
            raise ValueError(f"grad_filter: only impl='fused' filters gradient tiles, got impl={self.impl!r}")
        rows = self.chunk_rows
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise ValueError(f"chunk_rows: expected None or an int >= 1, got {rows!r}")
        if not isinstance(self.return_stats, bool):
            raise ValueError(f"return_stats: expected a bool, got {self.return_stats!r}")
        for name in ("label_smoothing", "z_loss", "softcap"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, float(v))

    def replace(self, **changes) -> LCEOptions:
        return dataclasses.replace(self, **changes)

    def loss_terms(self) -> dict:
        """The options that define the loss value, as the Triton launchers take them (keywords)."""
        return {"label_smoothing": self.label_smoothing, "z_loss": self.z_loss, "softcap": self.softcap}

    def wants_deterministic(self) -> bool:
        det = self.deterministic
        return torch.are_deterministic_algorithms_enabled() if det is None else det


# ------------------------------------------------------------------ shared probes and helpers
def interpreting() -> bool:
    """TRITON_INTERPRET read now, as triton parses it (1/true/on/yes); plain Python, so dynamo
    traces it."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def no_host_sync_allowed() -> bool:
    """A CUDA graph is being captured, or torch.compile is tracing: nothing may wait on the device."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def capturing() -> bool:
    """A CUDA graph is being captured on the current stream (checked at run time)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def safe_reciprocal(denom: torch.Tensor) -> torch.Tensor:
    """1 / denom, and 0 where denom <= 0: an empty batch gives loss 0 and zero gradients, never NaN."""
    return torch.where(denom > 0, 1.0 / denom.clamp_min(1e-30), torch.zeros_like(denom))


def mean_denominator(count: torch.Tensor | int, num_items, device: torch.device) -> torch.Tensor:
    """The float32 0-dim denominator of reduction="mean": `num_items` when given (int or 0-dim
    tensor), else the count of labeled rows. Built on the device without a host copy."""
    if num_items is None:
        if isinstance(count, torch.Tensor):
            return count.reshape(()).to(device=device, dtype=torch.float32)
        return torch.full((), float(count), device=device, dtype=torch.float32)
    if isinstance(num_items, torch.Tensor):
        return num_items.to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), float(num_items), device=device, dtype=torch.float32)


def check_num_items(num_items) -> None:
    if num_items is None:
        return
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0:
            raise ValueError("num_items: expected an int or a 0-dim tensor")
    elif not isinstance(num_items, int) or isinstance(num_items, bool):
        raise ValueError(f"num_items: expected an int or a 0-dim tensor, got {type(num_items).__name__}")
    elif num_items < 0:
        raise ValueError(f"num_items: expected >= 0, got {num_items}")

