"""OCR words -> per-visual-token labels (../shared/DESIGN.md section 4.4)."""

from dvsft_kernels.labeling.grid import GridView, VisualGrid
from dvsft_kernels.labeling.types import OCRWord

__all__ = ["GridView", "OCRWord", "VisualGrid"]
