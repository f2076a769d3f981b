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
# # Features: a prediction as an exact sum of SAE features
#
# A sparse autoencoder spliced into the model is one more `A(x) · x`: with its active-feature
# mask frozen, encoding and decoding are linear, so the model with the SAE is still an exact
# linear system, and every active feature is one more term of its sums.
#
# The SAE here was trained for this project by `scripts/train_sae.py` (SAELens' trainer, on
# SmolLM2's residual stream after block 15, on text available offline; its `stats.json` says
# which text and what it measured on held-out text). It ships with tl_linmap (float16, a few MB):
# `tl_linmap.load_sae("smollm2-resid15")` reads it as a `tl_linmap.Dictionary`, with no SAELens
# install needed.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
import torch

import tl_linmap
from tl_linmap.load import datasets

# Figures go beside this file wherever it runs from (a notebook runs in its own directory);
# the environment variable TL_LINMAP_FIGURES names another directory.
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
FIGURES = Path(os.environ.get("TL_LINMAP_FIGURES", HERE / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
model = tl_linmap.load_model("smollm2")
sae = tl_linmap.load_sae("smollm2-resid15")
stats = tl_linmap.sae_stats("smollm2-resid15")
site = sae.hook_out
print(sae)
heldout = stats["heldout"]  # measured on held-out text by scripts/train_sae.py
print(f"{stats['architecture']} SAE, d_sae {stats['d_sae']}, k {stats['k']}, on {stats['hook_name']}: explained variance "
      f"{heldout['explained_variance']:.3f}, mean L0 {heldout['mean_l0']:.1f}, dead {heldout['dead_fraction']:.1%} "
      f"({heldout['n_tokens']} held-out tokens, positions {heldout['positions']})")

# %% [markdown]
# ## The prediction, split into features
# `tl_linmap.spliced(model, [sae])` splices the SAE in through its hook point for the block. The
# error term `x − SAE(x)` stays live (`error="live"`, the default): the model's output is unchanged,
# and its token-level maps are those of the model without the SAE. `feature_contributions` then
# splits the predicted token's logit into direct effects: every active feature (its activation times
# the logit's derivative along its decoder direction), the SAE's error at each position, the tokens'
# paths around the SAE (none here: the SAE reads the whole residual stream) and a constant. They sum
# to the logit exactly; the result checks it.

# %%
prompt = "The Eiffel Tower is in the city of"
tokens = model.to_tokens(prompt)
predicted = int(model(tokens)[0, -1].argmax())
target = tl_linmap.Logit(predicted)
print("predicted:", repr(model.to_string([predicted])))
with tl_linmap.spliced(model, [sae]):
    split = tl_linmap.feature_contributions(model, tokens, target=target)
print(split)
print(f"features {float(split.values.sum()):+.3f} + errors {float(split.errors.sum()):+.3f} + constant "
      f"{float(split.constant[0]):+.3f} = {float(split.total()[0]):.4f}; the logit: {float(split.output[0]):.4f} "
      f"(relative error {split.relative_error():.1e})")
split.plot(n=20)
plt.savefig(FIGURES / "08_feature_contributions.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## What the top features are
# The largest terms sit at the first token, the attention sink, whose residual stream is ~130 times
# the typical norm: the SAE was trained on positions 2 and later, so there its activations are huge
# and its error term large. The features at the predicted token's own position say more about the
# prediction. Each is read
# two ways: its decoder direction through `W_U` (the logit lens of what it writes), and the bundled
# phrases' tokens on which it is most active.

# %%
phrases = datasets.phrases()
cache_tokens = [model.to_tokens(p) for p in phrases]


def activations(texts_tokens):
    """Every position's SAE activations over the phrases, with (phrase, position) labels."""
    rows, labels = [], []
    with torch.no_grad():
        for i, t in enumerate(texts_tokens):
            _, cache = model.run_with_cache(t, names_filter=[site])
            x = cache[site][0].to(sae.W_enc)
            pre = sae.pre(x)
            rows.append(pre * sae.mask(x, pre))
            labels += [(i, p) for p in range(t.shape[1])]
    return torch.cat(rows), labels


corpus_acts, labels = activations(cache_tokens)
print(split.top(5))
last = split.position
top = [row for row in split.top(len(split.features)) if row.position == last][:5]
for row in top:
    f = row.feature
    lens = tl_linmap.top_tokens(model, sae.W_dec[f].to(model.W_U), k=6, bias=False)
    strongest = corpus_acts[:, f].topk(5)
    contexts = []
    for value, index in zip(strongest.values.tolist(), strongest.indices.tolist()):
        i, p = labels[index]
        words = model.to_str_tokens(cache_tokens[i])
        contexts.append(f"{''.join(words[max(0, p - 3):p])}[{words[p]}] ({value:.1f})")
    print(f"feature {f} at {row.position} ({row.token!r}): activation {row.activation:.2f}, direct effect {row.contribution:+.3f}")
    print("   decoder through W_U:", ", ".join(repr(t) for t, _ in lens))
    print("   most active on:     ", " | ".join(contexts))

# %% [markdown]
# ## A feature's map to the output
# `feature_map` pushes one feature's decoder direction, written at one position, through the frozen
# system to a target: the target's change per unit of activation. To the logit it is a number (the
# direct effect above divided by the activation); to the final norm's output it is a vector, which
# decodes through `W_U` after everything the later blocks do to it, unlike the logit lens above.

# %%
best = top[0]
with tl_linmap.spliced(model, [sae]):
    to_logit = tl_linmap.feature_map(model, tokens, site, best.feature, target=target, source=best.position)
    to_output = tl_linmap.feature_map(model, tokens, site, best.feature, target="output", source=best.position)
    to_resid = tl_linmap.feature_map(model, tokens, site, best.feature, target="blocks.20.hook_resid_post", source=best.position)
print(to_logit, f"= {best.contribution:.4f} / {best.activation:.4f}")
print("map to the output, decoded:", tl_linmap.top_tokens(model, to_output.values.to(model.W_U), k=8, bias=False))

# %% [markdown]
# ## Steering by a feature
# `feature_steering` adds a feature's decoder direction where its SAE writes (`r + alpha · ‖r‖ · d`,
# as the concept vectors of tutorial 04); `steering_hooks(feature_map)` steers along its map at a
# later layer instead. Both are TransformerLens hook lists; they work on the model without the SAE.
# Measured as tutorial 04 measures: on the unsteered greedy continuation of an unrelated prompt,
# the mean log-probability shift of the concept tokens (here: the feature map's top decoded tokens),
# and how many of the steered greedy continuation's tokens are concept tokens.

# %%
concept = [t for t, _ in tl_linmap.top_tokens(model, to_output.values.to(model.W_U), k=5, bias=False)]
unrelated = "My favourite thing to do on the weekend is"
by_decoder = tl_linmap.feature_steering(sae, best.feature, alpha=0.5)
by_map = tl_linmap.steering_hooks(to_resid, alpha=0.5)
alphas = (0.0, 0.25, 0.5, 1.0)
sweeps = {
    "decoder direction": tl_linmap.alpha_sweep(model, by_decoder, unrelated, alphas=alphas, concept_tokens=concept),
    "map to block 20": tl_linmap.alpha_sweep(model, by_map, unrelated, alphas=alphas, concept_tokens=concept),
}
for name, table in sweeps.items():
    print(f"\n{name} (concept tokens {concept}):")
    print(table.to_string(cell_width=80))

fig, ax = plt.subplots(figsize=(5, 3))
for name, table in sweeps.items():
    ax.plot([r.alpha for r in table], [r.shift for r in table], marker="o", label=name)
ax.set(xlabel="alpha (fraction of the residual norm)", ylabel="mean log-prob shift (nats)",
       title=f"Steering by feature {best.feature}")
ax.legend(fontsize=7)
fig.savefig(FIGURES / "08_feature_steering.png", dpi=120, bbox_inches="tight")
