"""Spectral: singular directions of the operators, read as tokens, and how many dimensions they use.

Every SVD result is an `OperatorSVD`, from the dense operators (`tl_linmap.results.maps.LinearMap.svd`)
or matrix-free (`tl_linmap.linear.matrix_free.MatrixFree.svd`), and decodes the same way. Each pair is
signed so that ``u`` points along the target's actual output (``u · y >= 0``). Every function
that summarises over input tokens takes ``skip_first``: the first token (BOS, or the first word
where there is none) is usually an attention sink whose operator dwarfs the others.

Input token indices follow one convention everywhere: Python-style over the prompt, so ``-1``
is the prompt's last token; an index after the target position names an operator that is zero
and is refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.checks import is_int
from tl_linmap.base.errors import InputError


@dataclass
class Singular:
    """Singular triplets of one operator (a building block of `OperatorSVD`).

    Attributes:
        values: Singular values, descending.
        left: Left singular vectors as rows (output space).
        right: Right singular vectors as rows (input space; for a stacked operator
            ``(k, n_stacked, d_in)``, split per token).
    """

    values: Float[Tensor, " r"]
    left: Float[Tensor, "k d_out"]
    right: Tensor


def signed(left: Tensor, right: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so that ``u · output >= 0`` (``(u, v)`` and ``(−u, −v)`` are one triplet).

    Args:
        left: Left vectors as rows (``(..., k, d_out)``).
        right: The matching right vectors as rows.
        output: The target's value.

    Returns:
        The signed ``(left, right)``.
    """
    sign = torch.where(left @ output >= 0, 1.0, -1.0).to(left)
    return left * sign[..., None], right * sign.reshape(*sign.shape, *([1] * (right.ndim - sign.ndim)))


def top_singular(operator: Float[Tensor, "d_out d_in"], k: int, output: Float[Tensor, " d_out"] | None = None) -> Singular:
    """Deprecated: use ``LinearMap.svd(k)`` (an `OperatorSVD`, which decodes).

    Args:
        operator: One ``J_i``.
        k: Number of triplets.
        output: If given, each pair is flipped so that ``u · output >= 0``.

    Returns:
        A `Singular`.
    """
    warnings.warn("top_singular is deprecated; use LinearMap.svd(k), whose result decodes.", DeprecationWarning, stacklevel=2)
    u, s, vh = torch.linalg.svd(operator, full_matrices=False)
    left, right = u[:, :k].T, vh[:k]
    if output is not None:
        left, right = signed(left, right, output)
    return Singular(s[:k], left, right)


def energy_rank(values: Float[Tensor, " k"], fraction: float) -> int:
    """How many of the largest singular values hold ``fraction`` of the squared Frobenius norm.

    Args:
        values: Singular values (any order).
        fraction: Share of ``Σ σ²``, e.g. 0.9.

    Returns:
        The smallest ``r`` with ``Σ_{j<r} σ_j² >= fraction · Σ σ²``.
    """
    energy = values.sort(descending=True).values.pow(2)
    cumulative = energy.cumsum(0) / energy.sum()
    return int((cumulative < fraction - 1e-12).sum()) + 1


def stable_rank(values: Float[Tensor, " k"]) -> float:
    """``Σ σ² / σ_max²``.

    Args:
        values: Singular values.

    Returns:
        The stable rank (1 for a rank-one operator).
    """
    return float(values.pow(2).sum() / values.max().pow(2))


def effective_rank(values: Float[Tensor, " k"]) -> float:
    """``exp`` of the entropy of the normalised singular values (Roy & Vetterli).

    Args:
        values: Singular values.

    Returns:
        The effective rank (``k`` for a flat spectrum of ``k`` values, 1 for rank one).
    """
    p = values / values.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def input_index(source: int, n_tokens: int, position: int) -> int:
    """One input token index, Python-style over the prompt, checked against the target position.

    Args:
        source: Index into the prompt (``-1``: its last token).
        n_tokens: Prompt length.
        position: Target position (non-negative); later tokens have zero operators.

    Returns:
        The non-negative index.

    Raises:
        InputError: outside the prompt, or after the target position.
    """
    if not is_int(source) or not -n_tokens <= int(source) < n_tokens:
        raise InputError(f"An input token index must be an int in [{-n_tokens}, {n_tokens}) (-1: the last token), got {source!r}.")
    source = int(source)
    index = source % n_tokens
    if index > position:
        raise InputError(
            f"Input token {source} (index {index}) comes after the target position {position}: its operator is zero. "
            f"Pass a source in [0, {position}] (or map a later position)."
        )
    return index


def stacked_tokens(position: int, skip_first: bool) -> list[int]:
    """The input tokens whose operators the stacked operator ``[J_i …]`` holds.

    Args:
        position: Target position (non-negative).
        skip_first: Leave the first token out.

    Returns:
        Token indices up to the target position.

    Raises:
        InputError: if ``skip_first`` leaves none (a one-token prompt).
    """
    tokens = list(range(1 if skip_first else 0, position + 1))
    if not tokens:
        raise InputError(
            "skip_first leaves no token to analyse: the target is at position 0, which reads the first token only. "
            "Pass skip_first=False (or map a later position)."
        )
    return tokens
