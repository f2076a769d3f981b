"""Bad input gets a clear, specific error."""

import pytest
import torch
from conftest import PROMPT

import tl_linmap
from tl_linmap.base.errors import InputError
from tl_linmap.base.prompts import prompt_batch, to_tokens
from tl_linmap.base.hook_names import target_depth


@pytest.fixture
def llama(toy_models):
    return toy_models["llama"]


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(llama, prompt):
    with pytest.raises(InputError, match="empty"):
        tl_linmap.linear_map(llama, prompt)


def test_empty_token_list(llama):
    with pytest.raises(InputError, match="no tokens"):
        tl_linmap.linear_map(llama, [])


def test_prompt_longer_than_context(llama):
    with pytest.raises(InputError, match="more than the model's context of 64"):
        tl_linmap.linear_map(llama, "x" * 100)


def test_unknown_hook_suggests_close_names(llama):
    with pytest.raises(InputError, match="no hook point 'blocks.0.hook_resid_pots'.*blocks.0.hook_resid_post"):
        tl_linmap.linear_map(llama, PROMPT, target="blocks.0.hook_resid_pots")


@pytest.mark.parametrize("position", [40, -41])
def test_position_out_of_range(llama, position):
    with pytest.raises(InputError, match=f"Position {position} is out of range"):
        tl_linmap.linear_map(llama, "short", position=position)


def test_several_prompts(llama):
    # to_tokens is of one prompt; the entry points take several through prompt_batch (tests/test_batch.py).
    with pytest.raises(InputError, match="Got 2 prompts"):
        to_tokens(llama, ["one", "two"])
    with pytest.raises(InputError, match=r"shape \(pos,\) or \(1, pos\); got \(2, 5\)"):
        to_tokens(llama, torch.ones(2, 5, dtype=torch.long))
    rows = prompt_batch(llama, torch.tensor([[9, 7, 5], [3, 3, 8]]), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 1]]))
    assert [r.tolist() for r in rows] == [[[9, 7, 5]], [[8]]]


def test_float_tokens(llama):
    with pytest.raises(InputError, match="integers"):
        tl_linmap.linear_map(llama, torch.ones(5))


def test_token_outside_vocabulary(llama):
    with pytest.raises(InputError, match=r"\[0, 259\)"):
        tl_linmap.linear_map(llama, [0, 5, 300])


def test_bad_chunk_size(llama):
    with pytest.raises(InputError, match="rows_per_pass"):
        tl_linmap.linear_map(llama, PROMPT, rows_per_pass=0)


def test_target_that_does_not_depend_on_embeddings(llama):
    with pytest.raises(InputError, match="does not depend on the token embeddings"):
        tl_linmap.linear_map(llama, PROMPT, target="blocks.0.ln1.hook_scale")


def test_target_without_position_axis(llama):
    with pytest.raises(InputError, match=r"not \(batch, pos=33, ...\)"):
        tl_linmap.linear_map(llama, PROMPT, target="blocks.0.attn.hook_pattern")


@pytest.mark.parametrize("n_tokens", [None, "n_heads"])  # n_heads tokens: the head axis passes for a position axis
def test_attention_scores_have_no_linear_map(llama, n_tokens):
    tokens = PROMPT if n_tokens is None else torch.arange(3, 3 + llama.cfg.n_heads)[None]
    with pytest.raises(InputError, match="quadratic in the embeddings"):
        tl_linmap.linear_map(llama, tokens, target="blocks.0.attn.hook_attn_scores")


def test_target_depth():
    assert target_depth("blocks.0.hook_resid_post", 4) == 1
    assert target_depth("blocks.3.attn.hook_z", 4) == 4
    assert target_depth("ln_final.hook_out", 4) == 4
    assert target_depth("hook_embed", 4) == 0


def test_text_the_tokenizer_maps_outside_the_vocabulary_blames_the_tokenizer(monkeypatch):
    """The user passed text: ids outside the vocabulary came from the tokenizer (a special token it adds), and the
    error says so and what to pass, instead of asking for ids the user never gave."""
    from tl_linmap.load.toy import toy_model

    model = toy_model("llama")
    vocab = model.cfg.d_vocab
    monkeypatch.setattr(model, "to_tokens", lambda text, **kwargs: torch.tensor([[vocab, 5, 7]]))
    with pytest.raises(tl_linmap.InputError, match=rf"tokenizer turned this text into ids the model has no embedding for \(\[{vocab}\]"):
        tl_linmap.linear_map(model, "hello")
