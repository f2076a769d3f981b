"""Direct effects of nodes: features, error terms, token embeddings and modules, on any target.

Inside a frozen system every dictionary's output is rebuilt from leaves (`tl_linmap.freeze.splices.Splice.nodes`):
its features' activations and its error term, given, so that nothing before it reaches what
follows except through them (and a skip transcoder's linear path). The token embeddings are
leaves too, and with ``modules=True`` every block's attention and MLP output. The target is then
affine in the leaves: one reverse pass per target row gives every node's direct effect (value
times derivative), and one pass with every leaf zero the constant.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_linmap.base.compat import check_model, get_act_name
from tl_linmap.base.errors import InputError
from tl_linmap.base.hook_names import EMBED_HOOK
from tl_linmap.base.prompts import Prompt, Prompts, read_prompts
from tl_linmap.base.devices import resident
from tl_linmap.freeze.architectures import naming_foreign
from tl_linmap.freeze.capture import at_position, capture
from tl_linmap.freeze.hooks import replay_hooks
from tl_linmap.freeze.splices import Leaves, Splice
from tl_linmap.freeze.splicing import canonical, spliced, splices_of
from tl_linmap.freeze.system import FrozenSystem, frozen_system
from tl_linmap.freeze.targets import resolve_target
from tl_linmap.reading.readouts import LinearReadout
from tl_linmap.results.features import FeatureContributions


def module_hooks(model, sites: Iterable[str], kinds: tuple[str, ...] = ("attn_out", "mlp_out")) -> list[str]:
    """Every block's module output hooks of some kinds, except where a dictionary writes.

    Args:
        model: A TransformerBridge or HookedTransformer.
        sites: Hooks dictionaries write (their features stand for that module).
        kinds: Activation names (`get_act_name`), per block in this order.

    Returns:
        ``blocks.L.hook_attn_out`` and ``blocks.L.hook_mlp_out`` (by default) that the model has, in block order.
    """
    points = model.hook_dict
    taken = {canonical(points, site) for site in sites}  # by hook point: a bridge's hook_mlp_out is mlp.hook_out
    names = [get_act_name(kind, layer) for layer in range(model.cfg.n_layers) for kind in kinds]
    return [n for n in names if n in points and canonical(points, n) not in taken]


def _leaf(value: Tensor) -> Tensor:
    return value.detach().clone().requires_grad_(True)


def node_pass(system: FrozenSystem, name: str, embeddings: Tensor, nodes: dict[str, Leaves], modules: dict[str, Tensor], *, input_of: str | None = None) -> Tensor:
    """One replay of the frozen system with leaves given: the target's vector at the system's position.

    Args:
        system: The frozen system.
        name: The target hook.
        embeddings: The token embeddings to use, ``(1, pos, d)``.
        nodes: Per splice's site, its activations and error (`tl_linmap.freeze.splices.Leaves`).
        modules: Per module output hook, its value to use.
        input_of: Read, instead of ``name``'s value, the input of the splice writing this site (which
            reads the hook point it writes, so no hook point holds its input); its `Leaves` must have ``inputs``.

    Returns:
        ``(d_out,)``.
    """
    n = system.tokens.shape[1]
    hooks = [(EMBED_HOOK, lambda act, hook=None: embeddings.reshape(act.shape))]
    hooks += replay_hooks(system.model, system.factors, nodes=nodes)
    hooks += [(hook_name, _give(value)) for hook_name, value in modules.items()]
    y = capture(system.model, system.tokens, [name], hooks, select=lambda act: at_position(act, system.position, n))[name][0]
    return y if input_of is None else nodes[input_of].inputs["x"][0, system.position]


def _give(value: Tensor):
    def hook(act: Tensor, hook=None) -> Tensor:
        return value.reshape(act.shape)

    return hook


def _module_values(system: FrozenSystem, names: list[str], target: str) -> dict[str, Tensor]:
    # The modules' outputs in the replay, those that fire before the target only (the others cannot reach it).
    if not names:
        return {}
    hooks = [(EMBED_HOOK, lambda act, hook=None: system.x.reshape(act.shape))] + replay_hooks(system.model, system.factors)
    with torch.no_grad():
        fired = list(capture(system.model, system.tokens, [*names, target], hooks, stop=False).items())
    before = [name for name, _ in fired][: [name for name, _ in fired].index(target)]
    return {name: value for name, value in fired if name in before}


def node_effects(system: FrozenSystem, splices: list[Splice], name: str, rows: Tensor, *, modules: list[str] = (), input_of: str | None = None) -> dict:
    """Every node's direct effect on ``rows · y``, ``y`` the target's vector at the system's position.

    Args:
        system: A frozen system whose factors hold each splice's activations and errors (``site#acts``,
            ``site#error_value``: recorded by the freeze hooks).
        splices: The model's splices (`tl_linmap.freeze.splicing.splices_of`).
        name: The target hook.
        rows: ``(k, d_out)`` covectors read from the target (an identity for the whole vector).
        modules: Module output hooks to make leaves too (`module_hooks`).
        input_of: Read the input of the splice writing this site instead of the target hook (see `node_pass`).

    Returns:
        ``acts`` (per site, ``(pos, d_sae)``), ``features`` (per site, ``(k, pos, d_sae)``: the derivative),
        ``errors`` (per site, ``(k, pos)`` or None), ``tokens`` (``(k, pos)``), ``modules`` (per hook,
        ``(k, pos)``), ``constant`` (``(k,)``).
    """
    factors = system.factors
    acts = {s.site: factors[f"{s.site}#acts"][0] for s in splices}
    errors = {s.site: factors.get(f"{s.site}#error_value") for s in splices}
    values = _module_values(system, list(modules), name)
    with torch.enable_grad():
        embeddings = _leaf(system.x)
        nodes = {site: Leaves(_leaf(a)[None], None if errors[site] is None else _leaf(errors[site]), {} if site == input_of else None)
                 for site, a in acts.items()}
        module_leaves = {m: _leaf(v) for m, v in values.items()}
        y = node_pass(system, name, embeddings, nodes, module_leaves, input_of=input_of)
        leaves = [embeddings, *(n.acts for n in nodes.values()), *(n.error for n in nodes.values() if n.error is not None), *module_leaves.values()]
        grads = [torch.autograd.grad(row @ y, leaves, retain_graph=True, allow_unused=True) for row in rows]
    with torch.no_grad():
        zero_nodes = {site: Leaves(torch.zeros_like(n.acts), None if n.error is None else torch.zeros_like(n.error), {} if site == input_of else None)
                      for site, n in nodes.items()}
        y0 = node_pass(system, name, torch.zeros_like(system.x), zero_nodes, {m: torch.zeros_like(v) for m, v in module_leaves.items()}, input_of=input_of)

    def part(i: int, like: Tensor) -> Tensor:
        return torch.stack([g[i] if g[i] is not None else torch.zeros_like(like) for g in grads])

    def per_position(i: int, leaf: Tensor) -> Tensor:  # (k, pos): derivative times value, summed per position
        return (part(i, leaf) * leaf.detach()).flatten(3).sum(-1)[:, 0]

    out = {"acts": acts, "tokens": per_position(0, embeddings), "constant": rows @ y0}
    out["features"] = {site: part(1 + i, n.acts)[:, 0] for i, (site, n) in enumerate(nodes.items())}
    index = 1 + len(nodes)
    out["errors"] = {}
    for site, n in nodes.items():
        if n.error is None:
            out["errors"][site] = None
            continue
        out["errors"][site] = per_position(index, n.error)
        index += 1
    out["modules"] = {m: per_position(index + j, leaf) for j, (m, leaf) in enumerate(module_leaves.items())}
    return out


def target_rows(system: FrozenSystem, target) -> tuple[str, str, Tensor, Tensor]:
    """What a target reads: its hook, its label, the covectors and constant read from the hook's vector.

    Args:
        system: The frozen system (its reader gives the readout's weights).
        target: A hook name or a `tl_linmap.reading.readouts.LinearReadout`.

    Returns:
        ``(hook, label, rows (k, d_out), constant (k,))``.
    """
    if isinstance(target, LinearReadout):
        name = resolve_target(system.model, target.hook)
        w, c = target.weights(system.reader(name), system.outputs[name].shape[0])
        return name, target.name, w.to(system.x)[None], c.to(system.x)[None]
    name = resolve_target(system.model, target)
    d = system.outputs[name].shape[0]
    eye = torch.eye(d, dtype=system.x.dtype, device=system.x.device)
    return name, name, eye, eye.new_zeros(d)


@dataclass(frozen=True, eq=False)
class Preactivation(LinearReadout):
    """A feature's pre-activation ``(x - c·b_dec) · W_enc[:, f] + b_enc[f]``: linear in its dictionary's input.

    Attributes:
        hook: The hook point the dictionary reads.
        vector: ``W_enc[:, f]`` (a gated SAE's: scaled by ``exp(r_mag[f])``).
        offset: The constant: ``b_enc[f] - c·b_dec · vector``.
        label: Its name in results.
    """

    hook: str
    vector: Tensor
    offset: float
    label: str

    @property
    def name(self) -> str:
        return self.label

    def check(self, model) -> None:
        if self.hook not in model.hook_dict:
            raise InputError(f"{self.label}: the model has no hook point {self.hook!r}.")

    def weights(self, reader, d_out: int) -> tuple[Tensor, Tensor]:
        w = self.vector.detach().to(resident(reader.model, "W_U"))
        return w, w.new_tensor(self.offset)


def preactivations(splice: Splice, features: Int[Tensor, " n"]) -> tuple[str, Float[Tensor, "n d_in"], Float[Tensor, " n"]]:
    """Several features' pre-activations ``(x - c·b_dec) · W_enc[:, f] + b_enc[f]`` as covectors on the dictionary's input.

    Computed in float64 whatever the dictionary's dtype (the offsets are single numbers; the splice sums in the
    working dtype), from one cast of the dictionary.

    Args:
        splice: A dictionary spliced into a model.
        features: ``(n,)`` feature ids.

    Returns:
        ``(hook, vectors, offsets)``: the hook read (the dictionary's input hook, or for a dictionary that reads
        the hook point it writes, that point: read there before it writes, see `node_pass`), ``W_enc[:, f]``
        per feature (a gated SAE's scaled by ``exp(r_mag[f])``), and the constants.
    """
    d = splice.dictionary.to(splice.dictionary.W_enc.detach().new_zeros((), dtype=torch.float64))
    features = torch.as_tensor(features, dtype=torch.long, device=d.W_enc.device)
    gated = d.activation == "gated"
    vectors = (d.W_enc[:, features] * (d.r_mag[features].exp() if gated else 1)).T.contiguous().detach()
    offsets = (d.b_mag if gated else d.b_enc)[features] - (vectors @ d.b_dec if d.apply_b_dec_to_input else 0)
    hook = splice.input_hook if splice.own_input_hook else splice.site
    return hook, vectors, offsets.detach()


def preactivation(splice: Splice, feature: int) -> Preactivation:
    """The readout of one feature's pre-activation (`preactivations` of one).

    Args:
        splice: A dictionary spliced into a model.
        feature: Its feature id.

    Returns:
        A `Preactivation` on the hook `preactivations` names.
    """
    hook, vectors, offsets = preactivations(splice, torch.tensor([feature]))
    return Preactivation(hook, vectors[0], float(offsets[0]), f"pre({splice.site} #{feature})")


def feature_contributions(
    model,
    prompt: Prompt,
    target="output",
    *,
    dictionaries=(),
    error: str | None = None,
    modules: bool = False,
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
) -> FeatureContributions:
    """Split a target exactly into every active feature, error term and input token: direct effects.

    Each node's direct effect holds every other node fixed, with attention patterns, norm scales,
    activations and every dictionary's feature mask frozen at their inference values; so the
    features (``a_f`` times the derivative along ``W_dec[f]``), the error terms, the token embeddings
    and a constant sum to the target, to 1e-12 in float64 (checked). The dictionaries are those the
    model carries (SAELens on a ``HookedSAETransformer``, circuit-tracer's transcoders on a
    ``ReplacementModel``) and those given here (spliced for the call, `tl_linmap.spliced`).

    Args:
        model: A TransformerBridge or HookedTransformer.
        prompt: Text or token ids (one prompt).
        target: A hook name (``"output"``: the final norm's output; its whole vector, one reverse
            pass per dimension) or a linear readout: ``Logit(" Paris")``, ``LogitDiff(...)``,
            ``Direction(hook, vector)`` (one reverse pass).
        dictionaries: `tl_linmap.Dictionary` objects or SAELens SAEs to splice in for this call.
        error: The error convention (``"live"``, ``"constant"``, ``"none"``; see `tl_linmap.spliced`); None:
            ``"live"`` for the dictionaries given, the model's own as they are. Direct effects are the same
            under both conventions with an error term; the convention matters for maps from the tokens.
        modules: Also make every block's attention and MLP output a node (their direct effects
            then leave the tokens only the embedding's own path).
        position: Target position (Python-style).
        dtype: Working dtype (the model comes back bit for bit).

    Returns:
        A `tl_linmap.results.features.FeatureContributions`.

    Raises:
        InputError: for a bad model, prompt, target or convention, or a model without dictionaries.
        UnsupportedArchitectureError: for a model or dictionary no rule covers.
        FreezeError: if the parts do not sum to the target.
    """
    check_model(model)
    prompts = read_prompts(model, prompt, position=position, several=False)
    with spliced(model, dictionaries, error=error):
        return split_target(model, prompts, target, modules=modules, dtype=dtype)


def split_target(model, prompts: Prompts, target, *, modules: bool = False, dtype: torch.dtype | None = torch.float64, input_of: str | None = None) -> FeatureContributions:
    """`feature_contributions` of a prompt already read, on the model's splices as they are.

    Args:
        model: A model with dictionaries spliced in.
        prompts: One prompt (`tl_linmap.base.prompts.read_prompts`).
        target: A hook name or a linear readout.
        modules: Also make the blocks' module outputs nodes.
        dtype: Working dtype.
        input_of: The target reads the input of the splice writing this site, where no hook point holds it
            (its reference value is the input the frozen pass recorded).

    Returns:
        The `FeatureContributions`.

    Raises:
        InputError: for a bad target, or a model without dictionaries.
    """
    if isinstance(target, LinearReadout):
        target.check(model)
    splices = splices_of(model)
    if not splices:
        raise InputError(
            "The model has no dictionaries spliced in: pass dictionaries=[tl_linmap.Dictionary(...) or a SAELens SAE], "
            "attach SAEs to a HookedSAETransformer, or use a circuit-tracer ReplacementModel."
        )
    hook = target.hook if isinstance(target, LinearReadout) else target
    with frozen_system(model, prompts, [hook], dtype=dtype, native=False) as system:
        name, label, rows, c = target_rows(system, target)
        effects = node_effects(system, splices, name, rows, modules=module_hooks(model, [s.site for s in splices]) if modules else [], input_of=input_of)
        read = system.outputs[name] if input_of is None else system.factors[f"{input_of}#input"][0, system.position]
        reference = rows @ read + c
    convention = next((s.error for s in splices if s.error != "none"), "none")
    with naming_foreign(model):  # the result checks its sum on construction
        return _result(model, prompts, system, splices, label, effects, c, reference, convention)


def _result(model, prompts, system: FrozenSystem, splices: list[Splice], label: str, effects: dict, c: Tensor, reference: Tensor, convention: str) -> FeatureContributions:
    features, activations, values, maps = [], [], [], []
    for s, splice in enumerate(splices):
        acts = effects["acts"][splice.site]  # (pos, d_sae)
        pos, fid = acts.nonzero(as_tuple=True)
        derivative = effects["features"][splice.site][:, pos, fid].T  # (n, k)
        features.append(torch.stack([torch.full_like(pos, s), pos, fid], dim=1))
        activations.append(acts[pos, fid])
        maps.append(derivative)
        values.append(derivative * acts[pos, fid][:, None])
    n_pos, k = system.tokens.shape[1], len(effects["constant"])
    errors = torch.stack([e.T if e is not None else effects["constant"].new_zeros(n_pos, k) for e in effects["errors"].values()])
    return FeatureContributions(
        target=label,
        position=system.position,
        sites=tuple(s.site for s in splices),
        features=torch.cat(features),
        activations=torch.cat(activations).detach(),
        values=torch.cat(values).detach(),
        maps=torch.cat(maps).detach(),
        errors=errors.detach(),
        has_error=tuple(e is not None for e in effects["errors"].values()),
        tokens=effects["tokens"].T.detach(),
        modules={m: v.T.detach() for m, v in effects["modules"].items()},
        constant=(effects["constant"] + c).detach(),
        output=reference.detach(),
        input_ids=prompts.tokens[0][0],
        convention=convention,
        model=model,
    )
