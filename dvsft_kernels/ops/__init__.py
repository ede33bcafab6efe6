"""The fused linear cross-entropy op (docs/linear_cross_entropy.md)."""

from dvsft_kernels.ops.function import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
