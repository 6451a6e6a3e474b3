"""Lazy front doors: a folder's ``__init__`` names its public objects without importing its modules.

``tuner trials`` needs the storage, not PyTorch; importing a module of ``tuner.search`` runs
``tuner/search/__init__.py`` first, so an eager front door would load the whole training stack for
every command. Each name is imported from its module on first use instead (SPEC 1's lazy loading).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``, from ``{module: [names]}``."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__, sorted(where)
