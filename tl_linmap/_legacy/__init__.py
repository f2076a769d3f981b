"""Old module paths, kept for one release: ``tl_linmap.system`` and the rest of the flat layout.

Before the subpackages every module sat directly under ``tl_linmap``. An old path still
imports, with a `DeprecationWarning`:

- a module that moved whole is the *same module object* under both names, so
  ``unittest.mock.patch("tl_linmap.system.borrowed")`` patches what the code calls;
- a module that was split in two or more is a stand-in that reads, sets and deletes each name
  in the module that holds it now (a patch through it lands there too);
- ``tl_linmap.maps``, ``operators``, ``freezing`` and ``analysis``, deprecated before, are the
  forwarding modules of this folder;
- ``tl_linmap.results`` is now the results subpackage, whose ``__init__`` forwards the old names.

`install` puts the finder on ``sys.meta_path``; ``import tl_linmap`` calls it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

#: Old module name -> the modules holding its names now, the one that kept most of them first.
MOVED: dict[str, tuple[str, ...]] = {
    "errors": ("base.errors",),
    "compat": ("base.compat",),
    "guard": ("base.guard",),
    "budget": ("base.budget",),
    "exactness": ("base.exactness",),
    "table": ("base.table",),
    "_deprecated": ("base.deprecation",),
    "inputs": ("base.checks", "base.hook_names", "base.prompts", "freeze.targets"),
    "readout": ("reading.tokens", "freeze.norms"),
    "functionals": ("reading.readouts",),
    "spectral": ("reading.spectral", "results.svd", "results.logit_split"),
    "rules": ("freeze.architectures", "freeze.rules"),
    "structure": ("freeze.structure",),
    "experts": ("methods.experts", "results.experts", "freeze.moe"),
    "hooks": ("freeze.hooks", "freeze.factors", "freeze.apply"),
    "capture": ("freeze.capture",),
    "system": ("freeze.system",),
    "display": ("present.display",),
    "plotting": ("present.plotting",),
    "jacobian": ("linear.dense",),
    "implicit": ("linear.matrix_free",),
    "loading": ("load.models", "load.bundled", "load.cache", "load.gguf", "load.hf"),
    "toy": ("load.toy",),
    "datasets": ("load.datasets",),
    "decomposition": ("methods.decomposition",),
    "sequence": ("methods.sequence", "results.sequence"),
    "patching": ("methods.patching", "results.patching", "reading.readouts"),
    "steering": ("methods.steering",),
    "corpus": ("methods.corpus", "results.corpus"),
    "report": ("app.report",),
    "demo": ("app.demo",),
}
#: Modules deprecated before the subpackages, each forwarding its names with a warning of its own.
DEPRECATED = ("maps", "operators", "freezing", "analysis")

_PACKAGE = "tl_linmap"


def homes(old: str) -> list[types.ModuleType]:
    """The modules that hold an old module's names now.

    Args:
        old: An old module name without the package (``"system"``).

    Returns:
        The modules, the one that kept most of the old module's names first.
    """
    return [importlib.import_module(f"{_PACKAGE}.{home}") for home in MOVED[old]]


class SplitModule(types.ModuleType):
    """An old module that was split: each name is read, set and deleted where it lives now."""

    def __init__(self, name: str, modules: list[types.ModuleType]):
        super().__init__(name, f"Deprecated: split into {', '.join(m.__name__ for m in modules)}.")
        # Where each name lives, fixed now: a patch that deletes a name and sets it back finds its home.
        where = {n: m for m in reversed(modules) for n in vars(m) if not n.startswith("__")}
        object.__setattr__(self, "_homes", modules)
        object.__setattr__(self, "_where", where)

    def _home(self, name: str) -> types.ModuleType:
        return self._where.get(name, self._homes[0])

    def __getattr__(self, name: str):
        try:
            return getattr(self._home(name), name)
        except AttributeError:
            moved = ", ".join(m.__name__ for m in self._homes)
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r} (it moved to {moved})") from None

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("__"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._home(name), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._home(name), name)

    def __dir__(self) -> list[str]:
        return sorted(self._where)


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``tl_linmap.<old>`` and loads it as the module(s) that hold its names now."""

    def find_spec(self, fullname: str, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package != _PACKAGE or (old not in MOVED and old not in DEPRECATED):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, loader_state=old)

    def create_module(self, spec):
        old = spec.loader_state
        if old in DEPRECATED:
            module = importlib.import_module(f"{_PACKAGE}._legacy.{old}")
        else:
            modules = homes(old)
            module = SplitModule(spec.name, modules) if len(modules) > 1 else modules[0]
        # The import system sets __spec__ on what this returns; exec_module gives a real module its own back.
        spec.loader_state = (old, module.__spec__)
        return module

    def exec_module(self, module) -> None:
        old, own = module.__spec__.loader_state
        if not isinstance(module, SplitModule):
            module.__spec__ = own
        if old in MOVED:
            where = ", ".join(f"{_PACKAGE}.{home}" for home in MOVED[old])
            warnings.warn(f"{_PACKAGE}.{old} is deprecated; its names live in {where}.", DeprecationWarning, stacklevel=2)


def install() -> None:
    """Make the old module paths importable (once per process).

    Returns:
        None.
    """
    if not any(isinstance(finder, _OldPaths) for finder in sys.meta_path):
        sys.meta_path.append(_OldPaths())
