"""tl_linmap's own `Dictionary` spliced into tiny models: exact against oracles written here.

Each activation tl_linmap freezes (ReLU, JumpReLU, TopK, AbsTopK, gated; a signed JumpReLU; a
skip transcoder from block 0's MLP input to its output), under each error convention ("live",
"constant", "none"), spliced with `tl_linmap.spliced` into float64 toy models (TransformerBridges
where TransformerLens has them, HookedTransformers where it has those; d_model 16, 2 layers,
8 tokens). The oracles use none of tl_linmap's hooks or rules: the dictionary is implemented by
hooks written below (its mask detached), the model's factors (attention patterns, norm scales,
the MLP's activation) are detached by hooks written below, and autograd does the rest.

- Jacobian: ``tl_linmap.linear_map(...).operators`` against ``torch.autograd.functional.jacobian``
  of the output at the last position; "live" also equals the model without dictionaries,
  "constant" and "none" do not; an over-frozen splice fails the oracle.
- Feature contributions: each active feature's direct effect on a logit against ``A.grad * A``
  with the activations ``A``, error terms and embeddings made leaves; the parts sum to the
  spliced model's own logit.
- The model comes back bit for bit, and bad input raises `tl_linmap.InputError` saying what to pass.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import pytest
import torch
from conftest import (
    BRIDGE,
    HOOKED,
    assert_maps_by_convention,
    hand_freeze_hooks,
    leaf_effects,
)
from torch import Tensor

import tl_linmap
from tl_linmap.base.errors import LinmapError
from tl_linmap.base.guard import hook_count

PROMPT = "The cat"  # 8 tokens with BOS
D_MODEL, D_SAE = 16, 24
TOL = 1e-10
SIZES = dict(d_model=D_MODEL, d_mlp=32, n_heads=4)
_NORM_EDIT_WARNING = "A forward hook edited hook_scale"  # a bridge's note when a hook returns a new scale


def _bridge(family: str, dtype=torch.float64):
    from tl_linmap.load.toy import toy_model

    return toy_model(family, dtype=dtype, **SIZES)


def _hooked(family: str, dtype=torch.float64):
    from tl_linmap.load.toy import hooked_toy_model

    return hooked_toy_model(family, dtype=dtype, **SIZES)


#: The model classes the installed TransformerLens has, each in a GPT-2-like and a Llama-like family.
BUILDERS: dict[str, Callable] = {}
if BRIDGE:
    BUILDERS |= {f"bridge-{f}": (lambda f=f, **kw: _bridge(f, **kw)) for f in ("gpt2", "llama")}
if HOOKED:
    BUILDERS |= {f"hooked-{f}": (lambda f=f, **kw: _hooked(f, **kw)) for f in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture(params=list(BUILDERS))
def model(request, models):
    model = models[request.param]
    yield model
    assert hook_count(model) == 0, "a hook was left on the model"


def _mlp_input(model, layer: int) -> str:
    # What the MLP reads: a bridge's ln2.hook_out; a HookedTransformer's ln2.hook_normalized.
    for name in (f"blocks.{layer}.ln2.hook_out", f"blocks.{layer}.ln2.hook_normalized"):
        if name in model.hook_dict:
            return name
    raise AssertionError("no MLP input hook")


# --- Dictionaries ----------------------------------------------------------------------------------

#: kind -> (activation, hook_in (None: the MLP's input), hook_out, options). Sites vary: the residual
#: stream, an attention output, an MLP output; transcoders from an MLP's input to its output.
KINDS = {
    "relu": ("relu", "blocks.0.hook_resid_post", None, dict(apply_b_dec_to_input=True)),
    "jumprelu": ("jumprelu", "blocks.1.hook_mlp_out", None, {}),
    "topk": ("topk", "blocks.0.hook_resid_post", None, dict(k=5)),
    "abstopk": ("abstopk", "blocks.1.hook_attn_out", None, dict(k=5, apply_b_dec_to_input=True)),
    "gated": ("gated", "blocks.0.hook_resid_post", None, dict(apply_b_dec_to_input=True)),
    "skip_transcoder": ("relu", 0, "blocks.0.hook_mlp_out", dict(skip=True)),
    "signed_jumprelu_transcoder": ("jumprelu", 1, "blocks.1.hook_mlp_out", dict(skip=True, signed=True)),
}
#: Cases: one dictionary each, and two in one model (an SAE at block 0, a transcoder at block 1).
CASES = {name: (name,) for name in KINDS} | {"sae+transcoder": ("gated", "signed_jumprelu_transcoder")}
CONVENTIONS = ["live", "constant", "none"]


def _input(model, tokens, hook: str) -> Tensor:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    return cache[hook][0].double()


def make_dictionary(model, kind: str, seed: int) -> tl_linmap.Dictionary:
    """A random dictionary of one kind: every weight random, thresholds cut inside its pre-activations."""
    activation, hook_in, hook_out, options = KINDS[kind]
    options = dict(options)
    if isinstance(hook_in, int):
        hook_in = _mlp_input(model, hook_in)
    x = _input(model, model.to_tokens(PROMPT), hook_in)  # the bare model's input: the weights' scale
    size = float(x.norm(dim=-1).mean())
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    w = dict(
        W_enc=rand(D_MODEL, D_SAE, std=1 / size),
        b_enc=rand(D_SAE, std=0.5),
        W_dec=rand(D_SAE, D_MODEL, std=size / D_SAE**0.5),
        b_dec=rand(D_MODEL, std=0.3 * size / D_MODEL**0.5),
    )
    if options.pop("skip", False):
        w["W_skip"] = rand(D_MODEL, D_MODEL, std=size / D_MODEL**0.5)
    if activation == "gated":
        w.update(b_gate=rand(D_SAE, std=0.5), r_mag=rand(D_SAE, std=0.3), b_mag=rand(D_SAE, std=0.5))
    if activation == "jumprelu":
        pre = x @ w["W_enc"] + w["b_enc"]
        signed = options.get("signed", False)
        top = (pre.abs() if signed else pre.clamp_min(0)).max(0).values
        w["threshold"] = top * torch.rand(D_SAE, generator=gen, dtype=torch.float64) * (0.5 if signed else 1)
        w["threshold"][:3] = -0.1  # below zero: an unsigned JumpReLU's ReLU still cuts; a signed one keeps some negatives
    return tl_linmap.Dictionary(**w, hook_in=hook_in, hook_out=hook_out, activation=activation, **options)


def dictionaries(model, case: str) -> list[tl_linmap.Dictionary]:
    return [make_dictionary(model, kind, seed=7 * i + len(kind)) for i, kind in enumerate(CASES[case])]


# --- The oracle's hooks -----------------------------------------------------------------------------


def oracle_acts(d: tl_linmap.Dictionary, x: Tensor) -> Tensor:
    """The dictionary's activations ``pre * mask`` with the mask detached, written from its definition."""
    xin = x - d.b_dec if d.apply_b_dec_to_input else x
    if d.activation == "gated":
        pre = xin @ (d.W_enc * torch.exp(d.r_mag)) + d.b_mag
        on = (xin @ d.W_enc + d.b_gate > 0) & (pre > 0)
    else:
        pre = xin @ d.W_enc + d.b_enc
        sign_ok = torch.ones_like(pre, dtype=torch.bool) if d.signed else pre > 0
        if d.activation == "relu":
            on = pre > 0
        elif d.activation == "jumprelu":
            on = (pre > d.threshold) & sign_ok
        else:
            scores = pre.abs() if d.activation == "abstopk" else pre
            chosen = torch.zeros_like(pre, dtype=torch.bool)
            chosen.scatter_(-1, torch.topk(scores, d.k, dim=-1).indices, True)
            on = chosen if d.activation == "abstopk" else chosen & sign_ok
    return pre * on.to(pre.dtype).detach()


