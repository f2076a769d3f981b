"""Every result shares its habits: a short text repr and a notebook view that name its key
numbers, `to_table` rows that are its own numbers, `plot` figures with something drawn, and a
`save` file that loads back bit for bit and still prints, tabulates and plots without the model.

One tiny float64 Llama (and a Qwen2-MoE for the experts) gives one instance of every result
class; the class list is walked from the package, so a new result class without a case here
fails `test_every_result_class_has_a_case`. Table rows are checked against the tensors they
summarise (or against the model), never against another method of the result.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import tl_linmap
import tl_linmap.results
from conftest import assert_same
from tl_linmap.base.errors import InputError
from tl_linmap.base.saving import Saveable
from tl_linmap.base.table import Table, _row_html, number_text
from tl_linmap.linear.matrix_free import Pushed
from tl_linmap.load.toy import toy_model
from tl_linmap.methods.corpus import corpus_analysis
from tl_linmap.methods.experts import expert_contributions
from tl_linmap.methods.features import FeatureMap
from tl_linmap.methods.steering import (
    MethodRow,
    OperatorSteering,
    Steering,
    SweepRow,
    alpha_sweep,
    compare_methods,
)
from tl_linmap.present.display import ComponentRow, MapRow, VectorRow
from tl_linmap.reading.tokens import token_id
from tl_linmap.results.maps import TargetResult
from tl_linmap.results.patching import Layout

PROMPT = "The cat"  # eight tokens with BOS: one per byte
CLEAN, CORRUPTED = "The cat", "The dog"
LAYOUTS = ["resid_pre", "attn_head_out_all_pos", "block_every"]
RESIDUAL = "blocks.1.hook_resid_post"

#: Result classes made elsewhere than tl_linmap.results, and rows of the views and methods.
ELSEWHERE = {Pushed, Steering, OperatorSteering, SweepRow, MethodRow, MapRow, ComponentRow, VectorRow, FeatureMap}
#: Dataclasses of tl_linmap.results that are no result: a patching layout's description, the maps' abstract base.
NOT_RESULTS = {Layout, TargetResult}


def result_classes() -> set[type]:
    """Every public dataclass defined in tl_linmap.results, and the ones made elsewhere."""
    found = set()
    for info in pkgutil.iter_modules(tl_linmap.results.__path__):
        module = importlib.import_module(f"tl_linmap.results.{info.name}")
        found |= {
            value for name, value in vars(module).items()
            if isinstance(value, type) and value.__module__ == module.__name__ and not name.startswith("_") and dataclasses.is_dataclass(value)
        }
    return (found - NOT_RESULTS) | ELSEWHERE


@pytest.fixture(scope="module")
def model(toy_models):
    return toy_models["llama"]


@pytest.fixture(scope="module")
def moe():
    return toy_model("qwen2_moe")


@pytest.fixture(scope="module")
def results(model, moe) -> dict[str, object]:
    """One instance of every result class, by class name."""
    maps = tl_linmap.layer_maps(model, PROMPT, modules=True)
    lm = maps[RESIDUAL]
    att = tl_linmap.token_attribution(model, maps, 7)
    patching = tl_linmap.attribution_patching(model, CLEAN, CORRUPTED, ("a", "b"), layouts=LAYOUTS)
    seq = tl_linmap.sequence_attribution(model, PROMPT, target=tl_linmap.LogitDiff("a", "b"))
    corpus = corpus_analysis(model, [PROMPT, "A dog ran"], layers=[0, 1], k=2, top=3, progress=False)
    experts = expert_contributions(moe, PROMPT, 1)
    svd = lm.svd(k=3)
    pushed = tl_linmap.push_forward(model, PROMPT, svd.left[-1, :2], source=RESIDUAL)
    g = torch.Generator().manual_seed(0)
    d = model.cfg.d_model
    sae = tl_linmap.Dictionary(torch.randn(d, 40, generator=g, dtype=torch.float64), torch.zeros(40, dtype=torch.float64),
                               torch.randn(40, d, generator=g, dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                               hook_in="blocks.0.hook_resid_post")
    with tl_linmap.spliced(model, [sae]):
        features = tl_linmap.feature_contributions(model, PROMPT, target=tl_linmap.Logit(7))
        feature_patching = tl_linmap.feature_patching(model, CLEAN, CORRUPTED, ("a", "b"))
        feature_map = tl_linmap.feature_map(model, PROMPT, sae.hook_out, 3, target=tl_linmap.Logit(7))
    graph = tl_linmap.attribution_graph(model, PROMPT, max_logits=2)
    plan = tl_linmap.plan(model, PROMPT, "token_contributions")
    found = {
        "Plan": plan, "DevicePeak": plan.devices[0],
        "Graph": graph, "NodeRow": graph.to_table()[0], "EdgeRow": graph.edges()[0], "GraphPath": graph.path(),
        "LinearMap": lm, "LinearMaps": maps, "Contributions": tl_linmap.token_contributions(model, PROMPT),
        "HeadSplit": maps.head_splits[1], "OperatorSVD": svd, "DecodedPair": lm.decode(k=1, top=3)[0],
        "RankRow": lm.dimensionality()[0], "SingularRow": svd.to_table()[0], "LogitSplit": lm.logit_contributions(7),
        "TokenShare": lm.logit_contributions(7).to_table()[0], "Attribution": att, "HeadShare": att.to_table("head")[0],
        "ComponentRow": att.to_table()[0], "GapRow": tl_linmap.nonlinearity_gap(model, PROMPT)[0],
        "PatchingAttribution": patching, "LayoutRow": patching.to_table()[0],
        "PatchComparison": patching.compare("resid_pre", patching.patched("resid_pre") * 1.5),
        "SequenceAttribution": seq, "SequenceRow": seq.table()[0], "CorpusAnalysis": corpus,
        "PromptSummary": corpus.summaries[0], "RankSpread": corpus.dimensionality()[0], "ConceptCount": corpus.concepts()[0],
        "ProfileRow": corpus.attribution_profile()[0], "ExpertContributions": experts, "ExpertRow": experts.to_table()[0],
        "Pushed": pushed, "VectorRow": pushed.to_table()[0], "MapRow": maps.to_table()[0],
        "Steering": tl_linmap.steering_hooks(lm, layer=1, alpha=0.2),
        "OperatorSteering": tl_linmap.steering_hooks(lm, layer=1, alpha=0.2, method="operator"),
        "SweepRow": alpha_sweep(model, lm, "Hi", layer=1, alphas=(0.1,), concept_tokens=["a"], max_new_tokens=2)[0],
        "MethodRow": compare_methods(model, {"cat": lm}, "Hi", " you", layer=1, alphas=(0.1,), concept_tokens={"cat": ["a"]},
                                     progress=False)[0],
        "FeatureContributions": features, "FeatureRow": features.to_table()[0], "FeaturePatching": feature_patching,
        "PatchRow": feature_patching.to_table()[0], "FeatureMap": feature_map,
    }
    return found


def test_every_result_class_has_a_case(results):
    assert {type(result) for result in results.values()} == result_classes()
    assert all(type(result).__name__ == name for name, result in results.items())
    exported = {getattr(tl_linmap, name) for name, module in tl_linmap.PUBLIC.items() if module.startswith("results.")}
    assert exported <= result_classes()


# --- repr and _repr_html_ ----------------------------------------------------------------------


class Text(HTMLParser):
    """The text a notebook shows of an HTML fragment (style sheets left out), chunks joined by spaces."""

    def __init__(self):
        super().__init__()
        self.chunks, self._in_style = [], False

    def handle_starttag(self, tag, attrs):
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if not self._in_style and data.strip():
            self.chunks.append(data.strip())


def shown(page: str) -> str:
    parser = Text()
    parser.feed(page)
    return " ".join(parser.chunks)


def dataclass_repr(result) -> str:
    # What @dataclass would print (object's repr for anything else): the default a result must not keep.
    if not dataclasses.is_dataclass(result):
        return object.__repr__(result)
    fields = ", ".join(f"{f.name}={getattr(result, f.name)!r}" for f in dataclasses.fields(result) if f.repr)
    return f"{type(result).__qualname__}({fields})"


def row_keys(row) -> list[str]:
    # Every scalar field as a table cell shows it.
    keys = []
    for f in dataclasses.fields(row):
        value = getattr(row, f.name)
        if isinstance(value, str) and value and value == value.strip() and value.isprintable():
            keys.append(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            keys.append(number_text(value))
    return keys


def key_fields(name: str, result) -> list[str]:
    """What the text and the notebook view of a result must both say."""
    if name in ("LinearMap", "Contributions"):
        return [result.target, f"relative error {result.relative_error():.2e}"]
    if name == "LinearMaps":
        return [*result, f"worst relative error {max(lm.relative_error() for lm in result.values()):.2e}"]
    if name == "HeadSplit":
        heads, d_head, d_model = result.W_O.shape
        return [f"heads {heads}", f"d_head {d_head}", f"d_model {d_model}"]
    if name == "OperatorSVD":
        return [result.target, f"operators {len(result.tokens)}", f"vectors kept {result.left.shape[1]}"]
    if name in ("LogitSplit", "Attribution"):
        return [f"Logit of {result.token!r}: {result.logit:.4g}", *getattr(result, "per_component", [])]
    if name == "PatchingAttribution":
        return [result.mode, f"{result.clean_metric:.4g}", f"{result.corrupted_metric:.4g}", *result.values]
    if name == "SequenceAttribution":
        return [result.target, result.source]
    if name == "CorpusAnalysis":
        return [f"{len(result.summaries)} prompts"]
    if name == "PromptSummary":
        return [f"tokens {len(result.str_tokens)}", f"logit of {result.token!r}", *result.ranks]
    if name == "ExpertContributions":
        return [result.target, f"block {result.layer}"]
    if name == "Pushed":
        return [f"vectors {len(result.vectors)}", result.source, result.target]
    if name in ("Steering", "OperatorSteering"):
        return [result.hook_name, str(result.alpha), *map(repr, result.str_tokens)]
    if name == "FeatureContributions":
        return [result.target, f"active features {len(result.features)}", f"relative error {result.relative_error():.1e}"]
    if name == "FeaturePatching":
        return [result.metric, number_text(result.clean_metric), number_text(result.corrupted_metric)]
    if name == "FeatureMap":
        return [result.site, f"#{result.feature}", result.target]
    if name == "Graph":
        return [*result.targets, f"{int(result.kind_mask('head').sum())} heads", f"exact to {result.relative_error():.1e}"]
    if name == "GraphPath":
        return [result.labels[0], result.labels[-1]]
    if name == "Plan":
        return [result.what, repr(result.route), f"{result.rows_per_pass} rows per pass", "fits" if result.fits else "does not fit",
                *(d.device for d in result.devices)]
    return row_keys(result)


def test_repr_is_its_own_short_text_with_its_key_fields(results):
    for name, result in results.items():
        text = repr(result)
        assert text != dataclass_repr(result), f"{name} keeps the default repr"
        assert "tensor(" not in text and len(text) < 3000, f"{name} prints its tensors"
        missing = [key for key in key_fields(name, result) if key not in text]
        assert not missing, f"repr of {name} lacks {missing}:\n{text}"


def test_html_view_shows_the_key_fields(results):
    for name, result in results.items():
        page = result._repr_html_()
        assert isinstance(page, str) and page.strip(), f"{name} has no notebook view"
        assert "tensor(" not in page, f"{name} shows its tensors"
        text = shown(page)
        missing = [key for key in key_fields(name, result) if key not in text]
        assert not missing, f"notebook view of {name} lacks {missing}:\n{text}"


def test_a_row_shows_each_field_as_its_table_does(results):
    row = results["SingularRow"]
    assert repr(row) == (
        f"SingularRow(target={row.target!r}, source=0, token='<bos>', norm={number_text(row.norm)}, "
        f"sigma=[{', '.join(number_text(s) for s in row.sigma)}])"
    )
    assert row._repr_html_() == Table([row])._repr_html_()


# --- to_table ----------------------------------------------------------------------------------


def _contributions(lm):
    return torch.einsum("pij,pj->pi", lm.operators, lm.inputs)


def check_linear_maps(results, model):
    maps = results["LinearMaps"]
    broken = "blocks.0.hook_mlp_out"  # its output 3% off: an error of 0.03 / 1.03
    shown_maps = tl_linmap.LinearMaps({**maps, broken: dataclasses.replace(maps[broken], output=maps[broken].output * 1.03)})
    rows = shown_maps.to_table()
    assert [row.target for row in rows] == list(maps)
    for row, lm in zip(rows, maps.values()):
        assert row.d_out == lm.operators.shape[1]
        if row.target == broken:
            assert row.relative_error == pytest.approx(0.03 / 1.03, rel=1e-9)
        else:
            error = (_contributions(lm).sum(0) + lm.bias - lm.output).norm() / lm.output.norm()
            assert row.relative_error == pytest.approx(float(error), abs=1e-14) and row.relative_error < 1e-12


def check_attribution(results, model):
    att = results["Attribution"]
    components = att.to_table()
    assert [row.component for row in components] == [*att.per_component, "constant", "b_U"]
    expected = [float(v.sum()) for v in att.per_component.values()] + [att.constant, att.unembed_bias]
    assert [row.total for row in components] == pytest.approx(expected, abs=1e-12)
    with torch.no_grad():
        logit = float(model(model.to_tokens(PROMPT))[0, -1, 7])  # the model's own, plain forward
    assert sum(row.total for row in components) == pytest.approx(logit, rel=1e-5)
    tokens = att.to_table("token")
    assert [row.value for row in tokens[:-1]] == pytest.approx(att.per_token.tolist(), abs=1e-12)
    assert tokens[-1].source == "constant" and tokens[-1].value == pytest.approx(att.constant + att.unembed_bias, abs=1e-12)
    assert sum(row.value for row in tokens) == pytest.approx(logit, rel=1e-5)
    heads = att.to_table("head")
    assert [(row.layer, row.head) for row in heads] == list(att.per_head)
    for layer in {row.layer for row in heads}:  # a layer's heads: its attention's part from the tokens
        total = sum(row.total for row in heads if row.layer == layer)
        assert total == pytest.approx(float(att.per_component[f"blocks.{layer}.hook_attn_out"].sum()), abs=1e-12)
    with pytest.raises(InputError, match="by must be"):
        att.to_table("layer")


def check_logit_split(results, model):
    split, lm = results["LogitSplit"], results["LinearMap"]
    rows = split.to_table()
    # Token 7's logit lens: each J_i x_i through the frozen final norm and W_U column 7.
    norm = results["LinearMaps"].final_norm
    direction = norm.matrix.T @ model.W_U.detach()[:, 7].to(lm.output)
    assert [row.value for row in rows[:-1]] == pytest.approx((_contributions(lm) @ direction).tolist(), abs=1e-12)
    assert [row.token for row in rows[:-1]] == lm.str_tokens
    assert rows[-1].source == "constant" and sum(row.value for row in rows) == pytest.approx(split.logit, abs=1e-12)


def check_operator_svd(results, model):
    svd, lm = results["OperatorSVD"], results["LinearMap"]
    rows = svd.to_table(top=4)
    for row in rows[:-1]:
        operator = lm.operators[row.source]
        assert row.sigma == pytest.approx(torch.linalg.svdvals(operator)[:4].tolist(), rel=1e-10)
        assert row.norm == pytest.approx(float(operator.norm()), rel=1e-12)
    wide = torch.cat(list(lm.operators), dim=1)  # [J_0 ... J_n] side by side
    assert rows[-1].source == "all" and rows[-1].sigma == pytest.approx(torch.linalg.svdvals(wide)[:4].tolist(), rel=1e-10)
    assert rows[-1].norm == pytest.approx(float(wide.norm()), rel=1e-12)


def check_sequence(results, model):
    seq = results["SequenceAttribution"]
    rows = seq.to_table(top=2)
    with torch.no_grad():
        logits = model(model.to_tokens(PROMPT))[0].double()
    a, b = (token_id(model, t) for t in ("a", "b"))
    for row, r in zip(rows, range(len(seq.positions))):
        assert row.position == seq.positions[r]
        assert row.output == pytest.approx(float(logits[row.position, a] - logits[row.position, b]), rel=1e-5, abs=1e-7)
        assert row.bias == pytest.approx(float(seq.bias[r]), abs=1e-12)
        values = seq.values[r, : row.position + 1]
        largest = values.abs().topk(min(2, len(values))).indices.tolist()
        assert [value for _, value in row.top] == pytest.approx([float(values[i]) for i in largest], abs=1e-12)


def check_corpus(results, model):
    corpus = results["CorpusAnalysis"]
    rows = corpus.to_table()
    assert rows and all(type(row).__name__ == "RankSpread" for row in rows)
    for row in rows:
        ranks = [r[1] for s in corpus.summaries for r in s.ranks[row.target] if r[0] == row.role]
        assert row.operators == len(ranks)
        assert [row.rank90_q1, row.rank90_median, row.rank90_q3] == pytest.approx(np.quantile(ranks, [0.25, 0.5, 0.75]).tolist())
    concepts = corpus.to_table("concepts", top=2)
    for row in concepts:
        for token, share in row.tokens:
            assert share == pytest.approx(sum(token in s.concepts[row.target] for s in corpus.summaries) / len(corpus.summaries))
    profile = corpus.to_table("attribution", bands=1)
    first = [float(s.attribution[0] / s.attribution.abs().sum()) for s in corpus.summaries]
    assert profile[0].segment == "first" and profile[0].mean_share == pytest.approx(np.mean(first))
    with pytest.raises(InputError, match="kind must be one of"):
        corpus.to_table("spectra")


def check_patching(results, model):
    patching = results["PatchingAttribution"]
    rows = patching.to_table()
    assert [row.layout for row in rows] == LAYOUTS
    for row in rows:
        values = patching[row.layout]
        assert values[row.largest_cell].item() == row.largest
        assert abs(row.largest) == pytest.approx(float(values.abs().max()))
        assert row.mean_abs == pytest.approx(float(values.abs().mean()))
        assert len(row.largest_cell) == values.ndim == len(row.axes.split(" x "))
    assert rows[-1].axes == "patch type x layer x pos"


def check_experts(results, model):
    split = results["ExpertContributions"]
    rows = split.to_table()
    live = split.position + 1
    parts = torch.cat([split.values, split.rest[None]])[:, :live].norm(dim=-1)
    assert [row.expert for row in rows] == [*split.experts, "rest"]
    for row, norms in zip(rows, parts):
        assert row.carried == pytest.approx(float(norms.sum()), abs=1e-12)
        assert row.largest == pytest.approx(float(norms.max()), abs=1e-12) and norms[row.source] == norms.max()
        assert row.token == split.str_tokens[row.source]


def check_features(results, model):
    split = results["FeatureContributions"]
    rows = split.to_table()
    features = [row for row in rows if row.kind == "feature"]
    assert len(features) == len(split.features)
    for row in features:
        i = ((split.features[:, 1] == row.position) & (split.features[:, 2] == row.feature)).nonzero()[0, 0]
        assert row.activation == pytest.approx(float(split.activations[i]), abs=1e-12)
        assert row.contribution == pytest.approx(float(split.values[i, 0]), abs=1e-12)
    tokens = [row for row in rows if row.kind == "token"]
    assert sorted(row.contribution for row in tokens) == pytest.approx(sorted(split.tokens[:, 0].tolist()), abs=1e-12)
    errors = [row for row in rows if row.kind == "error"]
    assert sorted(row.contribution for row in errors) == pytest.approx(sorted(split.errors[0, :, 0].tolist()), abs=1e-12)
    assert [abs(row.contribution) for row in rows] == sorted((abs(row.contribution) for row in rows), reverse=True)


def check_feature_patching(results, model):
    patching = results["FeaturePatching"]
    site = patching.sites[0]
    for row in patching.to_table():
        assert row.effect == pytest.approx(float(patching.values[site][row.position, row.feature]), abs=1e-12)
        assert row.clean == pytest.approx(float(patching.clean[site][row.position, row.feature]), abs=1e-12)
        assert row.corrupted == pytest.approx(float(patching.corrupted[site][row.position, row.feature]), abs=1e-12)
    assert len(patching.to_table()) == int((patching.values[site] != 0).sum())


def check_pushed(results, model):
    pushed = results["Pushed"]
    rows = pushed.to_table(top=3)
    assert [row.norm for row in rows] == pytest.approx(pushed.values.norm(dim=-1).tolist(), rel=1e-12)
    logits = pushed.values @ model.W_U.detach().to(pushed.values)  # the output target: the final norm's own output
    for row, scores in zip(rows, logits):
        best = scores.topk(3)
        assert [token for token, _ in row.top] == [model.tokenizer.decode([int(i)]) for i in best.indices]
        assert [value for _, value in row.top] == pytest.approx(best.values.tolist(), rel=1e-10)


def check_graph(results, model):
    graph = results["Graph"]
    influence = graph.influence()
    rows = graph.to_table(top=None)
    assert len(rows) == len(graph)
    for row in rows:
        assert row.label == graph.label(row.index) and row.position == int(graph.nodes[row.index, 2])
        assert row.value == float(graph.values[row.index])
        assert row.influence == (0.0 if row.kind == "target" else float(influence[row.index]))
    edges = graph.edges(top=5)
    assert len(set(graph.label(i) for i in range(len(graph)))) == len(graph)  # labels name nodes
    for edge in edges:
        t, s = edge.target_index, edge.source_index
        assert (edge.source, edge.target) == (graph.label(s), graph.label(t))
        assert edge.weight == float(graph.adjacency[t, s])
        assert edge.share == pytest.approx(float(graph.adjacency[t, s].abs() / graph.adjacency[t].abs().sum()), rel=1e-12)


def check_plan(results, model):
    plan = results["Plan"]
    rows = plan.to_table()
    assert list(rows) == list(plan.devices) and int(rows[0].peak_gib * 2**30) == plan.peak_bytes[0]
    assert rows[0].fits == plan.fits and rows[0].peak_gib >= rows[0].weights_gib


TABLE_CHECKS = {
    "LinearMaps": check_linear_maps, "Attribution": check_attribution, "LogitSplit": check_logit_split,
    "OperatorSVD": check_operator_svd, "SequenceAttribution": check_sequence, "CorpusAnalysis": check_corpus,
    "PatchingAttribution": check_patching, "ExpertContributions": check_experts, "Pushed": check_pushed,
    "FeatureContributions": check_features, "FeaturePatching": check_feature_patching, "Graph": check_graph,
    "Plan": check_plan,
}


def test_every_tabular_result_has_a_table_check():
    assert {cls.__name__ for cls in result_classes() if hasattr(cls, "to_table")} == set(TABLE_CHECKS)


@pytest.mark.parametrize("name", TABLE_CHECKS)
def test_to_table_rows_are_the_results_own_numbers(results, model, name):
    table = results[name].to_table()
    assert isinstance(table, Table) and table and table.columns()
    TABLE_CHECKS[name](results, model)


def test_sequence_to_table_is_its_table(results):
    seq = results["SequenceAttribution"]
    assert seq.to_table(top=2) == seq.table(top=2)


# --- plot --------------------------------------------------------------------------------------


PLOTS = {
    "LinearMap": [(), ("decoded",), ("contributions",), ("logit",)],
    "Contributions": [(), ("logit",)],
    "LinearMaps": [(), ("decoded",), ("contributions",)],
    "OperatorSVD": [()],
    "LogitSplit": [()],
    "Attribution": [(), ("components",)],
    "PatchingAttribution": [("resid_pre",)],
    "SequenceAttribution": [()],
    "CorpusAnalysis": [(), ("concepts",), ("attribution",)],
    "ExpertContributions": [()],
    "FeatureContributions": [()],
}


def test_every_plotted_result_is_drawn_here():
    assert {cls.__name__ for cls in result_classes() if hasattr(cls, "plot")} == set(PLOTS)


@pytest.mark.parametrize("name", PLOTS)
def test_plot_returns_a_figure_with_something_drawn(results, name):
    matplotlib = pytest.importorskip("matplotlib")  # the optional `plot` extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        for args in PLOTS[name]:
            fig = results[name].plot(*args)
            assert isinstance(fig, matplotlib.figure.Figure), f"{name}.plot{args}"
            drawn = [ax for ax in fig.axes if ax.lines or ax.images or ax.patches or ax.collections]
            assert drawn, f"{name}.plot{args} drew nothing"
    finally:
        plt.close("all")


def test_plot_kinds_are_the_plotting_functions(results):
    pytest.importorskip("matplotlib").use("Agg")
    import matplotlib.pyplot as plt

    lm, maps, att = results["LinearMap"], results["LinearMaps"], results["Attribution"]
    try:
        line = lm.plot().axes[0].lines[0]  # default: the spectrum of the last token's operator
        assert list(line.get_ydata()) == pytest.approx(torch.linalg.svdvals(lm.operators[-1]).tolist(), rel=1e-10)
        assert len(maps.plot("spectra", normalize=True).axes[0].lines) == len(maps)
        decoded = maps.plot("decoded", k=2, top=1)  # hook_z maps cannot be read as tokens: one row per residual-stream map
        rows = [label.get_text() for label in decoded.axes[0].get_yticklabels()]
        assert len(rows) == sum(not name.endswith("hook_z") for name in maps)
        bars = att.plot(skip_first=True).axes[0].containers  # per token, then the constant with b_U
        assert [b.get_height() for b in bars[0]] == pytest.approx(att.per_token[1:].tolist(), abs=1e-12)
        assert bars[1][0].get_height() == pytest.approx(att.constant + att.unembed_bias, abs=1e-12)
        with pytest.raises(InputError, match="kind must be one of 'spectra', 'decoded', 'contributions', 'logit'"):
            lm.plot("heatmap")
        with pytest.raises(InputError, match="kind must be one of 'contributions', 'logit'"):
            results["Contributions"].plot("spectra")
        with pytest.raises(InputError, match="kind must be one of"):
            results["CorpusAnalysis"].plot("ranks")
    finally:
        plt.close("all")


# --- save and load -----------------------------------------------------------------------------

#: Every result that saves: all but the table rows, which travel inside their result.
SAVED = [
    "Graph", "GraphPath", "LinearMap", "LinearMaps", "Contributions", "HeadSplit", "OperatorSVD", "LogitSplit", "Attribution",
    "PatchingAttribution", "SequenceAttribution", "CorpusAnalysis", "PromptSummary", "ExpertContributions", "Pushed",
    "Steering", "OperatorSteering", "FeatureContributions", "FeaturePatching", "FeatureMap", "Plan",
]
#: What reads vectors as tokens through the model's unembedding: a result saved without its vocabulary refuses it.
DECODES = {
    "LinearMap": lambda r: r.decode(k=2, top=3, stacked=True), "LinearMaps": lambda r: r.decode(k=1, top=3, targets=[RESIDUAL, "blocks.1.hook_attn_out"]),
    "OperatorSVD": lambda r: r.decode(k=2, top=3, stacked=True), "Contributions": lambda r: r.logit_contributions(7).to_table(),
}
#: Plot kinds that read vectors as tokens (they need the vocabulary too).
DECODED_PLOTS = {("decoded",), ("logit",)}


def test_every_result_but_a_row_saves():
    saveable = {cls.__name__ for cls in result_classes() if issubclass(cls, Saveable)}
    assert saveable == set(SAVED)
    assert all(cls._repr_html_ is _row_html for cls in result_classes() if cls.__name__ not in saveable)


def reachable(value, seen=None):
    """Everything a result holds: its fields, their fields, ... (to tell that no model is in reach)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    yield value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [getattr(value, f.name) for f in dataclasses.fields(value)]
    elif isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, (list, tuple)):
        children = list(value)
    else:
        children = list(vars(value).values()) if hasattr(value, "__dict__") and not isinstance(value, (type, torch.Tensor)) else []
    for child in children:
        yield from reachable(child, seen)


