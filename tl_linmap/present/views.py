"""What a result's ``show`` returns: circuitsvis's views where it is installed, tl_linmap's own HTML otherwise.

circuitsvis (the ``circuitsvis`` extra; TransformerLens's display library) draws coloured tokens and
attention patterns with React, from a script of about 1.3 MB. A `View` embeds that script inline
(circuitsvis's ``local_src``), so it draws offline, in a saved notebook and in rendered docs alike;
circuitsvis's own object would instead try to reach google.com each time it is displayed and, when
online, load the script from unpkg (kept as `View.cdn_html`: the data and a few hundred bytes). Without
circuitsvis, or with ``backend="html"``, a view is tl_linmap's own HTML (`tl_linmap.present.display`:
inline styles, no script).

A `View` is displayed as a notebook cell's value, as circuitsvis's views are; in a loop, pass it to
``IPython.display.display``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.errors import InputError

#: What ``show(backend=...)`` takes; None picks circuitsvis where it is installed.
Backend = Literal["circuitsvis", "html"] | None


@dataclass(frozen=True)
class View:
    """HTML a notebook displays: a result's ``show()``.

    Attributes:
        html: The page fragment (circuitsvis's with its script inline, or tl_linmap's own).
        backend: ``"circuitsvis"`` or ``"html"``.
        cdn_html: circuitsvis's fragment that loads its script from unpkg (needs the internet
            where it is displayed); None for tl_linmap's own HTML.
    """

    html: str = field(repr=False)
    backend: str
    cdn_html: str | None = field(default=None, repr=False)

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"View(backend={self.backend!r}, {len(self.html):,} characters of HTML: display it in a notebook)"


def circuitsvis_module():
    """circuitsvis, where it is installed.

    Returns:
        The ``circuitsvis`` module, or None.
    """
    try:
        import circuitsvis  # noqa: PLC0415 - an optional extra
    except ImportError:
        return None
    return circuitsvis


def resolve_backend(backend: Backend) -> str:
    """The backend a view is drawn with.

    Args:
        backend: ``"circuitsvis"``, ``"html"``, or None for circuitsvis where it is installed.

    Returns:
        ``"circuitsvis"`` or ``"html"``.

    Raises:
        InputError: for another backend, or ``"circuitsvis"`` where it is not installed.
    """
    if backend not in (None, "circuitsvis", "html"):
        raise InputError(f"backend must be 'circuitsvis', 'html' or None (circuitsvis where installed), got {backend!r}.")
    installed = circuitsvis_module() is not None
    if backend == "circuitsvis" and not installed:
        raise InputError("backend='circuitsvis' needs circuitsvis: pip install 'tl_linmap[circuitsvis]' (or circuitsvis), or pass backend='html'.")
    return backend or ("circuitsvis" if installed else "html")


def _inline_safe(source: str) -> str:
    # The props (the tokens) are JSON inside a <script>: a token "</script>" or "<!--" would end or
    # derail it. "<\/" and "<\!" read the same in a JavaScript string; the last "</script>" is the real end.
    body, end = source.rsplit("</script>", 1)
    body = re.sub(r"</(script)", r"<\\/\1", body, flags=re.IGNORECASE).replace("<!--", "<\\!--")
    return body + "</script>" + end


def _circuitsvis_view(rendered) -> View:
    return View(_inline_safe(rendered.local_src), "circuitsvis", _inline_safe(rendered.cdn_src))


def colored_tokens(
    tokens: Sequence[str],
    values: Float[Tensor, "pos k"],
    labels: Sequence[str],
    *,
    signed: bool,
    html: Callable[[], str],
    backend: Backend = None,
) -> View:
    """Tokens coloured by one or several values each.

    With circuitsvis: ``circuitsvis.tokens.colored_tokens`` for one value per token (on a scale
    symmetric about zero where ``signed``, from zero otherwise: blue positive, red negative), or
    ``colored_tokens_multi`` for several (a selector over ``labels``; hovering a token lists all).
    circuitsvis writes each token into the page as HTML, so the tokens are passed HTML-escaped:
    ``<bos>`` or ``<s>`` then reads as text instead of becoming an element (its tooltip shows the
    escaped form).

    Args:
        tokens: Decoded tokens, one per row of ``values``.
        values: ``[token, k]``.
        labels: A name per column of ``values``.
        signed: Whether the values have a sign that matters (logit contributions) or are sizes.
        html: tl_linmap's own HTML, made only where circuitsvis is not used.
        backend: See `resolve_backend`.

    Returns:
        A `View`.

    Raises:
        InputError: for a bad backend, or values that are not ``[len(tokens), len(labels)]``.
    """
    if values.ndim != 2 or tuple(values.shape) != (len(tokens), len(labels)):
        raise InputError(f"values of shape {tuple(values.shape)} for {len(tokens)} tokens and {len(labels)} labels.")
    if resolve_backend(backend) == "html":
        return View(html(), "html")
    cv = circuitsvis_module()
    values = values.detach().to("cpu", torch.float64)
    tokens = [escape(token, quote=False) for token in tokens]
    if len(labels) > 1:
        return _circuitsvis_view(cv.tokens.colored_tokens_multi(tokens, values, list(labels)))
    scale = float(values.abs().max()) if len(values) else 0.0
    scale = scale or 1.0  # all zero: any scale draws white
    return _circuitsvis_view(cv.tokens.colored_tokens(tokens, values[:, 0], min_value=-scale if signed else 0.0, max_value=scale))


def attention(
    tokens: Sequence[str],
    pattern: Float[Tensor, "n_heads query key"],
    names: Sequence[str],
    *,
    html: Callable[[], str],
    backend: Backend = None,
) -> View:
    """Attention patterns as heatmaps.

    With circuitsvis: ``circuitsvis.attention.attention_pattern`` for one head,
    ``attention_heads`` for several (a thumbnail per head, the one hovered or clicked drawn large).

    Args:
        tokens: Decoded tokens (query and key positions alike).
        pattern: ``pattern[h, q, k]``, head ``h``'s weight on key ``k`` at query ``q``.
        names: A name per head (e.g. ``"L1H3"``).
        html: tl_linmap's own HTML, made only where circuitsvis is not used.
        backend: See `resolve_backend`.

    Returns:
        A `View`.

    Raises:
        InputError: for a bad backend, or a pattern that is not ``[len(names), len(tokens), len(tokens)]``.
    """
    n = len(tokens)
    if pattern.ndim != 3 or tuple(pattern.shape) != (len(names), n, n):
        raise InputError(f"pattern of shape {tuple(pattern.shape)} for {len(names)} heads and {n} tokens.")
    if resolve_backend(backend) == "html":
        return View(html(), "html")
    cv = circuitsvis_module()
    pattern = pattern.detach().to("cpu", torch.float64)
    if len(names) == 1:
        return _circuitsvis_view(cv.attention.attention_pattern(list(tokens), pattern[0]))
    return _circuitsvis_view(cv.attention.attention_heads(pattern, list(tokens), list(names)))
