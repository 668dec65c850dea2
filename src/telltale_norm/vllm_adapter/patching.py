"""Idempotent method patching, applied when (and only if) the patched module is imported.

vLLM loads the plugin in every process, but each process needs only some of our patches:
patching on import keeps the plugin from importing heavy modules (the model runner, the
OpenAI server) into processes that never use them.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType


def patch_method(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace `cls.name` by `make(original)` unless already patched; the original stays
    reachable as `._telltale_original`."""
    original = cls.__dict__[name]
    if getattr(original, "_telltale_original", None) is not None:
        return
    patched = make(original)
    functools.update_wrapper(patched, original)
    patched._telltale_original = original
    setattr(cls, name, patched)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs callbacks right after a watched module has been executed."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[ModuleType], None]]] = {}

    def find_spec(self, name, path, target=None):
        if name not in self.callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Wrapped(spec.loader, self.callbacks.pop(name))
                return spec
        return None


class _Wrapped(importlib.abc.Loader):
    def __init__(self, loader, callbacks: list[Callable[[ModuleType], None]]) -> None:
        self.loader = loader
        self.callbacks = callbacks

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        for callback in self.callbacks:
            callback(module)


_HOOK = _AfterImport()


def on_import(module: str, callback: Callable[[ModuleType], None]) -> None:
    """Call `callback(module)` now if `module` is imported, else right after its import."""
    if module in sys.modules:
        callback(sys.modules[module])
        return
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
    _HOOK.callbacks.setdefault(module, []).append(callback)
