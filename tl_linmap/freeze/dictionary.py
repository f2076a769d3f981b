"""Dictionaries: sparse autoencoders and transcoders as weights, each one more product ``A(x) · x``.

A dictionary reads a hook point's vector ``x`` and writes ``x̂ = a W_dec + b_dec (+ x W_skip^T)``,
its feature activations ``a = m ⊙ p`` the pre-activations ``p = (x - b_dec) W_enc + b_enc`` times
a 0/1 mask ``m``: the active features of a ReLU, those above threshold of a JumpReLU, the
``k`` largest of a TopK, the open gates of a gated SAE. With ``m`` frozen, encoding and decoding
are linear, so a model with dictionaries spliced in is still an exact linear system, and every
active feature is one more term of its sums.

`Dictionary` holds the weights (from a SAELens SAE with `from_saelens`, or given directly); it
is what tl_linmap splices in through hook points (`tl_linmap.freeze.splices`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.errors import InputError, UnsupportedArchitectureError

#: Activations whose features are ``mask ⊙ pre`` with a 0/1 mask, by name.
ACTIVATIONS = ("relu", "jumprelu", "topk", "abstopk", "gated")


#: SAELens classes (by name) and the activation each computes; transcoders read one hook and write another.
SAELENS_ACTIVATIONS = {
    "StandardSAE": "relu",
    "JumpReLUSAE": "jumprelu",
    "TopKSAE": "topk",
    "AbsTopKSAE": "abstopk",
    "GatedSAE": "gated",
    "Transcoder": "relu",
    "SkipTranscoder": "relu",
    "JumpReLUTranscoder": "jumprelu",
    "JumpReLUSkipTranscoder": "jumprelu",
}


#: SAELens inference classes no rule covers, with the reason.
SAELENS_REFUSED = {
    "TemporalSAE": "its features attend over earlier positions' activations (a learned attention inside the SAE), which no 0/1 mask freezes",
    "MatchingPursuitSAE": "it picks features greedily, each choice depending on the residual the earlier ones leave, so its activations are not a mask times a linear pre-activation",
}


@dataclass(frozen=True, eq=False)
class Dictionary:
    """A sparse autoencoder or transcoder: ``x̂ = (m ⊙ ((x - c·b_dec) W_enc + b_enc)) W_dec + b_dec + x W_skip^T``.

    Attributes:
        W_enc: ``(d_in, d_sae)``.
        b_enc: ``(d_sae,)``.
        W_dec: ``(d_sae, d_out)``.
        b_dec: ``(d_out,)``.
        hook_in: The hook point it reads (``blocks.6.hook_resid_post``; a transcoder: its MLP's input).
        hook_out: The hook point whose value it replaces (an SAE: ``hook_in``; a transcoder: ``hook_mlp_out``).
        activation: ``"relu"``, ``"jumprelu"`` (``threshold``), ``"topk"`` / ``"abstopk"`` (``k``), ``"gated"``.
        threshold: ``(d_sae,)``, JumpReLU's.
        k: TopK's number of active features per position.
        W_skip: ``(d_out, d_in)``, a skip transcoder's linear path.
        b_gate: ``(d_sae,)``, r_mag, b_mag: a gated SAE's gate bias and magnitude scaling and bias.
        apply_b_dec_to_input: Whether ``b_dec`` is subtracted from the input (SAELens' ``c``).
        signed: Whether a JumpReLU or TopK keeps negative pre-activations (circuit-tracer's apply no ReLU).
        name: Its label in results (default: ``hook_out``).
    """

    W_enc: Float[Tensor, "d_in d_sae"] = field(repr=False)
    b_enc: Float[Tensor, " d_sae"] = field(repr=False)
    W_dec: Float[Tensor, "d_sae d_out"] = field(repr=False)
    b_dec: Float[Tensor, " d_out"] = field(repr=False)
    hook_in: str
    hook_out: str | None = None
    activation: str = "relu"
    threshold: Tensor | None = field(default=None, repr=False)
    k: int | None = None
    W_skip: Tensor | None = field(default=None, repr=False)
    b_gate: Tensor | None = field(default=None, repr=False)
    r_mag: Tensor | None = field(default=None, repr=False)
    b_mag: Tensor | None = field(default=None, repr=False)
    apply_b_dec_to_input: bool = False
    signed: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        if self.hook_out is None:
            object.__setattr__(self, "hook_out", self.hook_in)
        if self.name is None:
            object.__setattr__(self, "name", self.hook_out)
        _check(self)

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return self.W_enc.shape[1]

    @property
    def is_transcoder(self) -> bool:
        """Whether it writes somewhere other than where it reads."""
        return self.hook_out != self.hook_in

    def pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """The features' pre-activations (a gated SAE: its magnitudes'), linear in ``x``.

        Args:
            x: Input vectors.

        Returns:
            ``(x - c·b_dec) W_enc + b_enc``.
        """
        x = x - self.b_dec if self.apply_b_dec_to_input else x
        if self.activation == "gated":
            return x @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return x @ self.W_enc + self.b_enc

    def mask(self, x: Float[Tensor, "... d_in"], pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """Which features are active, as 0/1 in ``pre``'s dtype: the factor frozen.

        Args:
            x: Input vectors (a gated SAE's gate reads them).
            pre: Their `pre`-activations.

        Returns:
            The mask.
        """
        positive = True if self.signed else pre > 0
        if self.activation == "relu":
            on = pre > 0
        elif self.activation == "jumprelu":
            on = (pre > self.threshold) & positive
        elif self.activation in ("topk", "abstopk"):
            scores = pre.abs() if self.activation == "abstopk" else pre
            chosen = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, scores.topk(self.k, dim=-1, sorted=False).indices, True)
            on = chosen if self.activation == "abstopk" else chosen & positive
        else:
            gate = (x - self.b_dec if self.apply_b_dec_to_input else x) @ self.W_enc + self.b_gate
            on = (gate > 0) & (pre > 0)
        return on.to(pre.dtype)

    def decode(self, acts: Float[Tensor, "... d_sae"], x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """The reconstruction from feature activations (and, for a skip transcoder, the input).

        Args:
            acts: Feature activations.
            x: The input vectors.

        Returns:
            ``acts W_dec + b_dec (+ x W_skip^T)``.
        """
        out = acts @ self.W_dec + self.b_dec
        return out if self.W_skip is None else out + x @ self.W_skip.T

    def to(self, like: Tensor) -> Dictionary:
        """The same dictionary with every weight in ``like``'s dtype and on its device.

        Args:
            like: A tensor of the working dtype and device.

        Returns:
            A new `Dictionary` (this one if nothing changes).
        """
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip", "b_gate", "r_mag", "b_mag")
        moved = {n: getattr(self, n).detach().to(like) for n in names if getattr(self, n) is not None}
        if all(moved[n].dtype == getattr(self, n).dtype and moved[n].device == getattr(self, n).device for n in moved):
            return self
        return replace(self, **moved)


def _check(d: Dictionary) -> None:
    if d.activation not in ACTIVATIONS:
        raise InputError(f"Dictionary {d.name}: activation must be one of {', '.join(ACTIVATIONS)}, got {d.activation!r}.")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        value = getattr(d, name)
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise InputError(f"Dictionary {d.name}: {name} must be a floating tensor, got {type(value).__name__}.")
    d_in, d_sae = d.W_enc.shape if d.W_enc.ndim == 2 else (None, None)
    if d_in is None or d.b_enc.shape != (d_sae,) or d.W_dec.ndim != 2 or d.W_dec.shape[0] != d_sae or d.b_dec.shape != (d.W_dec.shape[1],):
        raise InputError(
            f"Dictionary {d.name}: shapes must be W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_out), b_dec (d_out,); "
            f"got {tuple(d.W_enc.shape)}, {tuple(d.b_enc.shape)}, {tuple(d.W_dec.shape)}, {tuple(d.b_dec.shape)}."
        )
    needs = {"jumprelu": ("threshold",), "gated": ("b_gate", "r_mag", "b_mag")}.get(d.activation, ())
    missing = [n for n in needs if getattr(d, n) is None]
    if missing:
        raise InputError(f"Dictionary {d.name}: a {d.activation} dictionary needs {', '.join(missing)}.")
    shapes = {"threshold": (d_sae,), "b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,), "W_skip": (d.W_dec.shape[1], d_in)}
    for name, shape in shapes.items():
        value = getattr(d, name)
        if value is not None and (not isinstance(value, Tensor) or tuple(value.shape) != shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise InputError(f"Dictionary {d.name}: {name} must be a tensor of shape {shape}, got {got}.")
    if d.activation in ("topk", "abstopk") and (isinstance(d.k, bool) or not isinstance(d.k, int) or not 0 < d.k <= d_sae):
        raise InputError(f"Dictionary {d.name}: a {d.activation} dictionary needs k, an int in [1, d_sae={d_sae}], got {d.k!r}.")
    if d.apply_b_dec_to_input and d.b_dec.shape[0] != d_in:
        raise InputError(f"Dictionary {d.name}: apply_b_dec_to_input needs d_in == d_out, got {d_in} and {d.b_dec.shape[0]}.")
    if not isinstance(d.hook_in, str) or not isinstance(d.hook_out, str):
        raise InputError(f"Dictionary {d.name}: hook_in and hook_out must be hook names such as 'blocks.6.hook_resid_post'.")


def from_saelens(sae) -> Dictionary:
    """A SAELens SAE or transcoder as a `Dictionary` (its weights, not a copy of its code).

    Args:
        sae: A SAELens ``SAE`` (StandardSAE, JumpReLUSAE, TopKSAE, AbsTopKSAE, GatedSAE, Transcoder,
            SkipTranscoder, JumpReLUTranscoder, JumpReLUSkipTranscoder).

    Returns:
        The dictionary, reading ``cfg.metadata.hook_name`` and writing ``hook_name_out`` (or the same).

    Raises:
        UnsupportedArchitectureError: for an SAE class or setting no rule covers (named, with why).
    """
    kind = type(sae).__name__
    check_saelens(sae, f"the SAELens {kind} at {getattr(sae.cfg.metadata, 'hook_name', '?')!r}")
    weights = {n: getattr(sae, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip", "b_gate", "r_mag", "b_mag") if isinstance(getattr(sae, n, None), Tensor)}
    if kind == "GatedSAE":
        weights["b_enc"] = weights["b_gate"]  # unused by a gated SAE's magnitudes; kept for the shapes
    hook_in = sae.cfg.metadata.hook_name
    return Dictionary(
        **{n: w.detach() for n, w in weights.items()},
        hook_in=hook_in,
        hook_out=getattr(sae.cfg.metadata, "hook_name_out", None) or hook_in,
        activation=SAELENS_ACTIVATIONS[kind],
        k=getattr(sae.cfg, "k", None),
        apply_b_dec_to_input=bool(getattr(sae.cfg, "apply_b_dec_to_input", False)),
    )


def check_saelens(sae, where: str) -> None:
    """Refuse a SAELens SAE no rule covers: its class, or a setting that puts a nonlinearity outside the mask.

    Args:
        sae: A SAELens ``SAE``.
        where: Its class and hook, for the message.

    Raises:
        UnsupportedArchitectureError: naming it and why.
    """
    kind = type(sae).__name__
    if kind in SAELENS_REFUSED:
        raise UnsupportedArchitectureError(f"{where}: tl_linmap has no freeze rule for it: {SAELENS_REFUSED[kind]}.")
    if kind not in SAELENS_ACTIVATIONS:
        training = " (a training SAE: load the inference SAE of its architecture from its saved weights)" if "Training" in kind else ""
        raise UnsupportedArchitectureError(
            f"{where}: tl_linmap has no freeze rule for this SAE class{training}; it freezes {', '.join(SAELENS_ACTIVATIONS)}."
        )
    check_saelens_cfg(sae, where)


def check_saelens_cfg(sae, where: str) -> None:
    """Refuse SAELens settings that put a nonlinearity outside the feature mask.

    Args:
        sae: A SAELens ``SAE``.
        where: Its class and hook, for the message.

    Raises:
        UnsupportedArchitectureError: for a run-time input normalisation or TopK's rescaling by decoder norms.
    """
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm not in ("none", None):
        raise UnsupportedArchitectureError(
            f"{where}: normalize_activations={norm!r} rescales its input by a factor of the input (or a statistic "
            "folded at load time) that no hook point exposes; fold it into the weights (SAELens: "
            "sae.fold_activation_norm_scaling_factor(...)) and set it to 'none'."
        )
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        raise UnsupportedArchitectureError(
            f"{where}: rescale_acts_by_decoder_norm=True ranks features by pre-activation times decoder norm; "
            "fold the norms into W_enc and W_dec (SAELens: sae.fold_W_dec_norm()) first."
        )
