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

Soft targets (K ids per row with probabilities q): each rank adds q_k y[t_k] over the slots whose id
lies in its slice to the target logit (summed by the same all-reduce) and puts the one-hot term
q_k onehot(t_k) only into its own columns; slots elsewhere contribute 0 here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib

import torch
import torch.distributed as dist

from dvsft_kernels.ops.backends.base import CompactBackend, Grads, Inputs
from dvsft_kernels.ops.gemm import (
    chunk_logits,
    chunk_rows_for,
    compute_weight,
    explicit_grad_gemms,
    row_outputs,
)
from dvsft_kernels.ops.options import FLOAT_DTYPES, LCEOptions


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


# The agreement check: one all_gather of a small int64 fingerprint per rank before any other
# collective. Exact fields must match on every rank; the float checksums (float64 bits in the same
# vector) within _RTOL of their scale, so identical inputs reduced in another order still agree.
# Every field of LCEOptions takes part (a new option needs no edit here) except those that only choose
# how this rank computes.
_RANK_LOCAL_OPTIONS = ("impl", "deterministic", "return_stats")
_OPTIONS = tuple(f.name for f in dataclasses.fields(LCEOptions) if f.name not in _RANK_LOCAL_OPTIONS)
_EXACT = ("ok", "V_local", "rows", "D", "dtype", "grad_hidden", "grad_weight", "bias", "grad_bias",
          "token_weights", "target_weights", "K", "num_items", "targets", *_OPTIONS)
_FLOAT = ("hidden", "hidden_scale", "token_weights_sum", "token_weights_scale", "target_probs_sum",
          "target_probs_scale")
_RTOL = 1e-6


def _bits(x) -> int:
    """A float as the int64 of its float64 bits (exact comparison of option values)."""
    return int(torch.tensor(float(x), dtype=torch.float64).view(torch.int64))


def _option_code(v) -> int:
    """An option value as one int64 for the fingerprint: None -1, bools and ints as they are, floats by
    their bits, strings by their CRC-32."""
    if v is None:
        return -1
    if isinstance(v, (bool, int)):
        return int(v)
    if isinstance(v, float):
        return _bits(v)
    return zlib.crc32(str(v).encode())


