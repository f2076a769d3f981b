"""Which dictionaries are spliced into which model: the ones it carries, and those of `spliced`.

`splices_of` is what the rule table (`tl_linmap.freeze.architectures.rules_for`) adds to a model's
rules; `spliced` is how a user hands dictionaries over, and names the error convention.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from tl_linmap.base.errors import InputError
from tl_linmap.freeze.dictionary import Dictionary, from_saelens
from tl_linmap.freeze.replacement import replacement_splices
from tl_linmap.freeze.splices import ERRORS, DictionarySplice, Splice, saelens_splices

_SPLICED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CONVENTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def convention(model, default: str = "live") -> str:
    """The error convention in force for a model's own splices (the innermost `spliced`'s).

    Args:
        model: A TransformerBridge or HookedTransformer.
        default: Outside any `spliced`.

    Returns:
        ``"live"`` or ``"constant"``.
    """
    named = [c for c in _CONVENTIONS.get(model, ()) if c is not None]
    return named[-1] if named else default


def splices_of(model) -> list[Splice]:
    """Every dictionary spliced into a model: SAELens', circuit-tracer's, then those of `spliced`.

    Args:
        model: A TransformerBridge or HookedTransformer.

    Returns:
        The splices (empty for a model without any).

    Raises:
        UnsupportedArchitectureError: for a spliced module no rule covers (named, with its hook).
    """
    found = saelens_splices(model, convention(model)) + replacement_splices(model, convention(model, "constant"))
    return found + list(_SPLICED.get(model, ()))


def check_error(error) -> str:
    """Check an error convention.

    Args:
        error: ``"live"``, ``"constant"`` or ``"none"``.

    Returns:
        It.

    Raises:
        InputError: naming the conventions.
    """
    if error not in ERRORS:
        raise InputError(
            "error must be 'live' (x - SAE(x) recomputed: the model's maps unchanged, features split them), 'constant' "
            "(frozen at its inference value, an input term of its own, as circuit-tracer does) or 'none' (no error "
            f"term: the model runs on the reconstruction); got {error!r}."
        )
    return error


def as_dictionary(item) -> Dictionary:
    """A `Dictionary` from what a user hands over.

    Args:
        item: A `Dictionary` or a SAELens SAE.

    Returns:
        The dictionary.

    Raises:
        InputError: for anything else.
        UnsupportedArchitectureError: for a SAELens SAE no rule covers.
    """
    if isinstance(item, Dictionary):
        return item
    if hasattr(item, "W_enc") and hasattr(getattr(item, "cfg", None), "metadata"):
        return from_saelens(item)
    raise InputError(
        f"Give a tl_linmap.Dictionary (W_enc, b_enc, W_dec, b_dec, hook_in, activation, ...) or a SAELens SAE, got {type(item).__name__}."
    )


@contextmanager
def spliced(model, dictionaries: Sequence | Dictionary = (), *, error: str | None = "live") -> Iterator:
    """Context manager: the model with dictionaries spliced in through hook points, under an error convention.

    Inside, the model's forward writes each dictionary's reconstruction at its ``hook_out`` (plus
    the error term ``x - x̂`` unless ``error="none"``, so that the value is the model's own), and every
    tl_linmap call maps the model with them, their masks frozen. ``error`` also names the convention
    of the SAEs a ``HookedSAETransformer`` or circuit-tracer ``ReplacementModel`` carries with an error
    term (``"none"`` leaves theirs as they are). Composes with the user's hooks and ``run_with_cache``;
    everything is removed on exit, also on error.

    Args:
        model: A TransformerBridge or HookedTransformer.
        dictionaries: `Dictionary` objects or SAELens SAEs, at any hook points with a position axis.
        error: ``"live"``, ``"constant"`` or ``"none"`` (`tl_linmap.freeze.splices.ERRORS`); None: ``"live"``
            for the dictionaries given, and the model's own splices as they are.

    Returns:
        A context manager yielding the model.

    Raises:
        InputError: for a bad convention, dictionary or hook name, or two dictionaries writing one hook point.

    Example:
        >>> with tl_linmap.spliced(model, [sae], error="live"):
        ...     result = tl_linmap.feature_contributions(model, prompt, target=tl_linmap.Logit(" Paris"))
    """
    if error is not None:
        check_error(error)
    if isinstance(dictionaries, Dictionary) or hasattr(dictionaries, "W_enc"):
        dictionaries = [dictionaries]
    items = [DictionarySplice(as_dictionary(d), error=error or "live") for d in dictionaries]
    _check_sites(model, items)
    plain = [hook for item in items for hook in item.plain()]
    added = _SPLICED.setdefault(model, [])
    conventions = _CONVENTIONS.setdefault(model, [])
    conventions.append(error if error in ("live", "constant") else None)
    added.extend(items)
    try:
        with model.hooks(fwd_hooks=plain):
            yield model
    finally:
        for item in items:
            added.remove(item)
        conventions.pop()


def _check_sites(model, items: list[DictionarySplice]) -> None:
    taken = {splice.site for splice in splices_of(model)}
    for item in items:
        d = item.dictionary
        for name in (d.hook_in, d.hook_out):
            if name not in model.hook_dict:
                close = difflib.get_close_matches(name, list(model.hook_dict), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise InputError(f"Dictionary {d.name}: the model has no hook point {name!r}.{hint}")
        if d.hook_out in taken:
            raise InputError(f"Two dictionaries write {d.hook_out!r}: splice one per hook point.")
        taken.add(d.hook_out)
