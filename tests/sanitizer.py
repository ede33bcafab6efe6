"""A memory checker for Triton kernels run by the interpreter: the two faults the interpreter
itself cannot show, because it runs programs one after another over host memory.

- Bounds: every address a load, store or atomic touches (mask on) must lie inside the extent of
  one of the launch's tensor arguments. On a GPU an access past it reads garbage or faults
  ("illegal memory access"); in the interpreter it silently reads the host heap.
- Races: within one launch, an address written by one program (plain store) and accessed by
  another, or atomically updated by one and plainly read by another, has no defined order on a
  GPU; the interpreter's sequential order hides it. Atomics among themselves are fine.

Checked per launch, so ordering by the stream between launches (the staged backward's stages)
counts as ordered. Use as a context manager around code that launches kernels:

    with KernelSanitizer() as san:
        loss.backward()
    assert san.launches  # what it saw

Violations raise SanitizerError naming the kernel, the access kind and the offending address
relative to the nearest argument.
"""

from __future__ import annotations

import collections

import numpy as np
import torch

_READ, _WRITE, _ATOMIC = 0, 1, 2
_KIND = {_READ: "load", _WRITE: "store", _ATOMIC: "atomic"}


class SanitizerError(AssertionError):
    pass


def _extent(t: torch.Tensor) -> tuple[int, int] | None:
    """[lo, hi) of the bytes a strided view can address."""
    if t.numel() == 0:
        return None
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride
        lo, hi = lo + min(reach, 0), hi + max(reach, 0)
    es = t.element_size()
    return t.data_ptr() + lo * es, t.data_ptr() + (hi + 1) * es


def _tensors(args, kwargs, names):
    for name, value in list(zip(names, args)) + list(kwargs.items()):
        if isinstance(value, torch.Tensor):
            yield name, value


class KernelSanitizer:
    def __init__(self):
        self.launches: collections.Counter[str] = collections.Counter()
        self._launch = None

    # ---- patching -------------------------------------------------------------------------
    def __enter__(self):
        from triton.runtime import interpreter as interp

        self._interp = interp
        builder = interp.InterpreterBuilder
        self._saved = {name: getattr(builder, name) for name in
                       ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
        self._saved_call = interp.GridExecutor.__call__
        san = self

        def load(b, ptrs, mask, *rest):
            san._access(b, ptrs, mask.data, _READ)
            return san._saved["create_masked_load"](b, ptrs, mask, *rest)

        def store(b, ptrs, value, mask, *rest):
            san._access(b, ptrs, mask.data, _WRITE)
            return san._saved["create_masked_store"](b, ptrs, value, mask, *rest)

        def rmw(b, op, ptrs, val, mask, *rest):
            san._access(b, ptrs, mask.data, _ATOMIC)
            return san._saved["create_atomic_rmw"](b, op, ptrs, val, mask, *rest)

        def cas(b, ptrs, cmp, val, *rest):
            san._access(b, ptrs, np.ones(ptrs.data.shape, dtype=bool), _ATOMIC)
            return san._saved["create_atomic_cas"](b, ptrs, cmp, val, *rest)

        def call(executor, *args, **kwargs):
            name = getattr(executor.fn, "__name__", str(executor.fn))
            ranges = []
            for arg, t in _tensors(args, kwargs, executor.arg_names):
                if t.device.type != "cpu":
                    raise SanitizerError("KernelSanitizer checks interpreter (CPU) launches only")
                ext = _extent(t)
                if ext is not None:
                    ranges.append((ext[0], ext[1], arg))
            san._launch = {"name": name, "ranges": ranges, "addr": [], "pid": [], "kind": []}
            try:
                out = san._saved_call(executor, *args, **kwargs)
            finally:
                launch, san._launch = san._launch, None
            san.launches[name] += 1
            san._check_races(launch)
            return out

        builder.create_masked_load = load
        builder.create_masked_store = store
        builder.create_atomic_rmw = rmw
        builder.create_atomic_cas = cas
        interp.GridExecutor.__call__ = call
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self._interp.InterpreterBuilder, name, fn)
        self._interp.GridExecutor.__call__ = self._saved_call
        return False

    # ---- checks ---------------------------------------------------------------------------
    def _access(self, builder, ptrs, mask, kind):
        launch = self._launch
        if launch is None:
            return
        addr = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.shape))
        addr = addr[np.broadcast_to(mask, addr.shape)].astype(np.uint64).ravel()
        if addr.size == 0:
            return
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        ok = np.zeros(addr.shape, dtype=bool)
        for lo, hi, _ in launch["ranges"]:
            ok |= (addr >= lo) & (addr + size <= hi)
        if not ok.all():
            bad = int(addr[~ok][0])
            lo, hi, arg = min(launch["ranges"], key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])),
                              default=(0, 0, "?"))
            where = f"{bad - lo} bytes from the start" if bad >= lo else f"{lo - bad} bytes before"
            raise SanitizerError(
                f"{launch['name']}: out-of-bounds {_KIND[kind]} by program {builder.grid_idx} at {where} of "
                f"'{arg}' ({hi - lo} bytes); {int((~ok).sum())} of {addr.size} lanes out of bounds")
        gx, gy, _ = builder.grid_dim
        x, y, z = builder.grid_idx
        launch["addr"].append(addr)
        launch["pid"].append(np.full(addr.shape, x + gx * (y + gy * z), dtype=np.int64))
        launch["kind"].append(np.full(addr.shape, kind, dtype=np.int8))

    def _check_races(self, launch):
        if not launch["addr"]:
            return
        addr = np.concatenate(launch["addr"])
        pid = np.concatenate(launch["pid"])
        kind = np.concatenate(launch["kind"])
        # one row per (address, program, kind); then per address: distinct programs and kinds
        key = np.unique(np.stack([addr.view(np.int64), pid, kind.astype(np.int64)], axis=1), axis=0)
        a_u, a_inv = np.unique(key[:, 0], return_inverse=True)
        n = len(a_u)
        has = {k: np.bincount(a_inv, weights=key[:, 2] == k, minlength=n) > 0 for k in _KIND}
        pk = np.unique(key[:, :2], axis=0)  # (address, program) pairs
        programs = np.bincount(np.searchsorted(a_u, pk[:, 0]), minlength=n)
        race = (programs >= 2) & (has[_WRITE] | (has[_ATOMIC] & has[_READ]))
        if race.any():
            i = int(np.flatnonzero(race)[0])
            bad = int(a_u[i])
            rows = key[key[:, 0] == a_u[i]]
            who = ", ".join(f"program {p} {_KIND[k]}" for _, p, k in rows[:6])
            arg = next((r[2] for r in launch["ranges"] if r[0] <= bad < r[1]), "?")
            raise SanitizerError(
                f"{launch['name']}: {int(race.sum())} addresses accessed by several programs with a "
                f"plain write among them (or an atomic and a plain read), first in '{arg}': {who}")
