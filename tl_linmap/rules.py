"""The freeze-rule table: where each architecture keeps its input-dependent factors A(x).

Every nonlinearity of a supported transformer is a product ``A(x) · x`` whose factor
``A(x)`` is visible at one TransformerLens hook point. A rule names that hook point and
how to freeze the factor there; all per-architecture knowledge lives in `FREEZE_RULES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from tl_linmap.compat import get_act_name, is_hooked
from tl_linmap.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Detach:
    """The activation at this hook point *is* the factor: detach it.

    Used for norm scales (``x / scale``), attention patterns (``pattern · V``) and the
    gate pre-activation of gated MLPs (detaching ``x W_gate`` freezes the whole
    activated gate ``act(x W_gate)`` while ``x W_in`` stays linear).
    """

    act: str
    layer_type: str | None = None
    per_layer: bool = True
    position_axes: tuple[int, ...] = (1,)  # where the factor's sequence axes are (for windows)
    after_attention: bool = False  # see `Ratio.after_attention`

    def hook_names(self, n_layers: int) -> list[str]:
        """Hook names this rule covers.

        Args:
            n_layers: Number of transformer blocks.

        Returns:
            One name per block, or the single global name for a rule like ``ln_final``.
        """
        if not self.per_layer:
            return [get_act_name(self.act)]
        return [get_act_name(self.act, layer, self.layer_type) for layer in range(n_layers)]


@dataclass(frozen=True)
class Ratio:
    """A pointwise activation ``post = act(pre)`` written as ``(act(pre) / pre) · pre``.

    The ratio is frozen while ``pre`` stays live. ``ratio_at_zero`` is the limit of
    ``act(p) / p`` at ``p = 0`` (``act'(0) = 1/2`` for GELU and its tanh form); any
    finite value keeps the system exact since it multiplies ``pre == 0``.
    """

    ratio_at_zero: float = 0.5
    #: The hook point after the activation: ``post``, or ``mid`` where a norm follows it (SoLU-LN).
    post: str = "post"
    #: Fires on the MLP branch or after the attention's output projection (an MLP, the norms
    #: of the attention output and of the MLP input): on tensors `tl_linmap.hooks.trim_hooks`
    #: cuts to the target position in the last block a target reads.
    after_attention: bool = True

    def hook_names(self, n_layers: int) -> list[tuple[str, str]]:
        """(pre, post) hook-name pairs, one per block.

        Args:
            n_layers: Number of transformer blocks.

        Returns:
            ``[(blocks.L.mlp.hook_pre, blocks.L.mlp.hook_post), ...]``.
        """
        return [(get_act_name("pre", layer), get_act_name(self.post, layer)) for layer in range(n_layers)]


Rule = Union[Detach, Ratio]

_FINAL_NORM = Detach("scale", per_layer=False)
_PATTERN = Detach("pattern", position_axes=(2, 3))  # (batch, head, query, key)
_GATE = Detach("pre", after_attention=True)  # on gated bridges `mlp.hook_pre` is the gate projection's output
_PRE_NORMS = (Detach("scale", "ln1"), Detach("scale", "ln2", after_attention=True))
_QK_NORMS = tuple(Detach("scale", f"attn.{qk}_norm", position_axes=(2,)) for qk in "qk")  # per head
_POST_NORMS = (Detach("scale", "ln1_post", after_attention=True), Detach("scale", "ln2_post", after_attention=True))

_GATED = (*_PRE_NORMS, _PATTERN, _GATE, _FINAL_NORM)
_NON_GATED = (*_PRE_NORMS, _PATTERN, Ratio(), _FINAL_NORM)

#: Freeze rules per Hugging Face architecture (``model.cfg.architecture``).
#: Rotary embeddings, GQA, sliding windows and attention softcapping all act on the
#: scores before ``hook_pattern`` and need no rule of their own.
FREEZE_RULES: dict[str, tuple[Rule, ...]] = {
    "LlamaForCausalLM": _GATED,  # Llama 3, SmolLM2: SwiGLU, RMSNorm
    "Qwen2ForCausalLM": _GATED,  # QKV biases are affine, no rule needed
    "Qwen3ForCausalLM": (*_GATED, *_QK_NORMS),
    "Gemma3ForCausalLM": (*_GATED, *_QK_NORMS, *_POST_NORMS),  # GeGLU-tanh, sandwich norms
    "GPT2LMHeadModel": _NON_GATED,  # gelu_new, LayerNorm, learned positions
    "GPTNeoXForCausalLM": _NON_GATED,  # Pythia: parallel attn+MLP, partial rotary
}


#: HookedTransformer MLP activations that are pointwise with ``f(0) = 0``, so ``f(x) = (f(x)/x)·x``
#: with the ratio frozen; a gated MLP freezes its whole activated gate, whatever its activation.
POINTWISE_ACTIVATIONS = frozenset({"relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "solu", "solu_ln"})

#: A HookedTransformer's q/k norms run on (batch, pos, head, d_head): their scales' sequence axis is 1.
_HOOKED_QK_NORMS = tuple(Detach("scale", f"attn.{qk}_norm") for qk in "qk")  # (batch, pos, head, 1)


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
            "mixture-of-experts router (its expert choice is an input-dependent factor)."
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
    rules: list[Rule] = [_PATTERN]
    if cfg.normalization_type is not None:
        rules += [Detach("scale", "ln1"), _FINAL_NORM]
        if not cfg.attn_only:
            rules.append(Detach("scale", "ln2", after_attention=True))
    if getattr(cfg, "use_normalization_before_and_after", False):
        rules += list(_POST_NORMS)
    if getattr(cfg, "use_qk_norm", False):
        rules += list(_HOOKED_QK_NORMS)
    if not cfg.attn_only:
        rules += _hooked_mlp_rules(cfg)
    return tuple(rules)


def _hooked_mlp_rules(cfg) -> list[Rule]:
    act = cfg.act_fn
    if act == "solu_ln":  # post = ln(pre · softmax(pre)): the ratio at hook_mid, then the norm
        if cfg.gated_mlp:
            raise UnsupportedArchitectureError("act_fn='solu_ln' in a gated MLP: no freeze rule covers it.")
        return [Ratio(post="mid"), Detach("scale", "mlp.ln", after_attention=True)]
    if cfg.gated_mlp:
        return [_GATE]
    if act not in POINTWISE_ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"act_fn={act!r} in a non-gated MLP: tl_linmap freezes only activations with f(0) = 0 "
            f"as f(x)/x ({', '.join(sorted(POINTWISE_ACTIVATIONS))})."
        )
    return [Ratio()]


def architecture_of(model) -> str:
    """The Hugging Face architecture name a bridge was booted from.

    Args:
        model: A TransformerBridge or HookedTransformer.

    Returns:
        For example ``"LlamaForCausalLM"`` (a HookedTransformer's ``original_architecture``).
    """
    cfg = model.cfg
    return str(getattr(cfg, "architecture", None) or getattr(cfg, "original_architecture", None) or type(model).__name__)


def rules_for(model) -> tuple[Rule, ...]:
    """Look up the freeze rules of a model's architecture.

    Args:
        model: A TransformerBridge or HookedTransformer.

    Returns:
        A bridge's rules from `FREEZE_RULES`; a HookedTransformer's from its config (`hooked_rules`).

    Raises:
        UnsupportedArchitectureError: if the architecture has no entry, a HookedTransformer's config
            has a setting no rule covers, or the model has a norm no rule freezes.
    """
    arch = architecture_of(model)
    if is_hooked(model):
        rules = hooked_rules(model.cfg)
    elif arch in FREEZE_RULES:
        rules = FREEZE_RULES[arch]
    else:
        raise UnsupportedArchitectureError(
            f"tl_linmap has no freeze rules for architecture {arch!r}. "
            f"Supported: {', '.join(sorted(FREEZE_RULES))}."
        )
    covered = {name for rule in rules if isinstance(rule, Detach) for name in rule.hook_names(model.cfg.n_layers)}
    uncovered = sorted(n for n in model.hook_dict if n.endswith("hook_scale") and n not in covered)
    if uncovered:
        raise UnsupportedArchitectureError(
            f"{arch} has normalisation hook points that no freeze rule covers: {uncovered[:4]}; "
            "the detached system would not be linear."
        )
    return rules
