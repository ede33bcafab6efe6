"""Top-k distillation with `linear_cross_entropy(..., target_weights=...)`: a student LM learns from
a teacher's top-k next-token probabilities, and neither model's full logits are ever formed in
the student's training step.

1. Corpus: a deterministic synthetic language, a second-order Markov source over V tokens where
   each context has 16 possible successors with Zipf weights, so the next token is uncertain
   (the source's top-1 is 0.37, its top-8 mass 0.88) and a good model's predictions are peaked but not one-hot.
2. Teacher: a small `LlamaForCausalLM` built from a config and trained on that corpus (hard
   next-token loss, through the op). Its top-k ids (int32) and probabilities (float16) at every
   position of a "transfer" set are computed once and written to disk; the teacher is then
   dropped. The student's training reads only that file.
3. Students: a smaller Llama, same initialisation and batch order in every arm, trained for the
   same steps on the transfer set with (a) the top-k targets, (b) the hard next tokens of the same
   text, and optionally (c) a mix. Evaluation on held-out text: KL(teacher || student) over the
   full vocabulary, agreement of the argmaxes, and NLL of the true next tokens.
4. Memory and time of one loss step (forward + backward of the LM head and the loss only) at a
   realistic head size: the op with top-k targets against the usual full-logit KL (log_softmax of
   the student's logits against the teacher's full (N, V) probabilities). Peak bytes are counted
   exactly by a dispatch mode that tracks the storages the step creates; the inputs (teacher
   targets) are counted separately.

The top-k weights are the teacher's probabilities as they are, not renormalised (--renormalize
changes that): the loss sum_k p_k (lse - z_k) is then exactly the top-k part of the full
cross-entropy to the teacher, sum_v p_v (lse - z_v), and a position where the teacher spreads
mass beyond its top-k (a less certain target) weighs less. Either way the per-row optimum is the
truncated teacher renormalised over its top-k (see docs/distillation.md for the caveats).

    python examples/distill_topk.py --quick       # about 2 min on a shared 2-core machine
    python examples/distill_topk.py               # longer training, benchmark at N = 4096
    python examples/distill_topk.py --bench-v 151936 --bench-n 2048   # another head

Writes summary.json and results.md to --out (default benchmarks/results/<UTC date>-distill/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

try:
    import dvsft_kernels  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dvsft_kernels import linear_cross_entropy
from dvsft_kernels.ops.gemm import release_workspace

IGNORE = -100


# ------------------------------------------------------------------ corpus
def make_source(vocab: int, successors: int = 16, zipf: float = 1.2, seed: int = 0) -> torch.Tensor:
    """(2, V, V) next-token probabilities given (parity of the token two back, previous token): the
    parity makes the teacher use more than the last token. Each row has `successors` random
    successors with Zipf weights in a random order."""
    g = torch.Generator().manual_seed(seed)
    w = torch.arange(1, successors + 1, dtype=torch.float64) ** -zipf
    w = w / w.sum()
    table = torch.zeros(2, vocab, vocab, dtype=torch.float64)
    for c in range(2):
        for a in range(vocab):
            nxt = torch.randperm(vocab, generator=g)[:successors]
            table[c, a, nxt] = w
    return table


def sample_corpus(table: torch.Tensor, n_seqs: int, seq_len: int, seed: int) -> torch.Tensor:
    """(n_seqs, seq_len) int64 token ids drawn from the source, vectorised over sequences."""
    g = torch.Generator().manual_seed(seed)
    vocab = table.shape[1]
    out = torch.empty(n_seqs, seq_len, dtype=torch.int64)
    out[:, :2] = torch.randint(vocab, (n_seqs, 2), generator=g)
    for t in range(2, seq_len):
        p = table[out[:, t - 2] % 2, out[:, t - 1]]
        out[:, t] = torch.multinomial(p, 1, generator=g).squeeze(1)
    return out


# ------------------------------------------------------------------ models
def make_lm(vocab: int, hidden: int, layers: int, heads: int, seed: int, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_len,
                      tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states (B, T, D), without the LM head (the op applies it)."""
    return model.model(input_ids=ids).last_hidden_state


