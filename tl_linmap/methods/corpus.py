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
(`tl_linmap.results.maps.TargetResult.logit_contributions`): the same per-token terms as
`tl_linmap.token_attribution`'s ``per_token``, without the module maps of every layer it needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from tl_linmap.base.checks import check_layers, check_positive
from tl_linmap.base.compat import check_model, get_act_name
from tl_linmap.base.errors import InputError
from tl_linmap.base.prompts import Prompt, read_prompts
from tl_linmap.base.progress import progress_bar
from tl_linmap.linear.dense import (
    MapOptions,
    Targets,
    map_options,
    maps_of,
    split_targets,
)
from tl_linmap.reading.spectral import energy_rank, stable_rank
from tl_linmap.reading.tokens import token_id
from tl_linmap.results.corpus import CorpusAnalysis, PromptSummary, token_role
from tl_linmap.results.maps import LinearMaps

#: Prompts mapped together by `corpus_analysis` (one batched call, `tl_linmap.linear.dense.batched_linear_maps`).
PROMPTS_PER_CALL = 8


_END = object()


def _maps_for(model, prompts: Iterable[Prompt], targets: Targets, options: MapOptions) -> Iterator[LinearMaps]:
    # A few prompts at a time through the batched call (their passes shared), so memory stays bounded.
    group: list[Prompt] = []
    for prompt in itertools.chain(prompts, [_END]):
        if prompt is not _END:
            group.append(prompt)
        if group and (prompt is _END or len(group) == PROMPTS_PER_CALL):
            yield from maps_of(model, read_prompts(model, group), targets, options)
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
                f"Prompt {lm.str_tokens!r} has one token: a corpus analysis sets the first token apart, so give prompts of two or more tokens."
            )
        svd = lm.svd(k, skip_first=True)
        rows = [(token_role(i, lm.position), *_ranks(values)) for i, values in zip(svd.tokens, svd.values)]
        ranks[name] = rows + [("stacked", *_ranks(svd.stacked.values))]
        decoded = svd.decode(k, top, sources=[], stacked=True)
        concepts[name] = list(dict.fromkeys(t for pair in decoded for t, _ in pair.left))
    last = maps[final]
    if token is None:
        token = int(last.reader.logits(last.output, affine=True).argmax())
    split = last.logit_contributions(token)
    return PromptSummary(last.str_tokens, ranks, concepts, split.token, split.per_token.detach().cpu())


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
    progress: bool | None = None,
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
        rows_per_pass: Rows per batched pass (see `tl_linmap.linear.dense.linear_maps`).
        progress: A progress bar over prompts: None (default) once the call lasts a few seconds, True at once, False never.

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
    stream = _maps_for(model, prompts, split_targets(model, mapped), map_options(model, dtype=dtype, rows_per_pass=rows_per_pass))
    for maps in progress_bar(total, "prompts", progress, stream):
        analysis.summaries.append(summarise(maps, targets, final, token, k=k, top=top))
    if not analysis.summaries:
        raise InputError("No prompts: give at least one prompt (e.g. tl_linmap.load.datasets.phrases()).")
    return analysis
