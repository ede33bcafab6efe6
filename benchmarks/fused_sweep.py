#!/usr/bin/env python
"""GPU sweep for impl="fused": tile configurations of its kernels, and fused against chunked and
the three-GEMM floor across labeled-row counts (the data behind `impl="auto"`).

    python benchmarks/fused_sweep.py --out results/fused_sweep.json [--budget-s 150] [--quick]

Part 0 (paired): at n = 16384 (D 3584, V 151936), the floor and the implementations timed in
interleaved rounds, so that the ratios to the floor are not skewed by when each ran: on peaked
logits chunked, fused and the staged backward (Triton and cuBLAS gradient GEMMs); on confident
logits chunked, fused and fused with grad_filter (PAIRED).
Part 1 (scaling): for n in {512, 2048, 8192, 16384} all labeled (peaked logits; the largest n
also on confident logits, shapes.py), forward + backward through the public op for
impl="chunked", "fused", "fused" with grad_filter, "fused" deterministic (the staged backward) and
the floor, with peak extra memory.
Part 2 (tiles): at n = 16384, D = 3584, V = 151936, bf16, peaked logits, the kernels alone
(triton.testing.do_bench, median), each checked against the default configuration's results
(relative error) and with the sm_90 resources Triton reports: first what no GPU has timed yet, the
atomic backward's default as the reference, then the staged (deterministic) backward for each
staging budget / GEMM option / tile candidate and the default one with dh only and dW only (its
G kernel runs in both: the split of its time), and the three GEMMs of the floor; then the forward
and atomic backward tile candidates, and the atomic backward with grad_filter.
Rows are appended to the JSON file as they are measured, so a budget cut or a crash
keeps what ran. Cells stop being started after --budget-s seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAMILY = "qwen2.5-vl-7b"
FWD_CANDIDATES = [  # (BM, BV, BK, warps, stages); the first is the default (plain epilogue)
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (256, 128, 64, 8, 3),
]
BWD_CANDIDATES = [  # (BM, BV, BK, BD, warps, stages)
    (128, 128, 64, 64, 8, 3),
    (128, 128, 64, 32, 8, 3),
    (64, 256, 64, 64, 8, 3),
    (256, 64, 64, 64, 8, 3),
]
# staged backward: FusedConfig fields and the gradient GEMMs' tiles (BM, BV, BK, BD, warps, stages);
# the first is the default (64 MiB: 2048-entry chunks at n = 16384)
_ST = (128, 128, 64, 128, 8, 5)
STAGED_CANDIDATES = [
    {"stage_mib": 64, "tiles": _ST},
    {"stage_mib": 256, "tiles": _ST},  # a quarter of the dh read-modify-write passes
    {"stage_mib": 64, "tiles": _ST, "stage_gemm": "torch"},  # cuBLAS gradient GEMMs over G by position
    {"stage_mib": 64, "tiles": _ST, "stage_compact_h": True},  # dW reads slot-ordered h: 5 deep, not 3
    {"stage_mib": 64, "tiles": (128, 128, 64, 128, 8, 7)},  # dW's gathered h pipelined 4 deep
    {"stage_mib": 64, "tiles": (128, 128, 64, 64, 8, 5)},  # twice the programs a chunk, twice the G reads
]
S_MIN_CANDIDATES = (8, 32)
SCALING_ROWS = (512, 2048, 8192, 16384)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting cells after this many seconds")
    ap.add_argument("--quick", action="store_true", help="small shapes and two candidates each (smoke test)")
    ap.add_argument("--parts", default="paired,scaling,tiles", help="comma list of parts to run, in order")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET=1: checks this script, times nothing real")
    return ap.parse_args(argv)


class Sweep:
    def __init__(self, out: str, budget_s: float):
        self.out, self.t0, self.budget = out, time.time(), budget_s
        self.doc = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": []}

    def over(self) -> bool:
        return time.time() - self.t0 > self.budget

    def add(self, row: dict) -> None:
        row["t_s"] = round(time.time() - self.t0, 1)
        self.doc["rows"].append(row)
        print(json.dumps(row), flush=True)
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(tmp, self.out)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


DEVICE = "cuda"
SMALL = None  # (N, D, V) of a smoke run


def _bench(fn) -> float:
    if DEVICE != "cuda":  # smoke run: one call, wall clock
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _floor(inp: dict, shape):
    """The benchmark harness's floor (providers.Floor: the three GEMMs on the labeled rows, into
    preallocated outputs), so the sweep's ratios use the suite's own floor."""
    from benchmarks import providers

    return providers.Floor().prepare(inp, shape, DEVICE)


def _kernel_resources(kernel) -> dict:
    """Registers / spills / shared memory of the most recently compiled specialisation."""
    try:
        cache = kernel.device_caches if hasattr(kernel, "device_caches") else None
        compiled = None
        if cache:
            for dev_cache in cache.values():
                kc = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
                if kc:
                    compiled = list(kc.values())[-1]
        if compiled is None:
            return {}
        return {"regs": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None),
                "shared": compiled.metadata.shared}
    except Exception as e:  # noqa: BLE001 - triton internals differ between versions; the row says so
        return {"resources_error": repr(e)[:200]}


def tiles_part(sw: Sweep, quick: bool) -> None:
    import torch

    from benchmarks import shapes
    from dvsft_kernels.ops.backends.fused import build_index
    from dvsft_kernels.ops.kernels import fused_config
    from dvsft_kernels.ops.kernels import lce_fused_bwd as kb
    from dvsft_kernels.ops.kernels import lce_fused_fwd as kf

    N, D, V = SMALL or ((2048, 512, 32000) if quick else (16384, *shapes.FAMILIES[FAMILY]))
    dtype = "float32" if SMALL else "bfloat16"
    shp = shapes.Shape(FAMILY, N, D, V, 1.0, "peaked", dtype)
    inp = shapes.make_inputs(shp, DEVICE)
    h, w, t = inp["hidden"].detach(), inp["weight"].detach(), inp["targets"]
    idx, count = build_index(t, -100)
    scale = torch.full((N,), 1.0 / N, device=DEVICE)
    base = fused_config.default_config(h.device, h.dtype)
    flop = 2.0 * N * D * V
    fwd_c = FWD_CANDIDATES[:2] if quick else FWD_CANDIDATES
    bwd_c = BWD_CANDIDATES[:2] if quick else BWD_CANDIDATES

    ref = kf.fused_forward(h, w, None, t, idx, count, config=base)
    ref_b = kb.fused_backward(h, w, None, t, idx, count, ref[3], scale, config=base)
    _sync()
    common = {"part": "tiles", "N": N, "D": D, "V": V, "dtype": dtype}

    def bwd_row(kernel, cfg, **kw):
        row = dict(common, kernel=kernel, **{k: v for k, v in kw.items() if k in ("grad_h", "grad_w")})
        try:
            got = kb.fused_backward(h, w, None, t, idx, count, ref[3], scale, config=cfg, **kw)
            _sync()
            for i, key in ((0, "err_dh"), (1, "err_dw")):
                if got[i] is not None:
                    row[key] = _rel(got[i], ref_b[i])
            del got
            row["ms"] = _bench(lambda: kb.fused_backward(h, w, None, t, idx, count, ref[3], scale, config=cfg,
                                                            **kw))
            row["tflops_3gemm"] = 3 * flop / row["ms"] / 1e9
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row

    # What no GPU has measured yet comes first (a short slot still decides the backward default):
    # the atomic backward's default tiles as the reference, the staged candidates, the GEMM floor;
    # then the forward and atomic tile candidates measured before.
    b = base.bwd
    default_bwd = (b.BM, b.BV, b.BK, b.BD, b.num_warps, b.num_stages)
    row = bwd_row("bwd_atomic", base)
    row.update(zip(("BM", "BV", "BK", "BD", "warps", "stages"), default_bwd), **_kernel_resources(kb.lce_bwd_kernel))
    sw.add(row)
    for i, cand in enumerate(STAGED_CANDIDATES[:3] if quick else STAGED_CANDIDATES):
        if sw.over():
            break
        bm, bv, bk, bd, nw, ns = cand["tiles"]
        st = fused_config.Tiles(BM=bm, BV=bv, BK=bk, BD=bd, num_warps=nw, num_stages=ns, GROUP=base.stage.GROUP)
        extra = {k: v for k, v in cand.items() if k.startswith("stage_") and k != "stage_mib"}
        cfg = dataclasses.replace(base, stage=st, stage_bytes=cand["stage_mib"] << 20, backward="staged", **extra)
        row = bwd_row("bwd_staged", cfg, deterministic=True)
        row.update(stage_mib=cand["stage_mib"], BM=bm, BV=bv, BK=bk, BD=bd, warps=nw, stages=ns,
                   VC=cfg.stage_columns(N, V, h.element_size()), **extra)
        row.update(_kernel_resources(kb.lce_stage_dh_kernel))
        sw.add(row)
        if i == 0:  # where its time goes
            for part in ({"grad_w": False}, {"grad_h": False}):
                if not sw.over():
                    sw.add(bwd_row("bwd_staged", cfg, deterministic=True, **part))

    if sw.over():
        return
    # The GEMM floor on the same operands, for the ratios.
    fl = _floor(inp, shp)
    for name, fn in (("gemm_logits", fl.fwd), ("gemm_dh", fl.grad_h), ("gemm_dw", fl.grad_w)):
        ms = _bench(fn)
        sw.add(dict(common, kernel=name, ms=ms, tflops=flop / ms / 1e9))
    fl.close()

    for bm, bv, bk, nw, ns in fwd_c:
        for s_min in (base.s_min,) + (() if (bm, bv, bk, nw, ns) != FWD_CANDIDATES[0] or quick else S_MIN_CANDIDATES):
            if sw.over():
                return
            tl_ = fused_config.Tiles(BM=bm, BV=bv, BK=bk, num_warps=nw, num_stages=ns, GROUP=base.fwd.GROUP)
            cfg = dataclasses.replace(base, fwd=tl_, s_min=s_min)
            row = dict(common, kernel="fwd", BM=bm, BV=bv, BK=bk, warps=nw, stages=ns, s_min=s_min)
            try:
                got = kf.fused_forward(h, w, None, t, idx, count, config=cfg)
                _sync()
                row.update(_kernel_resources(kf.lce_fwd_kernel))
                row["err_loss"] = _rel(got[0], ref[0])
                row["err_lse"] = _rel(got[1], ref[1])
                row["ms"] = _bench(lambda cfg=cfg: kf.fused_forward(h, w, None, t, idx, count, config=cfg))
                row["tflops"] = flop / row["ms"] / 1e9
            except Exception as e:  # noqa: BLE001 - a config that fails to compile or launch is a row
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            sw.add(row)

    for bm, bv, bk, bd, nw, ns in [c for c in bwd_c if c != default_bwd]:  # the default ran first
        if sw.over():
            return
        tl_ = fused_config.Tiles(BM=bm, BV=bv, BK=bk, BD=bd, num_warps=nw, num_stages=ns, GROUP=base.bwd.GROUP)
        row = bwd_row("bwd_atomic", dataclasses.replace(base, bwd=tl_))
        row.update(BM=bm, BV=bv, BK=bk, BD=bd, warps=nw, stages=ns, **_kernel_resources(kb.lce_bwd_kernel))
        sw.add(row)

    if not sw.over():
        sw.add(bwd_row("bwd_atomic_filter", base, grad_filter=True))


def _op_step(h, w, t, impl, **extra):
    """One forward + backward of the public op, the gradients reset first."""
    from dvsft_kernels import linear_cross_entropy

    def step():
        h.grad = w.grad = None
        linear_cross_entropy(h, w, t, impl=impl, **extra).backward()

    return step


def scaling_part(sw: Sweep, quick: bool) -> None:
    import torch

    from benchmarks import shapes

    D, V = SMALL[1:] if SMALL else (512, 32000) if quick else shapes.FAMILIES[FAMILY]
    rows = (SMALL[0],) if SMALL else (256, 2048) if quick else SCALING_ROWS
    dtype = "float32" if SMALL else "bfloat16"
    # the largest n again on confident logits, where grad_filter skips tiles (shapes.py)
    for n, dist in [(n, "peaked") for n in rows] + [(rows[-1], "confident")]:
        if not _scaling_shape(sw, shapes.Shape(FAMILY, n, D, V, 1.0, dist, dtype)):
            return
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def _scaling_shape(sw: Sweep, shp) -> bool:
    """chunked, fused, fused with grad_filter and the floor on one all-labeled shape; False when
    the budget ran out."""
    import torch

    from benchmarks import shapes
    from dvsft_kernels import linear_cross_entropy

    inp = shapes.make_inputs(shp, DEVICE)
    h, w, t = inp["hidden"], inp["weight"], inp["targets"]
    n, D, V = shp.N, shp.D, shp.V
    flop3 = 6.0 * n * D * V
    for name, extra in (("chunked", {}), ("fused", {}), ("fused_filter", {"grad_filter": True}),
                        ("fused_staged", {"deterministic": True})):
        if sw.over():
            return False
        impl = "fused" if name.startswith("fused") else name
        row = {"part": "scaling", "impl": name, "n": n, "D": D, "V": V, "dtype": shp.dtype, "dist": shp.dist}
        step = _op_step(h, w, t, impl, **extra)
        try:
            step()
            _sync()
            h.grad = w.grad = None
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                row["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row["ms"] = _bench(step)
            with torch.no_grad():
                row["fwd_ms"] = _bench(lambda: linear_cross_entropy(h, w, t, impl=impl, **extra))  # noqa: B023
            row["floor_ratio_tflops"] = flop3 / row["ms"] / 1e9
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        sw.add(row)
    fl = _floor(inp, shp)
    ms = _bench(lambda: fl.bwd(fl.fwd()))
    sw.add({"part": "scaling", "impl": "floor", "n": n, "D": D, "V": V, "dist": shp.dist, "ms": ms,
            "floor_ratio_tflops": flop3 / ms / 1e9})
    fl.close()
    return True


# the paired part's variants: (impl, op keyword arguments, FusedConfig fields)
PAIRED_VARIANTS = {
    "chunked": ("chunked", {}, {}),
    "fused": ("fused", {}, {}),
    "fused_filter": ("fused", {"grad_filter": True}, {}),
    "fused_staged": ("fused", {"deterministic": True}, {}),
    "fused_staged_torch_gemm": ("fused", {"deterministic": True}, {"stage_gemm": "torch"}),
}
# per logit distribution, what is timed against the floor: on "peaked" logits the backward designs
# (the 1.4x target); on "confident" ones grad_filter against chunked (the filtering target)
PAIRED = {
    "peaked": ("chunked", "fused", "fused_staged", "fused_staged_torch_gemm"),
    "confident": ("chunked", "fused", "fused_filter"),
}


def _with_config(step, **fields):
    """step with every fused call's default config changed in `fields` (forward and backward)."""
    if not fields:
        return step
    from dvsft_kernels.ops.kernels import fused_config

    def patched():
        real = fused_config.default_config
        fused_config.default_config = lambda dev, dt: dataclasses.replace(real(dev, dt), **fields)
        try:
            step()
        finally:
            fused_config.default_config = real

    return patched


