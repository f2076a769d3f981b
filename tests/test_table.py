"""Tables of result rows: printing, records, pandas."""

import sys
from dataclasses import dataclass

import pytest

from tl_linmap.table import Table


@dataclass
class Row:
    name: str
    value: float
    tokens: list


def table():
    return Table([Row("a", 1.23456789, [(" Paris", 0.5)]), Row("long name", 2.0, [])])


def test_str_aligns_columns_and_formats_cells():
    lines = str(table()).splitlines()
    assert lines[0].split() == ["name", "value", "tokens"]
    assert lines[1].startswith("a          1.235  ' Paris' 0.50")
    assert lines[1].index("1.235") == lines[2].index("2") == lines[0].index("value")
    assert str(Table()) == "(empty table)"


def test_records_and_html():
    assert table().records()[0] == {"name": "a", "value": 1.23456789, "tokens": [(" Paris", 0.5)]}
    assert table()._repr_html_().count("<tr>") == 3


def test_to_pandas_when_installed():
    pandas = pytest.importorskip("pandas")
    frame = table().to_pandas()
    assert isinstance(frame, pandas.DataFrame) and list(frame.columns) == ["name", "value", "tokens"] and len(frame) == 2


def test_to_pandas_without_pandas_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install pandas"):
        table().to_pandas()
