"""Problem sizes (from real models) and input generation.

A *shape* is one benchmark problem: N rows of hidden states (N x D), a head (V x D), a labeled
fraction (n = round(fraction * N) rows carry a target, the rest are ignore_index) and an input
distribution. Inputs are generated on the target device from a seed, so every provider of a shape
sees bit-identical tensors.

Distributions:
- "peaked": what a trained model looks like. Non-target logits are roughly N(0, 2^2) (the bulk);
  each row's hidden state is moved within the span of two weight rows so that its target logit sits
  N(1, 1.5^2) above the bulk's logsumexp and one distractor token's logit sits N(0.5, 1.5^2) below
  the target's (mean target probability ~0.4, top probability ~0.5, argmax accuracy ~0.6, loss
  ~1.1: a mix of easy and hard tokens, as in SFT). Unlabeled rows are built the same way: they are
  real hidden states too.
- "confident": built like "peaked" with the target N(9, 1) above the bulk's logsumexp and the
  distractor N(6, 1) below the target (median target probability ~0.997, the distractor holding
  most of the rest; loss ~5e-3, accuracy ~1): the tokens a fine-tuned model already knows, where
  the fused backward's gradient filter can skip every tile but the target's and the distractor's
  (the bulk holds ~e^-9 of a row's mass, under the filter's 2^-8).
- "uniform": an untrained head (weights N(0, 0.02^2), tiny logits): softmax nearly flat.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re

IGNORE_INDEX = -100

# (D, V) of the LM heads the package targets; "issue2" is the CPU performance target shape.
FAMILIES: dict[str, tuple[int, int]] = {
    "qwen2.5-vl-3b": (2048, 151936),
    "qwen2.5-vl-7b": (3584, 151936),
    "llama-3-8b": (4096, 128256),
    "gemma-3": (2560, 262144),
    "issue2": (512, 32000),
    # CPU stand-ins: real vocabulary, hidden size cut so a CPU run stays short.
    "qwen-vocab-cpu": (256, 151936),
    "tiny": (128, 4096),
}
REAL_FAMILIES = ("qwen2.5-vl-7b", "qwen2.5-vl-3b", "llama-3-8b", "gemma-3")
GPU_ROWS = (4096, 16384)
GPU_FRACTIONS = (0.1, 0.3, 0.6, 1.0)
DISTS = ("peaked", "confident", "uniform")


@dataclasses.dataclass(frozen=True)
class Shape:
    family: str
    N: int
    D: int
    V: int
    fraction: float
    dist: str = "peaked"
    dtype: str = "float32"

    @property
    def n(self) -> int:
        """Labeled rows (at least one when fraction > 0)."""
        if self.fraction <= 0:
            return 0
        return max(1, min(self.N, round(self.fraction * self.N)))

    @property
    def id(self) -> str:
        return f"{self.family}/N{self.N}/f{self.fraction:g}/{self.dist}"

    @property
    def group(self) -> str:
        """The shape without its fraction: one line of a time-vs-fraction plot."""
        return f"{self.family}/N{self.N}/{self.dist}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(id=self.id, n=self.n)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Shape:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def _grid(families, rows, fractions, dist, dtype):
    """Rows outermost (largest first), so that a time budget cuts the least informative shapes."""
    return [
        Shape(fam, N, *FAMILIES[fam], f, dist, dtype)
        for N in sorted(rows, reverse=True)
        for fam in families
        for f in fractions
    ]


def suite_shapes(suite: str, device_type: str) -> list[Shape]:
    """Shapes of a suite. 'gpu' is the full grid; 'cpu' is sized to run in a few minutes on 2 cores;
    'quick' is a smoke test. bf16 on GPU, float32 on CPU."""
    dtype = "bfloat16" if device_type == "cuda" else "float32"
    if suite == "gpu":
        grid = _grid(REAL_FAMILIES, GPU_ROWS, GPU_FRACTIONS, "peaked", dtype)
        other = [Shape("qwen2.5-vl-7b", 16384, *FAMILIES["qwen2.5-vl-7b"], 1.0, d, dtype)
                 for d in ("confident", "uniform")]
        return grid[: len(GPU_FRACTIONS)] + other + grid[len(GPU_FRACTIONS) :]
    if suite == "cpu":
        return [
            Shape("issue2", 4096, *FAMILIES["issue2"], 1.0, "peaked", dtype),
            Shape("issue2", 4096, *FAMILIES["issue2"], 0.1, "peaked", dtype),
            Shape("qwen-vocab-cpu", 1024, *FAMILIES["qwen-vocab-cpu"], 0.3, "peaked", dtype),
            Shape("issue2", 1024, *FAMILIES["issue2"], 1.0, "uniform", dtype),
        ]
    if suite == "quick":
        if device_type == "cuda":
            return _grid(["qwen2.5-vl-7b"], [4096], [0.1, 1.0], "peaked", dtype)
        return _grid(["tiny"], [512], [0.1, 1.0], "peaked", dtype) + [
            Shape("tiny", 512, *FAMILIES["tiny"], 1.0, "uniform", dtype)
        ]
    if suite == "e2e":
        return []
    raise ValueError(f"unknown suite {suite!r}")


_CUSTOM = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def select(
    shapes: list[Shape],
    patterns: list[str] | None = None,
    fractions: list[float] | None = None,
    dtype: str | None = None,
) -> list[Shape]:
    """Apply the CLI filters.

    patterns: each matches a family name, or a shape id by fnmatch ('*N4096*'); 'NxDxV' adds a custom
    shape (peaked, fraction 1.0 unless fractions are given). fractions: *sets* the labeled fractions of
    every (family, N, dist) group that survives the pattern filter (so `--fractions 0.5` works on any
    suite). dtype: overrides the dtype.
    """
    out = list(shapes)
    base_dtype = shapes[0].dtype if shapes else "float32"
    if patterns:
        custom, pats = [], []
        for p in patterns:
            m = _CUSTOM.match(p)
            if m:
                N, D, V = map(int, m.groups())
                custom.append(Shape(f"custom-{D}x{V}", N, D, V, 1.0, "peaked", base_dtype))
            else:
                pats.append(p)
        out = [s for s in out if any(p == s.family or fnmatch.fnmatch(s.id, p) for p in pats)] + custom
    if fractions:
        groups: dict[tuple, Shape] = {}
        for s in out:
            groups.setdefault((s.family, s.N, s.D, s.V, s.dist, s.dtype), s)
        out = [dataclasses.replace(s, fraction=f) for s in groups.values() for f in fractions]
    if dtype:
        out = [dataclasses.replace(s, dtype=dtype) for s in out]
    seen, uniq = set(), []
    for s in out:
        key = (s.id, s.dtype, s.D, s.V)
        if key not in seen:
            seen.add(key)
            uniq.append(s)
    return uniq


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def make_inputs(shape: Shape, device: str = "cpu", seed: int = 0) -> dict:
    """hidden (N, D) and weight (V, D) as leaf tensors that require grad, targets (N,) int64 with
    ignore_index at unlabeled rows, and the labeled row indices."""
    import torch

    N, D, V = shape.N, shape.D, shape.V
    g = torch.Generator(device=device).manual_seed(seed)
    f32 = {"device": device, "dtype": torch.float32, "generator": g}
    if shape.dist == "uniform":
        weight = torch.randn(V, D, **f32) * 0.02
        hidden = torch.randn(N, D, **f32) / math.sqrt(D)
        tokens = torch.randint(0, V, (N,), device=device, generator=g)
    elif shape.dist in ("peaked", "confident"):
        sigma, bulk = 1.0, 2.0  # weight row norm; std of non-target logits
        weight = torch.randn(V, D, **f32) * (sigma / math.sqrt(D))
        # Token frequencies: log-uniform ranks through a fixed permutation (a Zipf-like tail).
        perm = torch.randperm(V, device=device, generator=g)
        u = torch.rand(N, **f32)
        ranks = torch.exp(u * math.log(V)).long().clamp_(1, V) - 1
        tokens = perm[ranks]
        noise = torch.randn(N, D, **f32) * (bulk / sigma)
        # Set two logits per row exactly: the target's and a distractor's (a random other token),
        # by moving the hidden state within span(w_t, w_d): h = noise + A^T c, (A A^T) c = z - A noise.
        distractor = torch.randint(0, V, (N,), device=device, generator=g)
        A = torch.stack([weight[tokens], weight[distractor]], 1)  # [N, 2, D]
        # (target above the bulk's logsumexp, its spread; distractor below the target, its spread)
        t_mu, t_sd, d_mu, d_sd = (1.0, 1.5, 0.5, 1.5) if shape.dist == "peaked" else (9.0, 1.0, 6.0, 1.0)
        target_logit = math.log(V) + bulk**2 / 2 + t_mu + t_sd * torch.randn(N, **f32)
        distractor_logit = target_logit - (d_mu + d_sd * torch.randn(N, **f32))
        want = torch.stack([target_logit, distractor_logit], 1)  # [N, 2]
        gram = A @ A.transpose(1, 2) + 1e-6 * torch.eye(2, device=device)
        c = torch.linalg.solve(gram, want - (A @ noise[:, :, None]).squeeze(2))
        hidden = noise + (A.transpose(1, 2) @ c[:, :, None]).squeeze(2)
        del A, noise
    else:
        raise ValueError(f"unknown dist {shape.dist!r}")
    targets = torch.full((N,), IGNORE_INDEX, dtype=torch.long, device=device)
    labeled = torch.randperm(N, device=device, generator=g)[: shape.n].sort().values
    targets[labeled] = tokens[labeled]
    dt = torch_dtype(shape.dtype)
    return {
        "hidden": hidden.to(dt).requires_grad_(True),
        "weight": weight.to(dt).requires_grad_(True),
        "targets": targets,
        "labeled": labeled,
    }
