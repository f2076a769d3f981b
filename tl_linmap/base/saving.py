"""Saved results: one ``.safetensors`` file, the tensors as tensors and everything else as JSON in its header.

Nothing is pickled, so a file from anywhere is safe to open. The header records the result's type, the
format's version, the versions of tl_linmap, TransformerLens and torch that wrote it, and what the result
says of its model (its name, a hash of its config) and prompt (its tokens), so a loaded result can still
print, plot and decode its tokens without the model. `tl_linmap.load` reads any of them back.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tl_linmap.base.errors import InputError

#: The format written; a file of a newer one is refused (`read`).
FORMAT = 1
_KEY = "tl_linmap"


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def config_hash(config: dict) -> str:
    """A short hash of a model's config, to tell later whether a result belongs to a model.

    Args:
        config: JSON-able sizes and names.

    Returns:
        16 hex digits.
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write(path: str | Path, kind: str, tensors: dict[str, torch.Tensor], fields: dict) -> Path:
    """Save a result.

    Args:
        path: The file (``.safetensors`` is added where the name has no suffix).
        kind: The result's class name (how `tl_linmap.load` finds it).
        tensors: Its tensors by name (saved contiguous, on the CPU, bit for bit).
        fields: Everything else, JSON-able.

    Returns:
        The path written.
    """
    path = Path(path)
    path = path if path.suffix else path.with_suffix(".safetensors")
    header = {
        "format": FORMAT, "kind": kind, "fields": fields,
        "versions": {"tl_linmap": _version("tl_linmap"), "transformer_lens": _version("transformer-lens"), "torch": torch.__version__},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata={_KEY: json.dumps(header)})
    return path


def read(path: str | Path) -> tuple[str, dict[str, torch.Tensor], dict, dict]:
    """Open a saved result.

    Args:
        path: A file `write` wrote.

    Returns:
        ``(kind, tensors, fields, versions)``.

    Raises:
        InputError: for a missing file, a file tl_linmap did not write, or one of a newer format.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"No saved result at {str(path)!r}: give the path a result's .save() wrote.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own types for a file that is not one
        raise InputError(f"{str(path)!r} is not a safetensors file ({err}): give the path a result's .save() wrote.") from err
    if _KEY not in meta:
        raise InputError(f"{str(path)!r} is a safetensors file tl_linmap did not write (no {_KEY!r} header): load it with safetensors.")
    header = json.loads(meta[_KEY])
    if header.get("format", 0) > FORMAT:
        raise InputError(
            f"{str(path)!r} was saved in format {header['format']} by tl_linmap {header['versions'].get('tl_linmap')}; this tl_linmap "
            f"reads format {FORMAT} and older: upgrade tl_linmap to load it."
        )
    return header["kind"], tensors, header["fields"], header["versions"]
