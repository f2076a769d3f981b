"""Spilled tensors: a tensor written to disk in slices as it is computed, and read back on access.

A dense map too large to hold (`tl_linmap.linear.dense.linear_maps` under a memory budget) is
written into a preallocated ``.safetensors`` file, slice by slice as its columns or rows come, so
that it never needs to be whole in memory; `SpilledTensor.load` gives it back bit for bit, in the
memory layout it was computed in. The file is an ordinary safetensors file (one tensor,
``"operators"``, stored in its memory order; the header's metadata says how to permute it back).
A saved result's file (`tl_linmap.base.saving`) holds such tensors too, each under its own key.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from tl_linmap.base.errors import InputError

#: safetensors' names of torch's dtypes (those this torch has).
DTYPE_NAMES = {
    getattr(torch, name): code for name, code in (
        ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e5m2", "F8_E5M2"), ("int64", "I64"), ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint64", "U64"),
        ("uint32", "U32"), ("uint16", "U16"), ("uint8", "U8"), ("bool", "BOOL"),
    ) if hasattr(torch, name)
}

#: The metadata entry naming a file's contents: a result loaded from it reads its spilled tensors
#: only while the file still holds them (`SpilledTensor.file_id`).
FILE_ID = "tl_linmap_file"
#: The dtypes a map may be kept in.
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

#: The one tensor a spill file holds.
_NAME = "operators"


@dataclass(frozen=True)
class SpilledTensor:
    """A tensor that lives in a file: its shape, dtype and layout, read back on access.

    Attributes:
        path: The ``.safetensors`` file.
        shape: The tensor's shape.
        dtype: Its dtype.
        order: The axes in the order they are stored, outermost first (``(0, 2, 1)``: stored
            with its last two axes swapped).
        contiguous: Whether `load` gives a contiguous tensor (else the permuted view of the
            stored one, with the strides it was computed with).
        key: The tensor's name in the file.
        file_id: The file's `FILE_ID` when it was read (None: a spill file, which nothing else writes).
    """

    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    order: tuple[int, ...]
    contiguous: bool = True
    key: str = _NAME
    file_id: str | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in memory once loaded."""
        return _numel(self.shape) * _itemsize(self.dtype)

    @property
    def stored_shape(self) -> list[int]:
        """The shape the file holds it in (its axes in `order`)."""
        return [self.shape[axis] for axis in self.order]

    def stored(self) -> Tensor:
        """The tensor as its file holds it, its axes in `order` (what a copy into another file writes).

        Returns:
            A contiguous tensor of `stored_shape`.
        """
        try:
            with safe_open(str(self.path), framework="pt") as f:
                if self.file_id is not None and (f.metadata() or {}).get(FILE_ID) != self.file_id:
                    raise InputError(
                        f"{str(self.path)!r} was saved over since this result was loaded from it, and no longer holds its "
                        "maps: load the result again, or save other results to other files."
                    )
                return f.get_tensor(self.key)
        except FileNotFoundError as err:
            raise InputError(f"{str(self.path)!r}, where this result's maps are, is gone: keep the file while the result is used.") from err

    def load(self) -> Tensor:
        """The tensor, read from its file (a fresh copy in memory).

        Returns:
            The tensor, bit for bit as written.
        """
        stored = self.stored()
        tensor = stored.permute(sorted(range(len(self.order)), key=self.order.__getitem__))
        # A copy, so that products start on torch's own 64-byte alignment (see saving._aligned) and
        # the file's memory map is not kept alive by the result.
        return tensor.contiguous() if self.contiguous else tensor.clone(memory_format=torch.preserve_format)


def _numel(shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _header(entries: dict[str, tuple[torch.dtype, list[int]]], metadata: dict[str, str]) -> bytes:
    # A safetensors file's first bytes for tensors of these dtypes and stored shapes, their data in this order.
    header, offset = {}, 0
    for key, (dtype, shape) in entries.items():
        nbytes = _numel(shape) * _itemsize(dtype)
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps({**header, "__metadata__": metadata}).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data on 8 bytes
    return struct.pack("<Q", len(text)) + text


def write_file(path: str | Path, tensors: dict[str, Tensor | SpilledTensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file one tensor at a time; a `SpilledTensor` is copied from its file as it is stored.

    safetensors' own ``save_file`` needs every tensor in memory at once: written this way, a result
    whose maps live on disk is saved holding one of them. The file is written beside ``path`` and
    renamed, so a file that a spilled tensor is read from can be replaced by its own result.

    Args:
        path: The file.
        tensors: Name -> a contiguous CPU tensor, or a `SpilledTensor` (written in its stored layout).
        metadata: The header's text entries.
    """
    # Widest elements first (as safetensors orders them), so that each tensor starts aligned to its element size.
    keys = sorted(tensors, key=lambda key: -_itemsize(tensors[key].dtype))
    unknown = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in DTYPE_NAMES})
    if unknown:
        raise TypeError(f"safetensors has no name for {', '.join(unknown)}: a saved tensor must be one of {list(DTYPE_NAMES)}.")
    entries = {key: (t.dtype, t.stored_shape if isinstance(t, SpilledTensor) else list(t.shape)) for key in keys for t in [tensors[key]]}
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(_header(entries, metadata))
            for key in keys:
                tensor = tensors[key].stored() if isinstance(tensors[key], SpilledTensor) else tensors[key]
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
                del tensor
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class SpillWriter:
    """A preallocated safetensors file of one tensor, written in slices of its stored layout.

    Args:
        path: The file to write (replaced if it exists).
        shape: The tensor's shape.
        dtype: The dtype written (slices are cast to it).
        order: The stored order of the axes (see `SpilledTensor.order`).
        contiguous: As `SpilledTensor.contiguous`.
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: torch.dtype, order: tuple[int, ...], contiguous: bool = True):
        if dtype not in _FLOATS:
            raise TypeError(f"A spilled tensor must be one of {list(_FLOATS)}, not {dtype}.")
        self.spilled = SpilledTensor(Path(path), tuple(shape), dtype, tuple(order), contiguous)
        nbytes = self.spilled.nbytes
        head = _header({_NAME: (dtype, self.spilled.stored_shape)}, {"order": json.dumps(list(order))})
        self._start = len(head)
        self._item = _itemsize(dtype)
        with open(self.spilled.path, "wb") as f:
            f.write(head)
            f.truncate(self._start + nbytes)  # zeros (a sparse file) where nothing is written

    def write(self, offset: int, values: Tensor) -> None:
        """Write values at an element offset of the stored (flattened) tensor.

        Args:
            offset: Index of the first element in the stored layout.
            values: The elements, in stored order (any shape; cast to the file's dtype).
        """
        data = values.detach().to(device="cpu", dtype=self.spilled.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        view, at = memoryview(data), self._start + offset * self._item
        # Opened per write: a call may spill hundreds of maps, more than a process may hold open.
        fd = os.open(self.spilled.path, os.O_WRONLY)
        try:
            while view.nbytes:  # pwrite may write less than asked
                done = os.pwrite(fd, view, at)
                view, at = view[done:], at + done
        finally:
            os.close(fd)

    def write_tensor(self, tensor: Tensor) -> None:
        """Write the whole tensor (in the shape it was declared with), in the stored order.

        Args:
            tensor: The tensor.
        """
        self.write(0, tensor.permute(self.spilled.order))

