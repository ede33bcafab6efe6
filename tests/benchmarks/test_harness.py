"""The benchmark harness (benchmarks/): rows for every provider, cost models, outputs, failure
reporting, and the subprocess VmHWM memory meter. CPU, tiny sizes; no timing assertions."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import costs, e2e, fused_sweep, providers, report, runner, shapes, worker
from tests.import_graph import import_cycles

TIMING = {"cpu": {"warmup": 1, "min_reps": 1, "max_reps": 1, "min_time_s": 0.0}}
TINY = shapes.Shape("tiny-test", 48, 24, 263, 0.5)


def plan(cells, isolate="none", **kw):
    return runner.Plan(device="cpu", cells=cells, isolate=isolate, timing=TIMING, **kw)


def rows_of(rows, provider):
    return [r for r in rows if r["provider"] == provider]


def _op_importable() -> bool:
    try:
        from dvsft_kernels import linear_cross_entropy  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not importable"
        return False
    return True


def expected_on_cpu() -> set[str]:
    """Providers that must measure successfully on this CPU machine."""
    names = {"hf", "floor"}
    if _op_importable():
        names.add("dvsft_torch")
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        names.add("torch_lce")
    if importlib.util.find_spec("cut_cross_entropy") and (shutil.which("g++") or shutil.which("c++")):
        names.add("cce")
    return names


@pytest.fixture(scope="module")
def all_rows():
    cells = runner.op_cells([TINY], providers.select(None))
    return runner.derive(runner.run(plan(cells), progress=False))


def test_every_provider_produces_rows(all_rows):
    for name in providers.default_names():
        rs = rows_of(all_rows, name)
        assert sorted(r["mode"] for r in rs) == ["bwd", "fwd", "fwd_bwd"], name
        for r in rs:
            assert r["status"] in ("ok", "skipped", "failed")
            if r["status"] == "skipped":
                assert r["reason"], name
            for k in ("device_name", "torch", "triton", "transformers", "git_sha", "time"):
                assert k in r, (name, k)
    for name in expected_on_cpu():
        for r in rows_of(all_rows, name):
            assert r["status"] == "ok", (name, r["error"], r["reason"])
            assert r["time_ms"] > 0 and r["reps"] >= 1
    # Triton-only providers say why they do not run on CPU.
    for name in ("dvsft_chunked", "dvsft_fused", "dvsft_fused_filter", "dvsft_fused_det", "liger"):
        assert all(r["status"] == "skipped" for r in rows_of(all_rows, name)), name


def test_providers_agree_on_the_loss(all_rows):
    losses = {
        r["provider"]: r["loss"]
        for r in all_rows
        if r["status"] == "ok" and r["mode"] == "fwd_bwd" and r["loss"] is not None
    }
    assert "hf" in losses and len(losses) >= 2
    for name, loss in losses.items():
        assert loss == pytest.approx(losses["hf"], rel=1e-4), name


def test_derived_columns(all_rows):
    hf = next(r for r in all_rows if r["provider"] == "hf" and r["mode"] == "fwd_bwd")
    floor = next(r for r in all_rows if r["provider"] == "floor" and r["mode"] == "fwd_bwd")
    assert hf["x_floor"] == pytest.approx(hf["time_ms"] / floor["time_ms"])
    assert hf["rows_processed"] == TINY.N and floor["rows_processed"] == TINY.n
    assert floor["peak_mem_mb"] is None  # preallocated outputs: a time-only reference
    assert hf["peak_mem_mb"] is not None and hf["mem_method"].startswith("VmHWM")
    ours = [r for r in all_rows if r["provider"] == "dvsft_torch" and r["status"] == "ok"]
    for r in ours:
        assert r["speedup_vs"]["hf"] == pytest.approx(
            next(h for h in all_rows if h["provider"] == "hf" and h["mode"] == r["mode"])["time_ms"]
            / r["time_ms"]
        )


def test_flop_and_byte_models_by_hand():
    s = shapes.Shape("issue2", 4096, 512, 32000, 0.1)
    assert s.n == 410  # round(409.6)
    assert costs.flops("fwd", 410, 512, 32000) == 2 * 410 * 512 * 32000 == 13_434_880_000
    assert costs.flops("bwd", 410, 512, 32000) == 26_869_760_000
    assert costs.flops("fwd_bwd", 410, 512, 32000) == 40_304_640_000
    # fp32: h at 410 labeled rows + W = 4 * 512 * (410 + 32000) bytes read; fwd+bwd also writes dh, dW.
    assert costs.io_bytes("fwd", 410, 512, 32000, "float32") == 66_375_680
    assert costs.io_bytes("fwd_bwd", 410, 512, 32000, "float32") == 132_751_360
    assert costs.io_bytes("fwd_bwd", 410, 512, 32000, "bfloat16") == 66_375_680
    assert costs.tflops(40_304_640_000, 100.0) == pytest.approx(0.4030464)
    assert costs.gbps(132_751_360, 100.0) == pytest.approx(1.3275136)

    # Rows built from a measurement use the same models; N rows of work for a provider that keeps them.
    from benchmarks.measure import Measurement

    m = Measurement()
    m.times_ms = {"fwd": [40.0], "bwd": [60.0], "fwd_bwd": [100.0]}
    rows = {
        r["mode"]: r
        for r in worker.op_rows(providers.PROVIDERS["hf"], s, "cpu", "ok", meta={}, measurement=m)
    }
    assert rows["fwd_bwd"]["flops"] == 40_304_640_000
    assert rows["fwd_bwd"]["tflops"] == pytest.approx(0.4030464)
    assert rows["fwd_bwd"]["rows_processed"] == 4096
    assert rows["fwd_bwd"]["flops_processed"] == 6 * 4096 * 512 * 32000
    assert rows["fwd"]["tflops"] == pytest.approx(13_434_880_000 / 0.040 / 1e12)


def _markdown_tables(text: str) -> list[list[list[str]]]:
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def test_outputs_parse_and_plots_are_written(all_rows, tmp_path):
    paths = report.write_all(all_rows, str(tmp_path), "cpu", {"suite": "cpu", "command": "test"})
    data = json.loads(Path(paths["json"]).read_text())
    assert len(data["rows"]) == len(all_rows) and data["suite"] == "cpu"
    assert data["meta"]["torch"] == torch.__version__
    md = Path(paths["markdown"]).read_text()
    tables = _markdown_tables(md)
    assert tables, md
    for t in tables:
        assert all(len(row) == len(t[0]) for row in t), t
        assert set(t[1]) == {"---"}
    first = tables[0]
    assert first[0][:3] == ["provider", "rows", "fwd ms"]
    ran = {r["provider"] for r in all_rows if r["status"] == "ok"}
    assert {row[0].strip("`") for row in first[2:]} == ran
    assert "## Skipped and failed" in md and "dvsft_chunked" in md
    names = sorted(os.path.basename(p) for p in paths["plots"])
    assert names == ["cpu-memory.png", "cpu-time-vs-fraction.png"]
    for p in paths["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.console(all_rows).count("tiny-test/") == 1


def test_raising_provider_is_reported_failed_in_process():
    rows = runner.run(plan(runner.op_cells([TINY], [providers.PROVIDERS["_test_raise"]])), progress=False)
    assert len(rows) == 3
    for r in rows:
        assert r["status"] == "failed" and "deliberate failure" in r["error"]


def test_subprocess_memory_failures_and_crashes():
    """In a worker process: a raising provider is a failed row; a provider that kills the process is
    a failed row and the worker restarts for the next cell, a fresh process in which a 200 MB
    allocation shows in VmHWM."""
    cells = runner.op_cells(
        [shapes.Shape("tiny-test", 8, 8, 16, 1.0)],
        [providers.PROVIDERS[n] for n in ("_test_raise", "_test_crash", "_test_alloc200")],
    )
    rows = runner.run(plan(cells, isolate="worker"), progress=False)
    raised, crash, alloc = (rows_of(rows, n) for n in ("_test_raise", "_test_crash", "_test_alloc200"))
    assert [r["status"] for r in raised] == ["failed"] * 3 and "deliberate failure" in raised[0]["error"]
    assert [r["status"] for r in crash] == ["failed"] * 3
    assert "exited with code 3" in crash[0]["error"]
    assert all(r["status"] == "ok" for r in alloc), alloc[0]["error"]
    peaks = {r["mode"]: r["peak_mem_mb"] for r in alloc}
    assert peaks["fwd"] >= 190, peaks
    assert peaks["fwd_bwd"] >= 190 and peaks["bwd"] >= 190  # kept alive from forward into backward
    assert peaks["fwd"] < 400, peaks  # the parent's size does not leak in
    assert "subprocess" in alloc[0]["mem_method"]


@pytest.mark.skipif(not _op_importable(), reason="dvsft_kernels op not importable")
def test_chunk_sweep_provider_passes_chunk_rows_from_the_budget(monkeypatch):
    import dvsft_kernels

    seen = []
    real = dvsft_kernels.linear_cross_entropy
    monkeypatch.setattr(dvsft_kernels, "linear_cross_entropy", lambda *a, **k: seen.append(k.get("chunk_rows")) or real(*a, **k))
    p = providers.get("dvsft_torch@0.25MB")
    assert p is providers.get("dvsft_torch@0.25MB") and p.kind == "sweep"
    assert [q.name for q in providers.select(["dvsft_torch@0.25MB"])] == ["dvsft_torch@0.25MB"]
    rows = runner.run(plan(runner.op_cells([TINY], [p])), progress=False)
    assert all(r["status"] == "ok" for r in rows), rows[0]["error"]
    V = TINY.V
    # the probe call passes no chunk_rows; every measured call passes the budget's
    assert set(seen) - {None} == {max(1, 2**18 // (4 * V))}
    # the Triton impl's sweep (GPU): same budget constant, its own impl
    q = providers.get("dvsft_chunked@2048MB")
    assert q.impl == "chunked" and q.mb == 2048 and q.name == "dvsft_chunked@2048MB"


def test_budget_exhausted_cells_are_skipped_rows():
    cells = runner.op_cells([TINY], [providers.PROVIDERS["floor"]])
    p = plan(cells)
    p.budget_s = -1.0  # already past the deadline
    rows = runner.run(p, progress=False)
    assert {r["status"] for r in rows} == {"skipped"} and "budget" in rows[0]["reason"]


def test_inputs_are_peaked_and_deterministic():
    s = shapes.Shape("tiny-test", 256, 64, 2000, 0.5)
    a, b = shapes.make_inputs(s), shapes.make_inputs(s)
    assert torch.equal(a["hidden"], b["hidden"]) and torch.equal(a["targets"], b["targets"])
    t = a["targets"]
    assert int((t != -100).sum()) == s.n == 128
    z = a["hidden"].detach()[t != -100] @ a["weight"].detach().T
    p = torch.softmax(z, 1).gather(1, t[t != -100][:, None])
    assert 0.2 < float(p.mean()) < 0.7  # a trained model's spread, not uniform (1/2000)
    u = shapes.make_inputs(shapes.Shape("tiny-test", 256, 64, 2000, 0.5, "uniform"))
    zu = u["hidden"].detach() @ u["weight"].detach().T
    assert float(torch.softmax(zu, 1).max()) < 2e-3
    # confident: the target nearly certain; the rest mostly on one distractor, the bulk under 2^-8
    # (a real hidden size: at D = 64 moving h towards w_t spreads the other logits too)
    c = shapes.make_inputs(shapes.Shape("tiny-test", 256, 2048, 2000, 0.5, "confident"))
    tc = c["targets"]
    pc = torch.softmax(c["hidden"].detach()[tc != -100] @ c["weight"].detach().T, 1)
    pt = pc.gather(1, tc[tc != -100][:, None]).squeeze(1)
    assert float(pt.median()) > 0.99
    bulk = 1 - pt - pc.scatter(1, tc[tc != -100][:, None], 0.0).max(1).values  # neither target nor top other
    assert float(bulk.quantile(0.9)) < 2**-8


def test_suites_and_filters():
    cpu = shapes.suite_shapes("cpu", "cpu")
    assert {(s.N, s.D, s.V, s.fraction) for s in cpu} >= {(4096, 512, 32000, 1.0), (4096, 512, 32000, 0.1)}
    assert any(s.dist == "uniform" for s in cpu) and all(s.dtype == "float32" for s in cpu)
    gpu = shapes.suite_shapes("gpu", "cuda")
    assert {(s.D, s.V) for s in gpu} == {(2048, 151936), (3584, 151936), (4096, 128256), (2560, 262144)}
    assert {s.N for s in gpu} == {4096, 16384} and {s.fraction for s in gpu} == {0.1, 0.3, 0.6, 1.0}
    assert all(s.dtype == "bfloat16" for s in gpu) and sum(s.dist == "uniform" for s in gpu) == 1
    assert sum(s.dist == "confident" for s in gpu) == 1
    sel = shapes.select(gpu, ["qwen2.5-vl-7b"], [0.5])
    assert {s.id for s in sel} == {
        "qwen2.5-vl-7b/N4096/f0.5/peaked",
        "qwen2.5-vl-7b/N16384/f0.5/peaked",
        "qwen2.5-vl-7b/N16384/f0.5/confident",
        "qwen2.5-vl-7b/N16384/f0.5/uniform",
    }
    assert [s.id for s in shapes.select(cpu, ["100x64x1000"])] == ["custom-64x1000/N100/f1/peaked"]
    assert [p.name for p in providers.select(["dvsft_*"])] == [
        "dvsft_torch", "dvsft_chunked", "dvsft_fused", "dvsft_fused_filter", "dvsft_fused_det"]


def test_cli_writes_results(tmp_path, capsys):
    from benchmarks import run

    rc = run.main(
        [
            "--providers",
            "hf,floor",
            "--shapes",
            "40x16x300",
            "--fractions",
            "0.25,1",
            "--isolate",
            "none",
            "--no-progress",
            "--quick",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "custom-16x300/N40/f0.25/peaked" in out and "12 rows (12 ok" in out
    data = json.loads((tmp_path / "cpu-quick-filtered.json").read_text())
    assert {r["fraction"] for r in data["rows"]} == {0.25, 1.0}
    assert (tmp_path / "cpu-quick-filtered.md").exists()
    assert (tmp_path / "cpu-quick-filtered-time-vs-fraction.png").exists()


def test_e2e_step_rows():
    rows = runner.run(plan(e2e.cells("quick")), progress=False)
    hf, ours = rows_of(rows, "e2e_hf"), rows_of(rows, "e2e_dvsft")
    assert hf[0]["status"] == "ok", hf[0]["error"]
    assert hf[0]["tokens_per_s"] > 0 and hf[0]["tokens"] == 160 and hf[0]["peak_mem_mb"] is not None
    assert len(ours) == 1
    if ours[0]["status"] == "skipped":
        assert "attach" in ours[0]["reason"] or "not importable" in ours[0]["reason"]
    else:
        assert ours[0]["status"] == "ok", ours[0]["error"]


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 from conftest"
)
def test_triton_providers_glue_under_the_interpreter():
    """--interpret runs the GPU-only providers' call code on CPU (no timing meaning)."""
    s = shapes.Shape("tiny-test", 16, 16, 67, 0.5)
    names = ["liger"] + (["dvsft_chunked"] if _op_importable() else [])
    rows = runner.run(
        plan(runner.op_cells([s], [providers.PROVIDERS[n] for n in names]), interpret=True), progress=False
    )
    for r in rows:
        assert r["status"] == "ok", (r["provider"], r["error"], r["reason"])
        assert r["interpreter"] is True


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_fails_soft_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the script would run the GPU suite")
    res = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "res")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"no CUDA", res.stdout + res.stderr)
    status = json.loads((tmp_path / "res" / "gpu_check.json").read_text())
    assert status["status"] == "skipped" and "CUDA" in status["reason"]


