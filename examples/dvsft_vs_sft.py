"""DV-SFT against plain SFT on the synthetic reading task, with the ablations users ask for.

Every run trains the tiny Qwen2-VL of `train_tiny_dvsft.py` (0.6 M parameters, built from a config)
with `DVSFTTrainer` + `DVLoss`. Runs with the same seed start from the same initialisation and see
the same pages in the same order, so the arms of a comparison differ only in the loss; plain SFT is
`vision_weight=0`. Every run is scored on the same held-out pages, by a plain forward pass of the
model (full logits, not the package's op) and by greedy generation:

* answer word accuracy: teacher-forced, a word counts when all its tokens are the argmax (the
  end-of-turn token is not a word);
* exact-match pages: the greedy answer equals the page's words, end token included;
* text loss: the answer's cross-entropy, end token included (what SFT minimises);
* vision-token accuracy: the argmax at each labeled visual token against its word's label (with
  the run's own vision shift; for SFT, an untrained probe).

Suites (each run once, shared between suites that contain it):

    main    read:    SFT vs DV-SFT (vision weight 1, no vision shift)
    weight  read:    vision weight 0, 0.1, 0.3, 1, 3
    shift   read:    vision shift none vs same (hidden[t-1] predicts visual token t's word)
    mode    subword: every word two tokens; SFT, DV-SFT `first`, DV-SFT `aligned` labels
    dense   dense:   12 words of 13 px glyphs on four lines; SFT vs DV-SFT
    soft    read:    hard labels vs soft labels (K = 4 ids per cell, weighted by coverage) vs
                     soft + spread 0.3 (a word's labeled neighbouring cells get it at 0.3 weight)
    soft_subword subword: the same three with `aligned` labels

    python examples/dvsft_vs_sft.py            # every suite, 3 seeds, 600 steps (14.5 min on 2 cores)
    python examples/dvsft_vs_sft.py --quick    # main suite, 2 seeds, 400 steps (~1.2 min)
    python examples/dvsft_vs_sft.py --suites main --seeds 0 1 2 3 4

Results (JSON, Markdown, PNG) go to `--out` (default benchmarks/results/<date>-quality/); each
finished run is kept in runs/ as it ends, and a rerun with the same settings reuses it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):  # train_tiny_dvsft beside this file; the package from a checkout
    if p not in sys.path:
        sys.path.insert(0, p)

import train_tiny_dvsft as tiny

HELD_OUT_SEED = 1_000_003  # one held-out set for every run: seeds and arms are scored on the same pages


@dataclass(frozen=True)
class Arm:
    """One training configuration; `label` is how tables name it."""

    label: str
    task: str = "read"
    vision_weight: float = 1.0
    vision_shift: str = "none"  # "none" | "same"
    mode: str = "first"  # labeling mode: "first" | "aligned"
    soft: int = 0  # > 0: soft vision labels, this many weighted ids per visual token
    spread: float = 0.0  # with soft: neighbouring cells of a word get it at this fraction

    def key(self) -> str:
        soft = (f"-soft{self.soft}" if self.soft else "") + (f"-spread{self.spread:g}" if self.spread else "")
        return f"{self.task}-w{self.vision_weight:g}-{self.vision_shift}-{self.mode}{soft}"


SFT = Arm("SFT", vision_weight=0.0)
DVSFT = Arm("DV-SFT")
SUITES: dict[str, tuple[str, list[Arm]]] = {
    "main": ("DV-SFT against plain SFT", [SFT, DVSFT]),
    "weight": (
        "vision weight",
        [Arm(f"w={w:g}", vision_weight=w) for w in (0.0, 0.1, 0.3, 1.0, 3.0)],
    ),
    "shift": (
        "vision shift",
        [Arm("none (default)"), Arm("same", vision_shift="same")],
    ),
    "mode": (
        "labeling mode (subword task: every word two tokens)",
        [
            Arm("SFT", task="subword", vision_weight=0.0),
            Arm("DV-SFT first", task="subword"),
            Arm("DV-SFT aligned", task="subword", mode="aligned"),
        ],
    ),
    "soft": (
        "soft vision labels (coverage-weighted ids per cell) and spread, read task",
        [DVSFT, Arm("soft K=4", soft=4), Arm("soft K=4 + spread 0.3", soft=4, spread=0.3)],
    ),
    "soft_subword": (
        "soft vision labels and spread, subword task (aligned labels: each cell the sub-token(s) it shows)",
        [
            Arm("aligned", task="subword", mode="aligned"),
            Arm("aligned soft K=4", task="subword", mode="aligned", soft=4),
            Arm("aligned soft K=4 + spread 0.3", task="subword", mode="aligned", soft=4, spread=0.3),
        ],
    ),
    "dense": (
        "harder task (dense: 12 words of 13 px glyphs)",
        [Arm("SFT", task="dense", vision_weight=0.0), Arm("DV-SFT", task="dense")],
    ),
}
CURVE_SUITES = ("main", "dense", "mode")  # plotted against steps; the other arms are scored at the end only
METRICS = ("answer_word_acc", "exact_match", "text_loss", "vision_acc")
METRIC_TITLES = {
    "answer_word_acc": "answer word acc",
    "exact_match": "exact-match pages",
    "text_loss": "text loss",
    "vision_acc": "vision-token acc",
}


@dataclass(frozen=True)
class RunSpec:
    arm: Arm
    seed: int
    steps: int
    train_pages: int
    eval_pages: int
    eval_every: int  # curve points every N steps; 0: scored at the end only
    batch_size: int = 8
    lr: float = 1.5e-3

    def key(self) -> str:
        return (f"{self.arm.key()}-s{self.seed}-n{self.steps}-p{self.train_pages}-e{self.eval_pages}"
                f"-b{self.batch_size}-lr{self.lr:g}")


# ---- one run (in a worker process) ----------------------------------------------------------------------


def _init_worker():
    import torch

    torch.set_num_threads(1)  # one run a core: runs in parallel scale, threads inside a tiny model don't
    warnings.filterwarnings("ignore")


class HeldOut:
    """The held-out pages, collated once, and the scoring of a model on them."""

    def __init__(self, processor, collator, pages, batch: int = 32):
        import torch

        tok = processor.tokenizer
        self.end_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.continues = torch.tensor(
            [t.startswith("##") for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
        )
        self.batches = [collator(pages[i:i + batch]) for i in range(0, len(pages), batch)]
        # prompts for greedy generation: the user turn and the generation prompt, no answer
        self.prompts, self.answers = [], []
        for i in range(0, len(pages), batch):
            chunk = pages[i:i + batch]
            texts = [processor.apply_chat_template(p["messages"][:1], add_generation_prompt=True) for p in chunk]
            self.prompts.append(processor(text=texts, images=[p["image"] for p in chunk], return_tensors="pt"))
            self.answers += [tok(p["messages"][1]["content"], add_special_tokens=False)["input_ids"] for p in chunk]
        self.max_answer = max(len(a) for a in self.answers) + 1

    def score(self, model, vision_shift: bool, generate: bool = False) -> dict:
        import torch
        import torch.nn.functional as F

        was_training = model.training
        model.eval()
        ce = n_tok = words = words_ok = v_ok = v_n = 0.0
        with torch.no_grad():
            for b in self.batches:
                inputs = {k: v for k, v in b.items() if k not in ("labels", "vision_labels")}
                logits = model(**inputs).logits.float()
                z, t = logits[:, :-1], b["labels"][:, 1:]
                m = t != -100
                ce += F.cross_entropy(z[m], t[m], reduction="sum").item()
                n_tok += m.sum().item()
                hit = z.argmax(-1) == t
                for row in range(t.shape[0]):  # words: a token and the '##' pieces that follow it
                    pos = torch.nonzero(m[row] & (t[row] != self.end_id)).flatten().tolist()
                    ok = None
                    for p in pos:
                        if not self.continues[t[row, p]] and ok is not None:
                            words, words_ok = words + 1, words_ok + ok
                            ok = None
                        ok = bool(hit[row, p]) if ok is None else ok and bool(hit[row, p])
                    if ok is not None:
                        words, words_ok = words + 1, words_ok + ok
                vl = b["vision_labels"]
                zv, tv = (logits[:, :-1], vl[:, 1:]) if vision_shift else (logits, vl)
                mv = tv != -100
                v_ok += (zv.argmax(-1)[mv] == tv[mv]).sum().item()
                v_n += mv.sum().item()
            out = {
                "answer_word_acc": words_ok / max(words, 1),
                "text_loss": ce / max(n_tok, 1),
                "vision_acc": v_ok / max(v_n, 1),
            }
            if generate:
                exact, k = 0, 0
                for prompt in self.prompts:
                    gen = model.generate(**prompt, max_new_tokens=self.max_answer, do_sample=False)
                    for row in gen[:, prompt["input_ids"].shape[1]:].tolist():
                        ans = self.answers[k]
                        exact += row[: len(ans) + 1] == ans + [self.end_id]
                        k += 1
                out["exact_match"] = exact / max(k, 1)
        model.train(was_training)
        return out


@lru_cache(maxsize=3)
def pages(task: str, n: int, seed: int) -> list[dict]:
    """Rendered pages, kept in the worker: the arms of one seed train on the same pages (~75 MB each)."""
    return tiny.make_dataset(n, seed, tiny.TASKS[task])


def train_one(spec: RunSpec) -> dict:
    """Train one arm from seed `spec.seed` and score it; returns the run's record."""
    import transformers as tf

    from dvsft_kernels import DVLoss
    from dvsft_kernels.integrations import DVSFTCollator, DVSFTTrainer

    tf.logging.set_verbosity_error()
    t0 = time.time()
    task = tiny.TASKS[spec.arm.task]
    processor = tiny.build_processor(task)
    tf.set_seed(spec.seed)  # the same initialisation for every arm of this seed
    model = tiny.build_model(processor)
    train = pages(spec.arm.task, spec.train_pages, spec.seed)
    collator = DVSFTCollator(processor, mode=spec.arm.mode, min_coverage=0.25)
    # every arm is scored against the same hard labels; soft arms train on soft ones
    held = HeldOut(processor, collator, pages(spec.arm.task, spec.eval_pages, HELD_OUT_SEED))
    if spec.arm.soft:
        collator = DVSFTCollator(processor, mode=spec.arm.mode, min_coverage=0.25, soft=spec.arm.soft,
                                 spread=spec.arm.spread)
    shift = spec.arm.vision_shift == "same"
    curve = []

    class Curve(tf.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % spec.eval_every == 0 and state.global_step < spec.steps:
                curve.append({"step": state.global_step, **held.score(model, shift)})

    args = tf.TrainingArguments(
        output_dir=os.path.join("/tmp", "dvsft_vs_sft", spec.key()),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.lr,
        warmup_steps=20,
        lr_scheduler_type="constant_with_warmup",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=spec.steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=spec.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    loss = DVLoss(vision_weight=spec.arm.vision_weight, vision_shift=shift)
    trainer = DVSFTTrainer(model=model, args=args, train_dataset=train, data_collator=collator, loss=loss)
    trainer.remove_callback(tf.PrinterCallback)
    if spec.eval_every:
        curve.append({"step": 0, **held.score(model, shift)})
        trainer.add_callback(Curve())
    trainer.train()
    final = held.score(model, shift, generate=True)
    if spec.eval_every:
        curve.append({"step": spec.steps, **{k: v for k, v in final.items() if k != "exact_match"}})
    return {
        "key": spec.key(),
        "spec": asdict(spec),
        "final": final,
        "curve": curve,
        "seconds": round(time.time() - t0, 1),
    }


# ---- the whole comparison -----------------------------------------------------------------------------


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # a killed run leaves the previous file or none, never half of one


def run_all(specs: list[RunSpec], out: str, jobs: int) -> tuple[dict[str, dict], list[str]]:
    """Every spec's record, from runs/ where a finished one exists, else trained (`jobs` at a time)."""
    runs_dir = os.path.join(out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    done, todo, failed = {}, [], []
    for s in specs:
        path = os.path.join(runs_dir, s.key() + ".json")
        if os.path.exists(path):
            with open(path) as f:
                done[s.key()] = json.load(f)
        else:
            todo.append(s)
    if done:
        print(f"{len(done)} finished run(s) reused from {runs_dir}", flush=True)
    if not todo:
        return done, failed
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker) as pool:
        futures = {pool.submit(train_one, s): s for s in todo}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            s = futures[fut]
            try:
                rec = fut.result()
            except Exception:  # noqa: BLE001 - one broken run is reported; the others finish and are kept
                failed.append(s.key())
                print(f"[{i}/{len(todo)}] {s.key()} FAILED:\n{traceback.format_exc()}", flush=True)
                continue
            _write_json(os.path.join(runs_dir, s.key() + ".json"), rec)
            done[s.key()] = rec
            f = rec["final"]
            print(
                f"[{i}/{len(todo)}] {s.arm.task:8s} {s.arm.label:15s} seed {s.seed}: answer word acc "
                f"{f['answer_word_acc']:.3f}  exact {f['exact_match']:.3f}  vision acc {f['vision_acc']:.3f}"
                f"  ({rec['seconds']:.0f} s)",
                flush=True,
            )
    return done, failed


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(suites: list[str], specs_by_arm, records: dict[str, dict]) -> dict:
    """Per suite and arm: mean and std over seeds of each metric, and the per-seed difference to the
    suite's first arm (the baseline) on the same seeds."""
    out = {}
    for name in suites:
        title, arms = SUITES[name]
        base = arms[0]
        rows = []
        for arm in arms:
            recs = [records[s.key()] for s in specs_by_arm[arm] if s.key() in records]
            if not recs:
                continue
            row = {"arm": arm.label, "config": asdict(arm), "seeds": [r["spec"]["seed"] for r in recs]}
            for m in METRICS:
                vals = [r["final"][m] for r in recs]
                mu, sd = _mean_std(vals)
                row[m] = {"mean": mu, "std": sd, "per_seed": vals}
            if arm != base:
                base_by_seed = {s.seed: records.get(s.key()) for s in specs_by_arm[base]}
                for m in METRICS:
                    diffs = [r["final"][m] - base_by_seed[r["spec"]["seed"]]["final"][m]
                             for r in recs if base_by_seed.get(r["spec"]["seed"])]
                    if diffs:
                        mu, sd = _mean_std(diffs)
                        row.setdefault("diff_vs_" + base.label, {})[m] = {"mean": mu, "std": sd, "per_seed": diffs}
            rows.append(row)
        out[name] = {"title": title, "baseline": base.label, "arms": rows}
    return out


def _pm(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def markdown(summary: dict, meta: dict) -> str:
    lines = [
        "# DV-SFT against plain SFT: tiny Qwen2-VL on synthetic pages",
        "",
        f"Command: `{meta['command']}`  ",
        (f"{meta['steps']} steps of batch {meta['batch_size']} per run, seeds {meta['seeds']}, "
         f"{meta['eval_pages']} held-out pages (one set for every run), {meta['jobs']} runs at a time on 1 "
         f"thread each; {meta['wall_seconds']:.0f} s wall on {meta['machine']}."),
        "",
        ("Mean ± std over seeds; Δ = per-seed difference to the suite's first arm (same seed: same "
         "initialisation and data order), mean ± std. Answer word accuracy is teacher-forced and excludes "
         "the end token; exact match is greedy generation."),
        "",
    ]
    for name, s in summary.items():
        lines += [f"## {name}: {s['title']}", ""]
        lines.append("| arm | " + " | ".join(METRIC_TITLES[m] for m in METRICS)
                     + f" | Δ answer word acc vs {s['baseline']} | Δ exact match |")
        lines.append("|---" * (len(METRICS) + 3) + "|")
        for row in s["arms"]:
            cells = [_pm(row[m]) for m in METRICS]
            diff = row.get("diff_vs_" + s["baseline"])
            d1 = ("+" if diff["answer_word_acc"]["mean"] >= 0 else "") + _pm(diff["answer_word_acc"]) if diff else "-"
            d2 = ("+" if diff["exact_match"]["mean"] >= 0 else "") + _pm(diff["exact_match"]) if diff else "-"
            lines.append(f"| {row['arm']} | " + " | ".join(cells) + f" | {d1} | {d2} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, records: dict, specs_by_arm, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve_suites = [n for n in CURVE_SUITES if n in summary]
    bar_suites = [n for n in summary if n not in ("main",)]
    ncols = len(curve_suites) + (1 if bar_suites else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 3.8), squeeze=False)
    for ax, name in zip(axes[0], curve_suites):
        for i, arm in enumerate(SUITES[name][1]):
            recs = [records[s.key()] for s in specs_by_arm[arm] if s.key() in records and records[s.key()]["curve"]]
            if not recs:
                continue
            steps = [c["step"] for c in recs[0]["curve"]]
            ys = [[r["curve"][j]["answer_word_acc"] for r in recs] for j in range(len(steps))]
            mean = [statistics.fmean(y) for y in ys]
            ax.plot(steps, mean, color=f"C{i}", label=f"{arm.label} (n={len(recs)})")
            ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i}", alpha=0.2)
        ax.set_title(f"{name}: held-out answer word accuracy", fontsize=10)
        ax.set_xlabel("step"), ax.set_ylim(0, 1), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    if bar_suites:
        ax = axes[0][-1]
        labels, means, errs, colors = [], [], [], []
        for k, name in enumerate(bar_suites):
            for row in summary[name]["arms"]:
                labels.append(f"{name}: {row['arm']}")
                means.append(row["answer_word_acc"]["mean"])
                errs.append(row["answer_word_acc"]["std"])
                colors.append(f"C{k}")
        y = range(len(labels))
        ax.barh(list(y), means, xerr=errs, color=colors, alpha=0.8)
        ax.set_yticks(list(y), labels, fontsize=7), ax.invert_yaxis()
        ax.set_xlim(0, 1), ax.set_title("final answer word accuracy (± std)", fontsize=10), ax.grid(alpha=0.3)
    fig.suptitle("DV-SFT vs SFT, tiny Qwen2-VL, synthetic pages (band: min-max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", nargs="+", choices=list(SUITES), default=None,
                   help="default: every suite (--quick: main)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (--quick: 0 1)")
    p.add_argument("--steps", type=int, default=None, help="default: 600 (--quick: 400)")
    p.add_argument("--train-pages", type=int, default=1024)
    p.add_argument("--eval-pages", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=None,
                   help="curve points every N steps, for the arms of the plotted suites (default steps/8)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time (1 thread each)")
    p.add_argument("--quick", action="store_true", help="main suite, seeds 0 1, 400 steps")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<date>-quality")
    args = p.parse_args(argv)
    for name in ("steps", "train_pages", "eval_pages", "eval_every", "jobs"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v}")
    suites = args.suites or (["main"] if args.quick else list(SUITES))
    seeds = sorted(set(args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])))
    steps = args.steps or (400 if args.quick else 600)  # DV-SFT takes off after ~250 steps
    eval_every = args.eval_every or max(1, steps // 8)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", time.strftime("%Y-%m-%d") + "-quality")
    os.makedirs(out, exist_ok=True)

    curve_arms = {arm.key() for name in suites if name in CURVE_SUITES for arm in SUITES[name][1]}
    specs_by_arm: dict[Arm, list[RunSpec]] = {}
    for name in suites:
        for arm in SUITES[name][1]:
            every = eval_every if arm.key() in curve_arms else 0  # arms of two suites: one run, one key
            specs_by_arm[arm] = [RunSpec(arm, s, steps, args.train_pages, args.eval_pages, every) for s in seeds]
    unique = list({s.key(): s for specs in specs_by_arm.values() for s in specs}.values())
    unique.sort(key=lambda s: (s.arm.task, s.seed))  # consecutive runs share their pages (`pages` cache)
    print(f"{len(unique)} runs ({', '.join(suites)}; seeds {seeds}; {steps} steps), {args.jobs} at a time -> {out}",
          flush=True)
    t0 = time.time()
    records, failed = run_all(unique, out, args.jobs)
    wall = time.time() - t0

    import torch

    meta = {
        "command": " ".join(["python examples/dvsft_vs_sft.py", *(argv if argv is not None else sys.argv[1:])]),
        "suites": suites, "seeds": seeds, "steps": steps, "batch_size": 8, "train_pages": args.train_pages,
        "eval_pages": args.eval_pages, "eval_every": eval_every, "jobs": args.jobs, "wall_seconds": wall,
        "run_seconds": sum(r["seconds"] for r in records.values()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "failed": failed,
    }
    summary = summarize(suites, specs_by_arm, records)
    _write_json(os.path.join(out, "summary.json"), {"meta": meta, "suites": summary})
    md = markdown(summary, meta)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(md + "\n![curves](curves.png)\n")
    plot(summary, records, specs_by_arm, os.path.join(out, "curves.png"))
    print(md)
    print(f"\nwrote {out}/summary.json, README.md, curves.png; {wall:.0f} s wall")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
