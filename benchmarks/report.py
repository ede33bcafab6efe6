"""Outputs: JSON (every row), Markdown tables, PNG plots, and the console table."""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict

MODE_LABEL = {"fwd": "fwd", "bwd": "bwd", "fwd_bwd": "fwd+bwd"}
COMMON = (
    "device",
    "device_name",
    "python",
    "git_sha",
    "torch",
    "triton",
    "transformers",
    "liger_kernel",
    "cut_cross_entropy",
    "dvsft_kernels",
    "interpreter",
)


def common_meta(rows: list[dict]) -> dict:
    """Fields shared by the rows; a field with several values (HEAD moved during a run, say) is
    shown as 'a / b'."""
    meta = {}
    for k in COMMON:
        vals = list(OrderedDict.fromkeys(r.get(k) for r in rows if k in r))
        if len(vals) == 1:
            meta[k] = vals[0]
        elif vals:
            meta[k] = " / ".join(str(v) for v in vals)
    return meta


def write_json(path: str, rows: list[dict], header: dict) -> None:
    with open(path, "w") as f:
        json.dump({**header, "meta": common_meta(rows), "rows": rows}, f, indent=1, default=str)


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Markdown


def _f(x, fmt="{:.1f}", none="–"):
    return none if x is None else fmt.format(x)


def _ms(x):
    if x is None:
        return "–"
    return f"{x:.3g}" if x < 10 else f"{x:.0f}" if x >= 1000 else f"{x:.1f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return out


def _index(rows):
    """shape -> provider -> mode -> row (op rows), in first-seen order."""
    idx: OrderedDict[str, OrderedDict[str, dict]] = OrderedDict()
    for r in rows:
        if r.get("suite_kind") != "op":
            continue
        idx.setdefault(r["shape"], OrderedDict()).setdefault(r["provider"], {})[r["mode"]] = r
    return idx


def op_tables(rows: list[dict]) -> list[str]:
    lines = []
    for shape, provs in _index(rows).items():
        any_row = next(iter(next(iter(provs.values())).values()))
        lines += [
            "",
            f"### {shape}",
            "",
            (
                f"N={any_row['N']}, D={any_row['D']}, V={any_row['V']}, labeled n={any_row['n']}, "
                f"{any_row['dtype']}"
            ),
            "",
        ]
        body = []
        for name, modes in provs.items():
            fb = modes.get("fwd_bwd", {})
            if fb.get("status") != "ok":
                continue
            body.append(
                [
                    f"`{name}`",
                    fb["rows_processed"],
                    _ms(modes.get("fwd", {}).get("time_ms")),
                    _ms(modes.get("bwd", {}).get("time_ms")),
                    _ms(fb.get("time_ms")),
                    _f(fb.get("x_floor"), "{:.2f}x"),
                    _f(fb.get("tflops"), "{:.3g}"),
                    _f(fb.get("gbps"), "{:.3g}"),
                    _f(fb.get("peak_mem_mb"), "{:.0f}"),
                    _f(fb.get("loss"), "{:.4f}"),
                ]
            )
        if body:
            lines += _table(
                [
                    "provider",
                    "rows",
                    "fwd ms",
                    "bwd ms",
                    "fwd+bwd ms",
                    "x floor",
                    "TFLOP/s",
                    "GB/s",
                    "peak MB",
                    "loss",
                ],
                body,
            )
        else:
            lines.append("(no provider ran)")
        off = [(n, m["fwd_bwd"]) for n, m in provs.items() if m.get("fwd_bwd", {}).get("status") != "ok"]
        if off:
            lines.append("")
            lines.append("Not run: " + "; ".join(f"`{n}` ({r['status']})" for n, r in off))
    return lines


def speedup_table(rows: list[dict], mode: str = "fwd_bwd") -> list[str]:
    ours = [
        r
        for r in rows
        if r.get("suite_kind") == "op"
        and r.get("provider_kind") == "ours"
        and r.get("mode") == mode
        and r.get("status") == "ok"
    ]
    if not ours:
        return []
    peers = sorted(
        {p for r in ours for p in r.get("speedup_vs", {})},
        key=lambda p: (
            ("hf", "torch_lce", "liger", "cce").index(p) if p in ("hf", "torch_lce", "liger", "cce") else 9
        ),
    )
    body = [
        [r["shape"], f"`{r['provider']}`"] + [_f(r["speedup_vs"].get(p), "{:.2f}x") for p in peers]
        for r in ours
    ]
    return [
        "",
        f"## Speedup of this package ({MODE_LABEL[mode]} time of the peer / ours; >1 = ours faster)",
        "",
    ] + _table(["shape", "ours"] + [f"vs `{p}`" for p in peers], body)


