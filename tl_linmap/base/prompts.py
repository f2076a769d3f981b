"""Prompts: one prompt or a batch, as token ids, and the positions asked of them.

A public call reads what it was given once, at its entry (`read_prompts`), into one `Prompts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_linmap.base.checks import as_index, check_position
from tl_linmap.base.compat import check_model
from tl_linmap.base.devices import input_device
from tl_linmap.base.errors import InputError

Prompt = Union[str, Sequence[int], Tensor]


@dataclass(frozen=True)
class Prompts:
    """What a public call was given as its prompt(s), tokenized and checked once (`read_prompts`).

    Every route below the entry point takes this value, so no prompt is tokenized, and no
    position checked, twice.

    Attributes:
        tokens: Per prompt, its token ids ``(1, n)``, without padding, on the model's device.
        positions: Per prompt, the target position as a non-negative index.
        batch: Whether the caller passed several prompts (a list, or a token batch): results
            then come back as a list, also of one prompt.
        mask: The caller's ``attention_mask`` as a bool tensor ``(batch, pos)``, where one was
            given (``tokens`` are already cut to it).
    """

    tokens: tuple[Int[Tensor, "1 pos"], ...]
    positions: tuple[int, ...]
    batch: bool = False
    mask: Bool[Tensor, "batch pos"] | None = field(default=None, repr=False)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Per prompt, its number of tokens."""
        return tuple(t.shape[1] for t in self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def singles(self) -> list[Prompts]:
        """Each prompt alone, as a call given only that prompt would have read it.

        Returns:
            One `Prompts` of one prompt (``batch=False``) per prompt.
        """
        return [Prompts((tokens,), (position,)) for tokens, position in zip(self.tokens, self.positions)]


def to_tokens(model, prompt: Prompt) -> Int[Tensor, "1 pos"]:
    """Tokenize one prompt (or check given tokens) the way the model's own forward would.

    Args:
        model: A TransformerBridge or HookedTransformer.
        prompt: A string, a list of token ids, or a token tensor of shape ``(pos,)`` or
            ``(1, pos)``.

    Returns:
        Tokens of shape ``(1, pos)`` on the model's device.

    Raises:
        InputError: for a model that is not a TransformerLens model (`tl_linmap.base.compat.check_model`),
            an empty prompt, several prompts, non-integer tokens, ids outside the vocabulary,
            or more tokens than the model's context.
    """
    check_model(model)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("The prompt is empty; give at least one token of text.")
        tokens = model.to_tokens(prompt, truncate=False, move_to_device=False)  # moved below, to where it runs
    elif isinstance(prompt, (list, tuple)) and any(isinstance(p, str) for p in prompt):
        if not all(isinstance(p, str) for p in prompt):
            raise InputError("The prompt mixes strings and token ids: pass one string, or a list of token ids.")
        if len(prompt) == 1:
            raise InputError(f"Got a list holding one string; pass the string itself: {prompt[0]!r}.")
        raise InputError(f"Got {len(prompt)} prompts; a linear map is of one prompt: call once per prompt.")
    else:
        try:
            tokens = torch.as_tensor(prompt)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(
                f"The prompt must be a string, a list of token ids or a token tensor, got {type(prompt).__name__}."
            ) from err
        if tokens.numel() == 0:
            raise InputError("The prompt has no tokens.")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise InputError(f"Token ids must be integers, got dtype {tokens.dtype}: pass a list of ints or a torch.long tensor.")
        if tokens.ndim == 0:
            raise InputError(f"Got one token id, {tokens.item()}; pass a list of token ids such as [{tokens.item()}], or a string.")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[0] != 1:
            raise InputError(
                f"Expected the tokens of one prompt, shape (pos,) or (1, pos); got {tuple(tokens.shape)}. "
                "Call once per prompt."
            )
    n_tokens = tokens.shape[1]
    if n_tokens == 0:
        raise InputError("The prompt has no tokens.")
    if n_tokens > model.cfg.n_ctx:
        raise InputError(
            f"The prompt has {n_tokens} tokens, more than the model's context of {model.cfg.n_ctx}: shorten it to at most that."
        )
    if tokens.min() < 0 or tokens.max() >= model.cfg.d_vocab:
        if isinstance(prompt, str):  # the user passed text: the tokenizer made these ids
            outside = sorted({int(t) for t in tokens[0] if not 0 <= int(t) < model.cfg.d_vocab})
            raise InputError(
                f"The model's tokenizer turned this text into ids the model has no embedding for ({outside[:5]}; the "
                f"vocabulary is [0, {model.cfg.d_vocab})): a special token it adds (BOS?) lies outside it. Pass the token "
                "ids yourself (model.to_tokens(text, prepend_bos=False) and the BOS the model has), or fix the tokenizer's special tokens."
            )
        raise InputError(f"Token ids must lie in [0, {model.cfg.d_vocab}); got {tokens.min()}..{tokens.max()}.")
    return tokens.to(input_device(model))  # a dispatched model's cfg.device can be meta


def _is_prompt_list(prompts) -> bool:
    # A list of prompts holds strings or token sequences; a list of ints is one prompt's tokens.
    return isinstance(prompts, (list, tuple)) and bool(prompts) and all(
        isinstance(p, (str, list, tuple)) or (isinstance(p, Tensor) and p.ndim >= 1) for p in prompts
    )


def is_batch(prompts, attention_mask=None) -> bool:
    """Whether an entry point was given several prompts (see `prompt_batch`) rather than one.

    Args:
        prompts: What the user passed as the prompt.
        attention_mask: The user's ``attention_mask=``, or None.

    Returns:
        True for a list of prompts (strings or token lists), an empty list or tuple, a token
        tensor of two or more rows, or any tokens given with a mask.
    """
    if attention_mask is not None or _is_prompt_list(prompts) or (isinstance(prompts, (list, tuple)) and not prompts):
        return True
    return isinstance(prompts, Tensor) and prompts.ndim == 2 and prompts.shape[0] > 1


def prompt_batch(model, prompts, attention_mask=None) -> list[Int[Tensor, "1 pos"]]:
    """Several prompts as one token tensor each, unpadded, checked as `to_tokens` checks one.

    Args:
        model: A TransformerBridge or HookedTransformer.
        prompts: A list of prompts (strings or token lists, mixed lengths), or a padded token
            batch ``(batch, pos)`` (a tensor, or rows of ids of one length as a tokenizer's
            ``padding=True`` gives them); with ``attention_mask`` the padding may be on either side.
        attention_mask: ``(batch, pos)`` of 1 for real tokens and 0 for padding (bool or
            integer, a tensor or nested lists), one contiguous run of ones per row; None for a
            list of prompts, or for a token batch without padding.

    Returns:
        Per prompt, its tokens ``(1, n)`` without padding.

    Raises:
        InputError: for no prompts, a mask with a list of texts or with rows of different
            lengths, a mask whose shape is not the tokens', a mask that is not 0/1 or not one run
            of ones per row (or a row of none), a token batch without mask that ends in the pad
            token (padding without a mask is ambiguous), or any bad prompt.
    """
    check_model(model)
    if isinstance(prompts, (list, tuple)) and not prompts:
        raise InputError("The list is empty: no prompts and no tokens; give at least one prompt (text or token ids).")
    if _is_prompt_list(prompts) and attention_mask is None:
        return [to_tokens(model, p) for p in prompts]
    tokens = _token_rows(prompts) if isinstance(prompts, (list, tuple)) else prompts
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(prompts).__name__
        raise InputError(f"A batch of prompts is a list of prompts or a token tensor (batch, pos) with attention_mask; got {shape}.")
    if attention_mask is None:
        pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
        if pad is not None and bool((tokens[:, -1] == pad).any()):
            raise InputError(
                f"A row of this token batch ends in the pad token ({pad}): without attention_mask it is ambiguous "
                "whether that is padding. Pass attention_mask= (1 for real tokens, 0 for padding), or a list of prompts."
            )
        return [to_tokens(model, row) for row in tokens]
    mask = torch.as_tensor(attention_mask)
    if mask.shape != tokens.shape:
        raise InputError(f"attention_mask has shape {tuple(mask.shape)}, the tokens {tuple(tokens.shape)}: they must match.")
    if mask.dtype.is_floating_point or not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must hold 0 (padding) and 1 (real tokens) only, as a bool or integer tensor.")
    mask = mask.bool()
    rows = []
    for index, (row, keep) in enumerate(zip(tokens, mask)):
        where = keep.nonzero()[:, 0]
        if len(where) == 0:
            raise InputError(f"Row {index} of attention_mask is all zeros: every prompt needs at least one token.")
        if where[-1] - where[0] + 1 != len(where):
            raise InputError(f"Row {index} of attention_mask has padding between real tokens: pad on the left or the right only.")
        rows.append(to_tokens(model, row[where[0] : where[-1] + 1]))
    return rows


def _token_rows(prompts: list | tuple) -> Tensor:
    # With a mask, a list is padded ids as a tokenizer returns them without return_tensors="pt".
    if any(isinstance(p, str) for p in prompts):
        raise InputError("attention_mask goes with a padded token batch (a 2-D tensor); a list of prompts needs none.")
    try:
        rows = [torch.as_tensor(p) for p in prompts]
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"A padded token batch holds rows of token ids; got {type(prompts[0]).__name__} rows.") from err
    if len({row.shape for row in rows}) > 1:
        raise InputError(
            "With attention_mask the rows must be padded to one length (the input_ids a tokenizer gives with "
            "padding=True); these differ. Pad them, or pass the list of prompts without attention_mask."
        )
    return torch.stack(rows)


