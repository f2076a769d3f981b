"""`tl_linmap.attribution_graph`: every row against an oracle written here, and the graph's sums.

The oracles use none of tl_linmap's hooks or rules: the dictionaries are the hooks of
`test_features` (their masks detached), the model's factors are detached by `conftest.hand_freeze_hooks`,
every node is made a leaf by hooks written below, and autograd gives each row (value times derivative).
A feature's value is its pre-activation written from its definition; a target is the model's own logit
minus the mean logit; a head's or MLP's value is ``g · v``, ``g`` the weighted targets' gradient along a
zero added to its output. Models: float64 toy models of both classes the installed TransformerLens has,
GPT-2-like and Llama-like (`test_features.BUILDERS`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same, hand_freeze_hooks
from test_features import (  # noqa: F401 - model, models: the fixtures of test_features
    BUILDERS,
    PROMPT,
    _assert_same,
    _embeddings,
    _oracle_forward,
    _quiet,
    _snapshot,
    dictionaries,
    dictionary_hooks,
    model,
    models,
)
from torch import Tensor

import tl_linmap
from tl_linmap.base.guard import hook_count
from tl_linmap.present.views import View
from tl_linmap.results.graph import KINDS

TOL = 1e-10


def _centered(logits: Tensor, tokens: list[int]) -> Tensor:
    row = logits[0, -1]
    return torch.stack([row[t] - row.mean() for t in tokens])


def _node(graph, i: int) -> tuple[str, str, int, int]:
    kind, site, pos, idx = (int(v) for v in graph.nodes[i])
    return KINDS[kind], graph.sites[site], pos, idx


def _columns(graph, grads: dict, leaves: dict) -> Tensor:
    """The oracle's row in the graph's column order: each node's value times its derivative."""
    out = []
    for i in range(len(graph)):
        kind, site, pos, idx = _node(graph, i)
        if kind == "target":
            out.append(torch.zeros((), dtype=torch.float64))
            continue
        key = "x" if kind == "token" else (kind, site)
        g, v = grads[key], leaves[key].detach()
        if kind == "feature":
            out.append(g[0, pos, idx] * v[0, pos, idx])
        elif kind == "head":
            out.append((g[0, pos, idx] * v[0, pos, idx]).sum())
        else:
            out.append((g[0, pos] * v[0, pos]).sum())
    return torch.stack(out)


def _oracle_rows(graph, leaves: dict, value_of) -> tuple[Tensor, Tensor]:
    """Per node, (its row, its value): ``value_of(kind, site, pos, idx)`` gives a node's value as a function
    of the leaves (None for a node without inputs); its row is each leaf node's value times the derivative."""
    rows, values = [], []
    for i in range(len(graph)):
        value = value_of(*_node(graph, i))
        if value is None:
            rows.append(torch.zeros(len(graph), dtype=torch.float64))
            values.append(torch.zeros((), dtype=torch.float64))
            continue
        grads = torch.autograd.grad(value, list(leaves.values()), retain_graph=True, allow_unused=True)
        grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
        rows.append(_columns(graph, grads, leaves))
        values.append(value.detach())
    return torch.stack(rows), torch.stack(values)


def _pre(d: tl_linmap.Dictionary, x: Tensor) -> Tensor:
    """Pre-activations from the dictionary's definition (a gated SAE's: its magnitudes')."""
    xin = x - d.b_dec if d.apply_b_dec_to_input else x
    if d.activation == "gated":
        return xin @ (d.W_enc * torch.exp(d.r_mag)) + d.b_mag
    return xin @ d.W_enc + d.b_enc