def paired_part(sw: Sweep, quick: bool, rounds: int = 7) -> None:
    """The floor and the implementations at the target shape, interleaved: each round times one
    call of each with CUDA events, so slow drifts (clocks under sustained GEMM load) hit all of
    them alike; ratios are taken within a round, then the median over rounds. One row per logit
    distribution in PAIRED."""
    for dist, names in PAIRED.items():
        if sw.over():
            return
        _paired_dist(sw, quick, rounds, dist, names)


def _paired_dist(sw: Sweep, quick: bool, rounds: int, dist: str, names) -> None:
    import statistics

    import torch

    from benchmarks import shapes

    N, D, V = SMALL or ((2048, 512, 32000) if quick else (16384, *shapes.FAMILIES[FAMILY]))
    dtype = "float32" if SMALL else "bfloat16"
    rounds = 2 if SMALL else rounds  # the interpreter: seconds a call
    shp = shapes.Shape(FAMILY, N, D, V, 1.0, dist, dtype)
    inp = shapes.make_inputs(shp, DEVICE)
    h, w, t = inp["hidden"], inp["weight"], inp["targets"]
    fl = _floor(inp, shp)

    def floor():
        fl.bwd(fl.fwd())

    fns = {"floor": floor}
    for name in names:
        impl, kw, fields = PAIRED_VARIANTS[name]
        fns[name] = _with_config(_op_step(h, w, t, impl, **kw), **fields)
    errors = {}
    for k, f in list(fns.items()):  # compile, allocate; a variant that fails is a note, not the row
        try:
            f()
            f()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            errors[k] = f"{type(e).__name__}: {str(e)[:300]}"
            del fns[k]
    times = {k: [] for k in fns}
    for _ in range(rounds):
        if sw.over():
            break
        for k, f in fns.items():
            _sync()
            if DEVICE == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                f()
                b.record()
                torch.cuda.synchronize()
                times[k].append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t0) * 1e3)
    fl.close()
    n_r = len(times.get("floor", []))
    row = {"part": "paired", "dist": dist, "N": N, "D": D, "V": V, "dtype": dtype, "rounds": n_r,
           "ms": {k: v for k, v in times.items()}}
    if errors:
        row["errors"] = errors
    if n_r:
        row["median_ms"] = {k: statistics.median(v) for k, v in times.items()}
        row["x_floor"] = {k: statistics.median(v[i] / times["floor"][i] for i in range(n_r))
                          for k, v in times.items() if k != "floor"}
    sw.add(row)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    global DEVICE, SMALL
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cpu-smoke: set TRITON_INTERPRET=1 (the kernels run in the interpreter)")
        DEVICE, SMALL = "cpu", (40, 48, 300)
    elif not torch.cuda.is_available():
        print("fused_sweep: no CUDA device; nothing to do")
        return 0
    import triton

    sw = Sweep(args.out, args.budget_s)
    sw.doc.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter smoke run)",
                  torch=torch.__version__, triton=triton.__version__)
    parts = {"paired": paired_part, "scaling": scaling_part, "tiles": tiles_part}
    for part in [parts[p.strip()] for p in args.parts.split(",") if p.strip()]:
        try:
            part(sw, args.quick or args.cpu_smoke)
        except Exception as e:  # noqa: BLE001 - keep the other part's rows
            traceback.print_exc()
            sw.add({"part": part.__name__, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    sw.doc["elapsed_s"] = round(time.time() - sw.t0, 1)
    sw.add({"part": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
