"""Patching: the linear prediction of every activation patch of a clean/corrupted prompt pair.

Activation patching runs the model on one prompt with one activation taken from another
prompt's run and measures a metric. With every factor ``A(x)`` frozen at the *clean* run's
values, the model downstream of any activation is affine in that activation, so the effect
of patching the corrupted activation into the clean run is, in that frozen system, exactly

    Δmetric = J · (a_corrupted − a_clean)

with ``J`` the detached gradient of the metric with respect to the activation. One reverse
pass of the frozen clean run gives ``J`` for every activation at once (every layer, position,
module and head); a forward of the corrupted prompt gives ``a_corrupted``. The true patch
differs from this only through what the frozen system holds fixed: norm scales, attention
patterns (so patching queries or keys is predicted to do nothing) and MLP gates.

``mode="gradient"`` gives ordinary attribution patching for comparison: the same product with
the plain gradient of the metric at the clean run (nothing detached).

The prediction is for *noising*: the corrupted activation patched into the clean run. The
functions of ``transformer_lens.patching`` patch the other way by default (clean activations
into the corrupted run); call them with the prompts' roles swapped to measure the same patches
(``corrupted_tokens=`` the clean tokens, ``clean_cache=`` the corrupted run's cache), or call
`attribution_patching` with them swapped to predict denoising.

Results come in the layouts (and shapes) of ``transformer_lens.patching``'s functions, named
after them: ``"resid_pre"`` is ``get_act_patch_resid_pre``'s ``(n_layers, pos)``,
``"attn_head_out_all_pos"`` is ``get_act_patch_attn_head_out_all_pos``'s ``(n_layers, n_heads)``,
``"block_every"`` is ``get_act_patch_block_every``'s ``(3, n_layers, pos)``, and so on (`LAYOUTS`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tl_linmap.base.checks import check_dtype, check_position
from tl_linmap.base.compat import check_model, get_act_name
from tl_linmap.base.errors import InputError
from tl_linmap.base.guard import borrowed
from tl_linmap.base.prompts import Prompt, to_tokens
from tl_linmap.freeze.apply import applied
from tl_linmap.freeze.hooks import freeze_hooks, same_path_hooks
from tl_linmap.freeze.system import check_factors
from tl_linmap.load.datasets import PromptPair, prompt_pairs  # noqa: F401  (the pairs' loader, also reachable from here)
from tl_linmap.reading.readouts import LogitMetric, logit_metric
from tl_linmap.reading.tokens import decode_tokens
from tl_linmap.results.patching import (
    LAYOUTS,
    Layout,
    PatchingAttribution,
    check_layouts,
)

#: Values of ``mode=``: the detached (frozen clean system) gradient, or the plain gradient.
MODES = ("detached", "gradient")


def check_mode(mode: str) -> str:
    """Validate ``mode=``.

    Args:
        mode: One of `MODES`.

    Returns:
        The mode.

    Raises:
        InputError: for anything else.
    """
    if mode not in MODES:
        raise InputError(
            f"mode must be 'detached' (the frozen clean system's gradient) or 'gradient' (ordinary "
            f"attribution patching), got {mode!r}."
        )
    return mode


def _act_names(model, layouts: list[str]) -> dict[str, str]:
    # Each activation's name in the layouts, and the hook point holding it: where SAELens put an SAE in
    # place of a hook point (blocks.1.hook_mlp_out), its output hook point (what flows on).
    acts = dict.fromkeys(act for name in layouts for act in LAYOUTS[name].acts)
    points = model.hook_dict
    names = [get_act_name(act, layer) for act in acts for layer in range(model.cfg.n_layers)]
    return {name: name if name in points or f"{name}.hook_sae_output" not in points else f"{name}.hook_sae_output" for name in names}


def _run(model, tokens: Tensor, names: list[str], metric: LogitMetric, hooks: list, grad: bool) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    # One forward: the activations at `names`, the metric and, with `grad`, its gradient with
    # respect to each activation (a zero added at each hook point is the leaf differentiated).
    acts: dict[str, Tensor] = {}
    zeros: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(act: Tensor, hook=None) -> Tensor | None:
            acts[name] = act.detach()
            if not grad:
                return None
            zeros[name] = torch.zeros_like(act, requires_grad=True)
            return act + zeros[name]

        return hook

    with applied(model, [*hooks, *[(name, keep(name)) for name in names]]), torch.set_grad_enabled(grad):
        logits = model(tokens)
        value = metric(logits)
        missing = [name for name in names if name not in acts]
        if missing:
            raise InputError(f"The hook points {missing[:4]} never fired in a forward pass of this model; leave their layouts out.")
        if not grad:
            return acts, {}, value.item()
        leaves = [zeros[name] for name in names]
        # No path (queries and keys reach the metric only through the frozen pattern): zero.
        grads = torch.autograd.grad(value, leaves, allow_unused=True) if value.requires_grad else [None] * len(leaves)
    return acts, {name: torch.zeros_like(z) if g is None else g for name, z, g in zip(names, leaves, grads)}, value.item()


def _layout_values(model, layout: Layout, products: dict[str, Tensor]) -> Tensor:
    # products[name]: (pos,) or (pos, heads), one layer's J·Δa per position (and head).
    stacks = []
    for act in layout.acts:
        per_layer = torch.stack([products[get_act_name(act, layer)] for layer in range(model.cfg.n_layers)])
        stacks.append(per_layer.sum(1) if layout.axes == ("layer", "head") else per_layer)
    return stacks[0] if len(stacks) == 1 else torch.stack(stacks)


def attribution_patching(
    model,
    clean: Prompt,
    corrupted: Prompt,
    metric,
    *,
    layouts: Sequence[str] | None = None,
    mode: str = "detached",
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
) -> PatchingAttribution:
    """Predict every activation patch of a clean/corrupted pair from one reverse pass of the clean run.

    Each cell is ``J · (a_corrupted − a_clean)``: the gradient ``J`` of the metric at the
    clean run with respect to one activation (``mode="detached"``: of the clean run's frozen
    linear system, in which this is exactly the patch's effect; ``"gradient"``: the plain
    gradient, ordinary attribution patching), times the change the corrupted run makes there.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        clean: The clean prompt (text or token ids).
        corrupted: The corrupted prompt, with as many tokens.
        metric: A logit readout (`tl_linmap.reading.readouts`: ``LogitDiff(answer, wrong)``,
            ``Logit``, ``LogitCombination``), or its short forms ``(answer, wrong)`` and
            ``{token: coefficient}``, or a `LogitMetric` (see `logit_metric`).
        layouts: Layouts to compute (`LAYOUTS`; default all): all come from the same passes.
        mode: ``"detached"`` or ``"gradient"``.
        position: Position of the logits the metric reads (``-1``: the last token; a
            `LogitMetric` keeps its own).
        dtype: Working dtype (float64 default; the model comes back bit for bit).

    Returns:
        A `PatchingAttribution`.

    Raises:
        InputError: for a bad model, prompt, metric, layout, mode or dtype, or prompts of
            different lengths.
        FreezeError: if a freeze hook never ran (``mode="detached"``).
    """
    check_model(model)
    mode = check_mode(mode)
    layouts = check_layouts(layouts)
    dtype = check_dtype(dtype)
    metric = logit_metric(model, metric, position)
    clean_tokens, corrupted_tokens = to_tokens(model, clean), to_tokens(model, corrupted)
    n = clean_tokens.shape[1]
    if corrupted_tokens.shape[1] != n:
        raise InputError(
            f"The clean prompt has {n} tokens and the corrupted one {corrupted_tokens.shape[1]}: activation patching "
            "swaps activations position by position, so give two prompts of the same number of tokens."
        )
    check_position(metric.position, n)
    points = _act_names(model, layouts)
    names = list(points.values())
    with borrowed(model, dtype):
        factors: dict[str, Tensor] = {}
        hooks = freeze_hooks(model, factors=factors) if mode == "detached" else same_path_hooks(model)
        clean_acts, grads, clean_value = _run(model, clean_tokens, names, metric, hooks, grad=True)
        if mode == "detached":
            check_factors(model, factors)
        corrupted_acts, _, corrupted_value = _run(model, corrupted_tokens, names, metric, same_path_hooks(model), grad=False)
    products = {}
    for name, point in points.items():
        product = grads[point] * (corrupted_acts[point] - clean_acts[point])
        products[name] = product[0].sum(-1) if product.ndim == 4 else product[0].flatten(1).sum(-1)
    values = {layout: _layout_values(model, LAYOUTS[layout], products) for layout in layouts}
    return PatchingAttribution(
        mode=mode,
        metric=metric,
        values=values,
        clean_metric=clean_value,
        corrupted_metric=corrupted_value,
        clean_tokens=decode_tokens(model, clean_tokens[0]),
        corrupted_tokens=decode_tokens(model, corrupted_tokens[0]),
    )
