"""SAELens SAEs and transcoders on a HookedSAETransformer: exact against oracles written here.

Runs in the TransformerLens 2.18 + SAELens environment only (``.venv-tl2/bin/python -m pytest
tests/test_saelens.py``); tests/conftest.py does not collect it where ``sae_lens`` is missing.

Every SAE class SAELens 6.54 ships for inference is attached to tiny float64 GPT-2-like (LN,
GELU, learned positions) and Llama-like (RMS, gated SiLU, rotary) models, under the three error
conventions (``use_error_term=False``: "none"; ``True``: "live", and "constant" inside
``tl_linmap.spliced(model, error="constant")``). The oracles use none of tl_linmap's hooks or
rules: the model's factors (attention patterns, norm scales, the MLP's activation) and the SAE's
0/1 mask are detached by hooks written below, and autograd does the rest.

- Jacobian: ``tl_linmap.linear_map(model, tokens).operators`` against
  ``torch.autograd.functional.jacobian`` of ``ln_final.hook_normalized`` at the last position
  with respect to the token embeddings; "live" also equals the model without SAEs, "constant"
  and "none" do not.
- Feature contributions: each active feature's direct effect on a logit against
  ``A.grad * A`` with the SAE's activations ``A``, its error and the embeddings made leaves; the
  parts sum to the model's own logit.
- The model (and every attached SAE: tensors, dtypes, ``sae.dtype``, modes, hooks) comes back
  bit for bit, also after an error half-way.
- Settings no rule covers are refused, naming the SAE class and its hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from conftest import assert_maps_by_convention, hand_freeze_hooks, leaf_effects
from sae_lens import (
    AbsTopKSAE,
    AbsTopKSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    HookedSAETransformer,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    MatchingPursuitSAE,
    MatchingPursuitSAEConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TemporalSAE,
    TemporalSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from torch import Tensor
from transformer_lens import HookedTransformerConfig

import tl_linmap
from tl_linmap.base.errors import LinmapError
from tl_linmap.load.toy import toy_tokenizer

PROMPT = "The cat"  # 8 tokens with BOS
D_MODEL, D_SAE = 16, 24
TOL = 1e-10

#: Tiny HookedTransformerConfig settings: a GPT-2-like and a Llama-like model.
ARCHS = {
    "gpt2": dict(normalization_type="LN", act_fn="gelu_new", positional_embedding_type="standard"),
    "llama": dict(normalization_type="RMS", act_fn="silu", gated_mlp=True, positional_embedding_type="rotary", n_key_value_heads=2),
}

SAE_IN = "blocks.0.hook_resid_post"
MLP_OUT = "blocks.1.hook_mlp_out"
TC_IN = "blocks.1.ln2.hook_normalized"


@dataclass(frozen=True)
class Kind:
    """One SAELens class, where it reads and writes, and its config's extra settings."""

    sae: type
    config: type
    hook_in: str
    hook_out: str | None = None
    options: tuple = ()


#: Every SAELens inference class tl_linmap freezes: SAEs at a residual stream or an MLP output,
#: transcoders from block 1's MLP input to its output. (HookedSAETransformer's wrapper runs
#: ``decode(encode(x))``: a skip transcoder's ``W_skip`` path is not in the model; the oracle follows the model.)
KINDS = {
    "standard": Kind(StandardSAE, StandardSAEConfig, SAE_IN, options=(("apply_b_dec_to_input", True),)),
    "jumprelu": Kind(JumpReLUSAE, JumpReLUSAEConfig, SAE_IN, options=(("apply_b_dec_to_input", False),)),
    "topk": Kind(TopKSAE, TopKSAEConfig, MLP_OUT, options=(("k", 5), ("apply_b_dec_to_input", True))),
    "abstopk": Kind(AbsTopKSAE, AbsTopKSAEConfig, SAE_IN, options=(("k", 5), ("apply_b_dec_to_input", True))),
    "gated": Kind(GatedSAE, GatedSAEConfig, MLP_OUT, options=(("apply_b_dec_to_input", True),)),
    "transcoder": Kind(Transcoder, TranscoderConfig, TC_IN, MLP_OUT),
    "skip_transcoder": Kind(SkipTranscoder, SkipTranscoderConfig, TC_IN, MLP_OUT),
    "jumprelu_transcoder": Kind(JumpReLUTranscoder, JumpReLUTranscoderConfig, TC_IN, MLP_OUT),
    "jumprelu_skip_transcoder": Kind(JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, TC_IN, MLP_OUT),
}
#: Cases: one SAE each, and an SAE at block 0 with a transcoder at block 1 (two splices in one model).
CASES = {name: (name,) for name in KINDS} | {"sae+transcoder": ("jumprelu", "jumprelu_skip_transcoder")}
CONVENTIONS = ["none", "live", "constant"]


