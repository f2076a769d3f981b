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
# # Many prompts: batched maps and a corpus analysis
#
# On the bundled SmolLM2-135M-Instruct and the bundled phrases (`tl_linmap.load.datasets`):
#
# 1. **One call, many prompts.** Every entry point takes a list of prompts; the results are
#    those of the one-prompt calls, their forwards shared.
# 2. **A corpus analysis**, streamed over prompts: how many dimensions each layer's operators
#    use, which tokens they write, and which input tokens carry the predicted token's logit.
#    `scripts/dataset_tables.py` runs the same analysis on all hundred phrases (README tables).

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import torch

import tl_linmap
from tl_linmap import corpus_analysis
from tl_linmap.load import datasets
from tl_linmap.present.plotting import plot_corpus_attribution, plot_corpus_concepts, plot_corpus_dimensionality

# Figures go beside this file wherever it runs from (a notebook runs in its own directory);
# the environment variable TL_LINMAP_FIGURES names another directory.
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
FIGURES = Path(os.environ.get("TL_LINMAP_FIGURES", HERE / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
model = tl_linmap.load_model("smollm2")
started = time.time()

# %% [markdown]
# ## The bundled phrases
# A hundred short phrases written for this project, ten of each kind, and clean/corrupted pairs
# for patching (`datasets.prompt_pairs()`, used in tutorial 05).

# %%
print(datasets.phrase_kinds())
one_of_each = [datasets.phrases(kind)[0] for kind in datasets.phrase_kinds()]
for phrase in one_of_each:
    print(f"{len(model.to_tokens(phrase)[0]):3d} tokens  {phrase!r}")

# %% [markdown]
# ## One call, many prompts
# A list of prompts of mixed lengths gives a list of results, one per prompt, each the one-prompt
# call's (float32 here: the batched forwards are grouped differently, so the two agree to float32
# rounding; in float64 they agree to 1e-12, `tests/test_batch.py`). Each prompt's contributions
# still add up to its own output.

# %%
prompts = one_of_each[:4]
tl_linmap.token_contributions(model, prompts[0], dtype=torch.float32)  # first-call costs out of the timings
start = time.perf_counter()
looped = [tl_linmap.token_contributions(model, p, dtype=torch.float32) for p in prompts]
looped_s = time.perf_counter() - start
start = time.perf_counter()
batched = tl_linmap.token_contributions(model, prompts, dtype=torch.float32)
batched_s = time.perf_counter() - start
for c, one in zip(batched, looped):
    gap = ((c.values - one.values).norm() / one.values.norm()).item()
    print(f"{len(c.values):3d} tokens: batched vs one-prompt {gap:.1e}, reconstruction {c.relative_error():.1e}")
    assert gap < 1e-4
print(f"batched {batched_s:.1f} s, loop {looped_s:.1f} s")

# %% [markdown]
# The batch shares the plain and frozen forwards; the pushes (one row per input token through the
# prompt) are as many products per prompt either way, so on a CPU the gain stays below 2x
# (`benchmarks/batch.py` measures where the time goes).
#
# ## A corpus analysis
# `corpus_analysis` maps `hook_resid_post` of the chosen layers at each prompt's last position,
# keeps a few numbers per operator and drops the maps, so a generator of any length works.
# Ten phrases (one of each kind) and two layers here; a progress bar shows.

# %%
analysis = corpus_analysis(model, one_of_each, layers=[15, 29], dtype=torch.float32)
analysis

# %% [markdown]
# How many dimensions the operators use, by token role: the first token (the attention sink),
# the middle ones, the last one, and the stacked operator of every token but the first.

# %%
analysis.dimensionality()

# %%
fig = plot_corpus_dimensionality(analysis, "rank90")
fig.savefig(FIGURES / "07_corpus_dimensionality.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# The tokens each layer's stacked operator writes (its leading left singular vectors read through
# the frozen final norm and `W_U`), as the share of prompts where they appear.

# %%
analysis.concepts(top=8)

# %%
fig = plot_corpus_concepts(analysis)
fig.savefig(FIGURES / "07_corpus_concepts.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# Which input tokens carry each prompt's predicted next token's logit: its exact split over the
# tokens, as shares of the prompt's total absolute attribution, averaged by position.

# %%
profile = analysis.attribution_profile()
profile

# %%
fig = plot_corpus_attribution(analysis)
fig.savefig(FIGURES / "07_corpus_attribution.png", dpi=120, bbox_inches="tight")
first = next(row for row in profile if row.segment == "first")
print(f"the first token's mean share of the logit split: {first.mean_share:+.2f}")
print(f"tutorial time: {time.time() - started:.0f} s")
