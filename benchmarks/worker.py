"""One measuring subprocess: `python -m benchmarks.worker SPEC.json OUT.jsonl`.

SPEC: {"device", "interpret", "deadline" (epoch s or null), "timing": {"cpu": {...}, "gpu": {...}},
"cells": [{"kind": "op", "provider", "shape": {...}} | {"kind": "e2e", "provider", "config": {...}}]}.

OUT gets one JSON object per line: {"event": "start", "index": i}, then {"event": "row", "row": {...}}
for each mode, then {"event": "done", "index": i}. A provider that raises yields rows with status
"failed" and the error; the worker carries on with the next cell. The parent treats a cell that
started but never finished (a crash, a kill) as failed.
"""

from __future__ import annotations

import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import costs, env, providers
from benchmarks.errors import format_error
from benchmarks.shapes import Shape, make_inputs


class Writer:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)  # noqa: SIM115 - held open for the worker's life

    def emit(self, obj: dict) -> None:
        self.f.write(json.dumps(obj, default=str) + "\n")
        self.f.flush()


def op_rows(
    provider,
    shape: Shape,
    device: str,
    status: str,
    *,
    meta: dict,
    measurement=None,
    reason: str | None = None,
    error: str | None = None,
    extra: dict | None = None,
) -> list[dict]:
    """The three rows (fwd, bwd, fwd_bwd) of one provider x shape."""
    rows = []
    n_proc = shape.n if provider.skips_ignored else shape.N
    for mode in costs.MODES:
        flop = costs.flops(mode, shape.n, shape.D, shape.V)
        nbytes = costs.io_bytes(mode, shape.n, shape.D, shape.V, shape.dtype)
        row = {
            **meta,
            "time": env.now_iso(),
            "suite_kind": "op",
            **provider.describe(),
            "shape": shape.id,
            "group": shape.group,
            "family": shape.family,
            "N": shape.N,
            "D": shape.D,
            "V": shape.V,
            "n": shape.n,
            "fraction": shape.fraction,
            "dist": shape.dist,
            "dtype": shape.dtype,
            "mode": mode,
            "status": status,
            "reason": reason,
            "error": error,
            "rows_processed": n_proc,
            "flops": flop,
            "flops_processed": costs.flops(mode, n_proc, shape.D, shape.V),
            "bytes": nbytes,
            "time_ms": None,
            "time_ms_min": None,
            "time_ms_max": None,
            "reps": 0,
            "timer": None,
            "peak_mem_mb": None,
            "mem_method": None,
            "loss": None,
            "tflops": None,
            "tflops_processed": None,
            "gbps": None,
        }
        if extra:
            row.update(extra)
        if measurement is not None:
            row.update(measurement.summary(mode))
            row["timer"] = measurement.timer
            row["loss"] = measurement.loss
            row["warmup_s"] = measurement.warmup_s
            pb = measurement.peak_bytes.get(mode)
            row["peak_mem_mb"] = None if pb is None else pb / 1e6
            row["mem_method"] = measurement.mem_method if provider.measures_memory else None
            if not provider.measures_memory:
                row["peak_mem_mb"] = None
            row["tflops"] = costs.tflops(flop, row["time_ms"])
            row["tflops_processed"] = costs.tflops(row["flops_processed"], row["time_ms"])
            row["gbps"] = costs.gbps(nbytes, row["time_ms"])
        rows.append(row)
    return rows


class OpCellRunner:
    """Runs op cells, reusing one shape's inputs across consecutive providers."""

    def __init__(self, spec: dict):
        self.device = spec["device"]
        self.interpret = bool(spec.get("interpret"))
        self.timing = spec.get("timing", {})
        self._key, self._inputs = None, None
        self._probed: dict[str, str | None] = {}
        self._meta = None

    def meta(self) -> dict:
        if self._meta is None:
            self._meta = env.metadata(self.device)
            if self.interpret:
                self._meta["interpreter"] = True
        return self._meta

    def inputs(self, shape: Shape) -> dict:
        key = (shape.id, shape.D, shape.V, shape.dtype)
        if key != self._key:
            self._inputs = None
            self._free()
            self._inputs = make_inputs(shape, self.device, seed=0)
            self._key = key
        return self._inputs

    def _free(self):
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def run(self, provider, shape: Shape) -> list[dict]:
        from benchmarks import measure

        meta = self.meta()
        if provider.name not in self._probed:
            try:
                self._probed[provider.name] = provider.probe(self.device, self.interpret)
            except Exception as e:  # noqa: BLE001 - a probe that breaks is a failure, not a skip
                return op_rows(
                    provider, shape, self.device, "failed", meta=meta, error="probe: " + format_error(e)
                )
        reason = self._probed[provider.name]
        if reason:
            return op_rows(provider, shape, self.device, "skipped", meta=meta, reason=reason)
        runner = None
        try:
            inputs = self.inputs(shape)
            runner = provider.prepare(inputs, shape, self.device)
            if self.device.startswith("cuda"):
                m = measure.measure_gpu(
                    runner, measure.GpuTiming(**self.timing.get("gpu", {})), provider.measures_memory
                )
            else:
                m = measure.measure_cpu(
                    runner, measure.CpuTiming(**self.timing.get("cpu", {})), provider.measures_memory
                )
            return op_rows(provider, shape, self.device, "ok", meta=meta, measurement=m)
        except Exception as e:  # noqa: BLE001 - a failing provider is a "failed" row, not a crash
            return op_rows(provider, shape, self.device, "failed", meta=meta, error=format_error(e))
        finally:
            if runner is not None:
                runner.close()
            for t in ("hidden", "weight"):
                if self._inputs is not None and self._inputs[t].grad is not None:
                    self._inputs[t].grad = None
            self._free()


def budget_rows(cell: dict, spec: dict, meta: dict) -> list[dict]:
    reason = "time budget (--budget-s) exhausted before this cell"
    if cell["kind"] == "op":
        p = providers.get(cell["provider"])
        return op_rows(p, Shape.from_dict(cell["shape"]), spec["device"], "skipped", meta=meta, reason=reason)
    from benchmarks import e2e

    return e2e.rows_for(cell, spec["device"], "skipped", meta=meta, reason=reason)


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    with open(argv[0]) as f:
        spec = json.load(f)
    out = Writer(argv[1])
    op = OpCellRunner(spec)
    deadline = spec.get("deadline")
    for i, cell in enumerate(spec["cells"]):
        out.emit({"event": "start", "index": i, "t": time.time()})
        if deadline is not None and time.time() > deadline:
            rows = budget_rows(cell, spec, op.meta())
        elif cell["kind"] == "op":
            rows = op.run(providers.get(cell["provider"]), Shape.from_dict(cell["shape"]))
        else:
            from benchmarks import e2e

            rows = e2e.run_cell(cell, spec, op.meta())
            op._free()  # the model and optimizer state are gone; give their memory back
        for r in rows:
            out.emit({"event": "row", "index": i, "row": r})
        out.emit({"event": "done", "index": i, "t": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
