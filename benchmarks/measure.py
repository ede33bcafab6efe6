"""Timers and memory meters.

CPU: warmed-up repeats timed with time.perf_counter; each repeat times the forward and the backward
separately (a CPU call is synchronous), so one repeat yields all three modes. Peak extra memory is
read from /proc/self/status: VmHWM (peak resident set) minus the VmRSS before the measured call,
after resetting the peak through /proc/self/clear_refs ("5") and handing freed heap back to the OS
(malloc_trim). The worker runs in a fresh process, so ru_maxrss-style carry-over from a large
parent does not exist; where clear_refs is refused, memory is read on the very first call only.

GPU: triton.testing.do_bench (median; warm-up; L2 flushed) for forward and forward+backward; the
backward alone with CUDA events around `bwd` after an untimed forward. Peak extra memory is the
caching allocator's peak (max_memory_allocated) minus the allocation before the call.

Memory for "bwd" is measured from the same pre-forward baseline: it is the peak while backward runs,
including whatever the forward left alive for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from dataclasses import dataclass, field

MB = 1e6
# How the measuring process came to be; the runner sets "in-process" when run without isolation.
PROCESS = "fresh subprocess"


# ---------------------------------------------------------------------------------------------
# CPU memory


def proc_status_bytes(key: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_libc = None


def release_memory() -> None:
    """Collect garbage and return free heap pages to the OS, so the next peak is the call's own."""
    global _libc
    gc.collect()
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


class RssMeter:
    """Peak extra resident memory of the code between `start()` and `peak()`."""

    def __init__(self):
        self.resettable = reset_peak_rss()
        self.base = None
        self.hwm_before = None

    @property
    def method(self) -> str:
        if self.resettable:
            return f"VmHWM - VmRSS before the call ({PROCESS}, clear_refs reset)"
        return f"VmHWM - VmRSS before the first call ({PROCESS}, no clear_refs)"

    def start(self) -> None:
        release_memory()
        if self.resettable:
            reset_peak_rss()
        self.base = proc_status_bytes("VmRSS")
        self.hwm_before = proc_status_bytes("VmHWM")

    def restart_peak(self) -> None:
        """Reset the peak but keep the baseline (between forward and backward)."""
        if self.resettable:
            reset_peak_rss()
        self.hwm_before = proc_status_bytes("VmHWM")

    def peak(self) -> int | None:
        hwm = proc_status_bytes("VmHWM")
        if hwm is None or self.base is None:
            return None
        if not self.resettable and hwm <= self.hwm_before:
            return None  # below an earlier peak of the process: not measurable without a reset
        return max(0, hwm - self.base)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Measurement:
    times_ms: dict = field(default_factory=lambda: {"fwd": [], "bwd": [], "fwd_bwd": []})
    peak_bytes: dict = field(default_factory=lambda: {"fwd": None, "bwd": None, "fwd_bwd": None})
    mem_method: str | None = None
    timer: str = ""
    loss: float | None = None
    warmup_s: float | None = None

    def summary(self, mode: str) -> dict:
        ts = self.times_ms[mode]
        return {
            "time_ms": statistics.median(ts) if ts else None,
            "time_ms_min": min(ts) if ts else None,
            "time_ms_max": max(ts) if ts else None,
            "reps": len(ts),
        }


def _peak_fwd_bwd(pf, pb):
    vals = [v for v in (pf, pb) if v is not None]
    return max(vals) if vals else None


# ---------------------------------------------------------------------------------------------
# CPU timing


@dataclass
class CpuTiming:
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 10
    min_time_s: float = 1.0  # keep repeating (up to max_reps) until this much time is measured
    max_time_s: float = 15.0  # ...but stop adding repeats past this (slow peers), keeping >= 1


