"""Registers the ``memkv`` adapter with LMCache without patching LMCache.

LMCache discovers built-in adapters lazily: its ``l2_adapters`` package lists module
names and imports one only when its type is requested. We add our module to that list
right after LMCache's package initialises, via a meta-path finder that wraps only that
one module's loader. Every other import goes through untouched; nothing is imported
here, so Python processes that never touch LMCache pay nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence

TARGET = "lmcache.v1.distributed.l2_adapters"
ADAPTER_MODULE = "lmcache_memkv.adapter.memkv_l2_adapter"


def register_pending(module: types.ModuleType | None = None) -> None:
    """Tell LMCache's registry where the ``memkv`` adapter lives (imports it on demand)."""
    factory = sys.modules.get(f"{TARGET}.factory")
    if factory is None:
        return
    add = getattr(factory, "add_pending_module", None)
    if add is not None:
        add(ADAPTER_MODULE)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        # Anything else (resource readers, get_filename, is_package...) is the real loader's.
        return getattr(self._inner, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._inner.exec_module(module)
        try:
            register_pending(module)
        except Exception:  # never break LMCache's own import
            pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    if TARGET in sys.modules:  # LMCache's package already loaded: register now
        register_pending()
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


try:
    install()
except Exception:  # a .pth hook must never break interpreter start-up
    pass