def _decode(d: tl_linmap.Dictionary, acts: Tensor, x: Tensor) -> Tensor:
    out = acts @ d.W_dec + d.b_dec
    return out if d.W_skip is None else out + x @ d.W_skip.T


def dictionary_hooks(d: tl_linmap.Dictionary, convention: str, record: dict | None = None, leaves=None) -> list:
    """The dictionary spliced in by hooks written here: ``x̂ + e`` at its hook_out by the convention.

    ``record`` gets each site's activations and error value; with ``leaves`` (A, E) the output is
    ``A W_dec + b_dec (+ x W_skip^T) + E`` instead (E None: no error term).
    """
    live = {}
    transcoder = d.hook_in != d.hook_out

    def take(act, hook=None):
        live["x"] = act

    def write(act, hook=None):
        x = live.pop("x") if transcoder else act
        if leaves is not None:
            acts, error = leaves
            out = _decode(d, acts, x)
            return out if error is None else out + error
        recons = _decode(d, oracle_acts(d, x), x)
        if record is not None:
            record[d.hook_out] = (oracle_acts(d, x).detach(), (act - recons).detach())
        if convention == "none":
            return recons
        e = act - recons
        return recons + (e if convention == "live" else e.detach())

    return ([(d.hook_in, take)] if transcoder else []) + [(d.hook_out, write)]


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NORM_EDIT_WARNING)
        yield


