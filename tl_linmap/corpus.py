"""Corpus: analyses over many prompts, streamed, keeping only small per-prompt summaries.

`corpus_analysis` maps the residual stream of chosen layers for each prompt in turn, reads
what it needs from each map (singular values, the leading singular vectors of the stacked
operator decoded as tokens, the exact per-token split of the predicted token's logit) and
drops the operators before the next prompt, so memory stays that of one prompt's maps
whatever the number of prompts. The result, `CorpusAnalysis`, gives three tables:

- `CorpusAnalysis.dimensionality`: per layer and token role, the median and quartiles of the
  90%/99% energy ranks and of the stable rank over every operator of that role (the first
  token, an attention sink on most models, and the last token apart from the others; plus the
  stacked operator of every token but the first);
- `CorpusAnalysis.concepts`: per layer, the tokens its stacked operator's leading left singular
  vectors write most often across prompts;
- `CorpusAnalysis.attribution_profile`: each prompt's logit split over its tokens, normalised
  to shares of the prompt's total absolute attribution, averaged by token role and by relative
  position among the middle tokens.

The logit split is the last layer's map read through the frozen final norm
(`tl_linmap.results.TargetResult.logit_contributions`): the same per-token terms as
`tl_linmap.token_attribution`'s ``per_token``, without the module maps of every layer it needs.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_linmap.compat import check_model, get_act_name
from tl_linmap.errors import InputError
from tl_linmap.inputs import Prompt, check_layers, check_positive
from tl_linmap.jacobian import linear_maps
from tl_linmap.readout import token_id
from tl_linmap.results import LinearMaps
from tl_linmap.spectral import energy_rank, stable_rank
from tl_linmap.table import Table

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


@dataclass
class PromptSummary:
    """What `corpus_analysis` keeps of one prompt: a few numbers per operator, no operators.

    Attributes:
        sources: The prompt's tokens, decoded.
        ranks: Per hook name, one ``(role, rank90, rank99, stable rank)`` per operator up to
            the target position, then the stacked operator's (role ``"stacked"``).
        concepts: Per hook name, the distinct tokens among the top tokens of the stacked
            operator's leading left singular vectors.
        token: The output token whose logit is split (decoded).
        attribution: That logit's exact per-token terms (the last layer's map).
    """

    sources: list[str]
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


@dataclass
class CorpusAnalysis:
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

    def __repr__(self) -> str:
        return f"CorpusAnalysis({len(self.summaries)} prompts, {len(self.targets)} targets, k={self.k}, top={self.top})"

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
            A `tl_linmap.table.Table` of `RankSpread`, layer by layer, then role by role
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
            A `tl_linmap.table.Table` of `ConceptCount`, one row per target.
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
            A `tl_linmap.table.Table` of `ProfileRow`: ``"first"``, the middle bands in order,
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


#: Prompts mapped together by `corpus_analysis` (one batched call, `tl_linmap.jacobian.batched_linear_maps`).
PROMPTS_PER_CALL = 8
_END = object()


def _maps_for(
    model, prompts: Iterable[Prompt], targets: list[str], dtype: torch.dtype | None, rows_per_pass: int | None,
) -> Iterator[LinearMaps]:
    # A few prompts at a time through the batched call (their passes shared), so memory stays bounded.
    group: list[Prompt] = []
    for prompt in itertools.chain(prompts, [_END]):
        if prompt is not _END:
            group.append(prompt)
        if group and (prompt is _END or len(group) == PROMPTS_PER_CALL):
            yield from linear_maps(model, group, targets, dtype=dtype, rows_per_pass=rows_per_pass)
            group = []


def summarise(maps: LinearMaps, targets: Sequence[str], final: str, token: int | None, *, k: int, top: int) -> PromptSummary:
    """Keep what the corpus tables need of one prompt's maps.

    Args:
        maps: The prompt's maps (every name in ``targets``, and ``final``).
        targets: Hook names to summarise (residual stream).
        final: The last layer's ``hook_resid_post``, whose map splits the logit.
        token: Output token id whose logit is split (None: the token the model predicts).
        k: Leading singular vectors decoded per stacked operator.
        top: Tokens read off each.

    Returns:
        A `PromptSummary`.

    Raises:
        InputError: for a one-token prompt (no token besides the first to stack).
    """
    ranks, concepts = {}, {}
    for name in targets:
        lm = maps[name]
        if lm.position < 1:
            raise InputError(
                f"Prompt {lm.sources!r} has one token: a corpus analysis sets the first token apart, so give prompts of two or more tokens."
            )
        svd = lm.svd(k, skip_first=True)
        rows = [(token_role(i, lm.position), *_ranks(values)) for i, values in zip(svd.tokens, svd.values)]
        ranks[name] = rows + [("stacked", *_ranks(svd.stacked.values))]
        decoded = svd.decode(k, top, sources=[], stacked=True)
        concepts[name] = list(dict.fromkeys(t for pair in decoded for t, _ in pair.left))
    last = maps[final]
    if token is None:
        token = int(last.readout.logits(last.output, affine=True).argmax())
    split = last.logit_contributions(token)
    return PromptSummary(last.sources, ranks, concepts, split.token, split.per_token.detach().cpu())


def _ranks(values: Tensor) -> tuple[int, int, float]:
    return energy_rank(values, 0.9), energy_rank(values, 0.99), stable_rank(values)


def corpus_analysis(
    model,
    prompts: Iterable[Prompt],
    *,
    layers: Sequence[int] | None = None,
    k: int = 3,
    top: int = 5,
    token: int | str | None = None,
    dtype: torch.dtype | None = torch.float64,
    rows_per_pass: int | None = None,
    progress: bool = True,
) -> CorpusAnalysis:
    """Dimensionality, decoded concepts and attribution profiles of many prompts, streamed.

    Each prompt's residual-stream maps (``hook_resid_post`` of every chosen layer, at the last
    position) are computed, summarised (`summarise`) and dropped before the next prompt, so
    ``prompts`` may be a generator of any length.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompts: Prompts (text or token ids), each of two or more tokens; any iterable.
        layers: Block indices (default: all); the last layer is always mapped too, as its map
            splits the logit.
        k: Leading singular vectors of each stacked operator decoded for `CorpusAnalysis.concepts`.
        top: Tokens read off each of them.
        token: Output token whose logit is split in every prompt (default: each prompt's own
            predicted next token).
        dtype: Working dtype (float64 default; float32 is about twice as fast).
        rows_per_pass: Rows per batched pass (see `tl_linmap.jacobian.linear_maps`).
        progress: Show a progress bar over prompts.

    Returns:
        A `CorpusAnalysis`.

    Raises:
        InputError: for a bad model, layers, ``k``, ``top`` or token, no prompt at all, a
            one-token prompt, or any bad prompt (as `tl_linmap.linear_map` would).
    """
    check_model(model)
    check_positive("k", k)
    check_positive("top", top, at_most=model.cfg.d_vocab)
    layers = check_layers(layers, model.cfg.n_layers)
    final = get_act_name("resid_post", model.cfg.n_layers - 1)
    targets = [get_act_name("resid_post", layer) for layer in layers]
    mapped = targets if final in targets else targets + [final]
    token = None if token is None else token_id(model, token)
    analysis = CorpusAnalysis(targets, k=k, top=top)
    if isinstance(prompts, str):
        raise InputError(f"prompts must be a list (or any iterable) of prompts, got one string: pass [{prompts!r}].")
    total = len(prompts) if isinstance(prompts, Sequence) else None
    for maps in tqdm(_maps_for(model, prompts, mapped, dtype, rows_per_pass), total=total, disable=not progress, desc="prompts"):
        analysis.summaries.append(summarise(maps, targets, final, token, k=k, top=top))
    if not analysis.summaries:
        raise InputError("No prompts: give at least one prompt (e.g. tl_linmap.datasets.phrases()).")
    return analysis
