"""Labeling speed: one Qwen2-VL page (1000 x 1000 px -> 36 x 36 = 1296 visual tokens) with ~300 OCR
words and a fast byte-level BPE tokenizer (8k vocabulary, trained here: no hub access).

Run: ``pytest benchmarks/test_bench_labeling.py --benchmark-only`` (not collected by the default
``pytest`` run, whose testpaths are ``tests``). Single core: tokenizers' thread pool is disabled
and numpy does not thread these ops; pin with ``taskset -c 0`` for a clean number.

"warm" reuses word tokenisations across pages (the default ``token_cache=True``; page vocabularies
repeat); "cold" tokenises every word of every page (one batched call per page).
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from dvsft_kernels.labeling import OCRWord, VisualGrid, build_vision_labels, label_visual_tokens
from dvsft_kernels.labeling.assign import clear_token_cache

SYL = [
    "ka",
    "to",
    "re",
    "mi",
    "an",
    "el",
    "in",
    "or",
    "us",
    "te",
    "ly",
    "st",
    "ch",
    "qu",
    "ph",
    "ion",
    "ing",
    "er",
]


def _lexicon(rng, n=3000):
    words = set()
    while len(words) < n:
        w = "".join(rng.choice(SYL, size=int(rng.integers(1, 5))))
        if rng.random() < 0.2:
            w = w.capitalize()
        if rng.random() < 0.1:
            w = str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
        words.add(w)
    return sorted(words)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    lex = _lexicon(rng)
    corpus = [" ".join(rng.choice(lex, size=40)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=8000, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    grid = VisualGrid.for_qwen2_vl((1000, 1000), (1, 72, 72), patch_size=14, merge_size=2)
    assert grid.num_tokens == 1296

    def page(seed):
        r = np.random.default_rng(seed)
        zipf = np.minimum(r.zipf(1.3, size=300), len(lex)) - 1
        words, x, y = [], 40.0, 40.0
        for k in zipf:
            text = lex[int(k)]
            w = 11.0 * len(text) + r.uniform(-3, 3)
            if x + w > 960:
                x, y = 40.0, y + 30.0
            words.append(OCRWord(text, (x, y, x + w, y + 20 + r.uniform(-2, 2))))
            x += w + 9
        return words

    return tokenizer, grid, page


def test_label_page_warm(benchmark, setup):
    tok, grid, page = setup
    words = page(1)
    label_visual_tokens(words, grid, tok)  # fills the token cache
    labels = benchmark(label_visual_tokens, words, grid, tok)
    assert 0.1 < (labels != -100).float().mean() < 0.9


def test_label_page_cold(benchmark, setup):
    tok, grid, page = setup
    words = page(2)
    benchmark(label_visual_tokens, words, grid, tok, token_cache=False)


def test_label_page_aligned_warm(benchmark, setup):
    tok, grid, page = setup
    words = page(3)
    label_visual_tokens(words, grid, tok, mode="aligned")
    benchmark(label_visual_tokens, words, grid, tok, mode="aligned")


def test_new_page_each_call(benchmark, setup):
    """Steady state of a data loader: a different page (and grid object) every call, warm cache."""
    tok, grid, page = setup
    pages = [page(100 + i) for i in range(64)]
    for p in pages:
        label_visual_tokens(p, grid, tok)
    it = iter(range(10**9))

    def run():
        i = next(it) % len(pages)
        g = VisualGrid.for_qwen2_vl((1000, 1000), (1, 72, 72))
        return label_visual_tokens(pages[i], g, tok)

    benchmark(run)


def test_batch_of_8_pages(benchmark, setup):
    tok, grid, page = setup
    pages = [page(200 + i) for i in range(8)]
    ids = np.full((8, 1400), 5, dtype=np.int64)
    ids[:, 50 : 50 + grid.num_tokens] = 7
    for p in pages:
        label_visual_tokens(p, grid, tok)
    out = benchmark(build_vision_labels, ids, [grid] * 8, pages, tok, image_token_id=7)
    assert out.shape == (8, 1400)


def teardown_module():
    clear_token_cache()
