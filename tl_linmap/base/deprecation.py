"""Old module names that still import for one release, with a `DeprecationWarning` per name used."""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable, Sequence

from tl_linmap.base.errors import InputError


def forwarder(
    old: str, modules: Sequence[str], renamed: dict[str, tuple[str, str]] | None = None,
    adapters: dict[str, Callable] | None = None,
) -> Callable[[str], object]:
    """A module ``__getattr__`` that finds old names in the modules that now hold them.

    Args:
        old: The old module's name, e.g. ``"tl_linmap.maps"``.
        modules: Where its names live now, searched in order.
        renamed: Old name -> (module, new name) for names that changed too.
        adapters: Old name -> a function with the old signature, for names whose signature changed.

    Returns:
        The ``__getattr__`` function for the old module.
    """
    renamed, adapters = renamed or {}, adapters or {}

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in adapters:
            warnings.warn(f"{old}.{name} is deprecated; use {adapters[name].__doc__}.", DeprecationWarning, stacklevel=2)
            return adapters[name]
        module, new = renamed.get(name, (None, name))
        for candidate in [module] if module else modules:
            value = getattr(importlib.import_module(candidate), new, None)
            if value is not None:
                home = getattr(value, "__module__", None) or candidate  # where it is defined, not re-exported
                warnings.warn(f"{old}.{name} is deprecated; use {home}.{new}.", DeprecationWarning, stacklevel=2)
                return value
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it is deprecated; see {', '.join(modules)})")

    return __getattr__


def renamed_argument(old: str, old_value, new: str, new_value):
    """The value of an argument whose old name still works for one release, with a warning.

    Args:
        old: The old name.
        old_value: What was passed under it (None: nothing).
        new: The new name.
        new_value: What was passed under it.

    Returns:
        The value to use.

    Raises:
        InputError: if both names were given.
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise InputError(f"Pass {new}= only ({old}= is its deprecated name).")
    warnings.warn(f"{old}= is deprecated; use {new}=.", DeprecationWarning, stacklevel=3)
    return old_value


def renamed_attribute(old: str, new: str) -> property:
    """A read-only property under an attribute's old name, for one release, with a warning.

    Args:
        old: The old attribute name.
        new: The attribute it now reads.

    Returns:
        The property, to assign in the class body under ``old``.
    """

    def get(self):
        warnings.warn(f"{type(self).__name__}.{old} is deprecated; use .{new}.", DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    return property(get, doc=f"Deprecated name of `{new}`.")


def renamed_names(module: str, names: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that serves a module's renamed names under their old names, with a warning.

    Args:
        module: The module's ``__name__``.
        names: Old name -> the name it has now in that module.

    Returns:
        The ``__getattr__`` function for the module.
    """

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} is deprecated; use {module}.{names[name]}.", DeprecationWarning, stacklevel=2)
        return vars(importlib.import_module(module))[names[name]]

    return __getattr__


def renamed_fields(**renames: str) -> Callable[[type], type]:
    """Class decorator (above ``@dataclass``): fields renamed keep their old names for one release.

    The old name reads the field (a warning) and is still taken by the constructor (a warning;
    both names at once is an error).

    Args:
        **renames: Old name -> new field name.

    Returns:
        The decorator.
    """

    def decorate(cls: type) -> type:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    kwargs[new] = renamed_argument(old, kwargs.pop(old), new, kwargs.get(new))
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        for old, new in renames.items():
            setattr(cls, old, renamed_attribute(old, new))
        return cls

    return decorate
