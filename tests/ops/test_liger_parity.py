"""Parity with Liger-Kernel's fused linear cross-entropy, an outside reference, on the options it
supports (softcap excluded: its kernel uses libdevice tanh, which the Triton interpreter lacks):
Liger within the error rule of the float64 spec, and ours as close to the spec as Liger is."""

from __future__ import annotations

import os

import pytest
import torch

from dvsft_kernels import linear_cross_entropy

from .cases import baseline, make_case, reference, run, to_device
from .errors import assert_error_rule

liger = pytest.importorskip("liger_kernel.transformers.functional", reason="liger-kernel not installed")

pytestmark = pytest.mark.interpreter
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Liger's kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def liger_fn(h, w, t, b=None, *, token_weights=None, reduction="mean", ignore_index=-100, z_loss=0.0,
             label_smoothing=0.0):
    assert token_weights is None
    return liger.liger_fused_linear_cross_entropy(
        h, w, t, b, ignore_index=ignore_index, lse_square_scale=z_loss, label_smoothing=label_smoothing,
        reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", [{}, {"bias": True, "z_loss": 1e-3, "label_smoothing": 0.1}])
def test_matches_liger(dtype, reduction, options):
    case = make_case(lead=(37,), D=72, V=517, options=options, reduction=reduction, seed=3)
    to_device(case, "cuda" if torch.cuda.is_available() else "cpu")
    ours = run(lambda *a, **k: linear_cross_entropy(*a, **k, impl="torch"), case, dtype)
    theirs = run(liger_fn, case, dtype)
    ref = reference(case, dtype)
    base = baseline(case, dtype)
    for key in ("loss", "hidden", "weight", "bias"):
        if ref[key] is None:
            assert ours[key] is None and theirs[key] is None, key
            continue
        out_dtype = torch.float32 if key == "loss" else dtype
        assert theirs[key].dtype in (out_dtype, dtype), f"liger {key}: dtype {theirs[key].dtype}"
        # Liger itself within the rule of the float64 spec (baseline: plain PyTorch in dtype), so
        # that it is a reference worth matching; its loss in its own dtype
        assert_error_rule(f"liger {key}", theirs[key].cpu(), ref[key].cpu(), base[key].cpu(), theirs[key].dtype)
        # ours as close to the spec as Liger is (the rule with Liger as the baseline)
        assert_error_rule(key, ours[key].cpu(), ref[key].cpu(), theirs[key].float().cpu(), out_dtype)