def _oracle_forward(model, tokens, dicts, convention, embed, grab=None, record=None, leaves=None):
    """The model under the oracle's hooks (values unchanged), ``embed`` at hook_embed; (grabbed act, logits)."""
    seen = {}
    hooks = [("hook_embed", lambda act, hook=None: embed[None].reshape(act.shape)), *hand_freeze_hooks(model)]
    for d in dicts:
        hooks += dictionary_hooks(d, convention, record, None if leaves is None else leaves[d.hook_out])
    if grab:
        hooks.append((grab, lambda act, hook=None: seen.__setitem__("y", act)))
    with _quiet(), model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
    return seen.get("y"), logits


def _embeddings(model, tokens) -> Tensor:
    with _quiet(), model.hooks(fwd_hooks=hand_freeze_hooks(model)):
        _, cache = model.run_with_cache(tokens, names_filter="hook_embed")
    return cache["hook_embed"][0].detach().clone()


def jacobian_oracle(model, tokens, dicts, convention, target: str) -> tuple[Tensor, Tensor]:
    """(operators (pos, d_out, d_in), output) of ``target`` at the last position."""
    x = _embeddings(model, tokens)

    def f(embed):
        return _oracle_forward(model, tokens, dicts, convention, embed, grab=target)[0][0, -1]

    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(f, x)  # (d_out, pos, d_in)
    return jac.permute(1, 0, 2), f(x).detach()


