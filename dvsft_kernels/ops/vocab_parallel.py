"""Vocabulary-parallel linear cross-entropy: each rank of `process_group` holds a contiguous slice
of the LM-head rows (any split, uneven included) and the same hidden rows and targets.

Per chunk of rows, each rank projects onto its slice and reduces it to five per-row numbers
(local max m_r, sum-exp s_r relative to m_r, target logit if the target is in its slice, sum of
logits, first argmax); three small all-reduces combine them:

    M = max_r m_r,   S = sum_r s_r exp(m_r - M),   lse = M + log S

and each rank then forms its own columns of the gradient, G_r = a exp(y - m_r) - ... with
a = scale * k * exp(m_r - M) / S. dh is a sum over ranks (one all-reduce after all chunks); dW and
db stay local to the slice. Works on any device through PyTorch ops; the Triton impls are not
used here because their fused pass needs the whole row (see the README's "Scaling out").
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dvsft_kernels.ops.torch_impl import (
    chunk_rows_for,
    compute_weight,
    explicit_grad_gemms,
    mm_f32,
    row_outputs,
)


class Collectives:
    """The all-reduces the op needs, over `group`."""

    def __init__(self, group):
        self.group = group

    def max_(self, t):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def sum_(self, t):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def min_(self, t):
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return t


def vocab_layout(group, V_local: int, n: int, D: int, targets: torch.Tensor, device,
                 flags: tuple[int, ...] = ()) -> tuple[int, int]:
    """(vocab_start, V_total) of this rank's slice. Checks on every rank that all ranks agree on
    the rows, the hidden size and `flags` (which gradients are computed, the options: anything
    that changes which collectives run), so a mismatch is an error everywhere rather than a hang
    in a later collective."""
    world = dist.get_world_size(group)
    t64 = targets.to(torch.int64)
    # position-weighted checksum: catches permuted targets too
    check = (t64 * torch.arange(1, t64.numel() + 1, device=t64.device, dtype=torch.int64)).sum() \
        if t64.numel() else torch.zeros((), dtype=torch.int64, device=t64.device)
    mine = torch.tensor([V_local, n, D, *flags], dtype=torch.int64, device=device)
    mine = torch.cat([mine, check.reshape(1).to(device)])
    allv = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(allv, mine, group=group)
    allv = torch.stack(allv).cpu()
    if (allv[:, 1:] != allv[0, 1:]).any():
        raise ValueError(
            "process_group: ranks disagree on the labeled rows, hidden size, options or targets "
            f"(per rank [V_local, rows, D, flags..., targets checksum]: {allv.tolist()}); every rank must "
            "pass the same hidden rows, targets and options, and its own slice of the vocabulary")
    if (allv[:, 0] <= 0).any():
        raise ValueError(f"weight: every rank needs a non-empty vocabulary slice, got sizes {allv[:, 0].tolist()}")
    rank = dist.get_rank(group)
    starts = torch.cumsum(allv[:, 0], 0) - allv[:, 0]
    return int(starts[rank]), int(allv[:, 0].sum())


def lce_torch_vocab_parallel(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    scale: torch.Tensor | None,
    *,
    coll: Collectives,
    vocab_start: int,
    vocab_total: int,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    grad_h: bool = False,
    grad_w: bool = False,
    grad_b: bool = False,
    chunk_rows: int | None = None,
    need_correct: bool = True,  # computed anyway: free in this pass
):
    """Same contract as `torch_impl.lce_torch`, on this rank's slice [vocab_start, +V_local) of a
    vocabulary of vocab_total; targets are global ids. dh is already summed over ranks."""
    n, D = h.shape
    V = weight.shape[0]
    dev = h.device
    eps, zl = float(label_smoothing), float(z_loss)
    W = compute_weight(weight)
    b = bias.float() if bias is not None else None
    any_grad = grad_h or grad_w or grad_b

    loss, lse, correct, dh, dW, db = row_outputs(n, D, V, dev, grad_h, grad_w, grad_b)
    if n == 0:
        return loss, lse, correct, dh, dW, db

    # sized by the global vocabulary: every rank must walk the same chunks
    m_max = chunk_rows or chunk_rows_for(n, vocab_total, dev)
    buf = torch.empty(m_max, V, dtype=torch.float32, device=dev)
    buf2 = torch.empty(m_max, V, dtype=torch.float32, device=dev) if softcap is not None else None
    for s0 in range(0, n, m_max):
        s1 = min(n, s0 + m_max)
        m = s1 - s0
        hc = h[s0:s1]
        hc = hc if hc.dtype == W.dtype else hc.to(W.dtype)
        x = mm_f32(hc, W.T, out=buf[:m])
        if b is not None:
            x.add_(b)
        if softcap is not None:
            x.div_(softcap).tanh_()
            y = torch.mul(x, softcap, out=buf2[:m])
        else:
            y = x
        tl = targets[s0:s1] - vocab_start
        mine = (tl >= 0) & (tl < V)
        tl = torch.where(mine, tl, torch.zeros_like(tl))
        y_t = torch.where(mine, y.gather(1, tl[:, None]).squeeze(1), torch.zeros((), device=dev))
        y_sum = y.sum(1) if eps else torch.zeros(m, device=dev)
        mx, amax = y.max(1)

        big_m = coll.max_(mx.clone())
        e = y.sub_(mx[:, None]).exp_()
        packed = torch.stack([e.sum(1) * torch.exp(mx - big_m), y_t, y_sum])
        ssum, y_t, y_sum = coll.sum_(packed).unbind(0)
        # first global argmax: the smallest global index among ranks holding the max
        cand = torch.where(mx == big_m, amax + vocab_start, torch.full_like(amax, vocab_total))
        gmax = coll.min_(cand)
        correct[s0:s1] = gmax == targets[s0:s1]

        lse_c = big_m + ssum.log()
        ce = (1 - eps) * (lse_c - y_t)
        if eps:
            ce = ce + eps * (lse_c - y_sum / vocab_total)
        loss[s0:s1] = ce + zl * lse_c * lse_c if zl else ce
        lse[s0:s1] = lse_c
        if not any_grad:
            continue

        sc = scale[s0:s1].float()
        k = 1 + 2 * zl * lse_c if zl else torch.ones_like(lse_c)
        a = sc * k * torch.exp(mx - big_m) / ssum
        # explicit G on this slice: the one-hot term only where the target is in the slice
        c1 = torch.where(mine, sc * (1 - eps), torch.zeros((), device=dev))
        explicit_grad_gemms(e, a, torch.arange(m, device=dev), tl, c1, sc * (eps / vocab_total) if eps else None,
                            x if softcap is not None else None, W, hc, dh[s0:s1] if grad_h else None, dW, db,
                            first=s0 == 0)
    if grad_h:
        coll.sum_(dh)
    return loss, lse, correct, dh, dW, db
