"""The error rule of ../shared/STYLE.md: an implementation's error against the float64 reference
must be at most twice the error of plain PyTorch in the input dtype, plus a small dtype floor."""

from __future__ import annotations

import torch

# absolute floor, in units of the reference's magnitude, per dtype the implementation returns in
_FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_error_rule(name: str, got: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor,
                      dtype: torch.dtype) -> None:
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    e_got = max_err(got, ref64)
    e_base = max_err(baseline, ref64)
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    bound = 2 * e_base + _FLOOR[dtype] * scale
    assert e_got <= bound, f"{name}: error {e_got:.3g} > bound {bound:.3g} (torch-in-dtype error {e_base:.3g})"
