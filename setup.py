# Packaging lives in pyproject.toml; this file exists so that `pip install -e .` works with old pips
# and to build the native CPU epilogue (dvsft_kernels/csrc/ce_epilogue.cpp) ahead of time when it can.
#
# torch is never a build requirement (pip's build isolation would download a multi-GB CUDA torch), so
# the ahead-of-time build happens only where this script can import the torch already installed:
# `pip install --no-build-isolation -e .` or `python setup.py build_ext [--inplace]`. It builds the
# first flag set of dvsft_kernels/native.py (-march=native where the compiler has AVX-512 / AVX2) as
# dvsft_kernels/ce_epilogue_prebuilt<suffix> plus a record of what it was built for, which native.py
# checks before loading it. Without torch, or when the compile fails, the install goes on without
# it and native.py compiles on first use (csrc/README.md).
# DVSFT_BUILD_NATIVE=0 skips the build; =1 makes a missing torch or a failed compile an error.
import importlib.util
import json
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def native_extension() -> dict:
    """setup() arguments for the ahead-of-time build: {} when skipped or impossible."""
    mode = os.environ.get("DVSFT_BUILD_NATIVE", "auto")
    if mode == "0":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        # native.py by path: its flag sets and build record, without importing the package
        spec = importlib.util.spec_from_file_location("dvsft_native_loader", HERE / "dvsft_kernels" / "native.py")
        native = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(native)
        variants, cpu = native.variants()
    except Exception as e:  # no torch here (build isolation): first-use compile instead
        if mode == "1":
            raise SystemExit(f"DVSFT_BUILD_NATIVE=1: cannot build the native epilogue here ({type(e).__name__}: "
                             f"{e}); install torch first and use `pip install --no-build-isolation`") from e
        return {}
    tag, flags = variants[0]

    class Build(BuildExtension):
        def records(self):
            """The record beside the module in build_lib, and beside its in-place copy (editable
            installs), where setuptools copies or links only the module itself."""
            name = f"{native.PREBUILT_NAME}.json"
            pkg = self.get_finalized_command("build_py").get_package_dir("dvsft_kernels")
            return Path(self.build_lib) / "dvsft_kernels" / name, Path(pkg) / name

        def build_extension(self, ext):
            record = Path(self.get_ext_fullpath(ext.name)).with_name(f"{native.PREBUILT_NAME}.json")
            record.unlink(missing_ok=True)
            try:
                super().build_extension(ext)
            except Exception as e:  # a failed compile must not fail the install
                if mode == "1":
                    raise
                print(f"dvsft_kernels: native epilogue not built ahead of time ({type(e).__name__}: {e}); "
                      "it compiles on first use", file=sys.stderr)
                return
            record.write_text(json.dumps(native.build_record(tag, flags, cpu), indent=1))

        def copy_extensions_to_source(self):  # editable install / build_ext --inplace
            super().copy_extensions_to_source()
            built, inplace = self.records()
            if built.exists():
                self.copy_file(str(built), str(inplace))

        def get_output_mapping(self):  # strict editable install: files linked from the build
            mapping = super().get_output_mapping()
            built, inplace = self.records()
            if mapping and built.exists():
                mapping[str(built)] = str(inplace)
            return mapping

    # optional unless required: setuptools then skips copying a module whose build failed
    ext = CppExtension(f"dvsft_kernels.{native.PREBUILT_NAME}", ["dvsft_kernels/csrc/ce_epilogue.cpp"],
                       extra_compile_args=flags, extra_link_args=[f for f in flags if f == "-fopenmp"],
                       optional=mode != "1")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": Build}}


setup(**native_extension())
