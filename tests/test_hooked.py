"""HookedTransformer (TransformerLens 2.x/3.x): the same entry points, exact against an independent oracle.

Collected only where the installed TransformerLens has a HookedTransformer (tests/conftest.py);
CI runs this file in its TransformerLens 2.18 and 3.9 environments.
"""

import contextlib

import pytest
import torch
from conftest import PROMPT

import tl_linmap
from tl_linmap.freeze import architectures as rules
from tl_linmap.base.compat import get_act_name
from tl_linmap.base.guard import hook_count
from tl_linmap.freeze.rules import Detach
from tl_linmap.load.toy import HOOKED_FAMILIES, hooked_toy_model

FAMILIES = sorted(HOOKED_FAMILIES)


@pytest.fixture(scope="module")
def hooked():
    return {family: hooked_toy_model(family) for family in FAMILIES}


# --- The oracle: freeze hooks written here from the model's own hook points, not from tl_linmap's rules.


def _oracle_hooks(model):
    """Detach every norm scale and attention pattern; the MLP's gate, or its activation as a frozen ratio."""
    cfg, hooks, live = model.cfg, [], {}
    for name in model.hook_dict:
        if name.endswith("hook_scale") or name.endswith("attn.hook_pattern"):
            hooks.append((name, lambda act, hook=None: act.detach()))
    if cfg.attn_only:
        return hooks
    for layer in range(cfg.n_layers):
        if cfg.gated_mlp:
            hooks.append((f"blocks.{layer}.mlp.hook_pre", lambda act, hook=None: act.detach()))
            continue
        after = "hook_mid" if cfg.act_fn == "solu_ln" else "hook_post"

        def keep(act, hook=None, layer=layer):
            live[layer] = act

        def ratio(post, hook=None, layer=layer):
            pre = live.pop(layer)
            frozen = torch.where(pre == 0, torch.zeros_like(pre), post / torch.where(pre == 0, torch.ones_like(pre), pre))
            return post.detach() + (pre - pre.detach()) * frozen.detach()

        hooks += [(f"blocks.{layer}.mlp.hook_pre", keep), (f"blocks.{layer}.mlp.{after}", ratio)]
    return hooks


def _oracle(model, tokens, target, position, source="hook_embed"):
    """J and b of ``target`` at ``position`` (from ``source``) by torch.autograd.functional.jacobian under the oracle's hooks."""
    cfg = model.cfg
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=source)
    x = cache[source][0].double()

    def f(embeddings):
        out = {}

        def grab(act, hook=None):
            out["y"] = act[0, position].flatten()

        hooks = [(source, lambda act, hook=None: embeddings[None])] + _oracle_hooks(model) + [(target, grab)]
        with model.hooks(fwd_hooks=hooks):
            model(tokens)
        return out["y"]

    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(f, x)  # (d_out, pos, d_in)
        y = f(x)
    operators = jac.permute(1, 0, 2)
    bias = y - torch.einsum("poi,pi->o", operators, x)
    assert cfg.dtype == torch.float64
    return operators, bias.detach(), y.detach()


