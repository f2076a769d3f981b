"""Linear readouts: scalar targets ``w · y + c`` of one hook point's vector ``y``.

A logit difference (``" Paris"`` minus ``" London"``), one logit, or any direction in a hook
point's space (a probe, a feature direction) is a linear functional of that hook point's
value at the target position, once the final norm is frozen there (`tl_linmap.reading.tokens`).
Passed as ``target=`` to `tl_linmap.linear_map` and its siblings, such a target costs one
reverse row instead of ``d_out``, and its map is a `tl_linmap.results.maps.LinearMap` with
``d_out = 1``: ``w · y = Σ_i (w J_i) x_i + w · b``. `tl_linmap.token_attribution` and
``LinearMap.logit_contributions`` split them exactly.

The types are small and frozen: a readout names what it reads (`LinearReadout.hook`) and, given
how that hook's vectors are read as tokens, gives its covector and constant (`LinearReadout.weights`).
The logit readouts (`LogitReadout`: `Logit`, `LogitDiff`, `LogitCombination`) are also the
metrics of `tl_linmap.methods.patching`, which evaluates the same terms on a model's logits.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.errors import InputError
from tl_linmap.base.devices import resident
from tl_linmap.reading.tokens import TokenReader, decode_tokens, token_id


class LinearReadout(ABC):
    """A scalar linear functional ``w · y + c`` of one hook point's vector ``y`` (subclasses below)."""

    hook: str

    @property
    @abstractmethod
    def name(self) -> str:
        """The key of its map in a `tl_linmap.results.maps.LinearMaps`, e.g. ``"logit_diff(' Paris' - ' London')"``."""

    @abstractmethod
    def check(self, model) -> None:
        """Raise `tl_linmap.base.errors.InputError` for arguments that cannot work with this model.

        Args:
            model: A TransformerBridge or HookedTransformer.
        """

    @abstractmethod
    def weights(self, reader: TokenReader, d_out: int) -> tuple[Float[Tensor, " d_out"], Float[Tensor, ""]]:
        """The covector ``w`` and constant ``c`` on the hook's vectors at one position.

        Args:
            reader: How the hook's vectors are read as tokens there (`tl_linmap.freeze.system.FrozenSystem.reader`).
            d_out: The width of the hook's (flattened) vector.

        Returns:
            ``(w, c)`` in the model's working dtype.
        """

    def __str__(self) -> str:
        return self.name


def _logit_weights(reader: TokenReader, ids: list[int], coefficients: list[float]) -> tuple[Tensor, Tensor]:
    # Σ_k a_k logit_k = (W_U[:, ids] a) · norm(y) + b_U[ids] · a, with the norm frozen: affine in y.
    model = reader.model
    reference = reader.final_norm.matrix if reader.final_norm is not None else resident(model, "W_U")
    a = torch.tensor(coefficients, dtype=reference.dtype, device=reference.device)
    bias = resident(model, "b_U")
    u = resident(model, "W_U")[:, ids].to(a) @ a
    c = bias.detach()[ids].to(a) @ a if bias is not None else a.new_zeros(())
    return _through_norm(reader, u, c)


def _through_norm(reader: TokenReader, u: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    # u · norm(y) + c as a covector on y: the frozen final norm is affine.
    if not reader.residual:
        raise InputError("A logit is read from the residual stream: give a hook point there (hook_resid_*, output, ...).")
    if reader.final_norm is None:
        return u, c
    return reader.final_norm.matrix.T @ u, c + reader.final_norm.offset @ u


class LogitReadout(LinearReadout):
    """A linear combination ``Σ_k a_k · logit(t_k)`` of vocabulary logits (`Logit`, `LogitDiff`, `LogitCombination`).

    The one definition of a logit metric: as a target it is read through the frozen final
    norm and ``W_U`` (`weights`), and `tl_linmap.methods.patching` evaluates the same terms on a
    model's logits.
    """

    hook: str

    @abstractmethod
    def terms(self) -> tuple[tuple[int | str, float], ...]:
        """The ``(token, coefficient)`` pairs, tokens as given (ids or single-token strings)."""

    def resolve(self, model) -> tuple[list[int], list[float]]:
        """The vocabulary ids and coefficients of the terms.

        Args:
            model: A TransformerBridge or HookedTransformer (for its tokenizer).

        Returns:
            ``(ids, coefficients)``, one per term.

        Raises:
            InputError: for a string that is not one token or an id outside the vocabulary.
        """
        terms = self.terms()
        return [token_id(model, token) for token, _ in terms], [coefficient for _, coefficient in terms]

    def check(self, model) -> None:
        ids, coefficients = self.resolve(model)
        totals: dict[int, float] = {}
        for i, coefficient in zip(ids, coefficients):
            totals[i] = totals.get(i, 0.0) + coefficient
        if not any(totals.values()):
            if len(totals) < len(ids):
                raise InputError(f"{self.name}: the same token, so always zero. Give two different tokens.")
            raise InputError(f"{self.name}: every coefficient is zero, so always zero. Give a nonzero one.")
        _check_hook(self.hook)

    def weights(self, reader: TokenReader, d_out: int) -> tuple[Tensor, Tensor]:
        return _logit_weights(reader, *self.resolve(reader.model))


@dataclass(frozen=True, eq=False)
class Logit(LogitReadout):
    """One vocabulary token's logit, read from ``hook`` through the frozen final norm and ``W_U``.

    Attributes:
        token: Vocabulary id or single-token string (``" Paris"``).
        hook: ``"output"`` (the model's logit) or a residual hook (its logit lens).
    """

    token: int | str
    hook: str = "output"

    @property
    def name(self) -> str:
        return f"logit({self.token!r})" if self.hook == "output" else f"logit({self.token!r} @ {self.hook})"

    def terms(self) -> tuple[tuple[int | str, float], ...]:
        return ((self.token, 1.0),)


@dataclass(frozen=True, eq=False)
class LogitDiff(LogitReadout):
    """The logit of ``correct`` minus that of ``incorrect`` (the usual circuit metric).

    Attributes:
        correct: Vocabulary id or single-token string (``" Paris"``).
        incorrect: Vocabulary id or single-token string (``" London"``).
        hook: ``"output"`` (the model's logits) or a residual hook (its logit lens).
    """

    correct: int | str
    incorrect: int | str
    hook: str = "output"

    @property
    def name(self) -> str:
        where = "" if self.hook == "output" else f" @ {self.hook}"
        return f"logit_diff({self.correct!r} - {self.incorrect!r}{where})"

    def terms(self) -> tuple[tuple[int | str, float], ...]:
        return ((self.correct, 1.0), (self.incorrect, -1.0))


@dataclass(frozen=True, eq=False)
class LogitCombination(LogitReadout):
    """Any linear combination of logits, ``{token: coefficient}`` (e.g. ``{" Paris": 2, " Rome": -1, " the": -1}``).

    Attributes:
        coefficients: Tokens (ids or single-token strings) to finite coefficients.
        hook: ``"output"`` (the model's logits) or a residual hook (its logit lens).
    """

    coefficients: Mapping[int | str, float]
    hook: str = "output"

    def __post_init__(self) -> None:
        if not isinstance(self.coefficients, Mapping):
            raise InputError(f"LogitCombination takes a dict {{token: coefficient}}, got {self.coefficients!r}.")
        object.__setattr__(self, "coefficients", dict(self.coefficients))  # a copy: the readout stays as built

    @property
    def name(self) -> str:
        terms = " ".join(f"{c:+g}·{t!r}" for t, c in self.coefficients.items())
        return f"logits({terms}{'' if self.hook == 'output' else f' @ {self.hook}'})"

    def terms(self) -> tuple[tuple[int | str, float], ...]:
        return tuple(self.coefficients.items())

    def check(self, model) -> None:
        if not self.coefficients:
            raise InputError("LogitCombination is empty: give at least one {token: coefficient}.")
        for token, coefficient in self.coefficients.items():
            if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)) or not math.isfinite(coefficient):
                raise InputError(f"The coefficient of {token!r} must be a finite number, got {coefficient!r}.")
        super().check(model)


