"""End-to-end training-step throughput of a small, randomly initialised Qwen2-VL.

Two providers train the same model (same seed) on the same batch, a DV-SFT-like sample: a prompt,
one image whose visual tokens are partly labeled (vision_labels), and a labeled answer.
- e2e_hf: the plain HF loss; `labels` carries both streams (vision targets merged in), so the model
  projects every position to full-vocabulary float32 logits.
- e2e_dvsft: `dvsft_kernels.attach(model, loss=DVLoss())`; the batch carries `labels` and
  `vision_labels`; no [B, T, V] tensor exists. Skips with the reason until attach lands.
A step is forward + backward + AdamW step + zero_grad(set_to_none=True); tokens/s counts every
input token. Built from a Qwen2VLConfig (no download). GPU: bf16, flash_attention_2 when flash-attn
is installed, else SDPA; CPU: float32, SDPA.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import time

from benchmarks import env
from benchmarks.errors import format_error

IGNORE_INDEX = -100
PATCH, MERGE, TEMPORAL = 14, 2, 2


@dataclasses.dataclass(frozen=True)
class E2EConfig:
    name: str
    batch: int
    seq: int
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    image_px: int  # square image side, a multiple of PATCH * MERGE
    vision_fraction: float  # labeled share of the visual tokens
    answer: int  # answer tokens (text labels)
    dtype: str
    vision_depth: int = 1
    vision_dim: int = 64
    warmup: int = 1
    steps: int = 3

    @property
    def grid(self) -> int:
        return self.image_px // PATCH

    @property
    def visual_tokens(self) -> int:
        return (self.grid // MERGE) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> E2EConfig:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


CONFIGS = {
    # 448 px -> 32 x 32 patches -> 256 visual tokens; vocabulary cut to keep CPU steps ~seconds.
    "cpu": E2EConfig(
        "qwen2vl-tiny-cpu",
        batch=1,
        seq=768,
        vocab=32000,
        hidden=256,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=512,
        image_px=448,
        vision_fraction=0.4,
        answer=128,
        dtype="float32",
    ),
    # 1008 px -> 72 x 72 patches -> 1296 visual tokens (a ~1000 x 1000 page); real Qwen vocabulary.
    "gpu": E2EConfig(
        "qwen2vl-small-gpu",
        batch=4,
        seq=2048,
        vocab=151936,
        hidden=1024,
        layers=4,
        heads=16,
        kv_heads=4,
        intermediate=2816,
        image_px=1008,
        vision_fraction=0.4,
        answer=256,
        dtype="bfloat16",
        vision_depth=2,
        vision_dim=256,
        warmup=2,
        steps=5,
    ),
    "quick": E2EConfig(
        "qwen2vl-micro",
        batch=1,
        seq=160,
        vocab=2048,
        hidden=64,
        layers=1,
        heads=4,
        kv_heads=2,
        intermediate=128,
        image_px=224,
        vision_fraction=0.4,
        answer=32,
        dtype="float32",
        vision_dim=32,
        warmup=1,
        steps=1,
    ),
}


def attn_implementation(device: str) -> str:
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_model(cfg: E2EConfig, device: str):
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig

    from benchmarks.shapes import torch_dtype

    V = cfg.vocab
    head_dim = cfg.hidden // cfg.heads
    half = head_dim // 2  # mrope sections (t, h, w) sum to head_dim / 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    qcfg = Qwen2VLConfig(
        text_config={
            "vocab_size": V,
            "hidden_size": cfg.hidden,
            "intermediate_size": cfg.intermediate,
            "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads,
            "num_key_value_heads": cfg.kv_heads,
            "max_position_embeddings": max(4096, 2 * cfg.seq),
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
        },
        vision_config={
            "depth": cfg.vision_depth,
            "embed_dim": cfg.vision_dim,
            "hidden_size": cfg.hidden,
            "num_heads": max(1, cfg.vision_dim // 32),
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": TEMPORAL,
        },
        image_token_id=V - 3,
        vision_start_token_id=V - 2,
        vision_end_token_id=V - 1,
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(
        qcfg, attn_implementation=attn_implementation(device), dtype=torch_dtype(cfg.dtype)
    )
    return model.to(device).train()


def make_batch(cfg: E2EConfig, device: str) -> dict:
    """input_ids = prompt, <vision_start>, image pads, <vision_end>, answer; labels on the answer,
    vision_labels on `vision_fraction` of the image pads (HF alignment, like labels)."""
    import torch

    from benchmarks.shapes import torch_dtype

    V, B, T, nv = cfg.vocab, cfg.batch, cfg.seq, cfg.visual_tokens
    prompt = T - 2 - nv - cfg.answer
    if prompt < 1:
        raise ValueError(f"{cfg.name}: seq {T} too short for {nv} visual + {cfg.answer} answer tokens")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V - 3, (B, T), generator=g)
    s = prompt
    ids[:, s] = V - 2
    ids[:, s + 1 : s + 1 + nv] = V - 3
    ids[:, s + 1 + nv] = V - 1
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    labels[:, T - cfg.answer :] = ids[:, T - cfg.answer :]
    vision_labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    pick = torch.rand(B, nv, generator=g) < cfg.vision_fraction
    words = torch.randint(3, V - 3, (B, nv), generator=g)
    vision_labels[:, s + 1 : s + 1 + nv] = torch.where(pick, words, IGNORE_INDEX)
    n_patches = cfg.grid * cfg.grid
    pixel_values = torch.randn(B * n_patches, 3 * TEMPORAL * PATCH * PATCH, generator=g)
    batch = {
        "input_ids": ids,
        "pixel_values": pixel_values.to(torch_dtype(cfg.dtype)),
        "image_grid_thw": torch.tensor([[1, cfg.grid, cfg.grid]] * B),
        "mm_token_type_ids": (ids == V - 3).int(),
        "labels": labels,
        "vision_labels": vision_labels,
    }
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Providers


class E2EProvider:
    name = ""
    label = ""
    kind = "peer"

    def static_reason(self, device: str) -> str | None:
        if importlib.util.find_spec("transformers") is None:
            return "transformers not installed"
        return None

    def setup(self, model):
        """Returns (batch transform, cleanup)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"provider": self.name, "provider_label": self.label, "provider_kind": self.kind}