def _gap(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _activity(model, tokens, dicts) -> None:
    """A good share of features active, none all; a JumpReLU's threshold also cuts some."""
    record = {}
    with torch.no_grad():
        _oracle_forward(model, tokens, dicts, "live", _embeddings(model, tokens), record=record)
    for d in dicts:
        on = record[d.hook_out][0] != 0
        if "topk" in d.activation:
            assert on.sum(-1).min() >= 2, d.name
        else:
            assert 0.15 <= float(on.double().mean()) <= 0.85, (d.name, float(on.double().mean()))


# --- Jacobian ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_operators_match_the_oracle(model, case, convention):
    tokens = model.to_tokens(PROMPT)
    dicts = dictionaries(model, case)
    _activity(model, tokens, dicts)
    with tl_linmap.spliced(model, dicts, error=convention):
        lm = tl_linmap.linear_map(model, tokens)
    operators, output = jacobian_oracle(model, tokens, dicts, convention, lm.target)
    assert lm.operators.shape == (tokens.shape[1], D_MODEL, D_MODEL)
    assert _gap(lm.operators, operators) <= TOL, f"J differs from the oracle by {_gap(lm.operators, operators):.1e}"
    assert _gap(lm.output, output) <= TOL
    assert lm.relative_error() <= 1e-12
    bare = tl_linmap.linear_map(model, tokens)
    assert_maps_by_convention(lm, bare, convention, TOL)


def test_an_over_frozen_splice_fails_the_oracle(model, monkeypatch):
    """The oracle can fail: a splice whose output is detached whole (features and error) gives other operators."""
    from tl_linmap.freeze import splices

    def over_frozen(method):
        def hooks(self, *args):
            out = method(self, *args)
            name, write = out[-1]
            return [*out[:-1], (name, lambda act, hook=None, write=write: write(act, hook).detach())]

        return hooks

    tokens = model.to_tokens(PROMPT)
    dicts = dictionaries(model, "skip_transcoder")  # the residual stream still carries the tokens past it
    operators, _ = jacobian_oracle(model, tokens, dicts, "none", tl_linmap.linear_map(model, tokens).target)
    for name in ("freeze", "replay"):
        monkeypatch.setattr(splices.DictionarySplice, name, over_frozen(getattr(splices.DictionarySplice, name)))
    with tl_linmap.spliced(model, dicts, error="none"):
        lm = tl_linmap.linear_map(model, tokens, check=False)
    assert _gap(lm.operators, operators) > 1e-3


def test_the_same_dictionary_as_keyword_or_context(model):
    """``linear_map`` inside `spliced` and ``feature_contributions(dictionaries=...)`` see the same splice."""
    tokens = model.to_tokens(PROMPT)
    dicts = dictionaries(model, "sae+transcoder")
    first = tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(57), dictionaries=dicts, error="constant")
    with tl_linmap.spliced(model, dicts, error="constant"):
        second = tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(57))
    assert first.convention == second.convention == "constant"
    assert torch.equal(first.features, second.features) and torch.equal(first.values, second.values)


# --- Feature contributions ---------------------------------------------------------------------------


def contributions_oracle(model, tokens, dicts, convention, token: int) -> dict:
    """Direct effects on a logit: activations, errors and embeddings as leaves, everything else frozen here."""
    x0 = _embeddings(model, tokens)
    record = {}
    with torch.no_grad():
        _, logits = _oracle_forward(model, tokens, dicts, convention, x0, record=record)
    leaves = {
        site: (acts.clone().requires_grad_(True), None if convention == "none" else error.clone().requires_grad_(True))
        for site, (acts, error) in record.items()
    }
    x = x0.clone().requires_grad_(True)
    with torch.enable_grad():
        _, logits_leaf = _oracle_forward(model, tokens, dicts, convention, x, leaves=leaves)
        logit = logits_leaf[0, -1, token]
        out = leaf_effects(logit, x, leaves)
    assert torch.allclose(logit, logits[0, -1, token], rtol=0, atol=1e-12)  # the leaves hold the forward's values
    return out