def _gap(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", ["output", "blocks.0.hook_resid_post", "blocks.1.hook_attn_out"])
def test_maps_match_the_oracle(hooked, family, target):
    model = hooked[family]
    lm = tl_linmap.linear_map(model, PROMPT, target=target)
    operators, bias, y = _oracle(model, lm.tokens[None], lm.target, lm.position)
    assert _gap(lm.operators, operators) < 1e-12
    assert float((lm.bias - bias).norm() / y.norm()) < 1e-12
    assert torch.equal(lm.output, y)  # same values: freezing changes none
    assert lm.relative_error() < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_every_module_map_is_exact_and_parts_add_up(hooked, family):
    model = hooked[family]
    maps = tl_linmap.layer_maps(model, PROMPT, modules=True)
    assert max(lm.relative_error() for lm in maps.values()) < 1e-12
    last = model.cfg.n_layers - 1
    parts = ["blocks.0.hook_resid_pre"] + [
        f"blocks.{layer}.hook_{module}_out" for layer in range(last + 1)
        for module in (("attn",) if model.cfg.attn_only else ("attn", "mlp"))
    ]
    total = sum(maps[name].output for name in parts)
    final = maps[f"blocks.{last}.hook_resid_post"].output
    assert torch.allclose(total, final, rtol=0, atol=1e-12 * float(final.norm()))
    heads = maps.heads(1)
    assert len(heads) == model.cfg.n_heads


def test_an_over_frozen_rule_set_fails_the_oracle(hooked, monkeypatch):
    model = hooked["llama"]
    real = rules.hooked_rules
    values = tuple(get_act_name("v", layer) for layer in range(model.cfg.n_layers))
    monkeypatch.setattr(rules, "hooked_rules", lambda cfg: real(cfg) + (Detach(values),))
    lm = tl_linmap.linear_map(model, PROMPT, check=False)
    operators, _, _ = _oracle(model, lm.tokens[None], lm.target, lm.position)
    assert _gap(lm.operators, operators) > 1e-3


def test_output_readout_gives_the_models_logits(hooked):
    """RMSNorm's hook_normalized is before the weight: the readout applies it, and the logits are the model's."""
    for family in ("llama", "gpt2"):
        model = hooked[family]
        lm = tl_linmap.linear_map(model, PROMPT)
        logits = model(lm.tokens[None])[0, -1]
        read = lm.readout.logits(lm.output, affine=True)
        assert torch.allclose(read, logits, rtol=0, atol=1e-10 * float(logits.abs().max()))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_token_attribution_sums_to_the_models_logit(hooked, family):
    model = hooked[family]
    maps = tl_linmap.layer_maps(model, PROMPT, modules=True)
    logits = model(maps["blocks.0.hook_resid_pre"].tokens[None])[0, -1]
    token = int(logits.argmax())
    att = tl_linmap.token_attribution(model, maps, token)
    assert att.logit == pytest.approx(float(logits[token]), abs=1e-10 * float(logits.abs().max()))
    assert att.total() == pytest.approx(att.logit, abs=1e-12 * abs(att.logit))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_maps_from_a_source_and_logit_difference_targets(hooked, family):
    """source=, LogitDiff targets and sequence attributions on a HookedTransformer (output hook before the norm's weight)."""
    model = hooked[family]
    source = "blocks.1.hook_resid_pre"
    lm = tl_linmap.linear_map(model, PROMPT, source=source)
    operators, bias, y = _oracle(model, lm.tokens[None], lm.target, lm.position, source)
    assert _gap(lm.operators, operators) < 1e-12 and float((lm.bias - bias).norm() / y.norm()) < 1e-12
    logits = model(lm.tokens[None])[0]
    scale = float(logits.abs().max())
    diff = tl_linmap.LogitDiff(3, 4)
    scalar = tl_linmap.linear_map(model, PROMPT, target=diff)
    assert float(scalar.output[0]) == pytest.approx(float(logits[-1, 3] - logits[-1, 4]), abs=1e-12 * scale)
    att = tl_linmap.token_attribution(model, tl_linmap.layer_maps(model, PROMPT, modules=True), diff)
    assert att.total() == pytest.approx(float(logits[-1, 3] - logits[-1, 4]), abs=1e-12 * scale)
    sequence = tl_linmap.sequence_attribution(model, PROMPT, target=diff)
    assert torch.allclose(sequence.total(), logits[:, 3] - logits[:, 4], rtol=0, atol=1e-12 * scale)


def test_contributions_matrix_free_and_steering(hooked):
    model = hooked["llama"]
    dense = tl_linmap.linear_map(model, PROMPT)
    fast = tl_linmap.token_contributions(model, PROMPT)
    assert torch.allclose(fast.contributions(), dense.contributions(), rtol=0, atol=1e-12 * float(dense.output.norm()))
    with tl_linmap.matrix_free(model, PROMPT) as mf:
        top = mf.svd(-1, k=3)
    assert torch.allclose(top.values[0], torch.linalg.svdvals(dense.operators[-1])[:3], rtol=1e-8, atol=0)
    source = tl_linmap.linear_map(model, "Golden", target="blocks.1.hook_resid_post")
    with model.hooks(fwd_hooks=tl_linmap.steering_hooks(source, layer=1, alpha=2.0)):
        steered = model(dense.tokens[None])
    assert not torch.allclose(steered, model(dense.tokens[None]))
    assert hook_count(model) == 0


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "alibi"])
def test_a_padded_batch_with_its_mask_matches_the_oracle(hooked, family, side):
    """A token batch padded on either side: each prompt's map is the oracle's of that prompt alone."""
    model = hooked[family]
    rows = [model.to_tokens(PROMPT)[0], model.to_tokens("Hi")[0], torch.tensor([5, 6, 7])]
    longest = max(len(row) for row in rows)
    tokens = torch.full((len(rows), longest), 3, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        where = slice(0, len(row)) if side == "right" else slice(longest - len(row), longest)
        tokens[i, where], mask[i, where] = row, 1
    maps = tl_linmap.linear_map(model, tokens, attention_mask=mask, route="rows")
    contributions = tl_linmap.token_contributions(model, tokens, attention_mask=mask)
    for row, lm, c in zip(rows, maps, contributions):
        assert torch.equal(lm.tokens, row)  # the padding is gone
        operators, bias, y = _oracle(model, row[None], lm.target, lm.position)
        assert _gap(lm.operators, operators) < 1e-12
        assert float((lm.bias - bias).norm() / y.norm()) < 1e-12
        assert float((c.values.sum(0) + c.bias - y).norm() / y.norm()) < 1e-12


DEFAULTS = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
REFACTOR = dict(DEFAULTS, refactor_factored_attn_matrices=True)  # TransformerLens refuses it with rotary positions


@pytest.mark.parametrize(("family", "processing"), [("gpt2", DEFAULTS), ("llama", DEFAULTS), ("gpt2", REFACTOR)])
def test_processed_weights_stay_exact(family, processing):
    """from_pretrained's defaults (and refactor_factored_attn_matrices): exact against the processed model itself."""
    model = hooked_toy_model(family, seed=1)
    state = model.state_dict()
    processed = hooked_toy_model(family, seed=1, normalization_type={"LN": "LNPre", "RMS": "RMSPre"}[model.cfg.normalization_type])
    processed.load_and_process_state_dict(state, **processing)
    lm = tl_linmap.linear_map(processed, PROMPT)
    operators, bias, y = _oracle(processed, lm.tokens[None], lm.target, lm.position)
    assert _gap(lm.operators, operators) < 1e-12 and lm.relative_error() < 1e-12
    logits = processed(lm.tokens[None])[0, -1]
    assert torch.allclose(lm.readout.logits(lm.output, affine=True), logits, rtol=0, atol=1e-10 * float(logits.abs().max()))


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: v.dtype for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        model.cfg.dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_comes_back_bit_for_bit_with_a_users_hook(dtype):
    model = hooked_toy_model("llama")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.rand_like(param) * 1e-9)  # off the float32 grid
    model.train()
    fired = []
    model.blocks[0].hook_resid_post.add_hook(lambda act, hook: fired.append(1))
    before = _snapshot(model)
    with contextlib.suppress(tl_linmap.LinmapError):
        tl_linmap.linear_map(model, PROMPT, dtype=dtype)
    after = _snapshot(model)
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert after[1:] == before[1:]
    assert hook_count(model) == 1 and fired
    count = len(fired)
    model(model.to_tokens("x"))
    assert len(fired) == count + 1  # the user's hook still fires


