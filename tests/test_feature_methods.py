"""Feature maps, sources, steering and patching (`tl_linmap.methods.features`), on a toy bridge with a
`Dictionary` spliced in, each checked against a computation written here: the model frozen by hand
(tl_linmap's own model rules, which tests/test_oracle.py checks independently) and the SAE by hand."""

import pytest
import torch

import tl_linmap
from tl_linmap.base.guard import borrowed
from tl_linmap.freeze.capture import run_to_target
from tl_linmap.freeze.hooks import freeze_hooks, replay_hooks
from tl_linmap.load.toy import toy_model

SITE = "blocks.0.hook_resid_post"
TOKENS = torch.tensor([[5, 17, 42, 9, 77, 31]])
TOL = 1e-10


@pytest.fixture(scope="module")
def bridge():
    return toy_model("llama", d_model=16, n_layers=2, n_heads=4, d_mlp=24)


@pytest.fixture(scope="module")
def sae(bridge):
    g = torch.Generator().manual_seed(1)
    d, n = bridge.cfg.d_model, 48
    return tl_linmap.Dictionary(
        W_enc=torch.randn(d, n, generator=g, dtype=torch.float64) * 0.5, b_enc=torch.randn(n, generator=g, dtype=torch.float64) * 0.1,
        W_dec=torch.randn(n, d, generator=g, dtype=torch.float64) * 0.3, b_dec=torch.randn(d, generator=g, dtype=torch.float64) * 0.1,
        hook_in=SITE, activation="relu",
    )


def by_hand(model, sae, tokens, *, acts_override=None, read="ln_final.hook_out", steer=None, factors=None, replay=None):
    """The frozen model with the SAE spliced by hand (its mask detached, its error constant); the leaves it used.

    ``factors``: a dict to record the model's factors in; ``replay``: factors recorded so, replayed instead.
    """
    out = {}

    def splice(act, hook=None):
        pre = act @ sae.W_enc + sae.b_enc
        mask = (pre > 0).to(pre.dtype).detach()
        acts = (pre * mask).detach().requires_grad_(True) if acts_override is None else acts_override(pre * mask)
        out["acts"] = acts
        # The error of the unpatched reconstruction, held fixed (SAELens' use_error_term patches so).
        out["error"] = error = (act - ((pre * mask) @ sae.W_dec + sae.b_dec)).detach()
        return acts @ sae.W_dec + sae.b_dec + error

    model_hooks = replay_hooks(model, replay) if replay is not None else freeze_hooks(model, factors=factors)
    hooks = model_hooks + [(SITE, splice)] + ([steer] if steer else [])
    with torch.enable_grad():
        y = run_to_target(model, tokens, read, hooks)
    return y, out


def test_feature_map_is_the_derivative_by_hand(bridge, sae):
    readout = tl_linmap.Logit(7)
    with tl_linmap.spliced(bridge, [sae], error="constant"):
        contributions = tl_linmap.feature_contributions(bridge, TOKENS, target=readout)
        active = contributions.features[contributions.features[:, 1] == 3][0].tolist()
        inactive = next(f for f in range(sae.d_sae) if f not in contributions.features[contributions.features[:, 1] == 3, 2].tolist())
        maps = {f: tl_linmap.feature_map(bridge, TOKENS, SITE, f, target=readout, source=3) for f in (active[2], inactive)}
        whole = tl_linmap.feature_map(bridge, TOKENS, SITE, inactive, target="blocks.1.hook_resid_post", source=3)
    with borrowed(bridge, torch.float64):
        y, out = by_hand(bridge, sae, TOKENS)
        logit = y[0, -1] @ bridge.W_U[:, 7]
        (grad,) = torch.autograd.grad(logit, out["acts"])
        y1, out1 = by_hand(bridge, sae, TOKENS, read="blocks.1.hook_resid_post")
        jac = torch.stack([torch.autograd.grad(y1[0, -1, i], out1["acts"], retain_graph=True)[0][0, 3, inactive] for i in range(y1.shape[-1])])
    for f, m in maps.items():
        assert m.values.shape == (1,) and abs(float(m.values[0]) - float(grad[0, 3, f])) < TOL
    assert inactive not in contributions.features[:, 2][contributions.features[:, 1] == 3].tolist()
    assert (whole.values - jac).abs().max() < TOL
    # a map is a slope: an active feature's direct effect is its activation times its map
    row = contributions.feature(SITE, 3, active[2])
    assert abs(row.contribution - row.activation * float(maps[active[2]].values[0])) < TOL