def _close(a: Tensor, b: Tensor, scale: float, tol: float = TOL) -> bool:
    return bool((a - b).abs().max() <= tol * max(scale, 1.0))


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_feature_contributions_match_the_oracle(model, case, convention):
    tokens = model.to_tokens(PROMPT)
    token = 57
    dicts = dictionaries(model, case)
    fc = tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(token), dictionaries=dicts, error=convention)
    with torch.no_grad(), tl_linmap.spliced(model, dicts, error=convention):
        plain = model(tokens)[0, -1, token]
    oracle = contributions_oracle(model, tokens, dicts, convention, token)
    assert fc.convention == convention
    assert fc.sites == tuple(d.hook_out for d in dicts)
    scale = float(oracle["logit"].abs()) + max(float((oracle["maps"][s] * oracle["acts"][s]).abs().max()) for s in oracle["acts"])
    for s, site in enumerate(fc.sites):
        acts, maps = oracle["acts"][site], oracle["maps"][site]
        rows = fc.features[:, 0] == s
        pos, fid = fc.features[rows, 1], fc.features[rows, 2]
        expected = acts.nonzero()
        assert len(expected) > 0
        assert sorted(zip(pos.tolist(), fid.tolist())) == sorted(map(tuple, expected.tolist())), f"{site}: active features"
        assert _close(fc.activations[rows], acts[pos, fid], scale), f"{site}: activations"
        assert _close(fc.values[rows, 0], maps[pos, fid] * acts[pos, fid], scale), f"{site}: feature contributions"
        assert _close(fc.maps[rows, 0], maps[pos, fid], scale), f"{site}: feature maps"
        if convention == "none":
            assert not fc.has_error[s] and not fc.errors[s].any()
        else:
            assert fc.has_error[s]
            assert _close(fc.errors[s, :, 0], oracle["errors"][site], scale), f"{site}: error contributions"
    assert _close(fc.tokens[:, 0], oracle["tokens"], scale)
    assert _close(fc.constant, oracle["constant"][None], scale)
    assert _close(fc.total(), oracle["logit"][None], scale)
    # The spliced model's own plain forward: a bridge runs Hugging Face's RMSNorm in float32, so there
    # the plain logit is the float64 one (just above) up to that rounding; elsewhere it is the same.
    native = 1e-5 if model.cfg.normalization_type == "RMS" and hasattr(model, "original_model") else TOL
    assert _close(fc.total(), plain[None], scale, native), f"parts sum to {float(fc.total()):.12g}, the model's logit is {float(plain):.12g}"


@pytest.mark.parametrize("case", ["relu", "skip_transcoder"])
def test_a_small_target_with_large_cancelling_parts_is_not_refused(model, case):
    """A target near zero (here 1e-6 of its direction's scale, as a logit difference of two close logits
    may be) whose parts are large and cancel: float64 sums them to ~1e-16 of the parts' size, not of
    the target's. The split is as exact as float64 allows, so no FreezeError may be raised."""
    tokens = model.to_tokens(PROMPT)
    dicts = dictionaries(model, case)
    target = tl_linmap.linear_map(model, tokens).target
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=target)  # the bare model: live keeps its value
    y = cache[target][0, -1]
    u = torch.randn(y.shape[0], generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    delta = 1e-6 * float(u.norm() * y.norm())
    v = u - (u @ y - delta) / (y @ y) * y  # v · y = delta
    readout = tl_linmap.Direction("output", v)
    fc = tl_linmap.feature_contributions(model, tokens, target=readout, dictionaries=dicts, error="live")
    parts = fc.values.abs().sum() + fc.errors.abs().sum() + fc.tokens.abs().sum() + fc.constant.abs().sum()
    assert float(parts) > 1e3 * abs(delta)  # the parts are large and cancel
    assert float((fc.total() - fc.output).abs()) <= 1e-14 * float(parts)


def test_module_nodes_leave_the_sum_exact(model):
    """``modules=True``: attention and MLP outputs are nodes too (not where a dictionary writes); the sum still holds."""
    tokens = model.to_tokens(PROMPT)
    dicts = dictionaries(model, "skip_transcoder")
    fc = tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(57), dictionaries=dicts, modules=True)
    assert "blocks.0.hook_mlp_out" not in fc.modules and "blocks.1.hook_mlp_out" in fc.modules
    assert fc.relative_error() <= 1e-12


# --- The model comes back bit for bit --------------------------------------------------------------


def _snapshot(model) -> dict:
    named = {f"state.{k}": v for k, v in model.state_dict(keep_vars=True).items()}
    named.update({f"param.{k}": v for k, v in model.named_parameters(remove_duplicate=False)})
    named.update({f"buffer.{k}": v for k, v in model.named_buffers(remove_duplicate=False)})
    modules = dict(model.named_modules(remove_duplicate=False))
    return {
        "values": {k: v.detach().clone() for k, v in named.items()},
        "objects": {k: id(v) for k, v in named.items()},
        "dtypes": {k: v.dtype for k, v in named.items()},
        "flags": {k: v.requires_grad for k, v in named.items()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in named.items() if isinstance(v, torch.nn.Parameter)},
        "training": {k: m.training for k, m in modules.items()},
        "torch_hooks": {k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for k, m in modules.items()},
        "hook_points": {k: (id(h), len(h.fwd_hooks), len(h.bwd_hooks)) for k, h in model.hook_dict.items()},
        "cfg_dtype": model.cfg.dtype,
    }


