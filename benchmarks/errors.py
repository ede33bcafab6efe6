"""How a failure is written into a `failed` row's `error` field, shared by the op cells (`worker.py`)
and the e2e cells (`e2e.py`). Imports nothing from `benchmarks`, so neither of them has to import the
other for it."""

from __future__ import annotations

import traceback


def format_error(e: BaseException) -> str:
    """The exception's type and message (first 500 characters), then the tail of its traceback."""
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    last = "".join(tb[-3:]).strip()
    return f"{type(e).__name__}: {str(e)[:500]}\n{last[-1500:]}"
