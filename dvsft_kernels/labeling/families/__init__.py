"""Per-family geometry: how each Hugging Face VLM processor turns an image into visual tokens.

One module per family (``gemma3``, ``idefics3``, ``internvl``, ``llava``, ``llava_next``,
``llava_onevision``, ``pixtral``, ``qwen2_vl``), each defining its geometry builder (a function named
like the module, e.g. ``families.llava.llava``, returning a :class:`VisualGrid` whose views map
original pixels to the processor's view pixels) and its ``from_processor`` adapter, and registering
them in :mod:`dvsft_kernels.labeling.registry` (``FAMILY = register(Family(...))``) when imported.
This package imports every module in it except :mod:`.common` (the shared helpers) and private
``_*`` ones, in name order, so adding a family is adding its file (docs/labeling.md, "Adding a VLM
family"). Builder defaults are the transformers processor *class* defaults (checkpoints differ:
pass the checkpoint's values, or use :func:`grid_from_processor`, which reads them from the
processor).
"""

import importlib
import pkgutil

from dvsft_kernels.labeling.families.common import image_hw
from dvsft_kernels.labeling.registry import (
    Family,
    detect_family,
    grid_from_processor,
    image_token_id,
    register,
)

# every family module, imported (so registered) in name order
FAMILY_MODULES = tuple(
    m.name for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
    if m.name != "common" and not m.name.startswith("_")
)
for _name in FAMILY_MODULES:
    importlib.import_module(f"{__name__}.{_name}")

# constants the single-module families.py had (imported after the loop: importing a family registers it)
from dvsft_kernels.labeling.families.llava_next import LLAVA_NEXT_PINPOINTS
from dvsft_kernels.labeling.families.llava_onevision import ONEVISION_PINPOINTS

__all__ = [
    "FAMILY_MODULES",
    "LLAVA_NEXT_PINPOINTS",
    "ONEVISION_PINPOINTS",
    "Family",
    "detect_family",
    "grid_from_processor",
    "image_hw",
    "image_token_id",
    "register",
]
