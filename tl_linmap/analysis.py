"""Analysis: reading the operators as tokens, their singular directions and their dimensionality.

Output-space vectors (a target's value, a contribution, a left singular vector) are read
through ``ln_final`` frozen at the target position and the unembedding (the logit lens, made
exact by freezing the norm's scale); input-space vectors (a right singular vector) by cosine
similarity with the token embedding matrix. Every function that summarises over input tokens
takes ``skip_first``: the first token (BOS, or the first word where there is none) is usually
an attention sink whose operator dwarfs the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.errors import InputError
from tl_linmap.table import Table

if TYPE_CHECKING:
    from tl_linmap.maps import LinearMap, TargetResult
    from tl_linmap.system import FrozenAffine


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


def token_id(model, token: int | str) -> int:
    """One vocabulary id from an id or a single-token string.

    Args:
        model: A TransformerBridge (for its tokenizer).
        token: Id or string such as ``" Paris"``.

    Returns:
        The id.

    Raises:
        InputError: if the string is not exactly one token.
    """
    if isinstance(token, str):
        ids = model.to_tokens(token, prepend_bos=False)[0]
        if len(ids) != 1:
            raise InputError(f"{token!r} is {len(ids)} tokens; give one token (or its id).")
        return int(ids[0])
    return int(token)


@dataclass
class Readout:
    """How one target's vectors are read as tokens.

    Attributes:
        model: The model (for ``W_U``, ``W_E`` and the tokenizer).
        final_norm: ``ln_final`` frozen at the target position; None when the target is
            the final norm's own output.
        residual: Whether the target's vectors live in the residual stream (False for
            ``hook_z``, MLP neurons, ...: they cannot be read through the unembedding).
    """

    model: object = field(repr=False)
    final_norm: FrozenAffine | None = None
    residual: bool = True

    def logits(self, vectors: Float[Tensor, "... d_model"], affine: bool = False) -> Float[Tensor, "... d_vocab"]:
        """Read output-space vectors through the frozen final norm and ``W_U``.

        Args:
            vectors: Residual-space (or final-norm-output) vectors.
            affine: Add the norm's offset and ``b_U`` (for a target's value; leave off for
                directions and contributions, which are linear parts).

        Returns:
            Logits over the vocabulary.

        Raises:
            InputError: if the vectors do not live in the residual stream.
        """
        d_model = self.model.cfg.d_model
        if not self.residual or vectors.shape[-1] != d_model:
            raise InputError(
                "These vectors are not in the residual stream, so the unembedding cannot read them; "
                "decode a residual-stream target (hook_resid_*, hook_attn_out, hook_mlp_out, output) or a head map."
            )
        if self.final_norm is not None:
            vectors = vectors @ self.final_norm.matrix.T + (self.final_norm.offset if affine else 0)
        logits = vectors @ self.model.W_U.detach().to(vectors)
        bias = getattr(self.model, "b_U", None)
        return logits + bias.detach().to(vectors) if affine and bias is not None else logits

    def cosines(self, vectors: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """Cosine similarity of input-space vectors with every token embedding.

        Args:
            vectors: Input-space vectors (the space of ``hook_embed``).

        Returns:
            Cosines over the vocabulary.
        """
        embeddings = self.model.W_E.detach().to(vectors)
        return (vectors @ embeddings.T) / (vectors.norm(dim=-1, keepdim=True) * embeddings.norm(dim=-1)).clamp_min(1e-30)

    def top(self, scores: Float[Tensor, "... d_vocab"], k: int) -> list[list[tuple[str, float]]]:
        """The k highest-scoring tokens of each score row.

        Args:
            scores: Logits or cosines, one row per vector.
            k: How many tokens.

        Returns:
            Per row, ``(token, score)`` pairs, highest first.
        """
        best = scores.reshape(-1, scores.shape[-1]).topk(k)
        return [_decode(self.model, ids, values) for ids, values in zip(best.indices, best.values)]


def _signed(left: Tensor, right: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
    # Flip each pair so u · output >= 0; (u, v) and (-u, -v) are the same triplet.
    sign = torch.where(left @ output >= 0, 1.0, -1.0).to(left)
    return left * sign[..., None], right * sign[..., None]


@dataclass
class DecodedPair:
    """One singular pair of one operator, read as tokens.

    Attributes:
        target: Hook name of the map.
        source: Input token index of the operator ``J_i``, or ``"all"`` for the stacked
            operator ``[J_0 … J_n]``.
        token: The input token (for ``"all"``: the token whose block of ``v`` is largest).
        index: ``j`` of ``σ_j`` (0 = largest).
        sigma: The singular value.
        share: ``σ_j² / Σ σ²``: the pair's share of the operator's squared Frobenius norm.
        left: Tokens the left vector ``u`` writes (frozen ``ln_final``, then ``W_U``), with logits.
        right: Tokens whose embeddings ``v`` reads (cosine with ``W_E``; for ``"all"``: of
            the largest block).
        block_share: For ``"all"``: that block's share of ``‖v‖²`` (None for one token's operator).
    """

    target: str
    source: int | str
    token: str
    index: int
    sigma: float
    share: float
    left: list[tuple[str, float]]
    right: list[tuple[str, float]]
    block_share: float | None = None


@dataclass
class OperatorSVD:
    """Singular value decompositions of one map's operators, each pair signed along the output.

    Attributes:
        target: Hook name.
        sources: The decoded input tokens.
        values: Per token ``i <= position``, all singular values of ``J_i`` (descending).
        left: Per token, the top-k left singular vectors as rows (output space).
        right: Per token, the top-k right singular vectors as rows (input space).
        stacked: The SVD of ``[J_i for i in stacked_tokens]`` side by side (all values,
            top-k vectors); its right vectors are split per token, ``(k, len(stacked_tokens), d_in)``.
        stacked_tokens: Input tokens in ``stacked``.
        readout: How vectors are read as tokens.
    """

    target: str
    sources: list[str]
    values: Float[Tensor, "pos r"]
    left: Float[Tensor, "pos k d_out"]
    right: Float[Tensor, "pos k d_in"]
    stacked: Singular
    stacked_tokens: list[int]
    readout: Readout | None = field(default=None, repr=False)

    def decode(self, k: int = 3, top: int = 10, tokens: list[int] | int | None = None, *, skip_first: bool = False, stacked: bool = False) -> Table:
        """Read the top singular pairs as tokens.

        Args:
            k: Pairs per operator.
            top: Tokens per vector.
            tokens: Input token indices whose operators are read (default: all up to the
                target position; negative indices count from the end).
            skip_first: Leave the first token's operator out.
            stacked: Also read the stacked operator's pairs (rows with ``source="all"``).

        Returns:
            A `tl_linmap.table.Table` of `DecodedPair`, grouped by operator.

        Raises:
            InputError: if there is no readout or the target is not in the residual stream.
        """
        if self.readout is None:
            raise InputError("This SVD has no readout; compute it from a LinearMap made by tl_linmap.")
        n = len(self.values)
        chosen = range(n) if tokens is None else [tokens] if isinstance(tokens, int) else tokens
        chosen = [i % n for i in chosen if not (skip_first and i % n == 0)]
        k = min(k, self.left.shape[1])
        energy = self.values.pow(2).sum(-1)
        left = self.readout.top(self.readout.logits(self.left[chosen, :k]), top)
        right = self.readout.top(self.readout.cosines(self.right[chosen, :k]), top)
        rows = Table()
        for a, i in enumerate(chosen):
            for j in range(k):
                sigma = float(self.values[i, j])
                rows.append(DecodedPair(self.target, i, self.sources[i], j, sigma, sigma**2 / float(energy[i]),
                                        left[a * k + j], right[a * k + j]))
        if stacked:
            rows.extend(self._decode_stacked(k, top))
        return rows

    def _decode_stacked(self, k: int, top: int) -> list[DecodedPair]:
        k = min(k, self.stacked.left.shape[0])
        values = self.stacked.values[:k]
        blocks = self.stacked.right[:k]  # (k, n_stacked, d_in)
        share = blocks.pow(2).sum(-1)  # each v has unit norm, so these are its shares per token
        main = share.argmax(-1)
        left = self.readout.top(self.readout.logits(self.stacked.left[:k]), top)
        right = self.readout.top(self.readout.cosines(blocks[torch.arange(len(main)), main]), top)
        total = float(self.stacked.values.pow(2).sum())
        return [
            DecodedPair(self.target, "all", self.sources[self.stacked_tokens[m]], j, float(values[j]),
                        float(values[j]) ** 2 / total, left[j], right[j], float(share[j, m]))
            for j, m in enumerate(main.tolist())
        ]


def source_tokens(lm: TargetResult) -> list[str]:
    """The input tokens of a result, decoded.

    Args:
        lm: A `tl_linmap.maps.TargetResult`.

    Returns:
        One string per input token (token ids where the result has no readout).
    """
    tokenizer = lm.readout.model.tokenizer if lm.readout is not None else None
    return [tokenizer.decode([int(t)]) if tokenizer else str(int(t)) for t in lm.tokens]


def stacked_tokens(lm: LinearMap, skip_first: bool) -> list[int]:
    """The input tokens whose operators the stacked operator ``[J_i …]`` holds.

    Args:
        lm: A `tl_linmap.maps.LinearMap`.
        skip_first: Leave the first token out.

    Returns:
        Token indices up to the target position.

    Raises:
        InputError: if ``skip_first`` leaves none (a one-token prompt).
    """
    tokens = list(range(1 if skip_first else 0, lm.position + 1))
    if not tokens:
        raise InputError("skip_first leaves no token to analyse in a one-token prompt.")
    return tokens


def operator_svd(lm: LinearMap, k: int | None = None, *, skip_first: bool = False) -> OperatorSVD:
    """SVD of every token's operator and of the stacked operator of one map.

    Args:
        lm: A `tl_linmap.maps.LinearMap`.
        k: Pairs kept per operator (default: all).
        skip_first: Leave the first token out of the stacked operator.

    Returns:
        An `OperatorSVD` (all singular values, top-k vectors); each pair's sign makes
        ``u · output >= 0``.
    """
    operators = lm.operators[: lm.position + 1]
    u, s, vh = torch.linalg.svd(operators, full_matrices=False)
    k = k or s.shape[-1]
    left, right = _signed(einops.rearrange(u[..., :k], "pos d k -> pos k d"), vh[:, :k], lm.output)
    stacked = stacked_tokens(lm, skip_first)
    wide = einops.rearrange(operators[stacked], "pos d_out d_in -> d_out (pos d_in)")
    su, ss, svh = torch.linalg.svd(wide, full_matrices=False)
    s_left, s_right = _signed(su[:, :k].T, svh[:k], lm.output)
    split = einops.rearrange(s_right, "k (pos d) -> k pos d", pos=len(stacked))
    return OperatorSVD(lm.target, source_tokens(lm), s, left, right, Singular(ss, s_left, split), stacked, lm.readout)


@dataclass
class RankRow:
    """How many dimensions one operator uses.

    Attributes:
        target: Hook name.
        source: Input token index, or ``"all"`` for the stacked operator.
        token: The input token (``"all"``: how many tokens are stacked).
        norm: ``‖J‖_F``.
        stable_rank: ``Σσ² / σ_max²``.
        effective_rank: ``exp`` of the entropy of the normalised singular values.
        rank90: Singular values holding 90% of ``Σσ²``.
        rank99: The same for 99%.
    """

    target: str
    source: int | str
    token: str
    norm: float
    stable_rank: float
    effective_rank: float
    rank90: int
    rank99: int


def _rank_row(target: str, source: int | str, token: str, values: Tensor) -> RankRow:
    return RankRow(target, source, token, float(values.norm()), stable_rank(values), effective_rank(values),
                   energy_rank(values, 0.9), energy_rank(values, 0.99))


def dimensionality(lm: LinearMap, *, skip_first: bool = False, per_token: bool = True) -> Table:
    """Stable rank, effective rank and 90%/99% energy ranks of each operator and the stacked one.

    Args:
        lm: A `tl_linmap.maps.LinearMap`.
        skip_first: Leave the first token out (its row and the stacked operator).
        per_token: Include one row per token (False: only the stacked operator's row).

    Returns:
        A `tl_linmap.table.Table` of `RankRow`: per token, then ``source="all"``.
    """
    tokens = stacked_tokens(lm, skip_first)
    sources = source_tokens(lm)
    rows = Table()
    if per_token:
        values = torch.linalg.svdvals(lm.operators[tokens])
        rows.extend(_rank_row(lm.target, i, sources[i], v) for i, v in zip(tokens, values))
    wide = einops.rearrange(lm.operators[tokens], "pos d_out d_in -> d_out (pos d_in)")
    rows.append(_rank_row(lm.target, "all", f"{len(tokens)} tokens", torch.linalg.svdvals(wide)))
    return rows


@dataclass
class LogitSplit:
    """One token's logit (through the frozen final norm) split exactly over input tokens.

    For a target other than the model's output this is the logit lens of that target, made
    linear by freezing ``ln_final`` at the inference scale of the target position.

    Attributes:
        token: The output token.
        sources: The decoded input tokens.
        per_token: ``w · J_i x_i`` per input token.
        constant: The affine part: ``w · b``, the norm's offset and ``b_U``.
        logit: The logit read off the target's own value.
    """

    token: str
    sources: list[str]
    per_token: Float[Tensor, " pos"]
    constant: float
    logit: float

    def total(self) -> float:
        """The sum of the parts.

        Returns:
            ``per_token.sum() + constant``, equal to `logit` to rounding.
        """
        return float(self.per_token.sum()) + self.constant


def logit_contributions(result: TargetResult, token: int | str) -> LogitSplit:
    """Split one output token's logit over the input tokens of a map or of forward-route contributions.

    Args:
        result: A `tl_linmap.maps.LinearMap` or `tl_linmap.operators.Contributions` of a
            residual-stream target (or ``"output"``).
        token: Output token id or single-token string.

    Returns:
        A `LogitSplit`.
    """
    readout = result.readout
    if readout is None:
        raise InputError("This result has no readout; compute it with tl_linmap.")
    token = token_id(readout.model, token)
    logit = float(readout.logits(result.output, affine=True)[token])
    per_token = readout.logits(result.contributions())[:, token]
    constant = float(readout.logits(result.bias, affine=True)[token])
    return LogitSplit(readout.model.tokenizer.decode([token]), source_tokens(result), per_token, constant, logit)
