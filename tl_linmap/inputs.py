"""Checking what the user asked for: one prompt, a position in it, a hook point to map."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Union

import torch
from jaxtyping import Int
from torch import Tensor

from tl_linmap.errors import InputError

Prompt = Union[str, Sequence[int], Tensor]

#: ``target="output"`` on a TransformerBridge: the final norm's output, the vector the unembedding reads.
OUTPUT_HOOK = "ln_final.hook_out"
#: The same on a HookedTransformer, whose final norm has no hook after its weight: its last hook
#: (after the weight for LayerNorm, before it for RMSNorm; `tl_linmap.readout.after_output` applies the rest).
HOOKED_OUTPUT_HOOK = "ln_final.hook_normalized"
#: Hook names (by suffix) whose vectors live in the residual stream, where the unembedding reads.
RESIDUAL_HOOKS = (
    "hook_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    OUTPUT_HOOK, HOOKED_OUTPUT_HOOK,
)
EMBED_HOOK = "hook_embed"


def to_tokens(model, prompt: Prompt) -> Int[Tensor, "1 pos"]:
    """Tokenize one prompt (or check given tokens) the way the model's own forward would.

    Args:
        model: A TransformerBridge.
        prompt: A string, a list of token ids, or a token tensor of shape ``(pos,)`` or
            ``(1, pos)``.

    Returns:
        Tokens of shape ``(1, pos)`` on the model's device.

    Raises:
        InputError: for an empty prompt, several prompts, non-integer tokens, ids
            outside the vocabulary, or more tokens than the model's context.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("The prompt is empty; give at least one token of text.")
        tokens = model.to_tokens(prompt, truncate=False)
    elif isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str):
        raise InputError(
            f"Got {len(prompt)} prompts; a linear map is of one input sequence. Call once per prompt."
        )
    else:
        tokens = torch.as_tensor(prompt)
        if tokens.numel() == 0:
            raise InputError("The prompt has no tokens.")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise InputError(f"Token ids must be integers, got dtype {tokens.dtype}.")
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
        raise InputError(f"The prompt has {n_tokens} tokens, more than the model's context of {model.cfg.n_ctx}.")
    if tokens.min() < 0 or tokens.max() >= model.cfg.d_vocab:
        raise InputError(f"Token ids must lie in [0, {model.cfg.d_vocab}); got {tokens.min()}..{tokens.max()}.")
    return tokens.to(model.cfg.device or "cpu")


def check_position(position: int, n_tokens: int) -> int:
    """Normalise a (possibly negative) position.

    Args:
        position: Index into the sequence, Python-style.
        n_tokens: Sequence length.

    Returns:
        The position as a non-negative index.

    Raises:
        InputError: if it is out of range.
    """
    if not -n_tokens <= position < n_tokens:
        raise InputError(f"Position {position} is out of range for a prompt of {n_tokens} tokens.")
    return position % n_tokens


def output_hook(model) -> str:
    """The hook point ``target="output"`` names: the last one before the unembedding.

    Args:
        model: A TransformerBridge or HookedTransformer.

    Returns:
        ``ln_final.hook_out`` (bridge), ``ln_final.hook_normalized`` (HookedTransformer), or the
        last block's ``hook_resid_post`` for a model without a final norm.
    """
    for name in (OUTPUT_HOOK, HOOKED_OUTPUT_HOOK):
        if name in model.hook_dict:
            return name
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def resolve_target(model, target: str) -> str:
    """Check that a target names a hook point of the model.

    Args:
        model: A TransformerBridge.
        target: ``"output"`` or any hook name (canonical or compatibility alias).

    Returns:
        The hook name to capture.

    Raises:
        InputError: naming the closest existing hook points if it does not exist, or for
            attention scores (``q·k``, quadratic in the embeddings: no linear map of them exists).
    """
    name = output_hook(model) if target == "output" else target
    if name not in model.hook_dict:
        close = difflib.get_close_matches(name, list(model.hook_dict), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"The model has no hook point {target!r}.{hint}")
    if model.hook_dict[name].name.endswith("attn.hook_attn_scores"):
        raise InputError(
            f"{target!r} holds attention scores, q·k: quadratic in the embeddings, so no linear map "
            "of them exists (the frozen pattern is a factor). Map hook_q, hook_k or hook_z instead."
        )
    return name


def target_depth(name: str, n_layers: int) -> int:
    """Blocks a forward pass runs through before a hook point fires.

    Args:
        name: Hook name.
        n_layers: Number of blocks.

    Returns:
        ``L + 1`` inside ``blocks.L``; 0 for the embeddings; ``n_layers`` after the blocks.
    """
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return 0 if name in (EMBED_HOOK, "hook_pos_embed") or name.startswith(("embed.", "pos_embed.")) else n_layers
