"""Influence on an attribution graph's targets, and pruning by it: circuit-tracer's definitions.

An adjacency matrix ``A`` (rows targets, columns sources: ``A[t, s]`` the direct effect of ``s`` on
``t``) is normalised row by row to ``|A| / Σ|A|`` (each node's inputs as fractions). A node's
influence is the weight of every path from it to the targets, ``w (Â + Â² + ...)``, with ``w`` the
targets' weights (their probabilities, for logits). Pruning keeps the nodes that carry a fraction
of the total influence, then the edges that carry a fraction of the pruned graph's, as
``circuit_tracer.graph.prune_graph`` does, so that both give the same masks on the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def normalized(adjacency: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """Each row's absolute values as fractions of their sum.

    Args:
        adjacency: Rows targets, columns sources.

    Returns:
        ``|A| / Σ_row |A|`` (a row of zeros stays zero).
    """
    a = adjacency.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(normalized_adjacency: Float[Tensor, "n n"], weights: Float[Tensor, " n"], max_iter: int = 1000) -> Float[Tensor, " n"]:
    """The weight of every path from each node to the weighted nodes: ``w Â + w Â² + ...``.

    Args:
        normalized_adjacency: `normalized` adjacency of a graph without cycles.
        weights: The targets' weights (zero elsewhere).
        max_iter: At most this many path lengths (a graph without cycles ends sooner).

    Returns:
        Per node, its influence.

    Raises:
        RuntimeError: if the series has not ended after ``max_iter`` terms (a cycle).
    """
    term = weights @ normalized_adjacency
    total = term.clone()
    for _ in range(max_iter):
        if not term.any():
            return total
        term = term @ normalized_adjacency
        total += term
    raise RuntimeError(f"Influence did not end after {max_iter} path lengths: the graph has a cycle.")


def partial_influence(rows: Float[Tensor, "r n"], row_nodes: Int[Tensor, " r"], weights: Float[Tensor, " k"], n_nodes: int, max_iter: int = 128) -> Float[Tensor, " n"]:
    """Each node's influence on the targets through the rows computed so far (circuit-tracer's ranking of
    which rows to compute next: ``compute_partial_influences``).

    Args:
        rows: ``(r, n_nodes)`` the rows computed, targets first.
        row_nodes: ``(r,)`` the node each row belongs to (targets: ``n_nodes + j``).
        weights: The targets' weights.
        n_nodes: Number of source columns (the targets come after them).
        max_iter: At most this many path lengths (circuit-tracer's bound).

    Returns:
        ``(n_nodes,)`` influence.

    Raises:
        RuntimeError: if the series has not ended after ``max_iter`` terms.
    """
    a = rows.abs()
    a = a / a.sum(dim=1, keepdim=True).clamp(min=1e-8)  # circuit-tracer's clamp here (1e-10 in `normalized`)
    prod = rows.new_zeros(n_nodes + len(weights))
    prod[n_nodes:] = weights
    total = rows.new_zeros(n_nodes)
    row_nodes = row_nodes.to(rows.device)
    for _ in range(max_iter):
        step = prod[row_nodes] @ a
        if not step.any():
            return total
        total += step
        prod = torch.cat([step, prod.new_zeros(len(weights))])
    raise RuntimeError(f"Partial influence did not end after {max_iter} path lengths: the rows have a cycle.")


def threshold(scores: Float[Tensor, " n"], fraction: float) -> Float[Tensor, ""]:
    """The score above which the highest scores carry ``fraction`` of their total.

    Args:
        scores: Non-negative scores.
        fraction: In ``[0, 1]``.

    Returns:
        The smallest score kept.
    """
    ordered = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(ordered, dim=0) / ordered.sum()
    return ordered[min(int(torch.searchsorted(cumulative, fraction)), len(ordered) - 1)]


@dataclass(frozen=True)
class Pruning:
    """Which nodes and edges a pruning keeps (circuit-tracer's ``PruneResult``).

    Attributes:
        nodes: ``(n,)`` the nodes kept.
        edges: ``(n, n)`` the edges kept (rows targets, columns sources).
        cumulative: ``(n,)`` per node, the fraction of total influence carried by it and every node above it.
    """

    nodes: Bool[Tensor, " n"]
    edges: Bool[Tensor, "n n"]
    cumulative: Float[Tensor, " n"]


def prune(adjacency: Float[Tensor, "n n"], weights: Float[Tensor, " n"], *, inner: Bool[Tensor, " n"], needs_inputs: Bool[Tensor, " n"],
          node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruning:
    """Keep the nodes, then the edges, that carry most of the influence on the targets.

    Tokens and targets are always kept; an inner node (feature, error, module) without a kept
    outgoing edge goes, and so does a node that needs inputs (a feature, a module) without a kept
    incoming one, until nothing changes.

    Args:
        adjacency: Rows targets, columns sources.
        weights: The targets' weights (zero elsewhere).
        inner: The nodes that can be pruned.
        needs_inputs: The prunable nodes that must keep an incoming edge.
        node_threshold: Fraction of total influence the kept nodes carry.
        edge_threshold: Fraction of the pruned graph's edge influence the kept edges carry.

    Returns:
        The `Pruning`.

    Raises:
        ValueError: for a threshold outside ``[0, 1]``.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0.0 and 1.0, got {value}.")
    node_scores = influence(normalized(adjacency), weights)
    nodes = (node_scores >= threshold(node_scores, node_threshold)) | ~inner
    kept = adjacency.clone()
    kept[~nodes] = 0
    kept[:, ~nodes] = 0
    a = normalized(kept)
    edge_scores = a * (influence(a, weights) + weights)[:, None]
    edges = edge_scores >= threshold(edge_scores.flatten(), edge_threshold)
    before = nodes.clone()
    nodes = _connected(nodes, edges, inner, needs_inputs)
    while not torch.equal(nodes, before):  # each pass can strand more nodes; at most depth + 1 passes
        before = nodes.clone()
        edges[~nodes] = False
        edges[:, ~nodes] = False
        nodes = _connected(nodes, edges, inner, needs_inputs)
    order = torch.sort(node_scores, descending=True)
    cumulative = torch.zeros_like(node_scores)
    cumulative[order.indices] = torch.cumsum(order.values, dim=0) / order.values.sum()
    return Pruning(nodes, edges, cumulative)


def _connected(nodes: Tensor, edges: Tensor, inner: Tensor, needs_inputs: Tensor) -> Tensor:
    # An inner node needs a kept outgoing edge; a feature or module a kept incoming one too.
    return nodes & (~inner | edges.any(0)) & (~needs_inputs | edges.any(1))


def scores(adjacency: Float[Tensor, "n n"], weights: Float[Tensor, " n"], *, tokens: Bool[Tensor, " n"], errors: Bool[Tensor, " n"]) -> tuple[float, float]:
    """circuit-tracer's replacement and completeness scores of a graph.

    Args:
        adjacency: Rows targets, columns sources.
        weights: The targets' weights.
        tokens: The token nodes.
        errors: The error nodes.

    Returns:
        ``(replacement, completeness)``: the share of the tokens' influence against the tokens' and
        errors' together, and the influence-weighted share of every node's inputs that come from no error.
    """
    a = normalized(adjacency)
    node_influence = influence(a, weights)
    from_tokens, from_errors = node_influence[tokens].sum(), node_influence[errors].sum()
    replacement = from_tokens / (from_tokens + from_errors)
    not_error = 1 - a[:, errors].sum(-1)
    output = node_influence + weights
    return float(replacement), float((not_error * output).sum() / output.sum())