def test_split_qkv_input_with_grouped_keys_is_refused_by_name():
    model = hooked_toy_model("llama", n_layers=1)
    model.set_use_split_qkv_input(True)
    with pytest.raises(tl_linmap.UnsupportedArchitectureError, match="use_split_qkv_input with grouped keys"):
        tl_linmap.linear_map(model, PROMPT)


def test_mixture_of_experts_is_refused_by_name():
    with pytest.raises(tl_linmap.UnsupportedArchitectureError, match="num_experts=4"):
        rules.hooked_rules(hooked_toy_model("llama").cfg.__class__(
            d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32, n_ctx=16, d_vocab=10, act_fn="silu",
            normalization_type="RMS", gated_mlp=True, num_experts=4, experts_per_token=2,
        ))


def test_a_non_model_is_refused_with_the_supported_classes():
    with pytest.raises(tl_linmap.InputError, match="HookedTransformer .*TransformerBridge.*supports >=2.16,<5"):
        tl_linmap.linear_map(torch.nn.Linear(2, 2), PROMPT)


@pytest.mark.slow
def test_a_real_model_as_a_hooked_transformer():
    """SmolLM2 (not in TransformerLens's name list), converted by TransformerLens's own functions, offline."""
    model = tl_linmap.load_model("smollm2", kind="hooked")
    assert type(model).__name__ == "HookedTransformer"
    lm = tl_linmap.linear_map(model, "The capital of France is")
    assert lm.relative_error() < 1e-12
    logits = model(lm.tokens[None])[0, -1].double()
    read = lm.readout.logits(lm.output, affine=True)
    assert float((read - logits).norm() / logits.norm()) < 1e-5  # the model runs in float32, the map in float64
    assert model.tokenizer.decode([int(read.argmax())]) == " Paris"


