"""Steering hooks: exact arithmetic on toys, a measured concept shift on the real model."""

import pytest
import torch
from conftest import HOOKED, PROMPT

import tl_linmap
from tl_linmap.base.compat import get_act_name
from tl_linmap.methods.decomposition import layer_maps
from tl_linmap.base.errors import InputError
from tl_linmap.base.guard import hook_count
from tl_linmap.methods.steering import OperatorSteering, alpha_sweep, compare_methods, concept_vector, steering_hooks, word_tokens
from tl_linmap.base.table import Table

CONCEPT_WORDS = [" Golden", " Gate", " Bridge", " bridge", " San", " Francisco", " bridges", " California"]


@pytest.fixture
def llama(toy_models):
    return toy_models["llama"]


def _unit_sum(lm, first: int):
    # J_i x_i summed over the kept tokens, from the operators and the embeddings directly.
    total = torch.einsum("pij,pj->i", lm.operators[first:], lm.inputs[first:])
    return total / total.norm()


def test_concept_vector_leaves_out_a_prepended_bos_and_nothing_else(llama):
    bos = llama.tokenizer.bos_token_id
    with_bos = tl_linmap.linear_map(llama, "Golden Gate", target="blocks.0.hook_resid_post")
    assert int(with_bos.tokens[0]) == bos  # the toy tokenizer prepends its BOS
    torch.testing.assert_close(concept_vector(with_bos), _unit_sum(with_bos, 1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(concept_vector(with_bos, skip_first=False), _unit_sum(with_bos, 0), rtol=1e-12, atol=1e-14)
    bare = tl_linmap.linear_map(llama, llama.to_tokens("Golden Gate", prepend_bos=False), target="blocks.0.hook_resid_post")
    assert int(bare.tokens[0]) != bos
    torch.testing.assert_close(concept_vector(bare), _unit_sum(bare, 0), rtol=1e-12, atol=1e-14)  # "G" is the concept
    torch.testing.assert_close(concept_vector(bare, skip_first=True), _unit_sum(bare, 1), rtol=1e-12, atol=1e-14)
    singular = concept_vector(with_bos, how="singular", k=2)
    assert singular.norm() == pytest.approx(1.0)
    with pytest.raises(InputError, match="how must be"):
        concept_vector(with_bos, how="nope")
    with pytest.raises(InputError, match="skip_first must be True, False or 'auto'"):
        concept_vector(with_bos, skip_first="yes")


def test_steering_says_which_tokens_built_the_vector(llama):
    with_bos = tl_linmap.linear_map(llama, "Golden Gate", target="blocks.1.hook_resid_post")
    steering = steering_hooks(with_bos, layer=1, alpha=0.3)
    assert isinstance(steering, list) and len(steering) == 1 and steering[0][0] == "blocks.1.hook_resid_post"
    assert (steering.layer, steering.alpha) == (1, 0.3)
    assert steering.sources == list("Golden Gate")  # one token per byte
    assert steering.left_out == [llama.tokenizer.bos_token]
    torch.testing.assert_close(steering.vector, _unit_sum(with_bos, 1), rtol=1e-12, atol=1e-14)
    assert "'G', 'o', 'l'" in repr(steering) and "left out: '<bos>'" in repr(steering)
    bare = tl_linmap.linear_map(llama, llama.to_tokens("Golden Gate", prepend_bos=False), target="blocks.1.hook_resid_post")
    assert steering_hooks(bare, layer=1).left_out == [] and "left out: none" in repr(steering_hooks(bare, layer=1))
    early = tl_linmap.linear_map(llama, "Golden Gate", target="blocks.1.hook_resid_post", position=3)
    assert steering_hooks(early, layer=1, skip_first=False).sources == ["<bos>", "G", "o", "l"]
    assert steering_hooks(early, layer=1, skip_first=False).left_out == list("den Gate")


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
    with pytest.warns(DeprecationWarning, match="the model was unused"):
        old_form = steering_hooks(llama, maps, layer=0)
    torch.testing.assert_close(old_form.vector, steering_hooks(maps, layer=0).vector, rtol=0, atol=0)
    with pytest.raises(InputError, match="no 'blocks.1.hook_resid_post'"):
        steering_hooks(maps, layer=1)
    with pytest.raises(InputError, match="not a residual-stream vector"):
        steering_hooks(tl_linmap.linear_map(llama, "Golden", target="blocks.0.attn.hook_z"), layer=0)


@pytest.mark.parametrize("kv_cache", [False, True])
def test_steering_works_with_generate(llama, kv_cache):
    source = tl_linmap.linear_map(llama, "Golden Gate", target="blocks.1.hook_resid_post")
    kwargs = {"max_new_tokens": 6, "do_sample": False, "stop_at_eos": False, "use_past_kv_cache": kv_cache, "verbose": False,
              "return_type": "tokens"}
    plain = llama.generate(PROMPT, **kwargs)
    with llama.hooks(fwd_hooks=steering_hooks(source, layer=1, alpha=4.0)):
        steered = llama.generate(PROMPT, **kwargs)
    assert steered.shape == plain.shape
    assert not torch.equal(steered, plain)  # each generated step was steered, KV-cached or not
    assert hook_count(llama) == 0


def _operator_vectors(operators, embeddings):
    # v_p = sum over i <= p of J_{i mod n} x_i, one position at a time.
    n, total, vectors = len(operators), torch.zeros(operators.shape[1], dtype=operators.dtype), []
    for i, x in enumerate(embeddings):
        total = total + torch.einsum("ij,j->i", operators[i % n], x)
        vectors.append(total)
    return torch.stack(vectors)


def test_operator_vectors_cycle_the_source_operators_and_cumulate():
    ops = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    steering = OperatorSteering("blocks.0.hook_resid_post", 0, 1.0, ops, sources=["a", "b"], left_out=[])
    x = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]], dtype=torch.float64)
    # J_0 x_0 = (1, 0); J_1 x_1 = (0, 2); J_0 x_2 = (3, 0) (the source's first operator again), summed.
    expected = torch.tensor([[[1.0, 0.0], [1.0, 2.0], [4.0, 2.0]]], dtype=torch.float64)
    assert torch.equal(steering.vectors(x), expected)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_operator_steering_adds_the_source_operators_applied_to_the_new_embeddings(toy_models, family):
    model = toy_models[family]
    source = tl_linmap.linear_map(model, "Gate", target="blocks.1.hook_resid_post")
    steering = steering_hooks(source, layer=1, alpha=0.5, method="operator", skip_first=False)
    assert isinstance(steering, OperatorSteering) and [name for name, _ in steering][-1] == "blocks.1.hook_resid_post"
    assert steering.sources == source.sources and steering.left_out == []
    tokens = model.to_tokens(PROMPT)
    assert tokens.shape[1] > 2 * len(source.tokens)  # the source's operators are reused, more than once
    names = ("hook_embed", "blocks.1.hook_resid_post")
    _, plain = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    with model.hooks(fwd_hooks=steering):
        _, steered = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    r, s = plain["blocks.1.hook_resid_post"][0], steered["blocks.1.hook_resid_post"][0]
    v = _operator_vectors(source.operators, plain["hook_embed"][0])
    expected = r + 0.5 * r.norm(dim=-1, keepdim=True) * v / v.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(s, expected, rtol=1e-12, atol=1e-12 * float(r.abs().max()))
    torch.testing.assert_close((s - r).norm(dim=-1), 0.5 * r.norm(dim=-1), rtol=1e-12, atol=0)  # scaled to the residual norm
    assert hook_count(model) == 0


