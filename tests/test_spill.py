"""Spilled tensors: written in slices into a preallocated safetensors file, read back bit for bit."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tl_linmap.base.spill import SpillWriter, write_file


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


def test_a_file_written_a_tensor_at_a_time_is_what_safetensors_reads(tmp_path):
    spilled = SpillWriter(tmp_path / "spilled.safetensors", (2, 3, 4), torch.float32, (0, 2, 1))
    values = torch.randn(2, 3, 4)
    spilled.write_tensor(values)
    tensors = {
        "f64": torch.randn(5, 3, dtype=torch.float64), "bf16": torch.randn(7, dtype=torch.bfloat16), "ids": torch.arange(9),
        "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5, dtype=torch.float16), "empty": torch.zeros(0, 4),
        "spilled": spilled.spilled,
    }
    write_file(tmp_path / "all.safetensors", tensors, {"note": "hi"})
    read = load_file(tmp_path / "all.safetensors")  # safetensors' own reader
    assert read.keys() == tensors.keys()
    for key, tensor in tensors.items():
        expected = values.permute(0, 2, 1) if key == "spilled" else tensor  # copied as its file stores it
        assert torch.equal(read[key], expected) and read[key].dtype == expected.dtype, key
    with safe_open(str(tmp_path / "all.safetensors"), framework="pt") as f:
        assert f.metadata() == {"note": "hi"}


def test_a_file_can_be_rewritten_from_the_tensors_it_holds(tmp_path):
    writer = SpillWriter(tmp_path / "map.safetensors", (3, 4), torch.float64, (0, 1))
    tensor = torch.randn(3, 4, dtype=torch.float64)
    writer.write_tensor(tensor)
    write_file(writer.spilled.path, {"operators": writer.spilled, "more": torch.ones(2)}, {})
    assert torch.equal(writer.spilled.load(), tensor)
    assert not list(tmp_path.glob("*.partial"))
