"""Compile every Triton kernel configuration of dvsft_kernels/ops/kernels/ for the H100 (sm_90) on
CPU and report its resources: registers, shared memory, local memory (spills), stack and the count
of Hopper warpgroup MMAs (HGMMA) in the SASS.

Each module in dvsft_kernels/ops/kernels/ lists its configurations in `STATIC_CONFIGS`, a list of
dicts with keys:
    name        unique label, e.g. "ce_chunk/bf16_grad"
    kernel      the @triton.jit function
    signature   {arg: type} for every non-constexpr argument, in triton.tools.compile's spelling:
                "*bf16", "i32", "fp32", ...; a ":16" suffix marks an argument the launcher would
                specialise as 16-divisible (aligned pointers, strides)
    constexprs  {arg: value} for every tl.constexpr argument
    num_warps, num_stages
    matmul      True for kernels that must use tensor cores (HGMMA > 0 is then required)

    python scripts/kernel_report.py            # table
    python scripts/kernel_report.py --json     # one JSON object per config (tests/ops/test_static_kernels.py)

The kernels must be imported with TRITON_INTERPRET unset (triton decides interpreter or compiler
when a kernel is decorated): this script clears it before importing anything.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
# FMA contraction on, as a launch on the GPU compiles today (triton 3.9 warns that its default flips).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = ("cuda", 90, 32)
_RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def tool_path(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def toolchain_missing() -> str | None:
    """Why the sm_90 compile cannot run here, or None when it can."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        return f"triton is not importable: {e}"
    for tool in ("ptxas", "cuobjdump", "nvdisasm"):
        p = tool_path(tool)
        if not (p.is_file() and os.access(p, os.X_OK)):
            return f"{tool} not found at {p}"
    return None


def collect_configs() -> list[dict]:
    import dvsft_kernels.ops.kernels as pkg

    configs = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for cfg in getattr(mod, "STATIC_CONFIGS", []):
            configs.append(dict(cfg, module=info.name))
    names = [c["name"] for c in configs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"STATIC_CONFIGS: duplicate names {sorted(dup)}")
    return configs


def compile_config(cfg: dict, workdir: Path) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = cfg["kernel"]
    constexprs = dict(cfg["constexprs"])
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name not in cfg["signature"]:
            raise ValueError(f"{cfg['name']}: argument {name!r} has neither a type nor a constexpr value")
        ty, _, hint = cfg["signature"][name].partition(":")
        signature[name] = ty
        if hint == "16":
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif hint:
            raise ValueError(f"{cfg['name']}: only the ':16' hint is supported, got {name}={cfg['signature'][name]}")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget(*TARGET),
                       options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    cubin = workdir / (re.sub(r"[^A-Za-z0-9_.-]", "_", cfg["name"]) + ".cubin")
    cubin.write_bytes(k.asm["cubin"])
    usage = subprocess.run([tool_path("cuobjdump"), "--dump-resource-usage", cubin],
                           capture_output=True, text=True, check=True).stdout
    found = _RESOURCE_RE.search(usage)
    if found is None:
        raise RuntimeError(f"{cfg['name']}: cannot parse cuobjdump output:\n{usage}")
    reg, stack, shared, local = map(int, found.groups())
    sass = subprocess.run([tool_path("nvdisasm"), cubin], capture_output=True, text=True, check=True).stdout
    return {
        "name": cfg["name"], "module": cfg["module"], "matmul": bool(cfg.get("matmul", False)),
        "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
        "registers": reg, "shared": shared, "shared_triton": k.metadata.shared, "local": local,
        "stack": stack, "hgmma": sum("HGMMA" in line for line in sass.splitlines()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object per config")
    args = ap.parse_args(argv)
    why = toolchain_missing()
    if why:
        print(f"toolchain missing: {why}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for cfg in collect_configs():
            rows.append(compile_config(cfg, Path(d)))
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    cols = [("config", "name", 34), ("warps", "num_warps", 5), ("regs", "registers", 5),
            ("smem B", "shared_triton", 7), ("local B", "local", 7), ("stack B", "stack", 7), ("HGMMA", "hgmma", 5)]
    print("  ".join(f"{h:<{w}}" if k == "name" else f"{h:>{w}}" for h, k, w in cols))
    for r in rows:
        print("  ".join(f"{r[k]:<{w}}" if k == "name" else f"{r[k]:>{w}}" for h, k, w in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
