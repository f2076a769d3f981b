"""Steering hooks: exact arithmetic on toys, a measured concept shift on the real model."""

import pytest
import torch
from conftest import PROMPT

import tl_linmap
from tl_linmap.compat import get_act_name
from tl_linmap.decomposition import layer_maps
from tl_linmap.errors import InputError
from tl_linmap.guard import hook_count
from tl_linmap.steering import concept_vector, steering_hooks

CONCEPT_WORDS = [" Golden", " Gate", " Bridge", " bridge", " San", " Francisco", " bridges", " California"]


@pytest.fixture
def llama(toy_models):
    return toy_models["llama"]


def test_concept_vector_is_the_unit_sum_of_contributions(llama):
    source = tl_linmap.linear_map(llama, "Golden Gate", target="blocks.0.hook_resid_post")
    vector = concept_vector(source)
    expected = source.contributions()[1:].sum(0)
    assert torch.allclose(vector, expected / expected.norm())
    singular = concept_vector(source, how="singular", k=2)
    assert singular.norm() == pytest.approx(1.0)
    with pytest.raises(InputError, match="how must be"):
        concept_vector(source, how="nope")


def test_hooks_add_alpha_times_residual_norm_at_chosen_positions(llama):
    source = tl_linmap.linear_map(llama, "Golden Gate", target="blocks.1.hook_resid_post")
    name = get_act_name("resid_post", 1)
    tokens = llama.to_tokens(PROMPT)
    _, plain = llama.run_with_cache(tokens, names_filter=name)
    hooks = steering_hooks(source, layer=1, alpha=0.5, positions=[2, 5])
    with llama.hooks(fwd_hooks=hooks):
        _, steered = llama.run_with_cache(tokens, names_filter=name)
    r, s = plain[name][0], steered[name][0]
    v = concept_vector(source).float() if r.dtype == torch.float32 else concept_vector(source)
    for pos in range(len(r)):
        expected = r[pos] + (0.5 * r[pos].norm() * v if pos in (2, 5) else 0)
        assert torch.allclose(s[pos], expected, atol=1e-12)
    assert hook_count(llama) == 0


def test_source_from_layer_maps_and_wrong_layer(llama):
    maps = layer_maps(llama, "Golden Gate", layers=[0])
    assert len(steering_hooks(maps, layer=0)) == 1
    with pytest.raises(InputError, match="no 'blocks.1.hook_resid_post'"):
        steering_hooks(maps, layer=1)
    with pytest.raises(InputError, match="not a residual-stream vector"):
        steering_hooks(tl_linmap.linear_map(llama, "Golden", target="blocks.0.attn.hook_z"), layer=0)


@pytest.mark.parametrize("kv_cache", [False, True])
def test_steering_works_with_generate(llama, kv_cache):
    source = tl_linmap.linear_map(llama, "Golden Gate", target="blocks.1.hook_resid_post")
    kwargs = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, use_past_kv_cache=kv_cache, verbose=False, return_type="tokens")
    plain = llama.generate(PROMPT, **kwargs)
    with llama.hooks(fwd_hooks=steering_hooks(source, layer=1, alpha=4.0)):
        steered = llama.generate(PROMPT, **kwargs)
    assert steered.shape == plain.shape
    assert not torch.equal(steered, plain)  # each generated step was steered, KV-cached or not
    assert hook_count(llama) == 0


@pytest.mark.slow
def test_golden_gate_steering_raises_the_concept_on_smollm2():
    model = tl_linmap.load_model("smollm2")
    concept = [int(model.to_tokens(w, prepend_bos=False)[0, 0]) for w in CONCEPT_WORDS]
    source = tl_linmap.linear_map(model, "The Golden Gate Bridge", target="blocks.15.hook_resid_post")
    hooks = steering_hooks(source, layer=15, alpha=0.1)
    prompt = "My favourite thing to do on the weekend is"
    with model.hooks(fwd_hooks=hooks):
        text = model.generate(prompt, max_new_tokens=20, do_sample=False, use_past_kv_cache=False, verbose=False)
    tokens = model.to_tokens(text)
    with torch.no_grad():
        plain = model(tokens)[0].log_softmax(-1)
        with model.hooks(fwd_hooks=hooks):
            steered = model(tokens)[0].log_softmax(-1)
    continuation = slice(len(model.to_tokens(prompt)[0]) - 1, None)
    shift = (steered[continuation][:, concept] - plain[continuation][:, concept]).mean().item()
    print(f"\nsteered continuation: {text!r}\nmean log-prob shift of concept tokens: {shift:+.2f} nats")
    assert shift > 1.0
    assert any(w.strip().lower() in text[len(prompt):].lower() for w in CONCEPT_WORDS)
