"""DVLoss against a plain full-logits computation written here from DESIGN.md section 4.2."""

from __future__ import annotations

import pytest
import torch

from dvsft_kernels import DVLoss

from ..syncs import OpLog

IGN = -100


def plain_dvsft(hidden, weight, labels, vision_labels, *, shift=True, vision_shift=False, text_weight=1.0,
                vision_weight=1.0, num_text=None, num_vis=None, bias=None):
    """float64 full logits, each stream shifted (or not) and normalised on its own. The defaults are
    the contract's: text shifted, vision not; vision_shift=None follows `shift`."""
    vision_shift = shift if vision_shift is None else vision_shift
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logp = torch.log_softmax(logits, -1)

    def stream(lab, sh, denom):
        if lab is None:
            return torch.zeros((), dtype=torch.float64), 0, 0
        lp, lb = (logp[:, :-1], lab[:, 1:]) if sh else (logp, lab)
        m = lb != IGN
        nll = -lp.gather(-1, lb.clamp_min(0)[..., None]).squeeze(-1)
        total = (nll * m).sum()
        d = denom if denom is not None else int(m.sum())
        acc = ((lp.argmax(-1) == lb) & m).sum().item() / max(1, int(m.sum()))
        return (total / d if d else total * 0), int(m.sum()), acc

    tl, tn, ta = stream(labels, shift, num_text)
    vl, vn, va = stream(vision_labels, vision_shift, num_vis)
    return text_weight * tl + vision_weight * vl, tl, vl, tn, vn, ta, va


def make(B=2, T=23, D=16, V=61, seed=0, vision_frac=0.4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.7
    labels = torch.full((B, T), IGN)
    labels[:, T - 6:] = torch.randint(0, V, (B, 6), generator=g)  # answer text at the end
    vision = torch.full((B, T), IGN)
    pos = torch.arange(2, 2 + 12)
    keep = torch.rand(B, 12, generator=g) < vision_frac / 0.4 * 0.6
    vl = torch.randint(0, V, (B, 12), generator=g)
    vision[:, pos] = torch.where(keep, vl, torch.full_like(vl, IGN))
    return hidden, weight, labels, vision


@pytest.mark.parametrize("shift, vision_shift", [(True, None), (True, False), (True, True), (False, False),
                                                 (False, None)])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0)])
@pytest.mark.parametrize("nums", [(None, None), (9, 40)])
def test_matches_plain_full_logits(shift, vision_shift, weights, nums):
    hidden, weight, labels, vision = make()
    tw, vw = weights
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = DVLoss(vw, text_weight=tw, shift=shift, vision_shift=vision_shift, impl="torch")(
        h, w, labels, vision, num_text_items=nums[0], num_vision_items=nums[1])
    out.loss.backward()
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    ref = plain_dvsft(h64, w64, labels, vision, shift=shift, vision_shift=vision_shift, text_weight=tw,
                      vision_weight=vw, num_text=nums[0], num_vis=nums[1])
    ref[0].backward()
    torch.testing.assert_close(out.loss.double(), ref[0].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.text_loss.double(), ref[1].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.vision_loss.double(), ref[2].detach(), rtol=1e-5, atol=1e-6)
    assert int(out.text_tokens) == ref[3] and int(out.vision_tokens) == ref[4]
    assert abs(out.text_accuracy.item() - ref[5]) < 1e-6 and abs(out.vision_accuracy.item() - ref[6]) < 1e-6
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_default_vision_stream_is_unshifted():
    """DVLoss() with no shift arguments: text shifted (HF), vision not (each visual token's own output)."""
    hidden, weight, labels, vision = make(seed=3)
    h = hidden.clone().requires_grad_()
    out = DVLoss(impl="torch")(h, weight, labels, vision)
    out.loss.backward()
    h64 = hidden.double().requires_grad_()
    ref = plain_dvsft(h64, weight, labels, vision, shift=True, vision_shift=False)
    ref[0].backward()
    shifted = plain_dvsft(hidden, weight, labels, vision, shift=True, vision_shift=True)
    assert abs(shifted[2].item() - ref[2].item()) > 0.1  # the two forms differ on this input
    torch.testing.assert_close(out.vision_loss.double(), ref[2].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), ref[0].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    assert DVLoss().vision_shift is False and DVLoss(vision_shift=None).vision_shift is True


