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

import difflib
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.compat import check_model, get_act_name
from tl_linmap.datasets import PromptPair, prompt_pairs  # noqa: F401  (the pairs' loader, also reachable from here)
from tl_linmap.errors import InputError
from tl_linmap.functionals import (
    LinearReadout,
    LogitCombination,
    LogitDiff,
    LogitReadout,
)
from tl_linmap.guard import borrowed
from tl_linmap.hooks import applied, freeze_hooks, same_path_hooks
from tl_linmap.inputs import Prompt, check_dtype, check_names, check_position, to_tokens
from tl_linmap.readout import decode_tokens
from tl_linmap.system import check_factors
from tl_linmap.table import Table

#: Values of ``mode=``: the detached (frozen clean system) gradient, or the plain gradient.
MODES = ("detached", "gradient")


@dataclass(frozen=True)
class Layout:
    """One result layout of ``transformer_lens.patching``.

    Attributes:
        acts: The activation names patched (``get_act_name`` short names), one per leading
            "patch type" row; a single one has no such axis.
        axes: The axes after the patch-type axis, as ``transformer_lens.patching`` names them.
        function: The ``transformer_lens.patching`` function with this layout.
    """

    acts: tuple[str, ...]
    axes: tuple[str, ...]
    function: str


def _layouts() -> dict[str, Layout]:
    layouts = {name: Layout((name,), ("layer", "pos"), f"get_act_patch_{name}") for name in ("resid_pre", "resid_mid", "attn_out", "mlp_out")}
    for part, act in (("out", "z"), ("q", "q"), ("k", "k"), ("v", "v")):
        layouts[f"attn_head_{part}_all_pos"] = Layout((act,), ("layer", "head"), f"get_act_patch_attn_head_{part}_all_pos")
        layouts[f"attn_head_{part}_by_pos"] = Layout((act,), ("layer", "pos", "head"), f"get_act_patch_attn_head_{part}_by_pos")
    layouts["block_every"] = Layout(("resid_pre", "attn_out", "mlp_out"), ("layer", "pos"), "get_act_patch_block_every")
    return layouts


#: Every layout by name: the name of the ``transformer_lens.patching`` function without
#: ``get_act_patch_``. Head layouts of ``k`` and ``v`` have ``n_key_value_heads`` heads (GQA).
LAYOUTS = _layouts()


