"""Table: a list of dataclass rows that prints as aligned columns and converts to pandas."""

from __future__ import annotations

import dataclasses
import html


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], tuple):
        return "  ".join(f"{token!r} {score:.2f}" for token, score in value)  # (token, score) pairs
    if value is None:
        return "-"
    return str(value)


class Table(list):
    """Rows (dataclass instances of one type) shown as a table; pandas is optional.

    ``str(table)`` and the notebook display align the columns; `to_pandas` gives a
    ``DataFrame`` with one column per field.
    """

    def columns(self) -> list[str]:
        """The field names of the rows.

        Returns:
            Column names, in field order (empty for an empty table).
        """
        return [f.name for f in dataclasses.fields(self[0])] if self else []

    def records(self) -> list[dict]:
        """The rows as plain dicts.

        Returns:
            One dict per row.
        """
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

    def __str__(self) -> str:
        if not self:
            return "(empty table)"
        rows = [self.columns()] + [[_cell(getattr(row, c)) for c in self.columns()] for row in self]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns())
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_cell(getattr(row, c)))}</td>" for c in self.columns()) + "</tr>" for row in self
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
