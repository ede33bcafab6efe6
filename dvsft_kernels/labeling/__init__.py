"""OCR words -> per-visual-token labels (docs/labeling.md).

Layout: ``grid.py`` (VisualGrid, GridView), ``registry.py`` (the VLM families: ``Family``,
``register``, look-ups), ``families/`` (one module per family, each registering itself; imported
here, so importing this package fills the registry), ``assign.py`` (labels for one image),
``batch.py`` (a batch's ``vision_labels``), ``readers.py`` (OCR files), ``ocr.py`` (OCR engines run
on images, cached), ``overlay.py`` (pictures).
"""

from dvsft_kernels.labeling import families as families  # registers every VLM family
from dvsft_kernels.labeling.assign import DROP_REASONS, LabelReport, clear_token_cache, label_visual_tokens
from dvsft_kernels.labeling.batch import (
    build_vision_labels,
    build_vision_labels_from_processor,
    placeholder_runs,
    scatter_vision_labels,
)
from dvsft_kernels.labeling.dataset import label_dataset
from dvsft_kernels.labeling.grid import GridView, VisualGrid
from dvsft_kernels.labeling.ocr import OCREngineMissing, OCRFailed, clear_ocr_cache, run_ocr
from dvsft_kernels.labeling.overlay import draw_overlay
from dvsft_kernels.labeling.readers import read_ocr
from dvsft_kernels.labeling.types import OCRWord, SoftLabels

__all__ = ["GridView", "OCRWord", "SoftLabels", "VisualGrid"]
__all__ += [
    "DROP_REASONS", "LabelReport", "build_vision_labels", "build_vision_labels_from_processor",
    "clear_token_cache", "label_visual_tokens", "placeholder_runs", "scatter_vision_labels",
]
__all__ += ["draw_overlay", "label_dataset", "read_ocr"]
__all__ += ["OCREngineMissing", "OCRFailed", "clear_ocr_cache", "run_ocr"]