def feature_oracle(model, tokens, dicts, convention, graph) -> tuple[Tensor, Tensor]:
    """Per node with inputs, (its row, its value), written here; rows of other nodes are zero."""
    x0 = _embeddings(model, tokens)
    record = {}
    with torch.no_grad():
        _oracle_forward(model, tokens, dicts, convention, x0, record=record)
    leaves = {"x": x0.clone()[None].requires_grad_(True)}
    for site, (acts, error) in record.items():
        leaves[("feature", site)] = acts.clone().requires_grad_(True)
        leaves[("error", site)] = error.clone().requires_grad_(True)
    inputs = {}
    hooks = [("hook_embed", lambda act, hook=None: leaves["x"].reshape(act.shape)), *hand_freeze_hooks(model)]
    for d in dicts:
        hooks.append((d.hook_in, lambda act, hook=None, site=d.hook_out: inputs.__setitem__(site, act)))  # before it writes
        hooks += dictionary_hooks(d, convention, leaves=(leaves[("feature", d.hook_out)], leaves[("error", d.hook_out)] if convention != "none" else None))
    by_site = {d.hook_out: d for d in dicts}
    with torch.enable_grad(), _quiet(), model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
        targets = _centered(logits, graph.target_tokens.tolist())

        def value_of(kind, site, pos, idx):
            if kind == "feature":
                return _pre(by_site[site], inputs[site][0, pos])[idx]
            return targets[idx] if kind == "target" else None

        return _oracle_rows(graph, leaves, value_of)


def module_oracle(model, tokens, graph) -> tuple[Tensor, Tensor]:
    """Per node with inputs, (its row, its value) in a graph of heads and MLP outputs, written here."""
    names = [(kind, f"blocks.{layer}.{point}") for layer in range(model.cfg.n_layers) for kind, point in (("head", "attn.hook_z"), ("mlp", "hook_mlp_out"))]
    x0 = _embeddings(model, tokens)
    weights = graph.weights
    # g: the weighted targets' gradient along a zero added to each module's output, every factor frozen here
    deltas, values0 = {}, {}

    def add(act, hook=None, key=None):
        values0[key] = act.detach().clone()
        deltas[key] = torch.zeros_like(act).requires_grad_(True)
        return act + deltas[key]

    hooks = [("hook_embed", lambda act, hook=None: x0[None].reshape(act.shape)), *hand_freeze_hooks(model)]
    hooks += [(name, lambda act, hook=None, key=(kind, name): add(act, key=key)) for kind, name in names]
    with torch.enable_grad(), _quiet(), model.hooks(fwd_hooks=hooks):
        objective = weights @ _centered(model(tokens), graph.target_tokens.tolist())
        g = dict(zip(deltas, torch.autograd.grad(objective, list(deltas.values()))))
    # rows: every module output and the embeddings leaves
    leaves = {"x": x0.clone()[None].requires_grad_(True)} | {k: v.clone().requires_grad_(True) for k, v in values0.items()}
    seen = {}

    def swap(act, hook=None, key=None):
        seen[key] = act
        return leaves[key]

    hooks = [("hook_embed", lambda act, hook=None: leaves["x"].reshape(act.shape)), *hand_freeze_hooks(model)]
    hooks += [(name, lambda act, hook=None, key=(kind, name): swap(act, key=key)) for kind, name in names]
    with torch.enable_grad(), _quiet(), model.hooks(fwd_hooks=hooks):
        targets = _centered(model(tokens), graph.target_tokens.tolist())

        def value_of(kind, site, pos, idx):
            if kind == "head":
                return g[(kind, site)][0, pos, idx] @ seen[(kind, site)][0, pos, idx]
            if kind == "mlp":
                return g[(kind, site)][0, pos] @ seen[(kind, site)][0, pos]
            return targets[idx] if kind == "target" else None

        return _oracle_rows(graph, leaves, value_of)


def _assert_rows(graph, rows: Tensor, values: Tensor) -> None:
    has = graph.has_row
    scale = float(graph.adjacency.abs().max()) + float(values.abs().max())
    gap = float((graph.adjacency[has] - rows[has]).abs().max())
    assert gap <= TOL * scale, f"rows differ from the oracle by {gap:.1e} (scale {scale:.2g})"
    assert float((graph.values[has] - values[has]).abs().max()) <= TOL * scale, "node values"
    assert not graph.adjacency[~has].any(), "a source node has inputs"


# --- Rows against the oracles --------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["live", "constant", "none"])
@pytest.mark.parametrize("case", ["relu", "gated", "skip_transcoder", "sae+transcoder"])
def test_feature_rows_match_the_oracle(model, case, convention):
    tokens = model.to_tokens(PROMPT)
    dicts = dictionaries(model, case)
    graph = tl_linmap.attribution_graph(model, tokens, dictionaries=dicts, error=convention, max_logits=3)
    assert graph.convention == convention and len(graph.targets) == 3
    assert graph.kind_mask("feature").sum() > 10 and not graph.kind_mask("head", "mlp").any()
    assert graph.kind_mask("error").sum() == (0 if convention == "none" else len(dicts) * tokens.shape[1])
    assert not graph.remainders.any()  # every feature has its row (max_nodes=None)
    rows, values = feature_oracle(model, tokens, dicts, convention, graph)
    _assert_rows(graph, rows, values)
    assert graph.relative_error() <= 1e-12


