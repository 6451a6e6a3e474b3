"""The package's rooms and the one direction of their imports, derived from the folder names.

``tuner/data`` < ``tuner/train`` < ``tuner/search`` < ``tuner/final`` < the API and the CLI: a folder imports only
itself, the folders below it and the shared base modules at the top of the package (errors, names,
interrupts), which import no folder. Another folder is entered through its front door
(``from tuner.train import X``), never through one of its modules.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tuner._exports import typed_exports

PACKAGE = Path(__file__).parents[1] / "tuner"
LAYERS = ["data", "train", "search", "final"]  # bottom to top
TOP = {"cli", "__main__", "api", "progress"}  # above every folder: the command line, the Python API


def _runtime_imports(path: Path) -> set[str]:
    """The tuner modules a file imports at run time (imports under ``if TYPE_CHECKING:`` are for types)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("tuner.")}


def _room(module: str) -> str:
    """``tuner.train.build`` -> ``train``; a shared base module (``tuner.errors``) -> ``base``."""
    part = module.split(".")[1]
    if part in LAYERS:
        return part
    return "top" if part in TOP else "base"


def _modules() -> list[tuple[str, Path]]:
    return [(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts), p) for p in sorted(PACKAGE.rglob("*.py"))]


def test_the_rooms_are_the_folders():
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(LAYERS)


def layering_violations() -> list[str]:
    rank = {room: i for i, room in enumerate(["base", *LAYERS, "top"])}
    problems = []
    for module, path in _modules():
        room = _room(module)
        for imported in _runtime_imports(path):
            target = _room(imported)
            if room == "base" and target != "base":
                problems.append(f"{module} (a base module) imports {imported}")
            elif rank[target] > rank[room]:
                problems.append(f"{module} ({room}) imports {imported} ({target}), a room above it")
            elif target in LAYERS and target != room and imported != f"tuner.{target}":
                problems.append(f"{module} enters {target} through {imported}, not its front door tuner.{target}")
    return problems


def test_each_folder_imports_only_itself_and_the_folders_below():
    assert layering_violations() == []


@pytest.mark.parametrize("folder", LAYERS)
def test_each_front_door_names_each_export_once_and_each_name_resolves(folder):
    door = PACKAGE / folder / "__init__.py"
    tree = ast.parse(door.read_text())
    names = [
        alias.name
        for block in tree.body
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    ]
    assert len(names) == len(set(names)), "a name exported twice"
    package = importlib.import_module(f"tuner.{folder}")
    assert package.__all__ == sorted(names)
    modules = {p.stem for p in (PACKAGE / folder).glob("*.py")}
    assert not modules & set(names), "a name that is also a module's would be shadowed by the module once imported"
    for name in package.__all__:
        assert getattr(package, name) is getattr(importlib.import_module(typed_exports(door)[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        package.nope  # noqa: B018


def test_a_front_door_imports_nothing_until_a_name_is_used():
    """``tuner trials`` reads the storage: it must not pay for PyTorch."""
    code = "import sys, tuner.search.storage; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


def test_no_module_is_longer_than_a_reader_can_hold():
    """450 lines at most, but for the CLI (one function per command) and the space schema (one model per
    section of the file)."""
    long = {
        module: n
        for module, path in _modules()
        if (n := len(path.read_text().splitlines())) > 450 and module not in ("tuner.cli", "tuner.search.space")
    }
    assert long == {}
