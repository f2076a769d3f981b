"""`tl_linmap.load`: a saved result back, the same object, with or without its model."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from tl_linmap.base.errors import InputError
from tl_linmap.base.saving import config_hash, model_config, read, rebuild
from tl_linmap.results.graph import Graph


def load(path: str | Path, model=None):
    """Load a result a ``.save(path)`` wrote.

    Args:
        path: The file.
        model: The model the result was computed with (optional): where the result held it (a map's
            token reader, a feature split), the loaded one holds it again and reads any token, as the
            original did. Without it the result holds a `tl_linmap.base.saving.SavedModel`.

    Returns:
        The result, equal to the one saved bit for bit (its tensors on the CPU; maps that were on disk
        when saved are read from this file on access).

    Raises:
        InputError: for a missing file, one tl_linmap did not write, one of a newer format, one that
            holds a class this version lacks, or a model other than the one the result was computed with.
    """
    header, tensors = read(path)
    if header["format"] == 1:
        return _format_1(path, header, tensors)
    if model is not None:
        _check_model(header, model)

    def find_class(name: str) -> type:
        return _class(name, path, header)

    return rebuild(header, tensors, find_class, model, path)


def _check_model(header: dict, model) -> None:
    saved = header.get("model")
    given = config_hash(model_config(model))
    if saved and saved["config_hash"] != given:
        raise InputError(
            f"This result was computed with {saved['name']!r} (config hash {saved['config_hash']}); the model given, "
            f"{getattr(model.cfg, 'model_name', '')!r}, has config hash {given}: pass the model it was computed with, or none."
        )


def _class(name: str, path, header: dict) -> type:
    # A file names the classes it holds (as pickle does), but only tl_linmap's dataclasses are built, from their fields.
    module, _, qualname = name.partition(":")
    found = None
    if module == "tl_linmap" or module.startswith("tl_linmap."):
        try:
            found = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            found = None
    if not (isinstance(found, type) and dataclasses.is_dataclass(found)):
        raise InputError(
            f"{str(path)!r} holds a {qualname} ({module}), which this tl_linmap lacks; it was saved by tl_linmap "
            f"{header['versions'].get('tl_linmap')}: load it with that version or a newer one."
        )
    return found


def _format_1(path, header: dict, tensors: dict) -> Graph:
    # Format 1 held one kind, a Graph, its tensors and fields flat.
    if header["kind"] != "Graph":
        raise InputError(f"{str(path)!r} holds a {header['kind']} in format 1, which held Graphs only: it is not a file tl_linmap wrote.")
    fields = {name: value for name, value in header["fields"].items() if name != "config_hash"}
    for name in ("sites", "targets", "str_tokens"):
        fields[name] = tuple(fields[name])
    return Graph(**tensors, **fields)
