"""Models dispatched by accelerate (part or all of them offloaded to disk) map exactly as the same model in memory."""

import pytest
import torch
from conftest import PROMPT
from transformer_lens.model_bridge import TransformerBridge

import tl_linmap
from tl_linmap.base import budget
from tl_linmap.base.devices import (
    input_device,
    is_offloaded,
    loaded,
    model_devices,
    resident,
)
from tl_linmap.base.guard import hook_count
from tl_linmap.linear import dense as jacobian
from tl_linmap.load import toy

#: ``max_memory`` on the CPU: the embedding stays and the blocks, the final norm and the
#: unembedding go to disk; or nothing fits and the whole model goes to disk.
SPLITS = {"split": "200KB", "all on disk": "1KB"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama checkpoint in float32 written to disk, as a user's downloaded model is."""
    tokenizer = toy.toy_tokenizer()
    config, model_cls = toy._config("llama", 64, 3, 4, 96, 64, len(tokenizer))
    torch.manual_seed(0)
    hf_model = model_cls(config)
    with torch.no_grad():  # norms and the affine part not trivial
        for name, param in hf_model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("llama")
    hf_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def _boot(checkpoint, tmp_path_factory, max_memory=None):
    path, tokenizer = checkpoint
    if max_memory is None:
        return TransformerBridge.boot_transformers(str(path), dtype=torch.float32, tokenizer=tokenizer)
    folder = tmp_path_factory.mktemp("offload")
    return TransformerBridge.boot_transformers(
        str(path), dtype=torch.float32, tokenizer=tokenizer, device_map="auto", max_memory={"cpu": max_memory}, offload_folder=str(folder)
    )


@pytest.fixture(scope="module")
def in_memory(checkpoint, tmp_path_factory):
    return _boot(checkpoint, tmp_path_factory)


@pytest.fixture(scope="module", params=list(SPLITS))
def dispatched(request, checkpoint, tmp_path_factory):
    model = _boot(checkpoint, tmp_path_factory, SPLITS[request.param])
    placed = set(model.original_model.hf_device_map.values())
    assert "disk" in placed and (placed == {"disk"}) == (request.param == "all on disk")
    return model


def _state(model):
    # What dispatch decided, which must survive: where each weight is (meta: offloaded), its dtype, the hooks.
    return (
        dict(model.original_model.hf_device_map),
        {name: (p.device, p.dtype, p.requires_grad) for name, p in model.named_parameters()},
        model.training,
        hook_count(model),
    )


#: Every route, on the float32 checkpoint mapped in float64: the value to compare, by route.
def _linear_map(m):
    return tl_linmap.linear_map(m, PROMPT).operators


def _columns(m):
    return tl_linmap.linear_map(m, PROMPT, route="columns").operators


def _layer_maps(m):
    maps = tl_linmap.layer_maps(m, PROMPT, modules=True)
    return torch.stack([maps[name].operators for name in sorted(maps)])


def _contributions(m):
    return tl_linmap.token_contributions(m, PROMPT).contributions()


def _logit(m):
    return tl_linmap.linear_map(m, PROMPT, target=tl_linmap.Logit(7)).operators


def _svd(m):
    with tl_linmap.matrix_free(m, PROMPT) as mf:
        return mf.svd(k=3).values


def _graph(m):
    return tl_linmap.attribution_graph(m, PROMPT, max_logits=2).adjacency


def _decoded(m):
    # Reading vectors as tokens needs W_U and W_E, which dispatch may have offloaded.
    lm = tl_linmap.linear_map(m, PROMPT)
    u = lm.operators[-1][:2]
    return torch.cat([lm.reader.logits(u, affine=True), lm.reader.cosines(u)])


ROUTES = {f.__name__.lstrip("_"): f for f in (_linear_map, _columns, _layer_maps, _contributions, _logit, _svd, _graph, _decoded)}


@pytest.mark.parametrize("route", list(ROUTES))
def test_dispatched_model_maps_as_the_model_in_memory(dispatched, in_memory, route):
    before = _state(dispatched)
    got, expected = ROUTES[route](dispatched), ROUTES[route](in_memory)
    assert got.dtype == expected.dtype == torch.float64
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-12 * scale
    assert _state(dispatched) == before  # still offloaded, nothing loaded left behind


def test_dispatched_map_is_exact(dispatched):
    lm = tl_linmap.linear_map(dispatched, PROMPT)
    assert lm.relative_error() < 1e-12
    assert lm.operators.device == input_device(dispatched) == torch.device("cpu")


def test_input_device_of_a_model_offloaded_whole_is_where_it_runs(checkpoint, tmp_path_factory):
    model = _boot(checkpoint, tmp_path_factory, SPLITS["all on disk"])
    assert str(model.cfg.device) == "meta"  # what the bridge reports: tokens sent there cannot run
    assert input_device(model) == torch.device("cpu")
    assert model_devices(model) == [torch.device("cpu")]


def test_resident_loads_an_offloaded_weight_and_leaves_it_offloaded(dispatched, in_memory):
    assert is_offloaded(dispatched.unembed)
    assert torch.equal(resident(dispatched, "W_U"), in_memory.W_U.detach())
    assert is_offloaded(dispatched.unembed)
    with loaded(dispatched.unembed):
        assert not is_offloaded(dispatched.unembed)
    assert is_offloaded(dispatched.unembed)


def test_rows_are_planned_on_the_tightest_device(monkeypatch):
    """A model split over devices: every device holds a row's activations, only the input device the results."""
    free = {torch.device("cpu"): 10 * 2**30, torch.device("meta"): 2**30}
    monkeypatch.setattr(budget, "available_bytes", lambda device: free[torch.device(device)])
    alone = budget.fit_rows(2**20, 0, 10**6, None, torch.device("cpu"), "rows_per_pass")
    split = budget.fit_rows(2**20, 0, 10**6, None, torch.device("cpu"), "rows_per_pass", others=[torch.device("meta")])
    assert alone == 10 * 2**30 * budget.MEMORY_FRACTION // 2**20
    assert split == 2**30 * budget.MEMORY_FRACTION // 2**20
    with pytest.raises(tl_linmap.MemoryBudgetError, match="to spare on meta"):
        budget.fit_rows(2**20, 0, 10**6, split + 1, torch.device("cpu"), "rows_per_pass", others=[torch.device("meta")])


def test_auto_takes_the_columns_route_where_the_offloaded_weights_a_graph_keeps_would_not_fit(dispatched, monkeypatch):
    """Offloaded weights are loaded in the working dtype inside each module's forward, out of the borrow's reach:
    a graph keeps each one it reads, so the rows route is taken only where they fit a graph's share of memory."""
    routes, real = [], jacobian._rows
    monkeypatch.setattr(jacobian, "_rows", lambda *args: routes.append("rows") or real(*args))
    target = "blocks.0.hook_attn_out"  # shallow and wide: auto takes the rows route where it may
    expected = tl_linmap.linear_map(dispatched, PROMPT, target=target).operators
    assert routes == ["rows"]
    assert any(p.device.type == "meta" for block in dispatched.blocks for p in block.parameters())
    monkeypatch.setattr(budget, "GRAPH_CAST_FRACTION", 0.0)  # no room for a graph's casts (the rows and results keep theirs)
    got = tl_linmap.linear_map(dispatched, PROMPT, target=target).operators
    assert routes == ["rows"]  # the columns route, this time
    assert (got - expected).abs().max() <= 1e-12 * expected.abs().max()
