"""Results of `sequence_attribution` and `generation_attribution`."""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxtyping import Float, Int
from torch import Tensor

from tl_linmap.base.checks import check_positive
from tl_linmap.base.deprecation import renamed_attribute
from tl_linmap.base.errors import InputError
from tl_linmap.base.hook_names import EMBED_HOOK
from tl_linmap.base.saving import Saveable
from tl_linmap.base.table import Table, table_row
from tl_linmap.present import display
from tl_linmap.reading.tokens import decode_tokens


@table_row
@dataclass
class SequenceRow:
    """One target position of a `SequenceAttribution`.

    Attributes:
        position: Target position ``t``.
        token: The input token at ``t``.
        predicted: The token whose logit the row attributes (a generated token), or ``""``.
        output: The model's value at ``t`` (a readout's value, or the vector's norm).
        bias: The affine part at ``t`` (its value, or its norm).
        top: The largest contributions, ``(source token, value)``, largest first.
    """

    position: int
    token: str
    predicted: str
    output: float
    bias: float
    top: list[tuple[str, float]]


@dataclass
class SequenceAttribution(Saveable):
    """Contributions of every source position to every target position of one prompt.

    Row ``r`` is target position ``positions[r]``; column ``i`` is source position ``i``
    (zero after the row's position: attention is causal).

    Attributes:
        target: The hook name, or the readout's name.
        kind: ``"value"``: additive shares of a scalar readout (``values[r].sum() + bias[r] ==
            output[r]``); ``"norm"``: contribution norms ``‖J_{t,i} x_i‖`` of a vector target.
        tokens: The input tokens.
        positions: Target position of each row.
        values: ``(rows, pos)`` contributions (shares or norms).
        bias: Per row, the affine part (its value, or ``‖b_t‖``).
        output: Per row, the model's value (the readout's value, or ``‖y_t‖``), from the frozen
            reference forward.
        relative_error: The largest ``‖Σ_i J_{t,i} x_i + b_t − y_t‖ / ‖y_t‖`` over rows (vectors).
        predicted: For a generated continuation, per row the token whose logit is attributed.
        source: The hook point the inputs are taken at (``hook_embed``: the token embeddings).
        model: The model (for decoding tokens).
    """

    target: str
    kind: str
    tokens: Int[Tensor, " pos"]
    positions: list[int]
    values: Float[Tensor, "rows pos"]
    bias: Float[Tensor, " rows"]
    output: Float[Tensor, " rows"]
    relative_error: float
    predicted: list[str] | None = None
    source: str = EMBED_HOOK
    model: object = field(default=None, repr=False)

    _TOKEN_IDS = "tokens"

    @property
    def str_tokens(self) -> list[str]:
        """The input tokens, decoded."""
        return decode_tokens(self.model, self.tokens)

    sources = renamed_attribute("sources", "str_tokens")

    def total(self) -> Float[Tensor, " rows"]:
        """Per row, the sum of the parts (a readout's shares plus its constant).

        Returns:
            ``values.sum(1) + bias``, equal to `output` to rounding.

        Raises:
            InputError: for contribution norms, which do not add up.
        """
        if self.kind != "value":
            raise InputError("Contribution norms do not add up; totals exist for a linear readout target (e.g. LogitDiff).")
        return self.values.sum(1) + self.bias

    def table(self, top: int = 3) -> Table:
        """One row per target position: its value, its affine part and its largest contributions.

        Args:
            top: Contributions listed per row (by absolute value).

        Returns:
            A `tl_linmap.base.table.Table` of `SequenceRow`.
        """
        top = check_positive("top", top)
        str_tokens = self.str_tokens
        rows = Table()
        for r, position in enumerate(self.positions):
            values = self.values[r, : position + 1]
            order = values.abs().argsort(descending=True)[:top]
            rows.append(SequenceRow(
                position, str_tokens[position], (self.predicted or [""] * len(self.positions))[r],
                float(self.output[r]), float(self.bias[r]), [(f"{int(i)}:{str_tokens[int(i)]}", float(values[i])) for i in order],
            ))
        return rows

    def to_table(self, top: int = 3) -> Table:
        """The shared name of `table`: one row per target position.

        Args:
            top: Contributions listed per row (by absolute value).

        Returns:
            A `tl_linmap.base.table.Table` of `SequenceRow`.
        """
        return self.table(top)

    def plot(self, *, skip_first: bool = False, ax=None):
        """A heatmap of the contributions (`tl_linmap.present.plotting.plot_sequence_attribution`).

        Args:
            skip_first: Leave the first source token (BOS, attention sink) out.
            ax: Axes to draw in (default: a new figure).

        Returns:
            The matplotlib Figure.
        """
        from tl_linmap.present.plotting import plot_sequence_attribution

        return plot_sequence_attribution(self, skip_first=skip_first, ax=ax)

    def __repr__(self) -> str:
        what = "shares of" if self.kind == "value" else "contribution norms of"
        rows = f"{len(self.positions)} target positions" + (f", generated {self.predicted!r}" if self.predicted else "")
        return (
            f"SequenceAttribution({what} {self.target} from {self.source}; {rows} x {len(self.tokens)} source positions; "
            f"relative error {self.relative_error:.1e})\n{self.table().to_string()}"
        )

    def _repr_html_(self) -> str:
        facts = [("target", self.target, False), ("source", self.source, False),
                 ("values", "shares (they add up)" if self.kind == "value" else "contribution norms", False),
                 ("target positions", str(len(self.positions)), True), ("source positions", str(len(self.tokens)), True),
                 ("relative error", f"{self.relative_error:.2e}", True)]
        return display.summary_html(f"Sequence attribution of {self.target}", facts, self.table()._repr_html_())
