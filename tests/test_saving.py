"""Saved results (`tl_linmap.base.saving`, `tl_linmap.load`): one safetensors file, a JSON header, nothing pickled.
A Graph's round trip on real graphs is in test_graph.py."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tl_linmap
from tl_linmap.base import saving


def test_write_then_read_keeps_tensors_and_fields(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float64).reshape(2, 3), "b": torch.tensor([1, -1], dtype=torch.int64)}
    fields = {"sites": ["x", "y"], "position": 3, "config": {"n_layers": 2}}
    path = saving.write(tmp_path / "r", "Graph", tensors, fields)
    assert path.name == "r.safetensors"
    kind, read, got, versions = saving.read(path)
    assert kind == "Graph" and got == fields and set(versions) == {"tl_linmap", "transformer_lens", "torch"}
    assert all(torch.equal(read[k], v) and read[k].dtype == v.dtype for k, v in tensors.items())
    with safe_open(str(path), framework="pt") as f:  # the header is plain JSON: nothing to unpickle
        header = json.loads(f.metadata()["tl_linmap"])
    assert header["format"] == saving.FORMAT and header["versions"]["torch"] == torch.__version__


def test_a_newer_format_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(saving, "FORMAT", saving.FORMAT + 1)
    path = saving.write(tmp_path / "new", "Graph", {"a": torch.zeros(1)}, {})
    monkeypatch.undo()
    with pytest.raises(tl_linmap.InputError, match=f"format {saving.FORMAT + 1}.*upgrade tl_linmap"):
        tl_linmap.load(path)


@pytest.mark.parametrize("case", ["missing", "not safetensors", "not ours", "unknown kind"])
def test_bad_files_say_what_to_pass(tmp_path, case):
    path = tmp_path / "f.safetensors"
    if case == "not safetensors":
        path.write_text("hello")
    elif case == "not ours":
        save_file({"a": torch.zeros(1)}, str(path))
    elif case == "unknown kind":
        saving.write(path, "Hologram", {"a": torch.zeros(1)}, {})
    match = {"missing": "No saved result", "not safetensors": "not a safetensors file", "not ours": "did not write",
             "unknown kind": "holds a Hologram"}[case]
    with pytest.raises(tl_linmap.InputError, match=match):
        tl_linmap.load(path)


def test_config_hash_is_stable_and_sensitive():
    a = saving.config_hash({"n_layers": 2, "d_model": 16})
    assert a == saving.config_hash({"d_model": 16, "n_layers": 2}) and len(a) == 16
    assert a != saving.config_hash({"n_layers": 3, "d_model": 16})
