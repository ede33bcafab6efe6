# Packaging lives in pyproject.toml; this file exists so that `pip install -e .` works with old
# pips and so that a future native extension (csrc/) has a place to be declared. Native builds are
# opt-in (DVSFT_BUILD_NATIVE=1) and never sniff hardware at install time.
import os

from setuptools import setup

ext_modules = []
if os.environ.get("DVSFT_BUILD_NATIVE") == "1":  # pragma: no cover - no native code yet
    raise SystemExit("DVSFT_BUILD_NATIVE=1: csrc/ has no native extension yet (see csrc/README.md)")

setup(ext_modules=ext_modules)
