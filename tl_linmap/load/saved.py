"""`tl_linmap.load`: a saved result back, the same object, without its model."""

from __future__ import annotations

import importlib
from pathlib import Path

from tl_linmap.base.errors import InputError
from tl_linmap.base.saving import read

#: Result class name -> the module that defines it (each has ``from_saved(tensors, fields)``).
SAVED = {"Graph": "tl_linmap.results.graph"}


def load(path: str | Path):
    """Load a result a ``.save(path)`` wrote.

    Args:
        path: The file.

    Returns:
        The result, equal to the one saved bit for bit (its model is not saved: tokens come decoded).

    Raises:
        InputError: for a missing file, one tl_linmap did not write, one of a newer format, or of a kind this version lacks.
    """
    kind, tensors, fields, _ = read(path)
    if kind not in SAVED:
        raise InputError(f"{str(path)!r} holds a {kind}, which this tl_linmap cannot load (it loads {', '.join(SAVED)}): upgrade tl_linmap.")
    return getattr(importlib.import_module(SAVED[kind]), kind).from_saved(tensors, fields)