def test_operator_steering_keeps_the_tokens_skip_first_keeps_and_steers_chosen_positions(llama):
    source = tl_linmap.linear_map(llama, "Gate", target="blocks.1.hook_resid_post")
    steering = steering_hooks(source, layer=1, alpha=0.3, method="operator", positions=[3, 7])
    assert steering.sources == list("Gate") and steering.left_out == [llama.tokenizer.bos_token]  # "auto": the BOS
    assert "operators of 'G', 'a', 't', 'e', cycled; left out: '<bos>'" in repr(steering)
    tokens = llama.to_tokens(PROMPT)
    _, plain = llama.run_with_cache(tokens, names_filter=lambda n: n in ("hook_embed", "blocks.1.hook_resid_post"))
    with llama.hooks(fwd_hooks=steering):
        _, steered = llama.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    r, s = plain["blocks.1.hook_resid_post"][0], steered["blocks.1.hook_resid_post"][0]
    v = _operator_vectors(source.operators[1:], plain["hook_embed"][0])
    for pos in range(len(r)):
        expected = r[pos] + (0.3 * r[pos].norm() * v[pos] / v[pos].norm() if pos in (3, 7) else 0)
        torch.testing.assert_close(s[pos], expected, rtol=1e-12, atol=1e-12)


def test_operator_steering_at_alpha_zero_changes_nothing_and_leaves_the_model_as_it_was(llama):
    source = tl_linmap.linear_map(llama, "Gate", target="blocks.1.hook_resid_post")
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    tokens = llama.to_tokens(PROMPT)
    plain = llama(tokens)
    with llama.hooks(fwd_hooks=steering_hooks(source, layer=1, alpha=0.0, method="operator")):
        assert torch.equal(llama(tokens), plain)
    with llama.hooks(fwd_hooks=steering_hooks(source, layer=1, alpha=1.0, method="operator")):
        assert not torch.allclose(llama(tokens), plain)
        llama.generate(PROMPT, max_new_tokens=3, do_sample=False, verbose=False, use_past_kv_cache=True)
    after = llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert hook_count(llama) == 0 and torch.equal(llama(tokens), plain)


