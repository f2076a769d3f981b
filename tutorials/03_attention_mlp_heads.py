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
# # Attention vs MLP, and per-head attribution
#
# With `modules=True`, `layer_maps` also maps every attention output, MLP output and
# `attn.hook_z`, and heads come from `hook_z` through `W_O` at no extra cost. The logit of
# the predicted token then splits exactly over input tokens, layers, modules and heads.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
import torch
from transformer_lens import utilities as utils

import tl_linmap
from tl_linmap.present import plotting

# Figures go beside this file wherever it runs from (a notebook runs in its own directory);
# the environment variable TL_LINMAP_FIGURES names another directory.
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
FIGURES = Path(os.environ.get("TL_LINMAP_FIGURES", HERE / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
model = tl_linmap.load_model("smollm2")
prompt = "The capital of France is"
maps = tl_linmap.layer_maps(model, prompt, modules=True)
print(len(maps), "maps; worst relative error:", max(lm.relative_error() for lm in maps.values()))

# %% [markdown]
# ## Exact attribution of " Paris"

# %%
att = tl_linmap.token_attribution(model, maps, " Paris")
print(f"logit {att.logit:.4f} = parts {att.total():.4f}")
n = model.cfg.n_layers
attn = torch.stack([att.per_component[utils.get_act_name("attn_out", L)] for L in range(n)])
mlp = torch.stack([att.per_component[utils.get_act_name("mlp_out", L)] for L in range(n)])
print("from the embeddings directly:", float(att.per_component[utils.get_act_name("resid_pre", 0)].sum()))
print("all attention layers:", float(attn.sum()), " all MLP layers:", float(mlp.sum()))
att  # a notebook shows its HTML summary

# %%
fig, ax = plt.subplots(figsize=(9, 3.5))
ax.bar(range(n), attn.sum(1).tolist(), width=0.4, label="attention", align="edge")
ax.bar([L - 0.4 for L in range(n)], mlp.sum(1).tolist(), width=0.4, label="MLP", align="edge")
ax.set(xlabel="layer", ylabel="contribution to the ' Paris' logit", title="Per layer: attention vs MLP")
ax.legend()
fig.savefig(FIGURES / "03_attention_vs_mlp.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# The first token's part of the logit, separated: it is the attention sink, so its terms
# are large and mostly cancel.

# %%
print("first token:", float(att.per_token[0]), " others:", att.per_token[1:].tolist())

# %% [markdown]
# ## Heads
# The heads whose output moves the " Paris" logit most, summed over source tokens, and
# which source token each reads from.

# %%
tokens = att.str_tokens
top = sorted(att.per_head.items(), key=lambda kv: -abs(float(kv[1].sum())))[:8]
for (layer, head), parts in top:
    source = int(parts[1:].abs().argmax()) + 1
    print(f"L{layer}H{head}: {float(parts.sum()):+.3f}  (first token {float(parts[0]):+.3f}, most from {tokens[source]!r})")

# %% [markdown]
# A head's own exact linear map: its operators decode like any other residual-stream map.
# Read the top head's operator of the source token it draws on most.

# %%
(layer, head), parts = top[0]
source = int(parts[1:].abs().argmax()) + 1
head_map = maps.head(layer, head)
print(head_map.target, f"exact to {head_map.relative_error():.1e}; reading from {tokens[source]!r}")
print(head_map.decode(k=2, top=6, sources=source))

# %% [markdown]
# Contribution norms of attention and MLP outputs per layer and source token:

# %%
for kind in ("attn_out", "mlp_out"):
    only = {name: lm for name, lm in maps.items() if name.endswith(f"hook_{kind}")}
    fig = plotting.plot_contribution_heatmap(only)
    fig.savefig(FIGURES / f"03_heatmap_{kind}.png", dpi=120, bbox_inches="tight")
