"""Analysis: reading output-space vectors and operators as tokens.

Output-space vectors (a target of ``"output"``, a contribution, a left singular vector)
are read through the unembedding; input-space vectors (a right singular vector) by
cosine similarity with the token embedding matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass
class Singular:
    """The top singular triplets of one operator, signed so each ``u`` points along the output.

    Attributes:
        values: Singular values, descending.
        left: Left singular vectors as rows (output space).
        right: Right singular vectors as rows (input space).
    """

    values: Float[Tensor, " k"]
    left: Float[Tensor, "k d_out"]
    right: Float[Tensor, "k d_in"]


def top_singular(operator: Float[Tensor, "d_out d_in"], k: int, output: Float[Tensor, " d_out"] | None = None) -> Singular:
    """Top-k SVD of an operator, with a reproducible sign per pair.

    Args:
        operator: One ``J_i``.
        k: Number of triplets.
        output: If given, each pair is flipped so that ``u · output >= 0``.

    Returns:
        A `Singular`.
    """
    u, s, vh = torch.linalg.svd(operator, full_matrices=False)
    left, right = u[:, :k].T, vh[:k]
    if output is not None:
        sign = torch.where(left @ output >= 0, 1.0, -1.0).to(left.dtype)
        left, right = left * sign[:, None], right * sign[:, None]
    return Singular(s[:k], left, right)


def unembed(model, vector: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits of a final-norm-output vector: ``vector @ W_U (+ b_U)``.

    Args:
        model: A TransformerBridge.
        vector: Output-space vector(s), e.g. a `LinearMap` output of target ``"output"``.

    Returns:
        Logits over the vocabulary, in the vector's dtype.
    """
    logits = vector @ model.W_U.detach().to(vector)
    bias = getattr(model, "b_U", None)
    return logits if bias is None else logits + bias.detach().to(vector)


def _decode(model, ids: Tensor, scores: Tensor) -> list[tuple[str, float]]:
    return [(model.tokenizer.decode([int(i)]), float(s)) for i, s in zip(ids, scores)]


def top_tokens(model, vector: Float[Tensor, " d_model"], k: int = 5, bias: bool = True) -> list[tuple[str, float]]:
    """Tokens whose unembedding reads a vector most strongly.

    Args:
        model: A TransformerBridge.
        vector: An output-space vector.
        k: How many tokens.
        bias: Add the unembedding bias (off for directions such as singular vectors).

    Returns:
        ``(token, logit)`` pairs, highest first.
    """
    logits = unembed(model, vector) if bias else vector @ model.W_U.detach().to(vector)
    top = logits.topk(k)
    return _decode(model, top.indices, top.values)


def nearest_tokens(model, vector: Float[Tensor, " d_model"], k: int = 5) -> list[tuple[str, float]]:
    """Tokens whose embedding is closest in direction to an input-space vector.

    Args:
        model: A TransformerBridge.
        vector: An input-space vector (same space as ``hook_embed``).
        k: How many tokens.

    Returns:
        ``(token, cosine)`` pairs, highest first.
    """
    embeddings = model.W_E.detach().to(vector)
    cosine = embeddings @ vector / (embeddings.norm(dim=-1) * vector.norm()).clamp_min(1e-30)
    top = cosine.topk(k)
    return _decode(model, top.indices, top.values)


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
