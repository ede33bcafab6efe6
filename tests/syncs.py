"""Seeing host synchronisations: a TorchDispatchMode that logs every aten op a region runs."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that read a device value on the host (or size an output by one)
HOST_SYNC_OPS = {"aten.nonzero", "aten._local_scalar_dense", "aten.item", "aten.masked_select",
                 "aten.unique", "aten._unique2", "aten.repeat_interleave", "aten.is_nonzero"}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def host_syncs(self) -> list[str]:
        return sorted(HOST_SYNC_OPS & set(self.ops))
