"""One model, two implementations: TransformerLens 3.x's HookedTransformer and TransformerBridge.

The same unprocessed Hugging Face weights, booted as a bridge and converted to a
HookedTransformer by TransformerLens's own code: their linear maps must agree as closely as
their plain forwards do. GPT-2's two implementations agree to ~4e-16, so its operators must
agree to 1e-10. Rotary models cannot agree that closely: Hugging Face computes the rotary
sines and cosines in float32, TransformerLens in the model's dtype (~5e-8); there the
operators must agree to within `GAP_MULTIPLE` times the two plain forwards' own gap. Each
implementation stays exact to 1e-12 against its own forward. Both are compared at
``ln_final.hook_normalized`` (before the final norm's weight in both).

Collected only where both classes exist (tests/conftest.py): CI's TransformerLens 3.9 environment.
"""

import pytest
import torch
from conftest import PROMPT

import tl_linmap
from tl_linmap.load.hf import hooked_from_hf
from tl_linmap.load.toy import toy_model, toy_tokenizer

#: How far the operators may differ, as a multiple of the two implementations' plain-forward gap.
GAP_MULTIPLE = 4
TARGET = "ln_final.hook_normalized"
FAMILIES = ["gemma3", "gpt2", "llama", "pythia", "qwen2", "qwen3"]


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def _pair(family):
    bridge = toy_model(family)
    with torch.no_grad():  # weights on the float32 grid: TransformerLens's GPT-2 conversion rounds biases to it
        for param in bridge.original_model.parameters():
            param.copy_(param.float().double())
    config = bridge.original_model.config
    if family == "gpt2":
        config.n_ctx = config.n_positions  # the converter reads n_ctx
    hooked = hooked_from_hf(bridge.original_model, toy_tokenizer(), dtype=torch.float64)
    return bridge, hooked


def _plain_gap(bridge, hooked, tokens):
    # The largest relative gap of the two plain forwards over every layer's residual stream and position.
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(bridge.cfg.n_layers)] + [TARGET]
    with torch.no_grad():
        _, a = hooked.run_with_cache(tokens, names_filter=names)
        _, b = bridge.run_with_cache(tokens, names_filter=names)
    return max(_relative(a[n][0, i].double(), b[n][0, i].double()) for n in names for i in range(tokens.shape[1]))


def compare(bridge, hooked, prompt, label):
    """Both maps of the same target, each exact, and their agreement next to the plain-forward gap."""
    tokens = bridge.to_tokens(prompt)
    plain_gap = _plain_gap(bridge, hooked, tokens)
    a = tl_linmap.linear_map(hooked, tokens, target=TARGET)
    b = tl_linmap.linear_map(bridge, tokens, target=TARGET)
    operator_gap = _relative(a.operators, b.operators)
    print(f"{label}: plain forwards {plain_gap:.1e}, operators {operator_gap:.1e}, "
          f"errors {a.relative_error():.1e} (hooked) {b.relative_error():.1e} (bridge)")
    assert a.relative_error() < 1e-12 and b.relative_error() < 1e-12
    return plain_gap, operator_gap


@pytest.mark.parametrize("family", FAMILIES)
def test_both_implementations_give_the_same_operators(family):
    bridge, hooked = _pair(family)
    plain_gap, operator_gap = compare(bridge, hooked, PROMPT, family)
    if family == "gpt2":
        assert plain_gap < 1e-14 and operator_gap < 1e-10
    else:
        assert operator_gap <= GAP_MULTIPLE * plain_gap


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3-270m"])
def test_real_models_agree_across_implementations(name):
    bridge = tl_linmap.load_model(name, kind="bridge")
    hooked = tl_linmap.load_model(name, kind="hooked")
    plain_gap, operator_gap = compare(bridge, hooked, "The capital of France is", name)
    assert operator_gap <= GAP_MULTIPLE * plain_gap
