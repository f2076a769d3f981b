"""Which dictionaries are spliced where (`tl_linmap.freeze.splicing`): hook points by identity, readers after
writers, inputs read where no hook point holds them, nothing kept after the block."""

import gc
import weakref

import pytest
import torch

import tl_linmap
from tl_linmap.base.guard import borrowed
from tl_linmap.freeze.capture import run_to_target
from tl_linmap.freeze.hooks import same_path_hooks
from tl_linmap.load.toy import toy_model

TOKENS = torch.tensor([[5, 17, 42, 9, 77, 31]])
TOL = 1e-10


@pytest.fixture(scope="module")
def bridge():
    return toy_model("llama", d_model=16, n_layers=2, n_heads=4, d_mlp=24)


def dictionary(hook_in, hook_out=None, seed=0, d_in=16, **options):
    g = torch.Generator().manual_seed(seed)
    n = 40
    return tl_linmap.Dictionary(
        W_enc=torch.randn(d_in, n, generator=g, dtype=torch.float64) * 0.5, b_enc=torch.randn(n, generator=g, dtype=torch.float64) * 0.1,
        W_dec=torch.randn(n, 16, generator=g, dtype=torch.float64) * 0.3, b_dec=torch.randn(16, generator=g, dtype=torch.float64) * 0.1,
        hook_in=hook_in, hook_out=hook_out, **options,
    )


def test_aliases_of_one_hook_point_are_one_site(bridge):
    """A bridge's blocks.0.hook_mlp_out is blocks.0.mlp.hook_out: module nodes leave a dictionary there alone."""
    assert bridge.hook_dict["blocks.0.hook_mlp_out"] is bridge.hook_dict["blocks.0.mlp.hook_out"]
    d = dictionary("blocks.0.mlp.hook_out", activation="topk", k=5)
    split = tl_linmap.feature_contributions(bridge, TOKENS, tl_linmap.Logit(5), dictionaries=[d], modules=True)
    # Its features still write the MLP's output (a module node there would have cut them to zero).
    assert split.values.abs().sum() > 0.1 and split.relative_error() < 1e-12
    assert "blocks.0.hook_mlp_out" not in split.modules and "blocks.0.hook_attn_out" in split.modules
    with pytest.raises(tl_linmap.InputError, match="the same hook point"):
        with tl_linmap.spliced(bridge, [d, dictionary("blocks.0.hook_mlp_out", seed=1)]):
            pass


@pytest.mark.parametrize("error", ["none", "live", "constant"])
def test_a_reader_sees_the_writer_whichever_comes_first(bridge, error):
    writer = dictionary("blocks.0.hook_resid_post", activation="topk", k=6)
    reader = dictionary("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", seed=2)
    results = []
    for order in ([writer, reader], [reader, writer]):
        with tl_linmap.spliced(bridge, order, error=error):
            with torch.no_grad():
                logits = bridge(TOKENS)
            lm = tl_linmap.linear_map(bridge, TOKENS)
            split = tl_linmap.feature_contributions(bridge, TOKENS, tl_linmap.Logit(3))
        results.append((logits, lm, split))
    (l1, m1, s1), (l2, m2, s2) = results
    assert torch.equal(l1, l2)
    assert (m1.operators - m2.operators).abs().max() < TOL and (m1.bias - m2.bias).abs().max() < TOL
    assert s1.sites == s2.sites == ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")
    assert torch.equal(s1.features, s2.features) and (s1.values - s2.values).abs().max() < TOL
    # by hand: the reader's input is the writer's output
    with borrowed(bridge, torch.float64):
        x = run_to_target(bridge, TOKENS, "blocks.0.hook_resid_post", same_path_hooks(bridge))  # float64 norms, as mapped
        pre = x @ writer.W_enc + writer.b_enc
        acts = pre * writer.mask(x, pre)
        recons = acts @ writer.W_dec + writer.b_dec
        written = recons if error == "none" else recons + (x - recons)
        reader_pre = written @ reader.W_enc + reader.b_enc
    reader_acts = s1.activations[s1.features[:, 0] == 1]
    expected = (reader_pre * (reader_pre > 0))[0]
    assert (reader_acts - expected[expected != 0]).abs().max() < TOL


@pytest.mark.parametrize("error", ["none", "live"])
def test_the_sources_of_a_dictionary_reading_the_point_it_writes(bridge, error):
    """Its input is the model's value before it writes: the pre-activation, split by what comes before."""
    d = dictionary("blocks.0.hook_resid_post", activation="relu")
    sources = tl_linmap.feature_sources(bridge, TOKENS, "blocks.0.hook_resid_post", 7, position=4, dictionaries=[d], error=error)
    with borrowed(bridge, torch.float64):
        x = run_to_target(bridge, TOKENS, "blocks.0.hook_resid_post", same_path_hooks(bridge))[0, 4]  # the bare model: the splice's input
    pre = float(x @ d.W_enc[:, 7] + d.b_enc[7])
    assert abs(float(sources.output[0]) - pre) < TOL and abs(float(sources.total()[0]) - pre) < TOL
    assert sources.values.abs().max() == 0 and sources.errors.abs().max() == 0  # its own features come after
    assert set(sources.modules) == {"blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"}


def test_nothing_is_kept_after_the_block(bridge):
    d = dictionary("blocks.0.hook_resid_post")
    with tl_linmap.spliced(bridge, [d]):
        with torch.enable_grad():
            out = bridge(TOKENS)
        kept = weakref.ref(out)
        del out
    gc.collect()
    assert kept() is None


def test_a_dictionary_of_the_wrong_width_is_refused_by_name(bridge):
    d = dictionary("blocks.0.attn.hook_z", d_in=12)  # hook_z holds 4 heads x 4
    with tl_linmap.spliced(bridge, [d]), pytest.raises(tl_linmap.InputError, match="width 16 .* W_enc reads 12"):
        tl_linmap.linear_map(bridge, TOKENS)


def test_optional_weights_are_checked():
    with pytest.raises(tl_linmap.InputError, match=r"threshold must be a tensor of shape \(40,\)"):
        dictionary("blocks.0.hook_resid_post", activation="jumprelu", threshold=torch.zeros(39))
    with pytest.raises(tl_linmap.InputError, match=r"W_skip must be a tensor of shape \(16, 16\)"):
        dictionary("blocks.0.ln2.hook_out", "blocks.0.hook_mlp_out", W_skip=torch.zeros(16, 8))
