"""The tutorials run top to bottom on the bundled SmolLM2 and write their figures (slow: real model)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).parent.parent / "tutorials"
FIGURES = {
    "01_quickstart.py": ["01_paris_logit.png", "01_paris_logit_without_first.png"],
    "02_low_rank_and_decoding.py": [
        "02_spectra_last_token.png", "02_spectra_first_token.png", "02_contribution_heatmap.png",
        "02_contribution_heatmap_without_first.png", "02_decoded_last_token.png", "02_decoded_stacked.png",
    ],
    "03_attention_mlp_heads.py": ["03_attention_vs_mlp.png", "03_heatmap_attn_out.png", "03_heatmap_mlp_out.png"],
    "04_steering.py": ["04_steering_shift.png"],
}


def test_every_tutorial_is_listed():
    assert sorted(p.name for p in TUTORIALS.glob("[0-9]*.py")) == sorted(FIGURES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_tutorial_runs_and_writes_its_figures(name, tmp_path):
    figures = Path(os.environ.get("TL_LINMAP_TUTORIAL_FIGURES", tmp_path))  # CI keeps them
    env = dict(os.environ, TL_LINMAP_FIGURES=str(figures), MPLBACKEND="Agg", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, str(TUTORIALS / name)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stderr[-3000:]
    for figure in FIGURES[name]:
        assert (figures / figure).stat().st_size > 5000, figure  # a drawn PNG, not an empty file