# --- Models and SAEs ------------------------------------------------------------------------------


def _model(arch: str) -> HookedSAETransformer:
    tokenizer = toy_tokenizer()
    cfg = HookedTransformerConfig(
        d_model=D_MODEL, n_layers=2, n_heads=4, d_head=D_MODEL // 4, d_mlp=32, n_ctx=16, d_vocab=len(tokenizer),
        dtype=torch.float64, seed=0, device="cpu", default_prepend_bos=True, **ARCHS[arch],
    )
    model = HookedSAETransformer(cfg, tokenizer=tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():  # TransformerLens starts biases at zero and norm weights at one
        for name, param in model.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if last == "w" or last.startswith("b"):
                param.add_(0.2 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, HookedSAETransformer]:
    return {arch: _model(arch) for arch in ARCHS}


@pytest.fixture(params=list(ARCHS))
def model(request, models) -> Iterator[HookedSAETransformer]:
    model = models[request.param]
    assert not model.acts_to_saes
    yield model
    model.reset_saes()  # whatever a failing test left attached


def _hook_input(model, tokens: Tensor, hook: str) -> Tensor:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    return cache[hook][0]


def make_sae(model, name: str, seed: int, dtype: torch.dtype = torch.float64):
    """A SAELens SAE of one kind with every parameter random, thresholds cut inside its pre-activations."""
    kind = KINDS[name]
    options = dict(kind.options)
    if kind.hook_out is not None:
        options.update(d_out=D_MODEL, apply_b_dec_to_input=False)
    cfg = kind.config(d_in=D_MODEL, d_sae=D_SAE, dtype=str(dtype).removeprefix("torch."), **options)
    cfg.metadata.hook_name = kind.hook_in
    if kind.hook_out is not None:
        cfg.metadata.hook_name_out = kind.hook_out
    sae = kind.sae(cfg)
    x = _hook_input(model, model.to_tokens(PROMPT), kind.hook_in).to(dtype)  # the bare model's input: thresholds' scale
    size = float(x.norm(dim=-1).mean())  # the input's typical norm
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) * std

    with torch.no_grad():
        for pname, param in sae.named_parameters():
            if pname == "W_enc":  # pre-activations of about unit size
                param.copy_(rand(*param.shape, std=1 / size))
            elif pname in ("W_dec", "W_skip"):
                param.copy_(rand(*param.shape, std=size / param.shape[0] ** 0.5))
            elif pname == "b_dec":
                param.copy_(rand(*param.shape, std=0.3 * size / D_MODEL**0.5))
            elif pname == "r_mag":
                param.copy_(rand(*param.shape, std=0.3))
            elif pname != "threshold":  # b_enc, b_gate, b_mag
                param.copy_(rand(*param.shape, std=0.5))
        if hasattr(sae, "threshold"):
            # Per feature, a threshold among its positive pre-activations on the prompt: some pass, some do not.
            b = sae.b_dec * cfg.apply_b_dec_to_input
            pre = (x - b) @ sae.W_enc + sae.b_enc
            u = torch.rand(D_SAE, generator=gen, dtype=torch.float64).to(dtype)
            sae.threshold.copy_(pre.clamp_min(0).max(0).values * u)
            sae.threshold[:3] = -0.1  # below zero: the ReLU still cuts
    return sae


@dataclass
class Attached:
    sae: object
    site: str  # where it writes
    kind: str
    use_error_term: bool

    @property
    def transcoder(self) -> bool:
        return self.site != self.sae.cfg.metadata.hook_name


@contextlib.contextmanager
def attached(model, case: str, convention: str, dtype: torch.dtype = torch.float64) -> Iterator[list[Attached]]:
    """The case's SAEs attached (``use_error_term`` by the convention), "constant" inside tl_linmap.spliced."""
    items = []
    for i, name in enumerate(CASES[case]):
        sae = make_sae(model, name, seed=10 * i + len(name), dtype=dtype)
        model.add_sae(sae, use_error_term=convention != "none")
        items.append(Attached(sae, KINDS[name].hook_out or KINDS[name].hook_in, name, convention != "none"))
    try:
        with tl_linmap.spliced(model, error="constant") if convention == "constant" else contextlib.nullcontext():
            yield items
    finally:
        model.reset_saes()


