# ---
# jupyter:
#   jupytext:
#     formats: py:percent
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
import torch

import tl_linmap

FIGURES = Path(os.environ.get("TL_LINMAP_FIGURES", "figures"))
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
print(source.decode(k=3, top=8, tokens=[], stacked=True, skip_first=True))
print(source.decode(k=3, top=8, tokens=[], stacked=True))

# %% [markdown]
# The steering direction is the sum of the source tokens' contributions, first token left out
# (`concept_vector(source)`; `how="singular"` uses the top singular directions instead).
#
# ## Generate with and without the steering hooks
# The hooks are a TransformerLens `(name, fn)` list: use them with `model.hooks`.

# %%
prompt = "My favourite thing to do on the weekend is"
kwargs = dict(max_new_tokens=20, do_sample=False, use_past_kv_cache=False, verbose=False)
plain = model.generate(prompt, **kwargs)
hooks = tl_linmap.steering_hooks(model, source, layer=layer, alpha=0.1)
with model.hooks(fwd_hooks=hooks):
    steered = model.generate(prompt, **kwargs)
print("plain:  ", repr(plain))
print("steered:", repr(steered))

# %% [markdown]
# How much more likely the concept tokens become along the steered continuation, per alpha:

# %%
concept = [int(model.to_tokens(w, prepend_bos=False)[0, 0]) for w in (" Golden", " Gate", " Bridge", " bridge", " San", " Francisco")]
tokens = model.to_tokens(steered)
start = len(model.to_tokens(prompt)[0]) - 1
with torch.no_grad():
    base = model(tokens)[0, start:].log_softmax(-1)[:, concept]
alphas = [0.0, 0.05, 0.1, 0.15, 0.2]
shifts = []
for alpha in alphas:
    with torch.no_grad(), model.hooks(fwd_hooks=tl_linmap.steering_hooks(model, source, layer=layer, alpha=alpha)):
        shifts.append(float((model(tokens)[0, start:].log_softmax(-1)[:, concept] - base).mean()))
print(dict(zip(alphas, [round(s, 2) for s in shifts])))
assert shifts[2] > 1.0  # alpha 0.1 raises the concept by more than a nat on average

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(alphas, shifts, marker="o")
ax.set(xlabel="alpha (fraction of the residual norm)", ylabel="mean log-prob shift (nats)",
       title="Golden Gate concept tokens, layer 15")
fig.savefig(FIGURES / "04_steering_shift.png", dpi=120, bbox_inches="tight")
