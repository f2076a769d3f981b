"""Sequence attributions: every target position of a prompt at once, and a generated continuation.

Pushing token ``i``'s own input ``x_i`` (zero elsewhere) through the frozen system gives
``J_{t,i} x_i`` at every position ``t`` of the replay, not only at one target position: the
replay must then compute every position (nothing is cut to one position), and one forward
row per token gives the whole ``(target position, source position)`` map. Rows run on windows
of the prompt as in `tl_linmap.linear.matrix_free.token_contributions`, so the cost is that of the
contributions of the last position alone.

A vector target gives contribution norms ``‖J_{t,i} x_i‖``; a linear readout
(`tl_linmap.reading.readouts`, e.g. a logit difference) gives its exact additive shares
``w_t · J_{t,i} x_i``, with the final norm frozen at each position ``t``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from tl_linmap.base.budget import plan_tokens
from tl_linmap.base.checks import check_dtype, check_position, check_positive
from tl_linmap.base.compat import check_model
from tl_linmap.base.errors import InputError
from tl_linmap.base.exactness import check_exact
from tl_linmap.base.guard import borrowed
from tl_linmap.base.prompts import Prompt, Prompts, read_prompts
from tl_linmap.base.progress import progress_bar
from tl_linmap.freeze.architectures import naming_foreign
from tl_linmap.freeze.apply import applied
from tl_linmap.freeze.hooks import same_path_hooks
from tl_linmap.freeze.system import FrozenSystem, frozen_system, one_token_rows
from tl_linmap.freeze.targets import resolve_target
from tl_linmap.reading.readouts import LinearReadout, Logit
from tl_linmap.reading.tokens import decode_tokens
from tl_linmap.results.sequence import SequenceAttribution


def _row_weights(system: FrozenSystem, name: str, readouts: Sequence[LinearReadout], positions: Sequence[int]) -> tuple[Tensor, Tensor]:
    # Per row, the readout's covector and constant with the final norm frozen at that row's position.
    d_out = system.sequences[name].shape[-1]
    pairs = [r.weights(system.reader_at(name, p), d_out) for r, p in zip(readouts, positions)]
    x = system.x
    return torch.stack([w.to(x) for w, _ in pairs]), torch.stack([c.to(x) for _, c in pairs])


def _attribute(
    system: FrozenSystem, name: str, positions: list[int], readouts: Sequence[LinearReadout] | None,
    tokens_per_pass: int | None, progress: bool | None,
) -> tuple[Tensor, Tensor, Tensor, float]:
    # (values, bias, output, relative error) of every row, by windows of one-token rows at every position.
    x = system.x[0].detach()
    last = positions[-1]
    reference = system.sequences[name]
    rows = torch.as_tensor(positions, device=x.device)
    step = plan_tokens(system.model, x.shape[0], last, x.dtype, tokens_per_pass, x.device)
    weights = _row_weights(system, name, readouts, positions) if readouts is not None else None
    values = x.new_zeros(len(positions), x.shape[0])
    totals = x.new_zeros(len(positions), reference.shape[-1])
    bias = None
    with progress_bar(last + 1, "sequence contributions", progress) as bar:
        for start in range(0, last + 1, step):
            k = min(step, last + 1 - start)
            window = system.window(start, graph=False)  # positions start..end: every later position is kept
            linear, biases = window.push(one_token_rows(x[start:], range(k)), every=True)
            if bias is None:
                bias = biases[name][rows]  # the window from token 0 is the whole prompt
            parts = linear[name]  # (token, window position, d_out)
            causal = torch.arange(parts.shape[1], device=x.device)[None] >= torch.arange(k, device=x.device)[:, None]
            parts = parts * causal[..., None]  # exactly zero before the token: no rounding from b
            later = rows >= start
            parts = parts[:, rows[later] - start].transpose(0, 1)  # (row, token, d_out)
            totals[later] += parts.sum(1)
            if weights is None:
                values[later, start : start + k] = parts.norm(dim=-1)
            else:
                values[later, start : start + k] = torch.einsum("rtd,rd->rt", parts, weights[0][later])
            bar.update(k)
    outputs = reference[rows]
    error = max(float((t + b - y).norm() / y.norm().clamp_min(1e-300)) for t, b, y in zip(totals, bias, outputs))
    if weights is None:
        return values, bias.norm(dim=-1), outputs.norm(dim=-1), error
    w, c = weights
    return values, (bias * w).sum(-1) + c, (outputs * w).sum(-1) + c, error


def _check_target(model, target) -> tuple[str | None, LinearReadout | None]:
    if isinstance(target, LinearReadout):
        target.check(model)
        return None, target
    return resolve_target(model, target), None


def sequence_attribution(
    model,
    prompt_or_tokens: Prompt,
    *,
    target: str | LinearReadout = "output",
    source: str | None = None,
    last: int = -1,
    dtype: torch.dtype | None = torch.float64,
    tokens_per_pass: int | None = None,
    check: bool = True,
    progress: bool | None = None,
) -> SequenceAttribution:
    """Contributions of every source position to every target position, from one set of forward passes.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt_or_tokens: One prompt.
        target: ``"output"`` or a hook name (contribution norms), or a linear readout
            (`tl_linmap.reading.readouts`: ``LogitDiff(" Paris", " London")``, ``Logit(" the")``,
            ``Direction(hook, v)``): its exact shares, read at each position through the final
            norm frozen there.
        source: The hook point the inputs are taken at (see `tl_linmap.linear.dense.linear_maps`);
            None: the token embeddings.
        last: The last target position (``-1``: the prompt's last token); rows are ``0..last``.
        dtype: Working dtype (the model comes back bit for bit).
        tokens_per_pass: Source tokens pushed per forward pass (see `tl_linmap.linear.matrix_free.token_contributions`).
        check: Raise `tl_linmap.base.errors.FreezeError` unless every row reconstructs the model's
            vector within `tl_linmap.base.exactness.tolerance`.
        progress: A progress bar over source tokens: None (default) once the call lasts a few seconds, True at once, False never.

    Returns:
        A `SequenceAttribution` with one row per target position.

    Raises:
        InputError: for a bad model, prompt, target, source, position or ``tokens_per_pass``.
    """
    check_model(model)
    hook, readout = _check_target(model, target)
    if tokens_per_pass is not None:
        tokens_per_pass = check_positive("tokens_per_pass", tokens_per_pass)
    prompt = read_prompts(model, prompt_or_tokens, several=False)
    with frozen_system(model, prompt, [hook or readout.hook], dtype=dtype, source=source) as system:
        last = check_position(last, system.tokens.shape[1])
        positions = list(range(last + 1))
        name = system.names[0]
        values, bias, output, error = _attribute(
            system, name, positions, None if readout is None else [readout] * len(positions), tokens_per_pass, progress
        )
        result = SequenceAttribution(
            name if readout is None else readout.name, "norm" if readout is None else "value", system.tokens[0],
            positions, values, bias, output, error, source=system.source, model=model,
        )
    if check:
        with naming_foreign(model):
            check_exact(error, values.dtype, result.target)
    return result


def greedy_continuation(model, tokens: Int[Tensor, "1 pos"], max_new_tokens: int) -> Int[Tensor, " new"]:
    """The model's greedy continuation, computed in the model's current dtype on the frozen pass's norm path.

    Args:
        model: A borrowed model.
        tokens: The prompt, ``(1, pos)``.
        max_new_tokens: How many tokens.

    Returns:
        The generated token ids.
    """
    sequence = tokens
    with torch.no_grad(), applied(model, same_path_hooks(model)):
        for _ in range(max_new_tokens):
            logits = model(sequence)[0, -1]
            sequence = torch.cat([sequence, logits.argmax().view(1, 1)], dim=1)
    return sequence[0, tokens.shape[1] :]


def generation_attribution(
    model,
    prompt_or_tokens: Prompt,
    max_new_tokens: int = 8,
    *,
    source: str | None = None,
    dtype: torch.dtype | None = torch.float64,
    tokens_per_pass: int | None = None,
    check: bool = True,
    progress: bool | None = None,
) -> SequenceAttribution:
    """Generate greedily, then split every generated token's logit over the prompt and the earlier generated tokens.

    Row ``k`` is the step that produced generated token ``k``: the logit of that token at
    the position before it, split exactly over every source position up to there (the final
    norm frozen at that position). The continuation is generated in the working dtype
    without a KV cache, so it is the argmax of the very logits attributed.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt_or_tokens: One prompt.
        max_new_tokens: How many tokens to generate (each gets a row).
        source: The hook point the inputs are taken at (None: the token embeddings).
        dtype: Working dtype (the model comes back bit for bit).
        tokens_per_pass: Source tokens pushed per forward pass.
        check: Raise `tl_linmap.base.errors.FreezeError` unless every row is exact.
        progress: A progress bar over source tokens: None (default) once the call lasts a few seconds, True at once, False never.

    Returns:
        A `SequenceAttribution` of kind ``"value"`` whose ``predicted`` holds the generated
        tokens; its tokens are the prompt and every generated token but the last.

    Raises:
        InputError: for a bad model, prompt, ``max_new_tokens``, source or dtype, or a
            continuation that would not fit the model's context.
    """
    check_model(model)
    (tokens,) = read_prompts(model, prompt_or_tokens, several=False).tokens
    max_new_tokens = check_positive("max_new_tokens", max_new_tokens)
    if tokens.shape[1] + max_new_tokens - 1 > model.cfg.n_ctx:
        raise InputError(f"{tokens.shape[1]} prompt tokens and {max_new_tokens} new ones do not fit the context of {model.cfg.n_ctx}: generate fewer.")
    with borrowed(model, check_dtype(dtype)):
        generated = greedy_continuation(model, tokens, max_new_tokens)
    inputs = torch.cat([tokens[0], generated[:-1]])
    first = tokens.shape[1] - 1
    positions = list(range(first, first + max_new_tokens))
    readouts = [Logit(int(t)) for t in generated]
    # Prompt and continuation as one prompt, checked already: the context above, the new ids are the model's own.
    with frozen_system(model, Prompts((inputs[None],), (len(inputs) - 1,)), ["output"], dtype=dtype, source=source) as system:
        values, bias, output, error = _attribute(system, system.names[0], positions, readouts, tokens_per_pass, progress)
    result = SequenceAttribution(
        "logit of the generated token", "value", inputs, positions, values, bias, output, error,
        predicted=decode_tokens(model, generated), source=system.source, model=model,
    )
    if check:
        with naming_foreign(model):
            check_exact(error, values.dtype, result.target)
    return result