def _assert_same(model, before: dict) -> None:
    after = _snapshot(model)
    changed = sorted(k for k, v in before["values"].items() if not torch.equal(after["values"][k], v))
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"
    for key in ("objects", "dtypes", "flags", "training", "torch_hooks", "hook_points", "cfg_dtype"):
        assert after[key] == before[key], key
    for k, grad in before["grads"].items():
        assert (grad is None) == (after["grads"][k] is None) and (grad is None or torch.equal(after["grads"][k], grad)), k


class Exploding(tl_linmap.Logit):
    """A readout that fails once the model is borrowed (its weights are asked inside the frozen system)."""

    def weights(self, reader, d_out):
        raise RuntimeError("exploding readout")


@pytest.mark.parametrize("name", list(BUILDERS))
def test_model_comes_back_bit_for_bit(name, monkeypatch):
    """A float32 model of its own, in training mode with mixed flags and a gradient, through every call and an error."""
    model = BUILDERS[name](dtype=torch.float32)
    tokens = model.to_tokens(PROMPT)
    dicts = dictionaries(model, "sae+transcoder")
    weights = [{k: v.clone() for k, v in vars(d).items() if isinstance(v, Tensor)} for d in dicts]
    model.train()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
    next(iter(model.parameters())).grad = torch.ones_like(next(iter(model.parameters())))
    before = _snapshot(model)
    for convention in CONVENTIONS:
        # The sum check may refuse a small logit whose large parts cancel (see
        # test_a_small_target_with_large_cancelling_parts_is_not_refused); the model must come back regardless.
        with contextlib.suppress(tl_linmap.FreezeError):
            tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(57), dictionaries=dicts, error=convention, modules=True)
        _assert_same(model, before)
        with tl_linmap.spliced(model, dicts, error=convention):
            assert tl_linmap.linear_map(model, tokens).operators.dtype == torch.float64
            with contextlib.suppress(LinmapError):  # the model's own float32 may miss the exactness check
                tl_linmap.linear_map(model, tokens, dtype=None)
        _assert_same(model, before)
    with pytest.raises(RuntimeError, match="exploding readout"):
        tl_linmap.feature_contributions(model, tokens, target=Exploding(57), dictionaries=dicts)
    _assert_same(model, before)
    with pytest.raises(RuntimeError, match="exploding readout"), tl_linmap.spliced(model, dicts):
        tl_linmap.linear_map(model, tokens, target=Exploding(57))
    _assert_same(model, before)

    def fail(*args, **kwargs):
        assert model.cfg.dtype == torch.float64  # it fails inside the borrow
        raise RuntimeError("simulated failure")

    monkeypatch.setattr("tl_linmap.linear.features.node_effects", fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(57), dictionaries=dicts, error="constant")
    _assert_same(model, before)
    from tl_linmap.freeze.splicing import convention, splices_of

    assert splices_of(model) == [] and convention(model) == "live"  # nothing left spliced
    for d, w in zip(dicts, weights):  # nor the dictionaries touched
        assert all(torch.equal(getattr(d, k), v) and getattr(d, k).dtype == torch.float64 for k, v in w.items())


# --- Bad input ---------------------------------------------------------------------------------------


def _weights(d_in=D_MODEL, d_sae=D_SAE, d_out=D_MODEL) -> dict:
    return dict(W_enc=torch.randn(d_in, d_sae), b_enc=torch.randn(d_sae), W_dec=torch.randn(d_sae, d_out), b_dec=torch.randn(d_out))


def _dictionary(**changes) -> tl_linmap.Dictionary:
    options = dict(_weights(), hook_in="blocks.0.hook_resid_post") | changes
    return tl_linmap.Dictionary(**options)