def e2e_table(rows: list[dict]) -> list[str]:
    e = [r for r in rows if r.get("suite_kind") == "e2e"]
    if not e:
        return []
    body = [
        [
            r["family"],
            f"`{r['provider']}`",
            r["status"],
            _ms(r.get("time_ms")),
            _f(r.get("tokens_per_s"), "{:.0f}"),
            _f(r.get("peak_mem_mb"), "{:.0f}"),
            _f(r.get("loss"), "{:.4f}"),
            _f((r.get("speedup_vs") or {}).get("e2e_hf"), "{:.2f}x"),
            r.get("attn_implementation", ""),
        ]
        for r in e
    ]
    cfg = e[0]
    return [
        "",
        "## End-to-end training step (Qwen2-VL, random init)",
        "",
        (
            f"batch {cfg['batch']} x seq {cfg['seq']}, {cfg['visual_tokens']} visual tokens per sample, "
            f"V={cfg['V']}, hidden {cfg['D']}, {cfg['layers']} layers, {cfg['dtype']}; step = forward + "
            "backward + AdamW step. The losses differ by design: the HF loss averages over both streams "
            "together, DVLoss adds the text and vision means."
        ),
        "",
    ] + _table(
        [
            "config",
            "provider",
            "status",
            "step ms",
            "tokens/s",
            "peak MB",
            "loss",
            "speedup vs HF",
            "attention",
        ],
        body,
    )


def status_table(rows: list[dict]) -> list[str]:
    groups: OrderedDict[tuple, list[str]] = OrderedDict()
    for r in rows:
        if r.get("status") == "ok" or r.get("mode") not in ("fwd_bwd", "train_step"):
            continue
        msg = (r.get("reason") or r.get("error") or "").strip().splitlines()
        first = msg[0] if msg else ""
        groups.setdefault((r["provider"], r["status"], first), []).append(r["shape"])
    if not groups:
        return []
    body = [
        [
            f"`{p}`",
            st,
            (why.replace("|", "\\|") or "–"),
            f"{len(shapes)} shape(s)" if len(shapes) > 2 else ", ".join(shapes),
        ]
        for (p, st, why), shapes in groups.items()
    ]
    return ["", "## Skipped and failed", ""] + _table(["provider", "status", "reason / error", "where"], body)


def markdown(rows: list[dict], header: dict) -> str:
    meta = common_meta(rows)
    lines = [f"# dvsft-kernels benchmarks: {meta.get('device_name', '?')}", ""]
    lines.append(
        f"suite `{header.get('suite')}`, {header.get('started', '')}; git {meta.get('git_sha', '?')}; "
        f"torch {meta.get('torch')}, triton {meta.get('triton')}, transformers {meta.get('transformers')}, "
        f"liger-kernel {meta.get('liger_kernel')}, cut-cross-entropy {meta.get('cut_cross_entropy')}, "
        f"dvsft-kernels {meta.get('dvsft_kernels')}."
    )
    if meta.get("interpreter"):
        lines += ["", "**TRITON_INTERPRET=1: correctness smoke run; the times mean nothing.**"]
    if header.get("command"):
        lines += ["", f"Command: `{header['command']}`"]
    if any(r.get("suite_kind") == "op" for r in rows):
        timer = next((r["timer"] for r in rows if r.get("timer")), "")
        lines += [
            "",
            "Median times (" + timer + "). rows = rows the provider projects (n labeled, or all N "
            "for providers that do not skip ignored rows). TFLOP/s is effective: 6·n·D·V / time for "
            "fwd+bwd (2 for fwd, 4 for bwd), whatever work the provider did. GB/s: compulsory "
            "traffic (h at labeled rows and W read, dh and dW written) / time. x floor = time / the "
            "same GEMMs alone on the labeled rows, measured in this run. peak MB = extra memory at "
            "the peak of fwd+bwd, gradients included.",
        ]
        lines += op_tables(rows)
        lines += speedup_table(rows)
    lines += e2e_table(rows)
    lines += status_table(rows)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Console


def console(rows: list[dict]) -> str:
    """A compact fwd+bwd table for the terminal."""
    out = []
    for shape, provs in _index(rows).items():
        out.append(f"\n{shape}")
        out.append(
            f"  {'provider':<19}{'rows':>7}{'fwd ms':>10}{'bwd ms':>10}{'f+b ms':>10}{'x floor':>9}"
            f"{'TFLOP/s':>9}{'peak MB':>9}  status"
        )
        for name, modes in provs.items():
            fb = modes.get("fwd_bwd", {})
            if fb.get("status") == "ok":
                out.append(
                    f"  {name:<19}{fb['rows_processed']:>7}{_ms(modes['fwd'].get('time_ms')):>10}"
                    f"{_ms(modes['bwd'].get('time_ms')):>10}{_ms(fb.get('time_ms')):>10}"
                    f"{_f(fb.get('x_floor'), '{:.2f}'):>9}{_f(fb.get('tflops'), '{:.3g}'):>9}"
                    f"{_f(fb.get('peak_mem_mb'), '{:.0f}'):>9}  ok"
                )
            else:
                why = (fb.get("reason") or fb.get("error") or "").strip().splitlines()
                out.append(f"  {name:<19}{'':>57}  {fb.get('status')}: {(why[0] if why else '')[:90]}")
    e = [r for r in rows if r.get("suite_kind") == "e2e"]
    if e:
        out.append("\nend-to-end training step")
        for r in e:
            if r["status"] == "ok":
                out.append(
                    f"  {r['provider']:<12} {r['family']:<20} step {_ms(r['time_ms'])} ms, "
                    f"{r['tokens_per_s']:.0f} tokens/s, peak {_f(r['peak_mem_mb'], '{:.0f}')} MB"
                )
            else:
                why = (r.get("reason") or r.get("error") or "").strip().splitlines()
                out.append(
                    f"  {r['provider']:<12} {r['family']:<20} {r['status']}: {(why[0] if why else '')[:90]}"
                )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Plots


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-")