def test_accuracy_is_exact_on_a_planted_answer():
    D = V = 8
    weight = torch.eye(V) * 5
    hidden = torch.zeros(1, 6, D)
    vision = torch.tensor([[3, 4, 5, IGN, IGN, IGN]])
    hidden[0, 0, 3] = hidden[0, 1, 4] = 1.0  # rows 0, 1 predict their target; row 2 does not
    hidden[0, 2, 1] = 1.0
    out = DVLoss(impl="torch", vision_shift=False)(hidden, weight, None, vision)
    assert out.vision_accuracy.item() == pytest.approx(2 / 3)
    assert int(out.vision_tokens) == 3 and int(out.text_tokens) == 0 and out.text_loss.item() == 0.0


def test_no_vision_targets_keeps_loss_finite():
    hidden, weight, labels, _ = make()
    h = hidden.requires_grad_()
    out = DVLoss(impl="torch")(h, weight, labels, torch.full_like(labels, IGN))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.vision_loss.item() == 0.0 and torch.isfinite(h.grad).all()
    assert out.vision_accuracy.item() == 0.0


def test_no_targets_at_all_is_zero():
    hidden, weight, labels, vision = make()
    h = hidden.requires_grad_()
    out = DVLoss(impl="torch")(h, weight, torch.full_like(labels, IGN), torch.full_like(vision, IGN))
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_metrics_are_plain_floats():
    hidden, weight, labels, vision = make()
    m = DVLoss(impl="torch")(hidden, weight, labels, vision).metrics()
    assert set(m) == {"text_loss", "vision_loss", "text_tokens", "vision_tokens", "text_accuracy",
                      "vision_accuracy"}
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize("case, name", [
    ("overlap", "vision_labels"),
    ("shape", "vision_labels"),
    ("oov", "vision_labels"),
    ("oov_text", "labels"),
    ("neither", "labels"),
    ("hidden2d", "hidden"),
    ("weight_neg", "vision_weight"),
    ("num_bad", "num_text_items"),
])
def test_bad_input(case, name):
    hidden, weight, labels, vision = make()
    kw = {}
    loss = DVLoss(impl="torch")
    if case == "overlap":
        vision = labels.clone()
    elif case == "shape":
        vision = vision[:, :-1]
    elif case == "oov":
        vision[0, 3] = weight.shape[0]
    elif case == "oov_text":
        labels[0, -1] = -5
    elif case == "neither":
        labels = vision = None
    elif case == "hidden2d":
        hidden = hidden[0]
    elif case == "weight_neg":
        with pytest.raises(ValueError, match=f"^{name}"):
            DVLoss(-1.0)
        return
    elif case == "num_bad":
        kw = {"num_text_items": -3}
    with pytest.raises(ValueError, match=f"^{name}"):
        loss(hidden, weight, labels, vision, **kw)


# ---------------------------------------------------------------- no host synchronisation
def _interpreter_or_cuda():
    import os
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.interpreter
@pytest.mark.skipif(not _interpreter_or_cuda(), reason="impl='fused' needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")
def test_sync_free_step_has_no_host_syncs_and_same_result(monkeypatch):
    """While a CUDA graph is captured (or torch.compile traces), DVLoss with impl='fused' waits on
    nothing: no op reads a device value on the host; loss and gradients equal the checked path's."""
    import dvsft_kernels.loss as loss_mod

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, labels, vision = (x.to(dev) for x in make())
    fn = DVLoss(vision_weight=0.7, impl="fused")
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = fn(h1, w1, labels, vision, num_text_items=9)
    ref.loss.backward()
    monkeypatch.setattr(loss_mod, "no_host_sync_allowed", lambda: True)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    log = OpLog()
    with log:
        out = fn(h2, w2, labels, vision, num_text_items=9)
        out.loss.backward()
    assert not log.host_syncs(), log.host_syncs()
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.vision_accuracy, ref.vision_accuracy)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-7)
    # the checks that would have raised become NaN
    bad = vision.clone()
    bad[0, 3] = weight.shape[0]  # out of the vocabulary
    assert torch.isnan(fn(hidden, weight, labels, bad).loss)
    assert torch.isnan(fn(hidden, weight, labels, labels.clone()).loss)  # every text target in both streams


