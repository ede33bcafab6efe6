"""The fused linear cross-entropy op (../shared/DESIGN.md section 4.1)."""

from dvsft_kernels.ops.function import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
