"""Suite-wide setup. Triton kernels run through the interpreter on machines without CUDA; the
variable must be set before triton is first imported, so it is set here, at collection time."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
