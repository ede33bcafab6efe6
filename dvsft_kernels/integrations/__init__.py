"""Hugging Face integration: `attach()`, trainer patching, the DV-SFT collator.

`attach` needs only torch; the trainer and collator import transformers when first used.
"""

from dvsft_kernels.integrations.attach import AttachError, AttachHandle, attach, get_handle

_LAZY = {
    "DVSFTTrainer": "dvsft_kernels.integrations.trainer",
    "patch_trainer": "dvsft_kernels.integrations.trainer",
    "unpatch_trainer": "dvsft_kernels.integrations.trainer",
    "DVSFTCollator": "dvsft_kernels.integrations.collator",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AttachError",
    "AttachHandle",
    "DVSFTCollator",
    "DVSFTTrainer",
    "attach",
    "get_handle",
    "patch_trainer",
    "unpatch_trainer",
]
