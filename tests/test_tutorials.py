"""The tutorials: jupytext pairs (``NN_name.py`` and ``NN_name.ipynb``) that run top to bottom on the bundled
SmolLM2 in a Jupyter kernel, write and show their figures, and render on the docs site (slow: real model).

The slow tests execute each notebook once with nbclient and keep it, outputs included, as
``docs/tutorials/<stem>.ipynb`` for the docs site; the last one builds the site with ``scripts/docs.sh``
and looks at every rendered tutorial in headless Chromium.
"""

import base64
import html
import io
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tl_linmap
from browser import render, serve

ROOT = Path(__file__).parent.parent
TUTORIALS = ROOT / "tutorials"
EXECUTED = ROOT / "docs" / "tutorials"  # the executed notebooks, outputs kept, that the docs site renders
FIGURES = {
    "01_quickstart": ["01_paris_logit.png", "01_paris_logit_without_first.png"],
    "02_low_rank_and_decoding": [
        "02_spectra_last_token.png", "02_spectra_first_token.png", "02_contribution_heatmap.png",
        "02_contribution_heatmap_without_first.png", "02_decoded_last_token.png", "02_decoded_stacked.png",
    ],
    "03_attention_mlp_heads": ["03_attention_vs_mlp.png", "03_heatmap_attn_out.png", "03_heatmap_mlp_out.png"],
    "04_steering": ["04_steering_shift.png"],
    "05_patching": ["05_resid_pre.png", "05_heads.png", "05_predicted_vs_true.png"],
    "06_readouts_and_sequences": ["06_logit_diff_split.png", "06_sequence_heatmap.png", "06_generation_heatmap.png", "06_pushed_forward.png"],
    "07_many_prompts": ["07_corpus_dimensionality.png", "07_corpus_concepts.png", "07_corpus_attribution.png"],
    "08_features": ["08_feature_contributions.png", "08_feature_steering.png"],
    "09_graphs": ["09_graph.html", "09_graph_influence.png"],
}
# Cells that end with a result object, which a notebook shows as tl_linmap's HTML display.
HTML_DISPLAYS = {"01_quickstart": 2, "03_attention_mlp_heads": 1, "09_graphs": 1}
OVERRIDE = "TL_LINMAP_FIGURES"  # the one variable that sends a tutorial's figures elsewhere
KERNEL = "python3"
# Runs in the kernel before the notebook: a deprecated tl_linmap name called by the tutorial itself is an
# error (third-party ones are not). It must come after IPython's own filter, which shows them.
STRICT_DEPRECATIONS = "import warnings; warnings.filterwarnings('error', category=DeprecationWarning, module='__main__')"


def _pngs(stem: str) -> list[str]:
    return [name for name in FIGURES[stem] if name.endswith(".png")]


