"""The package's layout: no import cycles, old module names still import (with a warning)."""

import ast
import importlib
import pkgutil
import warnings
from pathlib import Path

import pytest
import torch

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
        ("maps", "plan_chunk", "tl_linmap.budget.plan_rows"),
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


def test_old_functions_with_a_new_signature_keep_their_old_one(toy_models):
    from tl_linmap import analysis, maps

    lm = tl_linmap.linear_map(toy_models["llama"], "Hi there")
    with pytest.warns(DeprecationWarning):
        assert analysis.source_tokens(lm) == lm.sources
    with pytest.warns(DeprecationWarning):
        assert torch.equal(analysis.operator_svd(lm, 2).values, lm.svd(2).values)
    with pytest.warns(DeprecationWarning):
        assert analysis.stacked_tokens(lm, True) == list(range(1, lm.position + 1))
    with pytest.warns(DeprecationWarning):
        assert len(analysis.dimensionality(lm, per_token=False)) == 1
    with pytest.warns(DeprecationWarning):
        assert analysis.logit_contributions(lm, 5).logit == lm.logit_contributions(5).logit
    with pytest.warns(DeprecationWarning, match="use tl_linmap.budget.plan_rows"):
        assert maps.plan_chunk(toy_models["llama"], 4, 64, 1, torch.float64, 16, torch.device("cpu")) == 16
