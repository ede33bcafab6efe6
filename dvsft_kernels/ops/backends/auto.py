"""`impl="auto"` under torch.compile on CUDA: the backend is chosen inside the custom op, at run time.

While dynamo traces nothing says whether the compiled graph will be replayed as a CUDA graph, so
the choice waits until the op runs: "fused" (no host synchronisation) while a CUDA graph is being
captured, else "chunked" (1.9-2.6x faster, ops/kernels/README.md "impl=auto"). Both must fill the
same fixed-shape auxiliary outputs, so both use the "precomputed" layout of the compacting
backends: for "mean" / "sum" the gradients are formed in the forward (the fused kernels run their
backward right after their forward, with the gradient scale known), and the custom op's backward
scales them; for "none" nothing is saved and the backward op recomputes with the backend chosen
then (the fused one reruns its forward for the row statistics: 2 n D V more FLOPs).
"""

from __future__ import annotations

from dvsft_kernels.ops.backends.base import Backend, Grads, Inputs, Meta, PrecomputedLayout, precomputed_aux
from dvsft_kernels.ops.backends.fused import fused_backward_core, fused_forward_core
from dvsft_kernels.ops.backends.registry import get_backend, register
from dvsft_kernels.ops.options import LCEOptions, capturing


def run_time_choice() -> str:
    """The backend the custom op runs now: "fused" while a CUDA graph is captured, else "chunked"."""
    return "fused" if capturing() else "chunked"


@register
class AutoBackend(PrecomputedLayout, Backend):
    name = "auto"

    def op_forward(self, x: Inputs, options: LCEOptions, grads: Grads):
        choice = run_time_choice()
        if choice != "fused":
            return get_backend(choice).op_forward(x, options, grads)
        fwd, saved = fused_forward_core(x, options, grads)
        if options.reduction == "none" or not any(grads):
            return fwd, precomputed_aux(x.hidden, None, None, None)
        one = fwd.out.new_ones(())
        dh, dW, db = fused_backward_core(saved, one, options, grads, Meta.of(x), cast=False)
        dh = dh.reshape(x.hidden.shape) if grads.hidden else None
        return fwd, precomputed_aux(x.hidden, dh, dW.float() if grads.weight else None,
                                    db.float() if grads.bias else None)

    def op_backward(self, x: Inputs, aux, g, options: LCEOptions, grads: Grads):
        choice = run_time_choice()
        if choice != "fused":
            return get_backend(choice).op_backward(x, aux, g, options, grads)
        _, saved = fused_forward_core(x, options, grads)
        return fused_backward_core(saved, g, options, grads, Meta.of(x))
