# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Logit differences, whole sequences, and maps from a middle layer
#
# Three extensions of the linear map of one inference, on the bundled SmolLM2-135M-Instruct:
#
# 1. **Linear readouts as targets**: the logit difference " Paris" − " London" is a linear
#    functional of the output (the final norm frozen), so its map costs one reverse row, and it
#    splits exactly over tokens x layers x modules x heads.
# 2. **Whole-sequence attributions**: every target position at once, and every token of a
#    generated continuation, from the same forward passes that give one position.
# 3. **Maps from any layer** (`source=`): the operator from a middle layer to the output, and a
#    middle layer's singular vector pushed forward through the frozen system and read as tokens.

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
import torch
from transformer_lens import utilities as utils

import tl_linmap
from tl_linmap.base.guard import borrowed
from tl_linmap.freeze.hooks import quiet_norm_edits

# Figures go beside this file wherever it runs from (a notebook runs in its own directory);
# the environment variable TL_LINMAP_FIGURES names another directory.
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
FIGURES = Path(os.environ.get("TL_LINMAP_FIGURES", HERE / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
model = tl_linmap.load_model("smollm2")
prompt = "The capital of France is"
diff = tl_linmap.LogitDiff(" Paris", " London")
started = time.time()

# %% [markdown]
# ## The model's own logit difference
# The reference value: the model's own forward in float64 (`borrowed` casts the model and puts
# every tensor back afterwards, bit for bit), with its norms sent down the code path the frozen
# pass takes (`same_path_hooks`: every value live, nothing frozen; the bridge's native RMSNorm
# path rounds through float32, a ~1e-7 gap; `quiet_norm_edits` silences the bridge's note on
# that), next to its plain float32 forward.

# %%
tokens = model.to_tokens(prompt)
paris, london = (model.to_single_token(t) for t in (" Paris", " London"))
with torch.no_grad():
    plain = model(tokens)[0, -1]
    with borrowed(model, torch.float64), quiet_norm_edits(), model.hooks(fwd_hooks=tl_linmap.same_path_hooks(model)):
        own = model(tokens)[0, -1]
own_diff = float(own[paris] - own[london])
print(f"model's logit difference: float64 {own_diff:.6f}, float32 {float(plain[paris] - plain[london]):.6f}")

# %% [markdown]
# ## One reverse row
# As a target, the readout's map is a `LinearMap` with `d_out = 1`: `w · y = Σ_i (w J_i) x_i + w · b`,
# one row `w J_i` per input token instead of a `d_model x d_model` operator.

# %%
row = tl_linmap.linear_map(model, prompt, target=diff)
print(row.operators.shape, "one row per input token")
print(f"reconstructed {float(row.output[0]):.6f}, relative error {row.relative_error():.1e}")
for token, share in zip(row.str_tokens, row.contributions()[:, 0]):
    print(f"{token!r:>12} {float(share):+8.3f}")
print(f"constant (w · b + c): {float(row.bias[0]):+.3f}")

# %% [markdown]
# ## Tokens x layers x modules x heads
# `token_attribution` takes the readout as it takes a token: every layer's module maps split
# it over source tokens, over each attention and MLP output, and over each head. Every split
# adds up to the model's own logit difference.

# %%
maps = tl_linmap.layer_maps(model, prompt, modules=True)
att = tl_linmap.token_attribution(model, maps, diff)
n = model.cfg.n_layers
attn = torch.stack([att.per_component[utils.get_act_name("attn_out", L)] for L in range(n)])
mlp = torch.stack([att.per_component[utils.get_act_name("mlp_out", L)] for L in range(n)])
embed = att.per_component[utils.get_act_name("resid_pre", 0)]
heads = {key: float(parts.sum()) for key, parts in att.per_head.items()}
by_modules = float(embed.sum() + attn.sum() + mlp.sum()) + att.constant + att.unembed_bias
print(f"the model's own:          {own_diff:.12f}")
print(f"per token, summed:        {att.total():.12f}  off by {abs(att.total() - own_diff):.1e}")
print(f"per module, summed:       {by_modules:.12f}  off by {abs(by_modules - own_diff):.1e}")
worst_heads = max(abs(sum(heads[(L, h)] for h in range(model.cfg.n_heads)) + att.head_rest[L] - float(attn[L].sum())) for L in range(n))
print(f"heads + rest vs their attention layer: worst gap {worst_heads:.1e}")
scale = float(own.abs().max())  # the exactness bound is relative to the logits' size
assert abs(att.total() - own_diff) < 1e-12 * scale and abs(by_modules - own_diff) < 1e-12 * scale
for (layer, head), value in sorted(heads.items(), key=lambda kv: -abs(kv[1]))[:5]:
    print(f"  head {layer}.{head}: {value:+.3f}")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 1]})
