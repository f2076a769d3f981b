"""The tutorials run top to bottom on the bundled SmolLM2 and write their figures (slow: real model)."""

import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tl_linmap

TUTORIALS = Path(__file__).parent.parent / "tutorials"
FIGURES = {
    "01_quickstart.py": ["01_paris_logit.png", "01_paris_logit_without_first.png"],
    "02_low_rank_and_decoding.py": [
        "02_spectra_last_token.png", "02_spectra_first_token.png", "02_contribution_heatmap.png",
        "02_contribution_heatmap_without_first.png", "02_decoded_last_token.png", "02_decoded_stacked.png",
    ],
    "03_attention_mlp_heads.py": ["03_attention_vs_mlp.png", "03_heatmap_attn_out.png", "03_heatmap_mlp_out.png"],
    "04_steering.py": ["04_steering_shift.png"],
    "05_patching.py": ["05_resid_pre.png", "05_heads.png", "05_predicted_vs_true.png"],
    "06_readouts_and_sequences.py": ["06_logit_diff_split.png", "06_sequence_heatmap.png", "06_generation_heatmap.png", "06_pushed_forward.png"],
    "07_many_prompts.py": ["07_corpus_dimensionality.png", "07_corpus_concepts.png", "07_corpus_attribution.png"],
    "08_features.py": ["08_feature_contributions.png", "08_feature_steering.png"],
    "09_graphs.py": ["09_graph.html", "09_graph_influence.png"],
}
OVERRIDE = "TL_LINMAP_FIGURES"  # the one variable that sends a tutorial's figures elsewhere


def test_every_tutorial_is_listed():
    assert sorted(p.name for p in TUTORIALS.glob("[0-9]*.py")) == sorted(FIGURES)


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


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figures_go_beside_the_tutorial_wherever_it_runs_from(name, tmp_path, monkeypatch):
    monkeypatch.delenv(OVERRIDE, raising=False)
    monkeypatch.chdir(tmp_path)
    script = lambda: runpy.run_path(str(TUTORIALS / name), run_name="__main__")  # noqa: E731
    assert _figure_directory(monkeypatch, script) == (TUTORIALS / "figures").resolve()

    monkeypatch.setenv(OVERRIDE, str(tmp_path / "elsewhere"))
    assert _figure_directory(monkeypatch, script) == (tmp_path / "elsewhere").resolve()


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figures_go_beside_the_notebook(name, tmp_path, monkeypatch):
    # A notebook has no __file__ and runs in its own directory.
    monkeypatch.delenv(OVERRIDE, raising=False)
    notebook_dir = tmp_path / "notebooks"
    notebook_dir.mkdir()
    monkeypatch.chdir(notebook_dir)
    code = compile((TUTORIALS / name).read_text(), "<notebook>", "exec")
    cells = lambda: exec(code, {"__name__": "__main__"})  # noqa: E731
    assert _figure_directory(monkeypatch, cells) == (notebook_dir / "figures").resolve()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_tutorial_runs_and_writes_its_figures(name, tmp_path):
    figures = Path(os.environ.get(OVERRIDE, tmp_path))  # CI sets it to keep the figures
    env = dict(os.environ, **{OVERRIDE: str(figures)}, MPLBACKEND="Agg", HF_HUB_OFFLINE="1")
    start = time.time()
    # A deprecated tl_linmap name called by the tutorial itself is an error (third-party ones are not).
    command = [sys.executable, "-W", "error::DeprecationWarning:__main__", str(TUTORIALS / name)]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stderr[-3000:]
    for figure in FIGURES[name]:
        written = (figures / figure).stat()
        assert written.st_size > 5000, figure  # a drawn PNG, not an empty file
        assert written.st_mtime >= start - 1, figure  # by this run, not left over from an earlier one
