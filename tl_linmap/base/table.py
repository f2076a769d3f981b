"""Table: a list of dataclass rows that prints as a readable table and converts to pandas.

Plain text separates columns with ``" | "``, right-aligns numbers, quotes token strings
(``repr``) so their spaces show, and cuts long cells at a token boundary; the notebook view
is a small self-contained HTML table. The full values stay in `Table.records`.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Iterable

from tl_linmap.base.errors import InputError

#: Column separator of the plain-text view.
SEPARATOR = " | "


#: Widest text cell of the plain-text view, in characters (the last column's text is never cut: nothing
#: follows it); `Table.to_string` takes another.
CELL_WIDTH = 40

#: Widest list cell (tokens and their scores) of the plain-text view: room for the ten tokens a
#: ``top=10`` asks for, so a decode table shows what was asked rather than two and "+8 more".
LIST_WIDTH = 160


# Whitespace shown as a glyph, so that token boundaries survive in HTML.
_MARKS = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


#: Stylesheet of the HTML tables (and of `tl_linmap.present.display`), scoped to ``tl-linmap`` classes;
#: explicit alignments because notebook front ends right-align every cell by default.
STYLE = """
.tl-linmap-table { border-collapse: collapse; font-size: .85em; margin: .4em 0; }
.tl-linmap-table th, .tl-linmap-table td {
  border: 1px solid #ccc; padding: .15em .45em; text-align: left; vertical-align: top;
}
.tl-linmap-table th { font-weight: 600; }
.tl-linmap-table .num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.tl-linmap-table td.list { min-width: 12em; max-width: 32em; }
.tl-linmap-item { display: inline-block; margin: 0 .5em .1em 0; white-space: nowrap; }
.tl-linmap-tok { font-family: monospace; white-space: pre; border: 1px solid #bbb; border-radius: 3px; padding: 0 .15em; }
.tl-linmap-score { opacity: .7; font-size: .9em; }
""".strip()


#: The attribute of a right-aligned (numeric) cell; `STYLE` aligns it.
NUM_CELL = ' class="num"'


def visible(token: str) -> str:
    """A token with its whitespace and control characters drawn as visible glyphs.

    Args:
        token: A decoded token.

    Returns:
        The token with spaces as ``␣``, newlines as ``↵``, tabs as ``⇥`` and other
        non-printable characters as their Python escapes (``\\x04``); not HTML-escaped.
    """
    return "".join(_MARKS.get(c) or (c if c.isprintable() else repr(c)[1:-1]) for c in token)


def token_span(token: str) -> str:
    """One token as an escaped HTML span, its whitespace visible and its exact text in the tooltip.

    Args:
        token: A decoded token.

    Returns:
        ``<span class="tl-linmap-tok" title="repr">visible text</span>``.
    """
    return f'<span class="tl-linmap-tok" title="{html.escape(repr(token))}">{html.escape(visible(token))}</span>'


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_pairs(value) -> bool:
    # (token, score) lists: decoded singular vectors, nearest tokens.
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(p, tuple) and len(p) == 2 for p in value)


def _needs_quotes(text: str) -> bool:
    # Without quotes, edge whitespace and control characters vanish or break the row.
    return text == "" or not text.isprintable() or text != text.strip()


def number_text(value) -> str:
    """A number as a table shows it (floats to 4 significant digits).

    Args:
        value: A number (or anything else, shown as ``str``).

    Returns:
        The text.
    """
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _scalar(value, quoted: bool) -> str:
    if value is None:
        return "-"
    if _is_number(value):
        return number_text(value)
    if isinstance(value, str):
        return repr(value) if quoted else value
    text = str(value)
    return text if text.isprintable() else repr(text)[1:-1]  # one line, whatever the object prints


def _join(items: list[str], width: int | None) -> str:
    # Whole items only: a cut token would read as a different token.
    text = ", ".join(items)
    if width is None or len(text) <= width:
        return text
    for kept in range(len(items) - 1, 0, -1):
        text = ", ".join(items[:kept]) + f", +{len(items) - kept} more"
        if len(text) <= width:
            return text
    return f"{len(items)} items"


def _text_cell(value, quoted: bool, width: int | None, list_width: int | None) -> str:
    if _is_pairs(value):
        return _join([f"{token!r} {score:.2f}" for token, score in value], list_width)
    if isinstance(value, (list, tuple)):
        return _join([repr(v) if isinstance(v, str) else _scalar(v, False) for v in value], list_width) if value else "-"
    text = _scalar(value, quoted)
    return text if width is None or len(text) <= width else text[: width - 3] + "..."


def _html_cell(value, quoted: bool, numeric: bool) -> str:
    if numeric and not isinstance(value, (list, tuple)):
        return f"<td{NUM_CELL}>{html.escape(_scalar(value, False))}</td>"
    if _is_pairs(value):
        items = (
            f'<span class="tl-linmap-item">{token_span(token)} <span class="tl-linmap-score">{score:.2f}</span></span>'
            for token, score in value
        )
        return f'<td class="list">{"".join(items)}</td>'
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return f'<td class="list">{"".join(token_span(v) for v in value)}</td>'
    if isinstance(value, str) and quoted:
        return f"<td>{token_span(value)}</td>"
    return f"<td>{html.escape(_text_cell(value, False, None, None))}</td>"


class Table(list):
    """Rows (dataclass instances of one type) shown as a table; pandas is optional.

    ``str(table)`` gives aligned plain text (`to_string` with another cell width), the
    notebook shows an HTML table, `records` gives the full values and `to_pandas` a
    ``DataFrame`` with one column per field.
    """

    def __init__(self, rows: Iterable = ()) -> None:
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
            raise InputError(f"A Table is built from an iterable of dataclass rows, got {type(rows).__name__}.")
        super().__init__(rows)

    def columns(self) -> list[str]:
        """The field names of the rows.

        Returns:
            Column names, in field order (empty for an empty table).

        Raises:
            InputError: if the rows are not dataclass instances of one type.
        """
        if not self:
            return []
        kinds = {type(row) for row in self}
        if len(kinds) > 1 or not dataclasses.is_dataclass(self[0]) or isinstance(self[0], type):
            raise InputError(
                f"A Table's rows must be dataclass instances of one type, got {', '.join(sorted(k.__name__ for k in kinds))}."
            )
        return [f.name for f in dataclasses.fields(self[0])]

    def records(self) -> list[dict]:
        """The rows as plain dicts.

        Returns:
            One dict per row.
        """
        self.columns()  # the rows are checked there
        return [dataclasses.asdict(row) for row in self]

    def to_pandas(self):
        """The table as a pandas ``DataFrame``.

        Returns:
            One row per entry, one column per field.

        Raises:
            ImportError: if pandas is not installed (it is not a dependency).
        """
        try:
            import pandas
        except ImportError as error:
            raise ImportError("Table.to_pandas needs pandas: pip install pandas (or use str(table), table.records()).") from error
        return pandas.DataFrame(self.records(), columns=self.columns())

    def _column_kinds(self) -> tuple[list[bool], list[bool]]:
        # Per column: numeric (right-aligned) and quoted (its strings are tokens).
        numeric, quoted = [], []
        for name in self.columns():
            values = [getattr(row, name) for row in self]
            numeric.append(any(_is_number(v) for v in values) and not any(isinstance(v, (list, tuple)) for v in values))
            quoted.append(any(isinstance(v, str) and _needs_quotes(v) for v in values))
        return numeric, quoted

    def to_string(self, cell_width: int | None = CELL_WIDTH, list_width: int | None = LIST_WIDTH) -> str:
        """The table as plain text: ``" | "`` between columns, numbers right-aligned.

        Args:
            cell_width: Longest text cell in characters, except in the last column, which is
                never cut; longer text ends in ``...`` (None: nothing is cut, lists neither).
            list_width: Longest list cell (tokens and scores) in characters; a longer list keeps
                its first whole tokens and says how many more there are.

        Returns:
            A header, a rule and one line per row.
        """
        if not self:
            return "(empty table)"
        numeric, quoted = self._column_kinds()
        columns = self.columns()
        list_width = None if cell_width is None else list_width
        widths = [cell_width] * (len(columns) - 1) + [None]
        rows = [columns] + [
            [_text_cell(getattr(row, c), q, w, list_width) for c, q, w in zip(columns, quoted, widths)] for row in self
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(numeric))]
        lines = [
            SEPARATOR.join(cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(r, widths, numeric)).rstrip() for r in rows
        ]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        if not self:
            return "<p>(empty table)</p>"
        numeric, quoted = self._column_kinds()
        columns = self.columns()
        head = "".join(f"<th{NUM_CELL if num else ''}>{html.escape(c)}</th>" for c, num in zip(columns, numeric))
        body = "".join(
            "<tr>" + "".join(_html_cell(getattr(row, c), q, num) for c, q, num in zip(columns, quoted, numeric)) + "</tr>" for row in self
        )
        table = f'<table class="tl-linmap-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        return f"<style>{STYLE}</style>{table}"


def _field_text(value) -> str:
    # A field as a table cell shows it, in brackets when it is a list, so that its commas read as one field's.
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return f"[{_text_cell(value, True, CELL_WIDTH, LIST_WIDTH)}]" if value else "[]"
    return _text_cell(value, True, CELL_WIDTH, LIST_WIDTH)


def _row_repr(row) -> str:
    fields = ", ".join(f"{f.name}={_field_text(getattr(row, f.name))}" for f in dataclasses.fields(row) if f.repr)
    return f"{type(row).__name__}({fields})"


def _row_html(row) -> str:
    return Table([row])._repr_html_()


def table_row(cls: type) -> type:
    """Class decorator: a dataclass row that shows itself as its `Table` shows it.

    Put it above ``@dataclass``, which otherwise writes its own ``__repr__``. ``repr(row)``
    is one line, ``Name(field=value, ...)``, each value as a table cell prints it (numbers
    to 4 significant digits, token strings quoted, long lists cut at a token); the notebook
    view is a one-row `Table`.

    Args:
        cls: A dataclass.

    Returns:
        The same class, with ``__repr__`` and ``_repr_html_``.
    """
    if not dataclasses.is_dataclass(cls):
        raise InputError(f"table_row takes a dataclass (put it above @dataclass), got {cls.__name__}.")
    cls.__repr__ = _row_repr
    cls._repr_html_ = _row_html
    return cls
