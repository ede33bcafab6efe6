"""Every Triton kernel configuration (STATIC_CONFIGS in dvsft_kernels/ops/kernels/*.py) compiles for
sm_90 on CPU with no local memory (spills), and matmul kernels use Hopper warpgroup MMAs.

The compile runs scripts/kernel_report.py in a subprocess: triton fixes interpreter vs compiler
when a kernel is decorated, and this suite sets TRITON_INTERPRET=1 on machines without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.static

REPORT = Path(__file__).resolve().parents[2] / "scripts" / "kernel_report.py"
TOOLCHAIN_MISSING = 2  # kernel_report.py's exit status when triton or ptxas/cuobjdump/nvdisasm is absent


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPORT), "--json"], capture_output=True, text=True, env=env,
                          check=False, timeout=600)
    if proc.returncode == TOOLCHAIN_MISSING:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, f"kernel_report.py failed:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_configs_are_listed(report):
    assert any(r["module"] == "ce_chunk" for r in report), "the CE chunk kernel lists no STATIC_CONFIGS"


def test_fused_kernels_are_listed(report):
    modules = {r["module"] for r in report}
    assert {"lce_fused_fwd", "lce_fused_bwd"} <= modules, modules
    fused_matmul = [r["name"] for r in report if r["module"].startswith("lce_fused") and r["matmul"]]
    assert len(fused_matmul) >= 10, fused_matmul


def test_no_spills(report):
    # ptxas places register spills in the stack frame (STACK), not in LOCAL; none of these kernels
    # has a call stack of its own, so any stack means spills
    spilled = [f"{r['name']}: {r['stack']} B stack, {r['registers']} registers" for r in report if r["stack"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_no_local_memory(report):
    spilled = [f"{r['name']}: {r['local']} B local, {r['registers']} registers" for r in report if r["local"]]
    assert not spilled, "local-memory spills:\n" + "\n".join(spilled)


def test_matmul_kernels_use_hgmma(report):
    if not any(r["matmul"] for r in report):
        pytest.skip("no configuration is flagged matmul yet")
    slow = [r["name"] for r in report if r["matmul"] and r["hgmma"] == 0]
    assert not slow, f"matmul kernels without HGMMA (not on the Hopper tensor-core path): {slow}"


# The fused kernels that read targets, compiled with K = 16 soft targets (SOFT_K; lce_fused_*.py
# STATIC_CONFIGS): each is its hard configuration's name + "_soft16", so test_no_spills and
# test_no_local_memory cover them.
SOFT_VARIANTS = [
    "lce_fused_fwd/bf16_softcap", "lce_fused_fwd/bf16_bias_smoothing_softcap", "lce_fused_fwd/fp32_softcap",
    "lce_fused_fwd/combine_s256", "lce_fused_bwd/atomic_bf16", "lce_fused_bwd/atomic_bf16_softcap_filter",
    "lce_fused_bwd/atomic_fp32_softcap", "lce_fused_bwd/stage_g_bf16_softcap_filter",
    "lce_fused_bwd/stage_g_fp32_softcap_filter", "lce_fused_bwd/stage_g_bf16_by_position",
]


def test_fused_soft_variants_are_listed_and_keep_the_mma_path(report):
    """Soft targets add per-row loops outside the tile GEMMs: every soft variant compiles, with the
    same warpgroup MMAs (HGMMA count) as its hard configuration."""
    by_name = {r["name"]: r for r in report}
    missing = [n for n in SOFT_VARIANTS if n not in by_name or n + "_soft16" not in by_name]
    assert not missing, f"not in the report: {missing}"
    differ = [n for n in SOFT_VARIANTS if by_name[n + "_soft16"]["hgmma"] != by_name[n]["hgmma"]]
    assert not differ, f"soft variants off the hard kernels' MMA path: {differ}"
