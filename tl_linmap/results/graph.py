"""Results of `tl_linmap.attribution_graph`: nodes, their direct effects on each other, and what reads them."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_linmap.base.errors import InputError
from tl_linmap.base.exactness import check_exact
from tl_linmap.base.saving import Saveable, config_hash
from tl_linmap.base.table import Table, table_row
from tl_linmap.present import display, views
from tl_linmap.present.graph_view import graph_fragment, graph_html
from tl_linmap.reading import influence as inf

#: Node kinds, by the code in `Graph.nodes`' first column.
KINDS = ("feature", "error", "head", "mlp", "token", "target")


def layer_of(site: str) -> int:
    """The block a hook belongs to (``blocks.L.…``), -1 for one outside the blocks.

    Args:
        site: A hook name.

    Returns:
        ``L`` or -1.
    """
    found = re.match(r"blocks\.(\d+)\.", site)
    return int(found.group(1)) if found else -1


def short_label(name: str) -> str:
    """A circuit-tracer logit target's name as its token (``"centered_logit(' Paris')"`` -> ``"' Paris'"``); others as they are.

    Args:
        name: A node's label.

    Returns:
        The shorter label.
    """
    found = re.fullmatch(r"centered_logit\((.*)\)", name)
    return found.group(1) if found else name


@table_row
@dataclass
class NodeRow:
    """One node of a `Graph`.

    Attributes:
        index: Its index in the graph.
        kind: ``"feature"``, ``"error"``, ``"head"``, ``"mlp"``, ``"token"`` or ``"target"``.
        label: How it is named in pictures.
        layer: Its block (-1 for tokens, ``n_layers`` for targets).
        position: Sequence position.
        value: What its inputs sum to (a source: its total effect on the weighted targets).
        influence: Its influence on the targets (circuit-tracer's, through the graph's normalised edges).
    """

    index: int
    kind: str
    label: str
    layer: int
    position: int
    value: float
    influence: float


@table_row
@dataclass
class EdgeRow:
    """One edge of a `Graph`: ``source``'s direct effect on ``target``'s value.

    Attributes:
        source: The source node's label.
        target: The target node's label.
        weight: The direct effect.
        share: Its share of the target's inputs (``|weight| / Σ|inputs|``).
        source_index: The source node's index.
        target_index: The target node's index.
    """

    source: str
    target: str
    weight: float
    share: float
    source_index: int
    target_index: int


@dataclass(frozen=True)
class GraphPath(Saveable):
    """The path that carries most of the targets' input: at each step, the largest share of the next node's inputs.

    Attributes:
        nodes: Node indices, source first, target last.
        labels: Their labels.
        kinds: Their kinds.
        weights: The edges' direct effects.
        shares: The edges' shares of their target's inputs.
        strength: The product of the shares, times the target's weight.
    """

    nodes: tuple[int, ...]
    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    weights: tuple[float, ...]
    shares: tuple[float, ...]
    strength: float

    def describe(self) -> str:
        """The path in words.

        Returns:
            E.g. ``"the token 'iffel' at 2 feeds MLP 0 at 2 (100% of its input), which feeds head 23.4 at 8 (41%), ..."``.
        """
        def name(label: str, kind: str) -> str:
            where = label.rpartition(" @")
            at = f" at {where[2]}" if where[1] else ""
            if kind == "token":
                return f"the token {where[0]}{at}"
            if kind == "head":
                layer, head = where[0].removeprefix("L").split(".H")
                return f"head {layer}.{head}{at}"
            if kind == "mlp":
                return f"MLP {where[0].removeprefix('MLP')}{at}"
            if kind == "feature":
                layer, feature = where[0].removeprefix("L").split(" #")
                return f"feature {feature} of layer {layer}{at}"
            if kind == "error":
                return f"the error of layer {where[0].removeprefix('err L')}{at}"
            return f"the target {short_label(label)}"

        steps = [f"{'feeds' if i == 0 else 'which feeds'} {name(label, kind)} ({share:.0%}{' of its input' if i == 0 else ''})"
                 for i, (label, kind, share) in enumerate(zip(self.labels[1:], self.kinds[1:], self.shares))]
        return f"{name(self.labels[0], self.kinds[0])} {', '.join(steps)}"

    def __str__(self) -> str:
        steps = [self.labels[0]] + [f"--{w:+.3g} ({s:.0%})--> {label}" for label, w, s in zip(self.labels[1:], self.weights, self.shares)]
        return " ".join(steps)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(str(self))}</p><p>{html.escape(self.describe())}</p>"


@dataclass(frozen=True)
class Graph(Saveable):
    """An attribution graph: nodes and the direct effect of each on each other, exact.

    Nodes come in this order: features, error terms (each by dictionary, then position), heads and MLP
    outputs (block by block: a block's heads, then its MLP), tokens, targets. ``adjacency[t, s]`` is the direct effect of ``s`` on ``t``'s value with
    every other node held fixed and every factor frozen: into a feature, its pre-activation; out of a
    feature, scaled by its activation (circuit-tracer's units); into a head or MLP output, its value
    ``g · v`` (its effect on the weighted targets). Every node with inputs sums exactly:

        ``values = adjacency · 1 + remainders + constants``

    where ``remainders`` hold what nodes left out of the graph (not expanded, or pruned) carry into a
    row, and ``constants`` what no node carries (biases, ``b_enc``, positional embeddings). And each
    target is its sources' total effects (``totals``, tokens and errors) plus ``target_constants``.
    Both are checked on construction (`check`).

    Attributes:
        nodes: ``(n, 4)`` ints: kind (`KINDS`), site (index into ``sites``), position, id (feature id, head; else 0; target index).
        sites: Hook names of dictionaries and modules, ``hook_embed``, and the targets' names.
        adjacency: ``(n, n)`` rows targets, columns sources.
        values: ``(n,)`` what each node's inputs sum to (a source: its total effect on the weighted targets).
        activations: ``(n,)`` a feature's activation (what its outgoing edges scale with); 0 for other kinds.
        constants: ``(n,)`` per node with inputs, what no node carries.
        remainders: ``(n,)`` per node with inputs, what nodes outside the graph carry.
        totals: ``(n, k)`` per source node (token, error), its total effect on each target.
        weights: ``(k,)`` the targets' weights (probabilities for circuit-tracer's logits).
        targets: The targets' names.
        target_tokens: ``(k,)`` a logit target's token id, -1 for other readouts.
        target_values: ``(k,)`` the targets' values in the frozen forward with errors held.
        target_constants: ``(k,)`` the targets with every source node of the graph zero (a pruned error's total is in it).
        input_ids: The prompt's token ids.
        str_tokens: The prompt's tokens as text.
        position: The targets' position.
        convention: The dictionaries' error convention (``"none"`` without dictionaries).
        model_name: The model's name.
        config: The model's sizes (``n_layers``, ``d_model``, ``d_vocab``, ...).
    """

    nodes: Int[Tensor, "n 4"] = field(repr=False)
    sites: tuple[str, ...] = field(repr=False)
    adjacency: Float[Tensor, "n n"] = field(repr=False)
    values: Float[Tensor, " n"] = field(repr=False)
    activations: Float[Tensor, " n"] = field(repr=False)
    constants: Float[Tensor, " n"] = field(repr=False)
    remainders: Float[Tensor, " n"] = field(repr=False)
    totals: Float[Tensor, "n k"] = field(repr=False)
    weights: Float[Tensor, " k"] = field(repr=False)
    targets: tuple[str, ...]
    target_tokens: Int[Tensor, " k"] = field(repr=False)
    target_values: Float[Tensor, " k"] = field(repr=False)
    target_constants: Float[Tensor, " k"] = field(repr=False)
    input_ids: Int[Tensor, " pos"] = field(repr=False)
    str_tokens: tuple[str, ...] = field(repr=False)
    position: int = -1
    convention: str = "none"
    model_name: str = ""
    config: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.check()

    # --- what the graph holds ---------------------------------------------------------------

    def kind_mask(self, *kinds: str) -> Bool[Tensor, " n"]:
        """The nodes of some kinds.

        Args:
            kinds: Names from `KINDS`.

        Returns:
            ``(n,)`` bool.
        """
        return torch.isin(self.nodes[:, 0], torch.tensor([KINDS.index(k) for k in kinds]))

    @property
    def has_row(self) -> Tensor:
        """``(n,)`` the nodes with inputs (features, heads, MLP outputs, targets)."""
        return self.kind_mask("feature", "head", "mlp", "target")

    def layer(self, i: int) -> int:
        """A node's block: -1 for tokens, ``n_layers`` for targets.

        Args:
            i: Node index.

        Returns:
            The layer.
        """
        kind = KINDS[int(self.nodes[i, 0])]
        if kind == "token":
            return -1
        if kind == "target":
            return int(self.config.get("n_layers") or 0)
        return layer_of(self.sites[int(self.nodes[i, 1])])

    def label(self, i: int) -> str:
        """A node's name: ``"L3 #412 @5"`` (feature), ``"err L3 @5"``, ``"L3.H2 @5"``, ``"MLP3 @5"``, ``"' Paris' @5"``, or the target's name.

        Args:
            i: Node index.

        Returns:
            The label.
        """
        kind, site, pos, idx = (int(v) for v in self.nodes[i])
        layer = self.layer(i)
        return {
            "feature": lambda: f"L{layer} #{idx} @{pos}",
            "error": lambda: f"err L{layer} @{pos}",
            "head": lambda: f"L{layer}.H{idx} @{pos}",
            "mlp": lambda: f"MLP{layer} @{pos}",
            "token": lambda: f"{self.str_tokens[pos]!r} @{pos}",
            "target": lambda: self.sites[site],
        }[KINDS[kind]]()

    def __len__(self) -> int:
        return len(self.nodes)

    # --- exactness --------------------------------------------------------------------------

    def relative_error(self) -> float:
        """The largest gap of a row or target sum, relative to the larger of its value and the sum of its parts' sizes.

        Returns:
            The relative error.
        """
        rows = self.has_row
        parts = self.adjacency[rows].abs().sum(-1) + self.remainders[rows].abs() + self.constants[rows].abs()
        sums = self.adjacency[rows].sum(-1) + self.remainders[rows] + self.constants[rows]
        scale = torch.maximum(parts, self.values[rows].abs()).clamp(min=torch.finfo(self.values.dtype).tiny)
        gaps = ((sums - self.values[rows]).abs() / scale).tolist()
        total = self.totals.sum(0) + self.target_constants
        t_scale = torch.maximum(self.totals.abs().sum(0) + self.target_constants.abs(), self.target_values.abs()).clamp(min=torch.finfo(self.values.dtype).tiny)
        gaps += ((total - self.target_values).abs() / t_scale).tolist()
        targets = self.kind_mask("target")
        gaps += ((self.values[targets] - self.target_values).abs() / t_scale).tolist()
        return max(gaps, default=0.0)

    def check(self) -> float:
        """Raise `tl_linmap.base.errors.FreezeError` unless every row and target sums to its value.

        Returns:
            The relative error.
        """
        return check_exact(self.relative_error(), self.adjacency.dtype, f"the attribution graph of {', '.join(self.targets)}")

    # --- influence, pruning, scores (circuit-tracer's definitions) ----------------------------

    def _target_weights(self) -> Tensor:
        w = torch.zeros(len(self), dtype=self.adjacency.dtype)
        w[self.kind_mask("target")] = self.weights
        return w

    def influence(self) -> Float[Tensor, " n"]:
        """Each node's influence on the targets: the weight of every path to them through the normalised edges.

        Returns:
            ``(n,)``.
        """
        return inf.influence(inf.normalized(self.adjacency), self._target_weights())

    def pruning(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> inf.Pruning:
        """Which nodes and edges carry most of the influence (circuit-tracer's ``prune_graph``, same masks).

        Args:
            node_threshold: Keep the nodes that carry this fraction of the total influence.
            edge_threshold: Keep the edges that carry this fraction of the pruned graph's.

        Returns:
            A `tl_linmap.reading.influence.Pruning`.
        """
        inner = ~self.kind_mask("token", "target")
        return inf.prune(self.adjacency, self._target_weights(), inner=inner, needs_inputs=self.kind_mask("feature", "head", "mlp"),
                         node_threshold=node_threshold, edge_threshold=edge_threshold)

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
        """The graph of the nodes and edges `pruning` keeps, still exact: what it drops goes to the remainders.

        Args:
            node_threshold: As for `pruning`.
            edge_threshold: As for `pruning`.

        Returns:
            A smaller `Graph`.
        """
        kept = self.pruning(node_threshold, edge_threshold)
        return self.subgraph(kept.nodes, kept.edges)

    def subgraph(self, nodes: Bool[Tensor, " n"], edges: Bool[Tensor, "n n"] | None = None) -> Graph:
        """The graph restricted to some nodes (and edges); what the others carry into a kept row becomes its remainder.

        Args:
            nodes: ``(n,)`` bool: the nodes to keep (tokens and targets are always kept).
            edges: ``(n, n)`` bool: the edges to keep (None: all between kept nodes).

        Returns:
            The `Graph`.
        """
        nodes = nodes | self.kind_mask("token", "target")
        a = self.adjacency if edges is None else self.adjacency * edges
        dropped = self.adjacency - a
        remainders = self.remainders + dropped.sum(-1) + a[:, ~nodes].sum(-1)
        keep = nodes.nonzero()[:, 0]
        return replace(
            self, nodes=self.nodes[keep], adjacency=a[keep][:, keep], values=self.values[keep], activations=self.activations[keep],
            constants=self.constants[keep], remainders=remainders[keep], totals=self.totals[keep],
            target_constants=self.target_constants + self.totals[~nodes].sum(0),  # a pruned error's total moves there
        )

    def scores(self) -> tuple[float, float]:
        """circuit-tracer's replacement and completeness scores (1.0 without error nodes).

        Returns:
            ``(replacement, completeness)``.
        """
        return inf.scores(self.adjacency, self._target_weights(), tokens=self.kind_mask("token"), errors=self.kind_mask("error"))

    # --- reading it -------------------------------------------------------------------------

    def to_table(self, top: int | None = 20, kinds: tuple[str, ...] | None = None) -> Table:
        """The nodes, most influential first.

        Args:
            top: How many (None: all).
            kinds: Only these kinds (None: all).

        Returns:
            A `tl_linmap.Table` of `NodeRow`.
        """
        score = self.influence()
        mask = self.kind_mask(*kinds) if kinds else torch.ones(len(self), dtype=torch.bool)
        order = [i for i in torch.argsort(score, descending=True, stable=True).tolist() if mask[i]]
        rows = [NodeRow(i, KINDS[int(self.nodes[i, 0])], self.label(i), self.layer(i), int(self.nodes[i, 2]), float(self.values[i]), float(score[i])) for i in order[:top]]
        targets = [i for i in range(len(self)) if KINDS[int(self.nodes[i, 0])] == "target" and mask[i] and i not in order[:top]]
        return Table(rows + [NodeRow(i, "target", self.label(i), self.layer(i), int(self.nodes[i, 2]), float(self.values[i]), 0.0) for i in targets])

    def edges(self, top: int = 20) -> Table:
        """The largest edges by their share of their target's inputs times the target's influence.

        Args:
            top: How many.

        Returns:
            A `tl_linmap.Table` of `EdgeRow`.
        """
        a = inf.normalized(self.adjacency)
        score = a * (self.influence() + self._target_weights())[:, None]
        flat = torch.argsort(score.flatten(), descending=True)[:top]
        n = len(self)
        return Table([EdgeRow(self.label(int(i) % n), self.label(int(i) // n), float(self.adjacency.flatten()[i]), float(a.flatten()[i]), int(i) % n, int(i) // n)
                      for i in flat if score.flatten()[i] > 0])

    def path(self, target: int | str | None = None, sources: Bool[Tensor, " n"] | None = None) -> GraphPath:
        """The path that carries most of a target's input: the largest product of shares from a token or error.

        Args:
            target: The target's index in `targets` or its name (None: the heaviest target).
            sources: ``(n,)`` bool: the nodes it may start from (None: every token and error). A first token
                that only feeds an attention sink can be left out with ``g.kind_mask("token") & (g.nodes[:, 2] > 0)``.

        Returns:
            The `GraphPath`.
        """
        targets = self.kind_mask("target").nonzero()[:, 0]
        j = int(torch.argmax(self.weights)) if target is None else self.targets.index(target) if isinstance(target, str) else int(target)
        a = inf.normalized(self.adjacency)
        reach = torch.zeros(len(self), dtype=a.dtype)
        reach[targets[j]] = self.weights[j]
        for _ in range(len(self)):  # the largest product of shares from each node to the target: a longest path on a DAG
            new = torch.maximum(reach, (a * reach[:, None]).max(0).values)
            if torch.equal(new, reach):
                break
            reach = new
        sources = self.kind_mask("token", "error") if sources is None else sources
        start = int(torch.argmax(torch.where(sources, reach, torch.full_like(reach, -1.0))))
        if not reach[start] > 0:
            raise InputError(f"No path with weight reaches {self.targets[j]!r} from the sources given (its weight or every share on the way is 0).")
        path = [start]
        while path[-1] != int(targets[j]):
            s = path[-1]
            path.append(int(torch.argmax(a[:, s] * reach)))
        weights = [float(self.adjacency[t, s]) for s, t in zip(path, path[1:])]
        shares = [float(a[t, s]) for s, t in zip(path, path[1:])]
        kinds = tuple(KINDS[int(self.nodes[i, 0])] for i in path)
        return GraphPath(tuple(path), tuple(self.label(i) for i in path), kinds, tuple(weights), tuple(shares), float(reach[start]))

    # --- pictures ---------------------------------------------------------------------------

    def _view(self, node_threshold: float, edge_threshold: float, title: str | None) -> tuple:
        g = self if node_threshold >= 1.0 and edge_threshold >= 1.0 else self.prune(node_threshold, edge_threshold)
        nodes = [{"kind": KINDS[int(g.nodes[i, 0])], "layer": g.layer(i), "position": int(g.nodes[i, 2]), "label": short_label(g.label(i)), "value": float(g.values[i])}
                 for i in range(len(g))]
        t, s = g.adjacency.nonzero(as_tuple=True)  # rows are targets
        edges = [(a, b, float(g.adjacency[b, a])) for a, b in zip(s.tolist(), t.tolist())]
        heading = title or f"{''.join(self.str_tokens[: self.position + 1])!r} → {', '.join(short_label(t) for t in self.targets)}"
        return nodes, edges, list(self.str_tokens[: self.position + 1]), heading

    def to_html(self, node_threshold: float = 0.8, edge_threshold: float = 0.98, title: str | None = None) -> str:
        """A self-contained HTML page of the pruned graph: tokens at the bottom, targets at the top, layers between.

        Args:
            node_threshold: Pruning's (1.0 with ``edge_threshold`` 1.0: every node and edge).
            edge_threshold: Pruning's.
            title: A heading (default: the prompt and the targets).

        Returns:
            The HTML (an inline SVG; no script, no network).
        """
        nodes, edges, tokens, heading = self._view(node_threshold, edge_threshold, title)
        return graph_html(nodes, edges, tokens, heading, n_layers=int(self.config.get("n_layers") or 0))

    def show(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> views.View:
        """The pruned graph for a notebook (the picture of `to_html`), as every result's ``show()`` gives it.

        Args:
            node_threshold: Pruning's.
            edge_threshold: Pruning's.

        Returns:
            A `tl_linmap.present.views.View` of tl_linmap's own SVG (no script), displayed as a cell's value.
        """
        nodes, edges, tokens, heading = self._view(node_threshold, edge_threshold, None)
        return views.View(graph_fragment(nodes, edges, tokens, heading, n_layers=int(self.config.get("n_layers") or 0)), "html")

    def _facts(self) -> list:
        counts = {k: int(self.kind_mask(k).sum()) for k in KINDS}
        return [
            ("nodes", ", ".join(f"{v} {k}s" for k, v in counts.items() if v), False),
            ("edges", f"{int((self.adjacency != 0).sum())}", True),
            ("targets", ", ".join(self.targets), False),
            ("exact to", f"{self.relative_error():.1e}", True),
            ("convention", self.convention, False),
        ]

    def __repr__(self) -> str:
        try:
            strongest = f"strongest path: {self.path()}"
        except InputError:
            strongest = "no path with weight reaches the targets"
        return display.summary_text("Graph", self._facts(), strongest)

    def _repr_html_(self) -> str:
        nodes, edges, tokens, heading = self._view(0.8, 0.98, None)
        return display.summary_html("Graph", self._facts()) + graph_fragment(nodes, edges, tokens, heading, n_layers=int(self.config.get("n_layers") or 0))

    # --- elsewhere: files (`Saveable.save`), circuit-tracer -----------------------------

    _TOKEN_IDS = "input_ids"

    def _model(self) -> dict:
        return {"name": self.model_name, "config_hash": config_hash(self.config), "config": self.config}

    def to_circuit_tracer(self, scan: str | None = None, dtype: torch.dtype = torch.float32):
        """This graph as a ``circuit_tracer.graph.Graph``: its pruning, its JSON files and its graph browser then work on it.

        circuit-tracer's nodes are features, one error per layer and position, tokens and logits, in
        that order; a graph with heads or MLP outputs as nodes has no place there. Features at the
        first position (circuit-tracer has none at BOS) and errors there are left out, as it does.

        Args:
            scan: circuit-tracer's name of the transcoders used (for its uploads).
            dtype: Its adjacency matrix's dtype: float32, circuit-tracer's (its pruning allocates in the default
                dtype); float64 keeps every digit (then run circuit-tracer's functions under ``torch.set_default_dtype``).

        Returns:
            The ``circuit_tracer.graph.Graph`` (its prompt cut after the targets' position, where circuit-tracer reads logits).

        Raises:
            InputError: for a graph with heads or MLP outputs as nodes, or a target that is not a `CenteredLogit`
                read at the output (circuit-tracer's logit node).
            ImportError: where circuit-tracer is not installed.
        """
        if self.kind_mask("head", "mlp").any():
            raise InputError("circuit-tracer's graphs have features, errors, tokens and logits as nodes: this graph has heads or MLP outputs. Build it with dictionaries and modules=False.")
        if (self.target_tokens < 0).any():
            raise InputError(f"circuit-tracer's targets are logits: {', '.join(t for t, i in zip(self.targets, self.target_tokens.tolist()) if i < 0)} is not one.")
        from circuit_tracer.attribution.targets import LogitTarget  # noqa: PLC0415 - an optional package
        from circuit_tracer.graph import Graph as CTGraph  # noqa: PLC0415
        from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig  # noqa: PLC0415
        n_layers = int(self.config["n_layers"])
        n_pos = self.position + 1
        features = (self.kind_mask("feature") & (self.nodes[:, 2] > 0)).nonzero()[:, 0]
        errors = self.kind_mask("error").nonzero()[:, 0]
        tokens = self.kind_mask("token").nonzero()[:, 0]
        targets = self.kind_mask("target").nonzero()[:, 0]
        layers = torch.tensor([self.layer(int(i)) for i in features], dtype=torch.long)
        active = torch.stack([layers, self.nodes[features, 2], self.nodes[features, 3]], 1)
        order = torch.tensor(sorted(range(len(features)), key=lambda i: tuple(active[i].tolist())), dtype=torch.long)
        features, active = features[order], active[order]
        n_feat = len(features)
        size = n_feat + (n_layers + 1) * n_pos + len(targets)
        column = torch.full((len(self),), -1)
        column[features] = torch.arange(n_feat)
        for i in errors.tolist():
            if int(self.nodes[i, 2]) > 0:
                column[i] = n_feat + self.layer(i) * n_pos + int(self.nodes[i, 2])
        column[tokens] = n_feat + n_layers * n_pos + self.nodes[tokens, 2]
        column[targets] = n_feat + (n_layers + 1) * n_pos + torch.arange(len(targets))
        adjacency = self.adjacency.new_zeros(size, size)
        kept = (column >= 0).nonzero()[:, 0]
        adjacency[column[kept][:, None], column[kept][None, :]] = self.adjacency[kept][:, kept]
        cfg = UnifiedConfig.from_dict({**self.config, "dtype": None})
        logit_targets = [LogitTarget(token_str=short_label(self.targets[j]).strip("'\""), vocab_idx=int(t)) for j, t in enumerate(self.target_tokens.tolist())]
        return CTGraph(
            input_string="".join(self.str_tokens[:n_pos]), input_tokens=self.input_ids[:n_pos].clone(), active_features=active,
            adjacency_matrix=adjacency.to(dtype), cfg=cfg, selected_features=torch.arange(n_feat), activation_values=self.activations[features].to(dtype),
            logit_targets=logit_targets, logit_probabilities=self.weights.to(dtype), scan=scan, vocab_size=self.config.get("d_vocab"),
        )
