"""Wrong calls a new user makes: each raises `InputError` saying what to pass instead, and the model is untouched.

One table, `BAD_CALLS`: a row is an id, the toy family it runs on, a call taking the model, the
error expected and a regex of its message, which must name what to pass instead. Every row
runs on a toy model put in an unusual state (training mode, mixed ``requires_grad`` flags),
and after the call the model must hold the very same parameter and buffer values, dtypes,
flags, modes and hooks (`tl_linmap.guard.hook_count`) as before.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from torch import nn

import tl_linmap
import tl_linmap.experts
from tl_linmap.base.errors import InputError
from tl_linmap.base.guard import hook_count
from tl_linmap.load.toy import toy_model

SHORT = "The cat sat"  # 12 tokens with BOS: every call stays fast
OUT_OF_RANGE = r"\[-12, 12\) \(-1: the last token\)"
DTYPE = r"dtype must be a floating torch dtype such as torch\.float64 .* or None to keep the model's own"
MODEL = r"Expected a TransformerLens HookedTransformer .* or TransformerBridge .* as the model, got [\w.]*\b{}\."


# Results the rows call methods on, computed once per model (the model must come back from these too).
@functools.cache
def _map(model):
    return tl_linmap.linear_map(model, SHORT)


@functools.cache
def _maps(model, modules: bool = False):
    return tl_linmap.layer_maps(model, SHORT, modules=modules)


@functools.cache
def _corpus(model):
    return tl_linmap.corpus_analysis(model, [SHORT], layers=[1], progress=False)


@functools.cache
def _one_token_map(model):
    return tl_linmap.linear_map(model, [0])


def _matrix_free(model, use, **options):
    with tl_linmap.matrix_free(model, SHORT, **options) as mf:
        return use(mf)


def _matrix_free_batch(model, prompts, **options):
    with tl_linmap.matrix_free(model, prompts, **options) as mfs:
        return mfs


def _after_block(model):
    with tl_linmap.matrix_free(model, SHORT) as mf:
        pass
    return mf.svd(k=2)


def _run_frozen(model, factors):
    with tl_linmap.frozen(model, factors=factors):
        model(SHORT)


def _vector(model, *shape):
    return torch.ones(*shape, model.cfg.d_model)


def bad(name: str, call, match: str, *, family: str = "llama", error: type[Exception] = InputError):
    return pytest.param(family, call, error, match, id=name)


BAD_CALLS = [
    # The model argument.
    bad("model-is-a-name", lambda m: tl_linmap.linear_map("smollm2", SHORT), MODEL.format("str")),
    bad("model-is-nn.Linear", lambda m: tl_linmap.linear_map(nn.Linear(2, 2), SHORT), MODEL.format("Linear")),
    bad("model-is-None", lambda m: tl_linmap.token_contributions(None, SHORT), MODEL.format("NoneType")),
    bad("model-and-prompt-swapped", lambda m: tl_linmap.linear_map(SHORT, m), MODEL.format("str")),
    bad("layer_maps-model-is-a-name", lambda m: tl_linmap.layer_maps("smollm2", SHORT), MODEL.format("str")),
    bad("matrix_free-model-is-a-name", lambda m: _matrix_free("smollm2", lambda mf: mf.svd()), MODEL.format("str")),
    bad("nonlinearity_gap-model-is-a-name", lambda m: tl_linmap.nonlinearity_gap("smollm2", SHORT), MODEL.format("str")),
    bad("freeze_hooks-model-is-a-name", lambda m: tl_linmap.freeze_hooks("smollm2"), MODEL.format("str")),
    bad("frozen-model-is-nn.Linear", lambda m: _run_frozen(nn.Linear(2, 2), None), MODEL.format("Linear")),
    bad("unembed-model-is-a-name", lambda m: tl_linmap.unembed("smollm2", _vector(m)), MODEL.format("str")),
    bad("top_tokens-model-is-a-name", lambda m: tl_linmap.top_tokens("smollm2", _vector(m)), MODEL.format("str")),
    bad("nearest_tokens-model-is-None", lambda m: tl_linmap.nearest_tokens(None, _vector(m)), MODEL.format("NoneType")),
    bad("token_attribution-arguments-swapped", lambda m: tl_linmap.token_attribution(_maps(m, True), m, "a"), MODEL.format("LinearMaps")),
    # The prompt.
    bad("prompt-None", lambda m: tl_linmap.linear_map(m, None), r"prompt must be a string, a list of token ids or a token tensor, got NoneType"),
    bad("prompt-dict", lambda m: tl_linmap.linear_map(m, {"text": SHORT}), r"must be a string, a list of token ids or a token tensor, got dict"),
    bad("prompt-bytes", lambda m: tl_linmap.linear_map(m, SHORT.encode()), r"must be a string, a list of token ids or a token tensor, got bytes"),
    # Batches of prompts.
    bad("batch-empty-list", lambda m: tl_linmap.linear_map(m, []), r"The list is empty: no prompts and no tokens; give at least one prompt"),
    bad("readout-target-of-token_contributions", lambda m: tl_linmap.token_contributions(m, SHORT, target=tl_linmap.LogitDiff(" a", " b")),
        r"is a linear readout, and this call maps the vectors of a hook point.*linear_map\(model, prompt, target=readout\)"),
    bad("batch-empty-list-token_contributions", lambda m: tl_linmap.token_contributions(m, []), r"The list is empty: no prompts and no tokens"),
    bad("batch-mask-shape-mismatch", lambda m: tl_linmap.token_contributions(m, torch.full((2, 5), 7), attention_mask=torch.ones(2, 4)), r"attention_mask has shape \(2, 4\), the tokens \(2, 5\): they must match"),
    bad("batch-mask-with-a-list", lambda m: tl_linmap.layer_maps(m, ["The cat", "The dog"], attention_mask=torch.ones(2, 3)), r"attention_mask goes with a padded token batch .*a list of prompts needs none"),
    bad("batch-mask-not-0-1", lambda m: tl_linmap.linear_map(m, torch.full((2, 3), 7), attention_mask=torch.full((2, 3), 2)), r"attention_mask must hold 0 \(padding\) and 1 \(real tokens\) only"),
    bad("batch-mask-padding-inside", lambda m: tl_linmap.linear_map(m, torch.full((2, 3), 7), attention_mask=torch.tensor([[1, 0, 1], [1, 1, 1]])), r"Row 0 of attention_mask has padding between real tokens: pad on the left or the right only"),
    bad("batch-mask-row-of-zeros", lambda m: tl_linmap.linear_map(m, torch.full((2, 3), 7), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])), r"Row 1 of attention_mask is all zeros"),
    bad("batch-ends-in-pad-without-mask", lambda m: tl_linmap.token_contributions(m, torch.tensor([[7, 8, 9], [7, 1, 1]])), r"ends in the pad token \(1\): without attention_mask it is ambiguous .*Pass attention_mask="),
    bad("batch-1-d-tokens-with-mask", lambda m: tl_linmap.linear_map(m, torch.tensor([7, 8]), attention_mask=torch.ones(2)), r"a token tensor \(batch, pos\) with attention_mask; got \(2,\)"),
    bad("batch-position-beyond-a-short-prompt", lambda m: tl_linmap.layer_maps(m, [SHORT, [5, 6]], position=4),
        r"Position 4 is out of range for prompt 1 of the batch \('\S+', 2 tokens\): pass one every prompt has, in \[-2, 2\)"),
    bad("batch-position-beyond-a-short-prompt-matrix_free", lambda m: _matrix_free_batch(m, [SHORT, [5]], position=-2),
        r"Position -2 is out of range for prompt 1 of the batch \('\S+', 1 token\)"),
    bad("batch-position-beyond-a-short-prompt-unbatchable", lambda m: tl_linmap.token_contributions(m, [SHORT, [5]], position=3),
        r"Position 3 is out of range for prompt 1 of the batch", family="gptj"),
    bad("batch-mask-with-ragged-rows", lambda m: tl_linmap.linear_map(m, [[7, 8, 9], [7, 8]], attention_mask=[[1, 1, 1], [1, 1]]),
        r"With attention_mask the rows must be padded to one length .*or pass the list of prompts without attention_mask"),
    bad("batch-token_attribution-not-maps", lambda m: tl_linmap.token_attribution(m, [_maps(m, True), [_maps(m, True)]], "a"),
        r"maps\[1\] is a list: pass the list layer_maps\(model, prompts, modules=True\) returns"),
    bad("batch-token_attribution-empty-list", lambda m: tl_linmap.token_attribution(m, [], "a"), r"maps is an empty list: pass layer_maps\(model, prompts, modules=True\)"),
    bad("prompt-mixes-ids-and-strings", lambda m: tl_linmap.linear_map(m, [5, "cat"]), r"mixes strings and token ids: pass one string, or a list of token ids"),
    bad("prompt-one-int", lambda m: tl_linmap.linear_map(m, 5), r"Got one token id, 5; pass a list of token ids such as \[5\]"),
    bad("prompt-float-ids", lambda m: tl_linmap.linear_map(m, [1.0, 2.0]), r"Token ids must be integers, got dtype torch\.float32: pass a list of ints or a torch\.long tensor"),
    bad("prompt-ids-outside-vocabulary", lambda m: tl_linmap.linear_map(m, [0, 5, 9999]), r"Token ids must lie in \[0, 259\)"),
    bad("prompt-negative-ids", lambda m: tl_linmap.linear_map(m, [0, -3]), r"Token ids must lie in \[0, 259\)"),
    bad("prompt-empty", lambda m: tl_linmap.linear_map(m, "  "), r"The prompt is empty; give at least one token"),
    bad("prompt-longer-than-context", lambda m: tl_linmap.linear_map(m, "x" * 100), r"more than the model's context of 64: shorten it"),
    # dtype.
    bad("dtype-int64", lambda m: tl_linmap.linear_map(m, SHORT, dtype=torch.int64), DTYPE + r"; got torch\.int64"),
    bad("dtype-string", lambda m: tl_linmap.linear_map(m, SHORT, dtype="float64"), DTYPE + r"; got 'float64'"),
    bad("dtype-python-float", lambda m: tl_linmap.linear_map(m, SHORT, dtype=float), DTYPE),
    bad("dtype-complex", lambda m: tl_linmap.linear_map(m, SHORT, dtype=torch.complex64), DTYPE),
    bad("dtype-bool-token_contributions", lambda m: tl_linmap.token_contributions(m, SHORT, dtype=torch.bool), DTYPE),
    bad("dtype-string-matrix_free", lambda m: _matrix_free(m, lambda mf: mf.svd(), dtype="float32"), DTYPE),
    bad("dtype-int-nonlinearity_gap", lambda m: tl_linmap.nonlinearity_gap(m, SHORT, dtype=torch.int32), DTYPE),
    bad("dtype-float16-matrix_free-svd", lambda m: _matrix_free(m, lambda mf: mf.svd(k=2), dtype=torch.float16), r"needs float32 or float64.*pass dtype=torch\.float32"),
    # position.
    bad("position-out-of-range", lambda m: tl_linmap.linear_map(m, SHORT, position=99), r"Position 99 is out of range .*pass one in " + OUT_OF_RANGE),
    bad("position-float", lambda m: tl_linmap.linear_map(m, SHORT, position=1.5), r"position must be an int, got 1\.5"),
    bad("position-string", lambda m: tl_linmap.linear_map(m, SHORT, position="last"), r"position must be an int, got 'last'"),
    bad("position-None", lambda m: tl_linmap.token_contributions(m, SHORT, position=None), r"position must be an int, got None"),
    bad("position-bool", lambda m: tl_linmap.linear_map(m, SHORT, position=True), r"position must be an int, got True"),
    # target(s).
    bad("target-without-position-axis", lambda m: tl_linmap.linear_map(m, SHORT, target="blocks.0.attn.hook_pattern"), r"Map one with a position axis, such as 'blocks\.0\.hook_resid_post'"),
    bad("target-attention-scores", lambda m: tl_linmap.linear_map(m, SHORT, target="blocks.0.attn.hook_attn_scores"), r"Map hook_q, hook_k or hook_z instead"),
    bad("target-inside-a-weightless-norm", lambda m: tl_linmap.linear_map(m, SHORT, target="blocks.0.ln2.hook_normalized"),
        r"weightless norm .* Map blocks\.0\.ln2\.hook_out instead", family="olmo"),
    bad("target-misspelt", lambda m: tl_linmap.linear_map(m, SHORT, target="blocks.0.hook_resid_pots"), r"no hook point 'blocks\.0\.hook_resid_pots'\. Did you mean blocks\.0\.hook_resid_post"),
    bad("target-None", lambda m: tl_linmap.linear_map(m, SHORT, target=None), r"target must be one hook name such as 'output'.*got None"),
    bad("target-int", lambda m: tl_linmap.linear_map(m, SHORT, target=3), r"target must be one hook name such as 'output'.*got 3"),
    bad("target-is-a-list", lambda m: tl_linmap.linear_map(m, SHORT, target=["output"]), r"for several targets use linear_maps\(model, prompt, \[name, \.\.\.\]\)"),
    bad("target-a-frozen-factor", lambda m: tl_linmap.linear_map(m, SHORT, target="blocks.0.ln1.hook_scale"), r"does not depend on the token embeddings.*map an activation the embeddings flow into"),
    bad("target-a-frozen-factor-columns", lambda m: tl_linmap.linear_map(m, SHORT, target="blocks.0.ln1.hook_scale", route="columns"), r"does not depend on the token embeddings.*map an activation the embeddings flow into"),
    bad("target-position-embeddings", lambda m: tl_linmap.linear_map(m, SHORT, target="hook_pos_embed"), r"does not depend on the token embeddings.*map an activation", family="gpt2"),
    bad("linear_maps-empty-targets", lambda m: tl_linmap.linear_maps(m, SHORT, []), r"targets is empty: give at least one hook name, e\.g\. \['output'\]"),
    bad("linear_maps-targets-a-string", lambda m: tl_linmap.linear_maps(m, SHORT, "output"), r"targets must be a list of names, e\.g\. targets=\['output'\]; got 'output'"),
    bad("linear_maps-targets-None", lambda m: tl_linmap.linear_maps(m, SHORT, None), r"targets must be a list of names"),
    bad("linear_maps-norm-unknown", lambda m: tl_linmap.linear_maps(m, SHORT, ["output"], norms=["blocks.0.ln"]), r"no norm module 'blocks\.0\.ln'\. Did you mean .*blocks\.0\.ln1"),
    bad("linear_maps-norms-a-string", lambda m: tl_linmap.linear_maps(m, SHORT, ["output"], norms="blocks.0.ln1"), r"norms must be a list of names, e\.g\. norms=\['blocks\.0\.ln1'\]"),
    # source= (where a map starts) and linear readouts as targets.
    bad("source-unknown-hook", lambda m: tl_linmap.linear_map(m, SHORT, source="blocks.0.hook_resid_pots"), r"no hook point 'blocks\.0\.hook_resid_pots' to start a map from\. Did you mean blocks\.0\.hook_resid_post"),
    bad("source-after-target", lambda m: tl_linmap.linear_map(m, SHORT, target="blocks.0.hook_resid_post", source="blocks.1.hook_resid_pre"), r"comes before the source 'blocks\.1\.hook_resid_pre'.*Pass a source that comes before every target"),
    bad("source-after-target-same-block", lambda m: tl_linmap.linear_maps(m, SHORT, ["blocks.0.hook_attn_out"], source="blocks.0.hook_mlp_out"), r"comes before the source"),
    bad("source-without-position-axis", lambda m: tl_linmap.linear_map(m, SHORT, source="blocks.0.attn.hook_pattern"), r"has no position axis.*start a map from a hook point indexed by sequence position"),
    bad("source-a-frozen-factor", lambda m: tl_linmap.token_contributions(m, SHORT, source="blocks.0.ln1.hook_scale"), r"is where a factor is frozen.*Start from an activation"),
    bad("source-bridge-resid_mid", lambda m: tl_linmap.layer_maps(m, SHORT, source="blocks.0.hook_resid_mid"), r"second norm's input.*Start from 'blocks\.0\.hook_attn_out'"),
    bad("source-an-index", lambda m: tl_linmap.linear_map(m, SHORT, source=-1), r"source must be a hook name such as 'blocks\.2\.hook_resid_pre'.*got -1"),
    bad("source-target-independent", lambda m: tl_linmap.linear_map(m, SHORT, target="blocks.0.hook_mlp_out", source="blocks.0.hook_attn_out"), r"does not depend on the source 'blocks\.0\.hook_attn_out'.*parallel block's MLP", family="pythia"),
    bad("matrix_free-source-unknown", lambda m: _matrix_free(m, lambda mf: mf.svd(), source="blocks.9.hook_resid_pre"), r"no hook point 'blocks\.9\.hook_resid_pre' to start a map from"),
    bad("push_forward-wrong-width", lambda m: tl_linmap.push_forward(m, SHORT, torch.ones(3), source="blocks.0.hook_resid_post"), r"has width 64; the vectors have 3"),
    bad("push_forward-a-list", lambda m: tl_linmap.push_forward(m, SHORT, [1.0], source="blocks.0.hook_resid_post"), r"vectors must be a floating tensor of shape \(d_in,\) or \(k, d_in\)"),
    bad("push_forward-position-after-target", lambda m: tl_linmap.push_forward(m, SHORT, _vector(m), source="blocks.0.hook_resid_post", source_position=5, position=3), r"comes after the target position 3"),
    bad("LogitDiff-several-tokens", lambda m: tl_linmap.linear_map(m, SHORT, target=tl_linmap.LogitDiff(" Paris", " London")), r"' Paris' is 6 tokens .*give one token"),
    bad("LogitDiff-same-token", lambda m: tl_linmap.linear_map(m, SHORT, target=tl_linmap.LogitDiff(5, 5)), r"the same token, so always zero\. Give two different tokens"),
    bad("Logit-id-outside-vocabulary", lambda m: tl_linmap.linear_maps(m, SHORT, [tl_linmap.Logit(9999)]), r"Token id 9999 is outside the vocabulary"),
    bad("LogitDiff-of-hook_z", lambda m: tl_linmap.linear_map(m, SHORT, target=tl_linmap.LogitDiff(5, 7, hook="blocks.0.attn.hook_z")), r"A logit is read from the residual stream"),
    bad("Direction-wrong-width", lambda m: tl_linmap.linear_map(m, SHORT, target=tl_linmap.Direction("blocks.0.hook_resid_post", torch.ones(3))), r"has width 64; the Direction's vector has 3"),
    bad("Direction-not-a-tensor", lambda m: tl_linmap.linear_map(m, SHORT, target=tl_linmap.Direction("output", [1.0])), r"Direction's vector must be a floating tensor of shape \(d_out,\), got list"),
    bad("Direction-unknown-hook", lambda m: tl_linmap.linear_map(m, SHORT, target=tl_linmap.Direction("blocks.0.hook_resid_pots", torch.ones(64))), r"no hook point 'blocks\.0\.hook_resid_pots'"),
    bad("readouts-same-name", lambda m: tl_linmap.linear_maps(m, SHORT, [tl_linmap.Direction("output", torch.ones(64))] * 2), r"same name: give each Direction its own label="),
    bad("token_attribution-Direction-elsewhere", lambda m: tl_linmap.token_attribution(m, _maps(m, True), tl_linmap.Direction("blocks.0.hook_resid_post", torch.ones(64))), r"give the Direction on 'blocks\.1\.hook_resid_post'"),
    bad("token_attribution-logit-lens-readout", lambda m: tl_linmap.token_attribution(m, _maps(m, True), tl_linmap.LogitDiff(5, 7, hook="blocks.0.hook_resid_post")), r"give the readout with hook='output'"),
    bad("sequence-target-misspelt", lambda m: tl_linmap.sequence_attribution(m, SHORT, target="outptu"), r"no hook point 'outptu'"),
    bad("sequence-last-out-of-range", lambda m: tl_linmap.sequence_attribution(m, SHORT, last=99), r"Position 99 is out of range"),
    bad("sequence-totals-of-norms", lambda m: tl_linmap.sequence_attribution(m, SHORT).total(), r"Contribution norms do not add up"),
    bad("generation-max_new_tokens-zero", lambda m: tl_linmap.generation_attribution(m, SHORT, 0), r"max_new_tokens must be a positive int, got 0"),
    bad("generation-beyond-context", lambda m: tl_linmap.generation_attribution(m, SHORT, 60), r"do not fit the context of 64: generate fewer"),
    bad("plot_sequence_attribution-of-a-map", lambda m: _plot("plot_sequence_attribution", _map(m)), r"plot_sequence_attribution takes a SequenceAttribution, got LinearMap"),
    # Sizes of passes and routes.
    bad("rows_per_pass-zero", lambda m: tl_linmap.linear_map(m, SHORT, rows_per_pass=0), r"rows_per_pass must be a positive int, got 0"),
    bad("rows_per_pass-negative", lambda m: tl_linmap.layer_maps(m, SHORT, rows_per_pass=-3), r"rows_per_pass must be a positive int, got -3"),
    bad("rows_per_pass-float", lambda m: tl_linmap.linear_maps(m, SHORT, ["output"], rows_per_pass=2.5), r"rows_per_pass must be a positive int, got 2\.5"),
    bad("tokens_per_pass-zero", lambda m: tl_linmap.token_contributions(m, SHORT, tokens_per_pass=0), r"tokens_per_pass must be a positive int, got 0"),
    bad("route-sideways", lambda m: tl_linmap.linear_map(m, SHORT, route="sideways"), r"route must be one of 'auto', 'rows', 'columns', got 'sideways'"),
    bad("route-a-list", lambda m: tl_linmap.linear_map(m, SHORT, route=["rows"]), r"route must be one of 'auto', 'rows', 'columns'"),
    # layers.
    bad("layers-out-of-range", lambda m: tl_linmap.layer_maps(m, SHORT, layers=[99]), r"layers must be block indices in \[0, 2\), got \[99\]"),
    bad("layers-negative", lambda m: tl_linmap.layer_maps(m, SHORT, layers=[-1]), r"layers must be block indices in \[0, 2\), got \[-1\]"),
    bad("layers-one-int", lambda m: tl_linmap.layer_maps(m, SHORT, layers=1), r"layers must be a list of block indices, e\.g\. layers=\[1\]"),
    bad("layers-a-string", lambda m: tl_linmap.layer_maps(m, SHORT, layers="0"), r"layers must be a list of block indices"),
    bad("layers-empty", lambda m: tl_linmap.layer_maps(m, SHORT, layers=[]), r"layers is empty: give at least one block index, or layers=None"),
    bad("nonlinearity_gap-layers-empty", lambda m: tl_linmap.nonlinearity_gap(m, SHORT, layers=[]), r"layers is empty"),
    # Vocabulary tokens.
    bad("token_attribution-without-modules", lambda m: tl_linmap.token_attribution(m, _maps(m), "a"), r"pass maps = layer_maps\(model, prompt, modules=True\)"),
    bad("token_attribution-some-layers", lambda m: tl_linmap.token_attribution(m, tl_linmap.layer_maps(m, SHORT, layers=[0], modules=True), "a"), r"pass maps = layer_maps\(model, prompt, modules=True\) over all layers"),
    bad("token_attribution-a-LinearMap", lambda m: tl_linmap.token_attribution(m, _map(m), "a"), r"maps must be the LinearMaps of layer_maps\(model, prompt, modules=True\), got LinearMap"),
    bad("token-string-of-several-tokens", lambda m: tl_linmap.token_attribution(m, _maps(m, True), " Paris"), r"' Paris' is 6 tokens \(' ' \+ 'P' \+ .*\); give one token such as ' ', or its id"),
    bad("token-empty-string", lambda m: tl_linmap.token_attribution(m, _maps(m, True), ""), r"'' is 0 tokens; give one token, or its id"),
    bad("token-id-outside-vocabulary", lambda m: tl_linmap.token_attribution(m, _maps(m, True), 99999), r"Token id 99999 is outside the vocabulary \[0, 259\); pass an id in it or a token string", family="gpt2"),
    bad("token-id-negative", lambda m: _map(m).logit_contributions(-1), r"Token id -1 is outside the vocabulary \[0, 259\)", family="gpt2"),
    bad("token-float", lambda m: _map(m).logit_contributions(2.5), r"token must be a vocabulary id \(int\) or a single-token string such as ' Paris', got 2\.5"),
    bad("token-None", lambda m: _map(m).logit_contributions(None), r"token must be a vocabulary id \(int\) or a single-token string"),
    bad("logit_contributions-of-hook_z", lambda m: _maps(m, True)["blocks.0.attn.hook_z"].logit_contributions("a"), r"decode a residual-stream target"),
    # LinearMap.svd / decode / dimensionality.
    bad("svd-k-zero", lambda m: _map(m).svd(k=0), r"k must be a positive int, got 0"),
    bad("svd-k-float", lambda m: _map(m).svd(k=1.5), r"k must be a positive int, got 1\.5"),
    bad("decode-k-zero", lambda m: _map(m).decode(k=0), r"k must be a positive int, got 0"),
    bad("decode-top-zero", lambda m: _map(m).decode(top=0), r"top must be a positive int, got 0"),
    bad("decode-top-beyond-vocabulary", lambda m: _map(m).decode(top=9999), r"top must be at most 259, got 9999"),
    bad("decode-source-out-of-range", lambda m: _map(m).decode(sources=99), r"An input token index must be an int in " + OUT_OF_RANGE + r", got 99"),
    bad("decode-sources-one-out-of-range", lambda m: _map(m).decode(sources=[0, 99]), r"must be an int in " + OUT_OF_RANGE + r", got 99"),
    bad("decode-source-float", lambda m: _map(m).decode(sources=1.5), r"must be an int in " + OUT_OF_RANGE + r", got 1\.5"),
    bad("decode-source-after-position", lambda m: tl_linmap.linear_map(m, SHORT, position=3).decode(sources=5), r"comes after the target position 3: its operator is zero\. Pass a source in \[0, 3\]"),
    bad("decode-hook_z", lambda m: _maps(m, True)["blocks.0.attn.hook_z"].decode(), r"decode a residual-stream target"),
    bad("dimensionality-skip_first-one-token", lambda m: _one_token_map(m).dimensionality(skip_first=True), r"skip_first leaves no token.*Pass skip_first=False"),
    bad("svd-skip_first-position-0", lambda m: tl_linmap.linear_map(m, SHORT, position=0).svd(skip_first=True), r"Pass skip_first=False \(or map a later position\)"),
    # LinearMaps.
    bad("maps-unknown-name", lambda m: _maps(m)["blocks.0.hook_resid_pots"], r"No map of 'blocks\.0\.hook_resid_pots': index by hook name\. It holds blocks\.0\.hook_resid_mid"),
    bad("maps-indexed-by-int", lambda m: _maps(m)[0], r"No map of 0: index by hook name"),
    bad("maps-decode-targets-a-string", lambda m: _maps(m).decode(targets="blocks.0.hook_resid_post"), r"targets must be a list of names, e\.g\. targets=\['blocks\.0\.hook_resid_mid'\]"),
    bad("maps-dimensionality-unknown-target", lambda m: _maps(m).dimensionality(targets=["output"]), r"No map of 'output'.*It holds"),
    bad("maps-svd-targets-a-string", lambda m: _maps(m).svd(targets="blocks.0.hook_resid_post"), r"targets must be a list of names"),
    bad("maps-heads-without-modules", lambda m: _maps(m).heads(0), r"these maps have hook_z of layers \[\]: compute layer_maps\(\.\.\., modules=True\)"),
    bad("maps-heads-layer-out-of-range", lambda m: _maps(m, True).heads(99), r"these maps have hook_z of layers \[0, 1\]"),
    bad("maps-heads-layer-a-string", lambda m: _maps(m, True).heads("0"), r"layer must be a block index \(int\), got '0'"),
    bad("maps-head-out-of-range", lambda m: _maps(m, True).head(0, 99), r"Layer 0 has 4 heads; head must be an int in \[0, 4\), got 99"),
    bad("maps-head-float", lambda m: _maps(m, True).head(0, 1.5), r"head must be an int in \[0, 4\), got 1\.5"),
    bad("maps-stack-a-string", lambda m: _maps(m).stack_contributions("blocks.0.hook_resid_post"), r"names must be a list of names"),
    bad("maps-stack-empty", lambda m: _maps(m).stack_contributions([]), r"names is empty: give at least one hook name, or names=None"),
    bad("maps-stack-different-widths", lambda m: tl_linmap.linear_maps(m, SHORT, ["blocks.0.mlp.hook_post", "output"]).stack_contributions(),
        r"Only maps of one width stack; .*Pass names of one width"),
    # matrix_free.
    bad("operator-source-out-of-range", lambda m: _matrix_free(m, lambda mf: mf.operator(99)), r"must be an int in " + OUT_OF_RANGE + r", got 99"),
    bad("operator-source-float", lambda m: _matrix_free(m, lambda mf: mf.operator(1.5)), r"must be an int in " + OUT_OF_RANGE + r", got 1\.5"),
    bad("operator-target-not-mapped", lambda m: _matrix_free(m, lambda mf: mf.operator(-1, "blocks.0.hook_resid_post")),
        r"maps \['ln_final\.hook_out'\], not 'blocks\.0\.hook_resid_post': pass matrix_free\(\.\.\., target='blocks\.0\.hook_resid_post'\)"),
    bad("operator-target-misspelt", lambda m: _matrix_free(m, lambda mf: mf.svd(target="outptu")), r"no hook point 'outptu'\. Did you mean"),
    bad("matrix_free-svd-k-zero", lambda m: _matrix_free(m, lambda mf: mf.svd(k=0)), r"k must be a positive int, got 0"),
    bad("matrix_free-used-after-its-block", _after_block, r"used after its `with` block ended.*Keep the work inside the block"),
    bad("randomized_svd-of-a-LinearMap", lambda m: tl_linmap.randomized_svd(_map(m), 2), r"randomized_svd takes a token's operator, mf\.operator\(source\).*for a LinearMap use lm\.svd\(k\)"),
    bad("randomized_svd-k-zero", lambda m: _matrix_free(m, lambda mf: tl_linmap.randomized_svd(mf.operator(-1), 0)), r"k must be a positive int, got 0"),
    # Reading vectors as tokens.
    bad("unembed-wrong-width", lambda m: tl_linmap.unembed(m, torch.ones(3)), r"Expected a vector of shape \(\.\.\., 64\), got \(3,\)", family="gpt2"),
    bad("unembed-a-list", lambda m: tl_linmap.unembed(m, [0.0] * 64), r"Pass a floating tensor of shape \(\.\.\., 64\), got list"),
    bad("top_tokens-two-vectors", lambda m: tl_linmap.top_tokens(m, _vector(m, 2)), r"shape \(64,\) \(one vector; call once per row\), got \(2, 64\)"),
    bad("top_tokens-integer-tensor", lambda m: tl_linmap.top_tokens(m, torch.ones(64, dtype=torch.long)), r"Pass a floating tensor of shape \(64,\), got a torch\.int64 tensor"),
    bad("top_tokens-k-zero", lambda m: tl_linmap.top_tokens(m, _vector(m), k=0), r"k must be a positive int, got 0"),
    bad("top_tokens-k-beyond-vocabulary", lambda m: tl_linmap.top_tokens(m, _vector(m), k=9999), r"k must be at most 259, got 9999"),
    bad("nearest_tokens-wrong-width", lambda m: tl_linmap.nearest_tokens(m, torch.ones(3)), r"Expected a vector of shape \(64,\), got \(3,\)"),
    bad("nearest_tokens-k-float", lambda m: tl_linmap.nearest_tokens(m, _vector(m), k=2.5), r"k must be a positive int, got 2\.5"),
    # Hooks.
    bad("frozen-factors-a-list", lambda m: _run_frozen(m, []), r"factors must be a dict for the frozen factors to be recorded in \(or None\), got list"),
    # Exactness, steering, plots, tables, loading.
    bad("tolerance-a-string", lambda m: tl_linmap.tolerance("float64"), r"tolerance takes a floating torch dtype"),
    bad("tolerance-an-int-dtype", lambda m: tl_linmap.tolerance(torch.int64), r"tolerance takes a floating torch dtype"),
    bad("concept_vector-of-maps", lambda m: tl_linmap.concept_vector(_maps(m)), r"concept_vector takes one LinearMap.*maps\['blocks"),
    bad("concept_vector-k-zero", lambda m: tl_linmap.concept_vector(_map(m), how="singular", k=0), r"k must be a positive number of singular directions, got 0"),
    bad("concept_vector-of-hook_z", lambda m: tl_linmap.concept_vector(tl_linmap.linear_map(m, SHORT, target="blocks.0.attn.hook_z")), r"is not a residual-stream vector"),
    bad("steering-alpha-a-word", lambda m: tl_linmap.steering_hooks(_maps(m), layer=0, alpha="big"), r"alpha must be a number"),
    bad("steering-positions-a-word", lambda m: tl_linmap.steering_hooks(_maps(m), layer=0, positions="first"), r"positions must be 'all', a slice or a list"),
    bad("steering-positions-beyond-the-call", lambda m: _steered(m, positions=[99]), r"positions=\[99\] does not fit a forward call of \d+ positions"),
    bad("steering-method-unknown", lambda m: tl_linmap.steering_hooks(_maps(m), layer=0, method="operators"), r"method must be 'vector' \(a fixed concept vector\) or 'operator'"),
    bad("steering-operator-with-how", lambda m: tl_linmap.steering_hooks(_maps(m), layer=0, method="operator", how="singular"), r"how='singular' builds a concept vector: it applies to method='vector' only"),
    bad("steering-operator-without-hook_embed", lambda m: _operator_steered_alone(m), r"have the token embeddings of 0 positions for a forward call of \d+ positions.*attach all the hooks of the OperatorSteering"),
    bad("compare_methods-no-sources", lambda m: tl_linmap.compare_methods(m, {}, SHORT, " and", layer=0), r"sources must be a non-empty dict of concept label -> source map"),
    bad("compare_methods-empty-continuation", lambda m: tl_linmap.compare_methods(m, {"x": _maps(m)}, SHORT, "", layer=0), r"continuation must be the fixed text to score after the prompt, got ''"),
    bad("plot_spectra-a-string", lambda m: _plot("plot_spectra", "x"), r"Plots take a LinearMap .* got str"),
    bad("plot_spectra-ALL", lambda m: _plot("plot_spectra", _maps(m), "ALL"), r"source must be an input token index or 'all'"),
    bad("plot_heatmap-an-svd", lambda m: _plot("plot_contribution_heatmap", _map(m).svd()), r"Plots take a LinearMap .* got OperatorSVD"),
    bad("plot_logit_contributions-of-maps", lambda m: _plot("plot_logit_contributions", _maps(m)), r"plot_logit_contributions takes one map"),
    bad("table-of-ints", lambda m: str(tl_linmap.Table([1, 2])), r"rows must be dataclass instances of one type, got int"),
    bad("table-of-a-number", lambda m: tl_linmap.Table(5), r"A Table is built from an iterable of dataclass rows, got int"),
    bad("table-of-mixed-rows", lambda m: tl_linmap.Table([*_map(m).dimensionality(), *_map(m).decode(k=1, top=1)]).records(), r"one type, got DecodedPair, RankRow"),
    bad("load_model-None", lambda m: tl_linmap.load_model(None), r"load_model takes a bundled name"),
    # Attribution patching.
    bad("patching-unequal-lengths", lambda m: tl_linmap.attribution_patching(m, SHORT, "The cat sat down", ("a", "b")),
        r"clean prompt has 12 tokens and the corrupted one 17: .*give two prompts of the same number of tokens"),
    bad("patching-unknown-layout", lambda m: tl_linmap.attribution_patching(m, SHORT, "The dog sat", ("a", "b"), layouts=["resid_pr"]),
        r"Unknown patching layout 'resid_pr'\. Did you mean 'resid_pre'"),
    bad("patching-layouts-a-string", lambda m: tl_linmap.attribution_patching(m, SHORT, "The dog sat", ("a", "b"), layouts="resid_pre"),
        r"layouts must be a list of names, e\.g\. layouts=\['resid_pre'"),
    bad("patching-answer-two-tokens", lambda m: tl_linmap.attribution_patching(m, SHORT, "The dog sat", ("ab", "b")),
        r"'ab' is 2 tokens \('a' \+ 'b'\); give one token such as 'a', or its id"),
    bad("patching-metric-one-token", lambda m: tl_linmap.attribution_patching(m, SHORT, "The dog sat", "a"),
        r"metric must be \(answer, wrong\), two tokens such as \(' Paris', ' Rome'\)"),
    bad("patching-same-answer-twice", lambda m: tl_linmap.attribution_patching(m, SHORT, "The dog sat", ("a", "a")),
        r"logit_diff\('a' - 'a'\): the same token, so always zero"),
    bad("patching-metric-a-direction", lambda m: tl_linmap.attribution_patching(m, SHORT, "The dog sat", tl_linmap.Direction("blocks.0.hook_resid_post", torch.ones(m.cfg.d_model))),
        r"metric is read from the logits; direction @ blocks\.0\.hook_resid_post reads 'blocks\.0\.hook_resid_post'\. Give a Logit, LogitDiff"),
    bad("patching-metric-logit-lens", lambda m: tl_linmap.attribution_patching(m, SHORT, "The dog sat", tl_linmap.LogitDiff("a", "b", hook="blocks.0.hook_resid_post")),
        r"read from the model's logits: give logit_diff\('a' - 'b' @ blocks\.0\.hook_resid_post\) with hook='output'"),
    bad("patching-coefficient-not-finite", lambda m: tl_linmap.attribution_patching(m, SHORT, "The dog sat", {"a": float("nan")}),
        r"The coefficient of 'a' must be a finite number, got nan"),
    bad("LogitCombination-not-a-dict", lambda m: tl_linmap.functionals.LogitCombination([("a", 1.0)]), r"LogitCombination takes a dict \{token: coefficient\}"),
    bad("LogitCombination-all-zero", lambda m: tl_linmap.linear_map(m, SHORT, target=tl_linmap.functionals.LogitCombination({"a": 0.0})),
        r"every coefficient is zero, so always zero"),
    bad("LogitCombination-empty", lambda m: tl_linmap.linear_map(m, SHORT, target=tl_linmap.functionals.LogitCombination({})), r"LogitCombination is empty"),
    bad("patching-unknown-mode", lambda m: tl_linmap.attribution_patching(m, SHORT, "The dog sat", ("a", "b"), mode="linear"),
        r"mode must be 'detached' .* or 'gradient'"),
    bad("patching-position-out-of-range", lambda m: tl_linmap.attribution_patching(m, SHORT, "The dog sat", ("a", "b"), position=12),
        r"Position 12 is out of range .*" + OUT_OF_RANGE),
    bad("corpus_analysis-model-is-a-name", lambda m: tl_linmap.corpus_analysis("smollm2", [SHORT]), MODEL.format("str")),
    bad("corpus_analysis-one-string", lambda m: tl_linmap.corpus_analysis(m, SHORT), r"got one string: pass \['The cat sat'\]"),
    bad("corpus_analysis-no-prompts", lambda m: tl_linmap.corpus_analysis(m, iter([]), progress=False), r"No prompts: give at least one prompt"),
    bad("corpus_analysis-one-token-prompt", lambda m: tl_linmap.corpus_analysis(m, [[5]], progress=False), r"has one token: .*give prompts of two or more tokens"),
    bad("corpus_analysis-layers-out-of-range", lambda m: tl_linmap.corpus_analysis(m, [SHORT], layers=[7]), r"layers must be block indices in \[0, 2\)"),
    bad("corpus_analysis-k-zero", lambda m: tl_linmap.corpus_analysis(m, [SHORT], k=0), r"k must be"),
    bad("corpus_analysis-token-of-two", lambda m: tl_linmap.corpus_analysis(m, [SHORT], token="ab"), r"'ab' is 2 tokens"),
    bad("corpus-profile-bands-zero", lambda m: _corpus(m).attribution_profile(bands=0), r"bands must be"),
    bad("corpus-ranks-unknown-role", lambda m: _corpus(m).ranks("blocks.1.hook_resid_post", "sink"), r"role must be one of \('first'"),
    bad("plot_corpus_dimensionality-of-maps", lambda m: _plot("plot_corpus_dimensionality", _maps(m)), r"Corpus plots take a CorpusAnalysis .* got LinearMaps"),
    bad("phrases-unknown-kind", lambda m: tl_linmap.datasets.phrases("poems"), r"No phrases of kind 'poems'; the kinds are"),
    # Mixtures of experts.
    bad("expert_contributions-a-dense-model", lambda m: tl_linmap.experts.expert_contributions(m, SHORT, 0), r"layer=0 is not a block with a mixture-of-experts router; this model's are \[\]"),
    bad("expert_contributions-layer-out-of-range", lambda m: tl_linmap.experts.expert_contributions(m, SHORT, 5), r"layer=5 is not a block with a mixture-of-experts router; this model's are \[0, 1\]", family="mixtral"),
    bad("gpt_oss-refused", lambda m: tl_linmap.linear_map(m, SHORT), r"GptOssForCausalLM: its experts' activation is a clamped SwiGLU", family="gpt_oss", error=tl_linmap.UnsupportedArchitectureError),
]


def _steered(model, positions):
    with model.hooks(fwd_hooks=tl_linmap.steering_hooks(_maps(model), layer=0, positions=positions)):
        model(SHORT)


def _operator_steered_alone(model):
    # Only the hook that adds the vectors, not those that read the embeddings.
    steering = tl_linmap.steering_hooks(_maps(model), layer=0, method="operator")
    with model.hooks(fwd_hooks=[steering[-1]]):
        model(SHORT)


def _plot(name, *args):
    import matplotlib

    matplotlib.use("Agg")
    from tl_linmap.present import plotting

    return getattr(plotting, name)(*args)


def _user_state(model):
    """Put a model in a state tl_linmap must not disturb: training mode, mixed ``requires_grad`` flags."""
    model.train()
    for i, param in enumerate(model.parameters()):
        param.requires_grad_(i % 3 != 0)
    return model


@pytest.fixture(scope="module")
def toy():
    models = {}

    def get(family):
        if family not in models:
            models[family] = _user_state(toy_model(family, dtype=torch.float32))
        return models[family]

    return get


def _state(model):
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    return {
        "tensors": {name: (t, t.detach().clone()) for name, t in tensors.items()},
        "dtypes": {name: t.dtype for name, t in tensors.items()},
        "flags": {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)},
        "training": {name: m.training for name, m in model.named_modules(remove_duplicate=False)},
        "cfg_dtype": model.cfg.dtype,
        "hooks": hook_count(model),
    }


def _assert_untouched(model, before):
    after = _state(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (tensor, value) in before["tensors"].items():
        now = after["tensors"][name][0]
        assert now is tensor and torch.equal(now, value), name
    for key in ("dtypes", "flags", "training", "cfg_dtype", "hooks"):
        assert after[key] == before[key], key


@pytest.mark.parametrize(("family", "call", "error", "match"), BAD_CALLS)
def test_bad_call(toy, family, call, error, match):
    model = toy(family)
    before = _state(model)
    with pytest.raises(error, match=match):
        call(model)
    _assert_untouched(model, before)


def test_the_table_has_distinct_ids():
    ids = [row.id for row in BAD_CALLS]
    assert len(ids) == len(set(ids))


def test_missing_map_is_still_a_key_error(toy):
    """A mapping's lookups (`in`, `.get`) rely on KeyError; the InputError stays one."""
    maps = _maps(toy("llama"))
    assert maps.get("output") is None and "output" not in maps
    with pytest.raises(KeyError, match=re.escape("No map of 'output'")):
        maps["output"]


@pytest.mark.parametrize("index", [np.int64(-1), torch.tensor(-1)], ids=["numpy", "tensor"])
def test_integer_like_indices_are_accepted(toy, index):
    """What Python indexes with (NumPy integers, 0-d tensors) passes every int check."""
    model = toy("llama")
    lm = tl_linmap.linear_map(model, SHORT, position=index)
    assert lm.position == 11
    assert [row.source for row in lm.decode(k=1, top=1, sources=index)] == [11]
    assert set(tl_linmap.layer_maps(model, SHORT, layers=[np.int64(1)])) == {"blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"}
