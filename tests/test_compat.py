"""TransformerLens versions: one clear refusal of a model class or version outside the supported range."""

import pytest
from conftest import PROMPT

import tl_linmap
from tl_linmap.base import compat


def test_the_installed_version_is_in_range():
    assert (2, 16) <= compat.tl_version()[:2] < (5, 0)


@pytest.mark.parametrize("version", [(2, 15, 4), (5, 0, 0)])
def test_a_version_outside_the_range_is_refused_by_number(toy_models, monkeypatch, version):
    monkeypatch.setattr(compat, "tl_version", lambda: version)
    with pytest.raises(tl_linmap.InputError, match=rf"TransformerLens {'.'.join(map(str, version))} is installed; tl_linmap supports >=2.16,<5"):
        tl_linmap.linear_map(toy_models["llama"], PROMPT)


def test_model_classes_are_told_apart(toy_models):
    bridge = toy_models["llama"]
    assert compat.is_bridge(bridge) and not compat.is_hooked(bridge)
    assert not compat.is_bridge("gpt2") and not compat.is_hooked(None)


def test_hook_names_come_from_the_installed_version():
    assert compat.get_act_name("scale", 3, "ln2") == "blocks.3.ln2.hook_scale"
    assert compat.get_act_name("resid_post", 0) == "blocks.0.hook_resid_post"
