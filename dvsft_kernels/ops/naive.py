"""The executable spec of `linear_cross_entropy` (docs/linear_cross_entropy.md).

Materialises the full logits and follows the formula line by line; every other implementation is
tested against this one run in float64. Not for production sizes.

For every position i with target t != ignore_index:
    z    = hidden[i] @ weight.T + bias
    z    = softcap * tanh(z / softcap)                      if softcap
    lse  = logsumexp(z)
    ce   = (1 - eps) * (lse - z[t]) + eps * (lse - mean(z))
    l_i  = w_i * (ce + z_loss * lse**2)

Soft targets (`target_weights`, shape (..., K) like `targets`): each position has K targets t_k
with weights c_k >= 0; slots equal to ignore_index are unused, and a position whose slots are all
unused is ignored. The row loss is the weighted sum of the hard row losses:

    l_i  = w_i * sum_k c_k * (ce(t_k) + z_loss * lse**2)

so K = 1 with c = 1 is the hard op, and "mean" divides by the number of labeled positions.
`correct` compares the argmax with the highest-weight target (first slot on ties).
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
    target_weights: torch.Tensor | None = None,
):
    """Reference loss. The projection runs in the inputs' dtype and every later step in
    `upcast_dtype`: float64 inputs give the exact spec; bf16 inputs with upcast_dtype=float32 give
    "plain PyTorch in the input dtype, upcast after the head" (the HF way), the baseline of the
    error rule in tests/ops/errors.py.

    With `return_stats=True` also returns (lse, correct) per position (0 / False where ignored).
    With `target_weights`, `targets` and `target_weights` are (..., K) (module docstring).
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    K = 1 if target_weights is None else targets.shape[-1]
    t = targets.reshape(-1, K)
    z = h @ weight.T
    if bias is not None:
        z = z + bias
    z = z.to(upcast_dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    slot_valid = t != ignore_index
    c = torch.ones_like(t, dtype=upcast_dtype) if target_weights is None else \
        target_weights.reshape(-1, K).to(upcast_dtype)
    c = torch.where(slot_valid, c, torch.zeros_like(c))
    valid = slot_valid.any(dim=1)
    safe_t = torch.where(slot_valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(z, dim=-1)
    z_t = z.gather(1, safe_t)  # (rows, K)
    eps = label_smoothing
    ce = (1 - eps) * (lse[:, None] - z_t) + eps * (lse - z.mean(dim=-1))[:, None]
    loss = (c * (ce + z_loss * lse[:, None] ** 2)).sum(dim=1)
    if token_weights is not None:
        loss = loss * token_weights.reshape(-1).to(loss.dtype)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    row_shape = targets.shape if target_weights is None else targets.shape[:-1]
    if reduction == "none":
        out = loss.reshape(row_shape)
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
    # the highest-weight target of each row (first slot on ties; unused slots never win)
    top = torch.where(slot_valid, c, torch.full_like(c, -1.0)).argmax(dim=1, keepdim=True)
    correct = (z.argmax(dim=-1) == t.gather(1, top).squeeze(1)) & valid
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    return out, lse.reshape(row_shape), correct.reshape(row_shape)
