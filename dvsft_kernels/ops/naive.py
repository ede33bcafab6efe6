"""The executable spec of `linear_cross_entropy` (docs/linear_cross_entropy.md).

Materialises the full logits and follows the formula line by line; every other implementation is
tested against this one run in float64. Not for production sizes.

For every position i with target t != ignore_index:
    z    = hidden[i] @ weight.T + bias
    z    = softcap * tanh(z / softcap)                      if softcap
    lse  = logsumexp(z)
    ce   = (1 - eps) * (lse - z[t]) + eps * (lse - mean(z))
    l_i  = w_i * (ce + z_loss * lse**2)
"""

from __future__ import annotations

import torch


def naive_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items: int | torch.Tensor | None = None,
    upcast_dtype: torch.dtype = torch.float64,
    return_stats: bool = False,
):
    """Reference loss. The projection runs in the inputs' dtype and every later step in
    `upcast_dtype`: float64 inputs give the exact spec; bf16 inputs with upcast_dtype=float32 give
    "plain PyTorch in the input dtype, upcast after the head" (the HF way), the baseline of the
    error rule in tests/ops/errors.py.

    With `return_stats=True` also returns (lse, correct) per position (0 / False where ignored).
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1)
    z = h @ weight.T
    if bias is not None:
        z = z + bias
    z = z.to(upcast_dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = t != ignore_index
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(z, dim=-1)
    z_t = z.gather(1, safe_t[:, None]).squeeze(1)
    eps = label_smoothing
    ce = (1 - eps) * (lse - z_t) + eps * (lse - z.mean(dim=-1))
    loss = ce + z_loss * lse**2
    if token_weights is not None:
        loss = loss * token_weights.reshape(-1).to(loss.dtype)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        out = loss.reshape(targets.shape)
    elif reduction == "sum":
        out = loss.sum()
    elif reduction == "mean":
        n = num_items if num_items is not None else valid.sum()
        n = torch.as_tensor(n, dtype=loss.dtype)
        out = torch.where(n > 0, loss.sum() / n.clamp_min(1), loss.sum() * 0)
    else:
        raise ValueError(f"reduction: unknown {reduction!r}")
    if not return_stats:
        return out
    correct = (z.argmax(dim=-1) == t) & valid
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    return out, lse.reshape(targets.shape), correct.reshape(targets.shape)
