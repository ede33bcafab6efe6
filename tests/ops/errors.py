"""The error rule of the op tests: an implementation's error against the float64 reference must be
at most twice the error of plain PyTorch in the input dtype (the baseline) plus a small floor, and
every term is measured relative to the reference's own magnitude.

The rule is applied in two norms, each to the whole tensor:

    max |got - ref|   <= 2 max |base - ref|   + FLOOR[dtype] * max |ref|
    rms (got - ref)   <= 2 rms (base - ref)   + FLOOR[dtype] * rms (ref)

The max norm is set by the largest entries; the RMS norm weighs every entry, so an error confined
to some rows (a skipped tile, a wrong scale on part of the rows, a zeroed row) shows in it even when
those rows are far below the largest one. The floor is FLOOR_ULPS[dtype] machine epsilons of the
output dtype times the reference's magnitude. It covers a baseline that happens to be more accurate than its dtype, not a looser
implementation: in 16-bit outputs both errors are dominated by the final rounding to the dtype,
which the baseline carries too, and 2 ulps cover a different rounding mode (the Triton interpreter
truncates float32 -> bfloat16, a GPU rounds to nearest); in float32 the two sum in different orders
(blocks, split vocabularies, atomics) and a scalar loss can come out of the baseline nearly exact,
so 8 ulps. Measured on the op tests: at most 0.65 ulps needed (float32 loss), 0.33 (bfloat16 dW of
the staged backward under the interpreter's truncation). The floors are 1.6 % (bf16), 0.2 % (fp16)
and 1e-6 (fp32) of the magnitude: a 10 % error on the whole tensor or on a quarter of its rows, a
zeroed typical row, a dropped term all fail (tests/ops/test_error_rule.py plants them). A
reference that is exactly zero leaves no floor: the output must then be as exact as the baseline.
"""

from __future__ import annotations

import torch

# machine epsilons of the output dtype, in units of the reference's magnitude (max or RMS)
FLOOR_ULPS = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 2}
_FLOOR = {dt: n * torch.finfo(dt).eps for dt, n in FLOOR_ULPS.items()}


def assert_error_rule(name: str, got: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor,
                      dtype: torch.dtype, magnitude: torch.Tensor | None = None) -> None:
    """The rule for one output. `magnitude` (default |ref64|) is what the floor scales with: for
    sums that cancel (G's row sums), the sums of their terms' magnitudes."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    ref64 = ref64.double()
    size_of = ref64 if magnitude is None else magnitude.double()
    for norm, f in (("max", lambda x: x.abs().max().item()), ("rms", lambda x: x.square().mean().sqrt().item())):
        if not ref64.numel():
            break
        err, e_base, size = f(got.double() - ref64), f(baseline.double() - ref64), f(size_of)
        bound = 2 * e_base + _FLOOR[dtype] * size
        assert err <= bound, (f"{name}: {norm} error {err:.3g} > bound {bound:.3g} (torch-in-dtype error "
                              f"{e_base:.3g}, reference {norm} {size:.3g})")
