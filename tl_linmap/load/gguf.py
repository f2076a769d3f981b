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
    BROKEN_PREFIX,
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
    """(tokenizer, HF model) of a GGUF file, converted once and then read from the cache.

    The cache is derived data: an entry that cannot be read (truncated, edited) is moved aside, with one
    warning, and made again; only a fresh entry that cannot be read either is an error.
    """
    if not cache:
        return _convert_gguf(path, dtype)
    digest = file_digest(path)
    entry = cache_dir() / entry_name(digest, dtype)
    for fresh in (False, True):
        if not (entry / ENTRY_META).is_file():
            fresh = True
            converted = _convert_to_entry(path, digest, dtype, entry)
            if converted is not None:  # the cache could not be written: the conversion as it is
                return converted
        problem = damage(entry)  # checked first: reading a truncated weights file through mmap kills the process
        if problem is None:
            try:
                return from_pretrained(str(path), str(entry), dtype)
            except Exception as err:  # whatever broke in the entry, the remedy is the same
                problem = str(err)
        if fresh:
            raise LinmapError(
                f"The cached conversion of {path} at {entry} could not be read just after it was written ({problem}); "
                "load with cache=False, and check the disk the cache is on (tl_linmap.load.cache.cache_dir())."
            )
        aside = entry.with_name(f"{BROKEN_PREFIX}{entry.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        entry.rename(aside)
        warnings.warn(
            f"The cached conversion of {path} at {entry} could not be read ({problem}); it was moved to {aside} "
            "(tl_linmap.load.cache.clear_cache() deletes it) and is made again."
        )
    raise AssertionError("unreachable: the second pass reads a fresh entry or raises")


def damage(entry: Path) -> str | None:
    """What is wrong with a cache entry's weights files, read from their own headers (no weight is read).

    Args:
        entry: A cache entry's directory.

    Returns:
        None for files whose sizes match their headers, else what does not.
    """
    for weights in sorted(entry.glob("*.safetensors")):
        size = weights.stat().st_size
        with weights.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or 8 + n > size:
                return f"{weights.name} is cut short in its header ({size} bytes)"
            try:
                header = json.loads(f.read(n))
            except ValueError:
                return f"{weights.name} has an unreadable header"
        end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
        if 8 + n + end != size:
            return f"{weights.name} holds {size} bytes, its header says {8 + n + end}"
    return None


def _convert_to_entry(path: Path, digest: str, dtype: torch.dtype, entry: Path):
    # Convert and write the cache entry; returns the conversion itself only where the entry could not be written.
    start = time.perf_counter()
    say(
        f"converting {path.name} ({path.stat().st_size / 1e6:.0f} MB GGUF) to {dtype_name(dtype)} weights once; "
        f"dequantising takes a minute or so. Cached at {entry} for next time."
    )
    tokenizer, hf_model = _convert_gguf(path, dtype)
    try:
        _write_entry(entry, tokenizer, hf_model, entry_meta(path, digest, dtype))
    except OSError as err:
        warnings.warn(f"Could not cache the converted model at {entry} ({err}); the next load converts again.")
        return tokenizer, hf_model
    say(f"converted and cached in {time.perf_counter() - start:.0f} s ({tree_size(entry) / 1e6:.0f} MB); tl_linmap.load.cache.clear_cache() frees it.")
    return None  # read back by the caller, so the first load returns what later loads will
