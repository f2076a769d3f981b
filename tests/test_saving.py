"""Saved results (`tl_linmap.base.saving`, `tl_linmap.load`): one safetensors file, a JSON header, nothing pickled.

Every result class's round trip, and its repr, tables and plots after loading, are in test_results.py (the walk);
a Graph's round trip on real graphs in test_graph.py. Here: what the file holds, the model given back or kept
out, and the files that are refused.
"""

import dataclasses
import importlib
import json
from importlib.metadata import version

import pytest
import torch
from conftest import assert_same
from safetensors import safe_open
from safetensors.torch import save_file

import tl_linmap
from tl_linmap.base import saving
from tl_linmap.base.saving import SavedModel

PROMPT = "The cat"  # eight tokens with BOS: one per byte
RESIDUAL = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model(toy_models):
    return toy_models["llama"]


@pytest.fixture(scope="module")
def maps(model):
    return tl_linmap.layer_maps(model, PROMPT, modules=True)


def header_of(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["tl_linmap"])


def rewrite(path, edit) -> None:
    """The file again with its header changed by ``edit`` (a function of the header's JSON)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safe_open handle is no dict
        header = json.loads(f.metadata()["tl_linmap"])
    save_file(tensors, str(path), metadata={"tl_linmap": json.dumps(edit(header))})


def classes(node) -> list[dict]:
    """Every dataclass the header's JSON describes."""
    if isinstance(node, list):
        return [c for item in node for c in classes(item)]
    if not isinstance(node, dict):
        return []
    found = [node] if "$class" in node else []
    return found + [c for value in node.values() for c in classes(value)]


# --- what the file holds -----------------------------------------------------------------------


def test_the_header_records_the_model_the_prompt_the_dtype_and_the_versions(model, maps, tmp_path):
    path = maps.save(tmp_path / "maps")
    assert path.name == "maps.safetensors"
    header = header_of(path)  # plain JSON: nothing to unpickle
    assert (header["format"], header["kind"], header["dtype"]) == (2, "LinearMaps", "float64")  # 3 only for maps on disk
    recorded = header["model"]
    assert recorded["name"] == model.cfg.model_name
    sizes = {key: recorded["config"][key] for key in ("n_layers", "d_model", "d_vocab", "n_heads")}
    assert sizes == {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "d_vocab": model.cfg.d_vocab, "n_heads": model.cfg.n_heads}
    assert recorded["config_hash"] == saving.config_hash(recorded["config"])
    ids = model.to_tokens(PROMPT)[0].tolist()
    assert header["prompt"] == {"tokens": ids, "str_tokens": [model.tokenizer.decode([i]) for i in ids]}
    assert header["versions"] == {"tl_linmap": version("tl_linmap"), "transformer_lens": version("transformer-lens"), "torch": torch.__version__}


def test_every_field_of_every_dataclass_is_in_the_file(maps, tmp_path):
    header = header_of(maps.heads(1).save(tmp_path / "heads"))
    described = classes(header["root"])
    assert {c["$class"] for c in described} >= {"tl_linmap.results.maps:LinearMaps", "tl_linmap.results.maps:LinearMap",
                                                 "tl_linmap.reading.tokens:TokenReader", "tl_linmap.reading.tokens:FrozenAffine"}
    for node in described:
        module, _, name = node["$class"].partition(":")
        cls = getattr(importlib.import_module(module), name)
        assert set(node["fields"]) == {f.name for f in dataclasses.fields(cls) if f.init}, name


def test_tensors_keep_their_layout_and_a_tensor_held_twice_is_saved_once(maps, tmp_path):
    heads = maps.heads(1)  # every head's operators: views of one tensor
    path = heads.save(tmp_path / "heads")
    loaded = tl_linmap.load(path)
    assert_same(heads, loaded)
    with safe_open(str(path), framework="pt") as f:
        saved = list(f.keys())
    assert len([k for k in saved if k.endswith(".tokens")]) == 1  # one prompt, held by every map
    assert len({id(lm.tokens) for lm in loaded.values()}) == 1
    for name, lm in heads.items():
        for field in ("operators", "inputs", "output"):
            assert getattr(loaded[name], field).stride() == getattr(lm, field).stride(), (name, field)
        assert loaded[name].reader.final_norm.matrix.stride() == lm.reader.final_norm.matrix.stride()  # a transposed view stays one


