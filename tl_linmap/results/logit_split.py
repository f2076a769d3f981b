"""A logit attribution: one token's logit split by input token."""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.deprecation import renamed_fields
from tl_linmap.base.saving import Saveable
from tl_linmap.base.table import Table, table_row
from tl_linmap.present import display, views


@table_row
@dataclass
class TokenShare:
    """One input token's term of a logit split, or its constant.

    Attributes:
        source: Input token index, or ``"constant"``.
        token: The input token (``""`` for the constant).
        value: Its term of the logit.
    """

    source: int | str
    token: str
    value: float


@renamed_fields(sources="str_tokens")
@dataclass
class LogitSplit(Saveable):
    """One token's logit (through the frozen final norm) split exactly over input tokens.

    For a target other than the model's output this is the logit lens of that target, made
    linear by freezing ``ln_final`` at the inference scale of the target position.

    Attributes:
        token: The output token.
        str_tokens: The decoded input tokens.
        per_token: ``w · J_i x_i`` per input token.
        constant: The affine part: ``w · b``, the norm's offset and ``b_U``.
        logit: The logit read off the target's own value.
    """

    token: str
    str_tokens: list[str]
    per_token: Float[Tensor, " pos"]
    constant: float
    logit: float

    def total(self) -> float:
        """The sum of the parts.

        Returns:
            ``per_token.sum() + constant``, equal to `logit` to rounding.
        """
        return float(self.per_token.sum()) + self.constant

    def __repr__(self) -> str:
        return display.attribution_text(self)

    def _repr_html_(self) -> str:
        return display.attribution_html(self)

    def show(self, backend: views.Backend = None) -> views.View:
        """The input tokens coloured by their term of the logit (blue raises it, red lowers it), for a notebook.

        With circuitsvis installed (the ``circuitsvis`` extra) its coloured tokens, on a scale
        symmetric about zero (`tl_linmap.present.views.colored_tokens`); otherwise, or with
        ``backend="html"``, this split's own HTML.

        Args:
            backend: ``"circuitsvis"``, ``"html"``, or None (circuitsvis where installed).

        Returns:
            A `tl_linmap.present.views.View`, displayed as a cell's value.

        Raises:
            InputError: for another backend, or ``"circuitsvis"`` where it is not installed.
        """
        return views.colored_tokens(self.str_tokens, self.per_token[:, None], [f"logit of {self.token!r}"], signed=True,
                                    html=self._repr_html_, backend=backend)

    def to_table(self) -> Table:
        """One row per input token, then the constant.

        Returns:
            A `tl_linmap.base.table.Table` of `TokenShare`; the values sum to `logit`.
        """
        rows = Table(TokenShare(i, token, float(v)) for i, (token, v) in enumerate(zip(self.str_tokens, self.per_token)))
        rows.append(TokenShare("constant", "", self.constant))
        return rows

    def plot(self, *, skip_first: bool = False, ax=None):
        """Bars of the split: one per input token, then the constant (needs the ``plot`` extra).

        Args:
            skip_first: Leave the first token's bar out (the title says how much it held).
            ax: Matplotlib axes to draw into (default: a new figure).

        Returns:
            The Figure (`tl_linmap.present.plotting.plot_logit_contributions`).
        """
        from tl_linmap.present.plotting import plot_logit_contributions

        return plot_logit_contributions(self, skip_first=skip_first, ax=ax)