# --- The oracle's hooks ---------------------------------------------------------------------------


def _keep(live: dict, key: str) -> Callable:
    def hook(act, hook=None):
        live[key] = act

    return hook


@contextlib.contextmanager
def sae_hooks(model, items: list[Attached], convention: str, leaves: dict | None = None) -> Iterator[list]:
    """Each SAE's mask detached: ``acts_post = pre * mask.detach()``; a live error rebuilt at hook_sae_output.

    With ``leaves`` (site -> (A, E)), the activations are ``A`` and the output ``recons(A) + E`` instead.
    A transcoder's live input (its MLP's output) is read by a torch forward hook on ``blocks.L.mlp``.
    """
    hooks, handles = [], []
    for item in items:
        live: dict = {}
        site = item.site
        if leaves is not None:
            acts, error = leaves[site]
            hooks.append((f"{site}.hook_sae_acts_post", lambda act, hook=None, acts=acts: acts))
            if error is not None:
                hooks += [
                    (f"{site}.hook_sae_recons", _keep(live, "recons")),
                    (f"{site}.hook_sae_output", lambda out, hook=None, live=live, error=error: live.pop("recons") + error),
                ]
            continue

        def post(act, hook=None, live=live):
            pre = live.pop("pre")
            mask = (act != 0).to(act.dtype)
            out = pre * mask.detach()
            assert torch.equal(out, act)  # the same value: only its gradient changes
            return out

        hooks += [(f"{site}.hook_sae_acts_pre", _keep(live, "pre")), (f"{site}.hook_sae_acts_post", post)]
        if item.use_error_term and convention == "live":
            if item.transcoder:
                layer = int(site.split(".")[1])
                handles.append(model.blocks[layer].mlp.register_forward_hook(lambda mod, inp, out, live=live: live.__setitem__("orig", out)))
            else:
                hooks.append((f"{site}.hook_sae_input", _keep(live, "orig")))

            def output(out, hook=None, live=live):
                delta = live.pop("orig") - live.pop("recons")
                return out + (delta - delta.detach())  # value unchanged (exactly), gradient that of orig

            hooks += [(f"{site}.hook_sae_recons", _keep(live, "recons")), (f"{site}.hook_sae_output", output)]
    try:
        yield hooks
    finally:
        for handle in handles:
            handle.remove()


def _frozen_forward(model, tokens, items, convention, embed, grab: str | None = None, leaves=None):
    seen = {}
    extra = [(grab, _keep(seen, "y"))] if grab else []
    with sae_hooks(model, items, convention, leaves) as hooks:
        fwd = [("hook_embed", lambda act, hook=None: embed[None].reshape(act.shape)), *hand_freeze_hooks(model), *hooks, *extra]
        with model.hooks(fwd_hooks=fwd):
            logits = model(tokens)
    return (seen["y"] if grab else None), logits


def _embeddings(model, tokens) -> Tensor:
    return model.W_E.detach()[tokens[0]].clone()


def jacobian_oracle(model, tokens, items, convention) -> tuple[Tensor, Tensor]:
    """(operators (pos, d_out, d_in), output) of ``ln_final.hook_normalized`` at the last position."""
    x = _embeddings(model, tokens)

    def f(embed):
        y, _ = _frozen_forward(model, tokens, items, convention, embed, grab="ln_final.hook_normalized")
        return y[0, -1]

    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(f, x)  # (d_out, pos, d_in)
    return jac.permute(1, 0, 2), f(x).detach()