left.bar(range(n), attn.sum(1).tolist(), width=0.4, label="attention", align="edge")
left.bar([L - 0.4 for L in range(n)], mlp.sum(1).tolist(), width=0.4, label="MLP", align="edge")
left.set(xlabel="layer", ylabel="share of the logit difference", title="' Paris' − ' London' per layer and module")
left.legend()
right.bar(range(len(att.str_tokens)), att.per_token.tolist(), tick_label=[repr(s) for s in att.str_tokens])
right.set(title="per input token")
right.tick_params(axis="x", rotation=45)
fig.savefig(FIGURES / "06_logit_diff_split.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## Every position at once
# Pushing token `i`'s own embedding through the frozen system gives its contribution `J_{t,i} x_i`
# at every later position `t`, so one set of forward passes gives the whole
# `(target position, source position)` map. With a readout the cells are its exact shares at
# each position (the final norm frozen there): where along the prompt " Paris" overtakes " London".

# %%
sentence = "The Eiffel Tower is in Paris, and the capital of France is"
seq = tl_linmap.sequence_attribution(model, sentence, target=diff)
print(seq)
print(f"rows reconstruct the model's value: worst gap {float((seq.total() - seq.output).abs().max()):.1e}")
fig = seq.plot(skip_first=True)
fig.savefig(FIGURES / "06_sequence_heatmap.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## A generated continuation
# `generation_attribution` generates greedily, then splits each generated token's logit over
# the prompt and the tokens generated before it. Row `k` is the step that produced token `k`.

# %%
gen = tl_linmap.generation_attribution(model, prompt, 6, dtype=torch.float32)
print(gen.predicted)
print(gen.table())
fig = gen.plot()
fig.savefig(FIGURES / "06_generation_heatmap.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## From a middle layer to the output: `source=`
# `source=` names the hook point the map starts at: `y = Σ_i J_i s_i + b`, with `s_i` that
# hook's activation at position `i`. One block, and layer 15 to the output:

# %%
block = tl_linmap.linear_map(model, prompt, source="blocks.15.hook_resid_pre", target="blocks.15.hook_resid_post", dtype=torch.float32)
tail = tl_linmap.linear_map(model, prompt, source="blocks.15.hook_resid_post", dtype=torch.float32)
print(f"block 15:           relative error {block.relative_error():.1e}")
print(f"layer 15 -> output: relative error {tail.relative_error():.1e}; |J_i|_F per position",
      [round(float(J.norm()), 1) for J in tail.operators])

# %% [markdown]
# ## A middle layer's directions, read at the output
# The operator from the " France" token's embedding to the last position's residual stream at
# layer 15 writes mostly along a few left singular vectors `u`. They live in layer 15's residual
# stream, where the unembedding does not read them as the output does. `push_forward` carries
# them through the rest of the frozen system (the reference code's `transform_to_output`: one
# forward of three rows) and reads them at the output; the same vectors times the layer-15 ->
# output operator above agree. (The logits are small: `u` has norm 1, the residual stream at
# layer 15 hundreds.)

# %%
mid = tl_linmap.linear_map(model, prompt, target="blocks.15.hook_resid_post", dtype=torch.float32)
u = mid.svd(k=3).left[3]  # (3, d_model): the top left singular vectors of the " France" token's operator
pushed = tl_linmap.push_forward(model, prompt, u, source="blocks.15.hook_resid_post", dtype=torch.float32)
lens = pushed.reader.top(pushed.reader.logits(u), 5)  # the same vectors read directly, as if at the output
for j, (top, direct) in enumerate(zip(pushed.top_tokens(5), lens)):
    print(f"u_{j + 1} pushed to the output:", "  ".join(f"{t!r} {v:.3f}" for t, v in top))
    print("     read at layer 15:      ", "  ".join(f"{t!r} {v:.3f}" for t, v in direct))
by_operator = u @ tail.operators[-1].T
print(f"push_forward vs the dense operator: relative gap {float((pushed.values - by_operator).norm() / by_operator.norm()):.1e}")

# %%
fig, axes = plt.subplots(1, len(u), figsize=(4.5 * len(u), 3.2), constrained_layout=True)
for j, (ax, top) in enumerate(zip(axes, pushed.top_tokens(8))):
    ax.barh(range(len(top))[::-1], [v for _, v in top], tick_label=[repr(t) for t, _ in top])
    ax.set(title=f"u_{j + 1}", xlabel="logit (linear part)")
fig.suptitle("Top left singular vectors of the ' France' token's operator at layer 15, pushed to the output")
fig.savefig(FIGURES / "06_pushed_forward.png", dpi=120, bbox_inches="tight")

# %%
print(f"tutorial ran in {time.time() - started:.0f} s after loading the model")
