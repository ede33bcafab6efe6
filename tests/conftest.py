"""Suite-wide setup. Triton kernels run through the interpreter on machines without CUDA; the
variable must be set before triton is first imported, so it is set here, at collection time."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
    outcome and call time (tab-separated)."""
    if _FAIL_LOG and report.failed:
        with open(_FAIL_LOG, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
    if _DURATION_LOG and (report.when == "call" or report.outcome != "passed"):
        with open(_DURATION_LOG, "a") as f:
            f.write(f"{report.outcome}\t{report.when}\t{report.duration:.2f}\t{report.nodeid}\n")


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