def hard_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy through the op: hidden[:, t] predicts ids[:, t + 1]."""
    h = hidden_states(model, ids)[:, :-1]
    return linear_cross_entropy(h, model.lm_head.weight, ids[:, 1:])


def topk_loss(hidden: torch.Tensor, weight: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor,
              renormalize: bool = False, hard_targets: torch.Tensor | None = None, hard_mix: float = 0.0,
              chunk_rows: int | None = None) -> torch.Tensor:
    """Mean over positions of sum_k w_k (lse - z_{t_k}) with w = the teacher's top-k probabilities,
    computed by the op without the (N, V) logits. With `hard_mix` > 0 the true next token joins
    as one more target of weight `hard_mix` and the teacher's weights are scaled by 1 - hard_mix:
    (1 - a) * soft + a * hard in the same call, over one log-sum-exp per row."""
    w = topk_probs.float()
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    ids = topk_ids.long()
    if hard_mix:
        ids = torch.cat([ids, hard_targets.long()[..., None]], -1)
        w = torch.cat([(1 - hard_mix) * w, torch.full_like(w[..., :1], hard_mix)], -1)
    return linear_cross_entropy(hidden, weight, ids, target_weights=w, chunk_rows=chunk_rows)


def train(model, steps: int, batches, loss_fn, lr: float, desc: str, evaluate=None, eval_every: int = 0):
    """AdamW with a linear warm-up and cosine decay; `batches(step)` returns the step's batch.
    Returns the curve [(step, evaluate())] when `evaluate` is given."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    curve = []
    model.train()
    for step in tqdm(range(steps), desc=desc, leave=False, mininterval=2.0):
        if evaluate is not None and eval_every and step % eval_every == 0:
            curve.append((step, evaluate()))
        loss = loss_fn(model, *batches(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    if evaluate is not None:
        curve.append((steps, evaluate()))
    model.eval()
    return curve


@torch.no_grad()
def teacher_outputs(teacher, transfer: torch.Tensor, held_out: torch.Tensor, k: int, batch: int):
    """The teacher's top-k (ids int32, probs float16) on the transfer set, for training, and its full
    log-probabilities on the held-out set, for evaluation only."""
    teacher.eval()
    ids, probs = [], []
    for i in range(0, len(transfer), batch):
        logits = teacher(input_ids=transfer[i:i + batch]).logits.float()
        p, t = logits.softmax(-1).topk(k, dim=-1)
        ids.append(t.to(torch.int32))
        probs.append(p.to(torch.float16))
    held = torch.cat([teacher(input_ids=held_out[i:i + batch]).logits.float().log_softmax(-1)
                      for i in range(0, len(held_out), batch)])
    return torch.cat(ids), torch.cat(probs), held


@torch.no_grad()
def evaluate(student, held_out: torch.Tensor, teacher_logp: torch.Tensor, batch: int) -> dict:
    """On held-out text, over positions 0..T-2 (those that have a true next token):
    KL(teacher || student) in nats, argmax agreement with the teacher, and NLL of the true tokens."""
    student.eval()
    logq = torch.cat([student(input_ids=held_out[i:i + batch]).logits.float().log_softmax(-1)
                      for i in range(0, len(held_out), batch)])[:, :-1]
    logp = teacher_logp[:, :-1]
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    agree = (logq.argmax(-1) == logp.argmax(-1)).float().mean()
    nll = -logq.gather(-1, held_out[:, 1:, None]).mean()
    student.train()
    return {"kl_teacher_student": float(kl), "argmax_agreement": float(agree), "nll_true_tokens": float(nll)}


# ------------------------------------------------------------------ memory and time of the loss step
class StoragePeak(TorchDispatchMode):
    """Peak of the bytes held by storages that ops create while the mode is active (views and
    in-place results are not allocations). Tensors that existed before are not counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        out = func(*args, **kwargs)
        for t in _tensors(out):
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or ptr in before or ptr in self._tracked:
                continue
            self._tracked.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            # the storage object lives as long as any tensor on it: its end is the free
            weakref.finalize(st, self._release, ptr, nbytes)
        return out

    def _release(self, ptr: int, nbytes: int) -> None:
        self.live -= nbytes
        self._tracked.discard(ptr)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def bench_inputs(n: int, d: int, v: int, k: int, seed: int = 0):
    """Student hidden (n, d) and head (v, d) in float32, and a teacher's top-k: k distinct ids per row
    (int64) with peaked probabilities summing to < 1 (float32)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g) / d ** 0.5
    weight = torch.randn(v, d, generator=g) * 0.5
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]) if n * v <= 1 << 22 else \
        torch.randint(v // k, (n, k), generator=g) * k + torch.arange(k)  # distinct per row, cheap at large n * v
    probs = (torch.randn(n, k, generator=g) * 1.5).softmax(-1) * 0.9
    return hidden, weight, ids, probs


def full_probs(ids: torch.Tensor, probs: torch.Tensor, v: int) -> torch.Tensor:
    """The same teacher as (n, v) probabilities, as the full-logit KL takes it."""
    return torch.zeros(ids.shape[0], v).scatter_(1, ids, probs)


def full_kl_step(hidden, weight, p_full):
    """The usual way: the student's logits, log_softmax, KL to the teacher's full probabilities
    (mean over positions), backward."""
    logq = F.log_softmax(hidden @ weight.T, dim=-1)
    loss = F.kl_div(logq, p_full, reduction="sum") / hidden.shape[0]
    loss.backward()
    return loss.detach()


def topk_step(hidden, weight, ids, probs, chunk_rows=None):
    loss = topk_loss(hidden, weight, ids, probs, chunk_rows=chunk_rows)
    loss.backward()
    return loss.detach()


def measure_loss_step(n: int, d: int, v: int, k: int, repeats: int = 3, chunk_rows: int | None = None) -> dict:
    """Peak bytes (one step under `StoragePeak`, gradients of hidden and head included) and the
    min wall time of `repeats` further steps, for the op with top-k targets and the full-logit KL."""
    hidden, weight, ids, probs = bench_inputs(n, d, v, k)
    p_full = full_probs(ids, probs, v)
    res = {"shape": {"N": n, "D": d, "V": v, "K": k, "dtype": "float32"}, "logits_bytes": n * v * 4}
    arms = {"topk_op": (lambda h, w: topk_step(h, w, ids, probs, chunk_rows),
                        ids.nbytes + probs.nbytes),
            "full_logit_kl": (lambda h, w: full_kl_step(h, w, p_full), p_full.nbytes)}
    for name, (step, target_bytes) in arms.items():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        # the op keeps its CPU logits buffer between calls: freed first, so this step allocates
        # (and counts) it; it stays held after the step, as in training
        release_workspace()
        with StoragePeak() as mem:
            loss = step(h, w)
            grads_bytes = h.grad.nbytes + w.grad.nbytes
        times = []
        for _ in range(repeats):
            h.grad = w.grad = None
            t0 = time.perf_counter()
            step(h, w)
            times.append(time.perf_counter() - t0)
        res[name] = {"step_peak_bytes": mem.peak, "teacher_target_bytes": target_bytes,
                     "grads_bytes": grads_bytes, "time_s_min": min(times) if times else None,
                     "times_s": times, "loss": float(loss)}
    return res


# ------------------------------------------------------------------ driver
def default_out() -> str:
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "benchmarks", "results", f"{day}-distill")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (about a minute or two on 2 cores)")
    p.add_argument("--k", type=int, default=8, help="teacher probabilities kept per position")
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--train-seqs", type=int, default=None, help="teacher's corpus (default 4096, quick 2048)")
    p.add_argument("--transfer-seqs", type=int, default=256, help="sequences the students train on")
    p.add_argument("--eval-seqs", type=int, default=128)
    p.add_argument("--teacher-steps", type=int, default=None, help="default 800, quick 300")
    p.add_argument("--student-steps", type=int, default=None, help="default 400, quick 150")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--teacher-size", type=int, nargs=3, default=[128, 2, 4], metavar=("HIDDEN", "LAYERS", "HEADS"))
    p.add_argument("--student-size", type=int, nargs=3, default=[64, 2, 4], metavar=("HIDDEN", "LAYERS", "HEADS"))
    p.add_argument("--renormalize", action="store_true", help="divide the top-k weights by their sum")
    p.add_argument("--hard-mix", type=float, default=0.3, help="weight of the hard loss in the mixed arm")
    p.add_argument("--eval-every", type=int, default=None, help="student eval interval (default steps // 8)")
    p.add_argument("--bench-n", type=int, default=None, help="positions N (default 4096, quick 1024)")
    p.add_argument("--bench-d", type=int, default=1024)
    p.add_argument("--bench-v", type=int, default=32000)
    p.add_argument("--bench-repeats", type=int, default=3)
    p.add_argument("--bench-chunk-rows", type=int, default=None, help="the op's chunk_rows (None: its default)")
    p.add_argument("--no-bench", action="store_true")
    # one thread: on a shared or small machine, more contend and can be several times slower
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.train_seqs = args.train_seqs or (2048 if args.quick else 4096)
    args.teacher_steps = args.teacher_steps if args.teacher_steps is not None else (300 if args.quick else 800)
    args.student_steps = args.student_steps if args.student_steps is not None else (150 if args.quick else 400)
    args.bench_n = args.bench_n or (1024 if args.quick else 4096)
    args.eval_every = args.eval_every or max(1, args.student_steps // 8)
    args.out = args.out or default_out()
    return args


def run_distillation(args) -> dict:
    table = make_source(args.vocab, seed=args.seed)
    corpus = sample_corpus(table, args.train_seqs, args.seq_len, seed=args.seed + 1)
    transfer = sample_corpus(table, args.transfer_seqs, args.seq_len, seed=args.seed + 2)
    held_out = sample_corpus(table, args.eval_seqs, args.seq_len, seed=args.seed + 3)
    B = args.batch
    g = torch.Generator().manual_seed(args.seed + 4)
    teacher_order = torch.randint(len(corpus), (args.teacher_steps, B), generator=g)
    student_order = torch.randint(len(transfer), (args.student_steps, B), generator=g)

    t0 = time.perf_counter()
    teacher = make_lm(args.vocab, *args.teacher_size, seed=args.seed + 10, max_len=args.seq_len)
    train(teacher, args.teacher_steps, lambda s: (corpus[teacher_order[s]],), hard_loss, lr=3e-3, desc="teacher")
    topk_ids, topk_probs, teacher_logp = teacher_outputs(teacher, transfer, held_out, args.k, B)
    # the source's own entropy and the teacher's fit, as context for the students' numbers
    src = table[held_out[:, :-2] % 2, held_out[:, 1:-1]]  # positions 1..T-2: the source is known there
    logp_src = teacher_logp[:, 1:-1]
    teacher_fit = {"kl_source_teacher": float((src * (src.clamp_min(1e-30).log() - logp_src)).sum(-1).mean()),
                   "source_entropy": float(-(src * src.clamp_min(1e-30).log()).sum(-1).mean()),
                   "teacher_nll_true_tokens": float(-logp_src.gather(-1, held_out[:, 2:, None]).mean()),
                   "topk_mass_mean": float(topk_probs.float().sum(-1).mean()),
                   "top1_prob_mean": float(topk_probs[..., 0].float().mean())}
    teacher_s = time.perf_counter() - t0
    del teacher

    # the student stage sees the teacher only through this file: top-k ids and probabilities
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "teacher_topk.pt")
        torch.save({"ids": topk_ids, "probs": topk_probs}, path)
        stored_bytes = os.path.getsize(path)
        stored = torch.load(path)
    full_bytes = transfer.numel() * args.vocab * 4

    def soft(model, ids, t_ids, t_probs):
        h = hidden_states(model, ids)[:, :-1]
        return topk_loss(h, model.lm_head.weight, t_ids[:, :-1], t_probs[:, :-1], renormalize=args.renormalize)

    def mixed(model, ids, t_ids, t_probs):
        h = hidden_states(model, ids)[:, :-1]
        return topk_loss(h, model.lm_head.weight, t_ids[:, :-1], t_probs[:, :-1], renormalize=args.renormalize,
                         hard_targets=ids[:, 1:], hard_mix=args.hard_mix)

    def hard(model, ids, t_ids, t_probs):
        return hard_loss(model, ids)

    arms = {"hard_labels": hard, "topk": soft}
    if args.hard_mix:
        arms[f"topk+{args.hard_mix:g}hard"] = mixed
    students = {}
    for name, fn in arms.items():
        t1 = time.perf_counter()
        student = make_lm(args.vocab, *args.student_size, seed=args.seed + 20, max_len=args.seq_len)
        initial = evaluate(student, held_out, teacher_logp, B)

        def batches(s):
            rows = student_order[s]
            return transfer[rows], stored["ids"][rows], stored["probs"][rows]

        curve = train(student, args.student_steps, batches, fn, lr=3e-3, desc=name,
                      evaluate=lambda m=student: evaluate(m, held_out, teacher_logp, B), eval_every=args.eval_every)
        students[name] = {"initial": initial, "final": curve[-1][1], "curve": curve,
                          "seconds": time.perf_counter() - t1}
    return {"teacher": {**teacher_fit, "seconds": teacher_s}, "students": students,
            "stored_topk_bytes": stored_bytes, "full_teacher_probs_bytes": full_bytes}


