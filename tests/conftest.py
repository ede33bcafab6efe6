"""Suite-wide setup. Triton kernels run through the interpreter on machines without CUDA; the
variable must be set before triton is first imported, so it is set here, at collection time."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


_FAIL_LOG = os.environ.get("DVSFT_FAIL_LOG")


def pytest_runtest_logreport(report):
    """With DVSFT_FAIL_LOG set (benchmarks/gpu_check.sh), each failure's traceback is appended to
    that file as it happens, so a run cut off by its time limit still says what failed and why."""
    if _FAIL_LOG and report.failed:
        with open(_FAIL_LOG, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
