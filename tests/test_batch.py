"""Batched prompts: every entry point given a list of prompts (or a padded token batch with a mask)
returns per prompt what the one-prompt call returns, to 1e-12 in float64, and exactly the model's
own output (`tl_linmap.system.frozen_batch`, `tl_linmap.hooks.pad_factors`)."""

from __future__ import annotations

import functools

import pytest
import torch

import tl_linmap
from tl_linmap.reading.readouts import LogitDiff
from tl_linmap.base.guard import borrowed
from tl_linmap.freeze.hooks import same_path_hooks
from tl_linmap.load.toy import toy_model

FAMILIES = ["llama", "gpt2", "gemma3", "pythia"]
# Mixed lengths, a one-token and a two-token prompt, text and token ids.
PROMPTS = ["Hello world, this is a test", [5], "The cat sat on the mat", [17, 42], "A short one"]


@functools.cache
def _model(family: str):
    return toy_model(family, dtype=torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _own_output(model, prompt) -> torch.Tensor:
    # The model's own final-norm output at the last position (a live forward, norms on the frozen path's code).
    tokens = tl_linmap.inputs.to_tokens(model, prompt)
    with borrowed(model, torch.float64), model.hooks(fwd_hooks=same_path_hooks(model)), torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return cache[tl_linmap.inputs.output_hook(model)][0, -1]


def _padded(model, prompts, side: str):
    # A token batch padded on one side with a pad id, and its mask.
    rows = [tl_linmap.inputs.to_tokens(model, p)[0] for p in prompts]
    longest = max(len(r) for r in rows)
    tokens = torch.full((len(rows), longest), 3, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(0, len(row)) if side == "right" else slice(longest - len(row), longest)
        tokens[i, where], mask[i, where] = row, 1
    return tokens, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_contributions_equal_the_one_prompt_call_and_the_model(family):
    model = _model(family)
    batched = tl_linmap.token_contributions(model, PROMPTS)
    assert len(batched) == len(PROMPTS)
    for prompt, c in zip(PROMPTS, batched):
        one = tl_linmap.token_contributions(model, prompt)
        assert c.values.shape == one.values.shape
        assert _close(c.values, one.values) < 1e-12
        assert (c.bias - one.bias).abs().max() <= 1e-12 * one.output.norm()
        assert torch.equal(c.tokens, one.tokens)
        # Independent of the code: the parts add up to the model's own output.
        own = _own_output(model, prompt)
        assert ((c.values.sum(0) + c.bias - own).norm() / own.norm()).item() < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_maps_and_rows_route_equal_the_one_prompt_call(family):
    model = _model(family)
    for route in ("columns", "rows"):
        batched = tl_linmap.layer_maps(model, PROMPTS, route=route)
        for prompt, maps in zip(PROMPTS, batched):
            one = tl_linmap.layer_maps(model, prompt, route=route)
            assert list(maps) == list(one)
            for name in one:
                assert _close(maps[name].operators, one[name].operators) < 1e-12, (route, name)
                assert (maps[name].bias - one[name].bias).abs().max() <= 1e-12 * one[name].output.norm()
                assert maps[name].relative_error() < 1e-12


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_linear_map_with_a_readout_and_attribution(family):
    model = _model(family)
    diff = LogitDiff(7, 9)
    for route in ("columns", "rows"):
        batched = tl_linmap.linear_map(model, PROMPTS, target=diff, route=route)
        for prompt, lm in zip(PROMPTS, batched):
            one = tl_linmap.linear_map(model, prompt, target=diff, route=route)
            assert _close(lm.operators, one.operators) < 1e-12
    maps = tl_linmap.layer_maps(model, PROMPTS[:3], modules=True)
    for prompt, att in zip(PROMPTS[:3], tl_linmap.token_attribution(model, maps, 7)):
        one = tl_linmap.token_attribution(model, tl_linmap.layer_maps(model, prompt, modules=True), 7)
        assert _close(att.per_token, one.per_token) < 1e-12
        assert abs(att.total() - one.logit) <= 1e-12 * abs(one.logit)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_padded_batch_with_mask_is_its_prompts(family, side):
    model = _model(family)
    tokens, mask = _padded(model, PROMPTS, side)
    batched = tl_linmap.token_contributions(model, tokens, attention_mask=mask)
    maps = tl_linmap.linear_maps(model, tokens, ["blocks.0.hook_resid_post"], attention_mask=mask.bool(), route="rows")
    for prompt, c, lm in zip(PROMPTS, batched, maps):
        one = tl_linmap.token_contributions(model, prompt)
        assert torch.equal(c.tokens, one.tokens)  # the padding is gone
        assert _close(c.values, one.values) < 1e-12
        single = tl_linmap.linear_maps(model, prompt, ["blocks.0.hook_resid_post"], route="rows")
        assert _close(lm["blocks.0.hook_resid_post"].operators, single["blocks.0.hook_resid_post"].operators) < 1e-12


def test_matrix_free_svd_of_each_prompt():
    model = _model("llama")
    with tl_linmap.matrix_free(model, PROMPTS[:3]) as mfs:
        batched = [mf.svd(-1, k=3).values for mf in mfs]
    for prompt, values in zip(PROMPTS[:3], batched):
        with tl_linmap.matrix_free(model, prompt) as mf:
            assert _close(values, mf.svd(-1, k=3).values) < 1e-12


def test_a_non_positional_position_and_a_one_row_list():
    model = _model("gemma3")
    prompts = ["Hello world, this is a test", "The cat sat on the mat"]
    for prompt, c in zip(prompts, tl_linmap.token_contributions(model, prompts, position=2)):
        assert _close(c.values, tl_linmap.token_contributions(model, prompt, position=2).values) < 1e-12
    (only,) = tl_linmap.linear_map(model, ["The cat"])
    assert _close(only.operators, tl_linmap.linear_map(model, "The cat").operators) < 1e-12


# GPT-J: a pattern frozen through queries and keys; OPT and Mixtral: factors over flattened tokens.
@pytest.mark.parametrize("family", ["gptj", "opt", "mixtral"])
def test_a_model_whose_factors_cannot_be_cut_runs_prompt_by_prompt(family):
    model = toy_model(family, dtype=torch.float64)
    assert not tl_linmap.system.batchable(model)
    prompts = PROMPTS[:3]
    maps = tl_linmap.linear_map(model, prompts, route="rows")
    with tl_linmap.matrix_free(model, prompts) as mfs:  # each prompt's own windows: no padded replay needed
        values = [mf.svd(-1, k=3).values for mf in mfs]
    for prompt, c, lm, svd in zip(prompts, tl_linmap.token_contributions(model, prompts), maps, values):
        assert _close(c.values, tl_linmap.token_contributions(model, prompt).values) < 1e-12
        assert _close(lm.operators, tl_linmap.linear_map(model, prompt, route="rows").operators) < 1e-12
        with tl_linmap.matrix_free(model, prompt) as mf:
            assert _close(svd, mf.svd(-1, k=3).values) < 1e-12


def test_the_model_comes_back_bit_for_bit():
    model = toy_model("llama", dtype=torch.float32)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tl_linmap.token_contributions(model, PROMPTS)
    tl_linmap.layer_maps(model, PROMPTS[:2])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert model.training


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_from_a_middle_layer(family):
    model = _model(family)
    source = "blocks.1.hook_resid_pre"
    batched = tl_linmap.token_contributions(model, PROMPTS[:3], source=source)
    maps = tl_linmap.linear_map(model, PROMPTS[:3], source=source, route="columns")
    for prompt, c, lm in zip(PROMPTS[:3], batched, maps):
        assert _close(c.values, tl_linmap.token_contributions(model, prompt, source=source).values) < 1e-12
        assert _close(lm.operators, tl_linmap.linear_map(model, prompt, source=source, route="columns").operators) < 1e-12


@pytest.mark.parametrize("route", ["rows", "columns"])
def test_a_position_inside_every_prompt_of_mixed_lengths(route):
    # Per-row target positions: the block cut after attention (trim) keeps each prompt's own.
    model = _model("llama")
    prompts = ["Hello world, this is a test", [17, 42, 9], "The cat sat on the mat"]
    for position in (1, -2):
        batched = tl_linmap.layer_maps(model, prompts, position=position, route=route, modules=True)
        for prompt, maps in zip(prompts, batched):
            one = tl_linmap.layer_maps(model, prompt, position=position, route=route, modules=True)
            assert maps[next(iter(one))].position == one[next(iter(one))].position
            for name in one:
                assert _close(maps[name].operators, one[name].operators) < 1e-12, (position, name)
                assert (maps[name].bias - one[name].bias).abs().max() <= 1e-12 * one[name].output.norm()


def test_a_position_beyond_a_short_prompt_names_it_before_any_work(monkeypatch):
    model = _model("llama")
    calls = []
    monkeypatch.setattr(tl_linmap.system, "borrowed", lambda *a, **k: calls.append(a) or borrowed(*a, **k))
    with pytest.raises(tl_linmap.InputError, match=r"Position 2 is out of range for prompt 1 of the batch \('\S+', 2 tokens\)"):
        tl_linmap.token_contributions(model, ["The cat sat", [17, 42], [5]], position=2)
    assert not calls  # refused before the model was borrowed


def test_readouts_of_a_batch():
    # A logit difference as a target, and as token_attribution's readout over a list of maps.
    model = _model("gpt2")
    diff = LogitDiff(7, 9)
    maps = tl_linmap.layer_maps(model, PROMPTS[:3], modules=True)
    for prompt, att in zip(PROMPTS[:3], tl_linmap.token_attribution(model, maps, diff)):
        one = tl_linmap.token_attribution(model, tl_linmap.layer_maps(model, prompt, modules=True), diff)
        assert _close(att.per_token, one.per_token) < 1e-12
        # Independent of the code: the model's own logit difference.
        logits = model(tl_linmap.inputs.to_tokens(model, prompt))[0, -1].double()
        assert abs(att.total() - (logits[7] - logits[9]).item()) <= 1e-12 * logits.abs().max().item()


def test_padded_rows_as_a_tokenizer_gives_them_without_tensors():
    # input_ids and attention_mask as nested lists (tokenizer(..., padding=True) without return_tensors).
    model = _model("llama")
    tokens, mask = _padded(model, PROMPTS[:3], "left")
    batched = tl_linmap.token_contributions(model, tokens.tolist(), attention_mask=mask.tolist())
    for prompt, c in zip(PROMPTS[:3], batched):
        assert _close(c.values, tl_linmap.token_contributions(model, prompt).values) < 1e-12


def test_float32_batch_agrees_with_the_one_prompt_call_and_the_model():
    model = toy_model("gpt2", dtype=torch.float32)
    bound = tl_linmap.exactness.tolerance(torch.float32)
    batched = tl_linmap.token_contributions(model, PROMPTS, dtype=torch.float32)
    maps = tl_linmap.linear_map(model, PROMPTS, dtype=torch.float32, route="rows")
    for prompt, c, lm in zip(PROMPTS, batched, maps):
        assert c.values.dtype == lm.operators.dtype == torch.float32
        assert _close(c.values, tl_linmap.token_contributions(model, prompt, dtype=torch.float32).values) < bound
        assert _close(lm.operators, tl_linmap.linear_map(model, prompt, dtype=torch.float32, route="rows").operators) < bound
        own = _own_output(model, prompt)
        assert ((c.values.sum(0) + c.bias - own).norm() / own.norm()).item() < bound
