"""Results of `corpus_analysis`: rank spreads, concept counts, attribution profiles."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.checks import check_positive
from tl_linmap.base.deprecation import renamed_fields
from tl_linmap.base.errors import InputError
from tl_linmap.base.saving import Saveable
from tl_linmap.base.table import Table, table_row
from tl_linmap.present import display

#: Token roles of `CorpusAnalysis.dimensionality`: single operators by where their token sits,
#: and the stacked operator ``[J_1 … J_n]`` of every token but the first.
ROLES = ("first", "middle", "last", "stacked")


def token_role(index: int, position: int) -> str:
    """Where an input token sits relative to the target position.

    Args:
        index: Input token index (non-negative).
        position: Target position (non-negative, at least 1).

    Returns:
        ``"first"`` for index 0, ``"last"`` for the target position, ``"middle"`` otherwise.
    """
    if index == 0:
        return "first"
    return "last" if index == position else "middle"


@table_row
@dataclass
class RankSpread:
    """How many dimensions the operators of one layer and token role use, across prompts.

    Attributes:
        target: Hook name.
        role: One of `ROLES`.
        operators: How many operators the statistics are over.
        rank90_q1: First quartile of the 90% energy rank.
        rank90_median: Its median.
        rank90_q3: Its third quartile.
        rank99_q1: First quartile of the 99% energy rank.
        rank99_median: Its median.
        rank99_q3: Its third quartile.
        stable_q1: First quartile of the stable rank ``Σσ²/σ_max²``.
        stable_median: Its median.
        stable_q3: Its third quartile.
    """

    target: str
    role: str
    operators: int
    rank90_q1: float
    rank90_median: float
    rank90_q3: float
    rank99_q1: float
    rank99_median: float
    rank99_q3: float
    stable_q1: float
    stable_median: float
    stable_q3: float


@table_row
@dataclass
class ConceptCount:
    """The tokens one layer's leading singular directions write most often across prompts.

    Attributes:
        target: Hook name.
        prompts: How many prompts were read.
        tokens: ``(token, share of prompts)``, most frequent first: the share of prompts whose
            stacked operator (first token left out) writes the token among the top tokens of one
            of its leading left singular vectors.
    """

    target: str
    prompts: int
    tokens: list[tuple[str, float]]


@table_row
@dataclass
class ProfileRow:
    """Averaged attribution of one token role (or band of relative positions) across prompts.

    Attributes:
        segment: ``"first"``, ``"middle a-b"`` (relative position among the middle tokens,
            0 = just after the first, 1 = just before the last) or ``"last"``.
        tokens: How many token terms fall in it, over all prompts.
        prompts: How many prompts have at least one token in it.
        mean_share: Mean of one token's share (its logit term over the prompt's total
            absolute attribution, so signed and in [-1, 1]).
        total_share: Mean over those prompts of the segment's summed shares.
    """

    segment: str
    tokens: int
    prompts: int
    mean_share: float
    total_share: float


@renamed_fields(sources="str_tokens")
@dataclass
class PromptSummary(Saveable):
    """What `corpus_analysis` keeps of one prompt: a few numbers per operator, no operators.

    Attributes:
        str_tokens: The prompt's tokens, decoded.
        ranks: Per hook name, one ``(role, rank90, rank99, stable rank)`` per operator up to
            the target position, then the stacked operator's (role ``"stacked"``).
        concepts: Per hook name, the distinct tokens among the top tokens of the stacked
            operator's leading left singular vectors.
        token: The output token whose logit is split (decoded).
        attribution: That logit's exact per-token terms (the last layer's map).
    """

    str_tokens: list[str]
    ranks: dict[str, list[tuple[str, int, int, float]]]
    concepts: dict[str, list[str]]
    token: str
    attribution: Float[Tensor, " pos"]

    def shares(self) -> Float[Tensor, " pos"]:
        """The attribution normalised to shares of the prompt's total absolute attribution.

        Returns:
            ``a_i / Σ|a_j|`` per token (zeros if every term is zero).
        """
        total = self.attribution.abs().sum()
        return self.attribution / total if total > 0 else torch.zeros_like(self.attribution)

    def _facts(self) -> list[display.Fact]:
        return [("tokens", str(len(self.str_tokens)), True), ("logit of", repr(self.token), False),
                ("targets", ", ".join(self.ranks), False)]

    def __repr__(self) -> str:
        shares = self.shares().tolist()
        order = sorted(range(len(shares)), key=lambda i: -abs(shares[i]))[:5]
        largest = ", ".join(f"{i}:{self.str_tokens[i]!r} {shares[i]:+.2f}" for i in order)
        return display.summary_text(type(self).__name__, self._facts(), f"largest shares of the logit: {largest}")

    def _repr_html_(self) -> str:
        caption = "<div>Shares of the logit: blue raises it, red lowers it (hover for values).</div>"
        return display.summary_html(f"One prompt of a corpus analysis: {''.join(self.str_tokens)!r}", self._facts(), caption,
                                    display.tokens_html(self.str_tokens, self.shares(), signed=True))


@dataclass
class CorpusAnalysis(Saveable):
    """Per-prompt summaries of many prompts' linear maps, and the tables over them.

    Attributes:
        targets: Hook names analysed, layer by layer.
        summaries: One `PromptSummary` per prompt, in order.
        k: Leading singular vectors decoded per operator.
        top: Tokens read off each of them.
    """

    targets: list[str]
    summaries: list[PromptSummary] = field(default_factory=list, repr=False)
    k: int = 3
    top: int = 5

    #: Its three tables by kind (the method), and their plots (the `tl_linmap.present.plotting` function).
    _TABLES = {"dimensionality": "dimensionality", "concepts": "concepts", "attribution": "attribution_profile"}
    _PLOTS = {"dimensionality": "plot_corpus_dimensionality", "concepts": "plot_corpus_concepts", "attribution": "plot_corpus_attribution"}

    def __repr__(self) -> str:
        return f"CorpusAnalysis({len(self.summaries)} prompts, {len(self.targets)} targets, k={self.k}, top={self.top})"

    def _repr_html_(self) -> str:
        facts = [("prompts", str(len(self.summaries)), True), ("targets", ", ".join(self.targets), False),
                 ("singular vectors read", str(self.k), True), ("tokens per vector", str(self.top), True)]
        captions = {"dimensionality": "Ranks per layer and token role (median, quartiles)",
                    "concepts": "Tokens each layer writes most often", "attribution": "The logit's shares by token role, averaged"}
        tables = [f"<div>{caption}</div>{self.to_table(kind)._repr_html_()}" for kind, caption in captions.items()]
        return display.summary_html(f"Corpus analysis of {len(self.summaries)} prompts", facts, *tables)

    def to_table(self, kind: Literal["dimensionality", "concepts", "attribution"] = "dimensionality", **options) -> Table:
        """One of the analysis's three tables, by the name its plot has.

        Args:
            kind: ``"dimensionality"`` (`dimensionality`, options ``roles``), ``"concepts"``
                (`concepts`, ``top``) or ``"attribution"`` (`attribution_profile`, ``bands``).
            **options: The method's options.

        Returns:
            A `tl_linmap.base.table.Table` of `RankSpread`, `ConceptCount` or `ProfileRow`.

        Raises:
            InputError: for another kind.
        """
        if kind not in self._TABLES:
            raise InputError(f"kind must be one of {', '.join(map(repr, self._TABLES))}, got {kind!r}.")
        return getattr(self, self._TABLES[kind])(**options)

    def plot(self, kind: Literal["dimensionality", "concepts", "attribution"] = "dimensionality", **options):
        """Draw one of the three tables (needs the ``plot`` extra).

        Args:
            kind: ``"dimensionality"``: `tl_linmap.present.plotting.plot_corpus_dimensionality`,
                median and quartile band of one rank (``measure="rank90"``, ``"rank99"``,
                ``"stable"``) per layer and token role; ``"concepts"``: `plot_corpus_concepts`,
                the tokens each layer writes (``top``); ``"attribution"``: `plot_corpus_attribution`,
                the averaged attribution profile (``bands``).
            **options: The plotting function's options (all take ``ax=``).

        Returns:
            The matplotlib Figure.

        Raises:
            InputError: for another kind.
        """
        from tl_linmap.present import plotting

        return plotting.plot_of(kind, self._PLOTS)(self, **options)

    def ranks(self, target: str, role: str) -> Float[Tensor, "n 3"]:
        """Every operator's ranks of one target and role, over all prompts.

        Args:
            target: Hook name (one of `targets`).
            role: One of `ROLES`.

        Returns:
            One row ``(rank90, rank99, stable rank)`` per operator (float64).

        Raises:
            InputError: for a target not analysed or an unknown role.
        """
        if target not in self.targets:
            raise InputError(f"No target {target!r} in this analysis; it has {self.targets}.")
        if role not in ROLES:
            raise InputError(f"role must be one of {ROLES}, got {role!r}.")
        rows = [r[1:] for s in self.summaries for r in s.ranks[target] if r[0] == role]
        return torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)

    def dimensionality(self, roles: Sequence[str] = ROLES) -> Table:
        """Median and quartiles of the 90%/99% energy ranks and the stable rank, per layer and role.

        Args:
            roles: Token roles to report (default: `ROLES`).

        Returns:
            A `tl_linmap.base.table.Table` of `RankSpread`, layer by layer, then role by role
            (roles with no operator, e.g. ``"middle"`` for two-token prompts, are left out).
        """
        table = Table()
        quartiles = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        for target in self.targets:
            for role in roles:
                values = self.ranks(target, role)
                if len(values):
                    q = torch.quantile(values, quartiles, dim=0).T.flatten().tolist()
                    table.append(RankSpread(target, role, len(values), *q))
        return table

    def concepts(self, top: int = 10) -> Table:
        """The tokens each layer's stacked operator writes most often, across prompts.

        Args:
            top: Tokens per layer.

        Returns:
            A `tl_linmap.base.table.Table` of `ConceptCount`, one row per target.
        """
        check_positive("top", top)
        table = Table()
        n = len(self.summaries)
        for target in self.targets:
            counts = Counter(token for s in self.summaries for token in s.concepts[target])
            table.append(ConceptCount(target, n, [(token, c / n) for token, c in counts.most_common(top)]))
        return table

    def attribution_profile(self, bands: int = 3) -> Table:
        """Each prompt's logit split over its tokens, as shares, averaged by token role and position.

        Args:
            bands: Bands of relative position the middle tokens are split into.

        Returns:
            A `tl_linmap.base.table.Table` of `ProfileRow`: ``"first"``, the middle bands in order,
            ``"last"``.
        """
        check_positive("bands", bands)
        segments = ["first"] + [f"middle {b / bands:.2f}-{(b + 1) / bands:.2f}" for b in range(bands)] + ["last"]
        per_token = {s: [] for s in segments}
        per_prompt = {s: [] for s in segments}
        for summary in self.summaries:
            shares = summary.shares().tolist()
            sums = Counter()
            for i, share in enumerate(shares):
                segment = _segment(i, len(shares) - 1, bands, segments)
                per_token[segment].append(share)
                sums[segment] += share
            for segment, total in sums.items():
                per_prompt[segment].append(total)
        return Table(
            ProfileRow(s, len(per_token[s]), len(per_prompt[s]), _mean(per_token[s]), _mean(per_prompt[s]))
            for s in segments if per_token[s]
        )


def _segment(index: int, last: int, bands: int, segments: list[str]) -> str:
    # Middle tokens 1..last-1 spread over the bands by relative position (i-1)/(last-1).
    role = token_role(index, last)
    if role != "middle":
        return role
    band = min(int((index - 1) / (last - 1) * bands), bands - 1)
    return segments[1 + band]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
