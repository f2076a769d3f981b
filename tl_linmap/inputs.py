"""Checking what the user asked for: the model, one prompt, a position in it, hook points to map.

Every argument a public call takes is checked here, before the model is borrowed, and a
wrong one raises `tl_linmap.errors.InputError` saying what to pass instead.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Iterable, Sequence
from typing import Union

import torch
from jaxtyping import Int
from torch import Tensor

from tl_linmap.compat import check_model
from tl_linmap.errors import InputError

Prompt = Union[str, Sequence[int], Tensor]

#: ``target="output"`` on a TransformerBridge: the final norm's output, the vector the unembedding reads.
OUTPUT_HOOK = "ln_final.hook_out"
#: The same on a HookedTransformer, whose final norm may have no hook after its weight: its last hook
#: (before RMSNorm's weight; LayerNorm's too in TransformerLens 3.x, after it in 2.x;
#: `tl_linmap.readout.after_output` finds and applies what follows).
HOOKED_OUTPUT_HOOK = "ln_final.hook_normalized"
#: Hook names (by suffix) whose vectors live in the residual stream, where the unembedding reads.
RESIDUAL_HOOKS = (
    "hook_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    OUTPUT_HOOK, HOOKED_OUTPUT_HOOK,
)
EMBED_HOOK = "hook_embed"


def check_dtype(dtype) -> torch.dtype | None:
    """Check a working ``dtype=``: a floating torch dtype, or None for the model's own.

    Args:
        dtype: What the user passed.

    Returns:
        ``dtype`` unchanged.

    Raises:
        InputError: for a string, a Python type, or an integer, boolean or complex dtype.
    """
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    raise InputError(
        f"dtype must be a floating torch dtype such as torch.float64 (the default, for exactness) or "
        f"torch.float32, or None to keep the model's own; got {dtype!r}."
    )


def is_int(value) -> bool:
    """Whether a value is an integer Python indexes with: an int, a NumPy integer, a 0-d integer tensor.

    Args:
        value: Anything.

    Returns:
        True for those, False for anything else and for bool (True is 1, but never meant as one).
    """
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def as_index(name: str, value) -> int:
    """An integer argument as a Python int: an int, a NumPy integer or a 0-d integer tensor.

    Args:
        name: The argument's name, for the message.
        value: What the user passed.

    Returns:
        The int.

    Raises:
        InputError: for a bool, a float, a string or anything else that is not an integer.
    """
    if not is_int(value):
        raise InputError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    return operator.index(value)


def check_positive(name: str, value, at_most: int | None = None) -> int:
    """A count argument (``k``, ``top``, ``rows_per_pass``, ...): a positive int.

    Args:
        name: The argument's name, for the message.
        value: What the user passed.
        at_most: Largest value that makes sense (e.g. the vocabulary size), or None.

    Returns:
        The int.

    Raises:
        InputError: for anything but an int in ``[1, at_most]``.
    """
    number = operator.index(value) if is_int(value) else 0
    if number < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}.")
    if at_most is not None and number > at_most:
        raise InputError(f"{name} must be at most {at_most}, got {number}.")
    return number


def check_names(name: str, names, example: str) -> list[str]:
    """A list of names, such as hook or module names (not one string, which would be iterated).

    Args:
        name: The argument's name, for the message.
        names: What the user passed.
        example: A valid value, shown in the message.

    Returns:
        The names as a list (each is checked where it is used).

    Raises:
        InputError: for a single string or anything that is not iterable.
    """
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise InputError(f"{name} must be a list of names, e.g. {name}={example}; got {names!r}.")
    return list(names)


def to_tokens(model, prompt: Prompt) -> Int[Tensor, "1 pos"]:
    """Tokenize one prompt (or check given tokens) the way the model's own forward would.

    Args:
        model: A TransformerBridge or HookedTransformer.
        prompt: A string, a list of token ids, or a token tensor of shape ``(pos,)`` or
            ``(1, pos)``.

    Returns:
        Tokens of shape ``(1, pos)`` on the model's device.

    Raises:
        InputError: for a model that is not a TransformerLens model (`tl_linmap.compat.check_model`),
            an empty prompt, several prompts, non-integer tokens, ids outside the vocabulary,
            or more tokens than the model's context.
    """
    check_model(model)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("The prompt is empty; give at least one token of text.")
        tokens = model.to_tokens(prompt, truncate=False)
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
        raise InputError(f"Token ids must lie in [0, {model.cfg.d_vocab}); got {tokens.min()}..{tokens.max()}.")
    return tokens.to(model.cfg.device or "cpu")


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


def check_position(position: int, n_tokens: int) -> int:
    """Normalise a (possibly negative) position.

    Args:
        position: Index into the sequence, Python-style.
        n_tokens: Sequence length.

    Returns:
        The position as a non-negative index.

    Raises:
        InputError: if it is not an int, or out of range.
    """
    position = as_index("position", position)
    if not -n_tokens <= position < n_tokens:
        raise InputError(
            f"Position {position} is out of range for a prompt of {n_tokens} tokens: "
            f"pass one in [{-n_tokens}, {n_tokens}) (-1: the last token)."
        )
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


def check_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """Block indices for ``layers=``.

    Args:
        layers: Block indices, or None for every block.
        n_layers: Number of blocks of the model.

    Returns:
        The indices as a list.

    Raises:
        InputError: for a single int or a string, an empty list, or an index that is not a
            block of the model.
    """
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, str) or not isinstance(layers, Iterable):
        raise InputError(f"layers must be a list of block indices, e.g. layers=[{n_layers - 1}]; got {layers!r}.")
    layers = list(layers)
    if not layers:
        raise InputError("layers is empty: give at least one block index, or layers=None for every block.")
    bad = [layer for layer in layers if not is_int(layer) or not 0 <= operator.index(layer) < n_layers]
    if bad:
        raise InputError(f"layers must be block indices in [0, {n_layers}), got {bad}.")
    return [operator.index(layer) for layer in layers]


def resolve_target(model, target: str) -> str:
    """Check that a target names a hook point of the model.

    Args:
        model: A TransformerBridge or HookedTransformer.
        target: ``"output"`` or any hook name (canonical or compatibility alias).

    Returns:
        The hook name to capture.

    Raises:
        InputError: for a target that is not a string, naming the closest existing hook
            points if it does not exist, or for attention scores (``q·k``, quadratic in the
            embeddings: no linear map of them exists).
    """
    # A linear readout (tl_linmap.functionals, which cannot be imported here) reads one hook.
    if not isinstance(target, str) and isinstance(getattr(target, "hook", None), str):
        raise InputError(
            f"target {target!r} is a linear readout, and this call maps the vectors of a hook point. A readout is "
            "one number: tl_linmap.linear_map(model, prompt, target=readout) maps it with one backward row, and its "
            ".contributions() are the per-token terms (tl_linmap.token_attribution splits it by layer and module too)."
        )
    if not isinstance(target, str):
        raise InputError(
            f"target must be one hook name such as 'output' or 'blocks.0.hook_resid_post', or a linear readout "
            f"(tl_linmap.LogitDiff, Logit, Direction), got {target!r}; for several targets use "
            "linear_maps(model, prompt, [name, ...])."
        )
    name = output_hook(model) if target == "output" else target
    if name not in model.hook_dict:
        close = difflib.get_close_matches(name, ["output", *model.hook_dict], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"The model has no hook point {target!r}.{hint}")
    if model.hook_dict[name].name.endswith("attn.hook_attn_scores"):
        raise InputError(
            f"{target!r} holds attention scores, q·k: quadratic in the embeddings, so no linear map "
            "of them exists (the frozen pattern is a factor). Map hook_q, hook_k or hook_z instead."
        )
    norm, _, point = name.rpartition(".")
    if point in ("hook_normalized", "hook_scale") and _rebuilt(model, f"{norm}.hook_scale"):
        raise InputError(
            f"{target!r} is inside {norm}, a weightless norm that tl_linmap freezes by rebuilding its output "
            f"(tl_linmap.rules.Rebuild): its {point} is not part of the frozen computation. Map {norm}.hook_out instead."
        )
    return name


def _rebuilt(model, scale: str) -> bool:
    from tl_linmap.rules import Rebuild, rules_for  # rules reads the model's structure: only for a norm's hooks

    return scale in model.hook_dict and any(isinstance(rule, Rebuild) and scale in rule.names for rule in rules_for(model))


def resolve_targets(model, targets: Sequence[str]) -> tuple[str, ...]:
    """`resolve_target` of each of several targets, without duplicates.

    Args:
        model: A TransformerBridge or HookedTransformer.
        targets: Hook names (or ``"output"``).

    Returns:
        The hook names to capture, in order.

    Raises:
        InputError: for a single string, an empty list, or a bad target.
    """
    targets = check_names("targets", targets, "['output']")  # each is checked by resolve_target
    if not targets:
        raise InputError("targets is empty: give at least one hook name, e.g. ['output'].")
    return tuple(dict.fromkeys(resolve_target(model, t) for t in targets))


def check_norms(model, norms: Sequence[str]) -> list[str]:
    """Norm module names for ``norms=``.

    Args:
        model: A TransformerBridge or HookedTransformer.
        norms: Module names such as ``"blocks.0.ln1"``.

    Returns:
        The names as a list.

    Raises:
        InputError: for a single string, or a name that is not a norm of the model.
    """
    norms = check_names("norms", norms, "['blocks.0.ln1']")
    known = sorted(name.removesuffix(".hook_scale") for name in model.hook_dict if name.endswith(".hook_scale"))
    for norm in norms:
        if norm not in known:
            close = difflib.get_close_matches(norm, known, n=3) if isinstance(norm, str) else []
            hint = f"Did you mean {', '.join(close)}?" if close else f"The model's norms are {', '.join(known[:4])}, ..."
            raise InputError(f"The model has no norm module {norm!r}. {hint}")
    return norms


def check_vector(model, vector, *, one: bool) -> Tensor:
    """A residual-space vector (or several) to read as tokens.

    Args:
        model: A TransformerBridge or HookedTransformer.
        vector: What the user passed.
        one: Require a single vector, shape ``(d_model,)``.

    Returns:
        ``vector`` unchanged.

    Raises:
        InputError: for anything but a floating tensor whose last axis is ``d_model``.
    """
    d_model = model.cfg.d_model
    shape = f"({d_model},)" if one else f"(..., {d_model})"
    if not isinstance(vector, Tensor) or not vector.is_floating_point():
        got = f"a {vector.dtype} tensor" if isinstance(vector, Tensor) else type(vector).__name__
        raise InputError(f"Pass a floating tensor of shape {shape}, got {got}.")
    if vector.ndim == 0 or vector.shape[-1] != d_model or (one and vector.ndim != 1):
        hint = " (one vector; call once per row)" if one and vector.ndim > 1 else ""
        raise InputError(f"Expected a vector of shape {shape}{hint}, got {tuple(vector.shape)}.")
    return vector


def independent_target(name: str, source: str = EMBED_HOOK) -> InputError:
    """The error for a target whose value does not depend on the source (the token embeddings by default).

    Args:
        name: Hook name.
        source: The source hook point of the map.

    Returns:
        The `InputError` to raise.
    """
    if source == EMBED_HOOK:
        return InputError(
            f"{name!r} does not depend on the token embeddings (a frozen factor such as a norm scale, or a constant): "
            "map an activation the embeddings flow into, such as 'blocks.0.hook_resid_post' or 'output'."
        )
    return InputError(
        f"{name!r} does not depend on the source {source!r} (it reads only frozen factors, constants, or a branch "
        "the source does not feed, such as a parallel block's MLP): map a hook point after the source that it "
        "flows into, such as the next hook_resid_post or 'output', or pick an earlier source."
    )


#: Source hook points that carry the whole residual stream: nothing after them depends on the tokens
#: except through them (so ``b = 0`` wherever the model adds no constant).
WHOLE_STREAM_SOURCES = (EMBED_HOOK, "hook_resid_pre", "hook_resid_mid", "hook_resid_post")


def resolve_source(model, source: str | None, factors: Iterable[str]) -> str:
    """Check a ``source=`` hook point: where a map starts instead of the token embeddings.

    Args:
        model: A TransformerBridge or HookedTransformer.
        source: A hook name with a position axis (``blocks.L.hook_resid_pre``, ``hook_attn_out``,
            ``hook_mlp_out``, ``hook_resid_post``, ...), or None for the token embeddings.
        factors: The hook names of the model's frozen factors (`tl_linmap.hooks.factor_names`).

    Returns:
        The hook name.

    Raises:
        InputError: for a source that is not a string, names no hook point (with the closest
            ones), has no position axis (attention patterns and scores), is a frozen factor,
            or is an alias that does not carry what its name says (a bridge's
            ``hook_resid_mid`` is only the second norm's input: replacing it leaves the
            residual addition alone).
    """
    if source is None:
        return EMBED_HOOK
    if not isinstance(source, str):
        raise InputError(
            f"source must be a hook name such as 'blocks.2.hook_resid_pre' (where the map starts; None: the token "
            f"embeddings), got {source!r}. Input token indices go to a result's methods (sources=, source=)."
        )
    if source not in model.hook_dict:
        close = difflib.get_close_matches(source, list(model.hook_dict), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"The model has no hook point {source!r} to start a map from.{hint}")
    canonical = model.hook_dict[source].name
    if canonical.endswith(("attn.hook_pattern", "attn.hook_attn_scores")):
        raise InputError(
            f"The source {source!r} has no position axis (it is (batch, head, query, key)): start a map from a "
            "hook point indexed by sequence position, such as 'blocks.0.hook_resid_pre' or 'blocks.0.hook_attn_out'."
        )
    if source in set(factors) or canonical in set(factors):
        raise InputError(
            f"The source {source!r} is where a factor is frozen (a norm scale, an attention pattern, a gate, a pointwise "
            "activation's ratio): the replay sets it, so nothing depends on it linearly. Start from an activation such "
            "as 'blocks.0.hook_resid_pre' or 'blocks.0.hook_attn_out'."
        )
    if source.endswith("hook_resid_mid") and canonical.endswith("ln2.hook_in"):
        layer = source.split(".")[1]
        raise InputError(
            f"On this model {source!r} is the second norm's input ({canonical!r}): replacing it does not replace the "
            f"residual stream the MLP's output is added to. Start from 'blocks.{layer}.hook_attn_out' or "
            f"'blocks.{layer}.hook_resid_pre' instead."
        )
    return source


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
