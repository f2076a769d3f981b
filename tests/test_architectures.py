"""Every architecture beyond the first six: exact against the independent oracle of `test_oracle`.

Each family is a tiny random-weight Hugging Face model booted as a TransformerBridge
(`tl_linmap.toy.MORE_FAMILIES`), with biases and norm weights perturbed where it has them. The
oracle freezes what `test_oracle.ORACLE_FREEZES` says by hand for the architecture; tl_linmap's
rules come from the model's structure. They must agree on the final output and on every
layer's residual stream, attention output and MLP output.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT
from test_experts import MOE_FAMILIES
from test_oracle import ORACLE_FREEZES, assert_matches_oracle, target_oracle

import tl_linmap
from tl_linmap.base.compat import get_act_name
from tl_linmap.base.errors import UnsupportedArchitectureError
from tl_linmap.base.guard import hook_count
from tl_linmap.freeze.architectures import SUPPORTED, rules_for
from tl_linmap.freeze.rules import Rebuild
from tl_linmap.load.toy import MORE_FAMILIES, toy_model

# Mixtures of experts have their own oracle (router, shared experts, the experts' act_fn) in test_experts.
MAPPED = sorted(f for f, (_, arch, _) in MORE_FAMILIES.items() if arch in SUPPORTED and f not in MOE_FAMILIES)
REFUSED = sorted(f for f, (_, arch, _) in MORE_FAMILIES.items() if arch not in SUPPORTED)


def _targets(model) -> list[str]:
    per_layer = [get_act_name(act, layer) for layer in range(model.cfg.n_layers) for act in ("resid_post", "attn_out", "mlp_out")]
    return ["output", *per_layer]


@pytest.fixture(scope="module", params=MAPPED)
def family_model(request):
    return request.param, toy_model(request.param)


def test_every_toy_family_is_mapped_or_refused():
    assert sorted(MAPPED + MOE_FAMILIES + REFUSED) == sorted(MORE_FAMILIES)


def test_every_target_matches_the_oracle(family_model):
    family, model = family_model
    assert model.cfg.architecture in ORACLE_FREEZES, f"write the oracle's freeze for {family} by hand"
    maps = tl_linmap.linear_maps(model, PROMPT, _targets(model))
    for target in maps:
        assert_matches_oracle(maps[target], model)


def test_float32_is_close_to_the_float64_oracle(family_model):
    family, _ = family_model
    model = toy_model(family)  # its own: borrowing in float32 rounds the weights for good
    lm = tl_linmap.linear_map(model, PROMPT, dtype=torch.float32)
    assert_matches_oracle(lm, model, rtol=1e-4)


def test_windows_and_columns_agree_with_rows(family_model):
    """The columns route cuts the prompt to windows (or, where a factor cannot be cut, replays it
    whole with the other inputs zero): both must give the rows route's operators."""
    _, model = family_model
    prompt = "The cat sat"  # short: a column costs a forward of every row (Falcon's bridge is slow per row)
    rows = tl_linmap.linear_map(model, prompt, route="rows")
    columns = tl_linmap.linear_map(model, prompt, route="columns")
    assert ((rows.operators - columns.operators).norm() / rows.operators.norm()).item() < 1e-12


@pytest.mark.parametrize("family", REFUSED)
def test_refused_architectures_say_why(family):
    model = toy_model(family)
    with pytest.raises(UnsupportedArchitectureError, match=model.cfg.architecture):
        tl_linmap.linear_map(model, PROMPT)


def test_gemma2_logit_readouts_are_before_the_final_softcap():
    """The final softcap acts after the unembedding: the readout gives ``z``, the model ``c·tanh(z/c)``."""
    model = toy_model("gemma2")
    cap = model.original_model.config.final_logit_softcapping
    lm = tl_linmap.linear_map(model, PROMPT)
    z = lm.readout.logits(lm.output, affine=True)
    logits = model(model.to_tokens(PROMPT))[0, -1].detach()
    assert ((cap * torch.tanh(z / cap) - logits).norm() / logits.norm()).item() < 1e-6  # the plain forward's norms run in float32
    assert not torch.allclose(z, logits, rtol=1e-3)


