#!/usr/bin/env python
"""Throughput and memory of dvsft-kernels' linear cross-entropy against its peers.

    python benchmarks/run.py                       # CPU default suite (GPU suite when CUDA is present)
    python benchmarks/run.py --suite gpu           # full grid of real model shapes + e2e step
    python benchmarks/run.py --suite e2e           # training-step throughput only
    python benchmarks/run.py --quick               # smoke test, tiny shapes
    python benchmarks/run.py --providers dvsft_torch,hf,floor --shapes issue2 --fractions 0.1,1
    python benchmarks/run.py --list                # what would run, and why anything would skip

Writes <suite>.json, <suite>.md and PNG plots under benchmarks/results/<date>-<device>/ (or --out).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import env, providers, report, runner, shapes


def _csv(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--suite",
        choices=["cpu", "gpu", "e2e", "quick"],
        default=None,
        help="default: gpu when CUDA is present, else cpu",
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test)")
    ap.add_argument("--providers", help="comma list of names or patterns (dvsft_*); default: all")
    ap.add_argument(
        "--shapes",
        help="comma list: family (issue2, qwen2.5-vl-7b, ...), id pattern "
        "('*N4096*'), or NxDxV for a custom shape",
    )
    ap.add_argument("--fractions", help="comma list of labeled fractions; sets them for every shape group")
    ap.add_argument("--chunk-mb", help="add impl='torch' runs with these logits-chunk budgets (MB): a sweep")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="override the suite's dtype")
    ap.add_argument("--out", help="output directory (default benchmarks/results/<date>-<device>/)")
    ap.add_argument(
        "--isolate",
        choices=["cell", "worker", "none"],
        help="process per cell (CPU default: needed for VmHWM), one worker (GPU default), or none",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting cells after this many seconds; the rest are 'skipped' rows",
    )
    ap.add_argument("--cell-timeout", type=float, default=None, help="kill a cell after this many seconds")
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="CPU: timed repeats, at least (default 3, fewer for calls over 4 s)",
    )
    ap.add_argument("--no-e2e", action="store_true", help="gpu suite without the e2e step")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--interpret",
        action="store_true",
        help="CPU only: run Triton providers under TRITON_INTERPRET=1 (glue check; times are meaningless)",
    )
    ap.add_argument(
        "--list", action="store_true", help="print the plan and the static skip reasons, run nothing"
    )
    return ap.parse_args(argv)


def build_plan(args) -> tuple[runner.Plan, str]:
    device = args.device or env.default_device()
    if device == "cuda" and not env.cuda_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.interpret and device != "cpu":
        raise SystemExit("--interpret is for CPU runs")
    suite = args.suite or ("gpu" if device == "cuda" else "cpu")
    quick = args.quick or suite == "quick"
    if suite == "gpu" and device == "cpu" and not (quick or args.shapes or args.list):
        raise SystemExit(
            "--suite gpu on CPU means real LM heads at N=16384 in float32: hours. "
            "Add --quick, or pick shapes with --shapes."
        )
    from benchmarks import e2e

    names = _csv(args.providers)
    e2e_names = [n for n in names or [] if n in e2e.E2E_PROVIDERS]
    op_names = [n for n in names or [] if n not in e2e.E2E_PROVIDERS]
    prov = providers.select(op_names) if op_names else ([] if names else providers.select(None))
    for mb in _csv(args.chunk_mb) or []:
        prov.append(providers.get(f"dvsft_torch@{float(mb):g}MB"))
    e2e_names = e2e_names if e2e_names or names else list(e2e.E2E_PROVIDERS)

    cells: list[dict] = []
    if suite == "e2e" or (suite == "gpu" and not args.no_e2e):
        # First: a short, high-value cell that a time budget should not cut.
        key = "quick" if quick else ("gpu" if device == "cuda" else "cpu")
        cells += e2e.cells(key, e2e_names) if e2e_names else []
    if suite != "e2e":
        shp = shapes.suite_shapes("quick" if quick else ("gpu" if suite == "gpu" else "cpu"), device)
        shp = shapes.select(
            shp, _csv(args.shapes), [float(x) for x in _csv(args.fractions) or []] or None, args.dtype
        )
        cells += runner.op_cells(shp, prov)

    timing = {}
    if device == "cpu":
        cpu = {"warmup": 1, "min_reps": 3, "max_reps": 10, "min_time_s": 1.0, "max_time_s": 12.0}
        if quick:
            cpu.update(min_reps=2, max_reps=3, min_time_s=0.1, max_time_s=2.0)
        if args.reps:
            cpu.update(min_reps=args.reps, max_reps=max(cpu["max_reps"], args.reps), max_time_s=float("inf"))
        timing["cpu"] = cpu
    else:
        timing["gpu"] = (
            {"warmup_ms": 5.0, "rep_ms": 20.0, "min_reps": 3, "bwd_reps": 3}
            if quick
            else {"warmup_ms": 10.0, "rep_ms": 50.0, "min_reps": 3, "bwd_reps": 3}
        )
    isolate = args.isolate or ("worker" if device == "cuda" else "cell")
    plan = runner.Plan(
        device=device,
        cells=cells,
        isolate=isolate,
        interpret=args.interpret,
        budget_s=args.budget_s,
        cell_timeout_s=args.cell_timeout or (900.0 if device == "cpu" else 240.0),
        timing=timing,
    )
    # Output file prefix: a smoke, interpreter or filtered run never overwrites a full suite's files.
    prefix = (
        suite + ("-quick" if quick and suite != "quick" else "") + ("-interpret" if args.interpret else "")
    )
    if any((args.providers, args.shapes, args.fractions, args.dtype, args.chunk_mb)):
        prefix += "-filtered"
    return plan, prefix


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:  # before anything imports triton (the parent probes providers in-process)
        os.environ["TRITON_INTERPRET"] = "1"
    plan, suite = build_plan(args)
    if args.list:
        cache: dict = {}
        print(f"device {plan.device}, suite {suite}, {len(plan.cells)} cells, isolate={plan.isolate}")
        seen = set()
        for c in plan.cells:
            if c["provider"] not in seen:
                seen.add(c["provider"])
                why = runner.static_skip(c, plan.device, plan.interpret, cache)
                print(f"  {c['provider']:<14} {'skip: ' + why if why else 'runs'}")
        for sid in dict.fromkeys(
            c["shape"]["id"] if c["kind"] == "op" else "e2e/" + c["config"]["name"] for c in plan.cells
        ):
            print(f"  shape {sid}")
        return 0
    started = env.now_iso()
    t0 = time.time()
    rows = runner.derive(runner.run(plan, progress=not args.no_progress))
    elapsed = time.time() - t0
    if args.out:
        out_dir = args.out
    else:
        name = next((r.get("device_name") for r in rows if r.get("device_name")), None)
        out_dir = os.path.join(
            env.REPO_ROOT,
            "benchmarks",
            "results",
            f"{datetime.date.today().isoformat()}-{env.device_slug(plan.device, name)}",
        )
    header = {
        "suite": suite,
        "started": started,
        "elapsed_s": round(elapsed, 1),
        "command": "python benchmarks/run.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "device_arg": plan.device,
        "isolate": plan.isolate,
        "timing": plan.timing,
    }
    paths = report.write_all(rows, out_dir, suite, header, make_plots=not args.no_plots)
    print(report.console(rows))
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "skipped", "failed")}
    print(
        f"\n{len(rows)} rows ({counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed) "
        f"in {elapsed:.0f} s"
    )
    print(
        f"wrote {paths['json']}\n      {paths['markdown']}" + "".join(f"\n      {p}" for p in paths["plots"])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
