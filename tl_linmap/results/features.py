"""Results of `tl_linmap.feature_contributions`: a target split exactly into features, errors, tokens and a constant."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_linmap.base.exactness import check_exact
from tl_linmap.base.saving import Saveable
from tl_linmap.base.table import Table, number_text, table_row
from tl_linmap.present import display
from tl_linmap.reading.tokens import decode_tokens


@table_row
@dataclass
class FeatureRow:
    """One term of a `FeatureContributions`: an active feature, an error term, a token or a module.

    Attributes:
        kind: ``"feature"``, ``"error"``, ``"token"``, ``"attn"`` or ``"mlp"``.
        site: The dictionary's hook (a module's: its output hook; a token's: ``hook_embed``).
        position: Sequence position.
        token: The input token there.
        feature: Feature id (None for the other kinds).
        activation: The feature's activation (None for the other kinds).
        contribution: Its direct effect on the target (a vector target: the effect's norm).
    """

    kind: str
    site: str
    position: int
    token: str
    feature: int | None
    activation: float | None
    contribution: float


@dataclass(frozen=True)
class FeatureContributions(Saveable):
    """A target as the exact sum of direct effects: every active feature, error term, input token (and module).

    With attention patterns, norm scales, activations and every dictionary's feature mask frozen,
    the target is affine in the nodes' values: the features' activations (written ``a_f W_dec[f]``
    into their dictionary's output), the error terms, the token embeddings (and, with
    ``modules=True``, every block's attention and MLP outputs). A node's direct effect is its
    value times the target's derivative with every other node held fixed, so

        ``Σ features + Σ errors + Σ tokens (+ Σ modules) + constant = target``

    exactly (checked on construction, `check`). A feature's ``map`` is its decoder direction pushed
    through the frozen system to the target (its effect per unit activation).

    Attributes:
        target: What was split (a hook name, or a readout's name).
        position: Target position.
        sites: The dictionaries' output hooks, in model order.
        features: ``(n, 3)`` ints: site index, position, feature id of every active feature.
        activations: ``(n,)`` their activations.
        values: ``(n, k)`` their direct effects (``k = 1`` for a scalar target, ``d_out`` for a hook point).
        maps: ``(n, k)`` their maps: effect per unit activation.
        errors: ``(site, pos, k)`` the error terms' direct effects (zero where a dictionary has none).
        has_error: Per site, whether it has an error term.
        tokens: ``(pos, k)`` the token embeddings' direct effects.
        modules: Per module output hook (``blocks.L.hook_attn_out`` / ``hook_mlp_out``), ``(pos, k)``; empty unless asked.
        constant: ``(k,)`` what no node carries (biases, positional embeddings, the readout's constant).
        output: ``(k,)`` the target's value in the frozen forward (the reference the sum is checked against).
        input_ids: The prompt's token ids.
        convention: The error convention of the dictionaries (``"live"``, ``"constant"``, ``"none"``).
        model: The model (for decoding tokens).
    """

    target: str
    position: int
    sites: tuple[str, ...]
    features: Int[Tensor, "n 3"] = field(repr=False)
    activations: Float[Tensor, " n"] = field(repr=False)
    values: Float[Tensor, "n k"] = field(repr=False)
    maps: Float[Tensor, "n k"] = field(repr=False)
    errors: Float[Tensor, "site pos k"] = field(repr=False)
    has_error: tuple[bool, ...]
    tokens: Float[Tensor, "pos k"] = field(repr=False)
    modules: dict[str, Tensor] = field(repr=False)
    constant: Float[Tensor, " k"] = field(repr=False)
    output: Float[Tensor, " k"] = field(repr=False)
    input_ids: Tensor = field(repr=False)
    convention: str = "live"
    model: object = field(default=None, repr=False, compare=False)

    _TOKEN_IDS = "input_ids"

    def __post_init__(self) -> None:
        self.check()

    @property
    def scalar(self) -> bool:
        """Whether the target is one number (a logit, a logit difference, a direction)."""
        return self.values.shape[1] == 1

    @property
    def str_tokens(self) -> list[str]:
        """The input tokens, decoded."""
        return decode_tokens(self.model, self.input_ids)

    def total(self) -> Float[Tensor, " k"]:
        """The sum of every node's direct effect and the constant: the target, rebuilt.

        Returns:
            ``(k,)``.
        """
        modules = sum((m.sum(0) for m in self.modules.values()), torch.zeros_like(self.constant))
        return self.values.sum(0) + self.errors.sum((0, 1)) + self.tokens.sum(0) + modules + self.constant

    def relative_error(self) -> float:
        """How far the rebuilt target is from the frozen forward's, relative to the larger of it and its parts.

        Large parts that cancel to a small target (features against their error term) carry rounding of
        their own size, so the gap is measured against ``max(‖output‖, ‖Σ |part|‖)``.

        Returns:
            ``‖total − output‖ / max(‖output‖, ‖Σ |part|‖)``.
        """
        parts = self.values.abs().sum(0) + self.errors.abs().sum((0, 1)) + self.tokens.abs().sum(0) + self.constant.abs()
        parts = parts + sum((m.abs().sum(0) for m in self.modules.values()), torch.zeros_like(parts))
        scale = max(float(self.output.norm()), float(parts.norm()))
        gap = float((self.total() - self.output).norm())
        return gap / scale if scale else (0.0 if gap == 0 else float("inf"))

    def check(self) -> float:
        """Raise `tl_linmap.base.errors.FreezeError` unless the parts sum to the target.

        Returns:
            The relative error.
        """
        return check_exact(self.relative_error(), self.output.dtype, f"{self.target} (features)")

    def _size(self, values: Tensor) -> Tensor:
        return values[..., 0] if self.scalar else values.norm(dim=-1)

    def feature(self, site: str | int, position: int, feature: int) -> FeatureRow:
        """One active feature's row.

        Args:
            site: The dictionary's hook name (or its index in `sites`).
            position: Sequence position.
            feature: Feature id.

        Returns:
            Its `FeatureRow`.

        Raises:
            KeyError: for a site that is not one of `sites`, or a feature not active there.
        """
        if isinstance(site, str) and site not in self.sites:
            raise KeyError(f"No dictionary writes {site!r} here; the sites are {', '.join(map(repr, self.sites))}.")
        index = self.sites.index(site) if isinstance(site, str) else site
        hit = ((self.features[:, 0] == index) & (self.features[:, 1] == position) & (self.features[:, 2] == feature)).nonzero()
        if not len(hit):
            raise KeyError(f"Feature {feature} of {self.sites[index]} is not active at position {position}.")
        return self._feature_row(int(hit[0, 0]))

    def _feature_row(self, i: int) -> FeatureRow:
        site, pos, fid = self.features[i].tolist()
        return FeatureRow("feature", self.sites[site], pos, self.str_tokens[pos], fid, float(self.activations[i]), float(self._size(self.values[i])))

    def rows(self) -> list[FeatureRow]:
        """Every node as a row: features, then error terms, tokens and modules.

        Returns:
            The `FeatureRow` list, in that order.
        """
        tokens = self.str_tokens
        rows = [self._feature_row(i) for i in range(len(self.features))]
        sizes = self._size(self.errors)
        rows += [FeatureRow("error", site, p, tokens[p], None, None, float(sizes[s, p])) for s, site in enumerate(self.sites) if self.has_error[s] for p in range(len(tokens))]
        rows += [FeatureRow("token", "hook_embed", p, tokens[p], None, None, float(v)) for p, v in enumerate(self._size(self.tokens))]
        for name, values in self.modules.items():
            kind = "attn" if name.endswith("attn_out") else "mlp"
            rows += [FeatureRow(kind, name, p, tokens[p], None, None, float(v)) for p, v in enumerate(self._size(values))]
        return rows

    def top(self, n: int = 10, *, kind: str | None = "feature", signed: bool = True) -> Table:
        """The largest terms.

        Args:
            n: How many.
            kind: Only rows of this kind (``"feature"``, ``"error"``, ``"token"``, ...); None: every kind.
            signed: Largest first by signed value (a scalar target); False: by magnitude.

        Returns:
            A `tl_linmap.base.table.Table` of `FeatureRow`.
        """
        rows = [r for r in self.rows() if kind is None or r.kind == kind]
        key = (lambda r: -r.contribution) if signed and self.scalar else (lambda r: -abs(r.contribution))
        return Table(sorted(rows, key=key)[:n])

    def by_site(self) -> dict[str, Float[Tensor, " k"]]:
        """The features' direct effects summed per dictionary.

        Returns:
            Per site, ``(k,)``.
        """
        return {site: self.values[self.features[:, 0] == s].sum(0) for s, site in enumerate(self.sites)}

    def to_table(self) -> Table:
        """Every node's row (`rows`), the largest first.

        Returns:
            A `tl_linmap.base.table.Table` of `FeatureRow`.
        """
        return self.top(len(self.rows()), kind=None, signed=False)

    def plot(self, n: int = 20, ax=None):
        """Bar chart of the ``n`` largest terms (`tl_linmap.present.plotting.plot_feature_contributions`).

        Args:
            n: How many terms.
            ax: A matplotlib axis (default: a new figure).

        Returns:
            The axis.
        """
        from tl_linmap.present.plotting import plot_feature_contributions

        return plot_feature_contributions(self, n=n, ax=ax)

    def _facts(self) -> list:
        parts = self.total()
        return [
            ("target", self.target, False),
            ("position", f"{self.position} ({self.str_tokens[self.position]!r})", False),
            ("active features", str(len(self.features)), True),
            ("features", number_text(float(self._size(self.values.sum(0)))), True),
            ("errors", number_text(float(self._size(self.errors.sum((0, 1))))), True),
            ("tokens", number_text(float(self._size(self.tokens.sum(0)))), True),
            ("constant", number_text(float(self._size(self.constant))), True),
            ("total", number_text(float(self._size(parts))), True),
            ("relative error", f"{self.relative_error():.1e}", True),
        ]

    def __repr__(self) -> str:
        return display.summary_text("FeatureContributions", self._facts(), str(self.top(5, kind=None, signed=False)))

    def _repr_html_(self) -> str:
        return display.summary_html(f"Feature contributions to {self.target}", self._facts(), self.top(10, kind=None, signed=False)._repr_html_())


@table_row
@dataclass
class PatchRow:
    """One feature's predicted patch: its activation taken from the corrupted run into the clean run.

    Attributes:
        site: The feature's dictionary.
        position: Sequence position.
        token: The clean prompt's token there.
        feature: Feature id.
        clean: Its activation in the clean run.
        corrupted: In the corrupted run.
        effect: The predicted change of the metric.
    """

    site: str
    position: int
    token: str
    feature: int
    clean: float
    corrupted: float
    effect: float


@dataclass(frozen=True)
class FeaturePatching(Saveable):
    """The predicted effect on a metric of patching every feature, one at a time, from a corrupted run into a clean one.

    In the clean run's frozen system (its patterns, norm scales, activations and feature masks fixed,
    the patched dictionary's error term held at its clean value, as SAELens' ``use_error_term``
    patches do) the metric is affine in each feature's activation, so patching feature ``f`` changes
    it by exactly ``J_f · (a_f^corrupted − a_f^clean)``; one reverse pass per dictionary gives every ``J_f``.

    Attributes:
        metric: The metric's name.
        sites: The dictionaries' output hooks.
        values: Per site, ``(pos, d_sae)`` predicted Δmetric (zero where the feature is off in both runs).
        clean: Per site, ``(pos, d_sae)`` the clean run's activations.
        corrupted: Per site, the corrupted run's.
        clean_metric: The metric of the clean run (frozen forward).
        corrupted_metric: The metric of the corrupted run.
        str_tokens: The clean prompt's tokens.
    """

    metric: str
    sites: tuple[str, ...]
    values: dict[str, Tensor] = field(repr=False)
    clean: dict[str, Tensor] = field(repr=False)
    corrupted: dict[str, Tensor] = field(repr=False)
    clean_metric: float
    corrupted_metric: float
    str_tokens: list[str] = field(repr=False)

    def top(self, n: int = 10) -> Table:
        """The patches with the largest predicted effect.

        Args:
            n: How many.

        Returns:
            A `tl_linmap.base.table.Table` of `PatchRow`, largest |effect| first.
        """
        rows = []
        for site in self.sites:
            values = self.values[site]
            flat = values.abs().flatten()
            for index in flat.topk(min(n, len(flat))).indices.tolist():
                p, f = divmod(index, values.shape[1])
                rows.append(PatchRow(site, p, self.str_tokens[p], f, float(self.clean[site][p, f]), float(self.corrupted[site][p, f]), float(values[p, f])))
        return Table(sorted(rows, key=lambda r: -abs(r.effect))[:n])

    def to_table(self) -> Table:
        """Every patch with a nonzero predicted effect, largest first.

        Returns:
            A `tl_linmap.base.table.Table` of `PatchRow`.
        """
        return self.top(sum(int((v != 0).sum()) for v in self.values.values()))

    def _facts(self) -> list:
        return [("metric", self.metric, False), ("clean", number_text(self.clean_metric), True),
                ("corrupted", number_text(self.corrupted_metric), True), ("dictionaries", str(len(self.sites)), True)]

    def __repr__(self) -> str:
        return display.summary_text("FeaturePatching", self._facts(), str(self.top(5)))

    def _repr_html_(self) -> str:
        return display.summary_html(f"Predicted feature patches of {self.metric}", self._facts(), self.top(10)._repr_html_())