def test_a_loaded_result_has_no_model_but_the_text_of_its_tokens(model, maps, tmp_path):
    lm = tl_linmap.load(maps.save(tmp_path / "maps"))[RESIDUAL]
    held = lm.reader.model
    assert isinstance(held, SavedModel) and not held.full
    assert lm.str_tokens == [model.tokenizer.decode([i]) for i in model.to_tokens(PROMPT)[0].tolist()]
    distinct = len(set(model.to_tokens(PROMPT)[0].tolist()))
    assert repr(held) == f"SavedModel({model.cfg.model_name!r}, d_model {model.cfg.d_model}, the text of {distinct} tokens)"
    for read in (lambda: lm.decode(), lambda: lm.logit_contributions(7), lambda: held.decode([model.cfg.d_vocab - 1])):
        with pytest.raises(tl_linmap.InputError, match=r"tl_linmap.load\(path, model=model\).*save\(path, vocabulary=True\)"):
            read()


def test_saved_with_its_vocabulary_it_reads_any_token_as_the_model_does(model, maps, tmp_path):
    lm = maps[RESIDUAL]
    loaded = tl_linmap.load(lm.save(tmp_path / "lm", vocabulary=True))
    assert_same(lm, loaded)
    assert loaded.reader.model.full and len(loaded.reader.model.strings) == model.cfg.d_vocab
    assert_same(lm.logit_contributions("z"), loaded.logit_contributions("z"))  # a token string, found in the saved vocabulary
    assert_same(lm.logit_contributions(tl_linmap.LogitDiff("a", "b")), loaded.logit_contributions(tl_linmap.LogitDiff("a", "b")))
    with pytest.raises(tl_linmap.InputError, match="No token saved with this result reads 'zz': pass the token's id"):
        loaded.logit_contributions("zz")


def test_loaded_with_its_model_it_holds_the_model_again(model, maps, tmp_path, toy_models):
    path = maps.save(tmp_path / "maps")
    loaded = tl_linmap.load(path, model=model)
    assert all(lm.reader.model is model for lm in loaded.values())
    assert loaded.decode(k=1, top=3, targets=[RESIDUAL]) == maps.decode(k=1, top=3, targets=[RESIDUAL])
    with pytest.raises(tl_linmap.InputError, match="computed with 'LlamaForCausalLM' .*pass the model it was computed with"):
        tl_linmap.load(path, model=toy_models["qwen2"])


def test_a_loaded_result_saves_again_the_same(model, maps, tmp_path):
    once = tl_linmap.load(maps.save(tmp_path / "once"))
    twice = tl_linmap.load(once.save(tmp_path / "twice"))
    assert_same(maps, twice)
    assert header_of(tmp_path / "twice.safetensors")["model"] == header_of(tmp_path / "once.safetensors")["model"]
    with pytest.raises(tl_linmap.InputError, match=r"loaded without its model's vocabulary: load it with tl_linmap.load\(path, model=model\)"):
        once.save(tmp_path / "more", vocabulary=True)
    full = tl_linmap.load(tl_linmap.load(maps[RESIDUAL].save(tmp_path / "full", vocabulary=True)).save(tmp_path / "again"))
    assert_same(maps[RESIDUAL], full)
    assert full.reader.model.full


def test_a_result_without_its_model_records_the_model_given(model, maps, toy_models, tmp_path):
    attribution = tl_linmap.token_attribution(model, maps, 7)
    assert header_of(attribution.save(tmp_path / "bare"))["model"] is None
    recorded = header_of(attribution.save(tmp_path / "named", model=model))["model"]
    assert recorded["name"] == model.cfg.model_name and recorded["config"]["d_vocab"] == model.cfg.d_vocab
    assert recorded == header_of(maps.save(tmp_path / "maps"))["model"]  # the same record as a result that holds the model
    with pytest.raises(tl_linmap.InputError, match="holds the model 'LlamaForCausalLM', not the 'Qwen2ForCausalLM' given"):
        maps.save(tmp_path / "other", model=toy_models["qwen2"])


def test_same_fails_on_a_changed_field(maps):
    # The walk's comparison goes through every field: a field the file dropped (its default back) fails it.
    lm = maps[RESIDUAL]
    with pytest.raises(AssertionError, match="position"):
        assert_same(lm, dataclasses.replace(lm, position=lm.position - 1))
    with pytest.raises(AssertionError, match="operators"):
        assert_same(lm, dataclasses.replace(lm, operators=lm.operators.float()))


