"""Results of `expert_contributions`: a mixture-of-experts layer's output split by expert."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.saving import Saveable
from tl_linmap.base.table import Table, table_row
from tl_linmap.present import display
from tl_linmap.reading.tokens import decode_tokens


@table_row
@dataclass
class ExpertRow:
    """What one expert of a block (or every other path) carried, over the tokens up to the target.

    Attributes:
        expert: The expert's index, or ``"rest"`` for every other path.
        carried: ``Σ_i ‖part_i‖``, its parts' norms summed over input tokens.
        source: The input token whose part is largest.
        token: That token.
        largest: Its part's norm.
    """

    expert: int | str
    carried: float
    source: int
    token: str
    largest: float


@dataclass(frozen=True)
class ExpertContributions(Saveable):
    """Which expert of one block carried which token's contribution to a target.

    With every factor frozen the target is affine in the block's MLP output, and that output is
    the frozen-weighted sum of the experts' outputs, each linear in the token embeddings; so
    ``J_i x_i`` splits exactly into one part per expert of the block and the rest (every other
    path: attention, the residual stream, a shared expert, other blocks).

    Attributes:
        values: ``(expert, pos, d_out)``: token ``i``'s contribution through expert ``experts[j]``.
        rest: ``(pos, d_out)``: token ``i``'s contribution along every other path.
        experts: The experts the router chose for some token up to the target (the others carry nothing).
        layer: The block.
        target: Target hook name.
        position: Target position.
        tokens: The prompt's token ids.
        model: The model (for decoding tokens).
    """

    values: Float[Tensor, "expert pos d_out"]
    rest: Float[Tensor, "pos d_out"]
    experts: tuple[int, ...]
    layer: int
    target: str
    position: int
    tokens: Tensor
    model: object = field(default=None, repr=False, compare=False)

    _TOKEN_IDS = "tokens"

    @property
    def str_tokens(self) -> list[str]:
        """The input tokens, decoded."""
        return decode_tokens(self.model, self.tokens)

    def contributions(self) -> Float[Tensor, "pos d_out"]:
        """Per-token contributions ``J_i x_i``: the experts' parts plus the rest.

        Returns:
            ``values.sum(0) + rest``.
        """
        return self.values.sum(0) + self.rest

    def norms(self) -> Float[Tensor, "expert pos"]:
        """How much each expert carried of each token's contribution.

        Returns:
            The norm of every ``values[j, i]``.
        """
        return self.values.norm(dim=-1)

    def __repr__(self) -> str:
        carried = self.norms().sum(1)
        top = ", ".join(f"{e}: {float(c):.3g}" for e, c in sorted(zip(self.experts, carried.tolist()), key=lambda ec: -ec[1])[:4])
        return (
            f"ExpertContributions(block {self.layer}, {self.target} at position {self.position}, "
            f"{len(self.experts)} experts; summed norm carried: {top})"
        )

    def _repr_html_(self) -> str:
        facts = [("block", str(self.layer), True), ("target", self.target, False),
                 ("position", f"{self.position} ({self.str_tokens[self.position]!r})", False), ("experts used", str(len(self.experts)), True)]
        return display.summary_html(f"Block {self.layer}'s experts' parts of the contributions to {self.target}", facts,
                                    self.to_table()._repr_html_())

    def to_table(self) -> Table:
        """One row per expert the router chose, then one for every other path.

        Returns:
            A `tl_linmap.base.table.Table` of `ExpertRow`, over the tokens up to the target position.
        """
        live = self.position + 1
        norms = torch.cat([self.norms(), self.rest.norm(dim=-1)[None]])[:, :live]
        str_tokens = self.str_tokens
        rows = Table()
        for expert, parts in zip([*self.experts, "rest"], norms):
            i = int(parts.argmax())
            rows.append(ExpertRow(expert, float(parts.sum()), i, str_tokens[i], float(parts[i])))
        return rows

    def plot(self, *, rest: bool = False, ax=None):
        """Heatmap of the experts' parts per input token (needs the ``plot`` extra).

        Args:
            rest: Add a row for every other path (usually much the largest).
            ax: Matplotlib axes to draw into (default: a new figure).

        Returns:
            The Figure (`tl_linmap.present.plotting.plot_expert_contributions`).
        """
        from tl_linmap.present.plotting import plot_expert_contributions

        return plot_expert_contributions(self, rest=rest, ax=ax)


