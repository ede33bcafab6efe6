"""The backend registry: one instance per implementation name, registered by its own module."""

from __future__ import annotations

from dvsft_kernels.ops.backends.base import Backend

BACKENDS: dict[str, Backend] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: registers one instance of a stateless backend under `cls.name`."""
    if not cls.name or cls.name in BACKENDS:
        raise ValueError(f"backend: name {cls.name!r} is empty or already registered")
    BACKENDS[cls.name] = cls()
    return cls


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"impl: no backend named {name!r}; registered: {sorted(BACKENDS)}") from None
