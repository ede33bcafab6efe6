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
    monkeypatch.setattr(loss_mod, "_sync_free", lambda h: True)
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