#: A bad call -> the message (a regex) that says what to pass.
BAD_DICTIONARIES = {
    "wrong shapes": (lambda m: _dictionary(b_enc=torch.randn(D_SAE - 1)), r"shapes must be W_enc \(d_in, d_sae\), b_enc \(d_sae,\)"),
    "decoder shapes": (lambda m: _dictionary(W_dec=torch.randn(D_SAE + 1, D_MODEL)), r"W_dec \(d_sae, d_out\)"),
    "integer weights": (lambda m: _dictionary(W_enc=torch.ones(D_MODEL, D_SAE, dtype=torch.long)), r"W_enc must be a floating tensor"),
    "unknown activation": (lambda m: _dictionary(activation="softplus"), r"activation must be one of relu, jumprelu, topk, abstopk, gated"),
    "topk without k": (lambda m: _dictionary(activation="topk"), r"topk dictionary needs k, an int in \[1, d_sae=24\]"),
    "topk with k too big": (lambda m: _dictionary(activation="abstopk", k=D_SAE + 1), r"needs k, an int in \[1, d_sae=24\]"),
    "jumprelu without threshold": (lambda m: _dictionary(activation="jumprelu"), r"jumprelu dictionary needs threshold"),
    "gated without its biases": (lambda m: _dictionary(activation="gated"), r"gated dictionary needs b_gate, r_mag, b_mag"),
}


@pytest.mark.parametrize("case", list(BAD_DICTIONARIES))
def test_bad_dictionaries_are_refused(case):
    make, message = BAD_DICTIONARIES[case]
    with pytest.raises(tl_linmap.InputError, match=message):
        make(None)


#: A bad call on a model -> the message (a regex) that says what to pass.
BAD_CALLS = {
    "unknown hook": (
        lambda m: tl_linmap.spliced(m, [_dictionary(hook_in="blocks.0.hook_resid_pots")]).__enter__(),
        r"the model has no hook point 'blocks\.0\.hook_resid_pots'\. Did you mean blocks\.0\.hook_resid_post",
    ),
    "two on one hook": (
        lambda m: tl_linmap.spliced(m, [_dictionary(), _dictionary()]).__enter__(),
        r"Two dictionaries write 'blocks\.0\.hook_resid_post': splice one per hook point",
    ),
    "two on one hook, nested": (
        lambda m: _nested(m),
        r"Two dictionaries write 'blocks\.0\.hook_resid_post'",
    ),
    "bogus convention": (
        lambda m: tl_linmap.spliced(m, [_dictionary()], error="bogus").__enter__(),
        r"error must be 'live' .*'constant' .*'none' .*got 'bogus'",
    ),
    "bogus convention in feature_contributions": (
        lambda m: tl_linmap.feature_contributions(m, PROMPT, target=tl_linmap.Logit(57), dictionaries=[_dictionary()], error="bogus"),
        r"error must be 'live'",
    ),
    "not a dictionary": (
        lambda m: tl_linmap.feature_contributions(m, PROMPT, dictionaries=[{"W_enc": 1}]),
        r"Give a tl_linmap\.Dictionary \(W_enc, b_enc, W_dec, b_dec, hook_in, activation, \.\.\.\) or a SAELens SAE, got dict",
    ),
    "no dictionaries": (
        lambda m: tl_linmap.feature_contributions(m, PROMPT, target=tl_linmap.Logit(57)),
        r"no dictionaries spliced in: pass dictionaries=\[tl_linmap\.Dictionary\(\.\.\.\) or a SAELens SAE\]",
    ),
}


def _nested(model):
    with tl_linmap.spliced(model, [_dictionary()]):
        with tl_linmap.spliced(model, [_dictionary()]):
            pass


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_say_what_to_pass(model, case):
    call, message = BAD_CALLS[case]
    before = _snapshot(model)
    with pytest.raises(tl_linmap.InputError, match=message):
        call(model)
    _assert_same(model, before)
    from tl_linmap.freeze.splicing import convention, splices_of

    assert splices_of(model) == [] and convention(model) == "live"
