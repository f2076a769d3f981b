"""Notebook display of results: self-contained HTML (inline styles, no scripts, nothing fetched).

Every function is pure and duck-typed on the result's fields, so this module depends on no
other part of tl_linmap than `tl_linmap.base.table`; the result classes call it from their
``_repr_html_``. Tokens are drawn as boxes with their whitespace visible and are coloured by
a value: one hue for magnitudes, blue (positive) and red (negative) for signed values; the
exact value is in each token's tooltip.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.table import NUM_CELL, STYLE, Table, table_row, visible

#: Background colours (RGB) of the token views: magnitudes, positive and negative values.
MAGNITUDE = (230, 120, 0)


POSITIVE = (33, 102, 172)


NEGATIVE = (178, 24, 43)


#: Opacity of the largest value: the text stays readable on the strongest colour.
MAX_ALPHA = 0.8


#: Heads listed by `attribution_html`, largest total first.
TOP_HEADS = 6


# Inline (not in STYLE) so that `tokens_html` renders the same on its own; compact because repeated per token.
_TOKEN_STYLE = "display:inline-block;font-family:monospace;white-space:pre;border:1px solid #8886;border-radius:3px;padding:0 2px;margin:1px"


def _colour(value: float, scale: float, signed: bool) -> str:
    alpha = MAX_ALPHA * abs(value) / scale if scale > 0 else 0.0
    rgb = (POSITIVE if value >= 0 else NEGATIVE) if signed else MAGNITUDE
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.3f})"


def tokens_html(
    tokens: Sequence[str],
    values: Sequence[float] | Float[Tensor, " pos"],
    signed: bool = False,
    *,
    titles: Sequence[str] | None = None,
    mark: int | None = None,
) -> str:
    """Tokens as inline spans whose background shows a value per token.

    Styles are inline, so the fragment renders on its own or inside other HTML.

    Args:
        tokens: Decoded tokens (escaped here; spaces shown as ``␣``, newlines as ``↵``).
        values: One number per token (a list or a 1-d tensor).
        signed: Colour positive values blue and negative ones red (else one hue for ``|value|``).
            Opacity is ``MAX_ALPHA · |value| / max |value|``.
        titles: Tooltip per token (default: the token's ``repr`` and its value).
        mark: Index of a token to outline (the target position).

    Returns:
        A ``<div>`` of ``<span>`` elements, one per token, in order.

    Raises:
        ValueError: if tokens and values differ in length.
    """
    values = [float(v) for v in values]
    if len(values) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} values.")
    scale = max((abs(v) for v in values), default=0.0)
    sign = "+" if signed else ""
    titles = titles or [f"{token!r}: {value:{sign}.4g}" for token, value in zip(tokens, values)]
    spans = []
    for i, (token, value, title) in enumerate(zip(tokens, values, titles)):
        # inline-block: a long prompt wraps between tokens, never inside one.
        outline = ";outline:2px solid currentColor" if i == mark else ""
        style = f"background-color:{_colour(value, scale, signed)};{_TOKEN_STYLE}{outline}"
        spans.append(f'<span style="{style}" title="{html.escape(title)}">{html.escape(visible(token))}</span>')
    return f'<div class="tl-linmap-tokens">{"".join(spans)}</div>'


def shape_text(tensor) -> str:
    """A tensor's shape as a fact shows it.

    Args:
        tensor: Anything with a ``shape``.

    Returns:
        The sizes joined by ``×`` (``"4 × 16 × 16"``).
    """
    return " \u00d7 ".join(str(n) for n in tensor.shape)


def _facts(rows: Sequence[tuple[str, str, bool]]) -> str:
    # A two-column table: name, value (right-aligned when it is a number).
    cells = "".join(
        f"<tr><th>{html.escape(name)}</th><td{NUM_CELL if numeric else ''}>{html.escape(value)}</td></tr>"
        for name, value, numeric in rows
    )
    return f'<table class="tl-linmap-table"><tbody>{cells}</tbody></table>'


def _frame(title: str, *parts: str) -> str:
    return f'<div class="tl-linmap"><style>{STYLE}</style><div><b>{title}</b></div>{"".join(parts)}</div>'


#: One fact a summary shows: its name, its value as text, whether the value is a number (right-aligned).
Fact = tuple[str, str, bool]


def summary_html(title: str, facts: Sequence[Fact] = (), *parts: str) -> str:
    """A result at a glance, as the other views here frame it: a title, its facts, more HTML.

    Args:
        title: Plain text (escaped here).
        facts: ``(name, value, is_number)`` per fact, shown as a two-column table.
        parts: HTML fragments after the facts (a `Table`'s ``_repr_html_``, `tokens_html`).

    Returns:
        An HTML fragment.
    """
    return _frame(html.escape(title), _facts(facts) if facts else "", *parts)


def summary_text(name: str, facts: Sequence[Fact], *lines: str) -> str:
    """A result in plain text (for ``repr``): ``Name(fact value; ...)``, then indented lines.

    Args:
        name: The result's type name.
        facts: ``(name, value, is_number)`` per fact.
        lines: Further lines (a table's text), each indented by two spaces.

    Returns:
        The text.
    """
    head = f"{name}({'; '.join(f'{fact} {value}' for fact, value, _ in facts)})"
    return "\n".join([head, *("  " + line for text in lines for line in text.splitlines())])


def _shares(result) -> tuple[list[float], list[float]]:
    # ‖J_i x_i‖ and its share of Σ_j ‖J_j x_j‖: which tokens the target's linear part comes from.
    norms = [float(n) for n in result.contributions().norm(dim=-1)]
    total = sum(norms) or 1.0
    return norms, [n / total for n in norms]


def _contribution_view(result, tokens: list[str]) -> str:
    norms, shares = _shares(result)
    titles = [f"{token!r}: ‖J_i x_i‖ = {n:.4g}, share {s:.3f}" for token, n, s in zip(tokens, norms, shares)]
    caption = ("<div>Per-token contributions: colour = ‖J<sub>i</sub> x<sub>i</sub>‖ / "
               "Σ<sub>j</sub> ‖J<sub>j</sub> x<sub>j</sub>‖ (hover for values; outlined: the target position).</div>")
    return caption + tokens_html(tokens, shares, titles=titles, mark=result.position % len(tokens))


def map_facts(lm) -> list[tuple[str, str, bool]]:
    """What `linear_map_html` and `linear_map_text` show about one map, as text.

    Args:
        lm: See `linear_map_html`.

    Returns:
        ``(name, value, is_number)`` per fact: target, position, tokens, shapes, relative
        error, native gap.
    """
    tokens = lm.str_tokens
    position = lm.position % len(tokens)
    facts = [("target", lm.target, False), ("position", f"{position} ({tokens[position]!r})", False),
             ("tokens", str(len(tokens)), True)]
    for name, symbol in (("operators", "J"), ("inputs", "x")):
        if getattr(lm, name, None) is not None:
            facts.append((f"{name} {symbol}", shape_text(getattr(lm, name)), False))
    return facts + [("relative error", f"{lm.relative_error():.2e}", True), ("native gap", f"{lm.native_gap():.2e}", True)]


def linear_map_html(lm) -> str:
    """A linear map (or any per-token result of one target) at a glance.

    Args:
        lm: A `tl_linmap.results.maps.LinearMap` or `tl_linmap.results.maps.Contributions`: needs
            ``target``, ``position``, ``tokens``, ``reader``, ``output``, ``contributions()``,
            ``relative_error()`` and ``native_gap()``; ``operators`` and ``inputs`` are
            shown when present.

    Returns:
        An HTML fragment: target, position, shapes, relative error, native gap, and the
        prompt's tokens coloured by their share of the contribution norms.
    """
    title = f"{type(lm).__name__} of {html.escape(lm.target)}"
    return _frame(title, _facts(map_facts(lm)), _contribution_view(lm, lm.str_tokens))


def linear_map_text(lm, top: int = 5) -> str:
    """A short plain-text summary of one map (for ``repr``; the tensors are left out).

    Args:
        lm: See `linear_map_html`.
        top: Tokens listed by their share of the contribution norms.

    Returns:
        Two lines: the facts, then the largest per-token shares.
    """
    _, shares = _shares(lm)
    order = sorted(range(len(shares)), key=lambda i: -shares[i])[:top]
    tokens = lm.str_tokens
    largest = ", ".join(f"{i}:{tokens[i]!r} {shares[i]:.2f}" for i in order)
    facts = "; ".join(f"{name} {value}" for name, value, _ in map_facts(lm))
    return f"{type(lm).__name__}({facts})\n  largest shares of Σ‖J_i x_i‖: {largest}"


@table_row
@dataclass
class MapRow:
    """One map of a `LinearMaps`, summarised.

    Attributes:
        target: Hook name.
        d_out: Width of the target vector.
        relative_error: ``‖Σ_i J_i x_i + b − y‖ / ‖y‖``.
    """

    target: str
    d_out: int
    relative_error: float


def map_rows(maps: Mapping) -> Table:
    """One summary row per map.

    Args:
        maps: Hook name -> map (a `tl_linmap.results.maps.LinearMaps` or a dict of maps).

    Returns:
        A `tl_linmap.base.table.Table` of `MapRow`.
    """
    return Table(MapRow(name, int(lm.output.shape[-1]), lm.relative_error()) for name, lm in maps.items())


def linear_maps_html(maps: Mapping) -> str:
    """Several maps of one inference: targets with their errors, and the last map's token view.

    Args:
        maps: Hook name -> map (a `tl_linmap.results.maps.LinearMaps` or a dict of maps).

    Returns:
        An HTML fragment.
    """
    if not maps:
        return _frame("No maps")
    rows = map_rows(maps)
    name = list(maps)[-1]
    last = maps[name]  # one map read (a map kept on disk is read on access)
    last_map = f"<div>Last map: <code>{html.escape(name)}</code></div>"
    return _frame(html.escape(_maps_title(last, rows)), rows._repr_html_(), last_map, _contribution_view(last, last.str_tokens))


def _maps_title(last, rows: Table) -> str:
    n = len(last.tokens)
    worst = max(row.relative_error for row in rows)
    return f"{len(rows)} linear maps at position {last.position % n} of {n} tokens; worst relative error {worst:.2e}"


def linear_maps_text(maps: Mapping) -> str:
    """A plain-text summary of several maps (for ``repr``): one line per map.

    Args:
        maps: Hook name -> map (a `tl_linmap.results.maps.LinearMaps` or a dict of maps).

    Returns:
        A title line and the `map_rows` table.
    """
    if not maps:
        return "No maps"
    rows = map_rows(maps)
    return f"{_maps_title(maps[list(maps)[-1]], rows)}\n{rows}"


@table_row
@dataclass
class ComponentRow:
    """One component's part of an output token's logit.

    Attributes:
        component: Hook name (``hook_resid_pre`` of layer 0: the embeddings), ``"constant"``
            (biases, positions, the final norm's offset) or ``"b_U"``.
        total: Its logit contribution, summed over source tokens.
    """

    component: str
    total: float


def component_rows(att) -> Table:
    """Per-component totals of an attribution, then its constant parts.

    Args:
        att: A `tl_linmap.results.attribution.Attribution` (or a
            `tl_linmap.results.logit_split.LogitSplit`, which has no components).

    Returns:
        A `tl_linmap.base.table.Table` of `ComponentRow`; the totals sum to ``att.logit``.
    """
    rows = Table(ComponentRow(name, float(values.sum())) for name, values in getattr(att, "per_component", {}).items())
    rows.append(ComponentRow("constant", float(att.constant)))
    if getattr(att, "unembed_bias", None) is not None:
        rows.append(ComponentRow("b_U", float(att.unembed_bias)))
    return rows


def _attribution_parts(att, tokens: Sequence[str] | None) -> tuple[list[str], list[float], str, str]:
    # Tokens, per-token values, the title (logit = tokens + constants) and the largest heads.
    values = [float(v) for v in att.per_token]
    tokens = list(tokens or getattr(att, "str_tokens", None) or [f"#{i}" for i in range(len(values))])
    constant = att.total() - sum(values)
    title = f"Logit of {att.token!r}: {att.logit:.4g} = {sum(values):.4g} from tokens + {constant:.4g} constant"
    heads = sorted(getattr(att, "per_head", {}).items(), key=lambda item: -abs(float(item[1].sum())))[:TOP_HEADS]
    listed = ", ".join(f"L{layer}H{head} {float(v.sum()):+.3g}" for (layer, head), v in heads)
    return tokens, values, title, listed


def attribution_html(att, tokens: Sequence[str] | None = None) -> str:
    """An output token's logit split over source tokens (signed colours) and components.

    Args:
        att: A `tl_linmap.results.attribution.Attribution` or a `tl_linmap.results.logit_split.LogitSplit`:
            needs ``token``, ``logit``, ``per_token``, ``constant``, ``total()``; uses
            ``per_component``, ``per_head``, ``unembed_bias`` and ``str_tokens`` when present.
        tokens: The decoded source tokens (default: ``att.str_tokens``, else ``#i``).

    Returns:
        An HTML fragment: the logit and its parts, the tokens coloured by their signed
        share ``v_i / Σ_j |v_j|`` (blue raises the logit, red lowers it), per-component
        totals and the largest heads.
    """
    tokens, values, title, heads = _attribution_parts(att, tokens)
    scale = sum(abs(v) for v in values) or 1.0
    titles = [f"{token!r}: {v:+.4g} ({v / scale:+.3f} of Σ|v|)" for token, v in zip(tokens, values)]
    parts = ["<div>Per-token contributions: blue raises the logit, red lowers it (hover for values).</div>",
             tokens_html(tokens, [v / scale for v in values], signed=True, titles=titles), component_rows(att)._repr_html_()]
    if heads:
        parts.append(f"<div>Largest heads: {html.escape(heads)}</div>")
    return _frame(html.escape(title), *parts)


def attribution_text(att, tokens: Sequence[str] | None = None, top: int = 5) -> str:
    """A plain-text summary of an attribution (for ``repr``; the tensors are left out).

    Args:
        att: See `attribution_html`.
        tokens: The decoded source tokens (default: ``att.str_tokens``, else ``#i``).
        top: Tokens listed, largest ``|value|`` first.

    Returns:
        The logit and its parts, the largest tokens, the largest heads and the
        per-component table.
    """
    tokens, values, title, heads = _attribution_parts(att, tokens)
    order = sorted(range(len(values)), key=lambda i: -abs(values[i]))[:top]
    lines = [title, "  largest tokens: " + ", ".join(f"{i}:{tokens[i]!r} {values[i]:+.3g}" for i in order)]
    if heads:
        lines.append(f"  largest heads: {heads}")
    return "\n".join(lines + [str(component_rows(att))])


@table_row
@dataclass
class VectorRow:
    """One pushed vector read at its target (`tl_linmap.linear.matrix_free.Pushed`).

    Attributes:
        vector: Index of the vector.
        norm: ``‖J_i v‖``, the size of what it becomes at the target.
        top: The tokens it promotes most there, with their logits, highest first.
    """

    vector: int
    norm: float
    top: list[tuple[str, float]]


def vector_rows(pushed, top: int = 5) -> Table:
    """One row per pushed vector: how large it arrives, which tokens it promotes.

    Args:
        pushed: A `tl_linmap.linear.matrix_free.Pushed`: needs ``values`` and ``top_tokens(k)``.
        top: Tokens per vector.

    Returns:
        A `tl_linmap.base.table.Table` of `VectorRow`.
    """
    norms = pushed.values.norm(dim=-1).tolist()
    return Table(VectorRow(j, norm, tokens) for j, (norm, tokens) in enumerate(zip(norms, pushed.top_tokens(top))))


def _pushed_facts(pushed) -> list[Fact]:
    return [("vectors", str(len(pushed.vectors)), True), ("from", f"{pushed.source} at position {pushed.source_position}", False),
            ("to", f"{pushed.target} at position {pushed.position}", False)]


def pushed_text(pushed) -> str:
    """A plain-text summary of pushed vectors (for ``repr``): where from, where to, what they promote.

    Args:
        pushed: See `vector_rows`.

    Returns:
        The facts, then the `vector_rows` table.
    """
    return summary_text(type(pushed).__name__, _pushed_facts(pushed), str(vector_rows(pushed, 3)))


def pushed_html(pushed) -> str:
    """Pushed vectors at a glance.

    Args:
        pushed: See `vector_rows`.

    Returns:
        An HTML fragment: the facts and the `vector_rows` table.
    """
    return summary_html(f"{len(pushed.vectors)} vectors pushed to {pushed.target}", _pushed_facts(pushed),
                        vector_rows(pushed)._repr_html_())


def token_rows_html(
    title: str, tokens: Sequence[str], rows: Mapping[str, Sequence[float] | Float[Tensor, " pos"]], signed: bool = False,
) -> str:
    """Several values per token: one labelled row of coloured tokens per value, each on its own scale.

    Args:
        title: Plain text (escaped here).
        tokens: Decoded tokens.
        rows: Label -> one number per token.
        signed: Colour positive values blue and negative ones red (else one hue for ``|value|``).

    Returns:
        An HTML fragment: a two-column table, the label and its `tokens_html`.
    """
    cells = "".join(f"<tr><th>{html.escape(label)}</th><td>{tokens_html(tokens, values, signed)}</td></tr>" for label, values in rows.items())
    return _frame(html.escape(title), f'<table class="tl-linmap-table"><tbody>{cells}</tbody></table>')


# Compact, inline (a cell is repeated n² times per head): a heatmap cell and a key token written upwards.
_CELL = "width:1.1em;height:1.1em;padding:0;border:1px solid #8882"
_KEY = "writing-mode:vertical-rl;transform:rotate(180deg);font-family:monospace;white-space:pre;font-weight:normal;padding:2px 0"


def pattern_html(
    title: str, tokens: Sequence[str], pattern: Float[Tensor, "n_heads query key"], names: Sequence[str],
) -> str:
    """Attention patterns as heatmaps: per head, a row per query token and a column per key token.

    Weights are drawn on an absolute scale (opacity ``MAX_ALPHA · weight``), so heads compare.

    Args:
        title: Plain text (escaped here).
        tokens: The decoded tokens (escaped here; whitespace shown).
        pattern: ``pattern[h, q, k]``, head ``h``'s weight on key ``k`` at query ``q``.
        names: One name per head (e.g. ``"L1H3"``).

    Returns:
        An HTML fragment: one table per head; each cell's tooltip names its query and key tokens and the weight.

    Raises:
        ValueError: if the pattern is not ``[head, len(tokens), len(tokens)]`` or ``names`` has another length.
    """
    n = len(tokens)
    if pattern.ndim != 3 or tuple(pattern.shape[1:]) != (n, n) or len(names) != len(pattern):
        raise ValueError(f"pattern of shape {tuple(pattern.shape)} with {len(names)} names for {n} tokens; "
                         f"expected [head, {n}, {n}] and one name per head.")
    shown = [html.escape(visible(token)) for token in tokens]
    keys = "".join(f'<th style="{_KEY}">{token}</th>' for token in shown)
    heads = []
    for name, weights in zip(names, pattern.tolist()):
        rows = []
        for q, row in enumerate(weights):
            cells = "".join(
                f'<td style="{_CELL};background-color:{_colour(w, 1.0, False)}" '
                f'title="{html.escape(name)} {q}:{shown[q]} \u2192 {k}:{shown[k]}: {w:.4f}"></td>'
                for k, w in enumerate(row)
            )
            rows.append(f'<tr><th style="font-family:monospace;white-space:pre;font-weight:normal">{q} {shown[q]}</th>{cells}</tr>')
        caption = f"<caption>{html.escape(name)}</caption>"
        heads.append(f'<table style="display:inline-table;border-collapse:collapse;margin:0 1em 1em 0">{caption}'
                     f"<tr><th></th>{keys}</tr>{''.join(rows)}</table>")
    explain = "<div>Rows: query (destination) tokens; columns: key (source) tokens; hover for weights.</div>"
    return _frame(html.escape(title), explain, "<div>" + "".join(heads) + "</div>")
