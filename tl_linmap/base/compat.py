"""TransformerLens across versions: the names tl_linmap needs, wherever the installed version keeps them.

Supported: TransformerLens 2.16 up to (not including) 5. `HookedTransformer` exists up to 3.x,
`TransformerBridge` from 3.0; importing tl_linmap never imports a class the installed version lacks.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata

from tl_linmap.base.errors import InputError

#: The TransformerLens versions tl_linmap is tested with (README: which version tests what).
SUPPORTED = ">=2.16,<5"


try:  # TransformerLens 4 moved `utils` to `utilities`; 2.x has a `utilities` package without it
    from transformer_lens.utilities import get_act_name
except ImportError:  # pragma: no cover - exercised in the TransformerLens 2.x/3.x environments
    from transformer_lens.utils import get_act_name


__all__ = ["SUPPORTED", "get_act_name", "is_bridge", "is_hooked", "check_model", "has_class", "tl_version"]


@functools.cache
def tl_version() -> tuple[int, ...]:
    """The installed TransformerLens version.

    Returns:
        Its release numbers, e.g. ``(4, 3, 0)``.
    """
    text = importlib.metadata.version("transformer-lens")
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())


@functools.cache
def _class(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def has_class(kind: str) -> bool:
    """Whether the installed TransformerLens has a model class.

    Args:
        kind: ``"bridge"`` (TransformerBridge) or ``"hooked"`` (HookedTransformer).

    Returns:
        True where it can be imported.
    """
    return _class(*_CLASSES[kind]) is not None


_CLASSES = {"bridge": ("transformer_lens.model_bridge", "TransformerBridge"), "hooked": ("transformer_lens", "HookedTransformer")}


def _is(model, kind: str) -> bool:
    cls = _class(*_CLASSES[kind])
    return cls is not None and isinstance(model, cls)


def is_bridge(model) -> bool:
    """Whether ``model`` is a `TransformerBridge` (TransformerLens 3.x and 4.x).

    Args:
        model: Anything.

    Returns:
        True for a bridge (or a subclass).
    """
    return _is(model, "bridge")


def is_hooked(model) -> bool:
    """Whether ``model`` is a `HookedTransformer` (TransformerLens 2.x and 3.x; gone in 4.0).

    Args:
        model: Anything.

    Returns:
        True for a HookedTransformer (or a subclass).
    """
    return _is(model, "hooked")


def check_model(model) -> None:
    """Refuse, with one clear message, anything that is neither model class tl_linmap maps.

    Args:
        model: What the user passed as the model.

    Raises:
        InputError: naming the class given, the classes accepted and the supported versions.
    """
    if is_bridge(model) or is_hooked(model):
        version = tl_version()
        if not (2, 16) <= version[:2] < (5, 0):
            raise InputError(
                f"TransformerLens {'.'.join(map(str, version))} is installed; tl_linmap supports {SUPPORTED}."
            )
        return
    raise InputError(
        f"Expected a TransformerLens HookedTransformer (TransformerLens 2.16-3.x) or TransformerBridge "
        f"(3.x-4.x) as the model, got {type(model).__module__}.{type(model).__name__}. "
        f"Installed: TransformerLens {'.'.join(map(str, tl_version()))}; tl_linmap supports {SUPPORTED}."
    )
