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
# # Detached attribution patching
#
# Activation patching runs the model on a clean prompt with one activation replaced by the
# corrupted prompt's, and measures a metric (here the logit difference " Paris" − " Rome").
# With every factor `A(x)` (norm scales, attention patterns, MLP gates) frozen at the clean
# run's values, the model after any activation is affine in it, so in that frozen system the
# patch moves the metric by exactly `J · (a_corrupted − a_clean)`. One reverse pass of the
# frozen clean run gives `J` for every layer, position, module and head at once.
#
# Here that prediction is set against TransformerLens's own activation patching of the same
# pair and against ordinary gradient attribution patching (the same product with the plain,
# non-detached gradient).

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
import torch
import transformer_lens.patching as tl_patching

import tl_linmap
from tl_linmap.present import plotting
from tl_linmap.load.datasets import prompt_pairs
from tl_linmap.results.patching import LAYOUTS

# Figures go beside this file wherever it runs from (a notebook runs in its own directory);
# the environment variable TL_LINMAP_FIGURES names another directory.
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
FIGURES = Path(os.environ.get("TL_LINMAP_FIGURES", HERE / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
model = tl_linmap.load_model("smollm2")
pair = prompt_pairs()[0]  # bundled pairs: equal token lengths on SmolLM2, one-token answers
print(pair)

# %% [markdown]
# ## The prediction: one forward and one backward of the clean run, one forward of the corrupted
# Every layout of `transformer_lens.patching` comes from the same passes; `result[layout]` has
# the shape of the TransformerLens function of that name (`get_act_patch_resid_pre`: layers x
# positions, `get_act_patch_attn_head_out_all_pos`: layers x heads, ...).

# %%
detached = tl_linmap.attribution_patching(model, pair.clean, pair.corrupted, pair.metric)
gradient = tl_linmap.attribution_patching(model, pair.clean, pair.corrupted, pair.metric, mode="gradient")
print(detached)
for layout in ("resid_pre", "attn_head_out_all_pos", "block_every"):
    print(f"{layout:24s} {tuple(detached[layout].shape)}  like transformer_lens.patching.{LAYOUTS[layout].function}")

# %% [markdown]
# ## True activation patching with TransformerLens
# `transformer_lens.patching` patches its `clean_cache` into the run of its `corrupted_tokens`.
# The prediction is of *noising* (the corrupted activation patched into the clean run), so the
# roles are swapped in the call. Its functions work on TL 4.3's `TransformerBridge` as they do
# on a `HookedTransformer`; `detached.metric` is a callable they take as `patching_metric`.

# %%
clean, corrupted = model.to_tokens(pair.clean), model.to_tokens(pair.corrupted)
with torch.no_grad():
    _, corrupted_cache = model.run_with_cache(corrupted)
    baseline = detached.metric(model(clean)).item()  # the unpatched clean run, as TL's runs compute it
    every = tl_patching.get_act_patch_block_every(model, clean, corrupted_cache, detached.metric)
    heads = tl_patching.get_act_patch_attn_head_out_all_pos(model, clean, corrupted_cache, detached.metric)
truth = {"resid_pre": every[0], "attn_out": every[1], "mlp_out": every[2], "attn_head_out_all_pos": heads}
print(f"metric: clean {baseline:.3f}, corrupted {detached.corrupted_metric:.3f}")

# %% [markdown]
# ## How well each linear prediction tracks true patching
# Pearson correlation over the cells of each layout, the relative error, and the cell with the
# largest miss.

# %%
table = tl_linmap.Table(
    result.compare(layout, actual, baseline=baseline) for layout, actual in truth.items() for result in (detached, gradient)
)
print(table)

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 5.5), layout="constrained")
for ax, (values, title) in zip(axes, [
    (detached["resid_pre"], "detached prediction"),
    (gradient["resid_pre"], "gradient attribution patching"),
    (truth["resid_pre"] - baseline, "TransformerLens activation patching"),
]):
    plotting.plot_patching(values, "resid_pre", labels=detached.labels, title=f"resid_pre: {title}", ax=ax)