def _gap(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _activity(model, tokens, items) -> None:
    """Every SAE has a good share of features active, none all; a JumpReLU also cuts some positive ones."""
    names = [f"{i.site}.hook_sae_acts_{p}" for i in items for p in ("pre", "post")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    for item in items:
        pre, post = cache[f"{item.site}.hook_sae_acts_pre"][0], cache[f"{item.site}.hook_sae_acts_post"][0]
        share = float((post != 0).double().mean())
        if "topk" in item.kind:
            assert (post != 0).sum(-1).min() >= 2, item.kind
        else:
            assert 0.15 <= share <= 0.85, (item.kind, share)
        if hasattr(item.sae, "threshold"):
            cut = (pre > 0) & (pre <= item.sae.threshold)
            assert cut.sum() >= 5 and (post != 0).sum() >= 5, item.kind


# --- Jacobian --------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_operators_match_the_oracle(model, case, convention):
    tokens = model.to_tokens(PROMPT)
    with attached(model, case, convention) as items:
        _activity(model, tokens, items)
        lm = tl_linmap.linear_map(model, tokens, target="output")
        operators, output = jacobian_oracle(model, tokens, items, convention)
        with torch.no_grad():
            plain = model.run_with_cache(tokens, names_filter="ln_final.hook_normalized")[1]["ln_final.hook_normalized"][0, -1]
    assert lm.target == "ln_final.hook_normalized"
    assert lm.operators.shape == (tokens.shape[1], D_MODEL, D_MODEL)
    assert _gap(lm.operators, operators) <= TOL, f"J differs from the oracle by {_gap(lm.operators, operators):.1e}"
    assert _gap(lm.output, output) <= TOL and _gap(output, plain) <= TOL  # the oracle's hooks change no value
    assert lm.relative_error() <= 1e-12
    bare = tl_linmap.linear_map(model, tokens, target="output")  # the SAEs are gone (reset_saes)
    assert_maps_by_convention(lm, bare, convention, TOL)


def test_an_over_frozen_mask_fails_the_oracle(model, monkeypatch):
    """The oracle can fail: a rule that detaches the whole activation (not only its mask) gives other operators."""
    from tl_linmap.freeze import splices

    def over_frozen(method):
        # Its own hook (the mask recorded or applied), then the whole activation detached.
        def hooks(self, factors):
            return [(n, (lambda act, hook=None, fn=fn: fn(act, hook).detach()) if n.endswith("acts_post") else fn) for n, fn in method(self, factors)]

        return hooks

    tokens = model.to_tokens(PROMPT)
    with attached(model, "transcoder", "none") as items:  # the residual stream still carries the tokens past it
        operators, _ = jacobian_oracle(model, tokens, items, "none")
        for name in ("freeze", "replay"):
            monkeypatch.setattr(splices.SAELensSplice, name, over_frozen(getattr(splices.SAELensSplice, name)))
        lm = tl_linmap.linear_map(model, tokens, target="output", check=False)
    assert _gap(lm.operators, operators) > 1e-3


def test_the_oracle_tells_the_conventions_apart(model):
    """The live and constant conventions' oracles differ: a convention mixed up would fail the test above."""
    tokens = model.to_tokens(PROMPT)
    with attached(model, "transcoder", "live") as items:
        live, _ = jacobian_oracle(model, tokens, items, "live")
        constant, _ = jacobian_oracle(model, tokens, items, "constant")
    assert _gap(constant, live) > 1e-3


# --- Feature contributions -------------------------------------------------------------------------


def contributions_oracle(model, tokens, items, token: int) -> dict:
    """Direct effects on a logit: activations, errors and embeddings as leaves, everything else frozen here."""
    names = [f"{i.site}.hook_sae_{p}" for i in items for p in ("acts_post", "error")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    leaves = {
        i.site: (
            cache[f"{i.site}.hook_sae_acts_post"].clone().requires_grad_(True),
            cache[f"{i.site}.hook_sae_error"].clone().requires_grad_(True) if i.use_error_term else None,
        )
        for i in items
    }
    x = _embeddings(model, tokens).requires_grad_(True)
    with torch.enable_grad():
        _, logits = _frozen_forward(model, tokens, items, "constant", x, leaves=leaves)
        logit = logits[0, -1, token]
        out = leaf_effects(logit, x, leaves)
    return out


def _close(a: Tensor, b: Tensor, scale: float) -> bool:
    return bool((a - b).abs().max() <= TOL * max(scale, 1.0))


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_feature_contributions_match_the_oracle(model, case, convention):
    tokens = model.to_tokens(PROMPT)
    token = 57
    with attached(model, case, convention) as items:
        with torch.no_grad():
            plain_logit = model(tokens)[0, -1, token]
        fc = tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(token))
        oracle = contributions_oracle(model, tokens, items, token)
    assert fc.convention == convention
    assert set(fc.sites) == {i.site for i in items}
    scale = float(oracle["logit"].abs()) + max(float((oracle["maps"][s] * oracle["acts"][s]).abs().max()) for s in oracle["acts"])
    for s, site in enumerate(fc.sites):
        acts, maps = oracle["acts"][site], oracle["maps"][site]
        mine = fc.features[fc.features[:, 0] == s]
        expected = acts.nonzero()
        assert sorted(map(tuple, mine[:, 1:].tolist())) == sorted(map(tuple, expected.tolist())), f"{site}: active features"
        assert len(expected) > 0
        pos, fid = mine[:, 1], mine[:, 2]
        rows = fc.features[:, 0] == s
        assert torch.equal(fc.activations[rows], acts[pos, fid])
        assert _close(fc.values[rows, 0], maps[pos, fid] * acts[pos, fid], scale), f"{site}: feature contributions"
        assert _close(fc.maps[rows, 0], maps[pos, fid], scale), f"{site}: feature maps"
        if site in oracle["errors"]:
            assert fc.has_error[s]
            assert _close(fc.errors[s, :, 0], oracle["errors"][site], scale), f"{site}: error contributions"
        else:
            assert not fc.has_error[s] and not fc.errors[s].any()
    assert _close(fc.tokens[:, 0], oracle["tokens"], scale)
    assert _close(fc.constant, oracle["constant"][None], scale)
    assert _close(fc.total(), plain_logit[None], scale), f"parts sum to {float(fc.total()):.6g}, the model's logit is {float(plain_logit):.6g}"
    assert _close(fc.output, plain_logit[None], scale)


def test_the_constant_convention_by_keyword(model):
    """``feature_contributions(..., error="constant")`` names the convention for the model's own SAEs; same direct effects."""
    tokens = model.to_tokens(PROMPT)
    with attached(model, "sae+transcoder", "live"):
        live = tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(57))
        constant = tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(57), error="constant")
    assert (live.convention, constant.convention) == ("live", "constant")
    assert torch.equal(live.features, constant.features)
    assert _close(live.values, constant.values, float(live.values.abs().max()))
    assert _close(live.total(), constant.total(), float(live.output.abs()))