def drawn(fig) -> list[np.ndarray]:
    """What a figure shows: its lines, images, bars and scatter points."""
    out = []
    for ax in fig.axes:
        out += [line.get_xydata() for line in ax.lines] + [np.ma.getdata(image.get_array()) for image in ax.images]
        out += [np.array([p.get_height() for p in ax.patches if hasattr(p, "get_height")])]
        out += [np.ma.getdata(c.get_offsets()) for c in ax.collections]
    return out


@pytest.mark.parametrize("name", SAVED)
def test_a_loaded_result_is_the_same_and_works_without_its_model(results, name, tmp_path):
    result = results[name]
    loaded = tl_linmap.load(result.save(tmp_path / name))
    assert_same(result, loaded)
    assert not any(isinstance(v, torch.nn.Module) for v in reachable(loaded)), f"a loaded {name} holds a model"
    assert repr(loaded) == repr(result)
    page = shown(loaded._repr_html_())
    assert all(key in page for key in key_fields(name, result)), page
    if hasattr(result, "to_table"):
        assert loaded.to_table() == result.to_table()
    if isinstance(result, list):  # steering: hooks again, at the same hook points
        assert [hook for hook, _ in loaded] == [hook for hook, _ in result]
    if name == "Steering":  # adding the same vector
        resid = torch.randn(1, 3, len(result.vector), dtype=torch.float64)
        assert torch.equal(loaded.steer(resid), result.steer(resid))
    if name in DECODES:
        with pytest.raises(InputError, match=r"load\(path, model=model\).*vocabulary=True"):
            DECODES[name](loaded)
    if name in PLOTS:
        matplotlib = pytest.importorskip("matplotlib")
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        try:
            for args in PLOTS[name]:
                if args in DECODED_PLOTS:
                    with pytest.raises(InputError, match="vocabulary=True"):
                        loaded.plot(*args)
                    continue
                ours, theirs = drawn(loaded.plot(*args)), drawn(result.plot(*args))
                assert len(ours) == len(theirs) and all(np.array_equal(a, b, equal_nan=True) for a, b in zip(ours, theirs)), f"{name}.plot{args}"
        finally:
            plt.close("all")


@pytest.mark.parametrize("name", DECODES)
def test_a_result_saved_with_its_vocabulary_decodes_without_its_model(results, name, tmp_path):
    result = results[name]
    loaded = tl_linmap.load(result.save(tmp_path / name, vocabulary=True))
    assert_same(result, loaded)
    assert DECODES[name](loaded) == DECODES[name](result)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_a_map_reads_its_predicted_tokens(toy_models, family):
    model = toy_models[family]
    lm = tl_linmap.linear_map(model, "The cat sat on the mat")
    with torch.no_grad():
        own = model(model.to_tokens("The cat sat on the mat"))[0, -1].to(torch.float64)
    assert torch.allclose(lm.logits(), own, rtol=0, atol=1e-6 * float(own.abs().max()))  # RMSNorm's plain forward: ~1e-7
    ids = own.topk(3).indices.tolist()
    assert [token for token, _ in lm.top_tokens(3)] == [model.tokenizer.decode([i]) for i in ids]
    readout = tl_linmap.linear_map(model, "The cat sat on the mat", target=tl_linmap.Logit(ids[0]))
    with pytest.raises(InputError, match="already one number"):
        readout.logits()