def test_olmo_weightless_norms_are_rebuilt_and_the_model_comes_back():
    """OLMo's weightless LayerNorms are frozen at their output; its plain forward runs them in float32."""
    model = toy_model("olmo")
    norms = [name for rule in rules_for(model) if isinstance(rule, Rebuild) for name in rule.hook_names()]
    assert sorted(norms) == sorted(n for n in model.hook_dict if n.endswith("hook_scale"))
    tokens = model.to_tokens(PROMPT)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_count(model)
    lm = tl_linmap.linear_map(model, PROMPT, target="blocks.1.hook_resid_post")
    with torch.no_grad(), tl_linmap.frozen(model):
        frozen_logits = model(tokens)[0, -1]
    logits = model(tokens)[0, -1].detach()
    assert ((frozen_logits - logits).norm() / logits.norm()).item() < 1e-6  # OlmoLayerNorm upcasts to float32
    # The readout's frozen ln_final against the oracle's own final norm output, unembedded.
    oracle = target_oracle(model, tokens, "ln_final.hook_out", tokens.shape[1] - 1).output
    expected = oracle @ model.W_U.detach()
    read = lm.readout.logits(lm.output, affine=True)
    assert ((read - expected).norm() / expected.norm()).item() < 1e-12
    assert hook_count(model) == hooks and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_norm_wrapped_without_hook_scale_is_frozen_only_if_rms():
    """MLA's query latent RMS norm has no hook_scale: frozen as a ratio at its component's hook_in/hook_out.
    (Its queries end in the frozen pattern, so that factor leaves J as it is; a LayerNorm there is refused all the same.)"""
    model = toy_model("youtu")
    ratios = [rule for rule in tl_linmap.rules.rules_for(model) if rule.kind == "norm (ratio)"]
    assert [pair for rule in ratios for pair in rule.hook_names()] == [
        (f"blocks.{layer}.attn.q_a_layernorm.hook_in", f"blocks.{layer}.attn.q_a_layernorm.hook_out") for layer in range(model.cfg.n_layers)
    ]
    model = toy_model("youtu")  # a fresh one: the rules of a model are cached
    width = model.original_model.config.q_lora_rank
    for block in model.blocks:  # centring is not a pointwise scaling: no ratio freezes a LayerNorm's scale
        block.attn.q_a_layernorm.set_original_component(torch.nn.LayerNorm(width, dtype=torch.float64))
    with pytest.raises(UnsupportedArchitectureError, match=r"q_a_layernorm \(LayerNorm\) is a normalisation the bridge wraps"):
        tl_linmap.linear_map(model, PROMPT)


class _Squash(torch.nn.Module):
    """A user's module in the model: a nonlinearity no freeze rule knows."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        return y + 0.5 * torch.tanh(y)


@pytest.mark.parametrize("call", ["linear_map", "token_contributions", "feature_contributions"])
def test_an_exactness_failure_names_the_module_no_rule_knows(call):
    """Where a check fails beside a module of no package tl_linmap knows, the error names it and its hook
    (not "the weights were processed"), whichever call checked."""
    from tl_linmap.load.toy import toy_model

    model = toy_model("llama")
    out = model.blocks[1].mlp.out
    out.add_module("_original_component", _Squash(out._original_component))
    match = r"_Squash \(from test_architectures\) at 'blocks\.1\.mlp\.out\._original_component', hook 'blocks\.1\.mlp\.out\.hook_out'"
    with pytest.raises(tl_linmap.FreezeError, match=match):
        if call == "feature_contributions":
            d = model.cfg.d_model
            sae = tl_linmap.Dictionary(torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64),
                                       torch.zeros(d, dtype=torch.float64), hook_in="blocks.0.hook_resid_post")
            tl_linmap.feature_contributions(model, "The cat", target=tl_linmap.Logit(5), dictionaries=[sae])
        else:
            getattr(tl_linmap, call)(model, "The cat")


def test_a_model_of_known_modules_has_no_foreign_one(toy_models):
    from tl_linmap.freeze.architectures import foreign_modules

    assert all(foreign_modules(m) == [] for m in toy_models.values())
