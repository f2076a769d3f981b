"""Results of `token_attribution` and `nonlinearity_gap`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.deprecation import renamed_fields
from tl_linmap.base.errors import InputError
from tl_linmap.base.saving import Saveable
from tl_linmap.base.table import Table, table_row
from tl_linmap.present import display, views
from tl_linmap.results.logit_split import LogitSplit


@renamed_fields(sources="str_tokens")
@dataclass
class Attribution(Saveable):
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

    def show(self, backend: views.Backend = None) -> views.View:
        """The source tokens coloured by their part of the logit (blue raises it, red lowers it), for a notebook.

        With circuitsvis installed (the ``circuitsvis`` extra) its coloured tokens with a selector
        (`tl_linmap.present.views.colored_tokens`): the per-token total, then each component of
        `per_component`, then the largest heads (`tl_linmap.present.display.TOP_HEADS`, as ``L1H3``);
        hovering a token lists all of them. Otherwise, or with ``backend="html"``, this result's own
        HTML (the tokens coloured by their share, the component totals, the largest heads).

        Args:
            backend: ``"circuitsvis"``, ``"html"``, or None (circuitsvis where installed).

        Returns:
            A `tl_linmap.present.views.View`, displayed as a cell's value.

        Raises:
            InputError: for another backend, or ``"circuitsvis"`` where it is not installed.
        """
        heads = sorted(self.per_head.items(), key=lambda item: -abs(float(item[1].sum())))[: display.TOP_HEADS]
        columns = {f"logit of {self.token!r}": self.per_token, **self.per_component}
        columns.update({f"L{layer}H{head}": values for (layer, head), values in heads})
        values = torch.stack([v.to(self.per_token) for v in columns.values()], dim=1)
        tokens = self.str_tokens or [f"#{i}" for i in range(len(values))]  # as the own HTML names tokens it was not given
        return views.colored_tokens(tokens, values, list(columns), signed=True, html=self._repr_html_, backend=backend)

    def logit_split(self) -> LogitSplit:
        """The per-token split alone, as a `tl_linmap.results.logit_split.LogitSplit`.

        Returns:
            The same per-token terms; its constant is ``constant + unembed_bias``, so its
            parts still sum to `logit`.
        """
        return LogitSplit(self.token, self.str_tokens, self.per_token, self.constant + self.unembed_bias, self.logit)

    def to_table(self, by: Literal["component", "token", "head"] = "component") -> Table:
        """The logit's parts as a table.

        Args:
            by: ``"component"``: one row per component (its total over source tokens), then
                ``constant`` and ``b_U``; ``"token"``: one row per source token, then the
                constant (``b_U`` included); ``"head"``: one row per head (its total), layer
                by layer, without each layer's ``head_rest``.

        Returns:
            A `tl_linmap.base.table.Table`: of `tl_linmap.present.display.ComponentRow`, of
            `tl_linmap.results.logit_split.TokenShare` or of `HeadShare`. The component and token
            rows each sum to `logit`.

        Raises:
            InputError: for another ``by``.
        """
        if by == "component":
            return display.component_rows(self)
        if by == "token":
            return self.logit_split().to_table()
        if by == "head":
            return Table(HeadShare(layer, head, float(values.sum())) for (layer, head), values in self.per_head.items())
        raise InputError(f"by must be 'component', 'token' or 'head', got {by!r}.")

    def plot(self, kind: Literal["tokens", "components"] = "tokens", **options):
        """Bars of the logit's parts (needs the ``plot`` extra).

        Args:
            kind: ``"tokens"``: one bar per source token and the constant
                (`tl_linmap.present.plotting.plot_logit_contributions` of `logit_split`; takes
                ``skip_first``); ``"components"``: one bar per component, then the constants
                (`tl_linmap.present.plotting.plot_component_contributions`).
            **options: The plotting function's options (both take ``ax=``).

        Returns:
            The matplotlib Figure.

        Raises:
            InputError: for another kind.
        """
        from tl_linmap.present import plotting

        draw = plotting.plot_of(kind, {"tokens": "plot_logit_contributions", "components": "plot_component_contributions"})
        return draw(self.logit_split() if kind == "tokens" else self, **options)

    def total(self) -> float:
        """The sum of all parts.

        Returns:
            ``per_token.sum() + constant + unembed_bias``, equal to `logit`.
        """
        return float(self.per_token.sum()) + self.constant + self.unembed_bias


@table_row
@dataclass
class HeadShare:
    """One attention head's part of an output token's logit.

    Attributes:
        layer: Its block.
        head: Its index.
        total: Its logit contribution, summed over source tokens.
    """

    layer: int
    head: int
    total: float


@table_row
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
