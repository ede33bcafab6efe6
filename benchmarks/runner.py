"""Plans cells (provider x shape, or an e2e step), runs them in workers, post-processes the rows.

Isolation:
- "cell": a fresh worker process per cell. Needed on CPU, where peak memory is a process-wide
  high-water mark; the default there.
- "worker": one worker for all cells (restarted after a crash, the crashed cell recorded as
  failed); the default on GPU, where the allocator measures memory per call and per-cell process
  start-up (CUDA context, Triton JIT cache load) would eat the time budget.
- "none": in this process (tests, debugging).
Skips known without running anything (a missing package, a Triton impl on CPU) are decided here, so
they cost no process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from benchmarks import env, providers
from benchmarks.shapes import Shape


@dataclass
class Plan:
    device: str
    cells: list[dict]
    isolate: str = "cell"  # "cell" | "worker" | "none"
    interpret: bool = False
    budget_s: float | None = None
    cell_timeout_s: float = 900.0
    timing: dict = field(default_factory=dict)


def op_cells(shapes: list[Shape], provider_list: list) -> list[dict]:
    """Shape-major, so a worker builds each shape's inputs once and a budget cut leaves whole shapes."""
    return [{"kind": "op", "provider": p.name, "shape": s.to_dict()} for s in shapes for p in provider_list]


# ---------------------------------------------------------------------------------------------
# Static skips


def static_skip(cell: dict, device: str, interpret: bool, cache: dict) -> str | None:
    key = (cell["kind"], cell["provider"])
    if key in cache:
        return cache[key]
    reason = None
    if cell["kind"] == "op":
        p = providers.get(cell["provider"])
        try:
            reason = p.static_reason(device, interpret)
            if reason is None and not device.startswith("cuda"):
                # CPU probes are cheap and create no CUDA context; a skip found here costs no process.
                reason = p.probe(device, interpret)
        except Exception:  # noqa: BLE001 - let the worker run it and report the failure as a row
            reason = None
    else:
        from benchmarks import e2e

        reason = e2e.E2E_PROVIDERS[cell["provider"]].static_reason(device)
    cache[key] = reason
    return reason


def skip_rows(
    cell: dict, device: str, reason: str, meta: dict, status: str = "skipped", error=None
) -> list[dict]:
    from benchmarks import worker

    if cell["kind"] == "op":
        p = providers.get(cell["provider"])
        return worker.op_rows(
            p,
            Shape.from_dict(cell["shape"]),
            device,
            status,
            meta=meta,
            reason=reason if status == "skipped" else None,
            error=error,
        )
    from benchmarks import e2e

    return e2e.rows_for(
        cell, device, status, meta=meta, reason=reason if status == "skipped" else None, error=error
    )


# ---------------------------------------------------------------------------------------------
# Running


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="cell", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def describe(self, cell: dict):
        if self.bar is not None:
            what = cell["shape"]["id"] if cell["kind"] == "op" else cell["config"]["name"]
            self.bar.set_description_str(f"{cell['provider']} {what}"[:60])

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run(plan: Plan, progress: bool = True) -> list[dict]:
    """All rows of the plan, in cell order. Never raises for a provider's failure."""
    from benchmarks import measure

    meta = env.metadata(plan.device, init_cuda=(plan.isolate == "none"))
    if plan.interpret:
        meta["interpreter"] = True
    deadline = time.time() + plan.budget_s if plan.budget_s else None
    results: dict[int, list[dict]] = {}
    bar = _Progress(len(plan.cells), progress)
    todo = []
    cache: dict = {}
    for i, cell in enumerate(plan.cells):
        reason = static_skip(cell, plan.device, plan.interpret, cache)
        if reason:
            results[i] = skip_rows(cell, plan.device, reason, meta)
            bar.advance()
        else:
            todo.append(i)
    try:
        if plan.isolate == "none":
            measure.PROCESS = "in-process"
            _run_inprocess(plan, todo, results, deadline, bar)
        else:
            groups = [[i] for i in todo] if plan.isolate == "cell" else [todo]
            for group in groups:
                _run_subprocess(plan, group, results, deadline, bar, meta)
    finally:
        bar.close()
    return [r for i in sorted(results) for r in results[i]]


def _run_inprocess(plan, todo, results, deadline, bar):
    from benchmarks import worker

    spec = {"device": plan.device, "interpret": plan.interpret, "deadline": deadline, "timing": plan.timing}
    op = worker.OpCellRunner(spec)
    for i in todo:
        cell = plan.cells[i]
        bar.describe(cell)
        if deadline is not None and time.time() > deadline:
            results[i] = worker.budget_rows(cell, spec, op.meta())
        elif cell["kind"] == "op":
            results[i] = op.run(providers.get(cell["provider"]), Shape.from_dict(cell["shape"]))
        else:
            from benchmarks import e2e

            results[i] = e2e.run_cell(cell, spec, op.meta())
        bar.advance()


