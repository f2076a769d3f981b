"""`tl_linmap.reading.influence` on graphs small enough to work out by hand (circuit-tracer's own
pruning is compared on real graphs in test_replacement.py)."""

import pytest
import torch

from tl_linmap.reading import influence as inf

DT = torch.float64


def chain() -> tuple[torch.Tensor, torch.Tensor]:
    """token 0 -> feature 1 -> target 2, and token 0 -> target 2 directly (rows targets, columns sources)."""
    a = torch.zeros(3, 3, dtype=DT)
    a[1, 0] = 4.0
    a[2, 1] = 2.0
    a[2, 0] = -2.0
    return a, torch.tensor([0.0, 0.0, 1.0], dtype=DT)


def test_normalized_rows_are_shares_of_absolute_inputs():
    a, _ = chain()
    n = inf.normalized(a)
    assert n.tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]


def test_influence_sums_every_path():
    a, w = chain()
    # token: 0.5 directly + 0.5 * 1 through the feature; feature: 0.5
    assert inf.influence(inf.normalized(a), w).tolist() == [1.0, 0.5, 0.0]


def test_influence_refuses_a_cycle():
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DT)
    with pytest.raises(RuntimeError, match="cycle"):
        inf.influence(a, torch.tensor([1.0, 0.0], dtype=DT), max_iter=50)


def test_threshold_keeps_the_top_fraction():
    scores = torch.tensor([1.0, 4.0, 2.0, 3.0], dtype=DT)  # cumulative shares of 4, 3, 2, 1: 0.4, 0.7, 0.9, 1.0
    assert inf.threshold(scores, 0.7) == 3.0
    assert inf.threshold(scores, 0.71) == 2.0
    assert inf.threshold(scores, 1.0) == 1.0


def test_prune_drops_a_weak_feature_and_its_edges():
    """Two features between a token and a target: the weak one (1% of the target's input) goes, with its edges."""
    a = torch.zeros(4, 4, dtype=DT)  # 0 token, 1 strong feature, 2 weak feature, 3 target
    a[1, 0], a[2, 0] = 1.0, 1.0
    a[3, 1], a[3, 2] = 99.0, 1.0
    w = torch.tensor([0, 0, 0, 1.0], dtype=DT)
    inner = torch.tensor([False, True, True, False])
    result = inf.prune(a, w, inner=inner, needs_inputs=inner, node_threshold=0.8, edge_threshold=0.98)
    assert result.nodes.tolist() == [True, True, False, True]
    assert result.edges.nonzero().tolist() == [[1, 0], [3, 1]]
    # influence: token 1.0, strong 0.99, weak 0.01, target 0: cumulative shares in that order (of 2.0)
    assert torch.allclose(result.cumulative, torch.tensor([1.0, 1.99, 2.0, 2.0], dtype=DT) / 2.0, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["node_threshold", "edge_threshold"])
def test_prune_refuses_a_threshold_outside_zero_one(name):
    a, w = chain()
    inner = torch.tensor([False, True, False])
    with pytest.raises(ValueError, match=name):
        inf.prune(a, w, inner=inner, needs_inputs=inner, **{name: 1.5})


def test_scores_split_tokens_from_errors():
    """A target fed 3:1 by a feature (fed by a token) and an error: replacement 3/4; completeness weighs each node's
    non-error share by its influence plus weight (target 3/4 at weight 1, feature 1 at influence 3/4)."""
    a = torch.zeros(4, 4, dtype=DT)  # 0 token, 1 error, 2 feature, 3 target
    a[2, 0] = 1.0
    a[3, 2], a[3, 1] = 3.0, -1.0
    w = torch.tensor([0, 0, 0, 1.0], dtype=DT)
    replacement, completeness = inf.scores(a, w, tokens=torch.tensor([True, False, False, False]), errors=torch.tensor([False, True, False, False]))
    assert replacement == pytest.approx(0.75)
    # nodes' (non-error share, influence + weight): token (1, .75), error (1, .25), feature (1, .75), target (.75, 1)
    assert completeness == pytest.approx((0.75 + 0.25 + 0.75 + 0.75) / (0.75 + 0.25 + 0.75 + 1.0))