def test_gpu_timer_control_flow_with_fake_cuda(monkeypatch):
    """measure_gpu's logic, on CPU: CUDA events, sync, allocator stats and do_bench replaced by
    host stand-ins. (The real thing runs in gpu_check.sh.)"""
    import time as _time

    import triton.testing

    from benchmarks import measure

    class FakeEvent:
        def __init__(self, enable_timing=True):
            self.t = None

        def record(self):
            self.t = _time.perf_counter()

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    calls = {"bench": []}
    alloc = {"now": 1000, "peak": 1000}

    def fake_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        calls["bench"].append((warmup, rep, grad_to_none is not None, return_mode))
        out = []
        for _ in range(3):
            for x in grad_to_none or []:
                x.grad = None
            t0 = _time.perf_counter()
            fn()
            out.append((_time.perf_counter() - t0) * 1e3)
        return out if return_mode == "all" else sorted(out)[1]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda *a, **k: alloc.update(peak=alloc["now"])
    )
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: alloc["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: alloc["peak"] + 5000)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)

    shape = shapes.Shape("tiny-test", 32, 16, 101, 0.5)
    runner_ = providers.PROVIDERS["hf"].prepare(shapes.make_inputs(shape), shape, "cpu")
    m = measure.measure_gpu(runner_, measure.GpuTiming(bwd_reps=2))
    assert len(m.times_ms["fwd"]) == 3 and len(m.times_ms["fwd_bwd"]) == 3 and len(m.times_ms["bwd"]) == 2
    assert [c[2] for c in calls["bench"]] == [False, True]  # grads cleared for fwd+bwd only
    assert all(c[3] == "all" for c in calls["bench"])
    assert m.peak_bytes == {"fwd": 5000, "bwd": 5000, "fwd_bwd": 5000}
    assert m.loss is not None and "do_bench" in m.timer
    rows = worker.op_rows(providers.PROVIDERS["hf"], shape, "cuda", "ok", meta={}, measurement=m)
    assert all(r["time_ms"] > 0 and r["peak_mem_mb"] == 0.005 for r in rows)

    floor = providers.PROVIDERS["floor"].prepare(shapes.make_inputs(shape), shape, "cpu")
    mf = measure.measure_gpu(floor, measure.GpuTiming(bwd_reps=1), measure_memory=False)
    assert mf.peak_bytes["fwd"] is None and len(mf.times_ms["bwd"]) == 1


def test_fused_sweep_smoke_under_the_interpreter(tmp_path):
    """benchmarks/fused_sweep.py end to end on tiny shapes (--cpu-smoke): every cell runs, each
    candidate tile configuration agrees with the default one, both distributions appear."""
    out = tmp_path / "sweep.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "fused_sweep.py"), "--cpu-smoke", "--out", str(out)],
                   check=True, env=env, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if "error" in r]
    scaling = [r for r in rows if r["part"] == "scaling"]
    assert {(r["impl"], r["dist"]) for r in scaling} >= {("chunked", "peaked"), ("fused_filter", "confident"),
                                                        ("fused_staged", "peaked"), ("floor", "confident")}
    tiles = [r for r in rows if r["part"] == "tiles" and r["kernel"] in ("fwd", "bwd_atomic", "bwd_staged")]
    assert len(tiles) >= 8 and sum(r["kernel"] == "bwd_staged" for r in tiles) >= 4
    for r in tiles:
        errs = [v for k, v in r.items() if k.startswith("err_")]
        assert errs and max(errs) < 1e-5, r
    paired = {r["dist"]: r for r in rows if r["part"] == "paired"}
    assert set(paired) == {"peaked", "confident"}
    for dist, row in paired.items():
        assert row["rounds"] >= 1 and "errors" not in row, row
        assert set(row["x_floor"]) == set(fused_sweep.PAIRED[dist]) >= {"chunked", "fused"}
    assert {"fused_staged_torch_gemm", "fused_staged"} <= set(paired["peaked"]["x_floor"])
    assert "fused_filter" in paired["confident"]["x_floor"]
    # the tiles part runs what no GPU has measured first: the atomic reference, then the staged rows
    order = [r["kernel"] for r in rows if r["part"] == "tiles"]
    assert order[0] == "bwd_atomic" and order[1] == "bwd_staged" and order.index("fwd") > order.index("gemm_dw")
    assert rows[-1]["part"] == "done"


