"""Shared pieces of the integration tests: targets, the plain full-logits reference (docs/dvloss.md),
gradient comparison by the op tests' error rule, and an allocation recorder."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from tests.integrations.tiny_models import IMG, TEXT_IDS

IGN = -100


def make_targets(batch: dict, n_text: int = 10, vision_frac: float = 0.4, seed: int = 0):
    """Text labels on each row's last `n_text` tokens; vision labels (random word ids) on a random
    `vision_frac` of the image positions. Disjoint by construction."""
    g = torch.Generator().manual_seed(seed)
    ids = batch["input_ids"]
    labels = torch.full_like(ids, IGN)
    labels[:, -n_text:] = ids[:, -n_text:]
    vision = torch.full_like(ids, IGN)
    img = (ids == IMG) & (torch.rand(ids.shape, generator=g) < vision_frac)
    vision[img] = torch.randint(*TEXT_IDS, (int(img.sum()),), generator=g)
    return labels, vision


def reference_loss(
    logits, labels, vision_labels, *, text_weight=1.0, vision_weight=1.0, num_text=None, num_vision=None,
    vision_shift=False,
):
    """DVLoss's contract from full logits: logits[:, t-1] predicts labels[:, t] (HF shift); the vision
    stream is unshifted (logits[:, t] predicts vision_labels[:, t]) unless vision_shift=True."""
    V = logits.shape[-1]

    def stream(lab, shift, n):
        if lab is None:
            return logits.sum() * 0
        z = (logits[:, :-1] if shift else logits).reshape(-1, V)
        t = (lab[:, 1:] if shift else lab).reshape(-1)
        m = t != IGN
        ce = F.cross_entropy(z[m], t[m], reduction="sum")
        d = int(m.sum()) if n is None else float(n)
        return ce / d if d > 0 else ce * 0

    return text_weight * stream(labels, True, num_text) + vision_weight * stream(
        vision_labels, vision_shift, num_vision
    )


def to_double(batch: dict) -> dict:
    return {
        k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in batch.items()
    }


def grads(model) -> dict[str, torch.Tensor]:
    """name -> gradient (zeros where none flowed), for every trainable parameter."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n] = (
                p.grad.detach().double().clone()
                if p.grad is not None
                else torch.zeros_like(p, dtype=torch.float64)
            )
    return out


def plain_run(model, batch, labels, vision, **kw):
    """The plain computation: the model's own full logits, the loss written out."""
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits
    loss = reference_loss(logits.double(), labels, vision, **kw)
    loss.backward()
    return loss.detach(), grads(model)


def attached_run(model, batch, labels, vision, **extra):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=labels, vision_labels=vision, **extra)
    out.loss.backward()
    return out, grads(model)


def assert_error_rule(name, got, plain, ref, floor=2e-6):
    """|got - ref| <= 2 |plain - ref| + floor * scale, with ref computed in float64 and plain in the
    test dtype: the attached path may be no worse than twice PyTorch's own rounding."""
    e_got = (got.double() - ref).abs().max().item()
    e_plain = (plain.double() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1e-12
    assert e_got <= 2 * e_plain + floor * scale, (
        f"{name}: error {e_got:.3g} vs plain {e_plain:.3g} (scale {scale:.3g})"
    )


def compare_to_reference(make_model, batch, labels, vision, *, prepare=None, **attach_kw):
    """Attached float32 vs plain float32 vs plain float64: loss and every parameter gradient."""
    from dvsft_kernels.integrations import attach

    m32 = make_model()
    m64 = copy.deepcopy(m32).double()
    if prepare is not None:
        m32, m64 = prepare(m32), prepare(m64)
    l_plain, g_plain = plain_run(m32, batch, labels, vision)
    l_ref, g_ref = plain_run(m64, to_double(batch), labels, vision)
    with attach(m32, **attach_kw) as handle:
        out, g_att = attached_run(m32, batch, labels, vision)
    assert_error_rule("loss", out.loss.detach(), l_plain, l_ref)
    assert g_att.keys() == g_ref.keys()
    nonzero = 0
    for n in g_ref:
        assert_error_rule(n, g_att[n], g_plain[n], g_ref[n])
        nonzero += bool(g_ref[n].abs().max() > 0)
    assert nonzero > 0
    return out, handle


def torchrun(script: str, *args: str, world: int = 2, timeout: int = 300) -> None:
    """tests/integrations/<script> with args on `world` gloo CPU processes (torch.distributed.run),
    bounded by timeout; fails the test with the output's tail on a bad exit."""
    import os
    import pathlib
    import subprocess
    import sys
    import uuid

    root = pathlib.Path(__file__).resolve().parents[2]
    # c10d rendezvous on port 0: the agent's store binds a port the OS picks and the workers share
    # it (TORCHELASTIC_USE_AGENT_STORE), so no free-port probe can race parallel tests for it
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--rdzv-backend=c10d",
           "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id={uuid.uuid4().hex}", "--local-addr=127.0.0.1",
           str(root / "tests" / "integrations" / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"}
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