def _cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_every_tutorial_is_listed_and_paired():
    assert sorted(p.stem for p in TUTORIALS.glob("[0-9]*.py")) == sorted(FIGURES)
    assert sorted(p.stem for p in TUTORIALS.glob("[0-9]*.ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("stem", sorted(FIGURES))
def test_notebook_holds_the_cells_of_its_script(stem):
    jupytext = pytest.importorskip("jupytext")
    script, notebook = jupytext.read(TUTORIALS / f"{stem}.py"), jupytext.read(TUTORIALS / f"{stem}.ipynb")
    mend = f"the pair has drifted: run `jupytext --sync tutorials/{stem}.py` (or save it in Jupyter with jupytext)"
    assert len(notebook.cells) == len(script.cells), mend
    for i, (in_script, in_notebook) in enumerate(zip(_cells(script), _cells(notebook))):
        assert in_notebook == in_script, f"cell {i}: {mend}"
    assert notebook.metadata["kernelspec"]["name"] == KERNEL
    # Committed without outputs: small diffs; the executed copies live in docs/tutorials (generated).
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"cell {i} of {stem}.ipynb has outputs: clear them"


class _ModelLoading(Exception):
    """Raised in place of loading the model: the tutorial has chosen its figure directory by then."""


def _figure_directory(monkeypatch, run) -> Path:
    # Run a tutorial up to its load_model call and return the FIGURES it chose there.
    def load_model(*args, **kwargs):
        raise _ModelLoading(sys._getframe(1).f_globals["FIGURES"])  # the tutorial's own globals

    monkeypatch.setattr(tl_linmap, "load_model", load_model)
    with pytest.raises(_ModelLoading) as loading:
        run()
    figures = Path(loading.value.args[0])
    assert figures.is_dir()
    return figures.resolve()


@pytest.mark.parametrize("stem", sorted(FIGURES))
def test_figures_go_beside_the_tutorial_wherever_it_runs_from(stem, tmp_path, monkeypatch):
    monkeypatch.delenv(OVERRIDE, raising=False)
    monkeypatch.chdir(tmp_path)
    script = lambda: runpy.run_path(str(TUTORIALS / f"{stem}.py"), run_name="__main__")  # noqa: E731
    assert _figure_directory(monkeypatch, script) == (TUTORIALS / "figures").resolve()

    monkeypatch.setenv(OVERRIDE, str(tmp_path / "elsewhere"))
    assert _figure_directory(monkeypatch, script) == (tmp_path / "elsewhere").resolve()


@pytest.mark.parametrize("stem", sorted(FIGURES))
def test_figures_go_beside_the_notebook(stem, tmp_path, monkeypatch):
    # The .ipynb's own code cells, as a kernel runs them: no __file__, in the notebook's directory.
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.delenv(OVERRIDE, raising=False)
    notebook_dir = tmp_path / "notebooks"
    notebook_dir.mkdir()
    monkeypatch.chdir(notebook_dir)
    notebook = nbformat.read(TUTORIALS / f"{stem}.ipynb", as_version=4)
    code = compile("\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code"), "<notebook>", "exec")
    cells = lambda: exec(code, {"__name__": "__main__"})  # noqa: E731
    assert _figure_directory(monkeypatch, cells) == (notebook_dir / "figures").resolve()


def _outputs(notebook, mime: str) -> list:
    return [output.data[mime] for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if mime in output.get("data", {})]


def _drawn(png: bytes, top: int = 0) -> bool:
    # Not one flat colour: at least 1% of the pixels (below the first `top` rows) differ from the commonest.
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.crop((0, top, image.width, image.height))
    most = max(image.getcolors(image.width * image.height))[0]
    return most < 0.99 * image.width * image.height


def _kernel_python() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    command = KernelSpecManager().get_kernel_spec(KERNEL).argv[0]
    # As jupyter_client starts it: a bare python, python3 or python3.X is the running interpreter.
    if command in {"python", "python%i" % sys.version_info[0], "python%i.%i" % sys.version_info[:2]}:
        return sys.executable
    return os.path.abspath(command)


@pytest.mark.slow
@pytest.mark.parametrize("stem", sorted(FIGURES))
def test_notebook_runs_in_a_kernel_and_shows_its_figures(stem, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    executed = EXECUTED / f"{stem}.ipynb"
    executed.unlink(missing_ok=True)  # a failed run leaves none: the docs then show the unexecuted pair
    figures = Path(os.environ.get(OVERRIDE, tmp_path))  # CI sets it to keep the figures
    env = dict(os.environ, **{OVERRIDE: str(figures)}, HF_HUB_OFFLINE="1")
    env.pop("MPLBACKEND", None)  # the kernel's own (inline) backend shows the figures as image outputs
    assert _kernel_python() == sys.executable, \
        f"the {KERNEL} kernel would run {_kernel_python()}, not this Python: `python -m ipykernel install --user`"
    notebook = nbformat.read(TUTORIALS / f"{stem}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name=KERNEL, timeout=1800, resources={"metadata": {"path": str(tmp_path)}},
        coalesce_streams=True,  # one output per stream and cell, progress bars at their last state
        extra_arguments=[f"--IPKernelApp.exec_lines={STRICT_DEPRECATIONS}"],
    )
    start, before = time.time(), os.times()
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, on any error
    after = os.times()  # children's times: the kernel's, once it has exited
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    print(f"{stem}: {time.time() - start:.0f} s, {cpu:.0f} CPU-s in the kernel")

    for figure in FIGURES[stem]:
        written = (figures / figure).stat()
        assert written.st_size > 5000, figure  # a drawn PNG, not an empty file
        assert written.st_mtime >= start - 1, figure  # by this run, not left over from an earlier one
    shown = _outputs(notebook, "image/png")
    assert len(shown) >= len(_pngs(stem)), f"{len(shown)} figures shown in the notebook, {len(_pngs(stem))} saved"
    assert all(_drawn(base64.b64decode(png)) for png in shown)
    assert len(_outputs(notebook, "text/html")) >= HTML_DISPLAYS.get(stem, 0)

    del notebook.metadata["jupytext"]  # the executed copy is no pair of the .py
    EXECUTED.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, executed)


# Served beside the site: opens a tutorial's page in a frame the size of the window and reports, once
# the page has loaded, its text, and every image with the size the browser decoded it at.
REPORTER = """<!doctype html><html><body style="margin:0">
<iframe id="page" src="{page}" style="border:0;width:100vw;height:100vh;display:block"></iframe>
<pre id="report"></pre>
<script>
document.getElementById("page").addEventListener("load", async (event) => {{
  const page = event.target.contentDocument;
  const images = [...page.images];
  await Promise.all(images.map((image) => image.decode().catch(() => null)));
  document.getElementById("report").textContent = JSON.stringify({{
    text: page.body.innerText,
    images: images.map((image) => ({{inline: image.src.startsWith("data:image/"), width: image.naturalWidth}})),
  }});
}});
</script></body></html>"""


def _heading(stem: str) -> str:
    # The tutorial's title: the first markdown cell's "# ..." line.
    jupytext = pytest.importorskip("jupytext")
    first = next(cell for cell in jupytext.read(TUTORIALS / f"{stem}.py").cells if cell.cell_type == "markdown")
    return first.source.splitlines()[0].removeprefix("# ")


@pytest.mark.slow
def test_rendered_tutorials_are_not_blank_and_show_their_figures(tmp_path):
    # After the notebooks ran above (pytest keeps the file's order): builds the site and looks at each page.
    nbformat = pytest.importorskip("nbformat")
    for stem in FIGURES:  # scripts/docs.sh would fill a missing one, without outputs
        notebook = EXECUTED / f"{stem}.ipynb"
        assert notebook.exists() and _outputs(nbformat.read(notebook, as_version=4), "text/plain"), \
            f"{notebook} is not an executed notebook: test_notebook_runs_in_a_kernel_and_shows_its_figures writes " \
            "it (run the two together, or that one first)"
    site = tmp_path / "site"
    build = subprocess.run(["bash", str(ROOT / "scripts" / "docs.sh"), str(site)], cwd=ROOT, capture_output=True,
                           text=True, timeout=1200, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]

    reporters = tmp_path / "reporters"
    reporters.mkdir()
    with serve(site, mounts={"/_reporters/": reporters}) as url:
        for stem in FIGURES:
            page = next((site / "tutorials" / p for p in (f"{stem}/index.html", f"{stem}.html")
                         if (site / "tutorials" / p).exists()), None)
            assert page is not None, f"no rendered page for {stem} under {site / 'tutorials'}"
            (reporters / f"{stem}.html").write_text(REPORTER.format(page="/" + page.relative_to(site).as_posix()))
            shot = tmp_path / f"{stem}.png"
            for budget_ms in (30000, 120000):  # a page on a loaded host once missed the first budget (seen here, not in CI)
                dom = render(f"{url}_reporters/{stem}.html", png=shot, budget_ms=budget_ms, window=(1280, 1600))
                report = json.loads(html.unescape(dom.split('<pre id="report">', 1)[1].split("</pre>", 1)[0]) or "null")
                if report is not None:
                    break
            assert report is not None, f"{stem}: the page never finished loading in Chromium"
            assert _heading(stem) in report["text"], f"{stem}: its title is not on the page"
            figures = [image for image in report["images"] if image["inline"] and image["width"] > 0]
            assert len(figures) >= len(_pngs(stem)), f"{stem}: {len(figures)} figures on the page, {len(_pngs(stem))} made"
            # Below the site's coloured header bar, which a page with nothing on it has too.
            assert _drawn(shot.read_bytes(), top=120), f"{stem}: the rendered page is blank"
