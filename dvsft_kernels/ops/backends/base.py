"""What a backend is, and the compacting machinery three of them share.

A backend computes the op on full positions: `forward` returns the op's outputs and a NamedTuple of
what `backward` needs; `backward` turns an upstream gradient into the inputs' gradients. For the
custom op (ops/custom_op.py), whose outputs need shapes known before it runs, a backend also says
how its saved state travels as four fixed-shape auxiliary tensors (`op_forward`, `fake_aux`,
`op_formula`, `op_backward`).

"torch", "chunked" and the vocabulary-parallel backend compact the labeled rows first (one host
sync: the row count sizes the work), so ignored rows are never projected. For "mean" and "sum"
the gradients are formed in the forward, chunk by chunk, with each row's gradient scale known in
advance (w_i / n or w_i); backward only multiplies by the incoming scalar. For "none" the per-row
upstream gradient is known only in backward, so backward recomputes the logits (8 n D V FLOPs in
all instead of 6).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from dvsft_kernels.ops.options import LCEOptions, mean_denominator, safe_reciprocal


class Inputs(NamedTuple):
    """The op's tensors. Hard targets: `targets` is shaped like the positions. Soft targets:
    `targets` (*positions, K) int64 and `target_probs` (*positions, K) float32, as
    `function.soft_targets` prepares them: ordered by weight, unused slots repeating slot 0 with
    probability 0, every slot ignore_index where the row is unlabeled, and probabilities summing to
    1 per labeled row (or 0: the row's total weight is 0 and rides on `token_weights`). A backend
    computes the hard formula with z_t and onehot(t) replaced by sum_k p_k z_{t_k} and
    sum_k p_k onehot(t_k)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    token_weights: torch.Tensor | None
    num_items: int | torch.Tensor | None
    target_probs: torch.Tensor | None = None

    def row_shape(self) -> torch.Size:
        """The shape of the positions (and of per-position outputs)."""
        return self.targets.shape if self.target_probs is None else self.targets.shape[:-1]

    def row_targets(self) -> torch.Tensor:
        """One target per position, flat: slot 0 for soft targets (labeled iff != ignore_index)."""
        t = self.targets if self.target_probs is None else self.targets[..., 0]
        return t.reshape(-1)


class Grads(NamedTuple):
    """Which inputs want a gradient."""

    hidden: bool
    weight: bool
    bias: bool


class Forward(NamedTuple):
    """The op's outputs: `out` (scalar, or shaped like targets for "none"), and per position
    `row_loss`, `lse` (float32) and `predicted` (int64 argmax, -1 where there is no target or the
    backend was not asked for it)."""

    out: torch.Tensor
    row_loss: torch.Tensor
    lse: torch.Tensor
    predicted: torch.Tensor


class Meta(NamedTuple):
    """What backward needs to know of the inputs besides the saved tensors."""

    hidden_shape: torch.Size
    hidden_dtype: torch.dtype
    weight_dtype: torch.dtype
    bias_dtype: torch.dtype | None

    @classmethod
    def of(cls, x: Inputs) -> Meta:
        return cls(x.hidden.shape, x.hidden.dtype, x.weight.dtype, None if x.bias is None else x.bias.dtype)


def empty_aux(ref: torch.Tensor) -> torch.Tensor:
    """Placeholder for an absent auxiliary output or gradient of the custom op."""
    return ref.new_empty(0, dtype=torch.float32)


class Backend:
    """One way of computing the op. Subclasses set `name` and implement forward / backward, and the
    custom-op hooks unless they cannot run under torch.compile."""

    name: str = ""

    def prepare(self, x: Inputs, options: LCEOptions) -> None:
        """Per-call setup after validation (the vocabulary-parallel agreement check)."""

    def forward(self, x: Inputs, options: LCEOptions, grads: Grads) -> tuple[Forward, tuple]:
        raise NotImplementedError

    def backward(self, saved: tuple, g: torch.Tensor, options: LCEOptions, grads: Grads, meta: Meta):
        raise NotImplementedError

    def saves_gradients(self, options: LCEOptions) -> bool:
        """The forward formed gradients that backward scales in place: a second backward through
        the same graph would see them scaled twice, so it must raise."""
        return False

    # ---- custom op ----------------------------------------------------------------------------
    def op_forward(self, x: Inputs, options: LCEOptions, grads: Grads) -> tuple[Forward, tuple]:
        """(outputs, four auxiliary tensors whose shapes `fake_aux` predicts)."""
        raise NotImplementedError(f"impl={self.name!r} has no custom op")

    def fake_aux(self, x: Inputs, options: LCEOptions, grads: Grads) -> tuple:
        raise NotImplementedError(f"impl={self.name!r} has no custom op")

    def op_formula(self, aux: tuple, g: torch.Tensor, options: LCEOptions, grads: Grads, meta: Meta):
        """Gradients straight from the auxiliary outputs (traceable ops), or None: then the
        autograd formula calls the backward op, which runs `op_backward`."""
        return

    def op_backward(self, x: Inputs, aux: tuple, g: torch.Tensor, options: LCEOptions, grads: Grads):
        raise NotImplementedError(f"impl={self.name!r} has no custom op")


# ------------------------------------------------------------------ compacting backends
class CompactGrads(NamedTuple):
    """mean / sum: the gradients formed in the forward (dh of the compacted rows), unscaled by g."""

    idx: torch.Tensor
    dh: torch.Tensor | None
    dW: torch.Tensor | None
    db: torch.Tensor | None


class CompactRows(NamedTuple):
    """none: the compacted rows, recomputed from in backward."""

    idx: torch.Tensor
    h: torch.Tensor
    t: torch.Tensor
    w: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor | None
    q: torch.Tensor | None = None  # soft targets: (n, K) probabilities of t (n, K)


def compact_rows(x: Inputs, ignore_index: int, V: int):
    """(idx, t, h, w, q): positions of the labeled targets (a host sync sizes them), their targets
    (int64, range-checked; (n,) or, soft, (n, K)), hidden rows, float32 token weights (or None)
    and, soft, the (n, K) float32 target probabilities (else None)."""
    D = x.hidden.shape[-1]
    idx = (x.row_targets() != ignore_index).nonzero().squeeze(1)
    q = None
    if x.target_probs is None:
        t = x.targets.reshape(-1).index_select(0, idx).long()
    else:
        K = x.targets.shape[-1]
        t = x.targets.reshape(-1, K).index_select(0, idx).long()
        q = x.target_probs.reshape(-1, K).index_select(0, idx).float()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
        raise ValueError(f"targets: values must lie in [0, {V}) or equal ignore_index={ignore_index}")
    h = x.hidden.reshape(-1, D).index_select(0, idx)
    tw = x.token_weights
    w = tw.reshape(-1).index_select(0, idx).float() if tw is not None else None
    return idx, t, h, w, q


def scale_output(x: torch.Tensor, g: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x * g in dtype in one pass: the multiply writes the cast result (a float32 dW scaled in
    place, then cast, would move 7 B per element instead of 3 for a 16-bit weight)."""
    if g is None:
        return x.to(dtype)
    if x.dtype == dtype:
        return x.mul_(g)
    return torch.mul(x, g, out=torch.empty(x.shape, dtype=dtype, device=x.device))


class PrecomputedLayout:
    """Custom-op hooks of the "precomputed" auxiliary layout (below): mean / sum scale the gradients
    formed in the forward, "none" calls the backward op."""

    def fake_aux(self, x: Inputs, options: LCEOptions, grads: Grads) -> tuple:
        return fake_precomputed_aux(x, options, grads)

    def op_formula(self, aux, g, options: LCEOptions, grads: Grads, meta: Meta):
        if options.reduction == "none":
            return None
        return precomputed_formula(aux, g, grads, meta)


class CompactBackend(PrecomputedLayout, Backend):
    """Compacts the labeled rows, then runs `rows` on them (the backend's own product)."""

    def rows(self, h, weight, bias, t, scale, options: LCEOptions, grads: Grads, q=None):
        """(loss, lse, predicted, dh, dW, db) of the compacted rows: h (n, D), t (n,) int64 in
        [0, V), scale (n,) float32 (each row's loss gradient; needed only for gradients). loss is per
        row and unscaled; dh (n, D), dW (V, D), db (V,) float32 or None where not asked. Soft
        targets: t (n, K) and q (n, K) float32 probabilities (`Inputs`)."""
        raise NotImplementedError

    def vocab_size(self, weight: torch.Tensor) -> int:
        return weight.shape[0]

    def saves_gradients(self, options: LCEOptions) -> bool:
        return options.reduction != "none"

    def forward(self, x: Inputs, options: LCEOptions, grads: Grads) -> tuple[Forward, tuple]:
        hidden, shape = x.hidden, x.row_shape()
        reduction = options.reduction
        idx, t, h, w, q = compact_rows(x, options.ignore_index, self.vocab_size(x.weight))
        n = t.shape[0]
        N = math.prod(shape)
        if reduction == "mean":
            inv = safe_reciprocal(mean_denominator(n, x.num_items, hidden.device))
            scale = inv.expand(n) if w is None else w * inv
        else:
            scale = w if w is not None else torch.ones(n, device=hidden.device, dtype=torch.float32)

        pre = reduction != "none" and any(grads)
        row_loss, lse, pred, dh, dW, db = self.rows(
            h, x.weight, x.bias, t, scale, options,
            Grads(grads.hidden and pre, grads.weight and pre, grads.bias and pre), q=q)

        def scatter(v, dtype, fill=0):
            out = torch.full((N,), fill, dtype=dtype, device=hidden.device)
            return out.index_copy_(0, idx, v.to(dtype)).reshape(shape)

        if reduction == "none":
            out = scatter(row_loss * w if w is not None else row_loss, torch.float32)
        else:
            out = (row_loss * scale).sum()
        fwd = Forward(out, scatter(row_loss, torch.float32), scatter(lse, torch.float32),
                      scatter(pred, torch.int64, -1))
        saved = CompactRows(idx, h, t, w, x.weight, x.bias, q) if reduction == "none" else CompactGrads(idx, dh, dW, db)
        return fwd, saved

    def backward(self, saved, g, options: LCEOptions, grads: Grads, meta: Meta):
        if isinstance(saved, CompactRows):
            gs = g.reshape(-1).index_select(0, saved.idx).float()
            scale = gs * saved.w if saved.w is not None else gs
            _, _, _, dh, dW, db = self.rows(saved.h, saved.weight, saved.bias, saved.t, scale, options, grads,
                                            q=saved.q)
            g = None
        else:
            dh, dW, db = saved.dh, saved.dW, saved.db
            g = g.float()
            # the usual upstream gradient of a loss is exactly 1 (checked for free on CPU): then the
            # saved gradients are the answer
            if g.device.type == "cpu" and g.item() == 1.0:
                g = None
        d_hidden = d_weight = d_bias = None
        if grads.hidden:
            D = meta.hidden_shape[-1]
            d_hidden = torch.zeros(math.prod(meta.hidden_shape[:-1]), D, dtype=meta.hidden_dtype, device=dh.device)
            d_hidden.index_copy_(0, saved.idx, scale_output(dh, g, meta.hidden_dtype))
            d_hidden = d_hidden.reshape(meta.hidden_shape)
        if grads.weight:
            d_weight = scale_output(dW, g, meta.weight_dtype)
        if grads.bias:
            d_bias = scale_output(db, g, meta.bias_dtype)
        return d_hidden, d_weight, d_bias

    # ---- custom op: mean / sum carry the gradients formed in the forward, "none" nothing ------
    def op_forward(self, x: Inputs, options: LCEOptions, grads: Grads) -> tuple[Forward, tuple]:
        fwd, saved = self.forward(x, options, grads)
        ref = x.hidden
        if isinstance(saved, CompactRows) or not any(grads):
            return fwd, tuple(empty_aux(ref) for _ in range(4))
        dh = saved.dh
        if dh is not None:
            full = torch.zeros(math.prod(x.row_shape()), ref.shape[-1], dtype=torch.float32, device=ref.device)
            dh = full.index_copy_(0, saved.idx, dh).reshape(ref.shape)
        return fwd, precomputed_aux(ref, dh, saved.dW, saved.db)

    def op_backward(self, x: Inputs, aux, g, options: LCEOptions, grads: Grads):
        idx, t, h, w, q = compact_rows(x, options.ignore_index, self.vocab_size(x.weight))
        return self.backward(CompactRows(idx, h, t, w, x.weight, x.bias, q), g, options, grads, Meta.of(x))


# The "precomputed" auxiliary layout (compacting backends and the run-time "auto" of the custom op):
# for mean / sum with gradients, dh by position (float32, shaped like hidden), dW, db; else empty.
def precomputed_aux(ref, dh, dW, db) -> tuple:
    return tuple(v if v is not None else empty_aux(ref) for v in (dh, dW, db)) + (empty_aux(ref),)


def fake_precomputed_aux(x: Inputs, options: LCEOptions, grads: Grads) -> tuple:
    ref = x.hidden
    if options.reduction == "none" or not any(grads):
        return tuple(empty_aux(ref) for _ in range(4))
    V, D = x.weight.shape
    f32 = torch.float32
    return (ref.new_empty(ref.shape, dtype=f32) if grads.hidden else empty_aux(ref),
            ref.new_empty(V, D, dtype=f32) if grads.weight else empty_aux(ref),
            ref.new_empty(V, dtype=f32) if grads.bias else empty_aux(ref), empty_aux(ref))


def precomputed_formula(aux, g, grads: Grads, meta: Meta):
    g = g.float()
    dh, dW, db, _ = aux
    return ((dh * g).to(meta.hidden_dtype) if grads.hidden else None,
            (dW * g).to(meta.weight_dtype) if grads.weight else None,
            (db * g).to(meta.bias_dtype) if grads.bias else None)