@dataclass(frozen=True, eq=False)
class CenteredLogit(LinearReadout):
    """A token's logit minus the mean logit over the vocabulary: circuit-tracer's logit node.

    ``(W_U[:, t] - mean_v W_U[:, v]) · norm(y) + b_U[t] - mean(b_U)``: the softmax reads logits only up
    to a shared shift, and this is the part of token ``t``'s that the shift does not cancel.
    circuit-tracer's graphs read it without ``b_U``; its direct effects are the same (``b_U`` is constant).

    Attributes:
        token: Vocabulary id or single-token string.
        hook: ``"output"`` or a residual hook (its logit lens).
    """

    token: int | str
    hook: str = "output"

    @property
    def name(self) -> str:
        return f"centered_logit({self.token!r})" if self.hook == "output" else f"centered_logit({self.token!r} @ {self.hook})"

    def check(self, model) -> None:
        token_id(model, self.token)
        _check_hook(self.hook)

    def weights(self, reader: TokenReader, d_out: int) -> tuple[Tensor, Tensor]:
        model = reader.model
        reference = reader.final_norm.matrix if reader.final_norm is not None else resident(model, "W_U")
        W_U, t = resident(model, "W_U"), token_id(model, self.token)
        u = W_U[:, t].to(reference) - (W_U.sum(-1, dtype=torch.float64) / W_U.shape[-1]).to(reference)  # no cast of all of W_U
        bias = resident(model, "b_U")
        c = bias.detach().to(u)[t] - bias.detach().to(u).mean() if bias is not None else u.new_zeros(())
        return _through_norm(reader, u, c)


@dataclass(frozen=True, eq=False)
class Direction(LinearReadout):
    """The component ``vector · y`` of a hook point's vector (a probe, a feature direction).

    Attributes:
        hook: The hook point, e.g. ``"blocks.3.hook_resid_post"`` (``"output"``: the final norm's output).
        vector: ``(d_out,)`` in that hook point's (flattened) space; not normalised.
        label: Its name in results (default: ``direction @ <hook>``).
    """

    hook: str
    vector: Tensor
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or f"direction @ {self.hook}"

    def check(self, model) -> None:
        _check_hook(self.hook)
        v = self.vector
        if not isinstance(v, Tensor) or not v.is_floating_point() or v.ndim != 1:
            got = f"shape {tuple(v.shape)}, {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
            raise InputError(f"Direction's vector must be a floating tensor of shape (d_out,), got {got}.")

    def weights(self, reader: TokenReader, d_out: int) -> tuple[Tensor, Tensor]:
        if self.vector.shape[0] != d_out:
            raise InputError(f"{self.hook!r} has width {d_out}; the Direction's vector has {self.vector.shape[0]}.")
        w = self.vector.detach().to(resident(reader.model, "W_U"))  # the working dtype and device
        return w, w.new_zeros(())


def _check_hook(hook) -> None:
    if not isinstance(hook, str):
        raise InputError(f"A readout's hook must be a hook name such as 'output' or 'blocks.0.hook_resid_post', got {hook!r}.")


@dataclass(frozen=True)
class LogitMetric:
    """A logit readout (`tl_linmap.reading.readouts.LogitReadout`) bound to a model's vocabulary and one position.

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
        metric: A `tl_linmap.reading.readouts.LogitReadout` read at the output (``LogitDiff(" Paris",
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