def _gather(group, exact: torch.Tensor, floats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mine = torch.cat([exact, floats.view(torch.int64)])
    allv = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(allv, mine, group=group)
    allv = torch.stack(allv).cpu()
    return allv[:, : len(_EXACT)], allv[:, len(_EXACT):].contiguous().view(torch.float64)


def _group_device(group, hidden) -> torch.device:
    if isinstance(hidden, torch.Tensor):
        return hidden.device
    return torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")


def refuse(group, hidden) -> None:
    """This rank's inputs failed validation: join the agreement check with ok=0 so that the other
    ranks raise too instead of waiting in it; the caller then raises its own error."""
    dev = _group_device(group, hidden)
    _gather(group, torch.zeros(len(_EXACT), dtype=torch.int64, device=dev),
            torch.zeros(len(_FLOAT), dtype=torch.float64, device=dev))


@contextlib.contextmanager
def refusing_on_error(group, hidden):
    """Around a rank's input checks: a ValueError they raise is first announced to the other ranks
    (`refuse`, when `group` is not None), then raised here."""
    try:
        yield
    except ValueError:
        if group is not None:
            refuse(group, hidden)
        raise


def vocab_layout(group, x: Inputs, options: LCEOptions) -> tuple[int, int]:
    """(vocab_start, V_total) of this rank's slice. Checks on every rank that all ranks agree on the
    labeled rows (targets, and a checksum of their hidden states, token weights and target
    probabilities), hard or soft targets and K, the hidden size, the options and which gradients
    are computed, so a mismatch is a ValueError everywhere rather than a hang in a later collective
    or a silently wrong loss."""
    hidden, weight, bias, token_weights, num_items = x.hidden, x.weight, x.bias, x.token_weights, x.num_items
    q = x.target_probs
    ignore_index = options.ignore_index
    dev = hidden.device
    D = hidden.shape[-1]
    # (positions, K): K = 1 for hard targets; slot 0 says whether a position is labeled
    K = 1 if q is None else x.targets.shape[-1]
    flat_t = x.targets.reshape(-1, K).to(torch.int64)
    labeled = flat_t[:, 0] != ignore_index
    n = int(labeled.sum())
    slot_pos = torch.arange(1, flat_t.numel() + 1, device=dev, dtype=torch.int64).view(-1, K)
    pos = torch.arange(1, flat_t.shape[0] + 1, device=dev, dtype=torch.int64)
    # position-weighted over every slot: catches permuted targets, rows or slots too
    t_check = torch.where(labeled[:, None], flat_t * slot_pos, 0).sum()

    def mix(p):
        # bounded distinct weights in [1, 2) for the float sums, so the tolerance (relative to the sum
        # of magnitudes) stays proportionate to one row's size at any row count
        return 1 + ((p * 40503) % 65536).double() / 65536

    posf = mix(pos)
    # one matvec over the hidden rows (no copy of them); column weights make it see columns too
    cols = torch.linspace(1.0, 2.0, D, device=dev, dtype=hidden.dtype)
    r = (hidden.reshape(-1, D) @ cols).double()
    h_sum = torch.where(labeled, r * posf, 0).sum()
    h_scale = torch.where(labeled, r.abs() * posf, 0).sum()
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    if token_weights is not None:
        tw = token_weights.reshape(-1).double()
        tw_sum = torch.where(labeled, tw * posf, 0).sum()
        tw_scale = torch.where(labeled, tw.abs() * posf, 0).sum()
    else:
        tw_sum = tw_scale = zero
    if q is not None:  # the probabilities: same ids and totals can still split differently
        qd, qf = q.reshape(-1, K).double(), mix(slot_pos)
        q_sum = torch.where(labeled[:, None], qd * qf, 0).sum()
        q_scale = torch.where(labeled[:, None], qd.abs() * qf, 0).sum()
    else:
        q_sum = q_scale = zero
    grad_on = torch.is_grad_enabled()
    if num_items is None:
        n_items = torch.tensor(-1, dtype=torch.int64, device=dev)
    else:  # a device tensor stays on the device: no host sync
        n_items = torch.as_tensor(num_items, device=dev).double().reshape(()).view(torch.int64)
    head = [1, weight.shape[0], n, D, FLOAT_DTYPES.index(hidden.dtype),
            int(grad_on and hidden.requires_grad), int(grad_on and weight.requires_grad), int(bias is not None),
            int(bias is not None and grad_on and bias.requires_grad), int(token_weights is not None),
            int(q is not None), K]
    codes = [_option_code(getattr(options, name)) for name in _OPTIONS]
    exact = torch.cat([torch.tensor(head, dtype=torch.int64, device=dev), n_items.reshape(1),
                       t_check.reshape(1), torch.tensor(codes, dtype=torch.int64, device=dev)])
    floats = torch.stack([h_sum, h_scale, tw_sum, tw_scale, q_sum, q_scale])
    ex, fl = _gather(group, exact, floats)

    bad = (ex[:, 0] == 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"process_group: rank(s) {bad} refused their inputs with a ValueError (see the error "
                         "there); every rank must pass valid, identical hidden rows, targets and options")
    differ = [name for i, name in enumerate(_EXACT) if name != "V_local" and (ex[:, i] != ex[0, i]).any()]
    for name, c, s in (("hidden", 0, 1), ("token_weights", 2, 3), ("target_probs", 4, 5)):
        a, b = fl[:, c], fl[0, c]
        same = (a == b) | ((a - b).abs() <= _RTOL * fl[:, s].abs().max()) | (a.isnan() & b.isnan())
        if not bool(same.all()):
            differ.append(name)
    if differ:
        per_rank = {name: ex[:, _EXACT.index(name)].tolist() for name in differ if name in _EXACT}
        raise ValueError(
            f"process_group: ranks disagree on {', '.join(differ)} (per rank: {per_rank}); every rank must "
            "pass the same hidden rows, targets and options, and its own slice of the vocabulary")
    sizes = ex[:, 1]
    if (sizes <= 0).any():
        raise ValueError(f"weight: every rank needs a non-empty vocabulary slice, got sizes {sizes.tolist()}")
    rank = dist.get_rank(group)
    starts = torch.cumsum(sizes, 0) - sizes
    return int(starts[rank]), int(sizes.sum())


def slice_targets(t: torch.Tensor, vocab_start: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(local ids, mine) of global ids t (any shape) on the slice [vocab_start, +V): mine says
    which ids lie in it; elsewhere the local id is 0, a valid column whose term the caller zeroes."""
    tl = t - vocab_start
    mine = (tl >= 0) & (tl < V)
    return torch.where(mine, tl, torch.zeros_like(tl)), mine


def lce_torch_vocab_parallel(h, weight, bias, targets, scale, options: LCEOptions, grads: Grads, *,
                             coll: Collectives, vocab_start: int, vocab_total: int, q=None):
    """`CompactBackend.rows` on this rank's slice [vocab_start, +V_local) of a vocabulary of
    vocab_total; targets are global ids ((n,), or (n, K) with probabilities q (n, K) for soft
    targets). dh is already summed over ranks; the argmax is computed always (free in this pass)."""
    eps, zl, softcap = options.label_smoothing, options.z_loss, options.softcap
    grad_h, grad_w, grad_b = grads
    n, D = h.shape
    V = weight.shape[0]
    dev = h.device
    W = compute_weight(weight)
    b = bias.float() if bias is not None else None
    any_grad = grad_h or grad_w or grad_b

    loss, lse, pred, dh, dW, db = row_outputs(n, D, V, dev, grad_h, grad_w, grad_b)
    if n == 0:
        return loss, lse, pred, dh, dW, db

    # sized by the global vocabulary: every rank must walk the same chunks
    m_max = options.chunk_rows or chunk_rows_for(n, vocab_total, dev)
    buf = torch.empty(m_max, V, dtype=torch.float32, device=dev)
    buf2 = torch.empty(m_max, V, dtype=torch.float32, device=dev) if softcap is not None else None
    for s0 in range(0, n, m_max):
        s1 = min(n, s0 + m_max)
        m = s1 - s0
        hc, x = chunk_logits(h, s0, s1, W, b, out=buf[:m])
        if softcap is not None:
            x.div_(softcap).tanh_()
            y = torch.mul(x, softcap, out=buf2[:m])
        else:
            y = x
        tl, mine = slice_targets(targets[s0:s1], vocab_start, V)
        zero = torch.zeros((), device=dev)
        if q is None:
            y_t = torch.where(mine, y.gather(1, tl[:, None]).squeeze(1), zero)
            qm = None
        else:  # this slice's part of sum_k q_k y[t_k]: the all-reduce below adds the other slices'
            qm = torch.where(mine, q[s0:s1], zero)
            y_t = (torch.where(mine, y.gather(1, tl), zero) * qm).sum(1)
        y_sum = y.sum(1) if eps else torch.zeros(m, device=dev)
        mx, amax = y.max(1)

        big_m = coll.max_(mx.clone())
        e = y.sub_(mx[:, None]).exp_()
        packed = torch.stack([e.sum(1) * torch.exp(mx - big_m), y_t, y_sum])
        ssum, y_t, y_sum = coll.sum_(packed).unbind(0)
        # first global argmax: the smallest global index among ranks holding the max
        cand = torch.where(mx == big_m, amax + vocab_start, torch.full_like(amax, vocab_total))
        gmax = coll.min_(cand)
        pred[s0:s1] = gmax

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
        # explicit G on this slice: the one-hot term only where the target is in the slice (soft:
        # qm is 0 for slots elsewhere)
        c1 = sc * (1 - eps) if q is not None else torch.where(mine, sc * (1 - eps), zero)
        explicit_grad_gemms(e, a, torch.arange(m, device=dev), tl, c1, sc * (eps / vocab_total) if eps else None,
                            x if softcap is not None else None, W, hc, dh[s0:s1] if grad_h else None, dW, db,
                            first=s0 == 0, q=qm)
    if grad_h:
        coll.sum_(dh)
    return loss, lse, pred, dh, dW, db


class VocabParallelBackend(CompactBackend):
    """The PyTorch path over a vocabulary-parallel head; made per call (it holds the group and,
    after `prepare`, this rank's slice). Not traceable by torch.compile: no custom op."""

    name = "vocab_parallel"

    def __init__(self, group):
        self.coll = Collectives(group)
        self.vocab_start = self.vocab_total = None

    def prepare(self, x: Inputs, options: LCEOptions) -> None:
        self.vocab_start, self.vocab_total = vocab_layout(self.coll.group, x, options)

    def vocab_size(self, weight: torch.Tensor) -> int:
        return self.vocab_total

    def rows(self, h, weight, bias, t, scale, options: LCEOptions, grads: Grads, q=None):
        return lce_torch_vocab_parallel(h, weight, bias, t, scale, options, grads, coll=self.coll,
                                        vocab_start=self.vocab_start, vocab_total=self.vocab_total, q=q)
