"""Feature-level questions: a feature's map to a target, what drives a feature, and patching by feature.

Every function here reads the dictionaries spliced into a model (`tl_linmap.spliced`, SAELens'
``HookedSAETransformer``, circuit-tracer's ``ReplacementModel``) and names a feature by its
dictionary's output hook and its id (``(site, feature)``), at a position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.compat import check_model
from tl_linmap.base.errors import InputError
from tl_linmap.base.prompts import Prompt, read_prompts
from tl_linmap.base.saving import Saveable
from tl_linmap.freeze.splices import Leaves, Splice
from tl_linmap.freeze.splicing import spliced, splices_of
from tl_linmap.freeze.system import frozen_system
from tl_linmap.linear.features import node_pass, preactivation, split_target, target_rows
from tl_linmap.present import display
from tl_linmap.reading.readouts import LinearReadout, logit_metric
from tl_linmap.reading.tokens import decode_tokens
from tl_linmap.results.features import FeatureContributions, FeaturePatching


def find_splice(model, site: str) -> Splice:
    """The dictionary spliced into a model that writes ``site``.

    Args:
        model: A model with dictionaries spliced in.
        site: A dictionary's output hook name (as in `FeatureContributions.sites`).

    Returns:
        Its splice.

    Raises:
        InputError: naming the sites there are.
    """
    splices = splices_of(model)
    for splice in splices:
        if splice.site == site:
            return splice
    sites = ", ".join(repr(s.site) for s in splices) or "none (splice one with tl_linmap.spliced)"
    raise InputError(f"No dictionary writes {site!r}; the model's dictionaries write {sites}.")


def check_feature(splice: Splice, feature) -> int:
    """Check a feature id against a splice's dictionary.

    Args:
        splice: The splice.
        feature: The id given.

    Returns:
        The id.

    Raises:
        InputError: for anything but an int in ``[0, d_sae)``.
    """
    d_sae = splice.dictionary.d_sae
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < d_sae:
        raise InputError(f"feature must be an int in [0, {d_sae}) for the dictionary at {splice.site!r}, got {feature!r}.")
    return feature


def feature_sources(
    model,
    prompt: Prompt,
    site: str,
    feature: int,
    *,
    position: int = -1,
    modules: bool = True,
    dictionaries=(),
    error: str | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> FeatureContributions:
    """What drives one feature's pre-activation: its exact split by input token, layer and module, and earlier features.

    The pre-activation is linear in the dictionary's input; with every factor frozen, it is the sum of
    the direct effects of the token embeddings, every block's attention and MLP output before it
    (``modules=True``), the earlier dictionaries' features and error terms, and a constant.

    Args:
        model: A model with dictionaries spliced in (see `tl_linmap.spliced`).
        prompt: Text or token ids.
        site: The feature's dictionary (its output hook).
        feature: The feature id.
        position: Where the feature is read (Python-style).
        modules: Split by block and module too (False: tokens carry every path but the dictionaries').
        dictionaries: Dictionaries to splice in for this call (`tl_linmap.spliced`).
        error: Their error convention (see `tl_linmap.spliced`).
        dtype: Working dtype.

    Returns:
        A `tl_linmap.results.features.FeatureContributions` whose target is the pre-activation.

    Raises:
        InputError: for an unknown site or feature id.
    """
    check_model(model)
    prompts = read_prompts(model, prompt, position=position, several=False)
    with spliced(model, dictionaries, error=error):
        splice = find_splice(model, site)
        target = preactivation(splice, check_feature(splice, feature))
        # A dictionary that reads the hook point it writes: its input is read inside its own hook.
        input_of = None if splice.own_input_hook else splice.site
        return split_target(model, prompts, target, modules=modules, dtype=dtype, input_of=input_of)


@dataclass(frozen=True)
class FeatureMap(Saveable):
    """One feature's decoder direction pushed through the frozen system to a target: its effect per unit activation.

    Attributes:
        site: The feature's dictionary.
        feature: The feature id.
        source: The position it is written at.
        target: What it is read at (a hook name or a readout's name).
        position: The target position.
        values: ``(k,)``: the target's change per unit of the feature's activation.
    """

    site: str
    feature: int
    source: int
    target: str
    position: int
    values: Float[Tensor, " k"]

    def _size(self) -> str:
        return f"{float(self.values[0]):.4g}" if len(self.values) == 1 else f"‖·‖ = {float(self.values.norm()):.4g}"

    def __repr__(self) -> str:
        return f"FeatureMap({self.site} #{self.feature} at position {self.source} -> {self.target} at {self.position}: {self._size()})"

    def _repr_html_(self) -> str:
        facts = [("feature", f"{self.site} #{self.feature}", False), ("written at", str(self.source), True),
                 ("target", self.target, False), ("read at", str(self.position), True), ("per unit activation", self._size(), True)]
        return display.summary_html("A feature's map", facts)


def feature_map(
    model,
    prompt: Prompt,
    site: str,
    feature: int,
    target="output",
    *,
    source: int | None = None,
    position: int = -1,
    dictionaries=(),
    error: str | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> FeatureMap:
    """A feature's map to a target: its decoder direction, written at one position, pushed through the frozen system.

    Every other node (features, error terms, tokens) held at zero and the constant taken away, the
    target is linear in the feature's activation; its slope is the map. Active or not, any feature has one.

    Args:
        model: A model with dictionaries spliced in.
        prompt: Text or token ids (whose inference freezes the factors).
        site: The feature's dictionary (its output hook).
        feature: The feature id.
        target: A hook name or a linear readout (`tl_linmap.Logit`, ...).
        source: The position the feature is written at (default: the target position).
        position: The target position (Python-style).
        dictionaries: Dictionaries to splice in for this call (`tl_linmap.spliced`).
        error: Their error convention (see `tl_linmap.spliced`).
        dtype: Working dtype.

    Returns:
        A `FeatureMap`.

    Raises:
        InputError: for an unknown site, feature id, or a source after the target.
    """
    check_model(model)
    prompts = read_prompts(model, prompt, position=position, several=False)
    if isinstance(target, LinearReadout):
        target.check(model)
    n, target_position = prompts.tokens[0].shape[1], prompts.positions[0]
    with spliced(model, dictionaries, error=error):
        fid = check_feature(find_splice(model, site), feature)
        source = target_position if source is None else source % n
        if source > target_position:
            raise InputError(f"source={source} comes after the target position {target_position}: a causal model's feature there cannot reach it.")
        hook = target.hook if isinstance(target, LinearReadout) else target
        with frozen_system(model, prompts, [hook], dtype=dtype, native=False) as system:
            name, label, rows, _ = target_rows(system, target)
            nodes = {s.site: Leaves(torch.zeros_like(system.factors[f"{s.site}#acts"]), _zeros(system.factors.get(f"{s.site}#error_value")))
                     for s in splices_of(model)}
            with torch.no_grad():
                y0 = node_pass(system, name, torch.zeros_like(system.x), nodes, {})
                one = nodes[site].acts.clone()
                one[0, source, fid] = 1.0
                y1 = node_pass(system, name, torch.zeros_like(system.x), {**nodes, site: Leaves(one, nodes[site].error)}, {})
            values = rows @ (y1 - y0)
    return FeatureMap(site, fid, source, label, target_position, values.detach())


def _zeros(value: Tensor | None) -> Tensor | None:
    return None if value is None else torch.zeros_like(value)


def feature_patching(
    model, clean: Prompt, corrupted: Prompt, metric, *, dictionaries=(), error: str | None = None, dtype: torch.dtype | None = torch.float64
) -> FeaturePatching:
    """Predict patching every feature, one at a time, from a corrupted run into a clean one (see `FeaturePatching`).

    Args:
        model: A model with dictionaries spliced in.
        clean: The clean prompt (text or token ids).
        corrupted: The corrupted prompt, with as many tokens.
        metric: A logit readout (``LogitDiff(answer, wrong)``, ``Logit``, ``LogitCombination``) or its short
            forms ``(answer, wrong)`` and ``{token: coefficient}`` (`tl_linmap.reading.readouts.logit_metric`).
        dictionaries: Dictionaries to splice in for this call (`tl_linmap.spliced`).
        error: Their error convention (see `tl_linmap.spliced`).
        dtype: Working dtype.

    Returns:
        A `tl_linmap.results.features.FeaturePatching`.

    Raises:
        InputError: for prompts of different lengths, a bad metric, or a model without dictionaries.
    """
    check_model(model)
    metric = logit_metric(model, metric)
    clean_prompts = read_prompts(model, clean, position=metric.position, several=False)
    corrupted_prompts = read_prompts(model, corrupted, position=metric.position, several=False)
    n = clean_prompts.tokens[0].shape[1]
    if corrupted_prompts.tokens[0].shape[1] != n:
        raise InputError(
            f"The clean prompt has {n} tokens and the corrupted one {corrupted_prompts.tokens[0].shape[1]}: patching swaps "
            "activations position by position, so give two prompts of the same number of tokens."
        )
    with spliced(model, dictionaries, error=error):
        return _patching(model, clean_prompts, corrupted_prompts, metric, dtype)


def _patching(model, clean_prompts, corrupted_prompts, metric, dtype) -> FeaturePatching:
    splices = splices_of(model)
    if not splices:
        raise InputError("The model has no dictionaries spliced in: splice one with tl_linmap.spliced(model, [dictionary]).")
    readout = metric.readout
    with frozen_system(model, corrupted_prompts, [readout.hook], dtype=dtype, native=False) as other:
        _, _, rows, c = target_rows(other, readout)
        corrupted_acts = {s.site: other.factors[f"{s.site}#acts"][0] for s in splices}
        corrupted_value = float(rows[0] @ other.outputs[other.names[0]] + c[0])
    with frozen_system(model, clean_prompts, [readout.hook], dtype=dtype, native=False) as system:
        name, label, rows, c = target_rows(system, readout)
        values, clean_acts = {}, {}
        for splice in splices:
            acts = system.factors[f"{splice.site}#acts"]
            error = system.factors.get(f"{splice.site}#error_value")
            with torch.enable_grad():
                leaf = acts.detach().clone().requires_grad_(True)
                y = node_pass(system, name, system.x, {splice.site: Leaves(leaf, error)}, {})
                (grad,) = torch.autograd.grad(rows[0] @ y, [leaf], allow_unused=True)
            grad = torch.zeros_like(leaf) if grad is None else grad
            clean_acts[splice.site] = acts[0].detach()
            values[splice.site] = (grad[0] * (corrupted_acts[splice.site].to(acts) - acts[0])).detach()
        clean_value = float(rows[0] @ system.outputs[name] + c[0])
    return FeaturePatching(label, tuple(values), values, clean_acts, {s: a.detach() for s, a in corrupted_acts.items()},
                           clean_value, corrupted_value, decode_tokens(model, clean_prompts.tokens[0][0]))
