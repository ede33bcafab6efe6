"""Where a result came from: device, library versions, git SHA, time.

Every result row carries these fields, so a row copied out of its file still says what produced it.
Nothing here imports a heavy library except torch.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Distribution names whose versions a row records (None when not installed).
VERSIONED = {
    "torch": "torch",
    "triton": "triton",
    "transformers": "transformers",
    "liger_kernel": "liger-kernel",
    "cut_cross_entropy": "cut-cross-entropy",
    "dvsft_kernels": "dvsft-kernels",
}


def dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def default_device() -> str:
    return "cuda" if cuda_available() else "cpu"


@functools.cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str, init_cuda: bool = True) -> str:
    """init_cuda=False: ask nvidia-smi instead of torch, so the calling process creates no CUDA
    context (the parent of the workers must not hold GPU memory)."""
    if device.startswith("cuda"):
        if not init_cuda:
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                    check=False,
                )
                names = out.stdout.strip().splitlines()
                if out.returncode == 0 and names:
                    return names[0].strip()
            except (OSError, subprocess.SubprocessError):
                pass
            return "cuda"
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    import torch

    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: str, name: str | None = None) -> str:
    """Short directory-safe name: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc-2t'."""
    if device.startswith("cuda"):
        name = name or device_name(device, init_cuda=False)
    else:
        import torch

        name = f"cpu {cpu_name()} {torch.get_num_threads()}t"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:60].strip("-") or "device"


@functools.cache
def git_sha() -> str:
    """Short SHA of HEAD, '+dirty' when tracked files differ; DVSFT_GIT_SHA overrides (a copied
    tree without .git, e.g. on a GPU machine)."""
    env = os.environ.get("DVSFT_GIT_SHA")
    if env:
        return env
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def metadata(device: str, init_cuda: bool = True) -> dict:
    """The fields every row carries."""
    meta = {
        "device": device.split(":")[0],
        "device_name": device_name(device, init_cuda),
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "time": now_iso(),
    }
    for key, dist in VERSIONED.items():
        meta[key] = dist_version(dist)
    if meta["dvsft_kernels"] is None:  # working tree on PYTHONPATH, not pip-installed
        try:
            text = (REPO_ROOT / "dvsft_kernels" / "__init__.py").read_text()
            m = re.search(r'__version__\s*=\s*"([^"]+)"', text)
            meta["dvsft_kernels"] = m.group(1) + "(tree)" if m else None
        except OSError:
            pass
    return meta
