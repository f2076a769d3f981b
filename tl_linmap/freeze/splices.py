"""What users splice into a model: sparse autoencoders and transcoders, each a freeze rule of its own.

A spliced dictionary's features are ``mask ⊙ pre`` (`tl_linmap.freeze.dictionary`); freezing the
mask makes it linear. Three kinds are found, from the model's structure like the other rules:

- SAELens SAEs and transcoders attached to a ``HookedSAETransformer`` (`SAELensSplice`): frozen
  through their own hook points (``<hook>.hook_sae_acts_pre`` / ``hook_sae_acts_post``).
- circuit-tracer's transcoders in a ``ReplacementModel`` (`tl_linmap.freeze.replacement`).
- `Dictionary` objects handed to tl_linmap (`tl_linmap.freeze.splicing.spliced`), on any TransformerLens model: spliced
  through the hook points they read and write (`DictionarySplice`).

The error term ``e = x - x̂`` (the model's value minus the reconstruction), where a splice keeps
one, follows one of two named conventions (`ERRORS`):

- ``"live"``: ``e`` is recomputed from the live values, so ``x̂ + e = x`` in every pass: the
  model's maps are those of the model without the dictionary, and features split them exactly.
- ``"constant"``: ``e`` is frozen at its inference value (circuit-tracer's and SAELens'
  convention): paths from the tokens run through the features only. In a feature split
  (`tl_linmap.linear.features`) ``e`` is an input term of its own; a token-level map's
  constant ``b`` (`tl_linmap.linear_map`) holds what it adds, which the feature split separates.

``"none"`` is a splice without error term: the model runs on the reconstruction.

Each splice gives the hook lists `tl_linmap.freeze.hooks` asks of a rule (`Splice.freeze`,
`Splice.replay`) and one more, `Splice.nodes`, where its activations and error are leaves given
from outside (the direct effects of `tl_linmap.linear.features`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import Tensor

from tl_linmap.base.errors import InputError, UnsupportedArchitectureError
from tl_linmap.freeze.dictionary import Dictionary, check_saelens, from_saelens
from tl_linmap.freeze.rules import HookFn

#: The error conventions, by name (see the module docstring).
ERRORS = ("live", "constant", "none")


@dataclass(frozen=True)
class Leaves:
    """A splice's activations and error as given values (leaves of a node pass).

    Attributes:
        acts: ``(batch, pos, d_sae)`` feature activations.
        error: ``(batch, pos, d_out)`` error term, or None where the splice has none.
        inputs: Filled with the input it read (``"x"``), where that input is at no hook point of its own
            (a dictionary reading and writing one hook point): what its features' pre-activations read.
    """

    acts: Tensor
    error: Tensor | None
    inputs: dict | None = None


class Splice(ABC):
    """A dictionary spliced into a model: a freeze rule (the fields every rule has) and its hooks."""

    #: The hook point whose value the splice writes: its name in results.
    site: str
    #: The error convention (`ERRORS`).
    error: str
    #: Its weights as a `Dictionary` (decoder directions, encoder, hook points).
    dictionary: Dictionary
    after_attention = False
    # Its factors are never cut to a window of the prompt or to the trimmed block of a replay (its
    # input there would be one position, its mask all of them): such models replay whole prompts.
    windows = False
    kind = "features"

    @property
    def own_input_hook(self) -> bool:
        """Whether the vector its encoder reads is at a hook point of its own (False: it reads the point it writes)."""
        return True

    @property
    def input_hook(self) -> str:
        """The hook point holding the vector its encoder reads (a feature's pre-activation is linear in it)."""
        return self.dictionary.hook_in

    @property
    def output_hook(self) -> str:
        """The hook point holding what it writes (where a steering vector in its output space is added)."""
        return self.site

    @property
    def factor_keys(self) -> list[str]:
        """The keys its frozen factors are recorded under: the mask, and a constant error."""
        return [f"{self.site}#mask"] + ([f"{self.site}#error"] if self.error == "constant" else [])

    def hook_names(self) -> list[str]:
        """Keys under which `freeze` records its factors (the rule interface).

        Returns:
            `factor_keys`.
        """
        return self.factor_keys

    @abstractmethod
    def freeze(self, factors: dict | None) -> list[tuple[str, HookFn]]:
        """Hooks that detach its mask (and a constant error) without changing a value.

        Args:
            factors: Filled with the mask under ``site#mask``, a constant error under ``site#error``,
                and, for `Leaves`, the activations and error values under ``site#acts`` / ``site#error_value``.

        Returns:
            ``(name, fn)`` pairs.
        """

    @abstractmethod
    def replay(self, factors: dict) -> list[tuple[str, HookFn]]:
        """Hooks that replace its mask (and a constant error) by recorded ones.

        Args:
            factors: As `freeze` filled them.

        Returns:
            ``(name, fn)`` pairs.
        """

    @abstractmethod
    def nodes(self, leaves: Leaves) -> list[tuple[str, HookFn]]:
        """Hooks that make its output ``acts W_dec + b_dec (+ skip) + error`` from given leaves.

        Nothing before the splice reaches its output except a skip transcoder's linear path: the
        direct effect of each feature and error on what follows.

        Args:
            leaves: The activations and error to use.

        Returns:
            ``(name, fn)`` pairs.
        """


def _recorded(factors: dict | None, site: str, mask: Tensor, acts: Tensor, x: Tensor | None = None) -> None:
    if factors is not None:
        factors[f"{site}#mask"] = mask
        factors[f"{site}#acts"] = acts.detach()
        if x is not None:  # the input, where no hook point of its own holds it
            factors[f"{site}#input"] = x.detach()


def _with_error(recons: Tensor, orig: Tensor, error: str, site: str, factors: dict | None) -> Tensor:
    # recons + (orig - recons): SAELens' own arithmetic, so a frozen value is bit for bit the plain one.
    if error == "none":
        return recons
    e = orig - recons
    if factors is not None:
        factors[f"{site}#error_value"] = e.detach()
        if error == "constant":
            factors[f"{site}#error"] = e.detach()
    return recons + (e if error == "live" else e.detach())


# --- SAELens --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SAELensSplice(Splice):
    """A SAELens SAE or transcoder attached to a ``HookedSAETransformer`` (through its ``_SAEWrapper``).

    Its hook points sit under the hook name it writes (``site``): ``hook_sae_acts_pre`` (the
    pre-activations), ``hook_sae_acts_post`` (``mask ⊙ pre``), ``hook_sae_recons``,
    ``hook_sae_error`` and ``hook_sae_output``. The wrapper computes the error under ``no_grad``;
    a live error is rebuilt at ``hook_sae_output`` from the live input (an SAE's
    ``hook_sae_input``; a transcoder's MLP output, the value ``hook_mlp_out`` would have had).

    Attributes:
        site: The hook name it writes (the wrapper's path).
        sae: The SAELens SAE.
        error: ``"none"`` where attached with ``use_error_term=False``; else ``"live"`` or ``"constant"``.
    """

    site: str
    sae: object = field(repr=False)
    error: str = "live"

    @property
    def dictionary(self) -> Dictionary:
        # SAELens' wrapper runs decode(encode(x)), which leaves a skip transcoder's W_skip out: as the model runs.
        return replace(from_saelens(self.sae), W_skip=None)

    def _hook(self, point: str) -> str:
        return f"{self.site}.hook_sae_{point}"

    @property
    def input_hook(self) -> str:
        # The wrapper replaced the hook point it reads when it writes there too.
        hook_in = self.sae.cfg.metadata.hook_name
        return self._hook("input") if hook_in == self.site else hook_in

    @property
    def output_hook(self) -> str:
        return self._hook("output")

    @property
    def _orig(self) -> str:
        # The wrapper's input: an SAE reads it at hook_sae_input, a transcoder's is its MLP's output.
        if self.sae.cfg.metadata.hook_name_out in (None, self.sae.cfg.metadata.hook_name):
            return self._hook("input")
        return self.site.removesuffix("hook_mlp_out") + "mlp"

    def _output(self, live: dict, error: str, factors: dict | None, constant: Tensor | None = None) -> HookFn:
        def hook(out: Tensor, hook=None) -> Tensor:
            recons = live.pop("recons").reshape(out.shape)
            if constant is not None:
                return recons + constant.expand_as(recons)
            return _with_error(recons, live.pop("orig").reshape(out.shape), error, self.site, factors)

        return hook

    def _keeps(self, live: dict, *, orig: bool) -> list[tuple[str, HookFn]]:
        keeps = [(self._hook("recons"), keep_hook(live, "recons"))]
        return keeps + ([(self._orig, keep_hook(live, "orig"))] if orig else [])

    def freeze(self, factors: dict | None) -> list[tuple[str, HookFn]]:
        live: dict = {}

        def post(act: Tensor, hook=None) -> Tensor:
            pre = live.pop("pre")
            mask = (act != 0).to(act.dtype)
            _recorded(factors, self.site, mask, act)
            return act.detach() + (pre - pre.detach()) * mask  # the value is act's bits; the gradient is mask

        hooks = [(self._hook("acts_pre"), keep_hook(live, "pre")), (self._hook("acts_post"), post)]
        if self.error == "none":
            return hooks
        return hooks + self._keeps(live, orig=True) + [(self._hook("output"), self._output(live, self.error, factors))]

    def replay(self, factors: dict) -> list[tuple[str, HookFn]]:
        live: dict = {}
        mask = factors[f"{self.site}#mask"]
        hooks = [(self._hook("acts_pre"), keep_hook(live, "pre")), (self._hook("acts_post"), lambda act, hook=None: live.pop("pre") * _rows(mask, len(act)))]
        if self.error == "none":
            return hooks
        constant = factors.get(f"{self.site}#error") if self.error == "constant" else None
        return hooks + self._keeps(live, orig=constant is None) + [(self._hook("output"), self._output(live, self.error, None, constant))]

    def nodes(self, leaves: Leaves) -> list[tuple[str, HookFn]]:
        live: dict = {}
        hooks = [(self._hook("acts_post"), lambda act, hook=None: _rows(leaves.acts, len(act)))]
        if self.error == "none":
            return hooks
        return hooks + self._keeps(live, orig=False) + [(self._hook("output"), self._output(live, self.error, None, leaves.error))]


def keep_hook(live: dict, key: str) -> HookFn:
    """A hook that keeps the activation under ``live[key]`` and changes nothing.

    Args:
        live: Where to keep it.
        key: Under which key.

    Returns:
        The hook function.
    """

    # Keyed by this closure, not hook.name: an alias hook reports its canonical name.
    def hook(act: Tensor, hook=None) -> None:
        live[key] = act

    return hook


def saelens_splices(model, convention: str = "live") -> list[Splice]:
    """The SAELens SAEs and transcoders attached to a ``HookedSAETransformer``, as splices.

    Args:
        model: Any model; only one with SAELens' ``_acts_to_saes`` has any.
        convention: The error convention of those attached with ``use_error_term=True``.

    Returns:
        One `SAELensSplice` per attached SAE, in the model's order.

    Raises:
        UnsupportedArchitectureError: for an SAE class or setting no rule covers, naming it and its hook,
            or a wrapper that skips special tokens (a mask of the input's tokens, not of its features).
    """
    wrappers = getattr(model, "_acts_to_saes", None) or {}
    outputs = getattr(model, "_transcoder_output_hooks", {}) or {}
    splices: list[Splice] = []
    for hook_in, wrapper in wrappers.items():
        sae = wrapper.sae
        site = outputs.get(hook_in, hook_in)
        where = f"the SAELens {type(sae).__name__} attached at {hook_in!r}"
        check_saelens(sae, where)
        if getattr(wrapper, "exclude_special_tokens", False):
            raise UnsupportedArchitectureError(
                f"{where} bypasses special tokens (exclude_special_tokens): attach it with exclude_special_tokens=False."
            )
        use_error = bool(wrapper.use_error_term)
        if use_error and site != hook_in and not site.endswith("hook_mlp_out"):
            raise UnsupportedArchitectureError(
                f"{where} writes {site!r} with use_error_term=True: tl_linmap rebuilds a transcoder's error from its MLP's "
                "output, so it must write a block's hook_mlp_out."
            )
        splices.append(SAELensSplice(site, sae, error=convention if use_error else "none"))
    return splices


# --- Dictionaries handed to tl_linmap -----------------------------------------------------------


class _Last:
    """What a splice's plain hook last wrote, so that a later hook of the same splice sees the model's own value.

    Given back once (`resolve`) and dropped, so no activation (nor its graph) outlives its forward for long.
    """

    def __init__(self) -> None:
        self.out: Tensor | None = None
        self.orig: Tensor | None = None

    def resolve(self, act: Tensor) -> Tensor:
        if act is not self.out:
            return act
        orig, self.out, self.orig = self.orig, None, None
        return orig

    def clear(self) -> None:
        self.out = self.orig = None


def _rows(value: Tensor, n: int) -> Tensor:
    # A value recorded on one sequence, for a pass of n rows.
    return value.expand(n, *value.shape[1:]) if value.shape[0] == 1 else value


@dataclass(frozen=True, eq=False)
class DictionarySplice(Splice):
    """A `Dictionary` spliced through the hook points it reads and writes (`tl_linmap.freeze.splicing.spliced`).

    Its plain hooks run while it is spliced; the freeze, replay and node hooks come after them at
    the same points and see, through `_Last`, the model's own value where the plain hook wrote
    the reconstruction.

    Attributes:
        dictionary: Its weights.
        error: Its error convention.
    """

    dictionary: Dictionary
    error: str = "live"
    last: _Last = field(default_factory=_Last, repr=False)
    cast: dict = field(default_factory=dict, repr=False)

    @property
    def site(self) -> str:
        return self.dictionary.hook_out

    def weights(self, like: Tensor) -> Dictionary:
        """Its dictionary in ``like``'s dtype and device, cast once per splice (not per forward).

        Args:
            like: An activation of the pass.

        Returns:
            The `Dictionary`.
        """
        key = (like.dtype, like.device)
        if key not in self.cast:
            self.cast[key] = self.dictionary.to(like)
        return self.cast[key]

    @property
    def own_input_hook(self) -> bool:
        return self.dictionary.hook_in != self.dictionary.hook_out

    def _hooks(self, acts_of: Callable[[Dictionary, Tensor], Tensor], error_of: Callable[[Tensor, Tensor], Tensor], inputs: dict | None = None) -> list[tuple[str, HookFn]]:
        # Its output computed at hook_out (in the activation's dtype and device) from its input, kept at
        # hook_in where that is another hook point (and, in ``inputs``, where it is not).
        live: dict = {}
        d = self.dictionary

        def take(act: Tensor, hook=None) -> None:
            live["x"] = self.last.resolve(act)

        def write(act: Tensor, hook=None) -> Tensor:
            orig = live.pop("orig", None)
            orig = self.last.resolve(act) if orig is None else orig
            x = (live.pop("x") if self.own_input_hook else orig).flatten(2)
            if x.shape[-1] != d.W_enc.shape[0]:
                raise InputError(
                    f"Dictionary {d.name}: {d.hook_in!r} holds vectors of width {x.shape[-1]} (flattened after the position "
                    f"axis), its W_enc reads {d.W_enc.shape[0]}: give a dictionary for this hook point."
                )
            if inputs is not None and not self.own_input_hook:
                inputs["x"] = x
            w = self.weights(x)
            recons = w.decode(acts_of(w, x), x).reshape(orig.shape)
            return error_of(recons, orig)

        return [*([(d.hook_in, take)] if self.own_input_hook else []), *self._original(live), (d.hook_out, write)]

    def _original(self, live: dict) -> list[tuple[str, HookFn]]:
        # Hooks keeping the model's own value at hook_out under live["orig"], where hook_out's is not it.
        return []

    def plain(self) -> list[tuple[str, HookFn]]:
        """Hooks that run the model with the dictionary spliced in (its mask and error live).

        Returns:
            ``(name, fn)`` pairs.
        """
        hooks = self._hooks(_masked, lambda r, o: r if self.error == "none" else r + (o - r))
        name, write = hooks[-1]

        def remember(act: Tensor, hook=None) -> Tensor:
            self.last.out = None  # a new forward: act is the model's own value
            out = write(act)
            self.last.out, self.last.orig = out, act
            return out

        return [*hooks[:-1], (name, remember)]

    def freeze(self, factors: dict | None) -> list[tuple[str, HookFn]]:
        def acts_of(w: Dictionary, x: Tensor) -> Tensor:
            pre = w.pre(x)
            mask = w.mask(x, pre).detach()
            acts = pre * mask
            _recorded(factors, self.site, mask, acts, None if self.own_input_hook else x)
            return acts

        return self._hooks(acts_of, lambda r, o: _with_error(r, o, self.error, self.site, factors))

    def replay(self, factors: dict) -> list[tuple[str, HookFn]]:
        mask, constant = factors[f"{self.site}#mask"], factors.get(f"{self.site}#error")

        def error_of(r: Tensor, o: Tensor) -> Tensor:
            if self.error == "none":
                return r
            return r + (_rows(constant, len(r)) if constant is not None else o - r)

        return self._hooks(lambda w, x: w.pre(x) * _rows(mask, len(x)), error_of)

    def nodes(self, leaves: Leaves) -> list[tuple[str, HookFn]]:
        def error_of(r: Tensor, o: Tensor) -> Tensor:
            return r if leaves.error is None else r + _rows(leaves.error, len(r)).reshape(r.shape)

        return self._hooks(lambda w, x: _rows(leaves.acts, len(x)), error_of, leaves.inputs)


def _masked(w: Dictionary, x: Tensor) -> Tensor:
    pre = w.pre(x)
    return pre * w.mask(x, pre)
