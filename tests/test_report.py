"""The HTML report: structure, self-containment, the numbers it shows, and (with Chromium) rendering."""

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import transformers

pytest.importorskip("matplotlib")

from conftest import PROMPT

import tl_linmap
from tl_linmap.__main__ import main
from tl_linmap.report import default_layers, report_html
from tl_linmap.toy import toy_tokenizer


class Page(HTMLParser):
    """Collects sections, images, tables and every external reference."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.external, self.tables = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "table":
            self.tables += 1
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])


@pytest.fixture(scope="module")
def page(toy_models):
    return report_html(toy_models["llama"], PROMPT, layers=[0, 1], k=2, top=4)


def test_report_has_every_section_and_is_self_contained(page):
    parsed = Page()
    parsed.feed(page)
    assert parsed.sections == ["reconstruction", "contributions", "spectra", "decoded"]
    assert parsed.external == []  # nothing is fetched
    assert len(parsed.images) == 5 and all(src.startswith("data:image/png;base64,") for src in parsed.images)
    for src in parsed.images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert parsed.tables == 6


def test_report_shows_the_measured_error_and_every_token(page, toy_models):
    lm = tl_linmap.linear_map(toy_models["llama"], PROMPT)
    shown = float(re.search(r"relative error <b>(\S+)</b>", page).group(1))
    assert shown == pytest.approx(lm.relative_error(), rel=0.01) and shown < 1e-12
    assert 'class="ok">exact' in page
    contributions = page[page.index('id="contributions"') : page.index('id="spectra"')]
    assert contributions.count("<tr>") == 1 + len(lm.tokens)  # header + one row per token


def test_default_layers_are_spread_and_include_both_ends():
    assert default_layers(30) == [0, 6, 12, 17, 23, 29]
    assert default_layers(2) == [0, 1]


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


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium on this machine")
def test_report_renders_in_headless_chromium(page, tmp_path):
    import matplotlib.image

    (tmp_path / "report.html").write_text(page)
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,2400",
         (tmp_path / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1200)
    assert pixels.std() > 0.05  # text and figures, not a blank page
