"""The freeze-rule table: where each architecture keeps its input-dependent factors A(x).

Every nonlinearity of a supported transformer is a product ``A(x) · x`` whose factor
``A(x)`` is visible at one TransformerLens hook point. A rule names that hook point and
how to freeze the factor there. A TransformerBridge's rules are derived from its structure
(`bridge_rules`), a HookedTransformer's from its config (`hooked_rules`); the real exceptions
live in `EXCEPTIONS`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dataclasses
import weakref

from tl_linmap.base.compat import get_act_name, is_hooked
from tl_linmap.base.errors import FreezeError, UnsupportedArchitectureError
from tl_linmap.freeze import structure
from tl_linmap.freeze.replacement import replacement_rules
from tl_linmap.freeze.rules import POINTWISE_ACTIVATIONS, Detach, Ratio, Rebuild, Rule
from tl_linmap.freeze.splicing import splices_of


def _each_layer(act: str, n_layers: int, layer_type: str | None = None) -> tuple[str, ...]:
    return tuple(get_act_name(act, layer, layer_type) for layer in range(n_layers))


def _ratio(n_layers: int, post: str = "post") -> Ratio:
    return Ratio(tuple((get_act_name("pre", layer), get_act_name(post, layer)) for layer in range(n_layers)))


def hooked_rules(cfg) -> tuple[Rule, ...]:
    """Freeze rules of a HookedTransformer, derived from its config.

    Args:
        cfg: A ``HookedTransformerConfig`` (from `from_pretrained` or built by hand).

    Returns:
        The rules: every norm the config implies, the attention pattern, and the MLP's
        activation (its gate, or a frozen ratio).

    Raises:
        UnsupportedArchitectureError: naming the setting, for anything that is not a
            product ``A(x)·x`` a rule covers (mixture-of-experts MLPs, an activation that
            is not zero at zero, final logit softcapping, ...).
    """
    if getattr(cfg, "num_experts", None):
        raise UnsupportedArchitectureError(
            f"num_experts={cfg.num_experts}: tl_linmap has no freeze rule for a HookedTransformer's "
            "mixture-of-experts router (its expert choice is an input-dependent factor); boot the model "
            "as a TransformerBridge (TransformerLens 3.x/4.x), whose routers tl_linmap freezes."
        )
    kv_heads = getattr(cfg, "n_key_value_heads", None)
    if getattr(cfg, "use_split_qkv_input", False) and kv_heads and kv_heads != cfg.n_heads and cfg.normalization_type:
        raise UnsupportedArchitectureError(
            f"use_split_qkv_input with grouped keys and values (n_key_value_heads={kv_heads}): ln1 then fires "
            "for queries and for keys/values with different head counts, and one frozen scale per hook "
            "point cannot replay both. Use use_split_qkv_input=False (or use_attn_in)."
        )
    if getattr(cfg, "output_logits_soft_cap", -1.0) > 0:
        raise UnsupportedArchitectureError(
            f"output_logits_soft_cap={cfg.output_logits_soft_cap}: the logits are a tanh of the unembedding, "
            "so no logit readout of the linear system would be the model's logits."
        )
    n = cfg.n_layers
    rules: list[Rule] = [Detach(_each_layer("pattern", n), position_axes=(2, 3), kind="pattern")]
    if cfg.normalization_type is not None:
        rules += [Detach(_each_layer("scale", n, "ln1")), Detach(("ln_final.hook_scale",))]
        if not cfg.attn_only:
            rules.append(Detach(_each_layer("scale", n, "ln2"), after_attention=True))
    if getattr(cfg, "use_normalization_before_and_after", False):
        rules += [Detach(_each_layer("scale", n, norm), after_attention=True) for norm in ("ln1_post", "ln2_post")]
    if getattr(cfg, "use_qk_norm", False):  # on (batch, pos, head, d_head): the sequence axis is 1
        rules += [Detach(_each_layer("scale", n, f"attn.{qk}_norm")) for qk in "qk"]
    if not cfg.attn_only:
        rules += _hooked_mlp_rules(cfg)
    return tuple(rules)


def _hooked_mlp_rules(cfg) -> list[Rule]:
    act, n = cfg.act_fn, cfg.n_layers
    if act == "solu_ln":  # post = ln(pre · softmax(pre)): the ratio at hook_mid, then the norm
        if cfg.gated_mlp:
            raise UnsupportedArchitectureError("act_fn='solu_ln' in a gated MLP: no freeze rule covers it.")
        return [_ratio(n, post="mid"), Detach(_each_layer("scale", n, "mlp.ln"), after_attention=True)]
    if cfg.gated_mlp:
        return [Detach(_each_layer("pre", n), after_attention=True, kind="gate")]
    if act not in POINTWISE_ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"act_fn={act!r} in a non-gated MLP: tl_linmap freezes only activations with f(0) = 0 "
            f"as f(x)/x ({', '.join(sorted(POINTWISE_ACTIVATIONS))})."
        )
    return [_ratio(n)]


def architecture_of(model) -> str:
    """The Hugging Face architecture name a bridge was booted from.

    Args:
        model: A TransformerBridge or HookedTransformer.

    Returns:
        For example ``"LlamaForCausalLM"`` (a HookedTransformer's ``original_architecture``).
    """
    cfg = model.cfg
    return str(getattr(cfg, "architecture", None) or getattr(cfg, "original_architecture", None) or type(model).__name__)


SUPPORTED: set[str] = {
    "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM",
    "MistralForCausalLM", "Ministral3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Olmo2ForCausalLM",
    "Olmo3ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "StableLmForCausalLM", "GPTJForCausalLM", "GPTNeoForCausalLM",
    "OPTForCausalLM", "BloomForCausalLM", "FalconForCausalLM", "CohereForCausalLM", "GraniteForCausalLM",
    "Starcoder2ForCausalLM", "GPTBigCodeForCausalLM", "SmolLM3ForCausalLM", "ApertusForCausalLM", "ArceeForCausalLM",
    "Cohere2ForCausalLM", "Ernie4_5ForCausalLM", "Exaone4ForCausalLM", "GlmForCausalLM", "Glm4ForCausalLM",
    "HunYuanDenseV1ForCausalLM", "Jais2ForCausalLM", "MptForCausalLM", "NemotronForCausalLM", "SeedOssForCausalLM",
    "VaultGemmaForCausalLM",
    # Weightless norms, rebuilt at their output (`Rebuild`).
    "OlmoForCausalLM",
    # Mixtures of experts (`tl_linmap.methods.experts`, `tests/test_experts.py`).
    "MixtralForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "MiniMaxM2ForCausalLM",
    # Multi-head latent attention, its query latent's RMS norm frozen as a ratio (`structure.norm_ratios`).
    "YoutuForCausalLM", "Glm4MoeLiteForCausalLM",
}
"""Architectures (Hugging Face class names) whose structure-derived rules are tested exact against an
independent oracle (`tests/test_architectures.py`): only these are mapped. The support matrix
(docs/support.md) lists them with their errors, and the others with the reason they are refused."""


#: The real exceptions of the structure-derived rules, by architecture: what the model's hook
#: points do not show. A string refuses the architecture with that reason.
EXCEPTIONS: dict[str, str] = {
    "NanoChatForCausalLM": (
        "NanoChatModel.forward calls its final norm module (model.norm, the bridge's ln_final) twice, on the "
        "embeddings before the first block and after the last, so ln_final's hook points fire twice per forward: "
        "its first firing would be taken for the model's output and one frozen scale would stand for two "
        "(its weightless RMSNorms alone would be frozen, see rules.Rebuild)"
    ),
    "CodeGenForCausalLM": (
        "TransformerLens 4.3's CodeGen attention bridge fails its own forward with this transformers "
        "('CodeGenAttention' object has no attribute 'embed_positions')"
    ),
    "GptOssForCausalLM": (
        "its experts' activation is a clamped SwiGLU, (clamp(up, ±limit) + 1) · g · σ(α·g) with g = clamp(gate, max=limit), "
        "computed inline in GptOssExperts._apply_gate on raw matrix products (no module, no hook point between "
        "the expert projections), so neither the clamps nor the gate can be frozen through hooks. (Its attention "
        "sinks would be: the bridge's hook_pattern comes after the sink column is dropped.)"
    ),
    "XGLMForCausalLM": (
        "Hugging Face's XGLMAttention floors its masked scores with torch.full((), torch.finfo(dtype).min), built in "
        "torch's default dtype, which overflows for a float64 model ('value cannot be converted to type float without "
        "overflow'): the model cannot run in float64, where tl_linmap's maps are checked exact (it runs in float32, and "
        "its structure shows no part without a freeze rule)"
    ),
    "OpenAIGPTLMHeadModel": (
        "GPT-1's Block returns a list, and TransformerLens 4.3's BlockBridge hooks a block's output only when it is a "
        "tuple or a tensor, so blocks.L.hook_out (hook_resid_post) never fires: no map can reach a block's output"
    ),
    "ModernBertDecoderForCausalLM": (
        "its MLP is a fused GLU (Wi's output chunked into act(input) · gate inside ModernBertDecoderMLP.forward) that "
        "TransformerLens 4.3 binds as an ungated MLP: mlp.hook_pre holds both halves and mlp.hook_post their product, "
        "so neither a gate nor an activation ratio freezes it; and its prediction head (dense, GELU, LayerNorm between "
        "ln_final and the unembedding) has no hook point inside"
    ),
    "GraniteMoeForCausalLM": (
        "TransformerLens 4.3's GraniteMoe router bridge reads the router's outputs as (indices, weights, logits), but "
        "Hugging Face's GraniteMoeTopKRouter returns (logits, weights, indices): hook_expert_indices carries the router "
        "logits and the expert choice fires only at the router's hook_out, so the router rule cannot freeze and replay it"
    ),
}


#: Architectures whose decoder layer flattens (batch, pos) into one axis before the MLP (OPT):
#: the factors after the attention have no sequence axis to cut, so the prompt is never cut.
FLAT_TOKENS = {"OPTForCausalLM"}


def bridge_rules(model) -> tuple[Rule, ...]:
    """Freeze rules of a TransformerBridge, derived from its structure.

    Every normalisation's ``hook_scale``, every block's attention pattern, and each block's MLP
    by its kind: a gated MLP's gate (``mlp.hook_pre``), the ratio of a pointwise activation,
    or a mixture-of-experts router's choice and weights (with its experts' activations, see
    `tl_linmap.methods.experts`). Anything else in a block is refused (`tl_linmap.freeze.structure`).

    Args:
        model: A TransformerBridge.

    Returns:
        The rules.

    Raises:
        UnsupportedArchitectureError: naming the module and why, for a part no rule covers.
    """
    arch = architecture_of(model)
    if arch in EXCEPTIONS:
        raise UnsupportedArchitectureError(f"{arch}: {EXCEPTIONS[arch]}")
    structure.check_supported(model)
    hooks = model.hook_dict
    rules: list[Rule] = []
    for location, names in structure.norm_scales(hooks).items():
        inside_attention = ".attn." in location
        where = dict(
            position_axes=structure.scale_axes(model, location),
            after_attention=not (inside_attention or location.endswith(".ln1") or location in structure.BEFORE_BLOCKS),
        )
        centered = structure.rebuilt_norm(model, names[0])
        rules.append(Detach(names, **where) if centered is None else Rebuild(names, centered=centered, **where))
    rules += structure.norm_ratios(model)
    rules += structure.attention_rules(model)
    rules += structure.mlp_rules(model)
    if arch in FLAT_TOKENS:
        rules = [dataclasses.replace(rule, windows=False) if rule.after_attention else rule for rule in rules]
    if arch not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"{arch} is not in tl_linmap's tested support matrix (see docs/support.md). Its structure shows no part "
            "without a freeze rule; to map it anyway, add it to tl_linmap.freeze.architectures.SUPPORTED (every result is "
            "still checked to reconstruct the model's output)."
        )
    return tuple(rules)


def rules_for(model) -> tuple[Rule, ...]:
    """The freeze rules of a model.

    Args:
        model: A TransformerBridge or HookedTransformer.

    Returns:
        A bridge's rules from its structure (`bridge_rules`); a HookedTransformer's from its
        config (`hooked_rules`); then one per dictionary spliced in (`tl_linmap.freeze.splicing.splices_of`).

    Raises:
        UnsupportedArchitectureError: for an architecture or setting no rule covers, a model
            with a norm no rule freezes, or a spliced dictionary no rule covers.
    """
    # Reading a bridge's structure walks every module: cached per model, and recomputed when
    # the rule functions or the tested set change (as tests that break the rules do).
    if is_hooked(model):  # cheap, and a config flag may change between calls
        _check_spliced_modules(model)
        return _checked(model, replacement_rules(model, hooked_rules(model.cfg))) + tuple(splices_of(model))
    key = (bridge_rules, frozenset(SUPPORTED), len(model.hook_dict), architecture_of(model))
    cached = _CACHE.get(model)
    if cached is None or cached[0] != key:
        _CACHE[model] = cached = (key, _checked(model, bridge_rules(model)))
    return cached[1] + tuple(splices_of(model))


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: Packages whose modules a HookedTransformer may hold: TransformerLens' own, torch's, and those whose
#: splices `tl_linmap.freeze.splicing` reads (SAELens' SAE wrappers, circuit-tracer's replacement parts).
KNOWN_MODULES = ("transformer_lens.", "torch.", "sae_lens.", "circuit_tracer.")


def foreign_modules(model) -> list[tuple[str, object]]:
    """The modules of a model from no package tl_linmap's rules know (a user's SAE put in place of a hook point).

    Args:
        model: A TransformerBridge or HookedTransformer.

    Returns:
        ``(path, module)`` pairs in the model's order, each module once at its shortest path (a bridge's
        Hugging Face modules are known).
    """
    known = (*KNOWN_MODULES, "transformers.", "transformers_modules.")
    found: dict[int, tuple[str, object]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if path and not type(module).__module__.startswith(known):
            if id(module) not in found or len(path) < len(found[id(module)][0]):
                found[id(module)] = (path, module)
    return list(found.values())


def _nearest_hook(model, path: str) -> str | None:
    # The hook point at the path, or the output hook of the innermost component around it.
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        for name in (prefix, f"{prefix}.hook_out"):
            if name in model.hook_dict:
                return name
    return None


@contextmanager
def naming_foreign(model) -> Iterator[None]:
    """Add to an exactness failure (`tl_linmap.base.errors.FreezeError`) the modules of the model no rule knows.

    A check that fails beside such a module is most likely its doing: its nonlinearity stayed live.

    Args:
        model: The model the checked result came from.

    Returns:
        A context manager.
    """
    try:
        yield
    except FreezeError as err:
        foreign = foreign_modules(model)
        if not foreign:
            raise
        where = "; ".join(f"{type(m).__name__} (from {type(m).__module__}) at {path!r}, hook {_nearest_hook(model, path)!r}" for path, m in foreign[:3])
        raise FreezeError(
            f"{err} The model holds modules no freeze rule knows, whose nonlinearities stay live: {where}. Hand an SAE's "
            "weights over instead (tl_linmap.spliced(model, [tl_linmap.Dictionary(...)])), or take the module out."
        ) from err


def _check_spliced_modules(model) -> None:
    # A module from elsewhere (a user's SAE put in place of a hook point) computes something no rule freezes.
    for path, module in model.named_modules():
        if path and not type(module).__module__.startswith(KNOWN_MODULES):
            raise UnsupportedArchitectureError(
                f"{type(module).__name__} (from {type(module).__module__}) is spliced into the model at {path!r}: tl_linmap has "
                "no freeze rule for it, so its nonlinearity would stay live and no map would be exact. Hand its weights "
                "over instead (tl_linmap.spliced(model, [tl_linmap.Dictionary(...)])) or attach it with SAELens."
            )


def _checked(model, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    covered = {name for rule in rules if isinstance(rule, (Detach, Rebuild)) for name in rule.hook_names()}
    uncovered = sorted(n for n in model.hook_dict if n.endswith("hook_scale") and n not in covered)
    if uncovered:
        raise UnsupportedArchitectureError(
            f"{architecture_of(model)} has normalisation hook points that no freeze rule covers: {uncovered[:4]}; "
            "the detached system would not be linear."
        )
    return rules


def is_rebuilt(model, scale: str) -> bool:
    """Whether the model's rules freeze a norm by rebuilding its output (`tl_linmap.freeze.rules.Rebuild`).

    Args:
        model: A TransformerBridge or HookedTransformer.
        scale: The norm's ``hook_scale`` name.

    Returns:
        True where a `Rebuild` rule names ``scale``.
    """
    return scale in model.hook_dict and any(isinstance(rule, Rebuild) and scale in rule.names for rule in rules_for(model))