def measure_cpu(runner, timing: CpuTiming, measure_memory: bool = True) -> Measurement:
    m = Measurement(timer="time.perf_counter, warmed-up repeats")
    meter = RssMeter() if measure_memory else None
    if meter is not None and not meter.resettable:
        # No way to reset the peak: the first call is the only one we can measure.
        _cpu_rep(runner, m, meter)
        m.times_ms = {k: [] for k in m.times_ms}
        meter = None
    t0 = time.perf_counter()
    for _ in range(timing.warmup):
        runner.reset()
        runner.bwd(runner.fwd())
    m.warmup_s = time.perf_counter() - t0
    # First timed repeat also measures memory and records the loss.
    _cpu_rep(runner, m, meter)
    est = max(m.times_ms["fwd_bwd"][0] / 1e3, 1e-6)
    reps = max(timing.min_reps, min(timing.max_reps, int(timing.min_time_s / est) + 1))
    reps = max(1, min(reps, int(timing.max_time_s / est)))
    for _ in range(reps - 1):
        _cpu_rep(runner, m, None)
    return m


def _cpu_rep(runner, m: Measurement, meter: RssMeter | None) -> None:
    runner.reset()
    if meter is not None:
        meter.start()
    t0 = time.perf_counter()
    out = runner.fwd()
    t1 = time.perf_counter()
    if meter is not None:
        pf = meter.peak()
        meter.restart_peak()
    t1b = time.perf_counter()
    runner.bwd(out)
    t2 = time.perf_counter()
    if meter is not None:
        pb = meter.peak()
        m.peak_bytes = {"fwd": pf, "bwd": pb, "fwd_bwd": _peak_fwd_bwd(pf, pb)}
        m.mem_method = meter.method
        m.loss = runner.loss_value(out)
    fwd, bwd = (t1 - t0) * 1e3, (t2 - t1b) * 1e3
    m.times_ms["fwd"].append(fwd)
    m.times_ms["bwd"].append(bwd)
    m.times_ms["fwd_bwd"].append(fwd + bwd)
    del out


# ---------------------------------------------------------------------------------------------
# GPU timing


@dataclass
class GpuTiming:
    warmup_ms: float = 10.0
    rep_ms: float = 50.0
    min_reps: int = 3
    bwd_reps: int = 5


def _do_bench(fn, warmup_ms, rep_ms, grad_to_none):
    from triton.testing import do_bench

    try:
        res = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="all")
        return list(res) if isinstance(res, (list, tuple)) else [float(res)]
    except (TypeError, ValueError, AssertionError):  # a triton without return_mode="all"
        return [
            float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))
        ]


def measure_gpu(runner, timing: GpuTiming, measure_memory: bool = True) -> Measurement:
    import torch

    m = Measurement(timer="triton.testing.do_bench (fwd, fwd_bwd); CUDA events (bwd)")
    sync = torch.cuda.synchronize
    grads = [t for t in (getattr(runner, "hidden", None), getattr(runner, "weight", None)) if t is not None]
    t0 = time.perf_counter()
    runner.reset()
    runner.bwd(runner.fwd())  # compile / autotune
    sync()
    m.warmup_s = time.perf_counter() - t0

    # One step with memory and a per-phase estimate.
    runner.reset()
    gc.collect()
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    e0.record()
    out = runner.fwd()
    e1.record()
    sync()
    pf = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    e1b = torch.cuda.Event(enable_timing=True)
    e1b.record()
    runner.bwd(out)
    e2.record()
    sync()
    pb = torch.cuda.max_memory_allocated() - base
    m.loss = runner.loss_value(out)
    del out
    est_f, est_b = e0.elapsed_time(e1), e1b.elapsed_time(e2)
    if measure_memory:
        m.peak_bytes = {"fwd": pf, "bwd": pb, "fwd_bwd": max(pf, pb)}
        m.mem_method = "torch.cuda.max_memory_allocated - memory_allocated before the call"

    def fwd():
        runner.fwd()

    def fwd_bwd():
        runner.bwd(runner.fwd())

    m.times_ms["fwd"] = _do_bench(
        fwd, max(timing.warmup_ms, est_f), max(timing.rep_ms, timing.min_reps * est_f), None
    )
    m.times_ms["fwd_bwd"] = _do_bench(
        fwd_bwd,
        max(timing.warmup_ms, est_f + est_b),
        max(timing.rep_ms, timing.min_reps * (est_f + est_b)),
        grads or None,
    )
    for _ in range(timing.bwd_reps):
        runner.reset()
        out = runner.fwd()
        sync()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        runner.bwd(out)
        e.record()
        sync()
        m.times_ms["bwd"].append(s.elapsed_time(e))
        del out
    return m
