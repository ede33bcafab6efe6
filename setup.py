# Packaging lives in pyproject.toml; this file exists so that `pip install -e .` works with old
# pips. The native CPU epilogue (dvsft_kernels/csrc/ce_epilogue.cpp) is NOT built here: it is compiled
# on first use by dvsft_kernels/native.py (torch.utils.cpp_extension, ~6 s on 2 cores, cached), so the
# build needs no torch (pip's build isolation would fetch a CUDA torch) and never sniffs hardware at
# install time. See csrc/README.md.
import os

from setuptools import setup

if os.environ.get("DVSFT_BUILD_NATIVE") == "1":  # pragma: no cover
    raise SystemExit("DVSFT_BUILD_NATIVE=1: the native CPU epilogue is compiled on first use, not at install "
                     "(dvsft_kernels/native.py; csrc/README.md). Unset DVSFT_BUILD_NATIVE; "
                     "python -c 'import dvsft_kernels; print(dvsft_kernels.native_status())' builds it now.")

setup()