# --- The model comes back bit for bit --------------------------------------------------------------


def _modules(model) -> dict[str, torch.nn.Module]:
    found = dict(model.named_modules(remove_duplicate=False))
    for hook, sae in model.acts_to_saes.items():
        found.update({f"sae[{hook}].{n}": m for n, m in sae.named_modules(remove_duplicate=False)})
    return found


def _tensors(model) -> dict[str, Tensor]:
    named = {f"state.{k}": v for k, v in model.state_dict(keep_vars=True).items()}
    named.update({f"param.{k}": v for k, v in model.named_parameters(remove_duplicate=False)})
    named.update({f"buffer.{k}": v for k, v in model.named_buffers(remove_duplicate=False)})
    for hook, sae in model.acts_to_saes.items():
        named.update({f"sae[{hook}].state.{k}": v for k, v in sae.state_dict(keep_vars=True).items()})
        named.update({f"sae[{hook}].param.{k}": v for k, v in sae.named_parameters(remove_duplicate=False)})
        named.update({f"sae[{hook}].buffer.{k}": v for k, v in sae.named_buffers(remove_duplicate=False)})
    return named


def _snapshot(model) -> dict:
    tensors = _tensors(model)
    modules = _modules(model)
    return {
        "values": {k: v.detach().clone() for k, v in tensors.items()},
        "objects": {k: id(v) for k, v in tensors.items()},
        "dtypes": {k: v.dtype for k, v in tensors.items()},
        "flags": {k: v.requires_grad for k, v in tensors.items()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in tensors.items() if isinstance(v, torch.nn.Parameter)},
        "training": {k: m.training for k, m in modules.items()},
        "torch_hooks": {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
            for k, m in modules.items()
        },
        "hook_points": {k: (id(h), len(h.fwd_hooks), len(h.bwd_hooks)) for k, h in model.hook_dict.items()},
        "sae_hook_points": {
            f"{hook}.{k}": (id(h), len(h.fwd_hooks), len(h.bwd_hooks)) for hook, sae in model.acts_to_saes.items() for k, h in sae.hook_dict.items()
        },
        "saes": {hook: (id(sae), sae.dtype, sae.cfg.dtype, sae.device, sae.use_error_term) for hook, sae in model.acts_to_saes.items()},
        "wrappers": {hook: (id(w), w.use_error_term, w.exclude_special_tokens) for hook, w in model._acts_to_saes.items()},
        "transcoders": dict(model._transcoder_output_hooks),
        "cfg_dtype": model.cfg.dtype,
    }