def check_layouts(layouts: Sequence[str] | None) -> list[str]:
    """Validate ``layouts=``.

    Args:
        layouts: Layout names (see `LAYOUTS`), or None for all of them.

    Returns:
        The names as a list.

    Raises:
        InputError: for a single string, an empty list or an unknown name (naming the closest).
    """
    if layouts is None:
        return list(LAYOUTS)
    names = check_names("layouts", layouts, "['resid_pre', 'attn_head_out_all_pos']")
    if not names:
        raise InputError("layouts is empty: give at least one layout such as 'resid_pre', or None for all.")
    for name in names:
        if name not in LAYOUTS:
            close = difflib.get_close_matches(str(name), LAYOUTS, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise InputError(f"Unknown patching layout {name!r}.{hint} The layouts are {', '.join(LAYOUTS)}.")
    return list(dict.fromkeys(names))


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


@dataclass(frozen=True)
class LogitMetric:
    """A logit readout (`tl_linmap.functionals.LogitReadout`) bound to a model's vocabulary and one position.

    ``Σ_t c_t · logits[position, t]``: the readout's terms, resolved to ids. A callable, so it
    can be given to ``transformer_lens.patching`` as ``patching_metric``.

    Attributes:
        readout: The readout (``LogitDiff(answer, wrong)`` for an ``(answer, wrong)`` pair).
        tokens: Vocabulary ids, one per term.
        coefficients: One per term.
        labels: The tokens as strings.
        position: Position of the logits read (Python-style).
    """

    readout: LogitReadout
    tokens: tuple[int, ...]
    coefficients: tuple[float, ...]
    labels: tuple[str, ...]
    position: int = -1

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        """The metric of the first sequence's logits (as ``transformer_lens.patching`` calls it).

        Args:
            logits: A model's output.

        Returns:
            A scalar tensor.
        """
        row = logits[0, self.position]
        return sum(coefficient * row[t] for t, coefficient in zip(self.tokens, self.coefficients))

    def __str__(self) -> str:
        terms = [f"{'-' if c < 0 else '+'} {'' if abs(c) == 1 else f'{abs(c):g}·'}logit({label!r})" for label, c in zip(self.labels, self.coefficients)]
        return " ".join(terms).removeprefix("+ ")


def logit_metric(model, metric, position: int = -1) -> LogitMetric:
    """A `LogitMetric` from a logit readout or its short forms.

    Args:
        model: A TransformerBridge or HookedTransformer (for its tokenizer and vocabulary).
        metric: A `tl_linmap.functionals.LogitReadout` read at the output (``LogitDiff(" Paris",
            " Rome")``, ``Logit(" Paris")``, ``LogitCombination({...})``); or ``(answer, wrong)``,
            two tokens (ids or one-token strings), short for ``LogitDiff(answer, wrong)``; or a
            dict ``{token: coefficient}``, short for ``LogitCombination``; or a `LogitMetric`.
        position: Position of the logits (Python-style; checked against the prompt later).

    Returns:
        The metric.

    Raises:
        InputError: for any other shape, a readout of something other than the output's
            logits, a string that is not one token, an id outside the vocabulary, a pair of
            the same token, or a coefficient that is not a finite number.
    """
    if isinstance(metric, LogitMetric):
        return metric
    if isinstance(metric, Mapping):
        metric = LogitCombination(metric)
    elif isinstance(metric, (tuple, list)) and len(metric) == 2:
        metric = LogitDiff(*metric)
    elif isinstance(metric, LinearReadout) and not isinstance(metric, LogitReadout):
        raise InputError(
            f"attribution_patching's metric is read from the logits; {metric.name} reads {metric.hook!r}. "
            "Give a Logit, LogitDiff or LogitCombination."
        )
    elif not isinstance(metric, LogitReadout):
        raise InputError(
            "metric must be (answer, wrong), two tokens such as (' Paris', ' Rome') for their logit difference, "
            f"a dict {{token: coefficient}}, or a LogitDiff / Logit / LogitCombination; got {metric!r}."
        )
    if metric.hook != "output":
        raise InputError(f"attribution_patching's metric is read from the model's logits: give {metric.name} with hook='output'.")
    metric.check(model)
    ids, coefficients = metric.resolve(model)
    return LogitMetric(metric, tuple(ids), tuple(float(c) for c in coefficients), tuple(decode_tokens(model, ids)), operator.index(position))


@dataclass
class PatchComparison:
    """A linear prediction of patching next to true activation patching, in one layout.

    Attributes:
        layout: Layout name.
        mode: ``"detached"`` or ``"gradient"``.
        correlation: Pearson correlation over the cells (nan where either is constant).
        relative_error: ``‖predicted − actual‖ / ‖actual‖``.
        worst_cell: Index of the cell with the largest miss (in the layout's axes).
        predicted: The prediction there.
        actual: The true Δmetric there.
    """

    layout: str
    mode: str
    correlation: float
    relative_error: float
    worst_cell: tuple[int, ...]
    predicted: float
    actual: float


def correlation(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two tensors' cells.

    Args:
        a: Any tensor.
        b: A tensor of the same number of cells.

    Returns:
        The correlation, nan when either is constant.
    """
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.norm() * b.norm()).item()
    return (a @ b).item() / denominator if denominator > 0 else float("nan")


@dataclass
class PatchingAttribution:
    """Predicted Δmetric of every activation patch of a clean/corrupted pair, per layout.

    ``values[layout]`` has the shape ``transformer_lens.patching``'s function of that layout
    returns (`LAYOUTS`); each cell is the predicted change of the metric when that activation
    of the clean run is replaced by the corrupted run's (for ``attn_head_*_all_pos``: that
    head at every position at once).

    Attributes:
        mode: ``"detached"`` (frozen clean system) or ``"gradient"`` (plain gradient).
        metric: The metric.
        values: Predicted Δmetric per layout.
        clean_metric: The metric of the clean run.
        corrupted_metric: The metric of the corrupted run.
        clean_tokens: The clean prompt's tokens as strings.
        corrupted_tokens: The corrupted prompt's.
    """

    mode: str
    metric: LogitMetric
    values: dict[str, Tensor] = field(repr=False)
    clean_metric: float
    corrupted_metric: float
    clean_tokens: list[str] = field(repr=False)
    corrupted_tokens: list[str] = field(repr=False)

    def __getitem__(self, layout: str) -> Tensor:
        """The predicted Δmetric of one layout.

        Args:
            layout: Layout name (see `LAYOUTS`).

        Returns:
            The tensor, in ``transformer_lens.patching``'s shape for that layout.

        Raises:
            InputError: for a layout that was not computed.
        """
        if layout not in self.values:
            raise InputError(f"No layout {layout!r} here; computed: {', '.join(self.values)}. Pass layouts=[{layout!r}].")
        return self.values[layout]

    def patched(self, layout: str) -> Tensor:
        """The predicted metric of each patched run: ``clean_metric + Δmetric``.

        This is what ``transformer_lens.patching``'s function returns for the same patches
        (called with the clean tokens as its ``corrupted_tokens`` and the corrupted cache).

        Args:
            layout: Layout name.

        Returns:
            The tensor.
        """
        return self.clean_metric + self[layout]

    @property
    def labels(self) -> list[str]:
        """One label per position: the clean token, or ``clean→corrupted`` where they differ."""
        return [c if c == k else f"{c}→{k}" for c, k in zip(self.clean_tokens, self.corrupted_tokens)]

    def compare(self, layout: str, actual: Tensor, *, baseline: float | None = None) -> PatchComparison:
        """This prediction next to true activation patching of the same patches.

        Args:
            layout: Layout name.
            actual: The metric of each truly patched run, as ``transformer_lens.patching``'s
                function of that layout returns it (clean run, corrupted activations).
            baseline: The metric of the unpatched clean run ``actual`` is measured against
                (default: ``clean_metric``; pass the one of the forward that produced ``actual``).

        Returns:
            A `PatchComparison`.

        Raises:
            InputError: for a layout not computed or an ``actual`` of another shape.
        """
        predicted = self[layout].detach().cpu().double()
        actual = torch.as_tensor(actual).detach().cpu().double()
        if actual.shape != predicted.shape:
            raise InputError(f"actual has shape {tuple(actual.shape)}, but layout {layout!r} has {tuple(predicted.shape)}.")
        delta = actual - (self.clean_metric if baseline is None else baseline)
        miss = (predicted - delta).abs()
        worst = tuple(int(i) for i in torch.unravel_index(miss.argmax(), miss.shape))
        norm = delta.norm().item()
        return PatchComparison(
            layout=layout,
            mode=self.mode,
            correlation=correlation(predicted, delta),
            relative_error=(predicted - delta).norm().item() / norm if norm > 0 else float("nan"),
            worst_cell=worst,
            predicted=predicted[worst].item(),
            actual=delta[worst].item(),
        )

    def compare_all(self, actuals: Mapping[str, Tensor], *, baseline: float | None = None) -> Table:
        """`compare` for several layouts.

        Args:
            actuals: True patching results by layout name.
            baseline: See `compare`.

        Returns:
            A `tl_linmap.table.Table` of `PatchComparison`, one row per layout.
        """
        return Table(self.compare(layout, actual, baseline=baseline) for layout, actual in actuals.items())

    def plot(self, layout: str, *, ax=None):
        """Heatmap of one layout (see `tl_linmap.plotting.plot_patching`).

        Args:
            layout: Layout name.
            ax: Matplotlib axes to draw into (default: a new figure).

        Returns:
            The Figure.
        """
        from tl_linmap.plotting import plot_patching

        return plot_patching(self[layout], layout, labels=self.labels, title=f"{self.mode} attribution patching: {layout}", ax=ax)

    def __repr__(self) -> str:
        return (
            f"PatchingAttribution({self.mode}, metric {self.metric}; clean {self.clean_metric:.4g}, "
            f"corrupted {self.corrupted_metric:.4g}; layouts {', '.join(self.values)})"
        )


def _act_names(model, layouts: list[str]) -> list[str]:
    acts = dict.fromkeys(act for name in layouts for act in LAYOUTS[name].acts)
    return [get_act_name(act, layer) for act in acts for layer in range(model.cfg.n_layers)]


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
        metric: A logit readout (`tl_linmap.functionals`: ``LogitDiff(answer, wrong)``,
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
    names = _act_names(model, layouts)
    with borrowed(model, dtype):
        factors: dict[str, Tensor] = {}
        hooks = freeze_hooks(model, factors=factors) if mode == "detached" else same_path_hooks(model)
        clean_acts, grads, clean_value = _run(model, clean_tokens, names, metric, hooks, grad=True)
        if mode == "detached":
            check_factors(model, factors)
        corrupted_acts, _, corrupted_value = _run(model, corrupted_tokens, names, metric, same_path_hooks(model), grad=False)
    products = {}
    for name in names:
        product = grads[name] * (corrupted_acts[name] - clean_acts[name])
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
