"""Applying hook lists to a model: hook points and, for mixtures of experts, modules; `frozen`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tl_linmap.freeze import moe
from tl_linmap.freeze.hooks import (
    Factors,
    HookFn,
    HookList,
    freeze_hooks,
    quiet_norm_edits,
)


def _module_hook(fn: HookFn) -> Callable:
    def hook(module, args, output):
        return fn(output)

    return hook


@contextmanager
def applied(model, hooks: HookList) -> Iterator[None]:
    """Context manager: the model with a hook list applied, everything restored on exit.

    Names that are hook points go to ``model.hooks``; names that are module paths (a
    mixture of experts' ``act_fn``, see `tl_linmap.methods.experts`) get a PyTorch forward hook
    whose output replaces the module's. A mixture of experts' experts run through
    Hugging Face's eager loop meanwhile (`tl_linmap.moe.eager`); the bridge's warning
    that a hook edited a norm scale is silenced (`quiet_norm_edits`).

    Args:
        model: A TransformerBridge or HookedTransformer.
        hooks: ``(name, fn)`` pairs; ``fn(act, hook=None)`` returns the replacement or None.

    Returns:
        A context manager; on exit (also on error) the hooks are removed and the experts'
        implementation is as it was.
    """
    on_points: HookList = []
    on_modules: HookList = []
    for name, fn in hooks:  # anything else goes to model.hooks, which names what it cannot find
        (on_modules if _is_module_path(model, name) else on_points).append((name, fn))
    handles = []
    try:
        with quiet_norm_edits(), moe.eager(model), model.hooks(fwd_hooks=on_points):
            handles += [model.get_submodule(name).register_forward_hook(_module_hook(fn)) for name, fn in on_modules]
            yield
    finally:
        for handle in handles:
            handle.remove()


def _is_module_path(model, name) -> bool:
    # Every TransformerLens hook point (a module itself) is named hook_*; looking the name up
    # spares building model.hook_dict, which takes milliseconds on a real model, per pass.
    if not isinstance(name, str) or name.rsplit(".", 1)[-1].startswith("hook_"):
        return False
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


@contextmanager
def frozen(model, *, factors: Factors | None = None) -> Iterator:
    """Context manager: run the model as its detached linear system.

    Composes with the user's own hooks (``model.hooks``, ``run_with_cache``,
    ``run_with_hooks``); the freeze hooks are removed on exit, also on error.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        factors: Optional dict to record the frozen factors in (see `freeze_hooks`).

    Returns:
        A context manager yielding the model.

    Raises:
        InputError: for a model that is not a TransformerLens model, or ``factors`` that is not a dict.

    Example:
        >>> with tl_linmap.frozen(model):
        ...     logits, cache = model.run_with_cache(tokens)
    """
    hooks = freeze_hooks(model, factors=factors)  # checks the arguments before model.hooks is looked up
    with applied(model, hooks):
        yield model
