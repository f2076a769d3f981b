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
# # Attribution graphs: one prediction as an exact graph of direct effects
#
# An attribution graph (circuit-tracer's, after Anthropic's "Attribution Graphs") has nodes for the
# input tokens, the model's parts and the output logits, and an edge for each direct effect: with
# attention patterns, norm scales and activation functions frozen, what one node adds to another while
# every other node is held fixed. Those are the factors tl_linmap freezes, so it builds the same graph
# exactly, on any model it maps: with SAEs or transcoders (features and error terms as nodes) or with
# none (every attention head and MLP output as a node, no error anywhere). Every node's inputs sum to
# its value and the logit to its sources, to 1e-12 in float64: the graph checks it when it is made.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
import torch

import tl_linmap

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
FIGURES = Path(os.environ.get("TL_LINMAP_FIGURES", HERE / "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
model = tl_linmap.load_model("smollm2")
prompt = "The Eiffel Tower is in the city of"

# %% [markdown]
# ## The graph of heads and MLP outputs
# Without dictionaries, the nodes between tokens and logits are every attention head (its `hook_z`)
# and every MLP output, at every position. The targets are circuit-tracer's: the likeliest next tokens
# until their probability reaches 0.95 (at most `max_logits`), each read as its logit minus the mean
# logit, weighted by its probability. Rows (each node's incoming edges) are computed for the targets,
# then for the nodes with the most influence on them, `max_nodes` in all: the cost grows with the nodes
# kept. What the nodes left out carry into a row is that row's `remainders`, so the sums stay exact.
#
# A head's or MLP's value is its effect on the weighted targets, `g · v` (its output times the targets'
# gradient there, everything after it live): the edges into it are edge attribution patching's scores,
# here exact.

# %%
graph = tl_linmap.attribution_graph(model, prompt, max_logits=3, max_nodes=160)
print(graph)
print(graph.to_table(top=12))
graph  # a notebook draws it

# %% [markdown]
# ## Pruned, and the path that carries the most
# `prune` keeps the nodes and edges that carry most of the influence on the targets (circuit-tracer's
# thresholds and definitions; the same masks on the same graph, tested against circuit-tracer); what it
# drops moves to the remainders, so the pruned graph is exact too. `path` follows, from a token to the
# top target, the largest share of each next node's inputs. The first token is left out as a start: it
# feeds the attention sink, which every position reads.

# %%
pruned = graph.prune(node_threshold=0.8, edge_threshold=0.95)
print(pruned)
later = graph.kind_mask("token") & (graph.nodes[:, 2] > 0)
path = graph.path(sources=later)
print("\nThe path that carries most of the top logit's input, from a token after the first:")
for step, (label, weight, share) in enumerate(zip(path.labels, (None, *path.weights), (None, *path.shares))):
    print(f"  {'' if weight is None else f'--> {weight:+.3f} ({share:.0%} of its inputs) --> '}{label}")
print(f"(strength {path.strength:.3g}: the product of the shares, times the target's probability)")

# %% [markdown]
# In words (each share is a fraction of the next node's inputs, circuit-tracer's normalisation, so a
# path of large shares is what the logit mostly rests on):

# %%
print(path.describe())

(FIGURES / "09_graph.html").write_text(pruned.to_html(node_threshold=1.0, edge_threshold=1.0, title=f"{prompt!r}: heads and MLP outputs"))

# %% [markdown]
# ## Where the influence sits
# Each node's influence on the targets (the weight of every path from it through the normalised
# edges), summed by layer for heads and for MLP outputs.

# %%
influence = graph.influence()
layers = torch.tensor([graph.layer(i) for i in range(len(graph))])
fig, ax = plt.subplots(figsize=(7, 3))
for kind, colour in (("head", "#e69f00"), ("mlp", "#cc79a7")):
    mask = graph.kind_mask(kind)
    per_layer = torch.zeros(model.cfg.n_layers, dtype=influence.dtype).index_add_(0, layers[mask], influence[mask])
    ax.bar(torch.arange(model.cfg.n_layers) + (0.2 if kind == "mlp" else -0.2), per_layer, width=0.4, color=colour, label=kind)
ax.set(xlabel="layer", ylabel="influence on the targets", title=f"{prompt!r}: influence by layer")
ax.legend()
fig.savefig(FIGURES / "09_graph_influence.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## With the SAE of tutorial 08
# With the SAE spliced in at block 15, its active features and its error term at each position are the
# nodes: circuit-tracer's kind of graph. Its error nodes are sources with no inputs: what the SAE
# misses enters the graph from nowhere. circuit-tracer's replacement score says how much of the
# tokens' influence on the logit runs through features rather than errors.

# %%
sae = tl_linmap.load_sae("smollm2-resid15")
features = tl_linmap.attribution_graph(model, prompt, dictionaries=[sae], max_logits=3)
replacement, completeness = features.scores()
print(features)
print(f"replacement score {replacement:.3f}, completeness {completeness:.3f}")
errors = features.kind_mask("error")
share = features.totals[errors].sum(0) / features.target_values
print("the error terms' total effect, as a share of each target:",
      ", ".join(f"{t}: {float(s):+.1%}" for t, s in zip(features.targets, share)))

# %% [markdown]
# ## What the exact graph shows that the error-node graph cannot
# The graph of heads and MLP outputs has no error node: its replacement score is 1, and every unit of
# each logit is carried by a head or an MLP at a position (or the constant: biases, no learned
# position here). Where the SAE graph says "error at position 8", the exact graph says which heads and
# MLPs of the blocks after 15 wrote what the SAE's features do not hold. The same graph, with both
# the SAE's features and the modules as nodes, opens the blocks before the SAE too.

# %%
print("heads and MLPs:", tl_linmap.attribution_graph(model, prompt, max_logits=3, max_nodes=32).scores())
after = graph.kind_mask("head", "mlp") & (layers > 15)
top_after = sorted(after.nonzero()[:, 0].tolist(), key=lambda i: -float(influence[i]))[:5]
print("the most influential parts after the SAE's block:", ", ".join(f"{graph.label(i)} ({float(influence[i]):.3f})" for i in top_after))
both = tl_linmap.attribution_graph(model, prompt, dictionaries=[sae], modules=True, max_logits=3, max_nodes=160)
print(both)
print(both.to_table(top=8, kinds=("feature", "head", "mlp")))

# %% [markdown]
# ## circuit-tracer's browser, and saving
# On a graph of features whose targets are logits, `to_circuit_tracer()` returns a
# `circuit_tracer.graph.Graph` (where circuit-tracer is installed): its `prune_graph`,
# `create_graph_files` and local graph browser then work on it. Any graph saves to one
# `.safetensors` file and loads back bit for bit without the model.

# %%
saved = features.save(FIGURES / "09_features_graph")
again = tl_linmap.load(saved)
print(saved.name, torch.equal(again.adjacency, features.adjacency))
try:
    ct_graph = features.to_circuit_tracer(scan="smollm2-resid15")
    print("circuit-tracer graph:", tuple(ct_graph.adjacency_matrix.shape))
except ImportError:
    print("circuit-tracer is not installed here (it pins TransformerLens < 4): pip install circuit-tracer beside TransformerLens 2.x")
