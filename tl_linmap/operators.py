"""Matrix-free: contributions and top singular vectors without the dense operators.

The frozen system is exactly affine, so a forward pass of the replayed system applies
``Σ_i J_i e_i`` to any embeddings, and a backward pass through its graph applies
``J_i^T``. Per-token contributions then cost one forward row per token instead of
``d_out`` backward rows, and the top-k singular triplets of one token's operator cost
O(k) products (randomized subspace iteration) instead of the whole operator.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.analysis import Singular
from tl_linmap.errors import InputError
from tl_linmap.inputs import Prompt
from tl_linmap.maps import TargetResult, activation_bytes, available_bytes
from tl_linmap.system import FrozenSystem, frozen_system


@dataclass(kw_only=True)
class Contributions(TargetResult):
    """Per-token contributions ``J_i x_i`` of one target, computed by forward passes.

    Attributes:
        values: One output-space vector per input token (zero after ``position``).
    """

    values: Float[Tensor, "pos d_out"]

    def contributions(self) -> Float[Tensor, "pos d_out"]:
        """Per-token contributions ``J_i x_i``.

        Returns:
            `values`; they sum to ``output - bias``.
        """
        return self.values


#: Tokens per forward pass of `token_contributions` below which a window of its own costs
#: more (one more pass, hooks included) than the positions it skips.
WINDOW_ROWS = 32


def _rows_per_pass(system: FrozenSystem, chunk_size: int | None) -> int:
    # As many rows as fit in half the free memory, in up to 8 windows of at least WINDOW_ROWS rows.
    if chunk_size:
        return chunk_size
    x, n = system.x, system.position + 1
    fit = available_bytes(x.device) // 2 // activation_bytes(system.model, x.shape[1], x.element_size())
    return max(1, min(fit, max(WINDOW_ROWS, -(-n // 8))))


def _one_token_each(x: Float[Tensor, "pos d"], tokens: range) -> Tensor:
    # Row r holds token tokens[r]'s own embedding at its position, zero elsewhere.
    rows = torch.zeros(len(tokens), *x.shape, dtype=x.dtype, device=x.device)
    rows[torch.arange(len(tokens), device=x.device), list(tokens)] = x[list(tokens)]
    return rows


def token_contributions(
    model,
    prompt_or_tokens: Prompt,
    *,
    target: str = "output",
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
    chunk_size: int | None = None,
) -> Contributions:
    """Per-token contributions ``J_i x_i`` by batched forward passes of the frozen system.

    The same numbers as ``linear_map(...).contributions()`` (to float64 rounding), at the
    cost of one forward row per token up to ``position`` instead of ``d_out`` backward rows.
    Each pass of tokens ``s..`` runs on the window of the prompt from ``s`` (earlier
    positions only add the affine part), so a long prompt costs about half the
    position-rows of pushing every token through the whole prompt.

    Args:
        model: A TransformerBridge of a supported architecture.
        prompt_or_tokens: One prompt.
        target: ``"output"`` or a hook name.
        position: Target position.
        dtype: Working dtype.
        chunk_size: Tokens per forward pass (default: as many as fit in half the free
            memory, at most an eighth of the prompt unless that is under `WINDOW_ROWS`).

    Returns:
        A `Contributions`.
    """
    with frozen_system(model, prompt_or_tokens, [target], position=position, dtype=dtype, graph=False) as system:
        name, x, last = system.names[0], system.x[0].detach(), system.position
        step = _rows_per_pass(system, chunk_size)
        parts = []
        for start in range(0, last + 1, step):
            window = system.window(start, graph=False)
            rows = _one_token_each(x[start : last + 1], range(min(step, last + 1 - start)))
            parts.append(window.push(rows)[name])
        after = torch.zeros(len(x) - last - 1, parts[0].shape[-1], dtype=x.dtype, device=x.device)
        return Contributions(values=torch.cat(parts + [after]), **system.result_fields(name))


@dataclass
class TokenOperator:
    """One token's operator ``J_i``, applied without materialising it.

    Attributes:
        system: The frozen system (valid inside `matrix_free`), usually a
            `FrozenSystem.window` starting at the token, which makes products cheaper.
        target: Hook name.
        token: Input token index ``i`` in ``system``.
    """

    system: FrozenSystem
    target: str
    token: int

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
        return self.system.push(embeddings)[self.target]

    def rmatvec(self, covectors: Float[Tensor, "k d_out"]) -> Float[Tensor, "k d_in"]:
        """``J_i^T u`` for each row ``u``, by one batched backward through the window's graph.

        Args:
            covectors: Output-space vectors.

        Returns:
            Input-space vectors.
        """
        with torch.enable_grad():
            return self.system.vjp(self.target, covectors)[:, self.token]


def _orthonormal_to(block: Tensor, basis: Tensor | None) -> Tensor:
    # Columns of `block` made orthonormal and orthogonal to `basis` (twice, for stability).
    for _ in range(2):
        if basis is not None:
            block = block - basis @ (basis.T @ block)
        block = torch.linalg.qr(block).Q
    return block


def randomized_svd(operator: TokenOperator, k: int, *, oversample: int = 4, max_iter: int = 40, tol: float = 1e-10) -> Singular:
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
        A `Singular`, each pair signed so that ``u`` points along the target's output.
    """
    x = operator.system.x
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
    left, right = left[:, :k].T, (basis @ w[:k].T).T
    output = operator.system.outputs[operator.target]
    sign = torch.where(left @ output >= 0, 1.0, -1.0).to(left)
    return Singular(values[:k], left * sign[:, None], right * sign[:, None])


@dataclass
class MatrixFree:
    """Matrix-free access to one prompt's frozen system, valid inside `matrix_free`."""

    system: FrozenSystem

    def operator(self, token: int, target: str | None = None) -> TokenOperator:
        """The operator of one input token.

        Args:
            token: Input token index (negative counts from the end).
            target: Hook name (default: the first target).

        Returns:
            A `TokenOperator`.
        """
        token = token % self.system.tokens.shape[1]
        if token > self.system.position:
            raise InputError(f"Token {token} comes after the target position {self.system.position}: its operator is zero.")
        return TokenOperator(self.system.window(token), target or self.system.names[0], 0)

    def svd(self, token: int = -1, k: int = 8, target: str | None = None, **options) -> Singular:
        """Top-k singular triplets of one token's operator (see `randomized_svd`).

        Args:
            token: Input token index.
            k: Number of triplets.
            target: Hook name (default: the first target).
            **options: Passed to `randomized_svd`.

        Returns:
            A `Singular`.
        """
        return randomized_svd(self.operator(token, target), k, **options)


@contextmanager
def matrix_free(
    model, prompt_or_tokens: Prompt, *, target: str = "output", position: int = -1, dtype: torch.dtype | None = torch.float64
) -> Iterator[MatrixFree]:
    """Borrow the model and give matrix-free products with its frozen system.

    Args:
        model: A TransformerBridge of a supported architecture.
        prompt_or_tokens: One prompt.
        target: ``"output"`` or a hook name.
        position: Target position.
        dtype: Working dtype (restored on exit).

    Returns:
        A context manager yielding a `MatrixFree`.

    Example:
        >>> with tl_linmap.matrix_free(model, "The capital of France is") as mf:
        ...     top = mf.svd(token=-1, k=8)
    """
    # Each token's products run on a window with its own graph: the whole prompt's is not needed.
    with frozen_system(model, prompt_or_tokens, [target], position=position, dtype=dtype, graph=False) as system:
        yield MatrixFree(system)
