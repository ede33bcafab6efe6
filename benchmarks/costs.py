"""Explicit FLOP and byte models of the op (used by the reports' "x floor" and roofline columns).

n = labeled rows (the useful work), D = hidden size, V = vocabulary, s = bytes per element.

FLOPs: the three n x D x V products the op must do: z = h W^T (forward), dh = G W and dW = G^T h
(backward). Effective TFLOP/s divides these by the measured time whatever the provider did, so a
provider that projects all N rows (ignored ones too) or recomputes z shows a lower number;
`rows_processed` in each row says which rows it projected.

Bytes: compulsory traffic of the useful work, each operand moved once: forward reads h (labeled
rows) and W; backward reads them and writes dh and dW; forward+backward reads h and W once and
writes dh and dW. Logits traffic is not compulsory (a fused design has none), so it is left out;
GB/s from this model says how far a provider is from being limited by its inputs and outputs.
"""

from __future__ import annotations

MODES = ("fwd", "bwd", "fwd_bwd")
GEMMS = {"fwd": 1, "bwd": 2, "fwd_bwd": 3}

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def flops(mode: str, n: int, D: int, V: int) -> int:
    """2 n D V per product: fwd 2nDV, bwd 4nDV, fwd_bwd 6nDV."""
    return 2 * GEMMS[mode] * n * D * V


def io_bytes(mode: str, n: int, D: int, V: int, dtype: str) -> int:
    s = ELEMENT_BYTES[dtype]
    operands = s * D * (n + V)  # h at labeled rows + W
    return {"fwd": operands, "bwd": 2 * operands, "fwd_bwd": 2 * operands}[mode]


def tflops(flop: int, time_ms: float | None) -> float | None:
    if not time_ms or time_ms <= 0:
        return None
    return flop / (time_ms * 1e-3) / 1e12


def gbps(nbytes: int, time_ms: float | None) -> float | None:
    if not time_ms or time_ms <= 0:
        return None
    return nbytes / (time_ms * 1e-3) / 1e9
