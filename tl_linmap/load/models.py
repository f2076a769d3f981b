"""Loading real models as TransformerBridges or HookedTransformers ready for exact linear maps.

`load_model` takes a hub name (needs network), a local Hugging Face directory, a local
GGUF file (dequantised to float by transformers + gguf), or the name of a model that an
installed Python package ships (`BUNDLED`), which works with no network at all.

Dequantising a GGUF takes a minute or so, so the first load of each file saves the float
model (safetensors) and its tokenizer under `cache_dir()`; later loads, in any process,
read that copy in seconds. `clear_cache()` deletes it all.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tl_linmap.base.compat import has_class, tl_version
from tl_linmap.base.errors import InputError, LinmapError, UnsupportedArchitectureError
from tl_linmap.freeze.architectures import EXCEPTIONS, SUPPORTED
from tl_linmap.load.bundled import BUNDLED, DEFAULT_MODEL, bundled_path
from tl_linmap.load.gguf import load_gguf
from tl_linmap.load.hf import from_pretrained, hooked_from_hf

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
class _Source:
    """Where a model comes from: the bridge's model name, a directory or hub name, and the GGUF file if any."""

    model_name: str
    location: str
    gguf: Path | None = None


def _closest_bundled(name: str) -> str | None:
    """The bundled name that `name` looks like a typo of; an ``org/model`` hub name never is."""
    if "/" in name:
        return None
    match = difflib.get_close_matches(name.lower(), BUNDLED, n=1)
    return match[0] if match else None


def _source(name_or_path: str) -> _Source:
    """Resolve a name without touching the network, catching typos of bundled names."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InputError(
            f"load_model takes a bundled name ({', '.join(BUNDLED)}), a .gguf file, a Hugging Face directory "
            f"or a hub name, got {name_or_path!r}."
        )
    name_or_path = os.fspath(name_or_path)
    if name_or_path in BUNDLED:
        path = bundled_path(name_or_path)
        return _Source(BUNDLED[name_or_path].hub_name, str(path.parent), path)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LinmapError(f"No GGUF file at {path}.")
        return _Source(path.stem, str(path.parent), path)
    close = None if path.exists() else _closest_bundled(name_or_path)
    if close is not None:
        raise InputError(
            f"{name_or_path!r} is not a bundled model, a local path or a hub name (org/model); "
            f"did you mean {close!r}? Bundled models: {', '.join(BUNDLED)}."
        )
    return _Source(name_or_path, name_or_path)


#: Model classes `load_model` builds.
KINDS = ("bridge", "hooked")


def default_kind() -> str:
    """The model class `load_model` builds when none is asked for: what the installed TransformerLens offers.

    Returns:
        ``"bridge"`` where TransformerLens has `TransformerBridge` (3.x, 4.x), else ``"hooked"``.
    """
    return "bridge" if has_class("bridge") else "hooked"


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    prepend_bos: bool | None = None,
    cache: bool = True,
    kind: str | None = None,
):
    """Load a model as a TransformerBridge (or HookedTransformer) ready for `tl_linmap.linear_map`.

    Weights are left unprocessed (no folding or centering), so every frozen factor sits
    where the freeze rules expect it. A GGUF file (bundled or local) is dequantised once
    and cached under `cache_dir()` (keyed by the file's sha256, the dtype, the cache
    format and the transformers version); later loads read the cache in seconds.
    `clear_cache()` deletes it.

    Args:
        name_or_path: A `BUNDLED` name (``"smollm2"``, ``"gemma3-270m"``), a local
            ``.gguf`` file, a local Hugging Face model directory, or a hub name.
        dtype: Parameter dtype (linear maps run in float64 regardless, and restore it).
        device: Device for the model (default: the bridge's choice; CPU for a HookedTransformer).
        prepend_bos: Whether text gets a BOS token by default; None picks per model
            (off where the BOS token is a chat marker, as for SmolLM2).
        cache: Whether a GGUF's conversion is read from and saved to the cache; False
            converts it afresh and writes nothing.
        kind: ``"bridge"`` (TransformerBridge, TransformerLens 3.x/4.x) or ``"hooked"``
            (HookedTransformer, TransformerLens 2.x/3.x; see `hooked_from_hf`); default:
            `default_kind`.

    Returns:
        A TransformerBridge or HookedTransformer in eval mode.

    Raises:
        InputError: if the name is not a local path and looks like a misspelt bundled name
            (raised before any network access).
        LinmapError: if the name cannot be resolved (offline, a missing package or file).
        UnsupportedArchitectureError: if the architecture has no freeze rules.
    """
    source = _source(name_or_path)  # first, so that a mistyped name fails before seconds of imports
    kind = kind or default_kind()
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}.")
    if not has_class(kind):
        raise InputError(
            f"kind={kind!r} needs a {'TransformerBridge (TransformerLens 3.x/4.x)' if kind == 'bridge' else 'HookedTransformer (TransformerLens 2.x/3.x)'}; "
            f"TransformerLens {'.'.join(map(str, tl_version()))} is installed. Use kind={'hooked' if kind == 'bridge' else 'bridge'!r}."
        )
    if source.gguf is None:
        tokenizer, hf_model = from_pretrained(name_or_path, source.location, dtype)
    else:
        tokenizer, hf_model = load_gguf(source.gguf, dtype, cache)
    config = hf_model.config
    if not getattr(config, "architectures", None):
        config.architectures = [_ARCHITECTURE_OF_MODEL_TYPE.get(config.model_type, config.model_type)]
    architecture = config.architectures[0]
    if kind == "hooked":
        model = hooked_from_hf(hf_model.eval(), tokenizer, hub_name=source.model_name, dtype=dtype, device=device)
    else:
        if architecture not in SUPPORTED:
            reason = EXCEPTIONS.get(architecture, "not in tl_linmap's tested support matrix (see docs/support.md)")
            raise UnsupportedArchitectureError(f"{name_or_path!r} is a {architecture}: {reason}.")
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_transformers(
            source.model_name, hf_model=hf_model.eval(), tokenizer=tokenizer, dtype=dtype, device=device
        )
    if prepend_bos is None:
        prepend_bos = model.cfg.default_prepend_bos and tokenizer.bos_token not in _CHAT_MARKER_BOS
    model.cfg.default_prepend_bos = prepend_bos
    return model.eval()
