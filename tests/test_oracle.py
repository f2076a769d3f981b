"""An independent oracle for exactness: tl_linmap's J and b against a Jacobian of the model itself.

`relative_error()` only shows that a map reconstructs its output, which any affine replay does,
including one that freezes too much (its ``b`` absorbs whatever the missing paths carried). Here
``J`` is checked against ``torch.autograd.functional.jacobian`` of the model run under freeze
hooks written in this file (none of tl_linmap's hooks, rules, replays, trimming or windows), and
``b`` against ``y − Σ_i J_i x_i``. A one-layer GPT-2 is also derived by hand from its weights,
and a deliberately over-frozen rule set is shown to pass `relative_error()` but fail the oracle.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import einops
import pytest
import torch
from conftest import ALL_FAMILIES, PROMPT
from jaxtyping import Float
from torch import Tensor

import tl_linmap
from tl_linmap.base.compat import get_act_name
from tl_linmap.freeze import architectures as rules
from tl_linmap.freeze.rules import Detach
from tl_linmap.load.toy import toy_model

# The bridge warns whenever a hook returns a new tensor at hook_scale; that is the point here.
_NORM_EDIT_WARNING = "A forward hook edited hook_scale"


@dataclass(frozen=True)
class Freeze:
    """What the oracle detaches in every block of one architecture (``ln_final``'s scale too).

    Attributes:
        norms: Norm modules whose ``hook_scale`` is detached.
        gated: Detach the gate pre-activation at ``mlp.hook_pre``; otherwise freeze the
            activation's ratio ``post / pre`` between ``mlp.hook_pre`` and ``mlp.hook_post``.
    """

    norms: tuple[str, ...]
    gated: bool
    #: "pattern": detach ``attn.hook_pattern``; "qk": detach the query and key projections
    #: (where the bridge only observes the pattern, the attention is frozen through them).
    attention: str = "pattern"
    outside: tuple[str, ...] = ("ln_final",)  # norms outside the blocks
    #: Weightless norms (OLMo's), whose bridge fails on an edited scale: (centered, eps). Each norm's
    #: output is then rebuilt from its input as ``c / sqrt(mean(c²) + eps)`` with that scale detached,
    #: ``c`` the input less its mean where centered.
    weightless: tuple[bool, float] | None = None
    #: Components wrapping an RMS norm without hook_scale (MLA's query latent norm): frozen as the
    #: ratio of their hook_out to their hook_in, as an activation is. Not a float64 recomputation of
    #: the norm's scale: Hugging Face runs that norm in float32 even in a float64 model.
    ratios: tuple[str, ...] = ()


_PRE_NORMS = ("ln1", "ln2")
_QK_NORMS = ("attn.q_norm", "attn.k_norm")
_SANDWICH_NORMS = ("ln1_post", "ln2_post")

#: The oracle's own freeze table, per family (keyed by ``model.cfg.architecture``).
ORACLE_FREEZES = {
    "LlamaForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "Qwen2ForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "Qwen3ForCausalLM": Freeze(_PRE_NORMS + _QK_NORMS, gated=True),
    "Gemma3ForCausalLM": Freeze(_PRE_NORMS + _QK_NORMS + _SANDWICH_NORMS, gated=True),
    "GPT2LMHeadModel": Freeze(_PRE_NORMS, gated=False),
    "GPTNeoXForCausalLM": Freeze(_PRE_NORMS, gated=False),
    "MistralForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "Ministral3ForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "GemmaForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "Gemma2ForCausalLM": Freeze(_PRE_NORMS + _SANDWICH_NORMS, gated=True),
    "Olmo2ForCausalLM": Freeze(_SANDWICH_NORMS + _QK_NORMS, gated=True),  # post-norms only
    "Olmo3ForCausalLM": Freeze(_SANDWICH_NORMS + _QK_NORMS, gated=True),
    "PhiForCausalLM": Freeze(("ln1",), gated=False),  # parallel attention and MLP, one norm
    "Phi3ForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "StableLmForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "GPTJForCausalLM": Freeze(("ln1",), gated=False, attention="qk"),
    "GPTNeoForCausalLM": Freeze(_PRE_NORMS, gated=False, attention="qk"),
    "OPTForCausalLM": Freeze(_PRE_NORMS, gated=False, attention="qk"),
    "BloomForCausalLM": Freeze(_PRE_NORMS, gated=False, outside=("embed_ln", "ln_final")),
    "FalconForCausalLM": Freeze(("ln1",), gated=False),
    "CohereForCausalLM": Freeze(("ln1",), gated=True),
    "GraniteForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "Starcoder2ForCausalLM": Freeze(_PRE_NORMS, gated=False),
    "GPTBigCodeForCausalLM": Freeze(_PRE_NORMS, gated=False),
    "SmolLM3ForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "ApertusForCausalLM": Freeze(_PRE_NORMS + _QK_NORMS, gated=False),
    "ArceeForCausalLM": Freeze(_PRE_NORMS, gated=False),
    "Cohere2ForCausalLM": Freeze(("ln1",), gated=True),  # parallel attention and MLP, one norm
    "Ernie4_5ForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "Exaone4ForCausalLM": Freeze(_SANDWICH_NORMS + _QK_NORMS, gated=True),  # post-norms only
    "GlmForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "Glm4ForCausalLM": Freeze(_PRE_NORMS + _SANDWICH_NORMS, gated=True),
    "HunYuanDenseV1ForCausalLM": Freeze(_PRE_NORMS + _QK_NORMS, gated=True),
    "Jais2ForCausalLM": Freeze(_PRE_NORMS, gated=False),
    "MptForCausalLM": Freeze(_PRE_NORMS, gated=False),
    "NemotronForCausalLM": Freeze(_PRE_NORMS, gated=False),
    "SeedOssForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "VaultGemmaForCausalLM": Freeze(_PRE_NORMS, gated=True),
    "OlmoForCausalLM": Freeze(_PRE_NORMS, gated=True, weightless=(True, 1e-5)),  # OlmoLayerNorm fixes eps at 1e-5
    "YoutuForCausalLM": Freeze(_PRE_NORMS + ("attn.kv_a_layernorm",), gated=True, ratios=("attn.q_a_layernorm",)),
}

TARGETS = ["output", "blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.0.hook_mlp_out"]
DTYPES = [pytest.param(torch.float64, 1e-12, id="float64"), pytest.param(torch.float32, 1e-4, id="float32")]
HEAD = (1, 2)  # (layer, head): on GQA families head 2 reads the second key/value head


def _detach(act: Tensor, hook=None) -> Tensor:
    # A new tensor: at a norm's hook_scale the bridge then runs its own norm with this scale.
    return act.detach()


def _frozen_ratio(layer: int, pre_name: str | None = None, post_name: str | None = None) -> list[tuple[str, Callable]]:
    # The MLP's activation by default. Keyed by this closure, not hook.name: a hook registered
    # under an alias sees the canonical name.
    live: dict[str, Tensor] = {}

    def keep(pre: Tensor, hook=None) -> None:
        live["pre"] = pre

    def freeze(post: Tensor, hook=None) -> Tensor:
        pre = live.pop("pre")
        return post.detach() + (pre - pre.detach()) * (post / pre).detach()

    return [(pre_name or get_act_name("pre", layer), keep), (post_name or get_act_name("post", layer), freeze)]


def _weightless_norm(norm: str, centered: bool, eps: float) -> list[tuple[str, Callable]]:
    live: dict[str, Tensor] = {}

    def keep(x: Tensor, hook=None) -> None:
        live["x"] = x

    def rebuild(out: Tensor, hook=None) -> Tensor:
        x = live.pop("x")
        c = x - x.mean(-1, keepdim=True) if centered else x
        return c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + eps).detach()

    return [(f"{norm}.hook_in", keep), (f"{norm}.hook_out", rebuild)]


def _norm_hooks(norm: str, freeze: Freeze) -> list[tuple[str, Callable]]:
    if freeze.weightless is None:
        return [(f"{norm}.hook_scale", _detach)]
    return _weightless_norm(norm, *freeze.weightless)


def oracle_hooks(model) -> list[tuple[str, Callable]]:
    """The oracle's freeze hooks: every factor A(x) of the model detached, by `ORACLE_FREEZES`.

    Args:
        model: A toy bridge.

    Returns:
        ``(hook_name, fn)`` pairs for ``model.hooks``.
    """
    freeze = ORACLE_FREEZES[model.cfg.architecture]
    hooks = [hook for norm in freeze.outside for hook in _norm_hooks(norm, freeze)]
    for layer in range(model.cfg.n_layers):
        hooks += [hook for norm in freeze.norms for hook in _norm_hooks(f"blocks.{layer}.{norm}", freeze)]
        if freeze.attention == "pattern":
            hooks.append((get_act_name("pattern", layer), _detach))
        else:
            hooks += [(f"blocks.{layer}.attn.{qk}.hook_out", _detach) for qk in "qk"]
        hooks += [(get_act_name("pre", layer), _detach)] if freeze.gated else _frozen_ratio(layer)
        for part in freeze.ratios:
            hooks += _frozen_ratio(layer, f"blocks.{layer}.{part}.hook_in", f"blocks.{layer}.{part}.hook_out")
    return hooks


def _frozen_run(
    model, tokens: Tensor, x: Tensor, target: str, extra: Sequence[tuple[str, Callable]] = (), source: str = "hook_embed"
) -> Tensor:
    # The model under the oracle's freeze hooks, with ``x`` in place of the source's activation.
    seen = {}

    def grab(act: Tensor, hook=None) -> None:
        seen["act"] = act

    hooks = [(source, lambda act, hook=None: x[None].reshape(act.shape)), *oracle_hooks(model), *extra, (target, grab)]
    with warnings.catch_warnings(), model.hooks(fwd_hooks=hooks):
        warnings.filterwarnings("ignore", message=_NORM_EDIT_WARNING)
        model(tokens)
    return seen["act"][0]


@dataclass
class Oracle:
    """The detached Jacobian of one target, by autograd through the model under `oracle_hooks`."""

    operators: Float[Tensor, "pos d_out d_in"]
    bias: Float[Tensor, " d_out"]
    output: Float[Tensor, " d_out"]
    inputs: Float[Tensor, "pos d_in"]


def _embeddings(model, tokens: Tensor, source: str = "hook_embed") -> Float[Tensor, "pos d_in"]:
    # The source's activation in the forward under the oracle's freeze hooks (the same values, on
    # the norms' float64 path: a bridge's plain forward runs RMSNorm in float32).
    with warnings.catch_warnings(), model.hooks(fwd_hooks=oracle_hooks(model)):
        warnings.filterwarnings("ignore", message=_NORM_EDIT_WARNING)
        _, cache = model.run_with_cache(tokens, names_filter=source)
    return cache[source][0].flatten(1).detach().clone()


def _jacobian_oracle(model, tokens: Tensor, f: Callable[[Tensor], Tensor], source: str = "hook_embed") -> Oracle:
    x = _embeddings(model, tokens, source)
    with torch.enable_grad():
        y = f(x).detach()
        jac = torch.autograd.functional.jacobian(f, x, vectorize=True)
    operators = einops.rearrange(jac, "d_out pos d_in -> pos d_out d_in")
    bias = y - einops.einsum(operators, x, "pos d_out d_in, pos d_in -> d_out")
    return Oracle(operators, bias, y, x)


def target_oracle(model, tokens: Tensor, target: str, position: int, source: str = "hook_embed") -> Oracle:
    """The oracle of one hook point's vector at one position.

    Args:
        model: A toy bridge.
        tokens: ``(1, pos)``.
        target: Hook name.
        position: Non-negative position.
        source: The hook point whose activation is the input (default: the token embeddings).

    Returns:
        An `Oracle`.
    """
    return _jacobian_oracle(
        model, tokens, lambda x: _frozen_run(model, tokens, x, target, source=source)[position].flatten(), source
    )


def head_oracle(model, tokens: Tensor, layer: int, head: int, position: int, source: str = "hook_embed") -> Oracle:
    """The oracle of one head's share of ``hook_attn_out``: every other head's ``hook_z`` zeroed.

    What is left with all heads zeroed (``b_O`` through the post-attention norm) belongs to no
    head and is subtracted. A post-attention norm (Gemma) keeps the scale of the full forward,
    recorded first: with heads zeroed its own input, hence its scale, would change.

    Args:
        model: A toy bridge.
        tokens: ``(1, pos)``.
        layer: Block index.
        head: Head index.
        position: Non-negative position.
        source: The hook point whose activation is the input (default: the token embeddings).

    Returns:
        An `Oracle`.
    """
    attn_out = get_act_name("attn_out", layer)
    post_scale = get_act_name("scale", layer, "ln1_post")
    x = _embeddings(model, tokens, source)
    extra = []
    if post_scale in model.hook_dict:
        recorded = {}

        def record(act: Tensor, hook=None) -> None:
            recorded["scale"] = act.detach()

        _frozen_run(model, tokens, x, attn_out, [(post_scale, record)], source)
        extra.append((post_scale, lambda act, hook=None: recorded["scale"]))

    def only(heads: list[int]) -> list:
        mask = torch.zeros(model.cfg.n_heads, 1)
        mask[heads] = 1
        return [(get_act_name("z", layer), lambda z, hook=None: z * mask.to(z))]  # z: (batch, pos, head, d_head)

    def share(x: Tensor, heads: list[int]) -> Tensor:
        return _frozen_run(model, tokens, x, attn_out, extra + only(heads), source)[position]

    rest = share(x, []).detach()
    return _jacobian_oracle(model, tokens, lambda x: share(x, [head]) - rest, source)


def _gap(a: Tensor, b: Tensor, scale: Tensor | None = None) -> float:
    return ((a.double() - b.double()).norm() / (b.norm() if scale is None else scale)).item()


def assert_matches_oracle(
    lm, model, prompt: str = PROMPT, *, position: int = -1, head: tuple[int, int] | None = None, rtol: float = 1e-12,
    source: str = "hook_embed",
) -> None:
    """Assert that a map's J, b, output and inputs equal the oracle's, relative in Frobenius norm.

    ``b`` is measured against the larger of ``‖b‖`` and ``‖y‖``: on bias-free families ``b`` is
    exactly zero and the oracle's ``y − Σ J x`` is rounding.

    Args:
        lm: A `tl_linmap.LinearMap` of ``prompt`` (any dtype; the oracle runs in the model's).
        model: The toy bridge it came from.
        prompt: The prompt it maps.
        position: The position it maps.
        head: ``(layer, head)`` if ``lm`` is a head's share of ``hook_attn_out``.
        rtol: Bound on every relative gap.
        source: The hook point ``lm`` starts from.
    """
    tokens = model.to_tokens(prompt)
    position %= tokens.shape[1]
    assert torch.equal(lm.tokens, tokens[0]) and lm.position == position and lm.source == source
    if head is None:
        oracle = target_oracle(model, tokens, lm.target, position, source)
    else:
        oracle = head_oracle(model, tokens, *head, position, source)
    gaps = {
        "J": _gap(lm.operators, oracle.operators),
        "b": _gap(lm.bias, oracle.bias, torch.maximum(oracle.bias.norm(), oracle.output.norm())),
        "output": _gap(lm.output, oracle.output),
        "inputs": _gap(lm.inputs, oracle.inputs),
    }
    measured = ", ".join(f"{name} {gap:.1e}" for name, gap in gaps.items())
    assert all(gap <= rtol for gap in gaps.values()), f"{lm.target} differs from the oracle by {measured} (bound {rtol:.0e})"


@pytest.fixture(scope="module")
def scratch_models():
    """Toy bridges of their own for the float32 runs: borrowing a float64 model in float32 and
    back rounds its weights to float32 for good, which would change the shared `toy_models`."""
    return {family: toy_model(family) for family in ALL_FAMILIES}


def _subject(model, family, scratch_models, dtype):
    return model if dtype == torch.float64 else scratch_models[family]


@pytest.mark.parametrize("dtype, rtol", DTYPES)
@pytest.mark.parametrize("target", TARGETS)
def test_linear_map_matches_the_oracle(model, family, scratch_models, target, dtype, rtol):
    model = _subject(model, family, scratch_models, dtype)
    lm = tl_linmap.linear_map(model, PROMPT, target=target, dtype=dtype)
    assert lm.operators.dtype == dtype
    assert_matches_oracle(lm, model, rtol=rtol)


@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_head_matches_the_oracle(model, family, scratch_models, dtype, rtol):
    model = _subject(model, family, scratch_models, dtype)
    layer, head = HEAD
    lm = tl_linmap.layer_maps(model, PROMPT, modules=True, dtype=dtype).head(layer, head)
    assert lm.operators.dtype == dtype
    assert_matches_oracle(lm, model, head=HEAD, rtol=rtol)


#: (source, target) pairs: one block, a layer to the output, a layer to a later one, modules as sources.
SOURCE_PAIRS = [
    ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"),
    ("blocks.1.hook_resid_pre", "output"),
    ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
    ("blocks.0.hook_attn_out", "output"),
    ("blocks.0.hook_mlp_out", "blocks.1.hook_attn_out"),
]


@pytest.mark.parametrize("route", ["rows", "columns"])
@pytest.mark.parametrize("source, target", SOURCE_PAIRS)
def test_map_from_a_source_matches_the_oracle(model, source, target, route):
    """``y = Σ_i J_i s_i + b`` from a hook point inside the model: J by autograd from the source's
    activation under the oracle's own freeze hooks, b what is left (the source zeroed)."""
    lm = tl_linmap.linear_map(model, PROMPT, target=target, source=source, route=route, position=-3)
    assert_matches_oracle(lm, model, source=source, position=-3)
    if target == "output":  # on bias-free families b is exactly zero only for a whole-stream source
        assert (lm.bias.norm() > 0) == (model.cfg.architecture in ("GPT2LMHeadModel", "GPTNeoXForCausalLM", "Qwen2ForCausalLM") or "attn_out" in source)


def test_head_from_a_source_matches_the_oracle(model):
    """Per-head maps from a middle layer's residual stream: read through ``W_O`` (and Gemma's post-norm)."""
    source = "blocks.1.hook_resid_pre"
    maps = tl_linmap.layer_maps(model, PROMPT, layers=[1], modules=True, source=source)
    assert_matches_oracle(maps.head(*HEAD), model, head=HEAD, source=source)
    own = maps[source]  # the source mapped to itself: the identity at the target position
    eye = torch.eye(model.cfg.d_model, dtype=own.operators.dtype)
    assert torch.equal(own.operators[-1], eye) and not own.operators[:-1].any() and not own.bias.any()


def _frozen_layer_norm(weight: Tensor, scale: Tensor) -> Float[Tensor, "pos d d"]:
    # LayerNorm with its scale frozen, per position: centring is linear, (v − mean v) w / scale.
    d = weight.shape[0]
    centre = torch.eye(d, dtype=weight.dtype) - 1 / d
    return torch.diag(weight) @ centre / scale[:, None, None]


def test_one_layer_gpt2_by_hand():
    """J_i and b of a one-layer GPT-2's output, written out from its Hugging Face weights.

    With the factors of this inference frozen (LayerNorm scales s, attention pattern A,
    GELU ratio r = gelu(pre) / pre, all read from a cache of the plain forward), the output
    at position p is affine in the token embeddings x_i:

        resid_mid_p = Σ_i R_i x_i + const,  R_i = δ_ip I + Σ_h A[h, p, i] W_O,h W_V,h LN1_i
        J_i = LNf_p (I + W_proj diag(r_p) W_fc LN2_p) R_i

    (matrices acting on column vectors; LN_k the frozen LayerNorm at position k, without bias).
    ``b`` is the same affine pass with every x_i = 0.
    """
    model = toy_model("gpt2", n_layers=1)
    hf = model.original_model.transformer
    block = hf.h[0]
    tokens = model.to_tokens(PROMPT)
    _, cache = model.run_with_cache(tokens)
    n, p = tokens.shape[1], tokens.shape[1] - 1
    d, n_heads = model.cfg.d_model, model.cfg.n_heads
    d_head = d // n_heads

    # Conv1D weights act on row vectors (v @ W); .T makes them act on columns.
    w_v = block.attn.c_attn.weight[:, 2 * d :].T.detach()  # (d, d): rows grouped by head
    b_v = block.attn.c_attn.bias[2 * d :].detach()
    w_o = block.attn.c_proj.weight.T.detach()  # (d, d): columns grouped by head
    w_fc, b_fc = block.mlp.c_fc.weight.T.detach(), block.mlp.c_fc.bias.detach()
    w_proj, b_proj = block.mlp.c_proj.weight.T.detach(), block.mlp.c_proj.bias.detach()
    pattern = cache["blocks.0.attn.hook_pattern"][0]  # (head, query, key)
    ratio = cache["blocks.0.mlp.hook_post"][0, p] / cache["blocks.0.mlp.hook_pre"][0, p]
    ln1 = _frozen_layer_norm(block.ln_1.weight.detach(), cache["blocks.0.ln1.hook_scale"][0, :, 0])
    ln2 = _frozen_layer_norm(block.ln_2.weight.detach(), cache["blocks.0.ln2.hook_scale"][0, p])[0]
    lnf = _frozen_layer_norm(hf.ln_f.weight.detach(), cache["ln_final.hook_scale"][0, p])[0]

    heads = [slice(h * d_head, (h + 1) * d_head) for h in range(n_heads)]
    ov = torch.stack([w_o[:, hs] @ w_v[hs] for hs in heads])  # (head, d, d)
    eye = torch.eye(d, dtype=w_o.dtype)
    attention = einops.einsum(pattern[:, p], ov, ln1, "h i, h a b, i b c -> i a c")
    residual = attention.clone()
    residual[p] += eye
    mlp = eye + w_proj @ torch.diag(ratio) @ w_fc @ ln2
    operators = lnf @ mlp @ residual  # (pos, d, d)

    def affine_pass(x: Float[Tensor, "pos d"]) -> Float[Tensor, " d"]:
        resid = x + hf.wpe.weight[:n].detach()
        normed = einops.einsum(ln1, resid, "i a b, i b -> i a") + block.ln_1.bias.detach()
        v = normed @ w_v.T + b_v
        z = torch.stack([pattern[h, p] @ v[:, hs] for h, hs in enumerate(heads)]).flatten()
        mid = resid[p] + w_o @ z + block.attn.c_proj.bias.detach()
        pre = w_fc @ (ln2 @ mid + block.ln_2.bias.detach()) + b_fc
        resid_post = mid + w_proj @ (ratio * pre) + b_proj
        return lnf @ resid_post + hf.ln_f.bias.detach()

    x = hf.wte.weight[tokens[0]].detach()
    bias = affine_pass(torch.zeros_like(x))
    by_hand = einops.einsum(operators, x, "pos o i, pos i -> o") + bias
    output = cache["ln_final.hook_out"][0, p]
    assert _gap(by_hand, output) < 1e-12  # the hand derivation is the model's forward
    assert _gap(affine_pass(x), output) < 1e-12

    lm = tl_linmap.linear_map(model, PROMPT)
    assert _gap(lm.inputs, x) == 0
    assert _gap(lm.operators, operators) < 1e-12
    assert _gap(lm.bias, bias) < 1e-12
    assert bias.norm() > 0.1 * output.norm()  # learned positions and biases: b is far from zero


def _observe(act: Tensor, hook=None) -> None:
    return None


def test_over_frozen_rules_fail_the_oracle(model, family, monkeypatch):
    """Rules that also detach ``attn.hook_v`` give a map that reconstructs its output but is wrong.

    Without user hooks, tl_linmap takes ``b = 0`` on families without any constant
    (Llama, Qwen 3, Gemma 3), so there the over-freezing surfaces as a `FreezeError`; on the
    others it passes. With any hook attached (here one that only observes) ``b`` comes from a
    replay, and every family passes `relative_error()`: only the oracle sees the missing paths.
    """
    real = rules.bridge_rules
    values = tuple(get_act_name("v", layer) for layer in range(model.cfg.n_layers))
    monkeypatch.setattr(rules, "bridge_rules", lambda m: real(m) + (Detach(values),))
    try:
        plain = f"relative_error {tl_linmap.linear_map(model, PROMPT).relative_error():.1e}"
    except tl_linmap.FreezeError as error:
        plain = f"FreezeError ({error})"
    with model.hooks(fwd_hooks=[(get_act_name("resid_pre", 0), _observe)]):
        lm = tl_linmap.linear_map(model, PROMPT)
    assert lm.relative_error() < 1e-12
    with pytest.raises(AssertionError) as failure:
        assert_matches_oracle(lm, model)
    measured = str(failure.value).splitlines()[0]
    print(f"\n[over-frozen {family}] no user hook: {plain}")
    print(f"[over-frozen {family}] observing hook: relative_error {lm.relative_error():.1e}; oracle: {measured}")
    assert "differs from the oracle by J" in measured