def test_a_float32_dictionary_on_a_float64_pass_stays_exact(model):
    """The dictionary's weights are cast to the working dtype, its pre-activations' offsets too (a float32
    ``b_dec · W_enc`` would miss by 1e-7)."""
    tokens = model.to_tokens(PROMPT)
    dicts = [d.to(torch.zeros((), dtype=torch.float32)) for d in dictionaries(model, "relu")]
    assert dicts[0].W_enc.dtype == torch.float32 and dicts[0].apply_b_dec_to_input
    graph = tl_linmap.attribution_graph(model, tokens, dictionaries=dicts, max_logits=2)
    assert graph.adjacency.dtype == torch.float64 and graph.relative_error() <= 1e-12


def test_targets_are_circuit_tracers_likeliest_tokens(model):
    """``target=None``: the likeliest next tokens until 0.95 of the probability (at most ``max_logits``), weighted by it."""
    tokens = model.to_tokens(PROMPT)
    graph = tl_linmap.attribution_graph(model, tokens, max_logits=4)
    with torch.no_grad(), _quiet(), model.hooks(fwd_hooks=hand_freeze_hooks(model)):
        p = torch.softmax(model(tokens)[0, -1], -1)
    top = torch.topk(p, 4)
    assert graph.target_tokens.tolist() == top.indices.tolist()  # a random model: 4 tokens hold far less than 0.95
    assert torch.allclose(graph.weights, top.values, rtol=0, atol=1e-12)
    few = tl_linmap.attribution_graph(model, tokens, max_logits=4, logit_probability=float(top.values[0]) / 2)
    assert few.target_tokens.tolist() == top.indices[:1].tolist()


def test_module_rows_match_the_oracle(model):
    tokens = model.to_tokens(PROMPT)
    graph = tl_linmap.attribution_graph(model, tokens, max_logits=2)
    n_pos, cfg = tokens.shape[1], model.cfg
    assert graph.kind_mask("head").sum() == cfg.n_layers * n_pos * cfg.n_heads and graph.kind_mask("mlp").sum() == cfg.n_layers * n_pos
    rows, values = module_oracle(model, tokens, graph)
    _assert_rows(graph, rows, values)


def test_an_over_frozen_graph_fails_the_oracle(model, monkeypatch):
    """The oracle can fail, and so does the sum check: a node pass whose embeddings reach nothing (a path
    detached) gives other rows, which no longer sum to the nodes' values."""
    from tl_linmap.linear import graph as graph_module

    tokens = model.to_tokens(PROMPT)
    dicts = dictionaries(model, "skip_transcoder")
    good = tl_linmap.attribution_graph(model, tokens, dictionaries=dicts, error="constant", max_logits=2)
    rows, values = feature_oracle(model, tokens, dicts, "constant", good)
    _assert_rows(good, rows, values)
    original = graph_module.replay_hooks

    def over_frozen(model, factors, nodes=None, **kwargs):
        hooks = original(model, factors, nodes=nodes, **kwargs)
        return hooks + [("hook_embed", lambda act, hook=None: act.detach())] if nodes else hooks  # the node pass only

    monkeypatch.setattr(graph_module, "replay_hooks", over_frozen)
    with pytest.raises(tl_linmap.FreezeError, match="attribution graph"):
        tl_linmap.attribution_graph(model, tokens, dictionaries=dicts, error="constant", max_logits=2)


# --- What every graph satisfies ----------------------------------------------------------------------


