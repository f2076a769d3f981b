"""Layers, modules and heads: every decomposition sums exactly, for every family."""

import weakref

import pytest
import torch
from conftest import PROMPT

import tl_linmap
from tl_linmap.freeze.capture import run_to_target
from tl_linmap.base.compat import get_act_name
from tl_linmap.methods.decomposition import layer_maps, nonlinearity_gap, token_attribution
from tl_linmap.base.guard import borrowed
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tl_linmap.base.saving import read
from tl_linmap.base.spill import SpilledTensor
from tl_linmap.freeze.hooks import same_path_hooks


@pytest.fixture
def maps(model):
    return layer_maps(model, PROMPT, modules=True, position=-2)


def _close(a, b, scale):
    return (a - b).abs().max() <= 1e-12 * scale


def test_every_map_is_exact(maps):
    assert max(lm.relative_error() for lm in maps.values()) < 1e-12


def test_layer_maps_equal_separate_linear_maps(model):
    """The shared passes give the same operators as one linear_map call per target."""
    maps = layer_maps(model, PROMPT, layers=[1])
    for name, lm in maps.items():
        alone = tl_linmap.linear_map(model, PROMPT, target=name)
        assert _close(lm.operators, alone.operators, alone.operators.abs().max())
        assert torch.equal(lm.output, alone.output)


def test_layer_maps_keys_are_hook_names(model, maps):
    assert get_act_name("resid_post", 1) in maps
    assert get_act_name("mlp_out", 0) in maps
    assert (get_act_name("resid_mid", 0) in maps) == (not model.cfg.parallel_attn_mlp)


def test_attention_mlp_and_residual_sum_to_the_layer_output(model, maps):
    for layer in range(model.cfg.n_layers):
        pre, attn, mlp, post = (maps[get_act_name(n, layer)] for n in ("resid_pre", "attn_out", "mlp_out", "resid_post"))
        scale = post.operators.abs().max()
        assert _close(pre.operators + attn.operators + mlp.operators, post.operators, scale)
        assert _close(pre.bias + attn.bias + mlp.bias, post.bias, post.output.abs().max())


def test_heads_sum_to_the_attention_output(model, maps):
    for layer in range(model.cfg.n_layers):
        attn = maps[get_act_name("attn_out", layer)]
        heads = list(maps.heads(layer).values())
        assert len(heads) == model.cfg.n_heads
        assert max(h.relative_error() for h in heads) < 1e-12
        rest = maps.readouts[layer].rest()
        scale = attn.operators.abs().max()
        assert _close(sum(h.operators for h in heads), attn.operators, scale)
        assert _close(sum(h.bias for h in heads) + rest, attn.bias, attn.output.abs().max())
        assert _close(sum(h.output for h in heads) + rest, attn.output, attn.output.abs().max())
        contributions = maps.head_contributions(layer)
        assert _close(contributions.sum(0), attn.contributions(), attn.output.abs().max())


def test_layer_increments_sum_to_the_final_residual(model, maps):
    final = maps[get_act_name("resid_post", model.cfg.n_layers - 1)]
    total = maps[get_act_name("resid_pre", 0)].contributions()
    for layer in range(model.cfg.n_layers):
        total = total + maps[get_act_name("resid_post", layer)].contributions() - maps[get_act_name("resid_pre", layer)].contributions()
    assert _close(total, final.contributions(), final.output.abs().max())


def test_token_attribution_sums_to_the_models_logit(model, maps):
    tokens = maps[get_act_name("resid_pre", 0)].tokens[None]
    with borrowed(model, torch.float64):
        logits = run_to_target(model, tokens, "unembed.hook_out", same_path_hooks(model))[0, -2]
    token = int(logits.argmax())
    att = token_attribution(model, maps, token)
    assert att.logit == pytest.approx(float(logits[token]), abs=1e-12 * float(logits.abs().max()))
    assert att.total() == pytest.approx(att.logit, abs=1e-12 * abs(att.logit))
    for layer in range(model.cfg.n_layers):
        heads = sum(att.per_head[(layer, h)] for h in range(model.cfg.n_heads))
        attn = att.per_component[get_act_name("attn_out", layer)]
        assert _close(heads, attn, att.per_token.abs().max())


def test_attribution_by_token_string(toy_models):
    model = toy_models["gpt2"]
    maps = layer_maps(model, PROMPT, modules=True)
    assert token_attribution(model, maps, " ").token == " "
    with pytest.raises(tl_linmap.InputError, match="give one token"):
        token_attribution(model, maps, "two tokens")