def mib(x: int) -> str:
    return f"{x / 2 ** 20:.1f}"


def markdown(summary: dict) -> str:
    a = summary["args"]
    lines = [f"# Top-k distillation (k = {a['k']}) with `linear_cross_entropy(..., target_weights=...)`", "",
             f"Command: `{summary['command']}`  ", f"{summary['machine']}; {summary['wall_s']:.0f} s wall.", ""]
    d = summary.get("distill")
    if d:
        t = d["teacher"]
        epochs = a["student_steps"] * a["batch"] / a["transfer_seqs"]
        lines += [(f"Teacher {a['teacher_size']} (hidden, layers, heads), {a['teacher_steps']} steps; "
                  f"student {a['student_size']}, {a['student_steps']} steps of batch {a['batch']} on "
                  f"{a['transfer_seqs']} x {a['seq_len']} transfer tokens; vocabulary {a['vocab']}; "
                  f"weights {'renormalised' if a['renormalize'] else 'not renormalised'}.  "),
                  (f"Teacher on held-out text: NLL {t['teacher_nll_true_tokens']:.3f} (source entropy "
                  f"{t['source_entropy']:.3f}, KL(source || teacher) {t['kl_source_teacher']:.3f}); mean top-1 "
                  f"probability {t['top1_prob_mean']:.3f}, mean top-{a['k']} mass {t['topk_mass_mean']:.3f}.  "),
                  (f"Stored top-k targets: {mib(d['stored_topk_bytes'])} MiB (full float32 teacher probabilities "
                  f"would be {mib(d['full_teacher_probs_bytes'])} MiB)."), "",
                  (f"Held-out text, after {a['student_steps']} steps ({epochs:.0f} passes over the transfer text); "
                   f"best = the lowest KL of the evaluations every {a['eval_every']} steps."), "",
                  "| student arm | KL(teacher ‖ student) | argmax agreement | NLL true tokens | best KL (step) | KL at init |",
                  "|---|---|---|---|---|---|"]
        for name, s in d["students"].items():
            f = s["final"]
            step, best = min(s["curve"], key=lambda c: c[1]["kl_teacher_student"])
            lines.append(f"| {name} | {f['kl_teacher_student']:.4f} | {f['argmax_agreement']:.3f} | "
                         f"{f['nll_true_tokens']:.3f} | {best['kl_teacher_student']:.4f} ({step}) | "
                         f"{s['initial']['kl_teacher_student']:.3f} |")
        lines.append("")
    b = summary.get("bench")
    if b:
        s = b["shape"]
        lines += [(f"Loss step (forward + backward of head and loss), N = {s['N']}, D = {s['D']}, V = {s['V']}, "
                  f"K = {s['K']}, float32, CPU; (N, V) logits = {mib(b['logits_bytes'])} MiB. Peak = bytes of "
                  "the storages the step creates (gradients of hidden and head included), counted exactly; "
                  "targets = the teacher's inputs to the step."), "",
                  "| loss | step peak MiB | teacher targets MiB | peak + targets MiB | time / step s (min) |",
                  "|---|---|---|---|---|"]
        for name in ("topk_op", "full_logit_kl"):
            r = b[name]
            lines.append(f"| {name} | {mib(r['step_peak_bytes'])} | {mib(r['teacher_target_bytes'])} | "
                         f"{mib(r['step_peak_bytes'] + r['teacher_target_bytes'])} | {r['time_s_min']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:  # restored after: a caller (the test) keeps its own settings
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.use_deterministic_algorithms(True)
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def run(args, argv) -> dict:
    t0 = time.perf_counter()
    summary = {"args": vars(args), "command": " ".join(["python examples/distill_topk.py", *(argv or sys.argv[1:])]),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    summary["distill"] = run_distillation(args)
    if not args.no_bench:
        summary["bench"] = measure_loss_step(args.bench_n, args.bench_d, args.bench_v, args.k,
                                             repeats=args.bench_repeats, chunk_rows=args.bench_chunk_rows)
    summary["wall_s"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    md = markdown(summary)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return summary


if __name__ == "__main__":
    main()