def plots(rows: list[dict], out_dir: str, prefix: str) -> list[str]:
    """<prefix>-time-vs-fraction.png (fwd+bwd time vs labeled fraction, one panel per shape group),
    <prefix>-memory.png (peak extra memory per provider), <prefix>-e2e.png (step throughput)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [
        r
        for r in rows
        if r.get("status") == "ok" and r.get("suite_kind") == "op" and r.get("mode") == "fwd_bwd"
    ]
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for r in ok:
        groups.setdefault(r["group"], []).append(r)
    provs = list(OrderedDict.fromkeys(r["provider"] for r in ok))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(provs)}
    if groups:
        n = len(groups)
        cols = min(4, n)
        nrows = (n + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
        for ax, (g, rs) in zip(axes.flat, groups.items()):
            for p in provs:
                pts = sorted((r["fraction"], r["time_ms"]) for r in rs if r["provider"] == p)
                if pts:
                    ax.plot(
                        *zip(*pts),
                        marker="o",
                        label=p,
                        color=colors[p],
                        linestyle="--" if p == "floor" else "-",
                    )
            ax.set_title(g, fontsize=9)
            ax.set_xlabel("labeled fraction")
            ax.set_ylabel("fwd+bwd ms")
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        path = os.path.join(out_dir, f"{prefix}-time-vs-fraction.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        mem = [r for r in ok if r.get("peak_mem_mb") is not None]
        if mem:
            shapes = list(OrderedDict.fromkeys(r["shape"] for r in mem))
            mprovs = list(OrderedDict.fromkeys(r["provider"] for r in mem))
            width = 0.8 / max(1, len(mprovs))
            fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shapes) * max(1, len(mprovs)) * 0.35 + 3), 4.5))
            for j, p in enumerate(mprovs):
                xs, ys = [], []
                for i, s in enumerate(shapes):
                    v = next((r["peak_mem_mb"] for r in mem if r["shape"] == s and r["provider"] == p), None)
                    if v is not None:
                        xs.append(i + (j - (len(mprovs) - 1) / 2) * width)
                        ys.append(max(v, 1e-3))
                ax.bar(xs, ys, width=width, label=p, color=colors.get(p))
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel("peak extra memory, MB (fwd+bwd)")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{prefix}-memory.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)

    e = [r for r in rows if r.get("suite_kind") == "e2e" and r.get("status") == "ok"]
    if e:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        names = [r["provider"] for r in e]
        a1.bar(names, [r["tokens_per_s"] for r in e], color="tab:blue")
        a1.set_ylabel("tokens/s")
        a2.bar(names, [r["peak_mem_mb"] or 0 for r in e], color="tab:orange")
        a2.set_ylabel("peak extra MB per step")
        fig.suptitle(f"training step, {e[0]['family']}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}-e2e.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(rows: list[dict], out_dir: str, prefix: str, header: dict, make_plots: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, f"{prefix}.json"),
        "markdown": os.path.join(out_dir, f"{prefix}.md"),
    }
    write_json(paths["json"], rows, header)
    with open(paths["markdown"], "w") as f:
        f.write(markdown(rows, header))
    paths["plots"] = plots(rows, out_dir, prefix) if make_plots else []
    return paths


def main(argv=None) -> int:
    """Plots (and the Markdown) again from a results JSON, e.g. one a GPU run wrote with
    --no-plots: `python -m benchmarks.report benchmarks/results/<dir>/gpu.json`."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("json_path")
    args = ap.parse_args(argv)
    doc = load_json(args.json_path)
    rows = doc["rows"]
    header = {k: v for k, v in doc.items() if k not in ("rows", "meta")}
    out_dir = os.path.dirname(os.path.abspath(args.json_path))
    prefix = os.path.splitext(os.path.basename(args.json_path))[0]
    with open(os.path.join(out_dir, f"{prefix}.md"), "w") as f:
        f.write(markdown(rows, header))
    for p in plots(rows, out_dir, prefix):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