class HFStep(E2EProvider):
    name = "e2e_hf"
    label = "HF plain loss (labels = text + vision targets)"
    kind = "reference"

    def setup(self, model):
        import torch

        def batch_fn(batch):
            b = dict(batch)
            vl = b.pop("vision_labels")
            b["labels"] = torch.where(vl != IGNORE_INDEX, vl, b["labels"])
            return b

        return batch_fn, lambda: None


class DvsftStep(E2EProvider):
    name = "e2e_dvsft"
    label = "dvsft_kernels.attach(model, loss=DVLoss())"
    kind = "ours"

    def static_reason(self, device):
        reason = super().static_reason(device)
        if reason:
            return reason
        try:
            import dvsft_kernels
        except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip, stated
            return f"dvsft_kernels not importable ({type(e).__name__}: {str(e)[:200]})"
        missing = [n for n in ("attach", "DVLoss") if not hasattr(dvsft_kernels, n)]
        if missing:
            return f"dvsft_kernels.{'/'.join(missing)} not available yet (being written)"
        return None

    def setup(self, model):
        import dvsft_kernels

        handle = dvsft_kernels.attach(model, loss=dvsft_kernels.DVLoss())
        return (lambda batch: batch), handle.remove


E2E_PROVIDERS = {p.name: p for p in [HFStep(), DvsftStep()]}


# ---------------------------------------------------------------------------------------------
# Rows and measurement


def rows_for(
    cell: dict, device: str, status: str, *, meta: dict, reason=None, error=None, result: dict | None = None
) -> list[dict]:
    cfg = E2EConfig.from_dict(cell["config"])
    p = E2E_PROVIDERS[cell["provider"]]
    tokens = cfg.batch * cfg.seq
    row = {
        **meta,
        "time": env.now_iso(),
        "suite_kind": "e2e",
        **p.describe(),
        "shape": f"e2e/{cfg.name}",
        "group": f"e2e/{cfg.name}",
        "family": cfg.name,
        "mode": "train_step",
        "status": status,
        "reason": reason,
        "error": error,
        "dtype": cfg.dtype,
        "batch": cfg.batch,
        "seq": cfg.seq,
        "V": cfg.vocab,
        "D": cfg.hidden,
        "layers": cfg.layers,
        "visual_tokens": cfg.visual_tokens,
        "tokens": tokens,
        "time_ms": None,
        "time_ms_min": None,
        "time_ms_max": None,
        "reps": 0,
        "tokens_per_s": None,
        "peak_mem_mb": None,
        "mem_method": None,
        "loss": None,
        "attn_implementation": attn_implementation(device),
    }
    if result:
        row.update(result)
    return [row]


def run_cell(cell: dict, spec: dict, meta: dict) -> list[dict]:
    device = spec["device"]
    p = E2E_PROVIDERS[cell["provider"]]
    reason = p.static_reason(device)
    if reason:
        return rows_for(cell, device, "skipped", meta=meta, reason=reason)
    try:
        return rows_for(
            cell, device, "ok", meta=meta, result=measure_step(p, E2EConfig.from_dict(cell["config"]), device)
        )
    except Exception as e:  # noqa: BLE001 - a failing provider is a "failed" row, not a crash
        return rows_for(cell, device, "failed", meta=meta, error=format_error(e))


def measure_step(p: E2EProvider, cfg: E2EConfig, device: str) -> dict:
    import torch

    from benchmarks import measure

    cuda = device.startswith("cuda")
    model = build_model(cfg, device)
    batch = make_batch(cfg, device)
    batch_fn, cleanup = p.setup(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        out = model(**batch_fn(batch))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    try:
        for _ in range(cfg.warmup):
            step()
        sync()
        # Memory: one step after the optimizer state exists.
        if cuda:
            import gc

            gc.collect()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = step()
            sync()
            peak = torch.cuda.max_memory_allocated() - base
            method = "torch.cuda.max_memory_allocated - memory_allocated before the step"
        else:
            meter = measure.RssMeter()
            meter.start()
            loss = step()
            peak = meter.peak()
            method = meter.method
        times = []
        for _ in range(cfg.steps):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        cleanup()
    med = statistics.median(times)
    return {
        "time_ms": med,
        "time_ms_min": min(times),
        "time_ms_max": max(times),
        "reps": len(times),
        "timer": "time.perf_counter around a full step" + (" (synchronized)" if cuda else ""),
        "tokens_per_s": cfg.batch * cfg.seq / (med / 1e3),
        "peak_mem_mb": None if peak is None else peak / 1e6,
        "mem_method": method,
        "loss": float(loss),
        "params_m": sum(x.numel() for x in model.parameters()) / 1e6,
        "supervised_tokens": int(
            (batch["labels"] != IGNORE_INDEX).sum() + (batch["vision_labels"] != IGNORE_INDEX).sum()
        ),
    }


def cells(config_key: str, provider_names: list[str] | None = None) -> list[dict]:
    cfg = CONFIGS[config_key]
    names = provider_names or list(E2E_PROVIDERS)
    return [{"kind": "e2e", "provider": n, "config": cfg.to_dict()} for n in names if n in E2E_PROVIDERS]
