"""Lazy front doors: a folder's ``__init__`` names its public objects without importing its modules.

``tuner trials`` needs the storage, not PyTorch; importing a module of ``tuner.search`` runs
``tuner/search/__init__.py`` first, so an eager front door would load the whole training stack for
every command. A front door therefore lists its names once, as imports under ``if TYPE_CHECKING:``
(what type checkers and readers see), and :func:`lazy_exports` reads those same lines to import each
name from its module on first use (SPEC 1's lazy loading).
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


def typed_exports(init_file: str | Path) -> dict[str, str]:
    """``{name: module}`` from the ``from M import a, b`` lines under ``if TYPE_CHECKING:`` in ``init_file``."""
    tree = ast.parse(Path(init_file).read_text())
    return {
        alias.asname or alias.name: node.module
        for block in tree.body
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for node in block.body
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }


def lazy_exports(package: str, init_file: str) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for the front door ``init_file`` of ``package``."""
    where = typed_exports(init_file)

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__, sorted(where)
