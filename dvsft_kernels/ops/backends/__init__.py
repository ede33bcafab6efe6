"""The op's backends (one module each, registered on import) and the rule that picks one."""

from __future__ import annotations

import torch

from dvsft_kernels.ops.backends import auto, chunked, fused, pytorch  # noqa: F401  (registration)
from dvsft_kernels.ops.backends.base import Backend, Forward, Grads, Inputs, Meta
from dvsft_kernels.ops.backends.registry import BACKENDS, get_backend
from dvsft_kernels.ops.backends.vocab_parallel import VocabParallelBackend
from dvsft_kernels.ops.options import IMPLS, LCEOptions, capturing, interpreting, triton_available

__all__ = ["BACKENDS", "Backend", "Forward", "Grads", "Inputs", "Meta", "get_backend", "select_backend"]


def select_backend(impl: str, device: torch.device, options: LCEOptions, process_group=None) -> Backend:
    """The backend that runs `impl` on `device`, or a ValueError naming what cannot be honoured.

    "auto": CPU or no Triton: "torch". CUDA with Triton: eager, "fused" while a CUDA graph is
    captured (it never synchronises) and "chunked" otherwise (1.9-2.6x faster than "fused" at every
    row count measured on an H100, ops/kernels/README.md "impl=auto"); under torch.compile the
    choice is made inside the custom op when it runs (backends/auto.py). With `process_group`: the
    vocabulary-parallel backend, PyTorch products only, so "chunked" / "fused" and `grad_filter`
    are refused rather than dropped.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if process_group is not None:
        if impl in ("chunked", "fused"):
            raise ValueError(f"impl: {impl!r} cannot run a vocabulary-parallel head (process_group); its "
                             "backend uses PyTorch products: pass impl='auto' or 'torch'")
        if options.grad_filter:
            raise ValueError("grad_filter: the vocabulary-parallel backend (process_group) does not filter "
                             "gradient tiles; pass grad_filter=False")
        if torch.compiler.is_compiling():
            raise ValueError("process_group: the vocabulary-parallel op is not traceable by torch.compile")
        return VocabParallelBackend(process_group)
    if impl == "auto":
        if device.type == "cuda" and triton_available():
            if torch.compiler.is_compiling():
                return BACKENDS["auto"]
            return BACKENDS["fused" if capturing() else "chunked"]
        return BACKENDS["torch"]
    if impl in ("chunked", "fused"):
        if not triton_available():
            raise ValueError(f"impl: {impl!r} needs the triton package (pip install triton)")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"impl: {impl!r} runs Triton kernels and needs CUDA tensors "
                "(or TRITON_INTERPRET=1 for testing); use impl='torch' on CPU"
            )
    return BACKENDS[impl]