@pytest.mark.parametrize("act_fn", ["relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "solu"])
def test_every_pointwise_activation_matches_the_oracle(act_fn):
    model = hooked_toy_model("gpt2", act_fn=act_fn, n_layers=1)
    lm = tl_linmap.linear_map(model, PROMPT)
    operators, bias, y = _oracle(model, lm.tokens[None], lm.target, lm.position)
    assert _gap(lm.operators, operators) < 1e-12 and float((lm.bias - bias).norm() / y.norm()) < 1e-12


@pytest.mark.parametrize(
    ("family", "flag"),
    [("llama", "set_use_attn_result"), ("gpt2", "set_use_split_qkv_input"), ("gpt2", "set_use_attn_in"),
     ("llama", "set_use_hook_mlp_in")],
)
def test_attention_flags_keep_the_map_exact(family, flag):
    model = hooked_toy_model(family, n_layers=1)
    plain = tl_linmap.linear_map(model, PROMPT)
    getattr(model, flag)(True)
    lm = tl_linmap.linear_map(model, PROMPT)
    operators, _, _ = _oracle(model, lm.tokens[None], lm.target, lm.position)
    assert _gap(lm.operators, operators) < 1e-12 and _gap(lm.operators, plain.operators) < 1e-12


def test_reading_tools_plots_report_and_generation(hooked, tmp_path):
    """Decoding, ranks, the nonlinearity gap, the plots, the report and steered generation on a HookedTransformer."""
    import matplotlib

    matplotlib.use("Agg")
    from tl_linmap.present import plotting
    from tl_linmap.app.report import report_html

    model = hooked["gpt2"]
    maps = tl_linmap.layer_maps(model, PROMPT)
    lm = tl_linmap.linear_map(model, PROMPT)
    assert len(lm.decode(k=2, top=3, sources=-1)) == 2
    values = torch.linalg.svdvals(lm.operators[-1])
    assert lm.dimensionality()[-2].norm == pytest.approx(float(values.norm()))
    assert all(row.detached_error < 1e-12 < row.plain_error for row in tl_linmap.nonlinearity_gap(model, PROMPT))
    for figure in (plotting.plot_spectra(maps), plotting.plot_contribution_heatmap(maps), plotting.plot_decoded(maps)):
        assert figure.axes
    page = report_html(model, PROMPT, layers=[0, 1])
    assert "exact" in page and page.count("<img") >= 4
    from tl_linmap.app.demo import demo_report

    assert "relative reconstruction error  float64:" in demo_report(model, PROMPT)
    source = tl_linmap.linear_map(model, "Golden", target="blocks.1.hook_resid_post")
    with model.hooks(fwd_hooks=tl_linmap.steering_hooks(source, layer=1, alpha=4.0)):
        steered = model.generate(PROMPT, max_new_tokens=4, do_sample=False, verbose=False, use_past_kv_cache=True)
    plain = model.generate(PROMPT, max_new_tokens=4, do_sample=False, verbose=False, use_past_kv_cache=True)
    assert steered != plain and hook_count(model) == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_float32_model_maps_in_float64_one_block_cast_at_a_time(family):
    """No second copy: each block in float64 only while a pass without graph runs through it; the map is exact."""
    from tl_linmap.base.guard import borrowed
    from tl_linmap.freeze.capture import run_to_target

    model = hooked_toy_model(family, dtype=torch.float32)
    seen = {}

    def look(layer):
        return lambda act, hook: seen.__setitem__(layer, [{p.dtype for p in b.parameters()} for b in model.blocks])

    n = model.cfg.n_layers
    with borrowed(model, torch.float64), torch.no_grad():
        run_to_target(model, model.to_tokens(PROMPT), f"blocks.{n - 1}.hook_resid_post", [(f"blocks.{i}.hook_attn_out", look(i)) for i in range(n)])
    for layer in range(n):
        assert seen[layer] == [{torch.float64} if i == layer else {torch.float32} for i in range(n)]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    contributions = tl_linmap.token_contributions(model, PROMPT)
    assert contributions.relative_error() < 1e-12
    assert tl_linmap.linear_map(model, PROMPT).relative_error() < 1e-12
