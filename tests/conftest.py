"""Suite-wide setup. Triton kernels run through the interpreter on machines without CUDA; the
variable must be set before triton is first imported, so it is set here, at collection time."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist (-n auto, see pytest_cmdline_main): the workers share the cores; a worker with more torch
# threads than its share only contends with the others
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, _cores // _XDIST_WORKERS))

try:
    from hypothesis import settings
except ImportError:  # only the property tests need it (the [test] extra has it)
    pass
else:
    # Property tests draw the same examples on every run (a failure is reproducible, never flaky;
    # the failing example is printed); HYPOTHESIS_PROFILE=default draws fresh random ones.
    settings.register_profile("dvsft", derandomize=True, deadline=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dvsft"))


_FAIL_LOG = os.environ.get("DVSFT_FAIL_LOG")
_DURATION_LOG = os.environ.get("DVSFT_DURATION_LOG")


def pytest_runtest_logreport(report):
    """For benchmarks/gpu_check.sh, written as tests finish so that a run cut off by its time limit
    still tells: DVSFT_FAIL_LOG gets each failure's traceback, DVSFT_DURATION_LOG each test's
    outcome and call time (tab-separated). Under xdist the controller writes (it gets every worker's
    reports): the workers stay out, or each line would be written twice."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if _FAIL_LOG and report.failed:
        with open(_FAIL_LOG, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
    if _DURATION_LOG and (report.when == "call" or report.outcome != "passed"):
        with open(_DURATION_LOG, "a") as f:
            f.write(f"{report.outcome}\t{report.when}\t{report.duration:.2f}\t{report.nodeid}\n")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads -n
def pytest_cmdline_main(config):
    """The whole suite (`python -m pytest`, no paths: pyproject's testpaths) runs on one pytest-xdist
    worker per core (the [test] extra has it), with --dist loadgroup, unless -n is given (`-n 0`: one
    process), --pdb, or xdist is absent. A run naming paths stays in one process (no worker start-up
    for a focused run) unless -n is given. Set here, not in pyproject's addopts, so that
    `pytest benchmarks` (pytest-benchmark, which xdist disables) and an install without xdist are
    left alone."""
    suite = getattr(config, "args_source", None) == pytest.Config.ArgsSource.TESTPATHS
    if (not suite or os.environ.get("PYTEST_XDIST_WORKER") or not config.pluginmanager.hasplugin("xdist")
            or config.getoption("numprocesses", None) is not None or config.getoption("usepdb", False)
            or config.getoption("collectonly", False)):
        return
    config.option.numprocesses = "auto"  # PYTEST_XDIST_AUTO_NUM_WORKERS overrides the count
    if config.option.dist == "no":
        config.option.dist = "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist, controller side: the workers parse the command line afresh, so an option set above
    reaches them only this way."""
    node.workerinput["dvsft_loadgroup"] = node.config.getoption("dist") == "loadgroup"


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's hook reads the option
def pytest_configure(config):
    xdist = os.environ.get("PYTEST_XDIST_WORKER") or config.getoption("dist", "no") != "no"
    if xdist and hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True  # no benchmarks here; spares its xdist warning


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under xdist --dist loadgroup, the tests that share a module-scoped fixture run on one worker,
    so that the fixture (a kernel report, a benchmark run, a tiny model) is built once, not once per
    worker; every other test goes to whichever worker is free."""
    if not getattr(config, "workerinput", {}).get("dvsft_loadgroup"):
        return
    config.option.loadgroup = True  # xdist's hook tags the node ids with the groups below
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shared = sorted(name for name, defs in (info.name2fixturedefs.items() if info else ())
                        if defs and defs[-1].scope == "module")
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}::{shared[0]}"))


@pytest.fixture(autouse=True)
def sanitize_kernels(request):
    """Every test's interpreter launches run under tests/sanitizer.py (bounds and races; ~15 %
    slower); DVSFT_SANITIZE=0 turns it off. tests/ops/test_sanitizer.py checks a chosen matrix
    under its own sanitizer whatever the variable says."""
    if (os.environ.get("DVSFT_SANITIZE", "1") == "0" or os.environ.get("TRITON_INTERPRET") != "1"
            or request.module.__name__.endswith("test_sanitizer")):
        yield
        return
    try:
        import triton.runtime.interpreter  # noqa: F401 - the sanitizer patches it
    except ImportError:  # no Triton: nothing to sanitize (its tests skip)
        yield
        return
    from .sanitizer import KernelSanitizer

    with KernelSanitizer():
        yield
