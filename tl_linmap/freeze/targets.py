"""Resolving where a map starts and ends: target and source hook points, norms to freeze, checked
against the model's hook points and its freeze rules."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from tl_linmap.base.checks import check_names
from tl_linmap.base.errors import InputError
from tl_linmap.base.hook_names import EMBED_HOOK, output_hook
from tl_linmap.freeze.architectures import is_rebuilt


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
    # A linear readout (tl_linmap.reading.readouts, which cannot be imported here) reads one hook.
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
    if point in ("hook_normalized", "hook_scale") and is_rebuilt(model, f"{norm}.hook_scale"):
        raise InputError(
            f"{target!r} is inside {norm}, a weightless norm that tl_linmap freezes by rebuilding its output "
            f"(tl_linmap.freeze.rules.Rebuild): its {point} is not part of the frozen computation. Map {norm}.hook_out instead."
        )
    return name


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


def resolve_source(model, source: str | None, factors: Iterable[str]) -> str:
    """Check a ``source=`` hook point: where a map starts instead of the token embeddings.

    Args:
        model: A TransformerBridge or HookedTransformer.
        source: A hook name with a position axis (``blocks.L.hook_resid_pre``, ``hook_attn_out``,
            ``hook_mlp_out``, ``hook_resid_post``, ...), or None for the token embeddings.
        factors: The hook names of the model's frozen factors (`tl_linmap.freeze.hooks.factor_names`).

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