def _cache_models():
    # Models whose own KV-cached generation equals the uncached one (TransformerLens 4.3's bridge
    # cache is right for GPT-NeoX; the HookedTransformer's for every family).
    yield "pythia-bridge"
    if HOOKED:  # whose generate embeds without hook_embed: the hooks read block 0's residual
        yield from ("llama-hooked", "gpt2-hooked")


def _final_residuals(model, hooks, tokens, kv_cache: bool):
    # The last position's final normalized residual (the logits are affine in it) at every step.
    seen = []
    record = ("ln_final.hook_normalized", lambda x, hook=None: seen.append(x[0, -1].clone()))
    with model.hooks(fwd_hooks=[*hooks, record]):
        out = model.generate(tokens, max_new_tokens=5, do_sample=False, stop_at_eos=False, use_past_kv_cache=kv_cache,
                             verbose=False, return_type="tokens")
    return out, torch.stack(seen)


@pytest.mark.parametrize("kind", list(_cache_models()))
def test_operator_steering_is_the_same_with_and_without_the_kv_cache(toy_models, kind):
    if kind == "pythia-bridge":
        model = toy_models["pythia"]
    else:
        from tl_linmap.load.toy import hooked_toy_model

        model = hooked_toy_model(kind.split("-")[0])
    source = tl_linmap.linear_map(model, "Gate", target="blocks.1.hook_resid_post")
    tokens = model.to_tokens(PROMPT)
    plain_tokens, plain = _final_residuals(model, [], tokens, kv_cache=False)
    _, plain_cached = _final_residuals(model, [], tokens, kv_cache=True)
    torch.testing.assert_close(plain_cached, plain, rtol=1e-12, atol=1e-12)  # the model's own cache is right
    steering = steering_hooks(source, layer=1, alpha=2.0, method="operator")
    steered_tokens, steered = _final_residuals(model, steering, tokens, kv_cache=False)
    cached_tokens, cached = _final_residuals(model, steering, tokens, kv_cache=True)
    assert len(steered) == 5 and len(cached) == 5  # one forward call per new token either way
    assert (steered - plain).abs().max() > 1e-3  # steering moved every step's logits
    torch.testing.assert_close(cached, steered, rtol=1e-12, atol=1e-12)
    assert torch.equal(cached_tokens, steered_tokens)
    assert hook_count(model) == 0


