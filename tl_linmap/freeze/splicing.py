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
        The splices (empty for a model without any), each after those that write the hook point it reads.

    Raises:
        UnsupportedArchitectureError: for a spliced module no rule covers (named, with its hook).
    """
    found = saelens_splices(model, convention(model)) + replacement_splices(model, convention(model, "constant"))
    return ordered(model, found + list(_SPLICED.get(model, ())))


def canonical(points: dict, name: str) -> str:
    """The name a hook point has whatever alias names it (a bridge's ``blocks.0.hook_mlp_out`` is ``blocks.0.mlp.hook_out``).

    Args:
        points: The model's ``hook_dict`` (read once by the caller: a bridge builds it anew on each access).
        name: A hook name.

    Returns:
        The hook point's own name (the name itself where it names no hook point).
    """
    return getattr(points.get(name), "name", None) or name


def ordered(model, splices: list[Splice]) -> list[Splice]:
    """Splices in an order where one that writes a hook point comes before one that reads it.

    Hooks at one hook point run in the order they are added: a dictionary reading another's output
    must see it, whichever was handed over first.

    Args:
        model: The model.
        splices: The splices, in any order.

    Returns:
        The same splices, readers after writers (otherwise in their order).
    """
    if len(splices) < 2:
        return list(splices)
    points = model.hook_dict
    pending, done = list(splices), []
    while pending:
        writes = {canonical(points, s.site) for s in pending}
        ready = next((s for s in pending if canonical(points, s.dictionary.hook_in) not in writes - {canonical(points, s.site)}), pending[0])
        pending.remove(ready)
        done.append(ready)
    return done


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
def spliced(model, dictionaries: Sequence | Dictionary = (), *, error: str | None = None) -> Iterator:
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
        error: ``"live"``, ``"constant"`` or ``"none"`` (`tl_linmap.freeze.splices.ERRORS`); None (default):
            ``"live"`` for the dictionaries given, and the model's own splices' as they are (SAELens': live;
            a ``ReplacementModel``'s: constant).

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
    items = ordered(model, [DictionarySplice(as_dictionary(d), error=error or "live") for d in dictionaries])
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
            item.last.clear()
        conventions.pop()


def _check_sites(model, items: list[DictionarySplice]) -> None:
    points = model.hook_dict
    taken = {canonical(points, splice.site): splice.site for splice in splices_of(model)}
    for item in items:
        d = item.dictionary
        for name in (d.hook_in, d.hook_out):
            if name not in points:
                close = difflib.get_close_matches(name, list(points), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise InputError(f"Dictionary {d.name}: the model has no hook point {name!r}.{hint}")
        site = canonical(points, d.hook_out)
        if site in taken:
            same = "" if taken[site] == d.hook_out else f" (as {taken[site]!r}: the same hook point)"
            raise InputError(f"Two dictionaries write {d.hook_out!r}{same}: splice one per hook point.")
        taken[site] = d.hook_out