def test_max_nodes_keeps_rows_and_moves_the_rest_to_remainders(model):
    """Rows do not depend on which nodes are kept: a graph of 10 features has the full graph's rows on them,
    and what the others carried is each row's remainder; it is still exact."""
    tokens = model.to_tokens(PROMPT)
    dicts = dictionaries(model, "sae+transcoder")
    full = tl_linmap.attribution_graph(model, tokens, dictionaries=dicts, max_logits=2)
    small = tl_linmap.attribution_graph(model, tokens, dictionaries=dicts, max_logits=2, max_nodes=10, rows_per_pass=4)
    assert small.kind_mask("feature").sum() == 10 and small.remainders.abs().sum() > 0
    index = {tuple(full.nodes[i].tolist()): i for i in range(len(full))}
    at = torch.tensor([index[tuple(n.tolist())] for n in small.nodes])
    kept = torch.zeros(len(full), dtype=torch.bool)
    kept[at] = True
    rows = small.has_row
    assert torch.allclose(small.adjacency[rows], full.adjacency[at[rows]][:, at], rtol=0, atol=1e-12)
    assert torch.allclose(small.remainders[rows], full.adjacency[at[rows]][:, ~kept].sum(-1), rtol=0, atol=1e-12)
    assert small.relative_error() <= 1e-12
    # the first features expanded are the most influential on the targets' own rows
    influence = (full.adjacency[full.kind_mask("target")].abs() / full.adjacency[full.kind_mask("target")].abs().sum(-1, keepdim=True)).T @ full.weights
    first = torch.argsort(torch.where(full.kind_mask("feature"), influence, torch.full_like(influence, -1)), descending=True)[:4]
    assert kept[first].all()


