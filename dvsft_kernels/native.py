"""The native CPU epilogue (dvsft_kernels/csrc/ce_epilogue.cpp): loaded on first use, never at import.

`lce_torch` (ops/backends/pytorch.py) asks `epilogue()` for the op on its first CPU call, which
registers `torch.ops.dvsft_native.ce_chunk` from the first of:

1. the ahead-of-time build beside this file (`ce_epilogue_prebuilt<ext suffix>`), which setup.py
   makes when it can import the installed torch (`pip install --no-build-isolation -e .`, or
   `python setup.py build_ext`; DVSFT_BUILD_NATIVE=0 skips it). Its record (`ce_epilogue_prebuilt.json`)
   must match this Python, this torch (version and C++ ABI), this source and, for a -march=native
   build, this CPU's instruction set, checked before loading: a library of another torch is never
   loaded (a namespace, once registered, cannot be replaced in the process);
2. the cache directory below, where a first-use build of an earlier process lives;
3. a compile now with `torch.utils.cpp_extension.load` (ninja and a C++ compiler needed; ~6 s on
   2 cores) into the cache directory.

A prebuilt module that does not fit or fails to load is skipped, with its reason kept in the status.
Any build failure (no compiler, no ninja, a compile error, a load error) is remembered, in the
process and in the cache directory, and the PyTorch path runs as before. `native_available()` /
`native_status()` say which happened.

Cache directory: $DVSFT_NATIVE_DIR, else $TORCH_EXTENSIONS_DIR/dvsft_kernels, else
~/.cache/dvsft_kernels/native; one subdirectory per (python, torch, source, compiler flags, CPU
features), so a shared home directory serves several machines. Builds are serialised by an flock on
a file beside them: parallel pytest-xdist workers wait for the one that compiles instead of racing,
and a process killed mid-build leaves no lock behind (cpp_extension's own lock file, which a killed
process would leave, is removed under the flock before building).

Switches: DVSFT_NATIVE=0 turns the native path off (nothing is built or loaded); DVSFT_NATIVE_REBUILD=1
ignores a remembered failure; at install, DVSFT_BUILD_NATIVE=0 skips the ahead-of-time build and =1
makes its failure an error (setup.py). Flags: `-O3 -march=native -fopenmp` with ATen's AVX-512 (or AVX2)
vector code when the compiler's native target has it, else `-O3 -fopenmp` with ATen's generic
vectors, else `-O3` alone (one thread per chunk).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "ce_epilogue.cpp"
# the ahead-of-time build (setup.py): the module dvsft_kernels.<PREBUILT_NAME>, its record beside it
PREBUILT_NAME = "ce_epilogue_prebuilt"
PREBUILT_DIR = Path(__file__).parent

_lock = threading.Lock()
_state: dict = {"op": None, "status": "not built yet (builds at the first CPU call or native_available())",
                "tried": False}
# test-only planted faults passed to the C++ code (tests/ops/test_native.py): 1 drops the z-loss term of
# the loss, 2 drops the z-loss factor of the gradient; soft targets: 3 takes slot 0's logit alone (weight
# 1) as the target logit of the loss, 4 drops the one-hot term of slots 1.. from the gradient. 0 in
# normal use.
FAULT = {"code": 0}


def enabled() -> bool:
    """False when DVSFT_NATIVE=0."""
    return os.environ.get("DVSFT_NATIVE", "1") != "0"


def cache_root() -> Path:
    if os.environ.get("DVSFT_NATIVE_DIR"):
        return Path(os.environ["DVSFT_NATIVE_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "dvsft_kernels"
    return Path.home() / ".cache" / "dvsft_kernels" / "native"


def _native_macros() -> str:
    """The compiler's predefined macros for -march=native ('' if that fails)."""
    cxx = os.environ.get("CXX", "c++")
    try:
        r = subprocess.run([cxx, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                           check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout if r.returncode == 0 else ""


def variants() -> tuple[list[tuple[str, list[str]]], str]:
    """([(tag, extra_cflags)] to try in order, and a hash of the native target's macros, which names
    the build directory). ATen's parallel_for is OpenMP in a header: without -fopenmp the rows run on
    one thread, so every variant but the last has it; the first also uses the native vector unit."""
    macros = _native_macros()
    out = []
    omp = ["-fopenmp"]
    if "__AVX512F__" in macros and "__AVX512DQ__" in macros and "__AVX512BW__" in macros:
        out.append(("avx512", ["-O3", "-march=native", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", *omp]))
    elif "__AVX2__" in macros and "__FMA__" in macros and "__F16C__" in macros:  # ATen's AVX2 code needs all 3
        out.append(("avx2", ["-O3", "-march=native", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", *omp]))
    out.append(("default", ["-O3", *omp]))
    out.append(("serial", ["-O3"]))
    return out, hashlib.sha256(macros.encode()).hexdigest()[:10]


def cpu_isa(cpu: str) -> str:
    """What a -march=native build depends on, without a compiler where possible: the instruction-set
    flags of /proc/cpuinfo (hashed), else `cpu`, the hash of the compiler's native macros."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                return "cpuinfo-" + hashlib.sha256(flags.encode()).hexdigest()[:10]
    except OSError:
        pass
    return cpu


def build_record(tag: str, flags: list[str], cpu: str) -> dict:
    """What a build is for: setup.py writes it beside the prebuilt module, `epilogue()` compares it
    with the running process before loading that module."""
    return {"python": f"py{sys.version_info[0]}{sys.version_info[1]}", "torch": torch.__version__,
            "cxx11_abi": bool(torch.compiled_with_cxx11_abi()),
            "source": hashlib.sha256(SOURCE.read_bytes()).hexdigest() if SOURCE.exists() else None,
            "tag": tag, "flags": list(flags), "cpu": cpu_isa(cpu) if "-march=native" in flags else None}


def prebuilt_path() -> Path:
    return PREBUILT_DIR / (PREBUILT_NAME + importlib.machinery.EXTENSION_SUFFIXES[0])


def _load_prebuilt(cpu: str):
    """(op, status) from the ahead-of-time build, or (None, why not; '' when there is none)."""
    so, rec_path = prebuilt_path(), PREBUILT_DIR / f"{PREBUILT_NAME}.json"
    if not so.exists():
        return None, ""
    try:
        rec = json.loads(rec_path.read_text())
        here = build_record(rec["tag"], rec["flags"], cpu)
        for key in ("python", "torch", "cxx11_abi", "source", "cpu"):
            if key == "source" and here["source"] is None:
                continue  # the source is not installed: nothing to call stale
            if rec.get(key) != here[key]:
                return None, f"prebuilt {so.name} skipped: built for {key} {rec.get(key)!r}, running {here[key]!r}"
        torch.ops.load_library(str(so))
        return torch.ops.dvsft_native.ce_chunk, f"{rec['tag']} prebuilt, {so}"
    except Exception as e:  # noqa: BLE001 - an unusable prebuilt module means "build it instead"
        return None, f"prebuilt {so.name} skipped: {type(e).__name__}: {_short(str(e))}"


def _build_dir(tag: str, flags: list[str], cpu: str) -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_root() / f"{py}-torch{torch.__version__}-{tag}-{cpu}-{key}"


def _build(tag: str, flags: list[str], cpu: str):
    """Compile (or find) and load one variant; returns torch.ops.dvsft_native.ce_chunk."""
    import fcntl

    from torch.utils.cpp_extension import load

    d = _build_dir(tag, flags, cpu)
    d.mkdir(parents=True, exist_ok=True)
    failed = d / "FAILED"
    with open(d.parent / f"{d.name}.flock", "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)  # released by the OS if this process dies
        try:
            if failed.exists() and os.environ.get("DVSFT_NATIVE_REBUILD") != "1":
                raise RuntimeError(f"an earlier build failed ({failed}; DVSFT_NATIVE_REBUILD=1 retries): "
                                   + failed.read_text()[-2000:])
            stale = d / "lock"  # cpp_extension's baton; nobody else can hold it while we hold the flock
            if stale.exists():
                stale.unlink()
            try:
                load(name=f"dvsft_native_{tag}", sources=[str(SOURCE)], extra_cflags=flags,
                     extra_ldflags=[f for f in flags if f == "-fopenmp"], build_directory=str(d),
                     is_python_module=False, verbose=False)
            except Exception as e:  # any failure means "no native path"
                failed.write_text(f"{type(e).__name__}: {e}")
                raise
        finally:
            fcntl.flock(lf, fcntl.LOCK_UN)
    return torch.ops.dvsft_native.ce_chunk


def _short(msg: str) -> str:
    return msg if len(msg) <= 900 else f"{msg[:300]} ... {msg[-500:]}"


def epilogue():
    """torch.ops.dvsft_native.ce_chunk, building it on the first call; None when DVSFT_NATIVE=0 or
    the build failed (native_status() says why)."""
    if not enabled():
        return None
    if _state["tried"]:
        return _state["op"]
    with _lock:
        if _state["tried"]:
            return _state["op"]
        errors = []
        try:
            vs, cpu = variants()
            op, why = _load_prebuilt(cpu)
            if op is not None:
                _state.update(op=op, status=f"available ({torch.ops.dvsft_native.capability()}, {why})")
                _state["tried"] = True
                return op
            if why:
                errors.append(why)
            if not SOURCE.exists():
                raise FileNotFoundError(f"{SOURCE}: the C++ source is missing from this install")
            for tag, flags in vs:
                try:
                    op = _build(tag, flags, cpu)
                except Exception as e:  # noqa: BLE001 - any failure means "try the next, else no native path"
                    errors.append(f"{tag}: {type(e).__name__}: {_short(str(e))}")
                    continue
                note = f"; {why}" if why else ""  # why the prebuilt module was skipped
                _state.update(op=op, status=f"available ({torch.ops.dvsft_native.capability()}, "
                                            f"{_build_dir(tag, flags, cpu)}{note})")
                break
            else:
                _state["status"] = "build failed: " + " | ".join(errors)
        except Exception as e:  # noqa: BLE001 - never let the probe break the op
            _state["status"] = f"build failed: {' | '.join([*errors, f'{type(e).__name__}: {e}'])}"
        _state["tried"] = True
        return _state["op"]


def native_available() -> bool:
    """True when the native CPU epilogue is built and switched on (builds it on the first call)."""
    return epilogue() is not None


def native_status() -> str:
    """Why the native CPU epilogue is or is not in use (builds it on the first call)."""
    if not enabled():
        return "off (DVSFT_NATIVE=0)"
    epilogue()
    return _state["status"]


def ce_chunk(x, targets, row_scale=None, *, target_probs=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
             compute_grad=True, grad_out=None, want_argmax=True):
    """The native epilogue with the `ce_chunk` launcher's contract (ops/kernels/ce_chunk.py) on CPU
    logits x (m, V), float32 or bfloat16 / float16 (read as float32, the same math): returns (loss,
    lse, predicted int64; -1 without `want_argmax`), G written over x (in x's dtype) or into
    `grad_out` (float32 / bfloat16 / float16). Targets (m,), or soft: (m, K) with
    `target_probs` (m, K) (y_t and the one-hot term weighted by them; duplicate ids add). Raises
    RuntimeError when unavailable."""
    op = epilogue()
    if op is None:
        raise RuntimeError(f"native epilogue unavailable: {native_status()}")
    if grad_out is not None and not compute_grad:
        raise ValueError("grad_out: given with compute_grad=False")
    if grad_out is not None and grad_out.data_ptr() == x.data_ptr() and grad_out.stride() == x.stride():
        grad_out = None
    s = row_scale.float().contiguous() if (row_scale is not None and compute_grad) else None
    q = target_probs.float().contiguous() if target_probs is not None else None
    return op(x, targets.long().contiguous(), q, s, float(label_smoothing), float(z_loss),
              None if softcap is None else float(softcap), bool(compute_grad), grad_out, bool(want_argmax),
              FAULT["code"])
