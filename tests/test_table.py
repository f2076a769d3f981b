"""Tables of result rows: plain text, HTML, records, pandas."""

import re
import sys
from dataclasses import dataclass
from html.parser import HTMLParser

import pytest
from conftest import PROMPT

import tl_linmap
from tl_linmap.base.errors import InputError
from tl_linmap.base.table import CELL_WIDTH, LIST_WIDTH, Table, table_row


@dataclass
class Row:
    name: str
    value: float
    tokens: list


def table():
    return Table([Row("a", 1.23456789, [(" Paris", 0.5)]), Row("long name", 2.0, [])])


class Cells(HTMLParser):
    """Rows of an HTML table as (text, class) per cell, and the text of its <style>."""

    def __init__(self):
        super().__init__()
        self.rows, self.style, self._cell, self._in_style = [], "", None, False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = ["", dict(attrs).get("class")]
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(tuple(self._cell))
            self._cell = None
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data
        elif self._cell is not None:
            self._cell[0] += data


def parse(page: str) -> Cells:
    cells = Cells()
    cells.feed(page)
    return cells


def right_aligned_classes(style: str) -> set[str]:
    # Class names whose CSS rule sets text-align: right.
    return {name for selector, body in re.findall(r"([^{}]+)\{([^}]*)\}", style) if "text-align: right" in body
            for name in re.findall(r"\.([\w-]+)", selector)}


def test_str_separates_columns_and_right_aligns_numbers():
    lines = str(table()).splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == ["name", "value", "tokens"]
    assert set(lines[1]) <= {"-", "+"}  # the rule under the header
    assert lines[2].split(" | ") == ["a        ", "1.235", "' Paris' 0.50"]
    value_end = lines[0].index("value") + len("value")
    assert lines[2].index("1.235") + len("1.235") == value_end and lines[3].index(" 2 ") + 2 == value_end
    assert str(Table()) == "(empty table)"


