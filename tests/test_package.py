"""The package's layout: subpackages by role with imports one way, no import circle, old paths still work."""

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

import tl_linmap
from tl_linmap import _legacy

PACKAGE = Path(tl_linmap.__file__).parent

#: The subpackages, lowest first: a module may import from its own subpackage and those before it
#: (README, "Layout"). The top-level modules (`__init__`, `__main__`, `_legacy`) may import anything.
LAYERS = ["base", "reading", "freeze", "present", "results", "linear", "load", "methods", "app"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every tl_linmap module a file imports, by any import statement (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: relative import at line {node.lineno}; write the absolute path")
        else:
            continue
        for name in names:
            while name and name not in modules:  # tl_linmap.a.b.name -> tl_linmap.a.b
                name = name.rpartition(".")[0]
            if name.startswith("tl_linmap"):
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imported(path, modules) - {name} for name, path in modules.items()}
    # A subpackage's __init__ is imported on the way to its modules; it must import none of them back.
    for name, path in modules.items():
        if path.name == "__init__.py" and name != "tl_linmap":
            own = {target for target in graph[name] if target.startswith(f"{name}.")}
            assert not own, f"{name}/__init__.py imports its own modules {own}"
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    # Tarjan's strongly connected components; a component of two or more modules is a circle.
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_circle():
    assert _circles(_graph()) == []


def test_the_circle_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_subpackage_is_a_layer():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")} - {"_legacy"}
    assert subpackages == set(LAYERS)
    top_level = {p.stem for p in PACKAGE.glob("*.py")}
    assert top_level == {"__init__", "__main__"}, "new modules go into a subpackage"


def test_imports_run_one_way():
    against = [
        f"{module} -> {target}"
        for module, targets in _graph().items() if _layer(module) is not None
        for target in targets if _layer(target) is None or _layer(target) > _layer(module)
    ]
    assert against == [], "imports against the layers' direction (README, Layout):\n" + "\n".join(against)


def test_the_direction_check_reads_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from tl_linmap.methods.patching import attribution_patching\n")
    assert "tl_linmap.methods.patching" in _imported(path, _modules())


def test_import_is_light():
    # The heavy parts load on first use (a fresh interpreter: this one has loaded everything).
    code = (
        "import sys, tl_linmap\n"
        "heavy = ['tl_linmap.present.plotting', 'tl_linmap.load.models', 'tl_linmap.methods.corpus', 'matplotlib']\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "tl_linmap.corpus_analysis\n"
        "print('tl_linmap.methods.corpus' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "True"]


def test_public_names_resolve_to_their_modules():
    for name in tl_linmap.__all__:
        value = getattr(tl_linmap, name)
        home = tl_linmap.PUBLIC.get(name) or tl_linmap.MODULES[name]
        assert value is getattr(importlib.import_module(f"tl_linmap.{home}"), name, value), name
    assert set(tl_linmap.__all__) <= set(dir(tl_linmap))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        tl_linmap.no_such_name


@pytest.mark.parametrize("old", sorted(_legacy.MOVED))
def test_old_module_paths_are_the_modules_that_hold_their_names(old):
    with pytest.warns(DeprecationWarning, match=f"tl_linmap.{old} is deprecated"):
        sys.modules.pop(f"tl_linmap.{old}", None)
        module = importlib.import_module(f"tl_linmap.{old}")
    homes = _legacy.homes(old)
    if len(homes) == 1:
        assert module is homes[0]
        assert module.__spec__.name == homes[0].__name__  # its own spec, not the alias's
    for name in {name for home in homes for name in vars(home) if not name.startswith("__")}:
        owner = next(home for home in homes if name in vars(home))  # the first that has it
        assert getattr(module, name) is getattr(owner, name)
    assert getattr(tl_linmap, old) is module


def test_a_patch_through_an_old_path_takes_effect():
    import tl_linmap.freeze.system
    import tl_linmap.system

    with mock.patch("tl_linmap.system.borrowed") as patched:
        assert tl_linmap.freeze.system.borrowed is patched
    assert tl_linmap.freeze.system.borrowed is not patched
    # Through a split module's stand-in: the name is set (and restored) where it lives now.
    import tl_linmap.freeze.factors
    import tl_linmap.hooks

    real = tl_linmap.freeze.factors.pad_factors
    with mock.patch("tl_linmap.hooks.pad_factors") as patched:
        assert tl_linmap.freeze.factors.pad_factors is patched
    assert tl_linmap.freeze.factors.pad_factors is real


@pytest.mark.parametrize(
    ("old", "name", "new"),
    [
        ("maps", "linear_map", "tl_linmap.linear.dense"),
        ("maps", "plan_chunk", "tl_linmap.base.budget.plan_rows"),
        ("freezing", "freeze_hooks", "tl_linmap.freeze.hooks"),
        ("analysis", "DecodedPair", "tl_linmap.results.svd"),
        ("analysis", "Readout", "tl_linmap.reading.tokens"),
        ("operators", "token_contributions", "tl_linmap.linear.matrix_free"),
    ],
)
def test_old_module_names_warn_and_forward(old, name, new):
    module = importlib.import_module(f"tl_linmap.{old}")
    with pytest.warns(DeprecationWarning, match=f"tl_linmap.{old}.{name} is deprecated; use {new}"):
        value = getattr(module, name)
    assert value is not None
    with pytest.raises(AttributeError):
        module.no_such_name


def test_the_old_results_module_names_forward_from_the_subpackage():
    import tl_linmap.results

    with pytest.warns(DeprecationWarning, match="tl_linmap.results.LinearMap is deprecated; use tl_linmap.results.maps.LinearMap"):
        assert tl_linmap.results.LinearMap is tl_linmap.LinearMap
    with pytest.warns(DeprecationWarning, match="use tl_linmap.results.attribution.GapRow"):
        from tl_linmap.results import GapRow  # noqa: F401


def test_importing_the_package_warns_about_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in _modules():
            if not name.startswith("tl_linmap._legacy.") and name != "tl_linmap.__main__":
                importlib.import_module(name)


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
    with pytest.warns(DeprecationWarning, match="use tl_linmap.base.budget.plan_rows"):
        assert maps.plan_chunk(toy_models["llama"], 4, 64, 1, torch.float64, 16, torch.device("cpu")) == 16