def test_sums_hold_for_any_readouts_and_pruning(model):
    """Several readouts with weights; pruned graphs keep every row's sum through their remainders."""
    tokens = model.to_tokens(PROMPT)
    d = model.cfg.d_model
    direction = torch.randn(d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    targets = [tl_linmap.LogitDiff(5, 9), tl_linmap.Direction("blocks.1.hook_resid_post", direction)]
    graph = tl_linmap.attribution_graph(model, tokens, target=targets, weights=[2.0, 0.5], dictionaries=dictionaries(model, "relu"))
    assert graph.targets == ("logit_diff(5 - 9)", "direction @ blocks.1.hook_resid_post")
    with torch.no_grad(), tl_linmap.spliced(model, dictionaries(model, "relu")):
        logits, cache = model.run_with_cache(tokens)
    # the plain forward: a bridge runs Hugging Face's RMSNorm in float32 (the frozen one in float64)
    native = 1e-7 if model.cfg.normalization_type == "RMS" and hasattr(model, "original_model") else 1e-10
    assert abs(float(graph.target_values[0] - (logits[0, -1, 5] - logits[0, -1, 9]))) <= native
    assert abs(float(graph.target_values[1] - cache["blocks.1.hook_resid_post"][0, -1] @ direction)) <= native
    for node_threshold, edge_threshold in ((0.8, 0.98), (0.5, 0.9), (0.3, 0.5)):
        pruned = graph.prune(node_threshold, edge_threshold)
        assert len(pruned) < len(graph) and pruned.relative_error() <= 1e-12
    assert graph.kind_mask("target").sum() == 2 and torch.equal(graph.weights, torch.tensor([2.0, 0.5], dtype=torch.float64))


def test_source_totals_compose_along_the_graph(model):
    """With every node kept, the tokens' and errors' total effects are the sums over the graph's paths:
    a feature passes on the share of its pre-activation each input gave (its activation scales it)."""
    tokens = model.to_tokens(PROMPT)
    graph = tl_linmap.attribution_graph(model, tokens, dictionaries=dictionaries(model, "sae+transcoder"), error="constant", max_logits=2)
    a = graph.adjacency.clone()
    features = graph.kind_mask("feature")
    # per unit of a feature's pre-activation: its outgoing edges over its pre-activation (its mask is frozen)
    a[:, features] = a[:, features] / graph.values[features]
    paths = torch.linalg.solve(torch.eye(len(graph), dtype=a.dtype) - a, torch.eye(len(graph), dtype=a.dtype))  # Σ_n a^n
    targets = graph.kind_mask("target").nonzero()[:, 0]
    sources = graph.kind_mask("token", "error")
    through = paths[targets][:, sources]  # a source's column is already its value times the derivative
    assert torch.allclose(through.T, graph.totals[sources], rtol=0, atol=1e-10)


def test_path_and_tables(model):
    tokens = model.to_tokens(PROMPT)
    graph = tl_linmap.attribution_graph(model, tokens, max_logits=2)
    path = graph.path()
    assert KINDS[int(graph.nodes[path.nodes[0], 0])] in ("token", "error") and KINDS[int(graph.nodes[path.nodes[-1], 0])] == "target"
    shares = [float(graph.adjacency[t, s].abs() / graph.adjacency[t].abs().sum()) for s, t in zip(path.nodes, path.nodes[1:])]
    assert torch.allclose(torch.tensor(shares, dtype=torch.float64), torch.tensor(path.shares, dtype=torch.float64), rtol=0, atol=1e-12)
    assert abs(path.strength - float(graph.weights[0]) * float(torch.tensor(shares, dtype=torch.float64).prod())) <= 1e-12
    assert str(path).startswith(graph.label(path.nodes[0]))
    assert path.describe().startswith(("the token", "the error")) and path.describe().count("feeds") == len(path.nodes) - 1
    table = graph.to_table(top=5)
    assert len(table) >= 5 and table.records()[0]["influence"] >= table.records()[1]["influence"]
    assert len(graph.edges(top=3)) == 3
    assert "Graph(" in repr(graph) and "<svg" in graph._repr_html_()


def test_html_draws_every_kept_node_and_edge(model):
    tokens = model.to_tokens(PROMPT)
    graph = tl_linmap.attribution_graph(model, tokens, dictionaries=dictionaries(model, "relu"), max_logits=2)
    page = graph.to_html()
    pruned = graph.prune()
    assert page.count('class="node ') == len(pruned)
    assert page.count('class="edge"') == int((pruned.adjacency != 0).sum()) > 0
    assert page.count('class="token"') == tokens.shape[1]
    assert "<script" not in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")


def test_save_and_load_bit_for_bit(model, tmp_path):
    tokens = model.to_tokens(PROMPT)
    graph = tl_linmap.attribution_graph(model, tokens, dictionaries=dictionaries(model, "relu"), max_logits=2)
    path = graph.save(tmp_path / "graph")
    assert path.suffix == ".safetensors"
    loaded = tl_linmap.load(path)
    assert_same(graph, loaded)
    assert repr(loaded) == repr(graph) and loaded.to_html() == graph.to_html()


# --- The model, bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_model_comes_back_bit_for_bit(name, monkeypatch):
    from tl_linmap.linear import graph as graph_module

    model = BUILDERS[name](dtype=torch.float32)
    tokens = model.to_tokens(PROMPT)
    dicts = dictionaries(model, "sae+transcoder")
    model.train()
    before = _snapshot(model)
    tl_linmap.attribution_graph(model, tokens, dictionaries=dicts, max_logits=2)
    _assert_same(model, before)
    tl_linmap.attribution_graph(model, tokens, max_logits=2, max_nodes=5)
    _assert_same(model, before)

    def exploding(*args, **kwargs):
        raise RuntimeError("exploding rows")

    monkeypatch.setattr(graph_module, "_rows_of", exploding)
    with pytest.raises(RuntimeError, match="exploding rows"):
        tl_linmap.attribution_graph(model, tokens, dictionaries=dicts, max_logits=2)
    _assert_same(model, before)
    assert hook_count(model) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target="output"), "target must be a readout"),
        (dict(target=[]), "target must be a readout"),
        (dict(max_nodes=-1), "max_nodes must be a non-negative int or None"),
        (dict(rows_per_pass=0), "rows_per_pass must be a positive int"),
        (dict(target=[tl_linmap.Logit(3)], weights=[1.0, 2.0]), "weights has 2 entries for 1 targets"),
        (dict(modules=False), "no nodes between tokens and targets"),
        (dict(target=tl_linmap.Logit(10**6)), "vocabulary"),
    ],
)
def test_bad_calls_say_what_to_pass(model, kwargs, match):
    before = _snapshot(model)
    with pytest.raises(tl_linmap.InputError, match=match):
        tl_linmap.attribution_graph(model, model.to_tokens(PROMPT), **kwargs)
    _assert_same(model, before)


def test_module_graphs_have_no_circuit_tracer_form(model):
    graph = tl_linmap.attribution_graph(model, model.to_tokens(PROMPT), max_logits=1)
    with pytest.raises(tl_linmap.InputError, match="heads or MLP outputs"):
        graph.to_circuit_tracer()