def test_compare_methods_scores_the_fixed_continuation_both_ways(llama):
    source = tl_linmap.linear_map(llama, "Gate", target="blocks.1.hook_resid_post")
    concept = list("Gate")
    table = compare_methods(llama, {"gate": source}, PROMPT, " and so", layer=1, alphas=(0.0, 0.4), concept_tokens={"gate": concept},
                            progress=False)
    assert isinstance(table, Table) and table.columns() == ["concept", "alpha", "vector", "operator"]
    assert [(row.concept, row.alpha) for row in table] == [("gate", 0.0), ("gate", 0.4)]
    assert table[0].vector == 0.0 and table[0].operator == 0.0
    ids = [llama.tokenizer.convert_tokens_to_ids(c) for c in concept]
    text = torch.cat([llama.to_tokens(PROMPT), llama.to_tokens(" and so", prepend_bos=False)], dim=1)
    scored = slice(llama.to_tokens(PROMPT).shape[1] - 1, text.shape[1] - 1)
    embeddings = llama.run_with_cache(text, names_filter="hook_embed")[1]["hook_embed"][0]
    v = _operator_vectors(source.operators[1:], embeddings)  # the BOS left out ("auto")
    push = [("blocks.1.hook_resid_post", lambda r, hook=None: r + 0.4 * r.norm(dim=-1, keepdim=True) * v / v.norm(dim=-1, keepdim=True))]
    with torch.no_grad():
        before = llama(text)[0, scored].log_softmax(-1)[:, ids]
        with llama.hooks(fwd_hooks=push):
            after = llama(text)[0, scored].log_softmax(-1)[:, ids]
    assert table[1].operator == pytest.approx(float((after - before).mean()), rel=1e-9)
    assert table[1].operator != 0.0 and table[1].vector != 0.0


def test_alpha_sweep_takes_the_operator_method(llama):
    source = tl_linmap.linear_map(llama, "Gate", target="blocks.1.hook_resid_post")
    table = alpha_sweep(llama, source, PROMPT, layer=1, alphas=(0.0, 1.0), concept_tokens=list("Gate"), max_new_tokens=3,
                        method="operator")
    assert table[0].shift == 0.0 and table[1].shift != 0.0


def _greedy_by_hand(model, tokens, n: int):
    # Argmax one token at a time over the whole sequence (no generate(), no KV cache).
    for _ in range(n):
        token = model(tokens)[0, -1].argmax().view(1, 1)
        tokens = torch.cat([tokens, token], dim=1)
        if int(token) == model.tokenizer.eos_token_id:
            break
    return tokens