def _assert_same(model, before: dict) -> None:
    after = _snapshot(model)
    assert after["values"].keys() == before["values"].keys()
    changed = sorted(k for k, v in before["values"].items() if not torch.equal(after["values"][k], v))
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"
    for key in ("objects", "dtypes", "flags", "training", "torch_hooks", "hook_points", "sae_hook_points", "saes", "wrappers", "transcoders", "cfg_dtype"):
        assert after[key] == before[key], key
    for k, grad in before["grads"].items():
        assert (grad is None) == (after["grads"][k] is None) and (grad is None or torch.equal(after["grads"][k], grad)), k


def _user_state(model) -> dict:
    """Training mode, mixed requires_grad flags, gradients: on the model and on its SAEs."""
    model.train()
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 2 == 0)
    params[0].grad = torch.randn_like(params[0])
    for sae in model.acts_to_saes.values():
        sae.train()
        sae.W_dec.requires_grad_(False)
        sae.W_enc.grad = torch.ones_like(sae.W_enc)
    return _snapshot(model)


@dataclass(frozen=True, eq=False)
class Exploding(tl_linmap.Logit):
    """A readout that fails once the model is borrowed (its weights are asked inside the frozen system)."""

    def weights(self, reader, d_out):
        raise RuntimeError("exploding readout")


def _mixed(model) -> None:
    """A float32 SAE at block 0 and a float64 skip transcoder at block 1, with error terms."""
    model.add_sae(make_sae(model, "jumprelu", seed=3, dtype=torch.float32), use_error_term=True)
    model.add_sae(make_sae(model, "jumprelu_skip_transcoder", seed=4), use_error_term=True)


def test_model_and_saes_come_back_bit_for_bit(model, monkeypatch):
    tokens = model.to_tokens(PROMPT)
    try:
        _mixed(model)
        before = _user_state(model)
        assert before["saes"][SAE_IN][1] == torch.float32
        lm = tl_linmap.linear_map(model, tokens)
        assert lm.operators.dtype == torch.float64
        _assert_same(model, before)
        tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(57))
        _assert_same(model, before)
        with tl_linmap.spliced(model, error="constant"):
            tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(57), modules=True)
            tl_linmap.linear_map(model, tokens)
        _assert_same(model, before)
        with contextlib.suppress(LinmapError):  # a narrowing working dtype may miss the exactness check
            tl_linmap.linear_map(model, tokens, dtype=torch.float32)
        _assert_same(model, before)
        with pytest.raises(RuntimeError, match="exploding readout"):
            tl_linmap.feature_contributions(model, tokens, target=Exploding(57))
        _assert_same(model, before)
        with pytest.raises(RuntimeError, match="exploding readout"):
            tl_linmap.linear_map(model, tokens, target=Exploding(57))
        _assert_same(model, before)

        def fail(*args, **kwargs):
            assert model.acts_to_saes[SAE_IN].dtype == torch.float64  # it failed inside the borrow
            raise RuntimeError("simulated failure")

        monkeypatch.setattr("tl_linmap.linear.features.node_effects", fail)
        with pytest.raises(RuntimeError, match="simulated failure"), tl_linmap.spliced(model, error="constant"):
            tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(57))
        _assert_same(model, before)
        from tl_linmap.freeze.splicing import convention, splices_of

        assert convention(model) == "live" and len(splices_of(model)) == 2  # no convention or splice left behind
    finally:
        model.reset_saes()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None


# --- Refusals ------------------------------------------------------------------------------------


def _cfg(config, **options):
    cfg = config(d_in=D_MODEL, d_sae=D_SAE, dtype="float64", **options)
    cfg.metadata.hook_name = SAE_IN
    return cfg


def _temporal():
    return TemporalSAE(_cfg(TemporalSAEConfig, n_heads=2, bottleneck_factor=1, kval_topk=4))


def _matching_pursuit():
    return MatchingPursuitSAE(_cfg(MatchingPursuitSAEConfig))


def _layer_norm():
    return StandardSAE(_cfg(StandardSAEConfig, normalize_activations="layer_norm"))


def _rescaled_topk():
    return TopKSAE(_cfg(TopKSAEConfig, k=4, rescale_acts_by_decoder_norm=True))


def _standard():
    return StandardSAE(_cfg(StandardSAEConfig))