def test_stacked_contributions_index_source_tokens(model, maps):
    names = [get_act_name("attn_out", layer) for layer in range(model.cfg.n_layers)]
    stacked = maps.stack_contributions(names)
    assert stacked.shape == (model.cfg.n_layers, len(maps[names[0]].tokens), model.cfg.d_model)
    for layer, name in enumerate(names):  # each (layer, source) entry is the term J_i x_i of that module
        expected = torch.einsum("pij,pj->pi", maps[name].operators, maps[name].inputs)
        assert torch.allclose(stacked[layer], expected, rtol=0, atol=1e-13 * expected.abs().max())


def test_to_cache_is_deprecated(model, maps):
    with pytest.warns(DeprecationWarning, match="to_cache is deprecated"):
        cache = maps.to_cache(model)
    name = get_act_name("attn_out", 1)
    assert torch.equal(cache[name], maps[name].contributions())


def test_nonlinearity_gap_shows_why_detaching_matters(model):
    rows = nonlinearity_gap(model, PROMPT)
    assert isinstance(rows, tl_linmap.Table)
    assert len(rows) == model.cfg.n_layers
    for row in rows:
        assert row.detached_error < 1e-12
        assert row.plain_error > 1e-4 and row.operator_gap > 1e-4


# Maps held only as needed: a budget (memory=), a store (store=) and a dtype (maps_dtype=).
SHORT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def llama(toy_models):
    return toy_models["llama"]


@pytest.fixture(scope="module")
def in_memory(llama):
    return {route: layer_maps(llama, SHORT, layers=[0, 1], modules=True, route=route, store="memory", rows_per_pass=8, progress=False)
            for route in ("columns", "rows")}


def _map_bytes(maps):
    return next(iter(maps.values())).operators.nbytes


@pytest.mark.parametrize("route", ["columns", "rows"])
def test_maps_over_the_budget_go_to_disk_and_read_back_bit_for_bit(llama, in_memory, route):
    reference = in_memory[route]
    memory = 2 * 3 * _map_bytes(reference) + 4 * 2**20  # three maps kept in memory, the rest for the passes
    maps = layer_maps(llama, SHORT, layers=[0, 1], modules=True, route=route, memory=memory, rows_per_pass=8, progress=False)
    assert 0 < len(maps.spilled) < len(maps) and maps.directory.is_dir()
    assert len(list(maps.directory.glob("*.safetensors"))) == len(maps.spilled)
    for name in reference:
        assert torch.equal(maps[name].operators, reference[name].operators), name
        assert maps[name].operators.stride() == reference[name].operators.stride(), name
        assert torch.equal(maps[name].bias, reference[name].bias)


def test_store_disk_spills_every_map_and_every_method_still_works(llama, in_memory, tmp_path):
    reference = in_memory["columns"]
    maps = layer_maps(llama, SHORT, layers=[0, 1], modules=True, route="columns", store="disk", rows_per_pass=8, progress=False)
    assert maps.spilled == list(reference)
    name = "blocks.1.hook_resid_post"
    assert torch.equal(maps.contributions()[name], reference.contributions()[name])
    assert torch.equal(maps.heads(1)["blocks.1.attn.hook_result.0"].operators, reference.heads(1)["blocks.1.attn.hook_result.0"].operators)
    assert torch.equal(maps.pattern(0), reference.pattern(0))
    assert [row.relative_error for row in maps.to_table()] == [row.relative_error for row in reference.to_table()]
    assert torch.equal(maps.svd(targets=[name])[name].stacked.values, reference.svd(targets=[name])[name].stacked.values)
    assert repr(maps) == repr(reference)
    maps.show(backend="html")
    path = maps.save(tmp_path / "maps")
    loaded = tl_linmap.load(path)
    assert torch.equal(loaded[name].operators, reference[name].operators)


def test_spilled_maps_are_saved_one_at_a_time_and_load_still_on_disk(llama, in_memory, tmp_path, monkeypatch):
    reference = in_memory["columns"]
    memory = 2 * 3 * _map_bytes(reference) + 4 * 2**20
    maps = layer_maps(llama, SHORT, layers=[0, 1], modules=True, route="columns", memory=memory, rows_per_pass=8, progress=False)
    assert 0 < len(maps.spilled) < len(maps)
    alive, most, reads = [], [0], []

    def watched(read):
        def read_and_count(self):
            alive[:] = [ref for ref in alive if ref() is not None]
            most[0] = max(most[0], len(alive))  # spilled maps still in memory as another is read
            tensor = read(self)
            reads.append(self.key)
            alive.append(weakref.ref(tensor))
            return tensor
        return read_and_count

    monkeypatch.setattr(SpilledTensor, "stored", watched(SpilledTensor.stored))
    monkeypatch.setattr(SpilledTensor, "load", watched(SpilledTensor.load))
    path = maps.save(tmp_path / "maps")
    assert len(reads) >= len(maps.spilled) and most[0] == 0
    reads.clear()
    loaded = tl_linmap.load(path)
    assert not reads and loaded.spilled == maps.spilled and loaded.directory == tmp_path
    for name in reference:
        assert torch.equal(loaded[name].operators, reference[name].operators), name
        assert loaded[name].operators.stride() == reference[name].operators.stride(), name
        assert torch.equal(loaded[name].bias, reference[name].bias)
    loaded.save(path)  # over the file its maps are read from: both read it still
    again = tl_linmap.load(path)
    assert all(torch.equal(again[name].operators, reference[name].operators) for name in reference)
    assert all(torch.equal(loaded[name].operators, reference[name].operators) for name in reference)
    assert read(path)[0]["format"] == 3  # older versions refuse it rather than misread it
    assert read(in_memory["columns"].save(tmp_path / "held"))[0]["format"] == 2  # nothing spilled: as before


