"""Attribution graphs: every node's direct effect on every other, exact, in circuit-tracer's units.

Inside a frozen system every node is a leaf of one replay (`node_forward`): the token embeddings,
every spliced dictionary's active features and error terms, and (``modules=True``) every attention
head's ``hook_z`` and every MLP's output, so that nothing reaches a node except through the nodes
before it. A node with inputs reads a scalar from that replay: a feature its pre-activation, a target
its readout, a head or MLP output ``g · v``, its value times the gradient ``g`` of the targets (weighted
as their ``weights``) with the errors held (`held_pass`): edge attribution patching's score, exact here.
Its row of the adjacency is then one reverse pass: each source's value times the derivative.

Rows are computed for the targets, then for the nodes with most influence on them (circuit-tracer's
order, `tl_linmap.reading.influence`), ``rows_per_pass`` at a time, until ``max_nodes``: the cost grows
with the nodes kept. What the nodes left out carry into a row is kept as its ``remainder``, so every
row still sums exactly: value = edges + remainder + constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tl_linmap.base.compat import check_model
from tl_linmap.base.errors import InputError
from tl_linmap.base.hook_names import EMBED_HOOK, output_hook
from tl_linmap.base.prompts import Prompt, Prompts, read_prompts
from tl_linmap.base.progress import progress_bar
from tl_linmap.base.saving import model_config
from tl_linmap.freeze.capture import capture
from tl_linmap.freeze.hooks import replay_hooks
from tl_linmap.freeze.splices import Leaves, Splice
from tl_linmap.freeze.splicing import spliced, splices_of
from tl_linmap.freeze.system import FrozenSystem, frozen_system
from tl_linmap.linear.plan import refuse_unfit
from tl_linmap.linear.features import module_hooks, preactivations, target_rows
from tl_linmap.reading.influence import partial_influence
from tl_linmap.reading.readouts import CenteredLogit, LinearReadout
from tl_linmap.reading.tokens import decode_tokens, token_id
from tl_linmap.results.graph import KINDS, Graph


@dataclass
class _Group:
    """One leaf of the node pass and the nodes it holds: ``index`` rows of ``(position, id)``.

    A feature group's leaf is its active features' activations only (the dense activations are built
    from it), so a batch of rows' gradients is ``rows × active`` rather than ``rows × positions × d_sae``.
    """

    kind: str
    site: str
    value: Tensor  # the value at the hook, (1, pos, ...)
    index: Tensor  # (m, 2): position and id (feature id, head; 0 for one node per position)
    leaf: Tensor | None = field(default=None, repr=False)

    def leaf_value(self) -> Tensor:
        """What the leaf holds: the active activations of a feature group, else the whole value."""
        return self.value[0, self.index[:, 0], self.index[:, 1]] if self.kind == "feature" else self.value

    def dense(self, leaf: Tensor) -> Tensor:
        """The value the node pass writes at the hook, built from a leaf (or a zero one)."""
        if self.kind != "feature":
            return leaf
        at = (torch.zeros_like(self.index[:, 0]), self.index[:, 0], self.index[:, 1])
        return self.value.new_zeros(self.value.shape).index_put(at, leaf)

    def contributions(self, grads: Tensor) -> Tensor:
        """Each node's direct effect, ``(rows, m)``, from the leaf's gradients ``(rows, *leaf.shape)``."""
        g = grads * self.leaf_value()
        if self.kind == "feature":
            return g
        per = g[:, 0].flatten(3).sum(-1) if self.kind == "head" else g[:, 0].flatten(2).sum(-1)[..., None]  # (rows, pos, heads or 1)
        return per[:, self.index[:, 0], self.index[:, 1]]


@dataclass
class _Readers:
    """Nodes with inputs that read one captured activation: node ``j`` reads ``vectors[j] · act[0, at[j]] + offsets[j]``."""

    key: str
    at: Tensor  # (m, 1): position, or (m, 2): position and head
    vectors: Tensor  # (m, width)
    offsets: Tensor  # (m,)

    def __len__(self) -> int:
        return len(self.at)

    def read(self, captured: dict, local: Tensor) -> Tensor:
        """The values of some of them.

        Args:
            captured: Activations by key (`node_forward`).
            local: Their indices here.

        Returns:
            ``(len(local),)``.
        """
        act = captured[self.key][0]
        x = act[self.at[local, 0]] if self.at.shape[1] == 1 else act[self.at[local, 0], self.at[local, 1]]
        return (x.flatten(1) * self.vectors[local]).sum(-1) + self.offsets[local]


def module_nodes(model, sites: Sequence[str]) -> list[tuple[str, str]]:
    """The heads' and MLPs' output hooks that are nodes, except where a dictionary writes.

    Args:
        model: A TransformerBridge or HookedTransformer.
        sites: Hooks dictionaries write.

    Returns:
        ``(kind, hook)`` pairs (``"head"``: ``blocks.L.attn.hook_z``; ``"mlp"``: ``blocks.L.hook_mlp_out``), in block order.
    """
    return [("head" if n.endswith("hook_z") else "mlp", n) for n in module_hooks(model, sites, kinds=("z", "mlp_out"))]


def auto_targets(system: FrozenSystem, max_logits: int, probability: float) -> tuple[list[LinearReadout], Tensor]:
    """circuit-tracer's targets: the most likely next tokens until their probability reaches ``probability``.

    Args:
        system: The frozen system (its output hook captured).
        max_logits: At most this many.
        probability: Cumulative probability to reach.

    Returns:
        One `CenteredLogit` per token, and their probabilities (the targets' weights).
    """
    name = output_hook(system.model)
    logits = system.reader(name).logits(system.outputs[name], affine=True)
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    top_p, top = torch.topk(p, min(max_logits, len(p)))
    n = int(torch.searchsorted(torch.cumsum(top_p, 0), probability)) + 1
    return [CenteredLogit(int(t)) for t in top[:n]], top_p[:n]


def _leaf(value: Tensor) -> Tensor:
    return value.detach().clone().requires_grad_(True)


def _stash(store: dict, key: str, leaf: Tensor | None = None):
    # Keyed by this closure (an alias hook reports its canonical name); replaces the value where a leaf is given.
    def hook(act: Tensor, hook=None):
        store[key] = act
        return None if leaf is None else leaf.reshape(act.shape)

    return hook


def _add_zero(deltas: dict, key: str):
    def hook(act: Tensor, hook=None) -> Tensor:
        deltas[key] = torch.zeros_like(act).requires_grad_(True)
        return act + deltas[key]

    return hook


def held_pass(system: FrozenSystem, splices: list[Splice], rows: list[tuple[str, Tensor, Tensor]], modules: list[tuple[str, str]]) -> dict:
    """The targets as functions of the source nodes, with features and modules live and errors held.

    Args:
        system: The frozen system.
        splices: The model's splices.
        rows: Per target, ``(hook, covector, constant)``.
        modules: ``(kind, hook)`` module nodes.

    Returns:
        ``values`` (``(k,)``), ``tokens`` (``(k, pos)``: each token's total effect), ``errors`` (per site,
        ``(k, pos)``), ``modules`` (per module hook, its value), ``inputs`` (per splice, what its encoder read), ``gradients`` (per module hook, ``(k, 1, pos, ...)``:
        the targets' gradients there), ``constant`` (``(k,)``: the targets with every source zero).
    """
    factors = dict(system.factors)
    errors = {s.site: _leaf(factors[f"{s.site}#error_value"]) for s in splices if f"{s.site}#error_value" in factors}
    factors.update({f"{site}#error": e for site, e in errors.items()})
    names = list(dict.fromkeys(h for h, _, _ in rows))
    module_values: dict = {}
    deltas: dict = {}
    inputs = {s.site: system.factors[f"{s.site}#input"] for s in splices if not s.own_input_hook}
    with torch.enable_grad():
        x = _leaf(system.x)
        # A module's gradient: the targets' derivative along a zero added to its value, every later node live.
        hooks = [hook for _, h in modules for hook in ((h, _stash(module_values, h)), (h, _add_zero(deltas, h)))]
        hooks += [(s.input_hook, _stash(inputs, s.site)) for s in splices if s.own_input_hook]
        ys = capture(system.model, system.tokens, names, _held_hooks(system, factors, x) + hooks, stop=False)
        values = torch.stack([cov @ ys[h][0, system.position].flatten() + c for h, cov, c in rows])
        leaves = [x, *errors.values(), *deltas.values()]
        eye = torch.eye(len(values), dtype=values.dtype, device=values.device)
        grads = torch.autograd.grad(values, leaves, grad_outputs=eye, allow_unused=True, is_grads_batched=True)
    with torch.no_grad():
        factors.update({f"{site}#error": torch.zeros_like(e) for site, e in errors.items()})
        y0 = capture(system.model, system.tokens, names, _held_hooks(system, factors, torch.zeros_like(system.x)), stop=False)
        constant = torch.stack([cov @ y0[h][0, system.position].flatten() + c for h, cov, c in rows])

    def stacked(i: int, like: Tensor) -> Tensor:
        return grads[i] if grads[i] is not None else like.new_zeros(len(values), *like.shape)

    def per_position(i: int, leaf: Tensor) -> Tensor:  # (k, pos): value times derivative, summed per position
        return (stacked(i, leaf) * leaf.detach()).flatten(3).sum(-1)[:, 0]

    out = {"values": values.detach(), "constant": constant, "tokens": per_position(0, x)}
    out["errors"] = {site: per_position(1 + i, e) for i, (site, e) in enumerate(errors.items())}
    out["modules"] = {h: v.detach() for h, v in module_values.items()}
    out["inputs"] = {site: v.detach() for site, v in inputs.items()}
    out["gradients"] = {h: stacked(1 + len(errors) + i, d) for i, (h, d) in enumerate(deltas.items())}
    return out


def _held_hooks(system: FrozenSystem, factors: dict, x: Tensor) -> list:
    return [(EMBED_HOOK, lambda act, hook=None: x.reshape(act.shape))] + replay_hooks(system.model, factors, held=True)


def _groups(system: FrozenSystem, splices: list[Splice], modules: list[tuple[str, str]], module_values: dict[str, Tensor]) -> list[_Group]:
    # Every leaf of the node pass, with the nodes it holds up to the target position.
    last = system.position
    upto = torch.arange(last + 1)

    def one() -> Tensor:  # one node per position
        return torch.stack([upto, torch.zeros_like(upto)], 1)

    groups = []
    for s in splices:
        acts = system.factors[f"{s.site}#acts"]
        pos, fid = acts[0].nonzero(as_tuple=True)
        pos, fid = pos.cpu(), fid.cpu()  # indices live on the CPU; they index tensors on any device
        keep = pos <= last
        groups.append(_Group("feature", s.site, acts, torch.stack([pos[keep], fid[keep]], 1)))
    for s in splices:
        if f"{s.site}#error_value" in system.factors:
            groups.append(_Group("error", s.site, system.factors[f"{s.site}#error_value"], one()))
    for kind, hook in modules:
        v = module_values[hook]
        index = torch.cartesian_prod(upto, torch.arange(v.shape[2])) if kind == "head" else one()
        groups.append(_Group(kind, hook, v, index))
    groups.append(_Group("token", EMBED_HOOK, system.x, one()))
    return groups


def _readers(system: FrozenSystem, splices: list[Splice], groups: list[_Group], gradient: dict[str, Tensor], targets: list[tuple[str, Tensor, Tensor]]) -> list[_Readers]:
    # How each node with inputs reads its value, in node order (features, heads and MLPs), then the targets.
    by_site = {s.site: s for s in splices}
    readers = []
    for g in groups:
        if g.kind == "feature":
            splice = by_site[g.site]
            hook, vectors, offsets = preactivations(splice, g.index[:, 1])
            key = hook if splice.own_input_hook else f"{g.site}#x"
            readers.append(_Readers(key, g.index[:, :1], vectors.to(system.x), offsets.to(system.x)))
        elif g.kind in ("head", "mlp"):
            at = g.index if g.kind == "head" else g.index[:, :1]
            grad = gradient[g.site][0]
            vectors = grad[at[:, 0], at[:, 1]] if g.kind == "head" else grad[at[:, 0]]
            readers.append(_Readers(g.site, at, vectors.flatten(1), vectors.new_zeros(len(at))))
    for hook, cov, c in targets:
        readers.append(_Readers(hook, torch.tensor([[system.position]]), cov[None], c.reshape(1)))
    return readers


def _read(captured: dict, readers: list[_Readers], batch: Tensor) -> Tensor:
    # The values of the nodes with inputs in ``batch`` (indices in reader order), in that order.
    at, values, start = [], [], 0
    for r in readers:
        mask = (batch >= start) & (batch < start + len(r))
        if mask.any():
            at.append(mask.nonzero()[:, 0])
            values.append(r.read(captured, batch[mask] - start))
        start += len(r)
    return torch.cat(values)[torch.argsort(torch.cat(at))]


def node_forward(system: FrozenSystem, splices: list[Splice], groups: list[_Group], keys: set[str], zero: bool = False) -> dict:
    """One replay with every node a leaf (or zero): what the nodes with inputs read.

    Args:
        system: The frozen system.
        splices: The model's splices.
        groups: The leaves (`_Group.leaf` set, unless ``zero``).
        keys: The hook points to keep (readers' keys).
        zero: Every leaf zero (the constants).

    Returns:
        Per key, the activation there (a splice reading the point it writes: under ``site#x``).
    """
    value = (lambda g: torch.zeros_like(g.value)) if zero else (lambda g: g.dense(g.leaf))
    acts = {g.site: value(g) for g in groups if g.kind == "feature"}
    errors = {g.site: value(g) for g in groups if g.kind == "error"}
    captured: dict = {}
    inputs = {s.site: {} for s in splices if not s.own_input_hook}
    nodes = {s.site: Leaves(acts[s.site], errors.get(s.site), inputs.get(s.site)) for s in splices}
    embeddings = next(value(g) for g in groups if g.kind == "token")
    hooks = [(EMBED_HOOK, lambda act, hook=None: embeddings.reshape(act.shape))]
    hooks += replay_hooks(system.model, system.factors, nodes=nodes)
    hooks += [(g.site, _stash(captured, g.site, value(g))) for g in groups if g.kind in ("head", "mlp")]
    modules = {g.site for g in groups if g.kind in ("head", "mlp")}
    hooks += [(k, _stash(captured, k)) for k in keys if "#" not in k and k not in modules]
    capture(system.model, system.tokens, [], hooks, stop=False)
    captured.update({f"{site}#x": i["x"] for site, i in inputs.items()})
    return captured


def _rows_of(groups: list[_Group], readers: list[_Readers], batch: list[int], captured: dict) -> Tensor:
    # The rows of some nodes: one reverse pass through the kept node forward, vectorised over the rows.
    leaves = [g.leaf for g in groups]
    n = sum(len(g.index) for g in groups)
    values = _read(captured, readers, torch.tensor(batch, dtype=torch.long))
    out = values.new_zeros(len(batch), n).detach()
    if not values.requires_grad:  # no node reaches any of them: rows of zeros, their values all constant
        return out
    eye = torch.eye(len(batch), dtype=values.dtype, device=values.device)
    grads = torch.autograd.grad(values, leaves, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True)
    return torch.cat([g.contributions(d if d is not None else g.leaf.new_zeros(len(batch), *g.leaf.shape)) for g, d in zip(groups, grads)], 1).detach()


def attribution_graph(
    model,
    prompt: Prompt,
    target=None,
    *,
    dictionaries=(),
    error: str | None = None,
    modules: bool | None = None,
    max_nodes: int | None = None,
    max_logits: int = 10,
    logit_probability: float = 0.95,
    weights: Sequence[float] | None = None,
    position: int = -1,
    rows_per_pass: int = 64,
    dtype: torch.dtype | None = torch.float64,
    progress: bool | None = None,
) -> Graph:
    """The attribution graph of one prediction: every node's direct effect on every other, exact.

    Nodes: the input tokens; every active feature and error term of the dictionaries spliced in (SAELens
    SAEs on a ``HookedSAETransformer``, circuit-tracer's transcoders on a ``ReplacementModel``, those given
    here); with ``modules``, every attention head (``hook_z``) and MLP output per position; and the targets.
    Edges are direct effects with attention patterns, norm scales, activation functions and feature masks
    frozen at their inference values, in circuit-tracer's units: into a feature, its pre-activation; out of
    a feature, scaled by its activation. Each node's value equals its incoming edges, its remainder and its
    constant, and each target the sum of the sources' total effects and its constant, to 1e-12 in float64
    (checked on the result, `tl_linmap.results.graph.Graph.check`).

    Args:
        model: A TransformerBridge or HookedTransformer (with dictionaries, or ``modules``).
        prompt: Text or token ids (one prompt).
        target: A readout (``Logit``, ``LogitDiff``, ``Direction``, ``CenteredLogit``) or a list of them;
            None: circuit-tracer's, the likeliest next tokens' `CenteredLogit` until their probability
            reaches ``logit_probability`` (at most ``max_logits``), weighted by their probabilities.
        dictionaries: `tl_linmap.Dictionary` objects or SAELens SAEs to splice in for this call.
        error: Their error convention (see `tl_linmap.spliced`). Edges are the same under ``"live"`` and
            ``"constant"``; a graph's error nodes are sources either way.
        modules: Make heads and MLP outputs nodes (None: where no dictionary is spliced in). Their values
            are ``g · v``, their effect on the weighted targets (see the module docstring).
        max_nodes: Rows for at most this many features and modules, the most influential first (None: all). The
            rows are held as ``(max_nodes + targets) × nodes`` numbers while they are computed: a graph of heads and
            MLP outputs has ``n_layers · (n_heads + 1)`` nodes per position, so give one for long prompts.
        max_logits: For ``target=None``.
        logit_probability: For ``target=None``.
        weights: Per target, its weight in influence and pruning (None: its probability for ``target=None``, else 1).
        position: Target position (Python-style); nodes after it cannot reach it and are left out.
        rows_per_pass: Rows per reverse pass (vectorised) and between two re-rankings by influence.
        dtype: Working dtype (the model comes back bit for bit).
        progress: A progress bar over rows: None (default) once the call lasts a few seconds, True at once, False never.

    Returns:
        A `tl_linmap.Graph`.

    Raises:
        InputError: for a bad model, prompt, target or option, or a model with neither dictionaries nor modules.
        UnsupportedArchitectureError: for a model or dictionary no rule covers.
        FreezeError: if a row or target does not sum to its value.
    """
    check_model(model)
    prompts = read_prompts(model, prompt, position=position, several=False)
    for name, n in (("max_nodes", max_nodes), ("rows_per_pass", rows_per_pass), ("max_logits", max_logits)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < (0 if name == "max_nodes" else 1)):
            kind = "a non-negative int or None" if name == "max_nodes" else "a positive int"
            raise InputError(f"{name} must be {kind}, got {n!r}.")
    if not (isinstance(logit_probability, (int, float)) and 0 < logit_probability <= 1):
        raise InputError(f"logit_probability must be a number in (0, 1], got {logit_probability!r}.")
    if weights is not None and target is None:
        raise InputError("weights are the targets' probabilities when target=None; to weigh targets, pass target=[readout, ...] too.")
    if not dictionaries and (modules or (modules is None and not splices_of(model))):
        # Heads and MLP outputs as nodes: the plan knows their number (features it cannot count before the run).
        refuse_unfit(model, prompts.lengths[0], "attribution_graph", dtype, max_nodes=max_nodes, rows_per_pass=rows_per_pass,
                     position=prompts.positions[0])
    with spliced(model, dictionaries, error=error):
        return build_graph(model, prompts, target, modules=modules, max_nodes=max_nodes, max_logits=max_logits,
                           logit_probability=logit_probability, weights=weights, rows_per_pass=rows_per_pass, dtype=dtype, progress=progress)


def _weights(weights) -> Tensor:
    try:
        w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"weights must be a list of numbers, one per target, got {weights!r}.") from err
    if not torch.isfinite(w).all() or (w < 0).any() or not w.any():
        raise InputError(f"weights must be finite, non-negative and not all zero (they weigh influence), got {w.tolist()}.")
    return w


def _targets(target) -> list[LinearReadout] | None:
    if target is None:
        return None
    readouts = [target] if isinstance(target, LinearReadout) else list(target) if isinstance(target, (list, tuple)) else None
    if not readouts or not all(isinstance(t, LinearReadout) for t in readouts):
        raise InputError(
            f"target must be a readout (tl_linmap.Logit(' Paris'), LogitDiff, Direction, CenteredLogit), a list of them, "
            f"or None for the likeliest next tokens; got {target!r}."
        )
    return readouts


def build_graph(model, prompts: Prompts, target, *, modules: bool | None, max_nodes: int | None, max_logits: int, logit_probability: float,
                weights: Sequence[float] | None, rows_per_pass: int, dtype, progress: bool | None) -> Graph:
    """`attribution_graph` of a prompt already read, on the model's splices as they are.

    Args:
        model: The model.
        prompts: One prompt.
        target: As for `attribution_graph`.
        modules: As for `attribution_graph`.
        max_nodes: As for `attribution_graph`.
        max_logits: As for `attribution_graph`.
        logit_probability: As for `attribution_graph`.
        weights: As for `attribution_graph`.
        rows_per_pass: As for `attribution_graph`.
        dtype: Working dtype.
        progress: A progress bar: None (default) once the call lasts a few seconds, True at once, False never.

    Returns:
        The `Graph`.
    """
    readouts = _targets(target)
    for r in readouts or ():
        r.check(model)
    splices = splices_of(model)
    modules = not splices if modules is None else modules
    module_list = module_nodes(model, [s.site for s in splices]) if modules else []
    if not splices and not module_list:
        raise InputError("The graph would have no nodes between tokens and targets: pass modules=True, or dictionaries=[...] (or a model with SAEs or transcoders).")
    hooks = list(dict.fromkeys([output_hook(model)] + [r.hook for r in readouts or ()]))
    with frozen_system(model, prompts, hooks, dtype=dtype, native=False) as system:
        if readouts is None:
            readouts, w = auto_targets(system, max_logits, logit_probability)
        else:
            w = torch.ones(len(readouts)) if weights is None else _weights(weights)
            if len(w) != len(readouts):
                raise InputError(f"weights has {len(w)} entries for {len(readouts)} targets: give one per target.")
        w = w.to(system.x)
        rows = []
        for r in readouts:
            name, _, cov, c = target_rows(system, r)
            rows.append((name, cov[0], c[0]))
        held = held_pass(system, splices, rows, module_list)
        gradient = {h: torch.einsum("k,k...->...", w, g) for h, g in held["gradients"].items()}
        groups = _groups(system, splices, module_list, held["modules"])
        readers = _readers(system, splices, groups, gradient, rows)
        expanded, table, constants = _expand(system, splices, groups, readers, w, max_nodes, rows_per_pass, progress)
        reference = _reference(system, splices, groups, gradient, held, rows)
        return _assemble(model, system, groups, readouts, w, held, expanded, table, constants, reference)


def _expand(system, splices, groups: list[_Group], readers: list[_Readers], w: Tensor, max_nodes: int | None, rows_per_pass: int, progress: bool | None):
    # Rows for the targets, then for the most influential nodes with inputs; every row over every node.
    n_nodes = sum(len(g.index) for g in groups)
    reader_node = _reader_nodes(groups)  # node index of each inner reader
    inner = len(reader_node)
    k = sum(len(r) for r in readers) - inner
    budget = inner if max_nodes is None else min(max_nodes, inner)
    with torch.enable_grad():
        for g in groups:
            g.leaf = _leaf(g.leaf_value())
        captured = node_forward(system, splices, groups, {r.key for r in readers})
        order = list(range(inner, inner + k))
        table = system.x.new_zeros(k + budget, n_nodes)  # every row over every node, filled as they come
        with progress_bar(k + budget, "attribution graph rows", progress) as bar:
            table[:k] = _rows_of(groups, readers, order, captured)
            bar.update(k)
            done = torch.zeros(inner, dtype=torch.bool)
            while len(order) < k + budget:
                if max_nodes is None:
                    batch = (~done).nonzero()[:, 0][:rows_per_pass]
                else:
                    row_nodes = torch.tensor([int(reader_node[i]) if i < inner else n_nodes + i - inner for i in order])
                    score = partial_influence(table[: len(order)], row_nodes, w, n_nodes)
                    ranked = torch.argsort(score[reader_node].cpu(), descending=True, stable=True)
                    batch = ranked[~done[ranked]][: min(rows_per_pass, k + budget - len(order))]
                table[len(order) : len(order) + len(batch)] = _rows_of(groups, readers, batch.tolist(), captured)
                order += batch.tolist()
                done[batch] = True
                bar.update(len(batch))
    with torch.no_grad():
        constants = _read(node_forward(system, splices, groups, {r.key for r in readers}, zero=True), readers, torch.arange(inner + k))
    for g in groups:
        g.leaf = None
    return order, table, constants


def _reader_nodes(groups: list[_Group]) -> Tensor:
    # Readers come in node order over the groups with inputs: their node indices.
    out, start = [], 0
    for g in groups:
        if g.kind in ("feature", "head", "mlp"):
            out.append(torch.arange(start, start + len(g.index)))
        start += len(g.index)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _reference(system: FrozenSystem, splices: list[Splice], groups: list[_Group], gradient: dict, held: dict, rows: list) -> Tensor:
    # Each node's value in the frozen forward, read apart from the node pass: the values its rows must sum to.
    by_site = {s.site: s for s in splices}
    out = []
    for g in groups:
        if g.kind == "feature":
            pre = by_site[g.site].dictionary.to(system.x).pre(held["inputs"][g.site])[0]
            out.append(pre[g.index[:, 0], g.index[:, 1]])
        elif g.kind in ("head", "mlp"):
            v = (gradient[g.site] * held["modules"][g.site])[0]
            v = v.sum(-1) if g.kind == "head" else v.sum(-1)[..., None]
            out.append(v[g.index[:, 0], g.index[:, 1]])
    out.append(torch.stack([cov @ system.outputs[h] + c for h, cov, c in rows]))
    return torch.cat(out)


def _assemble(model, system, groups: list[_Group], readouts, w: Tensor, held: dict, order: list[int], table: Tensor, constants: Tensor, reference: Tensor) -> Graph:
    # Keep the nodes with rows, every error and token, and the targets; what the others carry into a row is its remainder.
    # The graph lives on the CPU, wherever the model ran.
    table, constants, reference, w = table.cpu(), constants.cpu(), reference.cpu(), w.cpu()
    held = {key: ({k: v.cpu() for k, v in value.items()} if isinstance(value, dict) else value.cpu()) for key, value in held.items()}
    names = _target_names(model, readouts)
    sites = list(dict.fromkeys([g.site for g in groups] + names))
    nodes = torch.cat([torch.cat([torch.full((len(g.index), 1), KINDS.index(g.kind)), torch.full((len(g.index), 1), sites.index(g.site)), g.index], 1) for g in groups]
                      + [torch.tensor([[KINDS.index("target"), sites.index(name), system.position, j] for j, name in enumerate(names)])])
    n_all, k = len(nodes), len(readouts)
    reader_node = torch.cat([_reader_nodes(groups), torch.arange(n_all - k, n_all)])  # per reader, its node
    row_node = reader_node[order]
    keep = ~torch.isin(nodes[:, 0], torch.tensor([KINDS.index(kind) for kind in ("feature", "head", "mlp")]))
    keep[row_node] = True
    kept = keep.nonzero()[:, 0]
    new = torch.full((n_all,), -1)
    new[kept] = torch.arange(len(kept))
    n, dt = len(kept), table.dtype
    columns = keep[: n_all - k]
    adjacency = table.new_zeros(n, n)
    adjacency[new[row_node], : int(columns.sum())] = table[:, columns]
    remainders, constant, values = table.new_zeros(n), table.new_zeros(n), table.new_zeros(n)
    remainders[new[row_node]] = table[:, ~columns].sum(-1)
    constant[new[row_node]] = constants.to(dt)[order]
    values[new[row_node]] = reference.to(dt)[order]
    totals = table.new_zeros(n, k)
    activations = table.new_zeros(n)
    start = 0
    for g in groups:
        at = new[start : start + len(g.index)]
        if g.kind == "token":
            totals[at] = held["tokens"][:, g.index[:, 0]].T.to(dt)
        elif g.kind == "error":
            totals[at] = held["errors"][g.site][:, g.index[:, 0]].T.to(dt)
        elif g.kind == "feature":
            acts = g.leaf_value().cpu().to(dt)
            activations[at[at >= 0]] = acts[at >= 0]
        start += len(g.index)
    sources = totals.any(-1)
    values[sources] = totals[sources] @ w.to(dt)
    # circuit-tracer's logit nodes: a centered logit read at the output (any other readout is no logit node of its)
    target_ids = [token_id(model, r.token) if isinstance(r, CenteredLogit) and r.hook == "output" else -1 for r in readouts]
    return Graph(
        nodes=nodes[kept], sites=tuple(sites), adjacency=adjacency, values=values, activations=activations, constants=constant,
        remainders=remainders, totals=totals, weights=w.to(dt), targets=tuple(names),
        target_tokens=torch.tensor(target_ids), target_values=held["values"].to(dt), target_constants=held["constant"].to(dt),
        input_ids=system.tokens[0].cpu(), str_tokens=tuple(decode_tokens(model, system.tokens[0].tolist())), position=system.position,
        convention=next((s.error for s in splices_of(model) if s.error != "none"), "none"), model_name=str(getattr(model.cfg, "model_name", "")), config=model_config(model),
    )


def _target_names(model, readouts: list[LinearReadout]) -> list[str]:
    # circuit-tracer's logit targets by their token's text; by id where tokens decode alike; numbered where names repeat.
    def name(r: LinearReadout) -> str:
        if isinstance(r, CenteredLogit) and isinstance(r.token, int):
            return f"centered_logit({decode_tokens(model, [r.token])[0]!r})"
        return r.name

    names = [name(r) for r in readouts]
    if len(set(names)) < len(names):
        names = [r.name for r in readouts]
    if len(set(names)) < len(names):
        names = [f"{n} #{j}" for j, n in enumerate(names)]
    return names
