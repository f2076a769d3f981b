"""Results of `token_attribution` and `nonlinearity_gap`."""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.deprecation import renamed_fields
from tl_linmap.present import display


@renamed_fields(sources="str_tokens")
@dataclass
class Attribution:
    """One output token's logit, split exactly over source tokens, layers, modules and heads.

    ``per_token.sum() + constant + unembed_bias == logit`` (to float64 rounding); the
    same holds per component and, within each layer's attention, per head plus
    ``head_rest``.

    Attributes:
        token: The output token (decoded).
        logit: Its logit from the maps' outputs (the model's own value).
        per_token: Contribution of each source token's embedding.
        per_component: Per source token, keyed by hook name: ``blocks.0.hook_resid_pre``
            (the embeddings themselves) and every layer's ``hook_attn_out`` / ``hook_mlp_out``.
        per_head: ``(layer, head) -> (pos,)`` contributions within ``hook_attn_out``.
        head_rest: Per layer, the constant of ``hook_attn_out`` that belongs to no head.
        constant: Every affine part inside the network (biases, positions, ln_final's offset).
        unembed_bias: ``b_U[token]`` (zero when the model has none).
        str_tokens: The input tokens, decoded.
    """

    token: str
    logit: float
    per_token: Float[Tensor, " pos"]
    per_component: dict[str, Float[Tensor, " pos"]]
    per_head: dict[tuple[int, int], Float[Tensor, " pos"]]
    head_rest: dict[int, float]
    constant: float
    unembed_bias: float
    str_tokens: list[str] = field(default_factory=list)
    def __repr__(self) -> str:
        return display.attribution_text(self)

    def _repr_html_(self) -> str:
        return display.attribution_html(self)

    def total(self) -> float:
        """The sum of all parts.

        Returns:
            ``per_token.sum() + constant + unembed_bias``, equal to `logit`.
        """
        return float(self.per_token.sum()) + self.constant + self.unembed_bias


@dataclass
class GapRow:
    """The ordinary Jacobian next to the detached one, for one layer's residual stream.

    Attributes:
        target: Hook name.
        detached_error: Relative reconstruction error of the detached system.
        plain_error: The same with the ordinary Jacobian in place of the detached one
            (same exact bias ``b``): how far the linearisation is from the model.
        operator_gap: ``‖J_plain − J_detached‖_F / ‖J_detached‖_F``.
    """

    target: str
    detached_error: float
    plain_error: float
    operator_gap: float
