"""Freeze hooks: bit-identical forwards, linear gradients, composable with user hooks."""

import pytest
import torch
from conftest import PROMPT

import tl_linmap
from tl_linmap.freeze import hooks as freezing
from tl_linmap.freeze.capture import run_to_target
from tl_linmap.base.errors import FreezeError, UnsupportedArchitectureError
from tl_linmap.base.guard import borrowed, hook_count
from tl_linmap.freeze.hooks import freeze_hooks, replay_hooks, same_path_hooks
from tl_linmap.freeze import architectures as rules


def _cache(model, tokens, hooks):
    with freezing.quiet_norm_edits(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(tokens)
    return cache


def test_frozen_forward_is_bit_identical_everywhere(model):
    """Every cached activation of the frozen forward equals the same-path forward's bits."""
    tokens = model.to_tokens(PROMPT)
    reference = _cache(model, tokens, same_path_hooks(model))
    frozen = _cache(model, tokens, freeze_hooks(model))
    assert reference.keys() == frozen.keys()
    for name in reference.keys():
        assert torch.equal(reference[name], frozen[name]), name


def test_native_forward_gap_is_rounding_only(model):
    """The native path (HF norms in float32) differs from the true-float64 one by rounding only."""
    tokens = model.to_tokens(PROMPT)
    native = model(tokens)
    with freezing.quiet_norm_edits(), model.hooks(fwd_hooks=same_path_hooks(model)):
        reference = model(tokens)
    assert (native - reference).norm() <= 1e-5 * reference.norm()


def test_every_factor_hook_fires_and_is_recorded(model):
    factors = {}
    with tl_linmap.frozen(model, factors=factors):
        model(model.to_tokens(PROMPT))
    # Written from the model's hook points, not from the rule table: every norm scale, every pattern.
    expected = {n for n in model.hook_dict if n.endswith("hook_scale") or n.endswith("attn.hook_pattern")}
    gated = bool(getattr(model.cfg, "gated_mlp", False))
    expected |= {f"blocks.{layer}.mlp.{'hook_pre' if gated else 'hook_post'}" for layer in range(model.cfg.n_layers)}
    assert set(factors) == expected
    assert all(not f.requires_grad for f in factors.values())


def test_factors_are_keyed_by_the_registered_alias(toy_models):
    """`mlp.hook_pre` is an alias of `mlp.gate.hook_out` on gated bridges: keep our name."""
    model = toy_models["llama"]
    factors = {}
    with tl_linmap.frozen(model, factors=factors):
        model(model.to_tokens(PROMPT))
    assert "blocks.0.mlp.hook_pre" in factors
    assert "blocks.0.mlp.gate.hook_out" not in factors


def test_frozen_model_is_affine_in_the_embeddings(model):
    """Replaying the factors gives F with F(a u + b v) - F(0) = a (F(u) - F(0)) + b (F(v) - F(0))."""
    tokens = model.to_tokens(PROMPT)
    factors = {}
    with borrowed(model, None):
        x = run_to_target(model, tokens, "hook_embed")
        run_to_target(model, tokens, "ln_final.hook_out", freeze_hooks(model, factors=factors), stop=False)
        u, v = torch.randn_like(x), torch.randn_like(x)
        batch = torch.cat([torch.zeros_like(x), u, v, 2 * u - 3 * v, x])
        out = run_to_target(model, tokens.expand(5, -1), "ln_final.hook_out", replay_hooks(model, factors), batch)
        reference = run_to_target(model, tokens, "ln_final.hook_out", same_path_hooks(model))
    f0, fu, fv, fuv, fx = out
    assert torch.allclose(fuv - f0, 2 * (fu - f0) - 3 * (fv - f0), rtol=0, atol=1e-12 * fu.norm())
    assert torch.allclose(fx, reference[0], rtol=0, atol=1e-12 * fx.norm())  # the replay passes through y


def test_user_hooks_compose_with_freeze_hooks(toy_models):
    model = toy_models["gpt2"]
    tokens = model.to_tokens(PROMPT)
    seen = {}

    def mine(act, hook):
        seen["requires_grad"] = act.requires_grad
        seen["pattern"] = act

    with torch.enable_grad(), tl_linmap.frozen(model), model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", mine)]):
        model(tokens)
    assert seen["requires_grad"] is False  # the user's hook runs after ours and sees the frozen pattern
    assert hook_count(model) == 0


def test_frozen_removes_its_hooks_on_error(toy_models):
    model = toy_models["llama"]
    with pytest.raises(RuntimeError, match="boom"):
        with tl_linmap.frozen(model):
            assert hook_count(model) > 0
            raise RuntimeError("boom")
    assert hook_count(model) == 0


def test_unsupported_architecture_is_named():
    """A block with a part no rule covers (FalconMamba's state-space block) is refused, naming it."""
    from tl_linmap.load.toy import toy_model

    model = toy_model("FalconMambaForCausalLM")
    with pytest.raises(UnsupportedArchitectureError, match=r"FalconMambaForCausalLM: blocks\.0 \(SSMBlockBridge.*state-space"):
        freeze_hooks(model)
    with pytest.raises(UnsupportedArchitectureError):
        tl_linmap.linear_map(model, PROMPT)


def test_a_norm_without_rule_is_refused(toy_models, monkeypatch):
    model = toy_models["gemma3"]
    real = rules.bridge_rules
    without_post_norms = lambda m: tuple(r for r in real(m) if "blocks.0.ln2_post.hook_scale" not in getattr(r, "names", ()))  # noqa: E731
    monkeypatch.setattr(rules, "bridge_rules", without_post_norms)
    with pytest.raises(UnsupportedArchitectureError, match="ln2_post.hook_scale"):
        freeze_hooks(model)


def test_a_silently_ignored_freeze_is_caught(toy_models, monkeypatch):
    """If edits at hook_scale were ignored (an old TransformerLens bug), linear_map must fail loudly."""
    model = toy_models["llama"]
    real_detach, real_replace = freezing._detach_fn, freezing._replace_fn

    def ignored_at_scale(fn):
        def observe_only(act, hook=None):
            edited = fn(act, hook)  # records the factor, but the returned edit is dropped
            return None if hook.name.endswith("hook_scale") else edited

        return observe_only

    monkeypatch.setattr(freezing, "_detach_fn", lambda name, factors: ignored_at_scale(real_detach(name, factors)))
    monkeypatch.setattr(freezing, "_replace_fn", lambda factor: ignored_at_scale(real_replace(factor)))
    for route in ("rows", "columns"):
        with pytest.raises(FreezeError, match="misses the model's output"):
            tl_linmap.linear_map(model, PROMPT, route=route)


def test_a_freeze_hook_that_never_fires_is_caught(toy_models, monkeypatch):
    """A factor the frozen pass never delivered means some rule had no effect: refuse."""
    model = toy_models["llama"]
    real = freezing._detach_fn

    def skip_one(name, factors):
        return (lambda act, hook=None: None) if name == "blocks.1.attn.hook_pattern" else real(name, factors)

    monkeypatch.setattr(freezing, "_detach_fn", skip_one)
    with pytest.raises(FreezeError, match="never ran at .'blocks.1.attn.hook_pattern'"):
        tl_linmap.linear_map(model, PROMPT)