def test_float32_is_checked_to_its_own_tolerance(model):
    """In float32 the graph is checked to 1e-4 and its rows agree with float64's to that."""
    tokens = model.to_tokens(PROMPT)
    dicts = dictionaries(model, "skip_transcoder")
    exact = tl_linmap.attribution_graph(model, tokens, dictionaries=dicts, max_logits=2)
    single = tl_linmap.attribution_graph(model, tokens, dictionaries=dicts, max_logits=2, dtype=torch.float32)
    assert single.adjacency.dtype == torch.float32 and single.relative_error() <= 1e-4
    assert torch.equal(single.nodes, exact.nodes)  # the same features active
    gap = float((single.adjacency.double() - exact.adjacency).abs().max() / exact.adjacency.abs().max())
    assert 0 < gap <= 1e-4


def test_show_gives_the_pages_drawing_as_a_view(model):
    graph = tl_linmap.attribution_graph(model, model.to_tokens(PROMPT), max_logits=1)
    view = graph.show(node_threshold=0.5)
    assert isinstance(view, View) and view.backend == "html" and view._repr_html_() == view.html
    page = graph.to_html(node_threshold=0.5)
    assert view.html in page and view.html.count('class="node ') == page.count('class="node ') > 0  # the page's drawing


def test_an_earlier_position_a_single_token_and_no_rows(model):
    """Nodes after the target's position cannot reach it and are left out; a one-token prompt has a graph; with
    max_nodes=0 only the targets have rows and every inner node's effect is in their remainders."""
    tokens = model.to_tokens(PROMPT)
    dicts = dictionaries(model, "relu")
    earlier = tl_linmap.attribution_graph(model, tokens, dictionaries=dicts, max_logits=2, position=4)
    assert earlier.position == 4 and int(earlier.nodes[:, 2].max()) == 4 and earlier.relative_error() <= 1e-12
    one = tl_linmap.attribution_graph(model, tokens[:, :1], max_logits=2)
    assert one.kind_mask("token").sum() == 1 and one.relative_error() <= 1e-12
    bare = tl_linmap.attribution_graph(model, tokens, dictionaries=dicts, max_logits=2, max_nodes=0)
    assert not bare.kind_mask("feature").any() and bare.remainders[bare.kind_mask("target")].abs().sum() > 0
    assert bare.relative_error() <= 1e-12


def test_a_dictionary_at_hook_z_sums_over_heads(model):
    """An SAE on the heads' outputs (``hook_z``, all heads at once): its error nodes carry every head's part."""
    cfg = model.cfg
    d_in = cfg.n_heads * cfg.d_head
    g = torch.Generator().manual_seed(11)
    sae = tl_linmap.Dictionary(torch.randn(d_in, 20, generator=g, dtype=torch.float64) / d_in**0.5, torch.zeros(20, dtype=torch.float64),
                               torch.randn(20, d_in, generator=g, dtype=torch.float64) / 20**0.5, torch.zeros(d_in, dtype=torch.float64),
                               hook_in="blocks.1.attn.hook_z")
    graph = tl_linmap.attribution_graph(model, model.to_tokens(PROMPT), dictionaries=[sae], error="constant", max_logits=2)
    assert graph.kind_mask("error").sum() == model.to_tokens(PROMPT).shape[1] and graph.relative_error() <= 1e-12


def test_targets_named_apart_and_weights_checked(model):
    tokens = model.to_tokens(PROMPT)
    d = torch.ones(model.cfg.d_model, dtype=torch.float64)
    twice = [tl_linmap.Direction("blocks.1.hook_resid_post", d), tl_linmap.Direction("blocks.1.hook_resid_post", 2 * d)]
    graph = tl_linmap.attribution_graph(model, tokens, target=twice, weights=[1.0, 0.0])
    assert len(set(graph.targets)) == 2 and graph.targets[0].endswith("#0")
    with pytest.raises(tl_linmap.InputError, match="No path with weight"):
        graph.path(target=1)  # weight 0
    assert "no path with weight" not in repr(graph)
    for kwargs, match in (
        (dict(weights=[1.0]), "weights are the targets' probabilities when target=None"),
        (dict(target=twice, weights=[-1.0, 1.0]), "finite, non-negative"),
        (dict(target=twice, weights=["a", 1.0]), "list of numbers"),
        (dict(logit_probability=0.0), r"logit_probability must be a number in \(0, 1\]"),
    ):
        with pytest.raises(tl_linmap.InputError, match=match):
            tl_linmap.attribution_graph(model, tokens, **kwargs)
