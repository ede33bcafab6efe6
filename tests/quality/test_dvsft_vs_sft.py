"""examples/dvsft_vs_sft.py: its scoring against hand-counted answers, the subword task's tokens, and
a short end-to-end run (summary, paired differences, resume, a failing run kept apart)."""

from __future__ import annotations

import importlib
import json
import math
import pathlib
import sys
import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def cmp():
    # imported by name from a sys.path entry: spawned workers unpickle `train_one` the same way
    sys.path.insert(0, str(EXAMPLES))
    yield importlib.import_module("dvsft_vs_sft")
    sys.path.remove(str(EXAMPLES))


def test_subword_task_splits_every_word_in_two(cmp):
    tiny = cmp.tiny
    tok = tiny.build_processor(tiny.TASKS["subword"]).tokenizer
    for w in tiny.WORDS:
        got = tok.convert_ids_to_tokens(tok(w, add_special_tokens=False)["input_ids"])
        assert got == tiny.word_pieces(w) and len(got) == 2 and got[1].startswith("##"), w
    word_tok = tiny.build_processor(tiny.TASKS["read"]).tokenizer
    assert all(len(word_tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in tiny.WORDS)


class PlantedModel(torch.nn.Module):
    """Logits of value A at a chosen id per position: the answer's labels (shifted) and the vision
    labels (unshifted), except where `wrong` says; elsewhere id 0."""

    A = 30.0

    def __init__(self, V, batches, wrong):
        super().__init__()
        self.V, self.plan = V, {}
        for b in batches:
            ids = torch.zeros_like(b["input_ids"])
            t = b["labels"][:, 1:]
            ids[:, :-1] = torch.where(t != -100, t, ids[:, :-1])
            v = b["vision_labels"]
            ids = torch.where(v != -100, v, ids)
            for row, pos in wrong(b):
                ids[row, pos] = (ids[row, pos] + 1) % V
            self.plan[b["input_ids"].data_ptr()] = ids

    def forward(self, input_ids, **kw):
        ids = self.plan[input_ids.data_ptr()]
        return types.SimpleNamespace(logits=torch.nn.functional.one_hot(ids, self.V).float() * self.A)


def first_word_tail(b, pieces, wrong_tokens):
    """The hidden positions predicting the last `wrong_tokens` of the `pieces` tokens of each row's
    first answer word."""
    out = []
    for row in range(b["labels"].shape[0]):
        pos = torch.nonzero(b["labels"][row] != -100).flatten()[:pieces] - 1
        out += [(row, int(p)) for p in pos[pieces - wrong_tokens:]]
    return out


@pytest.mark.parametrize("task, pieces, wrong_tokens", [("read", 1, 1), ("subword", 2, 1), ("subword", 2, 2)])
def test_scores_match_hand_counts(cmp, task, pieces, wrong_tokens):
    """One wrong token in each page's first word: a word-level figure of 3/4 (4 words a page), where a
    token-level one would give 7/8 on the subword task; the loss is the planted logits' exact CE."""
    tiny = cmp.tiny
    from dvsft_kernels.integrations import DVSFTCollator

    t = tiny.TASKS[task]
    proc = tiny.build_processor(t)
    pages = tiny.make_dataset(6, 11, t)
    held = cmp.HeldOut(proc, DVSFTCollator(proc), pages, batch=4)
    # with pieces=2, wrong_tokens=1 only the first word's '##' piece is wrong
    model = PlantedModel(len(proc.tokenizer), held.batches, lambda b: first_word_tail(b, pieces, wrong_tokens))
    got = held.score(model, vision_shift=False)
    assert got["answer_word_acc"] == pytest.approx(3 / 4)
    n_words = sum(len(p["words"]) for p in pages)
    assert n_words == 4 * len(pages)
    n_tokens = n_words * pieces + len(pages)  # + the end token of each answer
    V, A = len(proc.tokenizer), PlantedModel.A
    ok_ce, bad_ce = math.log(math.exp(A) + V - 1) - A, math.log(math.exp(A) + V - 1)
    n_bad = wrong_tokens * len(pages)
    assert got["text_loss"] == pytest.approx((n_bad * bad_ce + (n_tokens - n_bad) * ok_ce) / n_tokens, rel=1e-5)
    assert got["vision_acc"] == 1.0
    # scored as if trained shifted, the unshifted predictions miss wherever the previous position shows
    # another word or none (a word's second cell still matches its first)
    assert held.score(model, vision_shift=True)["vision_acc"] < 0.8


def test_end_to_end_small(cmp, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q"
    rc = cmp.main(["--suites", "main", "--seeds", "0", "1", "--steps", "3", "--train-pages", "16",
                   "--eval-pages", "8", "--eval-every", "1", "--jobs", "2", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert len(runs) == 4  # 2 arms x 2 seeds
    arms = summary["suites"]["main"]["arms"]
    assert [a["arm"] for a in arms] == ["SFT", "DV-SFT"]
    by = {(r["spec"]["arm"]["vision_weight"], r["spec"]["seed"]): r for r in runs.values()}
    for m in ("answer_word_acc", "exact_match", "text_loss", "vision_acc"):
        per_seed = [by[(1.0, s)]["final"][m] - by[(0.0, s)]["final"][m] for s in (0, 1)]
        d = arms[1]["diff_vs_SFT"][m]
        assert d["per_seed"] == pytest.approx(per_seed)
        assert d["mean"] == pytest.approx(sum(per_seed) / 2)
        assert d["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
    for r in runs.values():  # a curve point at step 0 and at every step
        assert [c["step"] for c in r["curve"]] == [0, 1, 2, 3]
    assert runs[next(iter(runs))]["curve"][0] != runs[next(iter(runs))]["curve"][-1]  # training moved it
    md = (out / "README.md").read_text()
    assert "| SFT |" in md and "| DV-SFT |" in md and "Δ answer word acc vs SFT" in md
    assert (out / "curves.png").stat().st_size > 10_000

    # a rerun reuses every finished run: no worker pool is started
    def no_pool(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(cmp.cf, "ProcessPoolExecutor", no_pool)
    capsys.readouterr()
    assert cmp.main(["--suites", "main", "--seeds", "0", "1", "--steps", "3", "--train-pages", "16",
                     "--eval-pages", "8", "--eval-every", "1", "--out", str(out)]) == 0
    assert "4 finished run(s) reused" in capsys.readouterr().out


def test_a_failing_run_is_reported_and_the_rest_kept(cmp, tmp_path):
    good = cmp.RunSpec(cmp.SFT, 0, 2, 16, 8, 1)
    bad = cmp.RunSpec(cmp.Arm("broken", task="no-such-task"), 0, 2, 16, 8, 1)
    records, failed = cmp.run_all([good, bad], str(tmp_path), jobs=1)
    assert failed == [bad.key()] and list(records) == [good.key()]
    assert (tmp_path / "runs" / f"{good.key()}.json").exists()
    assert not (tmp_path / "runs" / f"{bad.key()}.json").exists()


@pytest.mark.parametrize("flag", ["--steps", "--jobs", "--eval-pages"])
def test_bad_counts_are_refused(cmp, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cmp.main([flag, "0"])
    assert e.value.code == 2 and flag in capsys.readouterr().err
