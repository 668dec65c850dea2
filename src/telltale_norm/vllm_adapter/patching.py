"""Idempotent method patching: each original stays reachable as `._telltale_original`."""

from __future__ import annotations

import functools
from collections.abc import Callable


def patch_method(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace `cls.name` by `make(original)` unless it is already patched."""
    original = cls.__dict__[name]
    if getattr(original, "_telltale_original", None) is not None:
        return
    patched = make(original)
    functools.update_wrapper(patched, original)
    patched._telltale_original = original
    setattr(cls, name, patched)