def test_token_strings_are_quoted_so_whitespace_shows_and_rows_stay_on_one_line():
    @dataclass
    class TokenRow:
        position: int
        token: str

    rows = Table([TokenRow(0, "<bos>"), TokenRow(1, " the"), TokenRow(2, "\n")])
    lines = str(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert [line.split(" | ")[1].rstrip() for line in lines[2:]] == ["'<bos>'", "' the'", "'\\n'"]


def test_long_token_lists_are_cut_at_a_token_and_kept_whole_in_records():
    pairs = [(f" tok{i}", i / 10) for i in range(20)]
    rows = Table([Row("x", 1.0, pairs)])
    cell = str(rows).splitlines()[2].split(" | ")[2]
    assert len(cell) <= LIST_WIDTH
    shown = re.findall(r"'( tok\d+)' \d\.\d\d", cell)
    assert shown == [t for t, _ in pairs[: len(shown)]] and len(shown) >= 2
    assert cell.endswith(f"+{len(pairs) - len(shown)} more")
    assert rows.records()[0]["tokens"] == pairs
    assert len(re.findall(r"' tok\d+'", rows.to_string(cell_width=None))) == len(pairs)


def test_long_text_is_cut_to_the_cell_width():
    rows = Table([Row("n" * 100, 1.0, [])])
    cell = str(rows).splitlines()[2].split(" | ")[0]
    assert cell.endswith("...") and len(cell) == CELL_WIDTH


@dataclass
class Continuation:
    alpha: float
    first: str
    text: str


def test_the_last_columns_text_is_never_cut():
    # Nothing follows the last column, so a steered continuation prints whole (alpha_sweep's text).
    text = "a sentence of about a hundred characters, longer than any cell may be, and it goes on and on."
    line = str(Table([Continuation(0.1, text, text)])).splitlines()[2]
    first, last = line.split(" | ")[1:]
    assert len(first.strip()) == CELL_WIDTH and first.strip().endswith("...")
    assert last == repr(text) or last == text


def test_records_and_html():
    assert table().records()[0] == {"name": "a", "value": 1.23456789, "tokens": [(" Paris", 0.5)]}
    page = table()._repr_html_()
    assert page.count("<tr>") == 3
    cells = parse(page)
    assert [c[0] for c in cells.rows[0]] == ["name", "value", "tokens"]
    assert cells.rows[1][2][0] == "\u2423Paris 0.50"  # the leading space is drawn
    numbers = [row[1] for row in cells.rows]
    assert all(cls in right_aligned_classes(cells.style) for _, cls in numbers)
    assert cells.rows[1][0][1] not in right_aligned_classes(cells.style)


def test_html_escapes_every_token():
    rows = Table([Row("<b>&", 1.0, [("<i>", 0.1), (" &amp;", 0.2)])])
    page = rows._repr_html_()
    assert "<b>" not in page and "<i>" not in page
    cells = parse(page)
    assert cells.rows[1][0][0] == "<b>&"
    assert cells.rows[1][2][0] == "<i> 0.10\u2423&amp; 0.20"


@pytest.fixture(scope="module")
def decoded(toy_models):
    lm = tl_linmap.linear_map(toy_models["llama"], PROMPT)
    return lm.decode(k=2, top=10, stacked=True)


def test_decoded_pairs_print_in_bounded_rows_with_left_and_right_apart(decoded):
    columns = decoded.columns()
    lines = str(decoded).splitlines()
    assert len(lines) == len(decoded) + 2
    whole = 0
    for line, row in zip(lines[2:], decoded):
        cells = line.split(" | ")
        assert len(cells) == len(columns)
        for name, cell in zip(columns, cells):
            assert len(cell.strip()) <= (LIST_WIDTH if name in ("left", "right") else CELL_WIDTH)
        for side in ("left", "right"):
            cell, pairs = cells[columns.index(side)].strip(), getattr(row, side)
            assert len(pairs) == 10 and cell.startswith(repr(pairs[0][0]))
            full = ", ".join(f"{t!r} {v:.2f}" for t, v in pairs)
            if len(full) <= LIST_WIDTH:  # top=10 shows the ten tokens asked for
                assert cell == full
                whole += 1
    assert whole >= len(decoded)  # at least half the lists fit whole


def test_decoded_pairs_html_show_every_token_and_align_numbers(decoded):
    cells = parse(decoded._repr_html_())
    columns = [c[0] for c in cells.rows[0]]
    right = right_aligned_classes(cells.style)
    for row, cells_of_row in zip(decoded, cells.rows[1:]):
        assert cells_of_row[columns.index("left")][0].count(" ") == len(row.left)  # token, space, score per item
        for name in ("sigma", "share", "index"):
            text, cls = cells_of_row[columns.index(name)]
            assert cls in right and float(text) == pytest.approx(getattr(row, name), rel=1e-3)


def test_to_pandas_when_installed():
    pandas = pytest.importorskip("pandas")
    frame = table().to_pandas()
    assert isinstance(frame, pandas.DataFrame) and list(frame.columns) == ["name", "value", "tokens"] and len(frame) == 2


def test_to_pandas_without_pandas_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install pandas"):
        table().to_pandas()


@table_row
@dataclass
class Shown:
    token: str
    score: float
    count: int
    tops: list
    cell: tuple
    note: str | None = None


def test_a_table_row_prints_as_one_line_of_its_cells():
    row = Shown(" Paris", 1.23456789, 3, [(" x", 0.5)] * 20, (1, 2))
    text = repr(row)
    assert "\n" not in text and len(text) < LIST_WIDTH + 80  # the other fields take about 70
    assert text.startswith("Shown(token=' Paris', score=1.235, count=3, tops=[' x' 0.50, ")
    assert text.endswith(" more], cell=[1, 2], note=None)")
    assert repr(Shown("a", 0.0, 0, [], ())) == "Shown(token='a', score=0, count=0, tops=[], cell=[], note=None)"
    page = parse(row._repr_html_())
    assert [text for text, _ in page.rows[0]] == ["token", "score", "count", "tops", "cell", "note"]
    assert page.rows[1][1] == ("1.235", "num") and len(page.rows) == 2  # one row, as its table shows it
    assert row._repr_html_() == Table([row])._repr_html_()


def test_table_row_takes_only_a_dataclass():
    with pytest.raises(InputError, match="above @dataclass"):
        table_row(Cells)