def worker_env(interpret: bool) -> dict:
    e = dict(os.environ)
    root = str(env.REPO_ROOT)
    e["PYTHONPATH"] = root + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PYTHONUNBUFFERED"] = "1"
    # Never benchmark through the interpreter by accident (the test suite sets it for itself).
    e.pop("TRITON_INTERPRET", None)
    if interpret:
        e["TRITON_INTERPRET"] = "1"
    return e


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _run_subprocess(plan, group, results, deadline, bar, meta):
    """Run `group` (cell indices) in workers; restart after a crash with the cells not yet started."""
    pending = list(group)
    with tempfile.TemporaryDirectory(prefix="dvsft-bench-") as tmp:
        attempt = 0
        while pending:
            attempt += 1
            spec_path = os.path.join(tmp, f"spec{attempt}.json")
            out_path = os.path.join(tmp, f"out{attempt}.jsonl")
            log_path = os.path.join(tmp, f"log{attempt}.txt")
            spec = {
                "device": plan.device,
                "interpret": plan.interpret,
                "deadline": deadline,
                "timing": plan.timing,
                "cells": [plan.cells[i] for i in pending],
            }
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            open(out_path, "w").close()
            with open(log_path, "w") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.worker", spec_path, out_path],
                    cwd=str(env.REPO_ROOT),
                    env=worker_env(plan.interpret),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
                pending = _follow(proc, plan, pending, results, out_path, log_path, deadline, bar, meta)


def _follow(proc, plan, pending, results, out_path, log_path, deadline, bar, meta):
    """Read the worker's events until it exits; returns the cells it never started."""
    started: dict[int, float] = {}
    rows: dict[int, list[dict]] = {}
    done: set[int] = set()
    pos = 0
    killed_reason = None
    past_deadline = False
    buf = ""
    while True:
        exited = proc.poll() is not None
        with open(out_path) as f:
            f.seek(pos)
            chunk = f.read()
            pos = f.tell()
        buf += chunk
        *lines, buf = buf.split("\n")
        for line in lines:
            if not line.strip():
                continue
            ev = json.loads(line)
            gi = pending[ev["index"]]
            if ev["event"] == "start":
                started[gi] = time.time()
                bar.describe(plan.cells[gi])
            elif ev["event"] == "row":
                rows.setdefault(gi, []).append(ev["row"])
            elif ev["event"] == "done":
                done.add(gi)
                results[gi] = rows.pop(gi, None) or skip_rows(
                    plan.cells[gi],
                    plan.device,
                    None,
                    meta,
                    status="failed",
                    error="the worker produced no rows",
                )
                bar.advance()
        if exited:
            break
        running = [gi for gi in started if gi not in done]
        now = time.time()
        if running and now - started[running[0]] > plan.cell_timeout_s:
            killed_reason = f"timed out after {plan.cell_timeout_s:.0f} s (--cell-timeout)"
        elif deadline is not None and now > deadline + plan.cell_timeout_s:
            killed_reason = "killed: past the time budget (--budget-s) by more than --cell-timeout"
            past_deadline = True
        if killed_reason:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.05)
    rc = proc.returncode
    crashed = [gi for gi in started if gi not in done]
    for gi in crashed:
        err = killed_reason or f"worker exited with code {rc} during this cell"
        tail = _tail(log_path)
        results[gi] = skip_rows(
            plan.cells[gi],
            plan.device,
            None,
            meta,
            status="failed",
            error=err + (f"\n--- worker output (tail) ---\n{tail}" if tail else ""),
        )
        bar.advance()
    not_started = [gi for gi in pending if gi not in started]
    if past_deadline and not_started:
        for gi in not_started:
            results[gi] = skip_rows(plan.cells[gi], plan.device, "not run: " + killed_reason, meta)
            bar.advance()
        return []
    if rc != 0 and not crashed and not_started:
        # Died before starting anything (import error, ...): don't loop forever.
        tail = _tail(log_path)
        for gi in not_started:
            results[gi] = skip_rows(
                plan.cells[gi],
                plan.device,
                None,
                meta,
                status="failed",
                error=f"worker exited with code {rc} before this cell\n{tail}",
            )
            bar.advance()
        return []
    return not_started


# ---------------------------------------------------------------------------------------------
# Post-processing


def derive(rows: list[dict]) -> list[dict]:
    """Add x_floor (time / floor time), speedup_vs (peer time / this time, for this package's rows)
    and, for op rows, loss_rel_diff (against the HF reference loss, else the first loss) per shape and
    mode. (e2e losses differ by design: DVLoss normalises the text and vision streams separately.)"""
    key = lambda r: (r.get("shape"), r.get("dtype"), r.get("D"), r.get("V"), r.get("mode"))
    ok = [r for r in rows if r.get("status") == "ok" and r.get("time_ms")]
    by_key: dict = {}
    for r in ok:
        by_key.setdefault(key(r), {})[r["provider"]] = r
    for r in rows:
        r.setdefault("x_floor", None)
        r.setdefault("speedup_vs", {})
        r.setdefault("loss_rel_diff", None)
        peers = by_key.get(key(r), {})
        if r not in ok:
            continue
        floor = peers.get("floor")
        if floor and r["provider"] != "floor":
            r["x_floor"] = r["time_ms"] / floor["time_ms"]
        if r.get("provider_kind") == "ours":
            r["speedup_vs"] = {
                name: p["time_ms"] / r["time_ms"]
                for name, p in peers.items()
                if p.get("provider_kind") in ("peer", "reference") and name != r["provider"]
            }
        ref = peers.get("hf")
        ref_loss = (
            ref.get("loss")
            if ref
            else next((p.get("loss") for p in peers.values() if p.get("loss") is not None), None)
        )
        if r.get("suite_kind") == "op" and r.get("loss") is not None and ref_loss:
            r["loss_rel_diff"] = abs(r["loss"] - ref_loss) / abs(ref_loss)
    return rows