def test_alpha_sweep_scores_one_fixed_continuation_with_and_without_steering(llama):
    source = tl_linmap.linear_map(llama, "Golden Gate", target="blocks.1.hook_resid_post")
    concept = [llama.tokenizer.convert_tokens_to_ids(c) for c in "Gate"]
    table = alpha_sweep(llama, source, PROMPT, layer=1, alphas=(0.0, 0.7, 2.0), concept_tokens=list("Gate"), max_new_tokens=5)
    assert isinstance(table, Table) and table.columns() == ["alpha", "shift", "mentions", "text"]
    assert [row.alpha for row in table] == [0.0, 0.7, 2.0]
    assert table[0].shift == 0.0
    assert hook_count(llama) == 0

    prompt = llama.to_tokens(PROMPT)
    v = torch.einsum("pij,pj->i", source.operators[1:], source.inputs[1:])  # BOS left out
    v = v / v.norm()
    push = [("blocks.1.hook_resid_post", lambda r, hook=None: r + 0.7 * r.norm(dim=-1, keepdim=True) * v)]
    with torch.no_grad():
        plain = _greedy_by_hand(llama, prompt, 5)
        scored = slice(prompt.shape[1] - 1, plain.shape[1] - 1)
        before = llama(plain)[0, scored].log_softmax(-1)[:, concept]
        with llama.hooks(fwd_hooks=push):
            after = llama(plain)[0, scored].log_softmax(-1)[:, concept]
            steered = _greedy_by_hand(llama, prompt, 5)[0, prompt.shape[1]:]
    assert table[1].shift == pytest.approx(float((after - before).mean()), rel=1e-9)
    assert table[1].shift != 0.0
    assert table[1].text == llama.tokenizer.decode(steered)
    assert table[1].mentions == sum(int(t) in concept for t in steered)


def test_alpha_sweep_prints_each_continuation_whole(llama):
    source = tl_linmap.linear_map(llama, "Golden Gate", target="blocks.1.hook_resid_post")
    table = alpha_sweep(llama, source, PROMPT, layer=1, alphas=(0.0, 2.0), concept_tokens=list("Gate"), max_new_tokens=60)
    lines = str(table).splitlines()[2:]
    assert any(len(row.text) > 40 for row in table)  # longer than a cell may be
    for line, row in zip(lines, table):
        assert line.split(" | ")[-1] in (row.text, repr(row.text))


def test_word_tokens_keeps_single_token_spellings_of_content_words(llama):
    assert word_tokens(llama, "the Golden x") == ["x", "X"]  # bytes only: "Golden" is six tokens, "the" a function word
    source = tl_linmap.linear_map(llama, "Golden Gate", target="blocks.1.hook_resid_post")
    with pytest.raises(InputError, match="No concept token"):
        alpha_sweep(llama, source, PROMPT, layer=1, alphas=(0.0,), max_new_tokens=2)


@pytest.mark.slow
def test_golden_gate_steering_at_the_readme_alpha_raises_the_concept_on_smollm2():
    model = tl_linmap.load_model("smollm2")
    source = tl_linmap.linear_map(model, "The Golden Gate Bridge", target="blocks.15.hook_resid_post")
    steering = steering_hooks(source, layer=15, alpha=0.25)
    assert steering.sources == ["The", " Golden", " Gate", " Bridge"] and steering.left_out == []  # SmolLM2 prepends no BOS
    table = alpha_sweep(model, source, "My favourite thing to do on the weekend is", layer=15, alphas=(0.0, 0.1, 0.25),
                        concept_tokens=CONCEPT_WORDS)
    print(f"\n{table.to_string(cell_width=None)}")
    shifts = [row.shift for row in table]
    assert shifts[0] == 0.0 and 1.0 < shifts[1] < shifts[2]  # more than a nat on average, growing with alpha
    assert table[2].mentions > 0 and "bridge" in table[2].text.lower()


@pytest.mark.slow
def test_both_methods_raise_paris_on_a_fixed_continuation_on_smollm2():
    model = tl_linmap.load_model("smollm2")
    source = tl_linmap.linear_map(model, "The Eiffel Tower in Paris, France", target="blocks.15.hook_resid_post")
    table = compare_methods(model, {"Paris": source}, "My favourite thing to do on the weekend is",
                            " to go for a long walk with my friends.", layer=15, alphas=(0.0, 0.1),
                            concept_tokens={"Paris": word_tokens(model, "Paris France French Eiffel")})
    print(f"\n{table.to_string(cell_width=None)}")
    assert (table[0].vector, table[0].operator) == (0.0, 0.0)  # alpha 0 adds exactly nothing
    assert table[1].vector > 1.0 and table[1].operator > 0.5  # +5.6 and +2.7 nats on the README's longer text
