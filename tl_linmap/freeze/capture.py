"""Capture: run the model once with a list of hooks and keep the activations at some hook points.

Every pass of tl_linmap (plain, frozen, replayed) is one `capture`; it stops the forward as
soon as every target has fired, so nothing after the deepest target is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxtyping import Float, Int
from torch import Tensor

from tl_linmap.base.devices import input_device
from tl_linmap.base.errors import FreezeError, InputError
from tl_linmap.base.hook_names import EMBED_HOOK
from tl_linmap.freeze.apply import applied
from tl_linmap.freeze.hooks import HookList


class _Stop(Exception):
    """Raised by the capture hook: nothing after the target is needed."""


def capture(
    model,
    tokens: Int[Tensor, "batch pos"],
    targets: Sequence[str],
    hooks: HookList = (),
    embeddings: Tensor | None = None,
    stop: bool = True,
    select: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Run the model with hooks and return the activations at ``targets``.

    Args:
        model: A TransformerBridge or HookedTransformer.
        tokens: Input tokens; their batch must match ``embeddings``' if given.
        targets: Hook names whose activations are returned.
        hooks: Extra ``(name, fn)`` forward hooks (freeze, replay, user's).
        embeddings: If given, replace the output of ``hook_embed``.
        stop: Abort the forward once every target fired (False: run every hook).
        select: Keep only this part of each activation (e.g. one position), so a wide
            batch does not hold whole activations.

    Returns:
        Activation (with its batch axis, or its `select`ed part) per target name, on the model's
        input device (`tl_linmap.base.devices.input_device`: a block on another device sends it there).

    Raises:
        FreezeError: if a target hook never fired.
    """
    captured: dict[str, Tensor] = {}
    wanted = set(targets)
    device = input_device(model)

    def keep(name: str):
        def hook(act: Tensor, hook=None) -> None:
            captured[name] = (act if select is None else select(act)).to(device)
            if stop and wanted <= captured.keys():
                raise _Stop

        return hook

    fwd = list(hooks) + [(name, keep(name)) for name in wanted]
    if embeddings is not None:
        fwd.insert(0, (EMBED_HOOK, lambda act, hook=None: embeddings.to(act.device)))
    with applied(model, fwd):
        try:
            model(tokens)
        except _Stop:
            pass
    missing = sorted(wanted - captured.keys())
    if missing:
        raise FreezeError(f"The hook points {missing[:4]} never fired in a forward pass of this model.")
    return captured


def run_to_target(model, tokens: Int[Tensor, "batch pos"], target: str, hooks: HookList = (), embeddings: Tensor | None = None, stop: bool = True) -> Tensor:
    """`capture` of a single target.

    Args:
        model: A TransformerBridge or HookedTransformer.
        tokens: Input tokens.
        target: Hook name.
        hooks: Extra forward hooks.
        embeddings: If given, replace the output of ``hook_embed``.
        stop: Abort the forward once the target fired.

    Returns:
        The activation at ``target`` (with its batch axis).
    """
    return capture(model, tokens, [target], hooks, embeddings, stop)[target]


def at_position(act: Tensor, position: int, n_tokens: int) -> Tensor:
    """The target vectors at one position, flattened: ``act[:, position]`` as ``(batch, d_out)``.

    Args:
        act: An activation with batch and position axes first.
        position: Non-negative position.
        n_tokens: Expected length of the position axis.

    Returns:
        The flattened vectors.

    Raises:
        InputError: if the activation has no position axis of that length.
    """
    if act.ndim < 3 or act.shape[1] != n_tokens:
        raise InputError(
            f"The target's activation has shape {tuple(act.shape)}, not (batch, pos={n_tokens}, ...): "
            "tl_linmap maps activations indexed by sequence position. Map one with a position axis, such as "
            "'blocks.0.hook_resid_post' or 'blocks.0.attn.hook_z' (not an attention pattern)."
        )
    return act[:, position].flatten(1)


def every_position(act: Tensor, n_tokens: int) -> Float[Tensor, "batch pos d"]:
    """An activation's vectors at every position, flattened: ``(batch, pos, d)``.

    Args:
        act: An activation with batch and position axes first.
        n_tokens: Expected length of the position axis.

    Returns:
        The flattened vectors.

    Raises:
        InputError: if the activation has no position axis of that length.
    """
    if act.ndim < 3 or act.shape[1] != n_tokens:
        at_position(act, 0, n_tokens)  # raises, naming what has a position axis
    return act.flatten(2)
