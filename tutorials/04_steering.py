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
# # Steering a concept into unrelated text
#
# A layer's linear map of a source prompt says which direction its tokens write into that
# layer's residual stream. Adding that direction while the model reads an unrelated prompt
# steers the continuation towards the concept.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt

import tl_linmap
from tl_linmap.methods.steering import alpha_sweep, word_tokens

# Figures go beside this file wherever it runs from (a notebook runs in its own directory);
# the environment variable TL_LINMAP_FIGURES names another directory.
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
FIGURES = Path(os.environ.get("TL_LINMAP_FIGURES", HERE / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
model = tl_linmap.load_model("smollm2")
layer = 15
source = tl_linmap.linear_map(model, "The Golden Gate Bridge", target=f"blocks.{layer}.hook_resid_post")
print(f"source map exact to {source.relative_error():.1e}")

# %% [markdown]
# What the source map says: the top singular pairs of its stacked operator `[J_0 … J_n]`, the
# first token left out (it is the attention sink, not the concept) and, for comparison, kept.
# Right vectors read which input tokens each direction comes from.

# %%
print(source.decode(k=3, top=8, sources=[], stacked=True, skip_first=True))
print(source.decode(k=3, top=8, sources=[], stacked=True))

# %% [markdown]
# The steering direction is the sum of the source tokens' contributions (`concept_vector(source)`;
# `how="singular"` uses the top singular directions instead). The first token is left out only
# when it is a BOS the model prepended (`skip_first="auto"`): SmolLM2 prepends none, so "The"
# stays in. `steering_hooks` returns a `Steering`, a TransformerLens `(name, fn)` hook list that
# also says which tokens built the vector.
#
# ## Generate with and without the steering hooks

# %%
prompt = "My favourite thing to do on the weekend is"
alpha = 0.25
steering = tl_linmap.steering_hooks(source, layer=layer, alpha=alpha)
print(steering)
kwargs = {"max_new_tokens": 20, "do_sample": False, "use_past_kv_cache": False, "verbose": False}
plain = model.generate(prompt, **kwargs)
with model.hooks(fwd_hooks=steering):
    steered = model.generate(prompt, **kwargs)
print("plain:  ", repr(plain))
print("steered:", repr(steered))

# %% [markdown]
# ## The paper's steering operator
# `method="operator"` applies the source's operators `J_i` to the steered text's own token
# embeddings instead (reused cyclically, summed over positions, scaled to the residual norm the
# same way); `compare_methods` and `scripts/steering_compare.py` set the two side by side.

# %%
operator = tl_linmap.steering_hooks(source, layer=layer, alpha=alpha, method="operator")
print(operator)
with model.hooks(fwd_hooks=operator):
    print("operator:", repr(model.generate(prompt, **kwargs)))

# %% [markdown]
# ## How far each alpha moves the concept
# `alpha_sweep` fixes the unsteered greedy continuation, scores it teacher-forced with and
# without steering (so every alpha is compared on the same tokens) and reports the concept
# tokens' mean log-probability shift, how many tokens of the steered greedy text are concept
# tokens, and that text. The concept tokens default to the single-token spellings of the
# source's content words (`word_tokens`).

# %%
concepts = ["The Golden Gate Bridge", "Chocolate cake", "The Eiffel Tower in Paris"]
sweeps = {}
for concept in concepts:
    concept_map = source if concept == "The Golden Gate Bridge" else tl_linmap.linear_map(
        model, concept, target=f"blocks.{layer}.hook_resid_post")
    print(f"\n{concept}: measured on {word_tokens(model, concept)}")
    sweeps[concept] = alpha_sweep(model, concept_map, prompt, layer=layer)
    print(sweeps[concept].to_string(cell_width=90))

# The README's table: mean log-prob shift in nats (concept tokens in the steered text).
print("\n| alpha | " + " | ".join(f'"{c}"' for c in concepts) + " |")
print("|---|" + "---|" * len(concepts))
for rows in zip(*sweeps.values()):
    print(f"| {rows[0].alpha:g} | " + " | ".join(f"{r.shift:+.2f} ({r.mentions})" for r in rows) + " |")
at_alpha = [next(r for r in table if r.alpha == alpha) for table in sweeps.values()]
assert all(r.shift > 1.0 and r.mentions > 0 for r in at_alpha), at_alpha  # the README's alpha moves every concept

fig, ax = plt.subplots(figsize=(5, 3))
for concept, table in sweeps.items():
    ax.plot([r.alpha for r in table], [r.shift for r in table], marker="o", label=concept)
ax.set(xlabel="alpha (fraction of the residual norm)", ylabel="mean log-prob shift (nats)",
       title=f"Concept tokens, layer {layer}")
ax.legend(fontsize=7)
fig.savefig(FIGURES / "04_steering_shift.png", dpi=120, bbox_inches="tight")
