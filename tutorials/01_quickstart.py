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
# # Quickstart: one inference as an exact linear system
#
# Every operation of a transformer can be written as `A(x) · x`. Freezing the
# input-dependent factors `A(x)` (norm scales, MLP gates, attention patterns) at their
# inference values leaves the forward values bit-identical and makes the model a linear
# function of its input embeddings: `y = Σ_i J_i x_i + b`, one operator `J_i` per input
# token. This notebook computes that system for SmolLM2-135M, checks that it reconstructs
# the model's output exactly, and reads what the operators say.
#
# Open `01_quickstart.ipynb` (this file's pair, kept in step by jupytext) in Jupyter, or run this file
# as a script.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import torch

import tl_linmap
from tl_linmap.present import plotting

# Figures go beside this file wherever it runs from (a notebook runs in its own directory);
# the environment variable TL_LINMAP_FIGURES names another directory.
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
FIGURES = Path(os.environ.get("TL_LINMAP_FIGURES", HERE / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
model = tl_linmap.load_model("smollm2")  # bundled weights, no network needed
prompt = "The capital of France is"

# %% [markdown]
# ## The linear map of the next-token output
# `linear_map` works in float64 (the model's own dtype is restored afterwards). The
# target is the final norm's output at the last position: the vector the unembedding reads.

# %%
lm = tl_linmap.linear_map(model, prompt)
print(lm.operators.shape, "one d_model x d_model operator per input token")
print(f"relative reconstruction error: {lm.relative_error():.2e}")
print(f"gap of the plain forward (HF's RMSNorm runs in float32) to the float64 reference: {lm.native_gap():.2e}")
lm  # a notebook shows its HTML summary: the tokens coloured by their contribution

# %% [markdown]
# The reconstruction is not taken on trust: rebuild `y` by hand from the operators and the
# embeddings the model produced, and compare with the model's own logits.

# %%
x = lm.inputs  # hook_embed output, one row per token
by_hand = sum(J @ x_i for J, x_i in zip(lm.operators, x)) + lm.bias
with torch.no_grad():
    logits = model(lm.tokens[None])[0, -1].double()
lens = lm.reader.logits(by_hand, affine=True)
print("same top-5 tokens as the model:", logits.topk(5).indices.tolist() == lens.topk(5).indices.tolist())
# The model's plain forward runs HF's RMSNorm in float32, hence a ~1e-5 logit gap (lm.native_gap()).
print("max logit difference to the plain forward:", float((lens - logits).abs().max()))
assert lm.relative_error() < 1e-12

# %% [markdown]
# float32 works too, at float32 precision:

# %%
print(f"float32 relative error: {tl_linmap.linear_map(model, prompt, dtype=torch.float32).relative_error():.1e}")

# %% [markdown]
# ## What each token contributes
# `contributions()` are the terms `J_i x_i`; they sum to `y − b`. The first token is an
# attention sink: its contribution is large but it carries little about the answer.

# %%
for token, norm in zip(lm.str_tokens, lm.contributions().norm(dim=-1)):
    print(f"{token!r:>12} {float(norm):8.3f}")

# %% [markdown]
# Split the logit of " Paris" exactly over the input tokens (plus the constant part). The
# parts add up to the model's own logit.

# %%
split = lm.logit_contributions(" Paris")
print(f"logit {split.logit:.4f} = parts {split.total():.4f}")
fig = plotting.plot_logit_contributions(split)
fig.savefig(FIGURES / "01_paris_logit.png", dpi=120, bbox_inches="tight")
fig = plotting.plot_logit_contributions(split, skip_first=True)
fig.savefig(FIGURES / "01_paris_logit_without_first.png", dpi=120, bbox_inches="tight")
split

# %% [markdown]
# ## What an operator does
# Each `J_i` is a matrix; its singular vectors say which input directions of token `i` it
# reads (right vectors, compared with the token embeddings) and which output directions it
# writes (left vectors, read through the unembedding). Signs are chosen so each left vector
# points along the actual output.

# %%
print(lm.decode(k=3, top=6, sources=-1))

# %% [markdown]
# The operators are low-rank: a handful of directions hold most of their energy.

# %%
print(lm.dimensionality())  # one row per token's operator, then the stacked one's
print(lm.dimensionality(skip_first=True, per_token=False))  # the stacked operator only, first token left out
