"""Progress bars: every long entry point shows one by default once it has lasted `DELAY` seconds, none with progress=False."""

import pytest
import torch

import tl_linmap
from tl_linmap.base import progress as progress_module
from tl_linmap.base.errors import InputError
from tl_linmap.base.progress import progress_bar

PROMPT = "The cat sat on the mat"


def _calls(model):
    # (what the bar counts, a call with progress left at its default, the same call given progress=...)
    layers = [0]
    return {
        "detached Jacobian": lambda **kw: tl_linmap.layer_maps(model, PROMPT, layers=layers, **kw),
        "detached Jacobian rows": lambda **kw: tl_linmap.linear_maps(model, [PROMPT, "A dog"], ["output"], route="rows", **kw),
        "token contributions": lambda **kw: tl_linmap.token_contributions(model, PROMPT, **kw),
        "token contributions ": lambda **kw: tl_linmap.token_contributions(model, [PROMPT, "A dog ran"], **kw),
        "sequence contributions": lambda **kw: tl_linmap.sequence_attribution(model, PROMPT, **kw),
        "attribution graph rows": lambda **kw: tl_linmap.attribution_graph(model, PROMPT, max_logits=2, **kw),
    }


@pytest.fixture
def gpt2(toy_models):
    return toy_models["gpt2"]


@pytest.mark.parametrize("what", list(_calls(None)))
def test_long_calls_show_a_bar_by_default_once_they_last(gpt2, what, capsys, monkeypatch):
    call = _calls(gpt2)[what]
    monkeypatch.setattr(progress_module, "DELAY", 1e9)  # a call shorter than the delay prints nothing
    call()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_module, "DELAY", 0.0)  # one that lasts longer shows its bar, unasked
    call()
    assert what.strip() in capsys.readouterr().err
    call(progress=False)
    assert capsys.readouterr().err == ""


def test_progress_true_shows_the_bar_at_once(gpt2, capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "DELAY", 1e9)
    tl_linmap.token_contributions(gpt2, PROMPT, progress=True)
    err = capsys.readouterr().err
    n = len(gpt2.to_tokens(PROMPT)[0])
    assert "token contributions" in err and f"{n}/{n}" in err


def test_the_bar_counts_what_it_says(capsys):
    with progress_bar(5, "things", True) as bar:
        for _ in range(5):
            bar.update()
    assert "things: 100%" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["yes", 1, 0.5])
def test_a_bad_progress_is_refused(gpt2, bad):
    with pytest.raises(InputError, match="progress must be True"):
        tl_linmap.token_contributions(gpt2, PROMPT, progress=bad)
    with pytest.raises(InputError, match="progress must be True"):
        tl_linmap.linear_map(gpt2, PROMPT, progress=bad)
