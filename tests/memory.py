"""Counting allocations exactly: a TorchDispatchMode that sees every op's output tensors."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationRecorder(TorchDispatchMode):
    """Records the size of every tensor an op returns whose storage is new (views are not
    allocations), and the peak of the bytes held by those storages while alive."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, tuple[int, ...], int]] = []  # (op, shape, numel)
        self.dtypes: list[torch.dtype] = []  # of each entry of sizes
        self._seen: set[int] = set()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in inputs or ptr in self._seen or st.nbytes() == 0:
                continue  # in-place result or a view of something already counted
            self._seen.add(ptr)
            nbytes = st.nbytes()
            self.sizes.append((str(func), tuple(t.shape), t.numel()))
            self.dtypes.append(t.dtype)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, ptr, nbytes)
        return out

    def _free(self, ptr, nbytes):
        self.live -= nbytes
        self._seen.discard(ptr)

    @property
    def largest(self) -> int:
        return max((n for _, _, n in self.sizes), default=0)

    def largest_op(self):
        return max(self.sizes, key=lambda s: s[2], default=None)