fig.savefig(FIGURES / "05_resid_pre.png", dpi=120, bbox_inches="tight")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 5.5), layout="constrained")
for ax, (values, title) in zip(axes, [
    (detached["attn_head_out_all_pos"], "detached"),
    (gradient["attn_head_out_all_pos"], "gradient"),
    (truth["attn_head_out_all_pos"] - baseline, "true patching"),
]):
    plotting.plot_patching(values, "attn_head_out_all_pos", title=f"heads, all positions: {title}", ax=ax)
fig.savefig(FIGURES / "05_heads.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## Where the linear prediction fails
# Predicted against true Δmetric, every cell of the four layouts: the cells on the diagonal are
# predicted well. The misses are the large patches: the corrupted token's own residual stream
# in the early layers (" France" → " Italy") flips the answer by about the whole clean−corrupted
# gap, far from where a linearisation at the clean run holds. What the frozen system leaves out
# is exactly what it holds fixed: the corrupted activation also changes the norm scales, the
# attention patterns of every later layer and the MLP gates, and those effects compound.

# %%
fig, ax = plt.subplots(figsize=(5.5, 5.5), layout="constrained")
for result, marker in ((detached, "o"), (gradient, "x")):
    predicted = torch.cat([result[layout].flatten() for layout in truth])
    actual = torch.cat([(values - baseline).flatten() for values in truth.values()])
    ax.scatter(actual, predicted, s=12, marker=marker, label=result.mode, alpha=0.7)
low, high = float(actual.min()), float(actual.max())
ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
ax.set(xlabel="true Δmetric (TransformerLens patching)", ylabel="predicted Δmetric", title="Every cell of the four layouts")
ax.legend()
fig.savefig(FIGURES / "05_predicted_vs_true.png", dpi=120, bbox_inches="tight")

for layout, actual in truth.items():
    row = detached.compare(layout, actual, baseline=baseline)
    print(f"{layout:22s} worst cell {row.worst_cell}: predicted {row.predicted:+.2f}, true {row.actual:+.2f}")

# %% [markdown]
# Queries and keys reach the metric only through the attention pattern, which the frozen
# system holds fixed: their patches are predicted to do nothing (gradient attribution
# patching sees a first-order effect through the pattern).

# %%
print("detached, q patches:", float(detached["attn_head_q_all_pos"].abs().max()))
print("gradient, q patches:", float(gradient["attn_head_q_all_pos"].abs().max()))

# %% [markdown]
# ## What the prediction is, exactly
# Held at the clean run's factors (`tl_linmap.frozen(..., factors=)` records them,
# `tl_linmap.replay_hooks` substitutes them), the model is affine in any activation, so the
# patch of the whole residual stream at layer 0 (the corrupted run's embeddings) moves the
# metric by exactly the sum of the predictions of its positions: the prediction is the frozen
# clean system's own patch, not an approximation of it. (In the model's working float32 here;
# in float64 the two agree to about 1e-15.)

# %%
factors = {}
with tl_linmap.frozen(model, factors=factors), torch.no_grad():
    frozen_clean = detached.metric(model(clean)).item()
stream = corrupted_cache["blocks.0.hook_resid_pre"]
with torch.no_grad(), model.hooks(fwd_hooks=tl_linmap.replay_hooks(model, factors) + [("blocks.0.hook_resid_pre", lambda act, hook=None: stream)]):
    frozen_patched = detached.metric(model(clean)).item()
single = tl_linmap.attribution_patching(model, clean, corrupted, pair.metric, layouts=["resid_pre"], dtype=None)
print(f"frozen clean system, resid_pre 0 patched: Δ = {frozen_patched - frozen_clean:+.5f}")
print(f"sum of the predictions of its positions:  Δ = {single['resid_pre'][0].sum().item():+.5f}")
print(f"the real model (the corrupted run):       Δ = {detached.corrupted_metric - detached.clean_metric:+.5f}")