def test_feature_sources_sum_to_the_preactivation_by_hand(bridge, sae):
    with tl_linmap.spliced(bridge, [sae]):
        sources = tl_linmap.feature_sources(bridge, TOKENS, SITE, 5, position=4)
    with borrowed(bridge, torch.float64):
        x = run_to_target(bridge, TOKENS, SITE)[0, 4]
    pre = float(x @ sae.W_enc[:, 5] + sae.b_enc[5])
    assert abs(float(sources.output[0]) - pre) < TOL
    assert abs(float(sources.total()[0]) - pre) < TOL
    # split by block and module: every block before the site has an attention and an MLP node
    assert set(sources.modules) == {"blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"}
    assert sources.tokens[5:].abs().max() == 0  # causal: later tokens cannot drive position 4


def test_feature_steering_adds_the_decoder_direction(bridge, sae):
    with tl_linmap.spliced(bridge, [sae]):
        steering = tl_linmap.feature_steering(bridge, 11, alpha=0.5)
    assert steering.hook_name == SITE and steering.vector.norm().item() == pytest.approx(1.0)
    direction = sae.W_dec[11] / sae.W_dec[11].norm()
    resid = torch.randn(1, 6, 16, dtype=torch.float64)
    expected = resid + 0.5 * resid.norm(dim=-1, keepdim=True) * direction
    assert (steering.steer(resid) - expected).abs().max() < 1e-12
    by_dictionary = tl_linmap.feature_steering(sae, 11, alpha=0.5)  # no model needed for a decoder direction
    assert by_dictionary.hook_name == SITE and torch.equal(by_dictionary.vector, steering.vector)
    with pytest.raises(tl_linmap.InputError, match="No dictionary writes"):
        tl_linmap.feature_steering(bridge, 11)  # outside spliced: no dictionary there
    with pytest.raises(tl_linmap.InputError, match=r"feature must be an int in \[0, 48\)"):
        tl_linmap.feature_steering(sae, 48)
    other = tl_linmap.Dictionary(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, hook_in="blocks.1.hook_resid_post")
    with tl_linmap.spliced(bridge, [sae, other]), pytest.raises(tl_linmap.InputError, match="2 dictionaries: name one with site="):
        tl_linmap.feature_steering(bridge, 11)


def test_map_steering_needs_a_residual_map(bridge, sae):
    with tl_linmap.spliced(bridge, [sae]):
        scalar = tl_linmap.feature_map(bridge, TOKENS, SITE, 3, target=tl_linmap.Logit(7))
        vector = tl_linmap.feature_map(bridge, TOKENS, SITE, 3, target="blocks.1.hook_resid_post")
    steering = tl_linmap.steering_hooks(vector, alpha=0.2)
    assert steering.hook_name == "blocks.1.hook_resid_post"
    assert (steering.vector - vector.values / vector.values.norm()).abs().max() < 1e-12
    with pytest.raises(tl_linmap.InputError, match="residual hook point"):
        tl_linmap.steering_hooks(scalar, alpha=0.2)


def test_feature_patching_predicts_the_frozen_patch_exactly(bridge, sae):
    corrupted = torch.tensor([[5, 17, 3, 9, 12, 31]])
    metric = tl_linmap.LogitDiff(7, 8)
    with tl_linmap.spliced(bridge, [sae], error="live"):
        patching = tl_linmap.feature_patching(bridge, TOKENS, corrupted, metric)
    with borrowed(bridge, torch.float64):
        factors = {}  # the clean run's: the prediction is in its frozen system
        _, clean = by_hand(bridge, sae, TOKENS, factors=factors)
        _, other = by_hand(bridge, sae, corrupted)
        assert (patching.clean[SITE] - clean["acts"][0].detach()).abs().max() < TOL
        assert (patching.corrupted[SITE] - other["acts"][0].detach()).abs().max() < TOL

        def metric_of(acts_override=None):
            y, _ = by_hand(bridge, sae, TOKENS, acts_override=acts_override, replay=factors)
            return float(y[0, -1].detach() @ (bridge.W_U[:, 7] - bridge.W_U[:, 8]))

        base = metric_of()
        for row in patching.top(4):
            p, f = row.position, row.feature

            def patched(acts, p=p, f=f):
                acts = acts.detach().clone()
                acts[0, p, f] = other["acts"][0, p, f]
                return acts

            assert abs(metric_of(patched) - base - row.effect) < TOL
    assert abs(patching.clean_metric - base) < TOL
    with pytest.raises(tl_linmap.InputError, match="same number of tokens"):
        with tl_linmap.spliced(bridge, [sae]):
            tl_linmap.feature_patching(bridge, TOKENS, corrupted[:, :4], metric)
