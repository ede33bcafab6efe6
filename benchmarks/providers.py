"""What gets measured: this package's impls, the peers, and the floor.

A provider answers three questions:
- `static_reason(device)`: why it cannot run here, from imports and versions alone (no device
  work; the parent process calls it, so it must not initialise CUDA);
- `probe(device)`: the same, by running it once on tiny inputs (called in the worker);
- `prepare(inputs, shape, device)`: a `Runner` whose `fwd()` / `bwd(out)` the timers call, with all
  set-up (imports, buffers) done outside the timed region.

Every provider takes hidden (N, D) with ignore_index at unlabeled rows, exactly what a trainer
hands over; whether it skips the ignored rows is its own business and is recorded as
`skips_ignored` (rows_processed = n or N in the results).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Callable

IGNORE_INDEX = -100


class Runner:
    """One prepared provider x shape. `fwd` returns whatever `bwd` needs (normally the loss)."""

    def __init__(self, fn: Callable, hidden, weight, targets):
        self.fn, self.hidden, self.weight, self.targets = fn, hidden, weight, targets

    def fwd(self):
        return self.fn(self.hidden, self.weight, self.targets)

    def bwd(self, out) -> None:
        out.backward()

    def reset(self) -> None:
        """Outside the timed region: fresh gradients each step (zero_grad(set_to_none=True))."""
        self.hidden.grad = None
        self.weight.grad = None

    def loss_value(self, out) -> float | None:
        return float(out.detach().float()) if out is not None else None

    def close(self) -> None:
        self.fn = self.hidden = self.weight = self.targets = None


class Provider:
    name = ""
    label = ""
    # "ours" | "peer" (a library to beat) | "reference" (plain HF) | "floor" | "sweep" | "test"
    kind = "peer"
    skips_ignored = False
    note = ""
    hidden = False  # left out of suites unless named (test helpers)
    measures_memory = True

    def static_reason(self, device: str, interpret: bool = False) -> str | None:
        return None

    def probe(self, device: str, interpret: bool = False) -> str | None:
        return None

    def prepare(self, inputs: dict, shape, device: str) -> Runner:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "provider": self.name,
            "provider_label": self.label,
            "provider_kind": self.kind,
            "skips_ignored": self.skips_ignored,
            "provider_note": self.note,
        }


def _tiny(device: str, dtype=None):
    import torch

    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(37, 72, device=device, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(517, 72, device=device, generator=g).to(dtype).requires_grad_(True)
    t = torch.randint(0, 517, (37,), device=device, generator=g)
    t[::4] = IGNORE_INDEX
    return h, w, t


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:300]}"


# ---------------------------------------------------------------------------------------------
# This package


class Dvsft(Provider):
    kind = "ours"
    skips_ignored = True

    def __init__(self, impl: str, variant: str = "", **options):
        self.impl = impl
        self.options = options  # extra keyword arguments of linear_cross_entropy
        self.name = f"dvsft_{impl}" + (f"_{variant}" if variant else "")
        self.label = f"dvsft-kernels impl={impl}" + "".join(f" {k}={v}" for k, v in options.items())
        self.triton = impl in ("chunked", "fused")
        self.note = {
            "torch": "pure PyTorch, chunked over labeled rows; any device",
            "chunked": "Triton, memory bounded by a rows x V logits chunk",
            "fused": "Triton, no logits in device memory",
        }[impl] + {"": "", "filter": "; gradient tiles below bf16 resolution skipped",
                   "det": "; deterministic backward (no atomics)"}[variant]

    def _op(self):
        from dvsft_kernels import linear_cross_entropy

        options = self.options

        def op(*a, **k):
            return linear_cross_entropy(*a, **k, **options)

        return op

    def static_reason(self, device, interpret=False):
        try:
            self._op()
        except Exception as e:  # noqa: BLE001 - ImportError while the op is being written, or a broken import
            return f"dvsft_kernels.linear_cross_entropy not importable ({_err(e)})"
        return None

    def probe(self, device, interpret=False):
        import torch

        reason = self.static_reason(device, interpret)
        if reason:
            return reason
        cpu_triton = self.triton and not device.startswith("cuda") and not interpret
        if cpu_triton and os.environ.get("TRITON_INTERPRET") == "1":
            return (
                f"impl={self.impl!r} is a Triton kernel: TRITON_INTERPRET=1 is set here, so on CPU it "
                "would run in the interpreter, a correctness tool, not benchmarked"
            )
        h, w, t = _tiny(device, torch.float32 if interpret else None)
        try:
            self._op()(h, w, t, impl=self.impl).backward()
        except (ValueError, NotImplementedError) as e:
            # The op raises ValueError for an impl it does not have (docs/linear_cross_entropy.md) or cannot run here.
            if cpu_triton or isinstance(e, NotImplementedError) or "impl" in str(e):
                return f"impl={self.impl!r} unavailable here: {_err(e)}"
            raise
        if cpu_triton:
            return (
                f"impl={self.impl!r} is a Triton kernel: on CPU it runs only under TRITON_INTERPRET=1, "
                "a correctness tool, not benchmarked"
            )
        return None

    def prepare(self, inputs, shape, device):
        op, impl = self._op(), self.impl
        return Runner(
            lambda h, w, t: op(h, w, t, ignore_index=IGNORE_INDEX, reduction="mean", impl=impl),
            inputs["hidden"],
            inputs["weight"],
            inputs["targets"],
        )


class DvsftChunk(Dvsft):
    """impl="torch" or "chunked" with its logits-chunk byte budget set (a sweep: `run.py --chunk-mb
    2,8,32` for "torch", or `--providers dvsft_chunked@512MB,dvsft_chunked@2048MB` on a GPU).

    Passes the op's public `chunk_rows` option: the rows whose float32 (rows, V) logits chunk fits
    the budget, as the op sizes its chunks from its default budget."""

    kind = "sweep"
    hidden = True

    def __init__(self, mb: float, impl: str = "torch"):
        super().__init__(impl)
        self.mb = mb
        self.name = f"dvsft_{impl}@{mb:g}MB"
        self.label = f"dvsft-kernels impl={impl}, chunk budget {mb:g} MB"
        self.note = f"chunk-size sweep of impl='{impl}'"

    def chunk_rows(self, V: int) -> int:
        return max(1, int(self.mb * 2**20) // (4 * V))

    def prepare(self, inputs, shape, device):
        op = self._op()
        rows = self.chunk_rows(inputs["weight"].shape[0])

        def fn(h, w, t):
            return op(h, w, t, ignore_index=IGNORE_INDEX, reduction="mean", impl=self.impl, chunk_rows=rows)

        return Runner(fn, inputs["hidden"], inputs["weight"], inputs["targets"])


class DvsftSoft(Dvsft):
    """Soft targets: K weighted targets per labeled position (`target_weights`), for the cost of K
    over hard targets: `run.py --providers dvsft_torch,dvsft_torch+k1,dvsft_torch+k16`. Slot 0 is
    the shape's target with weight 1/2; slots 1..K-1 are fixed-seed random ids sharing the other
    half; unlabeled positions stay unlabeled in every slot."""

    kind = "sweep"
    hidden = True

    def __init__(self, impl: str, K: int):
        super().__init__(impl)
        self.K = K
        self.name = f"dvsft_{impl}+k{K}"
        self.label = f"dvsft-kernels impl={impl}, soft targets K={K}"
        self.note = f"impl='{impl}' with {K} weighted targets per position"

    def prepare(self, inputs, shape, device):
        import torch

        op, impl, K = self._op(), self.impl, self.K
        t = inputs["targets"]
        V = inputs["weight"].shape[0]
        g = torch.Generator().manual_seed(0)
        soft = torch.randint(0, V, (*t.shape, K), generator=g).to(t.device)
        soft[..., 0] = t
        soft[t == IGNORE_INDEX] = IGNORE_INDEX
        tw = torch.full((*t.shape, K), 0.5 / max(K - 1, 1), device=t.device)
        tw[..., 0] = 0.5 if K > 1 else 1.0

        def fn(h, w, _t):
            return op(h, w, soft, ignore_index=IGNORE_INDEX, reduction="mean", impl=impl, target_weights=tw)

        return Runner(fn, inputs["hidden"], inputs["weight"], t)


# ---------------------------------------------------------------------------------------------
# Peers


class HFPlain(Provider):
    name = "hf"
    label = "HF plain loss (full logits, fp32 upcast)"
    kind = "reference"
    skips_ignored = False
    note = (
        "lm_head on all N rows, logits.float(), cross_entropy(ignore_index) as transformers' ForCausalLMLoss"
    )

    def prepare(self, inputs, shape, device):
        import torch.nn.functional as F

        V = shape.V
        fn = None
        try:
            import inspect

            from transformers.loss.loss_utils import ForCausalLMLoss

            if "shift_labels" in inspect.signature(ForCausalLMLoss).parameters:

                def fn(h, w, t):
                    return ForCausalLMLoss(F.linear(h, w), None, V, shift_labels=t, ignore_index=IGNORE_INDEX)
        except ImportError:
            pass
        if fn is None:  # the same computation, written out

            def fn(h, w, t):
                logits = F.linear(h, w).float()
                return F.cross_entropy(logits.view(-1, V), t.view(-1), ignore_index=IGNORE_INDEX)

        return Runner(fn, inputs["hidden"], inputs["weight"], inputs["targets"])


class TorchLCE(Provider):
    name = "torch_lce"
    label = "torch F.linear_cross_entropy (chunked options)"
    skips_ignored = False
    note = (
        "CUDA: LinearCrossEntropyOptions() ('auto': per device/dtype picks measured on A100); CPU: "
        "batch_chunk_size=1024 rows, because float32 on CPU has no tuned default and the fallback "
        "(aspect_ratio:2) cuts 16-row chunks at D=512, V=32000 (2 rows at V=152k), ~2x slower still"
    )
    CPU_CHUNK = 1024

    def static_reason(self, device, interpret=False):
        import torch
        import torch.nn.functional as F
        from torch import nn

        if not (hasattr(F, "linear_cross_entropy") and hasattr(nn, "LinearCrossEntropyOptions")):
            return f"needs torch >= 2.13 for F.linear_cross_entropy(options=...) (have {torch.__version__})"
        return None

    def options(self, device: str, N: int):
        from torch import nn

        if device.startswith("cuda"):
            return nn.LinearCrossEntropyOptions()
        return nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=min(N, self.CPU_CHUNK))

    def prepare(self, inputs, shape, device):
        import torch.nn.functional as F

        opts = self.options(device, shape.N)
        return Runner(
            lambda h, w, t: F.linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX, options=opts),
            inputs["hidden"],
            inputs["weight"],
            inputs["targets"],
        )


class Liger(Provider):
    name = "liger"
    label = "Liger-Kernel fused linear CE"
    skips_ignored = False
    note = "LigerFusedLinearCrossEntropyLoss: chunks over all N rows, gradients computed in forward"

    def static_reason(self, device, interpret=False):
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed (pip install liger-kernel)"
        return None

    def probe(self, device, interpret=False):
        import torch

        reason = self.static_reason(device, interpret)
        if reason:
            return reason
        on_cpu = not device.startswith("cuda")
        if on_cpu and not interpret and os.environ.get("TRITON_INTERPRET") == "1":
            return (
                "Liger's Triton kernels need a GPU; TRITON_INTERPRET=1 is set here, so on CPU they "
                "would run in the interpreter, a correctness tool, not benchmarked"
            )
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        h, w, t = _tiny(device, torch.float32 if on_cpu else None)
        try:
            LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)(w, h, t).backward()
        except Exception as e:
            if not on_cpu:
                raise
            return f"Liger's Triton kernels need a GPU: on {device} tensors it raises {_err(e)}"
        return None

    def prepare(self, inputs, shape, device):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        mod = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
        return Runner(lambda h, w, t: mod(w, h, t), inputs["hidden"], inputs["weight"], inputs["targets"])


class CCE(Provider):
    name = "cce"
    label = "cut-cross-entropy"
    skips_ignored = True
    note = "impl='cce' (Triton) on GPU, impl='torch_compile' on CPU; both drop ignored rows first"

    def impl(self, device: str) -> str:
        return "cce" if device.startswith("cuda") else "torch_compile"

    def static_reason(self, device, interpret=False):
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return "cut-cross-entropy not installed (pip install cut-cross-entropy)"
        if self.impl(device) == "torch_compile" and not (shutil.which("g++") or shutil.which("c++")):
            return "impl='torch_compile' on CPU needs a C++ compiler for inductor (none on PATH)"
        return None

    def probe(self, device, interpret=False):
        # torch_compile's probe would be a full compile (seconds); its first timed warm-up does that.
        reason = self.static_reason(device, interpret)
        if reason or not device.startswith("cuda"):
            return reason
        import cut_cross_entropy

        h, w, t = _tiny(device)
        cut_cross_entropy.linear_cross_entropy(h, w, t, impl="cce").backward()
        return None

    def prepare(self, inputs, shape, device):
        from cut_cross_entropy import linear_cross_entropy

        impl = self.impl(device)
        return Runner(
            lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX, impl=impl),
            inputs["hidden"],
            inputs["weight"],
            inputs["targets"],
        )


# ---------------------------------------------------------------------------------------------
# The floor


class _FloorRunner(Runner):
    """z = h_l W^T (forward); dh = G W, dW = G^T h_l (backward), into preallocated outputs."""

    def __init__(self, hidden_l, weight, grad_z):
        import torch

        self.h, self.w, self.g = hidden_l, weight, grad_z
        n, D, V = hidden_l.shape[0], hidden_l.shape[1], weight.shape[0]
        self.z = torch.empty(n, V, dtype=hidden_l.dtype, device=hidden_l.device)
        self.dh = torch.empty(n, D, dtype=hidden_l.dtype, device=hidden_l.device)
        self.dw = torch.empty(V, D, dtype=hidden_l.dtype, device=hidden_l.device)
        self.wt = weight.t()

    def fwd(self):
        import torch

        return torch.mm(self.h, self.wt, out=self.z)

    def grad_h(self) -> None:
        import torch

        torch.mm(self.g, self.w, out=self.dh)

    def grad_w(self) -> None:
        import torch

        torch.mm(self.g.t(), self.h, out=self.dw)

    def bwd(self, out) -> None:
        self.grad_h()
        self.grad_w()

    def reset(self) -> None:
        pass

    def loss_value(self, out):
        return None

    def close(self) -> None:
        self.h = self.w = self.g = self.z = self.dh = self.dw = self.wt = None


class Floor(Provider):
    name = "floor"
    label = "floor: the GEMMs alone (labeled rows)"
    kind = "floor"
    skips_ignored = True
    measures_memory = False
    note = "torch.mm into preallocated outputs: 1 product forward, 2 backward, 3 forward+backward"

    def prepare(self, inputs, shape, device):
        import torch

        h = inputs["hidden"].detach()[inputs["labeled"]].contiguous()
        w = inputs["weight"].detach()
        g = torch.Generator(device=device).manual_seed(1)
        # Drawn in the working dtype: an n x V float32 temporary would be 17 GB at Gemma's V, N=16384.
        grad_z = torch.randn(h.shape[0], w.shape[0], device=device, generator=g, dtype=h.dtype).mul_(1e-3)
        return _FloorRunner(h, w, grad_z)


# ---------------------------------------------------------------------------------------------
# Test helpers (hidden: only run when named)


class _TestRaise(Provider):
    name = "_test_raise"
    label = "test: raises in forward"
    kind = "test"
    hidden = True

    def prepare(self, inputs, shape, device):
        def fn(h, w, t):
            raise RuntimeError("deliberate failure from _test_raise")

        return Runner(fn, inputs["hidden"], inputs["weight"], inputs["targets"])


class _TestAlloc(Provider):
    """Forward touches a 200 MB float32 tensor and keeps it until backward."""

    name = "_test_alloc200"
    label = "test: allocates 200 MB in forward"
    kind = "test"
    hidden = True
    MB = 200

    def prepare(self, inputs, shape, device):
        import torch

        class _R(Runner):
            def fwd(self_):
                return torch.ones(self.MB * 1_000_000 // 4, device=device)

            def bwd(self_, out):
                out.add_(1.0)

            def loss_value(self_, out):
                return None

        return _R(None, inputs["hidden"], inputs["weight"], inputs["targets"])


class _TestCrash(Provider):
    """Kills its process in forward, as a segfault or an OOM kill would."""

    name = "_test_crash"
    label = "test: the process dies in forward"
    kind = "test"
    hidden = True

    def prepare(self, inputs, shape, device):
        def fn(h, w, t):
            os._exit(3)

        return Runner(fn, inputs["hidden"], inputs["weight"], inputs["targets"])


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in [
        Dvsft("torch"),
        Dvsft("chunked"),
        Dvsft("fused"),
        Dvsft("fused", "filter", grad_filter=True),
        Dvsft("fused", "det", deterministic=True),
        HFPlain(),
        TorchLCE(),
        Liger(),
        CCE(),
        Floor(),
        _TestRaise(),
        _TestAlloc(),
        _TestCrash(),
    ]
}
PEERS = ("hf", "torch_lce", "liger", "cce")
OURS = ("dvsft_torch", "dvsft_chunked", "dvsft_fused", "dvsft_fused_filter", "dvsft_fused_det")


def default_names() -> list[str]:
    return [name for name, p in PROVIDERS.items() if not p.hidden]


def get(name: str) -> Provider:
    """A provider by name, including parametric ones: 'dvsft_torch@8MB', 'dvsft_chunked@2048MB'
    (chunk sweeps), 'dvsft_torch+k16' (16 soft targets per position)."""
    if name in PROVIDERS:
        return PROVIDERS[name]
    m = re.fullmatch(r"dvsft_(torch|chunked)@([0-9.]+)MB", name)
    if m:
        return PROVIDERS.setdefault(name, DvsftChunk(float(m.group(2)), m.group(1)))
    m = re.fullmatch(r"dvsft_(torch|chunked|fused)\+k([0-9]+)", name)
    if m and int(m.group(2)) >= 1:
        return PROVIDERS.setdefault(name, DvsftSoft(m.group(1), int(m.group(2))))
    raise KeyError(name)


def select(patterns: list[str] | None) -> list[Provider]:
    """Providers by name or fnmatch pattern ('dvsft_*'); None: all non-hidden ones."""
    import fnmatch

    if not patterns:
        return [PROVIDERS[n] for n in default_names()]
    out = []
    for pat in patterns:
        try:
            hits = [get(pat)]
        except KeyError:
            hits = [p for n, p in PROVIDERS.items() if fnmatch.fnmatch(n, pat) and not p.hidden]
        if not hits:
            raise SystemExit(f"unknown provider {pat!r}; known: {', '.join(default_names())}")
        out += [p for p in hits if p not in out]
    return out
