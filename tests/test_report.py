"""The HTML report: structure, self-containment, the numbers it shows, and (with Chromium) rendering."""

import base64
import itertools
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
import transformers

pytest.importorskip("matplotlib")

from conftest import PROMPT

import tl_linmap
from tl_linmap.__main__ import main
from tl_linmap.app.report import default_layers, report_html
from tl_linmap.load.toy import toy_tokenizer


class Page(HTMLParser):
    """Collects sections, images, every external reference, and each table with the legend after it."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.external = [], [], []
        self.tables = []  # per table: {"head": [th texts], "body": [[td texts] per row], "legend": [dt texts]}
        self._cell = self._legend = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "table":
            self.tables.append({"head": [], "body": [], "legend": []})
        if tag == "tr" and self.tables:
            self.tables[-1]["body"].append([])
        if tag in ("th", "td"):
            self._cell = [tag, ""]
        if tag == "dl" and "legend" in attrs.get("class", ""):
            self._legend = self.tables[-1]["legend"]
        if tag == "dt" and self._legend is not None:
            self._cell = ["dt", ""]
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag in ("th", "td", "dt") and self._cell is not None:
            kind, text = self._cell
            table = self.tables[-1]
            {"th": table["head"], "td": table["body"][-1] if table["body"] else [], "dt": self._legend}[kind].append(text.strip())
            self._cell = None
        if tag == "dl":
            self._legend = None


def _parse(page):
    parsed = Page()
    parsed.feed(page)
    for table in parsed.tables:
        table["body"] = [row for row in table["body"] if row]  # header rows hold th cells only
    return parsed


@pytest.fixture(scope="module")
def page(toy_models):
    return report_html(toy_models["llama"], PROMPT, layers=[0, 1], k=2, top=4)


def test_report_has_every_section_and_is_self_contained(page):
    parsed = _parse(page)
    assert parsed.sections == ["reconstruction", "contributions", "spectra", "decoded"]
    assert parsed.external == []  # nothing is fetched
    assert len(parsed.images) == 5 and all(src.startswith("data:image/png;base64,") for src in parsed.images)
    for src in parsed.images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # predictions, tokens, ranks with and without the first token (one table), two of decoded pairs
    assert len(parsed.tables) == 5


def test_every_column_shown_is_explained_and_none_is_empty(page):
    parsed = _parse(page)
    for table in parsed.tables:
        assert table["legend"], f"table {table['head']} has no legend"
        assert set(table["head"]) <= set(table["legend"]), f"unexplained: {set(table['head']) - set(table['legend'])}"
        for column in zip(*table["body"]):
            assert any(cell not in ("", "-") for cell in column), f"an empty column in {table['head']}"
    decoded_token, decoded_stacked = parsed.tables[-2:]
    assert "block_share" not in decoded_token["head"]  # None for one token's operator
    assert "block_share" in decoded_stacked["head"] and "block_share" in decoded_stacked["legend"]


def test_ranks_with_and_without_the_first_token_sit_side_by_side(page, toy_models):
    maps = tl_linmap.layer_maps(toy_models["llama"], PROMPT, layers=[0, 1])
    ranks = _parse(page).tables[2]
    assert ranks["head"][:6] == ["map", "‖J‖_F", "stable rank", "effective rank", "rank90", "rank99"]
    assert ranks["head"][6:] == ["with first", "without first"] * 5
    names = [name for name in maps if name.endswith("resid_post")]
    assert [row[0] for row in ranks["body"]] == names
    for row, name in zip(ranks["body"], names):
        operators = maps[name].operators
        for stacked, norm_cell, rank90_cell in ((operators, row[1], row[7]), (operators[1:], row[2], row[8])):
            values = torch.linalg.svdvals(torch.cat(list(stacked), dim=1))  # [J_0 ... J_n] side by side
            energy = values.pow(2).cumsum(0) / values.pow(2).sum()
            assert float(norm_cell) == pytest.approx(float(values.norm()), rel=1e-3)
            assert int(rank90_cell) == int((energy < 0.9).sum()) + 1


def test_report_shows_the_measured_error_and_every_token(page, toy_models):
    lm = tl_linmap.linear_map(toy_models["llama"], PROMPT)
    shown = float(re.search(r"relative error <b>(\S+)</b>", page).group(1))
    assert shown == pytest.approx(lm.relative_error(), rel=0.01) and shown < 1e-12
    assert 'class="ok">exact' in page
    contributions = page[page.index('id="contributions"') : page.index('id="spectra"')]
    assert contributions.count("<tr>") == 1 + len(lm.tokens)  # header + one row per token


@pytest.mark.parametrize("count", [2, 3, 6, 10])
@pytest.mark.parametrize("n_layers", [1, 2, 5, 12, 30, 31])
def test_default_layers_are_spread_and_include_both_ends(n_layers, count):
    layers = default_layers(n_layers, count)
    assert layers == sorted(set(layers)) and all(0 <= layer < n_layers for layer in layers)
    assert layers[0] == 0 and layers[-1] == n_layers - 1
    assert len(layers) == min(count, n_layers)  # as many as asked, or every layer
    gaps = [b - a for a, b in itertools.pairwise(layers)]
    assert not gaps or max(gaps) - min(gaps) <= 1  # evenly spread


def test_cli_writes_the_report(tmp_path, capsys):
    tokenizer = toy_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, architectures=["LlamaForCausalLM"],
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "report.html"
    main(["report", "Hello there", "--model", str(tmp_path / "model"), "-o", str(out), "--layers", "0,1"])
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_text().startswith("<!DOCTYPE html>") and 'id="decoded"' in out.read_text()


def _chromium(*args, timeout=120):
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", *args],
                          check=True, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium on this machine")
def test_report_renders_in_headless_chromium(page, tmp_path):
    import matplotlib.image

    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,4000", path.as_uri())
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (4000, 1280)
    ink = (pixels < 0.9).any(-1).mean()  # text, rules, tables and figures
    colour = (pixels.max(-1) - pixels.min(-1) > 0.3).mean()  # saturated: the figures' colour maps and bars
    assert ink > 0.05, f"a blank page: {ink:.1%} non-white"
    assert colour > 0.02, f"no figures drawn: {colour:.1%} coloured"

    # Chromium's own parse of the page: every section with its heading, every figure decoded.
    dom = _chromium("--dump-dom", path.as_uri()).stdout
    for anchor, heading in [("reconstruction", "Reconstruction check"), ("contributions", "Per-token contributions"),
                            ("spectra", "Singular value spectra across layers"),
                            ("decoded", "Decoded singular vectors across layers")]:
        assert re.search(rf'<section id="{anchor}"><h2>{heading}</h2>', dom), anchor
    assert dom.count("<img ") == 5 and dom.count("<table") == 5
