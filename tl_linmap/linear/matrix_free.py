"""Implicit operators (matrix-free): contributions and top singular vectors without the dense operators.

The frozen system is exactly affine, so a forward pass of the replayed system applies
``Σ_i J_i e_i`` to any embeddings, and a backward pass through its graph applies
``J_i^T``. Per-token contributions then cost one forward row per token instead of
``d_out`` backward rows, and the top-k singular triplets of one token's operator cost
O(k) products (randomized block Krylov iteration) instead of the whole operator.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.budget import activation_bytes, fit_rows, plan_tokens
from tl_linmap.base.devices import model_devices
from tl_linmap.base.checks import check_positive
from tl_linmap.base.deprecation import (
    renamed_argument,
    renamed_fields,
)
from tl_linmap.base.errors import InputError
from tl_linmap.base.exactness import check_exact, relative
from tl_linmap.base.progress import check_progress, progress_bar
from tl_linmap.base.prompts import Prompt, Prompts, read_prompts
from tl_linmap.base.saving import Saveable
from tl_linmap.freeze.architectures import naming_foreign
from tl_linmap.freeze.system import (
    FrozenSystem,
    batchable,
    frozen_batch,
    frozen_system,
    one_token_rows,
)
from tl_linmap.freeze.targets import resolve_target
from tl_linmap.linear.plan import refuse_unfit
from tl_linmap.present import display
from tl_linmap.reading.spectral import input_index, signed
from tl_linmap.reading.tokens import TokenReader, decode_tokens
from tl_linmap.results.maps import Contributions
from tl_linmap.results.svd import OperatorSVD


def _assembled(system: FrozenSystem, name: str, parts: list[Tensor], bias: Tensor) -> Contributions:
    # One prompt's contributions from its windows' parts: the tokens after the target contribute nothing.
    after = parts[0].new_zeros(system.x.shape[1] - system.position - 1, parts[0].shape[-1])
    system = dataclasses.replace(system, biases={name: bias})
    return Contributions(values=torch.cat(parts + [after]), **system.result_fields(name))


@dataclass(frozen=True)
class ContributionOptions:
    """The keyword options of `token_contributions`, checked once and passed down whole.

    Attributes:
        target: ``"output"`` or a hook name.
        dtype: Working dtype (None: the model's own).
        tokens_per_pass: Input tokens pushed per forward pass (None: what fits).
        check: Check every result's reconstruction.
        source: The hook point the contributions start from (None: the token embeddings).
        progress: A progress bar over pushed tokens (`tl_linmap.base.progress.progress_bar`).
    """

    target: str = "output"
    dtype: torch.dtype | None = torch.float64
    tokens_per_pass: int | None = None
    check: bool = True
    source: str | None = None
    progress: bool | None = None


def token_contributions(
    model,
    prompt_or_tokens: Prompt,
    *,
    target: str = "output",
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
    tokens_per_pass: int | None = None,
    check: bool = True,
    chunk_size: int | None = None,
    source: str | None = None,
    attention_mask: Tensor | None = None,
    progress: bool | None = None,
) -> Contributions | list[Contributions]:
    """Per-token contributions ``J_i x_i`` by batched forward passes of the frozen system.

    The same numbers as ``linear_map(...).contributions()`` (to float64 rounding), at the
    cost of one forward row per token up to ``position`` instead of ``d_out`` backward rows.
    Each pass of tokens ``s..`` runs on the window of the prompt from ``s`` (earlier
    positions only add the affine part), so a long prompt costs about half the
    position-rows of pushing every token through the whole prompt.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt_or_tokens: One prompt.
        target: ``"output"`` or a hook name.
        position: Target position (``-1``: the last token).
        dtype: Working dtype (the model comes back bit for bit).
        tokens_per_pass: Input tokens pushed per forward pass (default: as many as fit in
            half the free memory, in up to `tl_linmap.base.budget.MAX_WINDOWS` windows).
        check: Raise `tl_linmap.base.errors.FreezeError` unless the contributions reconstruct the
            output within `tl_linmap.base.exactness.tolerance`.
        chunk_size: Deprecated name of ``tokens_per_pass``.
        source: The hook point the contributions start from (``J_i s_i`` with ``s_i`` its
            activation at position ``i``; see `tl_linmap.linear.dense.linear_maps`); None: the
            token embeddings.
        attention_mask: With a padded token batch ``(batch, pos)``: 1 for real tokens, 0 for
            padding, on either side (`tl_linmap.base.prompts.prompt_batch`).
        progress: A progress bar over pushed tokens: None (default) once the call lasts a few seconds, True at once, False never.

    Returns:
        A `tl_linmap.results.maps.Contributions`; for a list of prompts (or a token batch), one per
        prompt, each equal to the one-prompt call's, their passes shared (`batched_contributions`).
    """
    tokens_per_pass = renamed_argument("chunk_size", chunk_size, "tokens_per_pass", tokens_per_pass)
    if tokens_per_pass is not None:
        tokens_per_pass = check_positive("tokens_per_pass", tokens_per_pass)
    prompts = read_prompts(model, prompt_or_tokens, position=position, attention_mask=attention_mask)
    options = ContributionOptions(target=target, dtype=dtype, tokens_per_pass=tokens_per_pass, check=check, source=source,
                                  progress=check_progress(progress))
    _refuse_unfit(model, prompts, "token_contributions", dtype, rows_per_pass=tokens_per_pass)
    if not prompts.batch:
        return _contributions(model, prompts, options)
    if batchable(model) and len(prompts) > 1:  # one prompt has nothing to share
        return batched_contributions(model, prompts, options)
    return [_contributions(model, prompt, options) for prompt in prompts.singles()]


def _refuse_unfit(model, prompts: Prompts, what: str, dtype: torch.dtype | None, **options) -> None:
    # The plan's memory check on the longest prompt, before any work (`tl_linmap.linear.plan.refuse_unfit`).
    longest = max(range(len(prompts)), key=lambda i: prompts.lengths[i])
    refuse_unfit(model, prompts.lengths[longest], what, dtype, position=prompts.positions[longest], **options)


def _contributions(model, prompt: Prompts, options: ContributionOptions) -> Contributions:
    # One prompt's contributions, by windows of one-token rows.
    with frozen_system(model, prompt, [options.target], dtype=options.dtype, source=options.source) as system:
        name, x, last = system.names[0], system.x[0].detach(), system.position
        step = plan_tokens(model, x.shape[0], last, x.dtype, options.tokens_per_pass, x.device)
        parts, biases = [], None
        with progress_bar(last + 1, "token contributions", options.progress) as bar:
            for start in range(0, last + 1, step):
                rows = one_token_rows(x[start : last + 1], range(min(step, last + 1 - start)))
                linear, window_biases = system.window(start, graph=False).push(rows)
                parts.append(linear[name])
                # A window from token 0 ends at the target like the system: the same b.
                biases = biases or window_biases
                bar.update(min(step, last + 1 - start))
        result = _assembled(system, name, parts, biases[name])
    if options.check:
        with naming_foreign(system.model):
            result.check()
    return result


#: Windows `batched_contributions` cuts a batch's prompts into (a token of window ``w`` needs
#: only the positions from the window's start: about a third fewer position-rows than one window).
WINDOWS_PER_BATCH = 4


def batched_contributions(model, prompts: Prompts, options: ContributionOptions) -> list[Contributions]:
    """`token_contributions` of several prompts, every pass shared across them.

    One plain and one frozen forward of the prompts padded on the right
    (`tl_linmap.freeze.system.frozen_batch`); then each window from token ``s`` (as in the one-prompt
    call) pushes the rows of every prompt whose target is at ``s`` or later in one forward:
    ``B`` prompts × ``k`` tokens as ``B·k`` sequences, each with its prompt's factors, plus
    one all-zero row per prompt for ``b``. `token_contributions` runs prompt by prompt where
    nothing is shared: a model whose factors cannot be cut to a prompt
    (`tl_linmap.freeze.system.batchable`), or a single prompt.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture whose
            factors can be cut to a prompt.
        prompts: Two or more prompts and their target positions (`tl_linmap.base.prompts.read_prompts`).
        options: As `token_contributions` was given them; a batch's ``tokens_per_pass`` (default:
            as `token_contributions`, for the longest prompt) is per prompt, and prompts go in
            groups that fit in half the free memory.

    Returns:
        One `tl_linmap.results.maps.Contributions` per prompt.

    Raises:
        InputError: for any argument the one-prompt call refuses.
    """
    with frozen_batch(model, prompts, [options.target], dtype=options.dtype, source=options.source) as batch:
        systems = batch.systems
        name, lasts, x = systems[0].names[0], [s.position for s in systems], systems[0].x
        item, top = x.element_size(), max(lasts)
        step = plan_tokens(model, max(s.x.shape[1] for s in systems), top, x.dtype, options.tokens_per_pass, x.device)
        if options.tokens_per_pass is None:
            # A pass of many prompts is wide enough to pay its fixed cost: shorter windows (up to
            # `WINDOWS_PER_BATCH`) skip more of the positions before each pushed token.
            step = min(step, -(-(top + 1) // WINDOWS_PER_BATCH))
        parts: list[list[Tensor]] = [[] for _ in systems]
        biases: list[Tensor | None] = [None] * len(systems)
        with progress_bar(top + 1, "token contributions", options.progress) as bar:
            for start in range(0, top + 1, step):

                def fits(window: int) -> int:  # prompts per pass: rows of (up to) `step` tokens and b, within the budget
                    per_row = item * window * x.shape[-1] + activation_bytes(model, window, item)
                    rows = min(step, window) + 1
                    return fit_rows(per_row, 0, rows * len(systems), None, x.device, "tokens_per_pass", others=model_devices(model)) // rows

                for group in batch.groups(start, fits):
                    stop = lasts[group[0]] + 1
                    pushed = range(start, min(start + step, stop))
                    xs = batch.x(group, stop)[:, start:]
                    # A prompt whose target comes before a pushed token gets a zero row for it.
                    keep = torch.tensor([[t <= lasts[b] for b in group] for t in pushed], dtype=x.dtype, device=x.device)
                    rows = one_token_rows(xs, range(len(pushed))) * keep[:, :, None, None]
                    linear, window_biases = batch.push(group, rows.flatten(0, 1), start)
                    values = linear[name].view(len(pushed), len(group), -1)
                    for g, b in enumerate(group):
                        parts[b].append(values[: max(0, min(len(pushed), lasts[b] + 1 - start)), g])
                        if start == 0:  # a window from token 0 ends at the target like the system: the same b
                            biases[b] = window_biases[name][g]
                bar.update(min(step, top + 1 - start))
        results = [_assembled(system, name, own, bias) for system, own, bias in zip(systems, parts, biases)]
    if options.check:
        with naming_foreign(systems[0].model):
            for result in results:
                result.check()
    return results


@dataclass
class TokenOperator:
    """One token's operator ``J_i``, applied without materialising it.

    Attributes:
        system: The frozen system (valid inside `matrix_free`), usually a
            `tl_linmap.freeze.system.FrozenSystem.window` starting at the token, which makes
            products cheaper; it has a graph and knows its ``b``.
        target: Hook name.
        token: Input token index ``i`` in ``system``.
        offset: Index in the prompt of ``system``'s token 0 (the window's start).
        prompt: The whole prompt's tokens (default: ``system``'s).
    """

    system: FrozenSystem
    target: str
    token: int
    offset: int = 0
    prompt: Tensor | None = None

    def __post_init__(self) -> None:
        if self.prompt is None:
            self.prompt = self.system.tokens[0]

    def matvec(self, vectors: Float[Tensor, "k d_in"]) -> Float[Tensor, "k d_out"]:
        """``J_i v`` for each row ``v``, by one forward pass of the replayed system.

        Args:
            vectors: Input-space vectors.

        Returns:
            Output-space vectors.
        """
        x = self.system.x[0]
        embeddings = torch.zeros(len(vectors), *x.shape, dtype=x.dtype, device=x.device)
        embeddings[:, self.token] = vectors
        return self.system.push(embeddings)[0][self.target]

    def rmatvec(self, covectors: Float[Tensor, "k d_out"]) -> Float[Tensor, "k d_in"]:
        """``J_i^T u`` for each row ``u``, by one batched backward through the window's graph.

        Args:
            covectors: Output-space vectors.

        Returns:
            Input-space vectors.
        """
        return self.system.vjp(self.target, covectors)[:, self.token]


def _orthonormal_to(block: Tensor, basis: Tensor | None) -> Tensor:
    # Columns of `block` made orthonormal and orthogonal to `basis` (twice, for stability).
    for _ in range(2):
        if basis is not None:
            block = block - basis @ (basis.T @ block)
        block = torch.linalg.qr(block).Q
    return block


def randomized_svd(operator: TokenOperator, k: int, *, oversample: int = 4, max_iter: int = 40, tol: float = 1e-10) -> OperatorSVD:
    """Top-k singular triplets by randomized block Krylov iteration (Musco & Musco, 2015).

    The search space grows by one block of ``k + oversample`` input directions per
    iteration, ``V, (JᵀJ)V, (JᵀJ)²V, …``, each costing one `rmatvec` and one `matvec` of
    that block; Rayleigh–Ritz on the whole space gives the triplets. It stops once the
    top-k singular values change by less than ``tol`` (relative to the largest), and warns
    if ``max_iter`` or the input dimension ends it first.

    Args:
        operator: Anything with ``matvec``, ``rmatvec`` and ``system`` (a `TokenOperator`).
        k: Number of triplets.
        oversample: Extra directions per block.
        max_iter: Iteration cap.
        tol: Relative change of the top-k singular values that ends the iteration.

    Returns:
        An `tl_linmap.results.svd.OperatorSVD` of the one token (top-k values and vectors, each
        pair signed so that ``u`` points along the target's output).

    Raises:
        InputError: for ``k < 1``, or an operator that is not a `TokenOperator`.
    """
    if not all(hasattr(operator, a) for a in ("matvec", "rmatvec", "system")):
        raise InputError(
            f"randomized_svd takes a token's operator, mf.operator(source) inside `with matrix_free(...) as mf`, "
            f"got {type(operator).__name__}; for a LinearMap use lm.svd(k)."
        )
    k = check_positive("k", k)
    x = operator.system.x
    if x.dtype.itemsize < 4:
        raise InputError(f"The matrix-free SVD needs float32 or float64 (torch has no {x.dtype} QR); pass dtype=torch.float32.")
    d_in = x.shape[-1]
    generator = torch.Generator(device=x.device).manual_seed(0)
    block = _orthonormal_to(torch.randn(d_in, k + oversample, generator=generator, dtype=x.dtype, device=x.device), None)
    basis, image = block, operator.matvec(block.T).T  # K and J K, kept side by side
    values, change = torch.linalg.svdvals(image)[:k], float("nan")
    converged = False
    for _ in range(max_iter):
        room = d_in - basis.shape[1]
        if room == 0:  # the search space is the whole input space: Rayleigh–Ritz is exact
            converged = True
            break
        block = _orthonormal_to(operator.rmatvec(image[:, -block.shape[1] :].T).T, basis)[:, :room]  # JᵀJ · last block
        basis, image = torch.cat([basis, block], 1), torch.cat([image, operator.matvec(block.T).T], 1)
        previous, values = values, torch.linalg.svdvals(image)[:k]
        change = float(((values - previous).abs() / values[0]).max())
        if change <= tol:
            converged = True
            break
    if not converged:
        warnings.warn(f"randomized_svd stopped after {basis.shape[1]} directions with a relative change of {change:.1e}; "
                      "raise max_iter (or use the dense route for this flat spectrum).", stacklevel=2)
    left, values, w = torch.linalg.svd(image, full_matrices=False)
    system = operator.system
    left, right = signed(left[:, :k].T, (basis @ w[:k].T).T, system.outputs[operator.target])
    offset = operator.offset  # the window's token 0 is the prompt's token `offset`
    return OperatorSVD(
        operator.target, decode_tokens(system.model, operator.prompt), offset + system.position, [offset + operator.token],
        values[None, :k], left[None], right[None], reader=system.reader(operator.target),
    )


@dataclass
class MatrixFree:
    """Matrix-free access to one prompt's frozen system, valid inside `matrix_free`."""

    system: FrozenSystem

    def operator(self, source: int | None = None, target: str | None = None, *, token: int | None = None) -> TokenOperator:
        """The operator ``J_i`` of one input token.

        Args:
            source: Input token index (``-1``: the prompt's last token; it must not come
                after the target position).
            target: Hook name (default: the first target).
            token: Deprecated name of ``source``.

        Returns:
            A `TokenOperator` on the window of the prompt from that token.

        Raises:
            InputError: for an index outside the prompt or after the target position, or a
                target that `matrix_free` was not given.
        """
        source = renamed_argument("token", token, "source", source)
        system = self.system
        index = input_index(-1 if source is None else source, system.tokens.shape[1], system.position)
        name = system.names[0] if target is None else resolve_target(system.model, target)
        if name not in system.names:
            raise InputError(f"This matrix_free system maps {list(system.names)}, not {target!r}: pass matrix_free(..., target={target!r}).")
        return TokenOperator(system.window(index), name, 0, offset=index, prompt=system.tokens[0])

    def svd(self, source: int | None = None, k: int = 8, target: str | None = None, *, token: int | None = None, **options) -> OperatorSVD:
        """Top-k singular triplets of one token's operator (see `randomized_svd`).

        Args:
            source: Input token index (default ``-1``, the prompt's last token).
            k: Number of triplets.
            target: Hook name (default: the first target).
            token: Deprecated name of ``source``.
            **options: Passed to `randomized_svd`.

        Returns:
            An `tl_linmap.results.svd.OperatorSVD` of that one token, which decodes like any other.
        """
        source = renamed_argument("token", token, "source", source)
        return randomized_svd(self.operator(source, target), k, **options)


@renamed_fields(readout="reader")
@dataclass
class Pushed(Saveable):
    """Vectors at one source position pushed through the frozen system: ``J_i v`` at a target.

    Attributes:
        vectors: The pushed vectors ``v``, ``(k, d_in)``, in the source's space.
        values: ``J_i v`` for each, ``(k, d_out)``: linear parts (no ``b``).
        source: The source hook point.
        source_position: Input position ``i`` the vectors were placed at.
        target: The target hook name.
        position: The target position.
        reader: How the values are read as tokens (through ``ln_final`` frozen at ``position``).
    """

    vectors: Float[Tensor, "k d_in"]
    values: Float[Tensor, "k d_out"]
    source: str
    source_position: int
    target: str
    position: int
    reader: TokenReader = field(repr=False)

    _VOCABULARY = True  # it prints the tokens its vectors promote

    def __repr__(self) -> str:
        return display.pushed_text(self)

    def _repr_html_(self) -> str:
        return display.pushed_html(self)

    def to_table(self, top: int = 5) -> display.Table:
        """One row per vector: its norm at the target and the tokens it promotes most there.

        Args:
            top: Tokens per vector.

        Returns:
            A `tl_linmap.base.table.Table` of `tl_linmap.present.display.VectorRow`.
        """
        return display.vector_rows(self, top)

    def logits(self) -> Float[Tensor, "k d_vocab"]:
        """The values read through the frozen final norm and the unembedding (linear parts).

        Returns:
            One logit vector per pushed vector.
        """
        return self.reader.logits(self.values)

    def top_tokens(self, k: int = 10) -> list[list[tuple[str, float]]]:
        """The tokens each pushed vector promotes most at the target.

        Args:
            k: Tokens per vector.

        Returns:
            Per vector, ``(token, logit)`` pairs, highest first.
        """
        k = check_positive("k", k, at_most=self.reader.model.cfg.d_vocab)
        return self.reader.top(self.logits(), k)


def push_forward(
    model,
    prompt_or_tokens: Prompt,
    vectors: Float[Tensor, "k d_in"],
    *,
    source: str,
    source_position: int = -1,
    target: str = "output",
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
) -> Pushed:
    """Push vectors placed at one position of a source hook point through the frozen system.

    ``J_i v``, with ``J_i`` the operator from ``source`` at position ``i`` to ``target``:
    a direction found at a middle layer (a singular vector of that layer's operator, a
    probe) carried to the output and read there as tokens, as the reference code's
    ``transform_to_output`` does. One forward pass of ``k`` rows on the window of the
    prompt from ``i``; nothing dense is formed.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt_or_tokens: One prompt.
        vectors: One vector ``(d_in,)`` or several ``(k, d_in)`` in the source's space.
        source: The hook point they live at, e.g. ``"blocks.3.hook_resid_post"``.
        source_position: Input position ``i`` they are placed at (``-1``: the last token; not
            after ``position``).
        target: ``"output"`` or a later hook name.
        position: Target position (``-1``: the last token).
        dtype: Working dtype (the model comes back bit for bit).

    Returns:
        A `Pushed` (``top_tokens()`` reads them at the output).

    Raises:
        InputError: for a bad source, target, position, or vectors that are not floating
            ``(d_in,)`` / ``(k, d_in)`` tensors of the source's width.

    Example:
        >>> mid = tl_linmap.linear_map(model, prompt, target="blocks.15.hook_resid_post")
        >>> u = mid.svd(k=3).left[-1]            # the last token's top left singular vectors
        >>> tl_linmap.push_forward(model, prompt, u, source="blocks.15.hook_resid_post").top_tokens(5)
    """
    if not isinstance(vectors, Tensor) or not vectors.is_floating_point() or vectors.ndim not in (1, 2):
        got = f"shape {tuple(vectors.shape)}, {vectors.dtype}" if isinstance(vectors, Tensor) else type(vectors).__name__
        raise InputError(f"vectors must be a floating tensor of shape (d_in,) or (k, d_in) in the source's space, got {got}.")
    prompt = read_prompts(model, prompt_or_tokens, position=position, several=False)
    with frozen_system(model, prompt, [target], dtype=dtype, source=source) as system:
        x, name = system.x, system.names[0]
        index = input_index(source_position, x.shape[1], system.position)
        rows = vectors.reshape(-1, vectors.shape[-1]).to(x)
        if rows.shape[-1] != x.shape[-1]:
            raise InputError(f"The source {system.source!r} has width {x.shape[-1]}; the vectors have {rows.shape[-1]}.")
        window = system.window(index, graph=False)  # earlier inputs only add to b
        embeddings = rows.new_zeros(len(rows), *window.x.shape[1:])
        embeddings[:, 0] = rows
        values = window.push(embeddings)[0][name]
        return Pushed(rows, values, system.source, index, name, system.position, system.reader(name))


def probe_linearity(system: FrozenSystem) -> float:
    """Check on one probe that the replayed system is additive at the real input, as an exact map must be.

    The input is split into its even and its odd tokens; ``F(x_even) − b`` plus
    ``F(x_odd) − b`` plus ``b`` must give the model's output. A freeze rule that had no effect
    leaves a nonlinearity that breaks this. One forward of three rows.

    Args:
        system: The frozen system (without graph).

    Returns:
        The relative error, within `tl_linmap.base.exactness.tolerance`.

    Raises:
        FreezeError: if it is not.
    """
    x = system.x
    even = torch.zeros_like(x)
    even[:, 0::2] = x[:, 0::2]
    linear, biases = system.push(torch.cat([even, x - even]))
    return max(check_exact(relative(linear[n].sum(0) + biases[n], system.outputs[n]), x.dtype, n) for n in system.names)


@contextmanager
def matrix_free(
    model, prompt_or_tokens: Prompt, *, target: str = "output", position: int = -1,
    dtype: torch.dtype | None = torch.float64, check: bool = True, source: str | None = None,
    attention_mask: Tensor | None = None,
) -> Iterator[MatrixFree | list[MatrixFree]]:
    """Borrow the model and give matrix-free products with its frozen system.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt_or_tokens: One prompt; or a list of prompts (or a padded token batch with
            ``attention_mask``), for one `MatrixFree` per prompt.
        target: ``"output"`` or a hook name.
        position: Target position (``-1``: the last token).
        dtype: Working dtype (the model comes back bit for bit on exit).
        check: First check on a probe (`probe_linearity`) that the system is exact.
        source: The hook point the operators start from (see `tl_linmap.linear.dense.linear_maps`);
            None: the token embeddings.
        attention_mask: With a padded token batch: 1 for real tokens, 0 for padding
            (`tl_linmap.base.prompts.prompt_batch`).

    Returns:
        A context manager yielding a `MatrixFree`; for several prompts a list of them, from
        one borrow and the shared forwards of `tl_linmap.freeze.system.frozen_batch` (each prompt's
        Krylov products then run on its own windows).

    Example:
        >>> with tl_linmap.matrix_free(model, "The capital of France is") as mf:
        ...     top = mf.svd(-1, k=8)
    """
    prompts = read_prompts(model, prompt_or_tokens, position=position, attention_mask=attention_mask)
    _refuse_unfit(model, prompts, "matrix_free", dtype)
    if prompts.batch:
        # Each MatrixFree works on its own prompt's windows, so no model needs `batchable` here.
        with frozen_batch(model, prompts, [target], dtype=dtype, source=source) as batch:
            if check:
                for system in batch.systems:
                    probe_linearity(system)
            yield [MatrixFree(system) for system in batch.systems]
        return
    # Each token's products run on a window with its own graph: the whole prompt's is not needed.
    with frozen_system(model, prompts, [target], dtype=dtype, source=source) as system:
        if check:
            probe_linearity(system)
        yield MatrixFree(system)