def test_a_loaded_result_refuses_maps_from_a_file_saved_over_or_gone(llama, tmp_path, monkeypatch):
    maps = layer_maps(llama, SHORT, layers=[0], store="disk", progress=False)
    monkeypatch.chdir(tmp_path)
    loaded = tl_linmap.load(maps.save("maps"))  # a relative path, then another working directory
    monkeypatch.chdir("/")
    name = loaded.spilled[0]
    assert torch.equal(loaded[name].operators, maps[name].operators)
    layer_maps(llama, "A dog ran", layers=[0], store="disk", progress=False).save(tmp_path / "maps")  # another result, same file
    with pytest.raises(tl_linmap.InputError, match="saved over"):
        loaded[name]
    (tmp_path / "maps.safetensors").unlink()
    with pytest.raises(tl_linmap.InputError, match="is gone"):
        loaded[name]
    assert not list(tmp_path.glob("*.partial"))


def test_a_file_lacking_a_spilled_map_is_refused_on_load(llama, tmp_path):
    maps = layer_maps(llama, SHORT, layers=[0], store="disk", progress=False)
    path = maps.save(tmp_path / "maps")
    header, tensors = read(path)
    kept = {key: tensor for key, tensor in load_file(path).items() if key != header["spilled"][0]}
    save_file(kept, str(path), metadata=safe_open(str(path), framework="pt").metadata())
    with pytest.raises(tl_linmap.InputError, match="lacks the tensors its header lists"):
        tl_linmap.load(path)


def test_a_directory_store_keeps_its_files_and_a_temporary_one_goes_with_the_result(llama, tmp_path):
    kept = layer_maps(llama, SHORT, layers=[0], store=tmp_path / "maps", progress=False)
    assert kept.directory == tmp_path / "maps" and len(list(kept.directory.glob("*.safetensors"))) == len(kept)
    temporary = layer_maps(llama, SHORT, layers=[0], store="disk", progress=False)
    directory = temporary.directory
    del temporary
    import gc

    gc.collect()
    assert not directory.exists()
    assert len(list((tmp_path / "maps").glob("*.safetensors"))) == 2


def test_maps_kept_in_float32_are_the_float64_maps_rounded(llama, in_memory):
    reference = in_memory["columns"]
    for store in ("memory", "disk"):
        maps = layer_maps(llama, SHORT, layers=[0, 1], modules=True, route="columns", store=store, maps_dtype=torch.float32,
                          rows_per_pass=8, progress=False)
        for name in reference:
            assert torch.equal(maps[name].operators, reference[name].operators.float()), name
            assert maps[name].bias.dtype == torch.float32
        maps["blocks.1.hook_resid_post"].check()  # at float32's tolerance
        maps.heads(1)


def test_spilling_leaves_the_model_as_it_was(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    layer_maps(llama, SHORT, layers=[0], store="disk", progress=False)
    after = llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


@pytest.mark.parametrize("kwargs, match", [
    ({"memory": "lots"}, '"2GB"'),
    ({"memory": -1}, "positive"),
    ({"store": "ram"}, '"memory", "disk"'),
    ({"store": 3}, "directory"),
    ({"maps_dtype": torch.int32}, "torch.float32"),
    ({"maps_dtype": "float32"}, "torch.float32"),
])
def test_bad_budget_arguments_say_what_to_pass(llama, kwargs, match):
    with pytest.raises(tl_linmap.InputError, match=match):
        layer_maps(llama, SHORT, layers=[0], **kwargs)


def test_a_store_that_is_a_file_is_refused(llama, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(tl_linmap.InputError, match="is a file"):
        layer_maps(llama, SHORT, layers=[0], store=tmp_path / "file")


def test_maps_over_a_memory_only_store_name_the_way_out(llama):
    with pytest.raises(tl_linmap.MemoryBudgetError, match="leave store= out"):
        layer_maps(llama, SHORT, layers=[0, 1], modules=True, store="memory", memory="10KB", progress=False)
