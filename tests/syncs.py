"""Seeing host synchronisations: a TorchDispatchMode that logs every aten op a region runs, and every
call of a Tensor method that copies to the host.

Two kinds of sync are caught:
- aten ops that read a device value on the host or size an output by one (HOST_SYNC_OPS), and
  copies whose source is on a device and whose destination is on the host (on a GPU run);
- Tensor.cpu / tolist / numpy / item, intercepted by name while the log is active: on the CPU
  tensors of an interpreter run they dispatch no aten op at all (or none that reads a value), yet
  on a GPU each one waits for the device.
"""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that read a device value on the host (or size an output by one)
HOST_SYNC_OPS = {"aten.nonzero", "aten._local_scalar_dense", "aten.item", "aten.masked_select",
                 "aten.unique", "aten._unique2", "aten.repeat_interleave", "aten.is_nonzero"}
# Tensor methods that copy to the host, logged as "Tensor.<name>"
HOST_COPY_METHODS = ("cpu", "tolist", "numpy", "item")
DEVICE_TO_HOST = "device-to-host copy"
_MISSING = object()


def _on_host(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _device_to_host(func, args, kwargs) -> bool:
    """A copy from a device tensor into host memory (aten._to_copy / copy_ as dispatched)."""
    name = str(func.overloadpacket)
    if name == "aten._to_copy" and isinstance(args[0], torch.Tensor):
        return args[0].device.type != "cpu" and _on_host(kwargs.get("device"))
    if name == "aten.copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func.overloadpacket))
        if _device_to_host(func, args, kwargs):
            self.ops.append(DEVICE_TO_HOST)
        return func(*args, **kwargs)

    def _logged(self, name, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            self.ops.append(f"Tensor.{name}")
            return method(*args, **kwargs)
        return wrapper

    def __enter__(self):
        for name in HOST_COPY_METHODS:
            self._saved[name] = torch.Tensor.__dict__.get(name, _MISSING)
            setattr(torch.Tensor, name, self._logged(name, getattr(torch.Tensor, name)))
        try:
            return super().__enter__()
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._restore()

    def _restore(self):
        for name, saved in self._saved.items():
            if saved is _MISSING:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved)
        self._saved.clear()

    def host_syncs(self) -> list[str]:
        syncs = HOST_SYNC_OPS | {f"Tensor.{m}" for m in HOST_COPY_METHODS} | {DEVICE_TO_HOST}
        return sorted(syncs & set(self.ops))
