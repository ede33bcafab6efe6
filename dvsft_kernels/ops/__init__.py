"""The fused linear cross-entropy op (docs/linear_cross_entropy.md)."""

from dvsft_kernels.ops.function import LCEStats, linear_cross_entropy
from dvsft_kernels.ops.options import LCEOptions

__all__ = ["LCEOptions", "LCEStats", "linear_cross_entropy"]
