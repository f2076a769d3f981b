"""Spilled tensors: written in slices into a preallocated safetensors file, read back bit for bit."""

import pytest
import torch
from safetensors import safe_open

from tl_linmap.base.spill import SpillWriter


def test_a_tensor_written_whole_loads_bit_for_bit_with_its_strides(tmp_path):
    tensor = torch.randn(3, 5, 4, dtype=torch.float64).permute(1, 0, 2)  # not contiguous
    order = tuple(sorted(range(3), key=lambda d: -tensor.stride(d)))
    writer = SpillWriter(tmp_path / "t.safetensors", tuple(tensor.shape), torch.float64, order, contiguous=False)
    writer.write_tensor(tensor)
    loaded = writer.spilled.load()
    assert torch.equal(loaded, tensor) and loaded.stride() == tensor.stride()


def test_slices_written_as_they_come_make_the_transposed_tensor(tmp_path):
    operators = torch.randn(2, 3, 4, dtype=torch.float64)  # (pos, d_out, d_in), written as columns
    writer = SpillWriter(tmp_path / "c.safetensors", (2, 3, 4), torch.float64, (0, 2, 1))
    for token in range(2):
        for start in (0, 2):
            cols = operators[token, :, start : start + 2].T  # (k, d_out): one contiguous run stored
            writer.write((token * 4 + start) * 3, cols)
    loaded = writer.spilled.load()
    assert torch.equal(loaded, operators) and loaded.is_contiguous()
    with safe_open(str(writer.spilled.path), framework="pt") as f:  # an ordinary safetensors file
        assert f.get_tensor("operators").shape == (2, 4, 3)


def test_a_spilled_tensor_can_be_kept_in_another_dtype(tmp_path):
    tensor = torch.randn(2, 3, dtype=torch.float64)
    writer = SpillWriter(tmp_path / "f.safetensors", (2, 3), torch.float32, (0, 1))
    writer.write_tensor(tensor)
    assert torch.equal(writer.spilled.load(), tensor.float())
    with pytest.raises(TypeError):
        SpillWriter(tmp_path / "i.safetensors", (2,), torch.int64, (0,))
