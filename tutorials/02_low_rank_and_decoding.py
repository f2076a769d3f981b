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
# # Low-dimensional operators, decoded across layers
#
# Every intermediate output has its own exact linear system: each layer's residual stream
# is `Σ_i J_i^(L) x_i + b^(L)`. This notebook maps the residual stream of several layers,
# measures how many dimensions the operators use, and reads their top singular vectors as
# tokens, with the first token (the attention sink) both included and left out.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
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
layers = [0, 5, 10, 15, 20, 25, 29]

# %% [markdown]
# `layer_maps` shares the forward passes between all targets. Keys are TransformerLens
# hook names; every map is exact.

# %%
maps = tl_linmap.layer_maps(model, prompt, layers=layers)
resid = {layer: maps[utils.get_act_name("resid_post", layer)] for layer in layers}
print({layer: f"{lm.relative_error():.1e}" for layer, lm in resid.items()})

# %% [markdown]
# ## How many dimensions?
# Stable rank, effective rank (entropy of the normalised singular values) and the number of
# singular values holding 90% / 99% of the squared Frobenius norm, with and without the
# first token. `per_token=False` gives one row per map, for its stacked operator
# `[J_0 … J_n]`; `layer_maps` holds two maps per layer (`hook_resid_mid` and
# `hook_resid_post`, more with `modules=True`), so `targets=` picks each layer's
# `hook_resid_post`: one row per layer.

# %%
names = [utils.get_act_name("resid_post", layer) for layer in layers]
print(maps.dimensionality(per_token=False, targets=names))
print(maps.dimensionality(per_token=False, skip_first=True, targets=names))

# %% [markdown]
# Per token at the last layer: the first token's operator is nearly rank one.

# %%
print(resid[29].dimensionality())

# %%
only = {name: maps[name] for name in names}
fig = plotting.plot_spectra(only, source=-1)
fig.savefig(FIGURES / "02_spectra_last_token.png", dpi=120, bbox_inches="tight")
fig = plotting.plot_spectra(only, source=0)
fig.savefig(FIGURES / "02_spectra_first_token.png", dpi=120, bbox_inches="tight")
fig = plotting.plot_contribution_heatmap(only)
fig.savefig(FIGURES / "02_contribution_heatmap.png", dpi=120, bbox_inches="tight")
fig = plotting.plot_contribution_heatmap(only, skip_first=True)
fig.savefig(FIGURES / "02_contribution_heatmap_without_first.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## Decoding across layers
# The last token's top three singular pairs at each depth: left vectors through the frozen
# final norm and `W_U` (what the operator writes), right vectors by cosine with `W_E` (what
# it reads from the token's embedding).

# %%
decoded = maps.decode(k=3, top=8, sources=-1, targets=names)
print(decoded)
fig = plotting.plot_decoded(only, source=-1, k=3, top=3)
fig.savefig(FIGURES / "02_decoded_last_token.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# The stacked operator over all tokens, with and without the first one:

# %%
print(maps.decode(k=3, top=8, sources=[], stacked=True, targets=names[-2:]))
print(maps.decode(k=3, top=8, sources=[], stacked=True, skip_first=True, targets=names[-2:]))
fig = plotting.plot_decoded(only, source="all", k=3, top=3, skip_first=True)
fig.savefig(FIGURES / "02_decoded_stacked.png", dpi=120, bbox_inches="tight")