def check_positions(model, position: int, prompts: Sequence[Int[Tensor, "1 pos"]]) -> list[int]:
    """`check_position` for every prompt of a batch, naming the prompt a position misses.

    Args:
        model: The model the prompts were tokenized for (to decode the prompt named).
        position: Index into every prompt, Python-style.
        prompts: Per prompt, its tokens ``(1, n)`` (`prompt_batch`).

    Returns:
        Per prompt, the position as a non-negative index.

    Raises:
        InputError: if the position is not an int, or out of range for some prompt (the
            first such prompt is named, by its index and text).
    """
    position = as_index("position", position)
    shortest = min(tokens.shape[1] for tokens in prompts)
    for index, tokens in enumerate(prompts):
        n = tokens.shape[1]
        if not -n <= position < n:
            tokenizer = getattr(model, "tokenizer", None)
            text = repr(tokenizer.decode(tokens[0])) if tokenizer is not None else str(tokens[0].tolist())
            raise InputError(
                f"Position {position} is out of range for prompt {index} of the batch ({text[:60]}, {n} token{'s' * (n != 1)}): "
                f"pass one every prompt has, in [{-shortest}, {shortest}) (-1: each prompt's last token)."
            )
    return [position % tokens.shape[1] for tokens in prompts]


def read_prompts(model, prompt_or_tokens, *, position: int = -1, attention_mask=None, several: bool = True) -> Prompts:
    """The prompt(s) a public call was given, as one checked value (`Prompts`).

    Args:
        model: A TransformerBridge or HookedTransformer.
        prompt_or_tokens: One prompt (`to_tokens`), or several (`is_batch`, `prompt_batch`).
        position: The target position in every prompt, Python-style.
        attention_mask: With a padded token batch, 1 for real tokens and 0 for padding (`prompt_batch`).
        several: Whether the call takes several prompts; if not, the prompt is read as one
            (`to_tokens`, which says how to call once per prompt).

    Returns:
        The `Prompts`.

    Raises:
        InputError: for a bad model or prompt, a bad mask, or a position out of range (for a
            batch, the first prompt it misses is named).
    """
    if several and is_batch(prompt_or_tokens, attention_mask):
        tokens = prompt_batch(model, prompt_or_tokens, attention_mask)
        positions = check_positions(model, position, tokens)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask).bool()
        return Prompts(tuple(tokens), tuple(positions), batch=True, mask=mask)
    tokens = to_tokens(model, prompt_or_tokens)
    return Prompts((tokens,), (check_position(position, tokens.shape[1]),))
