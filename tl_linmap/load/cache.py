"""The converted-model cache: where dequantised GGUF models are kept, and clearing it."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

#: Bumped whenever what a cache entry holds changes, so that older entries are never read.
CACHE_FORMAT = 1


_ENTRY_PREFIX = "gguf-"


TEMP_PREFIX = ".tmp-gguf-"


#: An entry that could not be read, moved aside before it is made again (`clear_cache` deletes it).
BROKEN_PREFIX = ".broken-gguf-"


ENTRY_META = "tl_linmap_entry.json"


# A write takes seconds, so a temporary directory this old was left by a killed process.
_STALE_TEMP_S = 3600.0


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
    """Delete every converted model `load_model` cached, and any half-written or broken one.

    The next load of each GGUF converts it again (a minute or so). From a shell:
    ``python -c "import tl_linmap.load.models as l; print(l.clear_cache())"``. Only tl_linmap's
    own entries are deleted, so a ``$TL_LINMAP_CACHE`` shared with other files is safe.

    Returns:
        The deleted directories and the bytes they held.
    """
    root = cache_dir()
    ours = sorted(
        path for path in (root.iterdir() if root.is_dir() else ())
        if path.is_dir() and path.name.startswith((_ENTRY_PREFIX, TEMP_PREFIX, BROKEN_PREFIX))
    )
    n_bytes = sum(tree_size(path) for path in ours)
    for path in ours:
        shutil.rmtree(path)
    return ClearedCache(tuple(ours), n_bytes)


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes: a renamed or moved copy still hits, an edited one misses.

    Streamed at about 1 s/GB (0.07 s for SmolLM2's 98 MB), small next to a load.
    """
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def entry_name(digest: str, dtype: torch.dtype) -> str:
    import transformers

    # transformers' version is in the key too: another one may dequantise or save differently.
    return f"{_ENTRY_PREFIX}{digest[:32]}-{dtype_name(dtype)}-v{CACHE_FORMAT}-transformers{transformers.__version__}"


def remove_stale_temps(root: Path) -> None:
    for path in root.glob(f"{TEMP_PREFIX}*"):
        if time.time() - path.stat().st_mtime > _STALE_TEMP_S:
            shutil.rmtree(path, ignore_errors=True)


def entry_meta(path: Path, digest: str, dtype: torch.dtype) -> dict:
    """What a cache entry records of its source (written beside the converted model).

    Args:
        path: The GGUF file converted.
        digest: Its sha256.
        dtype: The dtype it was converted to.

    Returns:
        The entry's metadata, with the cache format it was written in.
    """
    return {"format": CACHE_FORMAT, "source": str(path), "sha256": digest, "dtype": dtype_name(dtype)}