# --- files refused, files of older formats -----------------------------------------------------


def test_a_newer_format_is_refused(maps, tmp_path):
    path = maps[RESIDUAL].save(tmp_path / "new")
    rewrite(path, lambda header: {**header, "format": saving.FORMAT + 1})
    with pytest.raises(tl_linmap.InputError, match=f"format {saving.FORMAT + 1}.*reads format {saving.FORMAT} and older: upgrade tl_linmap"):
        tl_linmap.load(path)


def _class_renamed(to: str):
    def edit(header):
        header["root"]["$class"] = to
        return header
    return edit


def _field_added(header):
    header["root"]["fields"]["sharpness"] = 1.0
    return header


@pytest.mark.parametrize("case", ["missing", "not safetensors", "foreign", "class this version lacks", "class outside tl_linmap",
                                  "no dataclass", "fields this version lacks"])
def test_bad_files_say_what_to_pass(maps, tmp_path, case):
    path = tmp_path / "f.safetensors"
    if case == "not safetensors":
        path.write_text("hello")
    elif case == "foreign":
        save_file({"a": torch.zeros(1)}, str(path))
    elif case != "missing":
        maps[RESIDUAL].save(path)
        edits = {"class this version lacks": _class_renamed("tl_linmap.results.maps:Hologram"),
                 "class outside tl_linmap": _class_renamed("subprocess:Popen"),
                 "no dataclass": _class_renamed("tl_linmap.base.saving:SavedModel"),
                 "fields this version lacks": _field_added}
        rewrite(path, edits[case])
    match = {
        "missing": "No saved result at", "not safetensors": "not a safetensors file", "foreign": "tl_linmap did not write.*load it with safetensors",
        "class this version lacks": r"holds a Hologram \(tl_linmap.results.maps\), which this tl_linmap lacks; it was saved by tl_linmap",
        "class outside tl_linmap": r"holds a Popen \(subprocess\), which this tl_linmap lacks",
        "no dataclass": "holds a SavedModel",
        "fields this version lacks": "A saved LinearMap does not fit this tl_linmap's LinearMap .*sharpness",
    }[case]
    with pytest.raises(tl_linmap.InputError, match=match):
        tl_linmap.load(path)


def test_a_graph_saved_in_format_1_still_loads(model, tmp_path):
    graph = tl_linmap.attribution_graph(model, PROMPT, max_logits=2)
    # Format 1, as tl_linmap wrote it before every result saved: a Graph's tensors and fields flat.
    tensors = ("nodes", "adjacency", "values", "activations", "constants", "remainders", "totals", "weights",
               "target_tokens", "target_values", "target_constants", "input_ids")
    fields = {name: getattr(graph, name) for name in ("sites", "targets", "str_tokens", "position", "convention", "model_name", "config")}
    header = {"format": 1, "kind": "Graph", "fields": {**fields, "config_hash": "0" * 16}, "versions": {"tl_linmap": "0.1.0"}}
    path = tmp_path / "old.safetensors"
    save_file({name: getattr(graph, name).contiguous() for name in tensors}, str(path), metadata={"tl_linmap": json.dumps(header)})
    assert_same(graph, tl_linmap.load(path))


def test_config_hash_is_stable_and_sensitive():
    a = saving.config_hash({"n_layers": 2, "d_model": 16})
    assert a == saving.config_hash({"d_model": 16, "n_layers": 2}) and len(a) == 16
    assert a != saving.config_hash({"n_layers": 3, "d_model": 16})


def _tensors(value, seen=None):
    # Every tensor a result holds, through its dataclasses and containers (not the model).
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def test_a_result_moves_to_a_device_the_user_names(toy_models):
    """Results come back on the model's input device; `.to` moves every tensor of one, a new result, the model left alone."""
    model = toy_models["llama"]
    results = [
        tl_linmap.linear_map(model, "The cat sat"),
        tl_linmap.token_contributions(model, "The cat sat"),
        tl_linmap.layer_maps(model, "The cat sat", modules=True, store="memory"),
    ]
    for result in results:
        moved = result.to("meta")
        assert type(moved) is type(result) and moved is not result
        held = _tensors(moved)
        assert held and all(t.device.type == "meta" for t in held)
        assert all(t.device.type == "cpu" for t in _tensors(result))  # the original is untouched
    assert next(model.parameters()).device.type == "cpu"
