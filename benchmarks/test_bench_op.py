"""pytest-benchmark microbenchmarks of the CPU op path.

    pytest benchmarks --benchmark-only                      # all microbenchmarks
    pytest benchmarks/test_bench_op.py --benchmark-only --benchmark-compare   # against a saved run

Kept out of the default test run (pyproject's testpaths = ["tests"]). The providers and inputs are
the harness's (benchmarks/providers.py, benchmarks/shapes.py), so these numbers and run.py's agree
on what is measured; extra_info carries the FLOP model and effective GFLOP/s.
"""

from __future__ import annotations

import pytest

from benchmarks import costs
from benchmarks.providers import PROVIDERS
from benchmarks.shapes import FAMILIES, Shape, make_inputs

# Small enough for a loaded 2-core machine; V and D in the ratio of a real head.
SHAPES = [Shape("bench", 1024, 256, 16384, f) for f in (1.0, 0.3, 0.1)] + [
    Shape("issue2", 1024, *FAMILIES["issue2"], 1.0),
]
PROVIDER_NAMES = ["dvsft_torch", "hf", "torch_lce", "floor"]


def _runner(name: str, shape: Shape):
    p = PROVIDERS[name]
    reason = p.static_reason("cpu") or p.probe("cpu")
    if reason:
        pytest.skip(reason)
    return p.prepare(make_inputs(shape, "cpu"), shape, "cpu")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.family}-N{s.N}-D{s.D}-V{s.V}-f{s.fraction:g}")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDER_NAMES)
def test_op(benchmark, provider, mode, shape):
    runner = _runner(provider, shape)
    if mode == "fwd":
        fn = runner.fwd
    else:

        def fn():
            runner.bwd(runner.fwd())

    benchmark.group = f"{shape.family} N{shape.N} D{shape.D} V{shape.V} f{shape.fraction:g} {mode}"
    benchmark.pedantic(fn, setup=runner.reset, rounds=5, warmup_rounds=1, iterations=1)
    flop = costs.flops(mode, shape.n, shape.D, shape.V)
    n_proc = shape.n if PROVIDERS[provider].skips_ignored else shape.N
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        n=shape.n,
        N=shape.N,
        D=shape.D,
        V=shape.V,
        rows_processed=n_proc,
        flops=flop,
        gflops_effective=flop / median / 1e9 if median else None,
    )
    runner.close()
