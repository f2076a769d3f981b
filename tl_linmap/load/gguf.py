"""GGUF checkpoints: dequantised by transformers + gguf once, then read from the cache."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tl_linmap.base.errors import LinmapError
from tl_linmap.load.cache import (
    ENTRY_META,
    TEMP_PREFIX,
    cache_dir,
    dtype_name,
    entry_meta,
    entry_name,
    file_digest,
    remove_stale_temps,
    tree_size,
)
from tl_linmap.load.hf import from_pretrained, say


def _convert_gguf(path: Path, dtype: torch.dtype):
    """(tokenizer, dense HF model) dequantised from a GGUF file: the slow step the cache saves."""
    tokenizer, hf_model = from_pretrained(str(path), str(path.parent), dtype, gguf_file=path.name)
    # The GGUF quantizer only records where the weights came from; save_pretrained refuses a model that has one.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    return tokenizer, hf_model


def _write_entry(entry: Path, tokenizer, hf_model, meta: dict) -> None:
    """Save model and tokenizer as the cache entry `entry`, all or nothing.

    Everything is written to a temporary sibling directory and renamed into place last,
    so an interrupted write never leaves a partial entry where a later load would look.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(entry.parent)
    temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=entry.parent))
    try:
        hf_model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        (temp / ENTRY_META).write_text(json.dumps(meta, indent=1))
        if entry.exists() and not (entry / ENTRY_META).is_file():
            shutil.rmtree(entry)  # incomplete: a complete entry always has its meta file
        try:
            temp.rename(entry)
        except OSError:
            if not (entry / ENTRY_META).is_file():  # else a concurrent load wrote it first
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def load_gguf(path: Path, dtype: torch.dtype, cache: bool):
    """(tokenizer, HF model) of a GGUF file, converted once and then read from the cache."""
    if not cache:
        return _convert_gguf(path, dtype)
    digest = file_digest(path)
    entry = cache_dir() / entry_name(digest, dtype)
    if not (entry / ENTRY_META).is_file():
        start = time.perf_counter()
        say(
            f"converting {path.name} ({path.stat().st_size / 1e6:.0f} MB GGUF) to {dtype_name(dtype)} weights once; "
            f"dequantising takes a minute or so. Cached at {entry} for next time."
        )
        tokenizer, hf_model = _convert_gguf(path, dtype)
        meta = entry_meta(path, digest, dtype)
        try:
            _write_entry(entry, tokenizer, hf_model, meta)
        except OSError as err:
            warnings.warn(f"Could not cache the converted model at {entry} ({err}); the next load converts again.")
            return tokenizer, hf_model
        say(
            f"converted and cached in {time.perf_counter() - start:.0f} s ({tree_size(entry) / 1e6:.0f} MB); "
            "tl_linmap.load.cache.clear_cache() frees it."
        )
        del tokenizer, hf_model  # read it back below, so the first load returns what later loads will
    try:
        return from_pretrained(str(path), str(entry), dtype)
    except Exception as err:  # whatever broke in the entry, the remedy is the same
        raise LinmapError(
            f"The cached conversion of {path} at {entry} could not be read ({err}); delete it with "
            "tl_linmap.load.cache.clear_cache() or load with cache=False."
        ) from err
