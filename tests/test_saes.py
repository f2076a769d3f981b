"""Reading SAEs saved in SAELens' layout (`tl_linmap.load.saes`), and the SAE shipped with tl_linmap."""

import json

import pytest
import torch
from safetensors.torch import save_file

import tl_linmap
from tl_linmap.load.saes import bundled_saes


def write_sae(folder, architecture="jumprelu", **cfg):
    g = torch.Generator().manual_seed(0)
    weights = {"W_enc": torch.randn(8, 20, generator=g), "b_enc": torch.randn(20, generator=g), "W_dec": torch.randn(20, 8, generator=g),
               "b_dec": torch.randn(8, generator=g), "threshold": torch.rand(20, generator=g)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"architecture": architecture, "hook_name": "blocks.1.hook_resid_post",
                                                  "apply_b_dec_to_input": True, **cfg}))
    return {k: v.half().float() for k, v in weights.items()}


def test_a_saved_sae_reads_as_its_weights(tmp_path):
    weights = write_sae(tmp_path / "mine")
    sae = tl_linmap.load_sae(tmp_path / "mine")
    assert sae.hook_in == sae.hook_out == "blocks.1.hook_resid_post"
    assert sae.activation == "jumprelu" and sae.apply_b_dec_to_input and sae.d_sae == 20
    for name, value in weights.items():
        assert torch.equal(getattr(sae, name), value), name
    assert tl_linmap.load_sae(tmp_path / "mine", dtype=torch.float64).W_enc.dtype == torch.float64
    assert tl_linmap.sae_stats(tmp_path / "mine") == {}


def test_unknown_saes_and_architectures_are_refused(tmp_path):
    with pytest.raises(tl_linmap.InputError, match="No SAE 'nope'.*bundled SAEs"):
        tl_linmap.load_sae("nope")
    write_sae(tmp_path / "gated", architecture="gated")
    with pytest.raises(tl_linmap.InputError, match="architecture 'gated'"):
        tl_linmap.load_sae(tmp_path / "gated")


@pytest.mark.parametrize("name", bundled_saes())
def test_the_bundled_sae_is_what_its_stats_say(name):
    sae = tl_linmap.load_sae(name)
    stats = tl_linmap.sae_stats(name)
    assert sae.d_sae == stats["d_sae"] and sae.hook_in == stats["hook_name"] and sae.k == stats["k"]
    heldout = stats["heldout"]  # measured on held-out text by scripts/train_sae.py
    assert 0 < heldout["explained_variance"] <= 1 and heldout["mean_l0"] == pytest.approx(stats["k"])
    assert sae.W_enc.dtype == torch.float32  # stored in float16, read in float32 by default


def test_settings_outside_the_mask_are_refused_and_transcoders_read_their_output_hook(tmp_path):
    write_sae(tmp_path / "normed", architecture="standard", normalize_activations="layer_norm")
    with pytest.raises(tl_linmap.InputError, match="normalize_activations='layer_norm'.*fold them into the weights"):
        tl_linmap.load_sae(tmp_path / "normed")
    write_sae(tmp_path / "tc", architecture="jumprelu_transcoder", hook_name_out="blocks.1.hook_mlp_out")
    tc = tl_linmap.load_sae(tmp_path / "tc")
    assert (tc.hook_in, tc.hook_out) == ("blocks.1.hook_resid_post", "blocks.1.hook_mlp_out")
