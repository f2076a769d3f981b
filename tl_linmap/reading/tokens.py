"""Reading residual-stream vectors as tokens: the unembedding (through a frozen final norm), top
and nearest tokens, token ids and decoded prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from jaxtyping import Float, Int
from torch import Tensor

from tl_linmap.base.checks import check_positive, check_vector, is_int
from tl_linmap.base.compat import check_model
from tl_linmap.base.deprecation import renamed_names
from tl_linmap.base.errors import InputError
from tl_linmap.base.devices import resident


@dataclass
class FrozenAffine:
    """A frozen norm at one position as ``v -> matrix @ v + offset``."""

    matrix: Float[Tensor, "d_out d_in"]
    offset: Float[Tensor, " d_out"]


def unembed(model, vector: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits of a final-norm-output vector: ``vector @ W_U (+ b_U)``.

    For a map's own vectors use ``lm.reader.logits``: on a HookedTransformer the ``"output"``
    hook comes before the final norm's weight, which the readout applies and this does not.

    Args:
        model: A TransformerBridge or HookedTransformer.
        vector: Vector(s) the unembedding reads directly, e.g. a bridge map's output of target ``"output"``.

    Returns:
        Logits over the vocabulary, in the vector's dtype.

    Raises:
        InputError: for a bad model, or a vector that is not a ``(..., d_model)`` tensor.
    """
    check_model(model)
    check_vector(model, vector, one=False)
    logits = vector @ resident(model, "W_U").to(vector)
    bias = resident(model, "b_U")
    return logits if bias is None else logits + bias.detach().to(vector)


def _decode(model, ids: Tensor, scores: Tensor) -> list[tuple[str, float]]:
    return [(model.tokenizer.decode([int(i)]), float(s)) for i, s in zip(ids, scores)]


def top_tokens(model, vector: Float[Tensor, " d_model"], k: int = 5, bias: bool = True) -> list[tuple[str, float]]:
    """Tokens whose unembedding reads a vector most strongly.

    Args:
        model: A TransformerBridge or HookedTransformer.
        vector: An output-space vector.
        k: How many tokens.
        bias: Add the unembedding bias (off for directions such as singular vectors).

    Returns:
        ``(token, logit)`` pairs, highest first.

    Raises:
        InputError: for a bad model, a vector that is not ``(d_model,)``, or ``k`` not in ``[1, d_vocab]``.
    """
    check_model(model)
    check_vector(model, vector, one=True)
    k = check_positive("k", k, at_most=model.cfg.d_vocab)
    logits = unembed(model, vector) if bias else vector @ resident(model, "W_U").to(vector)
    top = logits.topk(k)
    return _decode(model, top.indices, top.values)


def nearest_tokens(model, vector: Float[Tensor, " d_model"], k: int = 5) -> list[tuple[str, float]]:
    """Tokens whose embedding is closest in direction to an input-space vector.

    Args:
        model: A TransformerBridge or HookedTransformer.
        vector: An input-space vector (same space as ``hook_embed``).
        k: How many tokens.

    Returns:
        ``(token, cosine)`` pairs, highest first.

    Raises:
        InputError: for a bad model, a vector that is not ``(d_model,)``, or ``k`` not in ``[1, d_vocab]``.
    """
    check_model(model)
    check_vector(model, vector, one=True)
    k = check_positive("k", k, at_most=model.cfg.d_vocab)
    embeddings = resident(model, "W_E").to(vector)
    cosine = embeddings @ vector / (embeddings.norm(dim=-1) * vector.norm()).clamp_min(1e-30)
    top = cosine.topk(k)
    return _decode(model, top.indices, top.values)


def token_id(model, token: int | str) -> int:
    """One vocabulary id from an id or a single-token string.

    Args:
        model: A TransformerBridge or HookedTransformer (for its tokenizer).
        token: Id or string such as ``" Paris"``.

    Returns:
        The id.

    Raises:
        InputError: if the string is not exactly one token, or the id is not an int in
            ``[0, d_vocab)``.
    """
    if isinstance(token, str):
        ids = model.to_tokens(token, prepend_bos=False, move_to_device=False)[0]
        if len(ids) != 1:
            pieces = [model.tokenizer.decode([int(i)]) for i in ids[:6]]
            split = f" ({' + '.join(map(repr, pieces))}{' + ...' if len(ids) > 6 else ''})" if pieces else ""
            example = f" such as {pieces[0]!r}" if pieces else ""
            raise InputError(f"{token!r} is {len(ids)} tokens{split}; give one token{example}, or its id.")
        return int(ids[0])
    if not is_int(token):
        raise InputError(f"token must be a vocabulary id (int) or a single-token string such as ' Paris', got {token!r}.")
    token = int(token)
    if not 0 <= token < model.cfg.d_vocab:
        raise InputError(f"Token id {token} is outside the vocabulary [0, {model.cfg.d_vocab}); pass an id in it or a token string.")
    return token


@dataclass
class TokenReader:
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
        logits = vectors @ resident(self.model, "W_U").to(vectors)
        bias = resident(self.model, "b_U")
        return logits + bias.detach().to(vectors) if affine and bias is not None else logits

    def cosines(self, vectors: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """Cosine similarity of input-space vectors with every token embedding.

        Args:
            vectors: Input-space vectors (the space of ``hook_embed``).

        Returns:
            Cosines over the vocabulary.
        """
        embeddings = resident(self.model, "W_E").to(vectors)
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


def decode_tokens(model, tokens: Int[Tensor, " pos"] | Sequence[int]) -> list[str]:
    """Token ids as strings, one per id.

    Args:
        model: A model with a tokenizer, or None.
        tokens: Token ids.

    Returns:
        The decoded tokens (the ids as text where there is no tokenizer).
    """
    tokenizer = getattr(model, "tokenizer", None)
    return [tokenizer.decode([int(t)]) if tokenizer else str(int(t)) for t in tokens]


__getattr__ = renamed_names(__name__, {"Readout": "TokenReader"})
