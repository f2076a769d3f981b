"""The package's layout: no import cycles, old module names still import (with a warning)."""

import ast
import importlib
import pkgutil
import warnings
from pathlib import Path

import pytest

import tl_linmap

PACKAGE = Path(tl_linmap.__file__).parent


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tl_linmap."):
            found.add(node.module.split(".")[1])
    return found


def test_no_module_imports_itself_back():
    graph = {m.name: _imports(m.name) for m in pkgutil.iter_modules([str(PACKAGE)])}

    def reach(start):
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph.get(module, ())
        return seen

    cycles = [m for m in graph if m != "__init__" and m in reach(m)]
    assert not cycles, f"import cycles through {cycles}"


@pytest.mark.parametrize(
    ("old", "name", "new"),
    [
        ("maps", "linear_map", "tl_linmap.jacobian"),
        ("maps", "plan_chunk", "tl_linmap.budget"),
        ("freezing", "freeze_hooks", "tl_linmap.hooks"),
        ("analysis", "DecodedPair", "tl_linmap.spectral"),
        ("analysis", "Readout", "tl_linmap.readout"),
        ("operators", "token_contributions", "tl_linmap.implicit"),
    ],
)
def test_old_module_names_warn_and_forward(old, name, new):
    module = importlib.import_module(f"tl_linmap.{old}")
    with pytest.warns(DeprecationWarning, match=f"tl_linmap.{old}.{name} is deprecated; use {new}"):
        value = getattr(module, name)
    assert value is not None
    with pytest.raises(AttributeError):
        module.no_such_name


def test_importing_the_package_warns_about_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for info in pkgutil.iter_modules([str(PACKAGE)]):
            if info.name not in ("maps", "freezing", "analysis", "operators", "__main__"):
                importlib.import_module(f"tl_linmap.{info.name}")