def test_compile_fullgraph_dvloss():
    """torch.compile(fullgraph=True) over a DVLoss step: no graph break (the host-side checks are
    skipped while tracing), the same loss, stream figures and gradients as eager."""
    hidden, weight, labels, vision = make()
    fn = DVLoss(vision_weight=0.5, impl="torch")

    def forward(h, w):
        out = fn(h, w, labels, vision, num_vision_items=7)
        return out.loss, out.text_loss, out.vision_loss, out.vision_accuracy

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = forward(h1, w1)
    ref[0].backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = torch.compile(forward, fullgraph=True, backend="aot_eager")(h2, w2)
    got[0].backward()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_captures_a_dvloss_step():
    """A DVLoss training step (impl='auto' -> 'fused' while capturing) in a CUDA graph, replayed
    with new labels, equals the eager step on those labels."""
    hidden, weight, labels, vision = (x.cuda() for x in make(T=40, V=300, D=64))
    h = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16().requires_grad_()
    fn = DVLoss(vision_weight=0.5)
    lab, vis = labels.clone(), vision.clone()

    def step():
        h.grad = w.grad = None
        out = fn(h, w, lab, vis)
        out.loss.backward()
        return out.loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        DVLoss(vision_weight=0.5, impl="fused")(h, w, lab, vis).loss.backward()  # compile the kernels
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    _, _, lab2, vis2 = make(T=40, V=300, D=64, seed=5)
    lab.copy_(lab2.cuda())
    vis.copy_(vis2.cuda())
    graph.replay()
    torch.cuda.synchronize()
    ref = DVLoss(vision_weight=0.5, impl="torch")(h.detach().float(), w.detach().float(), lab, vis).loss
    torch.testing.assert_close(loss.float(), ref, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- options, bias, ignore_index
def full_reference(hidden, weight, labels, vision_labels, *, bias=None, label_smoothing=0.0, z_loss=0.0,
                   softcap=None, ignore_index=IGN, text_weight=1.0, vision_weight=1.0):
    """DESIGN 4.1 / 4.2 from float64 full logits: text shifted, vision not; per row
    (1 - eps) * (lse - z_t) + eps * (lse - mean z) + z_loss * lse**2 on the (soft-capped) logits,
    each stream's sum over its own count. Returns (loss, text_loss, vision_loss)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, -1)
    eps = label_smoothing

    def stream(zz, ll, lab):
        m = lab != ignore_index
        if not m.any():
            return zz.sum() * 0
        zt = zz.gather(-1, torch.where(m, lab, 0)[..., None]).squeeze(-1)
        row = (1 - eps) * (ll - zt) + eps * (ll - zz.mean(-1)) + z_loss * ll**2
        return row[m].sum() / m.sum()

    text = stream(z[:, :-1], lse[:, :-1], labels[:, 1:])
    vis = stream(z, lse, vision_labels)
    return text_weight * text + vision_weight * vis, text, vis


OPTION_SETS = {
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.5},
    "bias": {"bias": True},
    "all": {"bias": True, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 2.5},
}


def _close(name, got, ref, rel=2e-5):
    """float32 against float64: max error within rel of the reference's largest entry."""
    err = (got.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    assert scale > 0, f"{name}: empty reference"
    assert err <= rel * scale, f"{name}: max error {err:.3g}, scale {scale:.3g}"


def _run(loss_fn, hidden, weight, bias, labels, vision):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    out = loss_fn(h, w, labels, vision, bias=b)
    out.loss.backward()
    return out, h.grad, w.grad, (b.grad if b is not None else None)


def _reference(hidden, weight, bias, labels, vision, **kw):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    b = bias.double().requires_grad_() if bias is not None else None
    loss, text, vis = full_reference(h, w, labels, vision, bias=b, **kw)
    loss.backward()
    return loss.detach(), text.detach(), vis.detach(), h.grad, w.grad, (b.grad if b is not None else None)


@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_options_and_bias_match_full_logits(options):
    """label_smoothing, z_loss, softcap and a bias: loss, both stream losses and the gradients of
    hidden, weight and bias against the float64 full-logits reference."""
    opts = dict(OPTION_SETS[options])
    hidden, weight, labels, vision = make(seed=4)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(9)) if opts.pop("bias", False) \
        else None
    fn = DVLoss(0.7, text_weight=1.3, impl="torch", **opts)
    out, gh, gw, gb = _run(fn, hidden, weight, bias, labels, vision)
    ref = _reference(hidden, weight, bias, labels, vision, text_weight=1.3, vision_weight=0.7, **opts)
    _close("loss", out.loss, ref[0])
    _close("text_loss", out.text_loss, ref[1])
    _close("vision_loss", out.vision_loss, ref[2])
    _close("d_hidden", gh, ref[3])
    _close("d_weight", gw, ref[4])
    if bias is not None:
        _close("d_bias", gb, ref[5])
    # the option changes the loss on this input: a DVLoss that dropped it could not pass
    plain = _reference(hidden, weight, bias if options not in ("bias", "all") else None, labels, vision,
                       text_weight=1.3, vision_weight=0.7)
    assert abs(plain[0].item() - ref[0].item()) > 1e-3 * abs(ref[0].item())


IMPLS = ["torch", pytest.param("fused", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ignore_index", [-1, 7])
def test_ignore_index(impl, ignore_index):
    """DVLoss(ignore_index=k): both streams use k for "no target" (the shift pads with k too); with k
    in [0, V) that id is never a target."""
    if impl == "fused" and not _interpreter_or_cuda():
        pytest.skip("impl='fused' needs CUDA or TRITON_INTERPRET=1")
    hidden, weight, labels, vision = make(seed=6)
    V = weight.shape[0]
    labels, vision = (torch.where(x == IGN, ignore_index, torch.where(x == ignore_index, (x + 1) % V, x))
                      for x in (labels, vision))
    assert (labels == -100).sum() == 0 and (vision == ignore_index).any()
    bias = torch.randn(V, generator=torch.Generator().manual_seed(2))
    fn = DVLoss(0.5, impl=impl, ignore_index=ignore_index, label_smoothing=0.1)
    out, gh, gw, gb = _run(fn, hidden, weight, bias, labels, vision)
    ref = _reference(hidden, weight, bias, labels, vision, ignore_index=ignore_index, vision_weight=0.5,
                     label_smoothing=0.1)
    for name, got, want in zip(("loss", "text_loss", "vision_loss", "d_hidden", "d_weight", "d_bias"),
                               (out.loss, out.text_loss, out.vision_loss, gh, gw, gb), ref):
        _close(name, got, want)
    assert int(out.text_tokens) == int((labels[:, 1:] != ignore_index).sum())
    assert int(out.vision_tokens) == int((vision != ignore_index).sum())
    if impl == "torch":  # -100 is now an id outside [0, V): refused, naming the stream
        bad = vision.clone()
        bad[0, 3] = -100
        with pytest.raises(ValueError, match="^vision_labels: ids must lie in"):
            fn(hidden, weight, labels, bad)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_return_predictions_match_full_logits(softcap):
    """predicted / probability at every position with a target (either stream) equal the float64
    argmax and softmax probability of the full logits; -1 / 0 elsewhere; absent by default."""
    hidden, weight, labels, vision = make(seed=3)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(4))
    out = DVLoss(0.5, softcap=softcap, return_predictions=True)(hidden, weight, labels, vision, bias=bias)
    z = hidden.double() @ weight.double().T + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    p = z.softmax(-1)
    text_t = torch.full_like(labels, IGN)
    text_t[:, :-1] = labels[:, 1:]  # the HF shift of the text stream; vision unshifted
    has = (text_t != IGN) | (vision != IGN)
    top = z.argmax(-1)
    assert torch.equal(out.predicted[has], top[has]) and bool((out.predicted[~has] == -1).all())
    torch.testing.assert_close(out.probability[has].double(), p.gather(-1, top[..., None])[..., 0][has],
                               rtol=1e-5, atol=1e-6)
    assert bool((out.probability[~has] == 0).all())
    plain = DVLoss(0.5, softcap=softcap)(hidden, weight, labels, vision, bias=bias)
    assert plain.predicted is None and plain.probability is None
    torch.testing.assert_close(plain.loss, out.loss)


def test_return_predictions_errors():
    with pytest.raises(ValueError, match="^return_predictions: expected a bool"):
        DVLoss(return_predictions=1)
    with pytest.raises(ValueError, match="^return_predictions: not supported with process_group"):
        DVLoss(return_predictions=True, process_group=object())
