"""Spilled tensors: a tensor written to disk in slices as it is computed, and read back on access.

A dense map too large to hold (`tl_linmap.linear.dense.linear_maps` under a memory budget) is
written into a preallocated ``.safetensors`` file, slice by slice as its columns or rows come, so
that it never needs to be whole in memory; `SpilledTensor.load` gives it back bit for bit, in the
memory layout it was computed in. The file is an ordinary safetensors file (one tensor,
``"operators"``, stored in its memory order; the header's metadata says how to permute it back).
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

#: safetensors' names of the dtypes a map may be kept in.
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

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
    """

    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    order: tuple[int, ...]
    contiguous: bool = True

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in memory once loaded."""
        return _numel(self.shape) * _itemsize(self.dtype)

    def load(self) -> Tensor:
        """The tensor, read from its file (a fresh copy in memory).

        Returns:
            The tensor, bit for bit as written.
        """
        with safe_open(str(self.path), framework="pt") as f:
            stored = f.get_tensor(_NAME)
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
        if dtype not in _DTYPES:
            raise TypeError(f"A spilled tensor must be one of {list(_DTYPES)}, not {dtype}.")
        self.spilled = SpilledTensor(Path(path), tuple(shape), dtype, tuple(order), contiguous)
        stored = [shape[axis] for axis in order]
        nbytes = self.spilled.nbytes
        header = {_NAME: {"dtype": _DTYPES[dtype], "shape": stored, "data_offsets": [0, nbytes]},
                  "__metadata__": {"order": json.dumps(list(order))}}
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)  # safetensors aligns the data on 8 bytes
        self._start = 8 + len(text)
        self._item = _itemsize(dtype)
        with open(self.spilled.path, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
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