def test_benchmarks_modules_import_no_cycle():
    # e2e and worker share the failed-row formatter through errors.py instead of importing each other
    assert import_cycles(REPO / "benchmarks", "benchmarks") == []


def test_failing_e2e_cell_is_a_failed_row(monkeypatch):
    """An e2e cell whose step raises is a `failed` row carrying the formatted error (in process)."""

    def boom(*a, **k):
        raise RuntimeError("deliberate e2e failure")

    monkeypatch.setattr(e2e, "measure_step", boom)
    cell = e2e.cells("quick", ["e2e_hf"])[0]
    (row,) = e2e.run_cell(cell, {"device": "cpu"}, {})
    assert row["status"] == "failed"
    err = row["error"]
    assert err.startswith("RuntimeError: deliberate e2e failure\n") and "in boom" in err  # the traceback's tail


@pytest.mark.skipif(not _op_importable(), reason="dvsft_kernels op not importable")
def test_soft_provider_passes_k_targets_and_weights(monkeypatch):
    import dvsft_kernels

    seen = []
    real = dvsft_kernels.linear_cross_entropy

    def spy(h, w, t, *a, **k):
        seen.append((tuple(t.shape), k.get("target_weights")))
        return real(h, w, t, *a, **k)

    monkeypatch.setattr(dvsft_kernels, "linear_cross_entropy", spy)
    p = providers.get("dvsft_torch+k4")
    assert p is providers.get("dvsft_torch+k4") and p.K == 4 and p.kind == "sweep"
    rows = runner.run(plan(runner.op_cells([TINY], [p])), progress=False)
    assert all(r["status"] == "ok" for r in rows), rows[0]["error"]
    measured = [(shape, tw) for shape, tw in seen if tw is not None]
    assert measured and all(shape[-1] == 4 for shape, _ in measured)
    tw = measured[0][1]
    # slot 0 (the shape's target) carries half the weight, the other three share the rest
    assert torch.allclose(tw[..., 0], torch.tensor(0.5)) and torch.allclose(tw.sum(-1), torch.tensor(1.0))
    with pytest.raises(KeyError):
        providers.get("dvsft_torch+k0")


def test_soft_cost_script_times_every_arm(capsys):
    """benchmarks/soft_cost.py at a tiny size: one table row per (N, fraction), every arm timed."""
    from benchmarks import soft_cost

    soft_cost.main(["--n", "16", "--d", "8", "--v", "50", "--repeats", "1", "--ks", "1", "16", "--fractions", "1", "0.5"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 16 |")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert len(cells) == 7 and all(float(c) > 0 for c in cells[2:])  # hard, K=1, K=16, two ratios
