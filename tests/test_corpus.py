"""Corpus analyses: the aggregates against statistics computed here, prompt by prompt.

Every expected value is rebuilt in the test from the one-prompt API: the operators of
`tl_linmap.linear_map`, their ranks from NumPy's SVD, quartiles from `numpy.quantile`, decoded
tokens from `LinearMap.decode`, attributions from `tl_linmap.token_attribution` of module maps
(a different route from the corpus's last-layer logit split) and the model's own logits.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import tl_linmap
from tl_linmap.results.corpus import ROLES, CorpusAnalysis
from tl_linmap.methods.corpus import corpus_analysis
from tl_linmap.base.errors import InputError
from tl_linmap.load.toy import toy_model

PROMPTS = ["The cat sat on the mat", "Hello world, this is", "One two"]
LAYERS = [0, 1]
K, TOP = 2, 4


@pytest.fixture(scope="module")
def model():
    return toy_model("llama", dtype=torch.float64)


@pytest.fixture(scope="module")
def analysis(model):
    # A generator: the analysis must read its prompts once, as they come.
    return corpus_analysis(model, (p for p in PROMPTS), layers=LAYERS, k=K, top=TOP, progress=False)


def _numpy_ranks(operator: np.ndarray) -> tuple[int, int, float]:
    s = np.linalg.svd(operator, compute_uv=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    return int(np.searchsorted(energy, 0.9 - 1e-12) + 1), int(np.searchsorted(energy, 0.99 - 1e-12) + 1), float(np.sum(s**2) / s[0] ** 2)


def _expected_ranks(model, target: str) -> dict[str, list[tuple[int, int, float]]]:
    by_role = {role: [] for role in ROLES}
    for prompt in PROMPTS:
        operators = tl_linmap.linear_map(model, prompt, target=target).operators.numpy()
        last = len(operators) - 1
        for i, operator in enumerate(operators):
            by_role["first" if i == 0 else "last" if i == last else "middle"].append(_numpy_ranks(operator))
        by_role["stacked"].append(_numpy_ranks(np.concatenate(list(operators[1:]), axis=1)))
    return by_role


def test_dimensionality_matches_numpy_quartiles(model, analysis):
    table = analysis.dimensionality()
    assert [(row.target, row.role) for row in table] == [
        (f"blocks.{layer}.hook_resid_post", role) for layer in LAYERS for role in ROLES
    ]
    for target in analysis.targets:
        expected = _expected_ranks(model, target)
        for row in (r for r in table if r.target == target):
            values = np.array(expected[row.role], dtype=float)
            assert row.operators == len(values)
            got = [row.rank90_q1, row.rank90_median, row.rank90_q3, row.rank99_q1, row.rank99_median,
                   row.rank99_q3, row.stable_q1, row.stable_median, row.stable_q3]
            want = np.quantile(values, [0.25, 0.5, 0.75], axis=0).T.flatten()
            np.testing.assert_allclose(got, want, rtol=1e-9)


def test_first_and_last_tokens_are_apart(model, analysis):
    """One first and one last operator per prompt; the middle role holds only the others."""
    n_tokens = [tl_linmap.linear_map(model, p, target="blocks.0.hook_resid_post").operators.shape[0] for p in PROMPTS]
    counts = {row.role: row.operators for row in analysis.dimensionality() if row.target == "blocks.0.hook_resid_post"}
    assert counts == {"first": len(PROMPTS), "last": len(PROMPTS), "stacked": len(PROMPTS), "middle": sum(n - 2 for n in n_tokens)}
    assert analysis.ranks("blocks.0.hook_resid_post", "first").shape == (len(PROMPTS), 3)


def test_concepts_count_each_prompts_decoded_tokens(model, analysis):
    for target in analysis.targets:
        counts = Counter()
        for prompt in PROMPTS:
            decoded = tl_linmap.linear_map(model, prompt, target=target).decode(K, TOP, sources=[], stacked=True, skip_first=True)
            assert len(decoded) == K
            counts.update({token for pair in decoded for token, _ in pair.left})
        row = next(r for r in analysis.concepts(top=1000) if r.target == target)
        assert row.prompts == len(PROMPTS)
        assert dict(row.tokens) == {token: c / len(PROMPTS) for token, c in counts.items()}
        assert [share for _, share in row.tokens] == sorted((share for _, share in row.tokens), reverse=True)
        assert len(analysis.concepts(top=3)[0].tokens) == 3


def _attribution_shares(model, prompt, token=None):
    maps = tl_linmap.layer_maps(model, prompt, modules=True)
    if token is None:
        token = int(model(prompt)[0, -1].argmax())
    per_token = tl_linmap.token_attribution(model, maps, token).per_token.numpy()
    return per_token / np.abs(per_token).sum()


def test_attribution_profile_averages_token_attribution(model, analysis):
    bands = 2
    shares = [_attribution_shares(model, p) for p in PROMPTS]
    for summary, expected in zip(analysis.summaries, shares):
        np.testing.assert_allclose(summary.shares().numpy(), expected, rtol=0, atol=1e-12)
    per_token, per_prompt = {}, {}
    for s in shares:
        last = len(s) - 1
        labels = ["first"] + [f"middle {min(int((i - 1) / (last - 1) * bands), bands - 1)}" for i in range(1, last)] + ["last"]
        for label in set(labels):
            values = [v for v, l in zip(s, labels) if l == label]
            per_token.setdefault(label, []).extend(values)
            per_prompt.setdefault(label, []).append(sum(values))
    table = analysis.attribution_profile(bands=bands)
    assert [row.segment for row in table] == ["first", "middle 0.00-0.50", "middle 0.50-1.00", "last"]
    for row, label in zip(table, ["first", "middle 0", "middle 1", "last"]):
        assert (row.tokens, row.prompts) == (len(per_token[label]), len(per_prompt[label]))
        assert row.mean_share == pytest.approx(np.mean(per_token[label]), abs=1e-12)
        assert row.total_share == pytest.approx(np.mean(per_prompt[label]), abs=1e-12)


def test_a_fixed_token_is_split_in_every_prompt(model):
    result = corpus_analysis(model, PROMPTS[:2], layers=[1], token="e", progress=False)
    token = tl_linmap.readout.token_id(model, "e")
    for summary, prompt in zip(result.summaries, PROMPTS):
        np.testing.assert_allclose(summary.shares().numpy(), _attribution_shares(model, prompt, token), atol=1e-12)


def test_only_small_summaries_are_kept(model, analysis):
    """Streaming: per prompt a few numbers per operator, never an operator or a map."""
    assert isinstance(analysis, CorpusAnalysis) and len(analysis.summaries) == len(PROMPTS)
    for summary in analysis.summaries:
        for value in vars(summary).values():
            assert not isinstance(value, torch.Tensor) or value.numel() == len(summary.sources)


def test_the_last_layer_is_mapped_for_the_attribution(model):
    result = corpus_analysis(model, PROMPTS[:1], layers=[0], progress=False)
    assert result.targets == ["blocks.0.hook_resid_post"]
    np.testing.assert_allclose(result.summaries[0].shares().numpy(), _attribution_shares(model, PROMPTS[0]), atol=1e-12)


@pytest.mark.parametrize(
    ("prompts", "match"),
    [([], "No prompts"), ("The cat", r"got one string: pass \['The cat'\]"), (["The cat", [5]], "has one token")],
    ids=["none", "one-string", "one-token"],
)
def test_bad_prompts(model, prompts, match):
    with pytest.raises(InputError, match=match):
        corpus_analysis(model, prompts, layers=[0], progress=False)


def test_tables_and_plots(analysis):
    pytest.importorskip("matplotlib")
    from tl_linmap.present.plotting import plot_corpus_attribution, plot_corpus_concepts, plot_corpus_dimensionality

    for figure in (plot_corpus_dimensionality(analysis), plot_corpus_concepts(analysis, top=3), plot_corpus_attribution(analysis)):
        assert figure.axes
    assert "rank90_median" in str(analysis.dimensionality())
    assert analysis.dimensionality()._repr_html_().startswith("<style>")


@pytest.mark.slow
def test_smollm2_phrases():
    from tl_linmap.load.datasets import phrases

    model = tl_linmap.load_model("smollm2")
    prompts = phrases("geography")[:3]
    result = corpus_analysis(model, prompts, layers=[29], dtype=torch.float32, progress=False)
    spread = {row.role: row for row in result.dimensionality()}
    # SmolLM2's first token is an attention sink: its operator is about rank one.
    assert spread["first"].rank90_median <= 2 < spread["last"].rank90_median
    assert result.summaries[0].token == " Paris"  # "The capital of France is"
    assert len(result.attribution_profile()) >= 3


def test_the_table_script_resumes_where_a_run_stopped(model, analysis, tmp_path, monkeypatch):
    # scripts/dataset_tables.py saves every few prompts; a rerun after a kill carries on and
    # ends with the same analysis as one uninterrupted call.
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location("dataset_tables", pathlib.Path(__file__).parent.parent / "scripts" / "dataset_tables.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "PROMPTS_PER_CALL", 1)
    calls = []
    real = script.corpus_analysis
    monkeypatch.setattr(script, "corpus_analysis", lambda m, p, **kw: calls.append(list(p)) or real(m, p, **kw, progress=False))
    script.resumable_analysis(model, "toy", PROMPTS, LAYERS, torch.float64, tmp_path)
    (saved,) = tmp_path.glob("*.pt")
    state = torch.load(saved, weights_only=False)
    state["analysis"].summaries = state["analysis"].summaries[:1]  # as if killed after the first prompt
    torch.save(state, saved)
    calls.clear()
    resumed, _ = script.resumable_analysis(model, "toy", PROMPTS, LAYERS, torch.float64, tmp_path)
    assert calls == [[p] for p in PROMPTS[1:]]
    assert [s.sources for s in resumed.summaries] == [s.sources for s in analysis.summaries]
    for target in analysis.targets:
        for role in ROLES:
            assert torch.equal(resumed.ranks(target, role), analysis.ranks(target, role))
    with pytest.raises(SystemExit, match="other settings"):
        script.resumable_analysis(model, "toy", PROMPTS[:2], LAYERS, torch.float64, tmp_path)
