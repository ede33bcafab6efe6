"""dvsft-kernels: fused linear cross-entropy and visual-token labeling for DV-SFT.

Public names (contracts in docs/): `linear_cross_entropy`, `DVLoss`, `DVLossOutput`,
`attach`; labeling lives in `dvsft_kernels.labeling`.
"""

__version__ = "0.1.0"

from dvsft_kernels.integrations.attach import attach
from dvsft_kernels.loss import DVLoss, DVLossOutput
from dvsft_kernels.native import native_available, native_status
from dvsft_kernels.ops import linear_cross_entropy

__all__ = ["DVLoss", "DVLossOutput", "__version__", "attach", "linear_cross_entropy", "native_available",
           "native_status"]
