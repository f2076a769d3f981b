"""Freezing: TransformerLens hook lists that turn a model into its detached linear system.

Three hook lists share the rule table in `tl_linmap.freeze.architectures`:

- `freeze_hooks`: detach every factor ``A(x)``; forward values stay bit-identical, so
  reverse mode through the model yields the *detached Jacobian*.
- `replay_hooks`: substitute factors recorded from another pass; the model then *is*
  the affine map ``x -> Σ_i J_i x_i + b`` for any embeddings, which gives the bias
  (embeddings zero), the graph reverse mode runs on, and forward-mode products.
- `same_path_hooks`: keep everything live but route norms through the same code path
  the frozen pass takes, for a live forward in true float64 to compare against (the
  bridge's native RMSNorm path computes in float32 even in a float64 model).

`trim_hooks` and `trim_factors` cut one block to one position, for replays whose targets
read that position only.

Hook lists are ``(name, fn)`` pairs for ``model.hooks(fwd_hooks=...)``, except that a
mixture-of-experts model's lists also name the experts' ``act_fn`` modules (see
`tl_linmap.methods.experts`): apply them with `applied` (as `frozen` does), which hooks those modules too.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor

from tl_linmap.base.compat import check_model
from tl_linmap.base.errors import InputError
from tl_linmap.freeze import moe
from tl_linmap.freeze.architectures import rules_for
from tl_linmap.freeze.rules import Detach, Experts, HookFn, Ratio, Rebuild
from tl_linmap.freeze.splices import Leaves, Splice

HookList = list[tuple[str, HookFn]]


Factors = dict[str, Tensor]


# The bridge warns each time a hook edits a norm's scale; here that edit is the point.
_NORM_EDIT_WARNING = r"A forward hook edited hook_scale"


def _straight_through(post: Tensor, pre: Tensor, ratio: Tensor) -> Tensor:
    # (pre - pre.detach()) is exactly zero, so the value is post's bits; its gradient is ratio.
    return post.detach() + (pre - pre.detach()) * ratio


def _ratio(post: Tensor, pre: Tensor, at_zero: float) -> Tensor:
    zero = pre == 0
    return torch.where(zero, torch.full_like(pre, at_zero), post / torch.where(zero, torch.ones_like(pre), pre)).detach()


def freeze_hooks(model, *, factors: Factors | None = None) -> HookList:
    """Hooks that detach every input-dependent factor of the model.

    Forward values are bit-identical to the unfrozen forward on the same norm path;
    gradients see a linear (affine) function of the token embeddings.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        factors: If given, filled with the frozen factor of every hook point
            (the detached value, or for `Ratio` rules the ratio under the post name),
            ready for `replay_hooks`.

    Returns:
        ``(hook_name, fn)`` pairs for ``model.hooks(fwd_hooks=...)`` (for a mixture of experts,
        whose lists also name modules, for `applied`).

    Raises:
        InputError: for a model that is not a TransformerLens model, or ``factors`` that is not a dict.
        UnsupportedArchitectureError: if the architecture has no freeze rules.
    """
    check_model(model)
    if factors is not None and not isinstance(factors, dict):
        raise InputError(f"factors must be a dict for the frozen factors to be recorded in (or None), got {type(factors).__name__}.")
    hooks: HookList = []
    for rule in rules_for(model):
        if isinstance(rule, Detach):
            hooks += [(name, _detach_fn(name, factors)) for name in rule.hook_names()]
        elif isinstance(rule, Experts):
            hooks += moe.freeze_experts(rule, factors)
        elif isinstance(rule, Rebuild):
            hooks += [hook for name in rule.hook_names() for hook in _rebuild_hooks(rule, name, factors=factors)]
        elif isinstance(rule, Splice):
            hooks += rule.freeze(factors)
        else:
            for pre_name, post_name in rule.hook_names():
                live: dict[str, Tensor] = {}
                hooks.append((pre_name, _keep_fn(live)))
                hooks.append((post_name, _ratio_fn(post_name, live, rule, factors)))
    return hooks


def _detach_fn(name: str, factors: Factors | None) -> HookFn:
    def hook(act: Tensor, hook=None) -> Tensor:
        frozen = act.detach()
        if factors is not None:
            factors[name] = frozen
        return frozen

    return hook


def _keep_fn(live: dict[str, Tensor], key: str = "pre") -> HookFn:
    # Keyed by this closure, not hook.name: an alias hook reports its canonical name.
    def hook(act: Tensor, hook=None) -> None:
        live[key] = act

    return hook


def _rebuild_hooks(rule: Rebuild, name: str, *, factors: Factors | None = None, factor: Tensor | None = None, live_scale: bool = False) -> HookList:
    # One weightless norm (`Rebuild`): its input kept, its output replaced by c(x) / scale. The
    # scale is the bridge's own, observed at hook_scale (detached, or live for `same_path_hooks`),
    # or a recorded one (`factor`, for replays).
    live: dict[str, Tensor] = {}

    def rebuild(out: Tensor, hook=None) -> Tensor:
        x = live.pop("x")
        if factor is not None:
            scale = broadcast(factor, x)
        else:
            scale = live.pop("scale") if live_scale else live.pop("scale").detach()
            if factors is not None:
                factors[name] = scale
        return _normalized(x, scale, rule.centered).to(out.dtype)

    observe = [] if factor is not None else [(name, _keep_fn(live, "scale"))]
    return [(rule.hook_in(name), _keep_fn(live, "x")), *observe, (rule.hook_out(name), rebuild)]


def _normalized(x: Tensor, scale: Tensor, centered: bool) -> Tensor:
    # The bridge's own arithmetic for an edited scale (NormalizationBridge's hf-autograd path),
    # half precision upcast to float32 as the bridge does.
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return ((x - x.mean(-1, keepdim=True)) if centered else x) / scale


def _ratio_fn(name: str, live: dict[str, Tensor], rule: Ratio, factors: Factors | None) -> HookFn:
    def hook(post: Tensor, hook=None) -> Tensor:
        pre = live.pop("pre")
        ratio = _ratio(post, pre, rule.ratio_at_zero)
        if factors is not None:
            factors[name] = ratio
        return _straight_through(post, pre, ratio)

    return hook


def factor_names(model) -> list[str]:
    """Hook names under which `freeze_hooks` records a factor.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.

    Returns:
        Every `Detach` hook name, and the post-activation name of every `Ratio` pair.
    """
    return [name for rule in rules_for(model) for name in factor_names_of(rule)]


def factor_names_of(rule) -> list[str]:
    """Hook names under which one rule records its factors.

    Args:
        rule: A `Detach`, `Ratio` or `Experts` rule.

    Returns:
        The `Detach` names, the post-activation names of a `Ratio` rule, or the experts'
        ``act_fn`` module paths of an `Experts` rule.
    """
    return [post for _, post in rule.hook_names()] if isinstance(rule, Ratio) else rule.hook_names()


def replay_hooks(model, factors: Factors, nodes: dict[str, Leaves] | None = None, *, held: bool = False) -> HookList:
    """Hooks that replace every factor by a recorded one, making the model exactly affine.

    Args:
        model: The model `factors` were recorded on (same prompt length).
        factors: Filled by `freeze_hooks(model, factors=...)`; batch 1, broadcast (or, for
            factors over flattened tokens, tiled) to any batch.
        nodes: Per spliced dictionary's site, its activations and error as given leaves
            (`tl_linmap.freeze.splices.Splice.nodes`) instead of replayed: nothing before it then
            reaches what follows except through them.
        held: Replay every error term as a constant, ``factors[site#error]`` (the graph's error nodes are
            sources), also that of a dictionary under the ``"live"`` convention.

    Returns:
        ``(hook_name, fn)`` pairs for ``model.hooks(fwd_hooks=...)``.

    Raises:
        KeyError: if a factor the rules need was not recorded.
    """
    hooks: HookList = []
    for rule in rules_for(model):
        if isinstance(rule, Detach):
            hooks += [(name, _replace_fn(factors[name])) for name in rule.hook_names()]
        elif isinstance(rule, Experts):
            hooks += moe.replay_experts(rule, factors)
        elif isinstance(rule, Rebuild):
            hooks += [hook for name in rule.hook_names() for hook in _rebuild_hooks(rule, name, factor=factors[name])]
        elif isinstance(rule, Splice):
            if nodes and rule.site in nodes:
                hooks += rule.nodes(nodes[rule.site])
            elif held and rule.error == "live":
                hooks += replace(rule, error="constant").replay(factors)
            else:
                hooks += rule.replay(factors)
        else:
            for pre_name, post_name in rule.hook_names():
                live: dict[str, Tensor] = {}
                hooks.append((pre_name, _keep_fn(live)))
                hooks.append((post_name, _replay_ratio_fn(live, factors[post_name])))
    return hooks


def norm_replay_hooks(model, scale: str, factor: Tensor) -> HookList:
    """Hooks that run one norm with its scale replaced by a recorded one.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        scale: The norm's ``hook_scale`` name.
        factor: Its recorded scale (broadcast over the norm's input).

    Returns:
        ``(hook_name, fn)`` pairs: the scale replaced at ``hook_scale``, or a weightless norm's
        output rebuilt (`tl_linmap.freeze.rules.Rebuild`).
    """
    rule = next((rule for rule in rules_for(model) if isinstance(rule, Rebuild) and scale in rule.names), None)
    return [(scale, _replace_fn(factor))] if rule is None else _rebuild_hooks(rule, scale, factor=factor)


def _replace_fn(factor: Tensor) -> HookFn:
    def hook(act: Tensor, hook=None) -> Tensor:
        return broadcast(factor, act)

    return hook


def broadcast(factor: Tensor, act: Tensor) -> Tensor:
    """A factor recorded on one sequence, for a replay of several rows.

    Args:
        factor: Recorded with batch 1: ``(1, ...)``, or ``(pos, ...)`` where the model flattened
            batch and positions into one axis (OPT's MLP).
        act: The replay's activation at the same hook point.

    Returns:
        The factor repeated to ``act``'s shape.
    """
    if factor.shape[0] == 1 or factor.shape == act.shape:
        return factor.expand_as(act)
    return factor.repeat(act.shape[0] // factor.shape[0], *[1] * (factor.ndim - 1))


def _replay_ratio_fn(live: dict[str, Tensor], ratio: Tensor) -> HookFn:
    def hook(post: Tensor, hook=None) -> Tensor:
        pre = live.pop("pre")
        return pre * broadcast(ratio, pre)

    return hook


def same_path_hooks(model) -> HookList:
    """Hooks that leave every value live but send norms down the frozen pass's code path.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.

    Returns:
        ``(hook_name, fn)`` pairs returning a copy of each norm scale, and rebuilding a weightless
        norm's output (`tl_linmap.freeze.rules.Rebuild`) with its live scale.
    """
    hooks: HookList = []
    for rule in rules_for(model):
        if isinstance(rule, Detach):
            hooks += [(name, _copy) for name in rule.hook_names() if name.endswith("hook_scale")]
        elif isinstance(rule, Rebuild):
            hooks += [hook for name in rule.hook_names() for hook in _rebuild_hooks(rule, name, live_scale=True)]
    return hooks


def _copy(act: Tensor, hook=None) -> Tensor:
    # A new tensor object is the bridge's signal for "edited"; the values are unchanged.
    return act.clone()


@contextmanager
def quiet_norm_edits() -> Iterator[None]:
    """Silence the bridge's warning that a hook edited a norm scale (expected here).

    Returns:
        A context manager.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NORM_EDIT_WARNING)
        yield