#: SAE, attach options, the class named in the message, and a phrase of the reason.
REFUSED = {
    "exclude_special_tokens": (_standard, dict(exclude_special_tokens=True), "StandardSAE", "special tokens"),
    "layer_norm": (_layer_norm, {}, "StandardSAE", "normalize_activations"),
    "rescaled_topk": (_rescaled_topk, {}, "TopKSAE", "rescale_acts_by_decoder_norm"),
    "temporal": (_temporal, {}, "TemporalSAE", "attend"),
    "matching_pursuit": (_matching_pursuit, {}, "MatchingPursuitSAE", "greedily"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_saes_are_refused(model, case):
    make, options, name, reason = REFUSED[case]
    tokens = model.to_tokens(PROMPT)
    try:
        model.add_sae(make(), **options)
        before = _snapshot(model)
        for call in (
            lambda: tl_linmap.linear_map(model, tokens),
            lambda: tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(57)),
        ):
            with pytest.raises(tl_linmap.UnsupportedArchitectureError) as refusal:
                call()
            message = str(refusal.value)
            assert name in message and SAE_IN in message and reason in message, message
            _assert_same(model, before)
    finally:
        model.reset_saes()


def test_a_transcoder_with_error_term_must_write_an_mlp_output(model):
    """A live or constant error is rebuilt from the MLP's output: another output hook is refused, named."""
    cfg = TranscoderConfig(d_in=D_MODEL, d_sae=D_SAE, d_out=D_MODEL, dtype="float64", apply_b_dec_to_input=False)
    cfg.metadata.hook_name, cfg.metadata.hook_name_out = "blocks.0.hook_resid_pre", "blocks.0.hook_attn_out"
    try:
        model.add_sae(Transcoder(cfg), use_error_term=True)
        with pytest.raises(tl_linmap.UnsupportedArchitectureError, match="Transcoder.*blocks.0.hook_resid_pre.*hook_mlp_out"):
            tl_linmap.linear_map(model, model.to_tokens(PROMPT))
    finally:
        model.reset_saes()


# --- The same SAE handed to tl_linmap directly -----------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("name", ["standard", "jumprelu", "topk", "abstopk", "gated", "transcoder", "jumprelu_transcoder"])
def test_a_saelens_sae_handed_to_spliced_is_the_attached_one(model, name, convention):
    """``tl_linmap.spliced(model, [sae])`` on the bare model (no SAELens wrapper: tl_linmap's own splice of the
    SAE's weights) maps as the HookedSAETransformer with the SAE attached, under every convention, and splits
    a logit into the same features. (Skip transcoders differ on purpose: SAELens' wrapper drops ``W_skip``.)"""
    tokens = model.to_tokens(PROMPT)
    readout = tl_linmap.Logit(9)
    with attached(model, name, convention) as (item,):
        lm = tl_linmap.linear_map(model, tokens, target="output")
        split = tl_linmap.feature_contributions(model, tokens, target=readout)
    assert not model.acts_to_saes
    with tl_linmap.spliced(model, [item.sae], error=convention):
        ours = tl_linmap.linear_map(model, tokens, target="output")
        our_split = tl_linmap.feature_contributions(model, tokens, target=readout)
    assert _gap(ours.operators, lm.operators) <= TOL and _gap(ours.bias, lm.bias) <= TOL
    assert torch.equal(our_split.features, split.features)
    assert (our_split.values - split.values).abs().max() <= TOL and (our_split.errors - split.errors).abs().max() <= TOL


def test_attribution_patching_reads_through_an_sae_in_place_of_a_hook_point(model):
    """SAELens puts its wrapper where blocks.1.hook_mlp_out was: the layouts read its output hook point. With a
    live error the model is the bare model's, so every predicted patch is too."""
    clean, corrupted = model.to_tokens(PROMPT), model.to_tokens("The dog")
    bare = tl_linmap.attribution_patching(model, clean, corrupted, (9, 10), layouts=["mlp_out", "resid_pre"])
    with attached(model, "topk", "live"):
        assert "blocks.1.hook_mlp_out" not in model.hook_dict
        spliced = tl_linmap.attribution_patching(model, clean, corrupted, (9, 10), layouts=["mlp_out", "resid_pre"])
    for layout in ("mlp_out", "resid_pre"):
        assert (spliced[layout] - bare[layout]).abs().max() <= TOL
