"""The frozen system of one inference: every pass `linear_maps` and the matrix-free tools share.

Inside `frozen_system` the model is borrowed in the working dtype and has run:

1. a plain forward (the bridge's native value, for ``native_gap``);
2. a frozen forward, up to the final norm, recording the factors ``A(x)``; it is also the
   reference (``outputs``): detaching changes no value, so its activations are bit for bit
   those of the live forward with norms on the same code path (`tests/test_freezing.py`
   checks every activation);
3. with ``graph``, a replay forward with the token embeddings as a leaf, keeping the graph
   for reverse mode (``ys``).

The affine part ``b`` (``biases``) is one more replay, with every embedding zero, run when
first asked for: as an extra row of the first `FrozenSystem.push`, or skipped where
`purely_linear` and the graph show ``b`` to be exactly zero (one forward of the dense route,
on Llama-like models).

Where `trimmed_block` allows, every replay computes the last block the targets read at the
target position only: the rows the other positions would cost there are never computed.
`FrozenSystem.push` runs the replayed (exactly affine) system forward on any embeddings,
`FrozenSystem.vjp` runs reverse mode through its graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_linmap.analysis import Readout
from tl_linmap.errors import FreezeError, InputError
from tl_linmap.freezing import (
    Factors,
    HookList,
    factor_names,
    freeze_hooks,
    quiet_norm_edits,
    replay_hooks,
    slice_factors,
    trim_factors,
    trim_hooks,
)
from tl_linmap.guard import borrowed, hook_count
from tl_linmap.inputs import (
    EMBED_HOOK,
    OUTPUT_HOOK,
    RESIDUAL_HOOKS,
    Prompt,
    check_position,
    resolve_target,
    target_depth,
    to_tokens,
)


class _Stop(Exception):
    """Raised by the capture hook: nothing after the target is needed."""


def capture(
    model,
    tokens: Int[Tensor, "batch pos"],
    targets: Sequence[str],
    hooks: HookList = (),
    embeddings: Tensor | None = None,
    stop: bool = True,
    select: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Run the model with hooks and return the activations at ``targets``.

    Args:
        model: A TransformerBridge.
        tokens: Input tokens; their batch must match ``embeddings``' if given.
        targets: Hook names whose activations are returned.
        hooks: Extra ``(name, fn)`` forward hooks (freeze, replay, user's).
        embeddings: If given, replace the output of ``hook_embed``.
        stop: Abort the forward once every target fired (False: run every hook).
        select: Keep only this part of each activation (e.g. one position), so a wide
            batch does not hold whole activations.

    Returns:
        Activation (with its batch axis, or its `select`ed part) per target name.

    Raises:
        FreezeError: if a target hook never fired.
    """
    captured: dict[str, Tensor] = {}
    wanted = set(targets)

    def keep(name: str):
        def hook(act: Tensor, hook=None) -> None:
            captured[name] = act if select is None else select(act)
            if stop and wanted <= captured.keys():
                raise _Stop

        return hook

    fwd = list(hooks) + [(name, keep(name)) for name in wanted]
    if embeddings is not None:
        fwd.insert(0, (EMBED_HOOK, lambda act, hook=None: embeddings))
    with quiet_norm_edits(), model.hooks(fwd_hooks=fwd):
        try:
            model(tokens)
        except _Stop:
            pass
    missing = sorted(wanted - captured.keys())
    if missing:
        raise FreezeError(f"The hook points {missing[:4]} never fired in a forward pass of this model.")
    return captured


def run_to_target(model, tokens: Int[Tensor, "batch pos"], target: str, hooks: HookList = (), embeddings: Tensor | None = None, stop: bool = True) -> Tensor:
    """`capture` of a single target.

    Args:
        model: A TransformerBridge.
        tokens: Input tokens.
        target: Hook name.
        hooks: Extra forward hooks.
        embeddings: If given, replace the output of ``hook_embed``.
        stop: Abort the forward once the target fired.

    Returns:
        The activation at ``target`` (with its batch axis).
    """
    return capture(model, tokens, [target], hooks, embeddings, stop)[target]


def at_position(act: Tensor, position: int, n_tokens: int) -> Tensor:
    """The target vectors at one position, flattened: ``act[:, position]`` as ``(batch, d_out)``.

    Args:
        act: An activation with batch and position axes first.
        position: Non-negative position.
        n_tokens: Expected length of the position axis.

    Returns:
        The flattened vectors.

    Raises:
        InputError: if the activation has no position axis of that length.
    """
    if act.ndim < 3 or act.shape[1] != n_tokens:
        raise InputError(
            f"The target's activation has shape {tuple(act.shape)}, not (batch, pos={n_tokens}, ...): "
            "tl_linmap maps activations indexed by sequence position."
        )
    return act[:, position].flatten(1)


def check_factors(model, factors: Factors) -> None:
    """Raise `FreezeError` if some rule's factor was never recorded (its hook did not run).

    Args:
        model: The model.
        factors: Recorded by the frozen pass.
    """
    missing = [name for name in factor_names(model) if name not in factors]
    if missing:
        raise FreezeError(f"Freeze hooks never ran at {missing[:4]}: the bridge bypassed them; no exact map.")


def trimmed_block(names: Sequence[str], cfg) -> int | None:
    """The block replays may compute at the target position only (`tl_linmap.freezing.trim_hooks`).

    That is the deepest block any target reads, provided every target inside it is the
    block's output: a target after the blocks reads one position of it, so the output
    projection and MLP rows of the other positions are wasted there. A target inside
    that block (its attention, its MLP) keeps the block whole, and so does
    ``cfg.use_attn_result`` (the bridge then reshapes ``hook_z`` to the whole sequence).

    Args:
        names: Target hook names.
        cfg: The model's config (``n_layers``, ``use_attn_result``).

    Returns:
        The block index, or None when no block may be trimmed.
    """
    if getattr(cfg, "use_attn_result", False):
        return None
    last = max(target_depth(name, cfg.n_layers) for name in names) - 1
    block_outputs = (f"blocks.{last}.hook_resid_post", f"blocks.{last}.hook_out")
    inside = [name for name in names if name.startswith(f"blocks.{last}.")]
    if last < 0 or not all(name in block_outputs for name in inside):
        return None
    return last


def purely_linear(model) -> bool:
    """Whether the model adds no constant anywhere, so that ``b = 0`` for every embedding-dependent target.

    With every factor frozen, the replayed model multiplies embedding-dependent values only
    by frozen factors, weights and rotary tables: each hook value that depends on the
    embeddings at all is then zero at zero embeddings, unless a constant is added
    somewhere. The constants are biases (Hugging Face names every additive weight
    ``bias``), learned or sinusoidal position embeddings (anything but rotary), and hooks
    on the model's hook points (a steering hook adds a vector). A raw ``nn.Module``
    forward hook that adds one is not seen here (the bridge keeps hooks of its own
    there); the reconstruction check of `tl_linmap.maps.linear_map` then fails loudly.

    Args:
        model: A TransformerBridge.

    Returns:
        True only when none of those constants is present (False is the safe answer).
    """
    if getattr(model.cfg, "positional_embedding_type", None) != "rotary" or hook_count(model):
        return False
    return not any(name.rsplit(".", 1)[-1] == "bias" for name, _ in model.named_parameters())


@dataclass
class FrozenAffine:
    """A frozen norm at one position as ``v -> matrix @ v + offset``."""

    matrix: Float[Tensor, "d_out d_in"]
    offset: Float[Tensor, " d_out"]


def frozen_norm(model, norm: str, factors: Factors, position: int) -> FrozenAffine:
    """A norm module frozen at one position, as an affine map.

    Args:
        model: The model, in the working dtype.
        norm: Module name, e.g. ``"ln_final"`` or ``"blocks.3.ln1_post"``.
        factors: Recorded by the frozen pass.
        position: Non-negative position.

    Returns:
        A `FrozenAffine`.
    """
    # The bridge's own norm module, its scale replaced by the frozen one: no norm code copied here.
    scale = factors[f"{norm}.hook_scale"][:, position : position + 1]
    d_model = model.cfg.d_model
    probes = torch.cat([scale.new_zeros(1, d_model), torch.eye(d_model, dtype=scale.dtype, device=scale.device)])[:, None]
    hook = (f"{norm}.hook_scale", lambda act, hook=None: scale.expand_as(act))
    with quiet_norm_edits(), model.hooks(fwd_hooks=[hook]):
        out = model.get_submodule(norm)(probes)[:, 0]
    return FrozenAffine(matrix=(out[1:] - out[0]).T.detach(), offset=out[0].detach())


def vjp(y: Float[Tensor, " d_out"], x: Float[Tensor, "1 pos d_in"], rows: Float[Tensor, "k d_out"]) -> Float[Tensor, "k pos d_in"]:
    """``rows @ dy/dx`` for a batch of rows, by one vmapped backward (the graph is kept).

    Args:
        y: An output vector in a graph with leaf ``x``.
        x: The leaf (token embeddings).
        rows: Output-space covectors.

    Returns:
        One input-space gradient per row.
    """
    return torch.autograd.grad(y, x, rows, is_grads_batched=True, retain_graph=True)[0][:, 0]


@dataclass
class FrozenSystem:
    """One prompt's frozen system, valid inside `frozen_system`.

    Attributes:
        model: The borrowed model.
        tokens: ``(1, pos)``.
        position: Target position (non-negative).
        names: Target hook names.
        x: The token embeddings, ``(1, pos, d_in)``: the leaf of the graph, if built.
        factors: The frozen factors by hook name.
        ys: Per target, its vector at ``position`` in the replay's graph (empty without graph).
        outputs: Per target, the reference value.
        natives: Per target, the plain forward's value.
        trim: The block replays compute at ``position`` only (see `trimmed_block`), or None.
        linear: The model adds no constant (see `purely_linear`).
    """

    model: object
    tokens: Int[Tensor, "1 pos"]
    position: int
    names: list[str]
    x: Float[Tensor, "1 pos d_in"]
    factors: Factors
    outputs: dict[str, Tensor]
    natives: dict[str, Tensor]
    trim: int | None = None
    linear: bool = False
    ys: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _biases: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _norms: dict[str, FrozenAffine] = field(default_factory=dict, repr=False)

    @property
    def biases(self) -> dict[str, Tensor]:
        """Per target, the affine part ``b``: the replay with every embedding zero, run on first use (inside `frozen_system`).

        Once the graph has shown every target to depend on the embeddings, a `purely_linear`
        model needs no replay: ``b`` is exactly zero. (A target that is itself a frozen factor
        is a constant, all ``b``; only the replay, or the graph, tells.)

        Returns:
            Per target, ``b`` at the target position.
        """
        if not self._biases:
            if self._biases_are_zero():
                self._biases = {name: torch.zeros_like(y) for name, y in self.outputs.items()}
            else:
                with torch.no_grad():
                    self._biases = {name: y[0] for name, y in self.replay(torch.zeros_like(self.x)).items()}
        return self._biases

    def _biases_are_zero(self) -> bool:
        # The graph shows every target to depend on the embeddings, and the model adds no constant.
        return self.linear and bool(self.ys)

    def replay(self, embeddings: Float[Tensor, "batch pos d_in"]) -> dict[str, Float[Tensor, "batch d_out"]]:
        """The replayed system ``F(e) = Σ_i J_i e_i + b`` at the target position, one forward pass.

        Args:
            embeddings: Any embeddings, one sequence per batch row.

        Returns:
            Per target, its vectors at ``position`` (a graph if ``embeddings`` has one).
        """
        n = self.tokens.shape[1]
        if self.trim is None:
            hooks = replay_hooks(self.model, self.factors)
        else:
            trimmed = trim_factors(self.model, self.factors, self.trim, self.position)
            hooks = replay_hooks(self.model, trimmed) + trim_hooks(self.trim, self.position)
        tokens = self.tokens.expand(len(embeddings), -1)
        # A copy of the one position, so a wide batch does not keep whole activations alive.
        return capture(self.model, tokens, self.names, hooks, embeddings, select=lambda act: at_position(act, self.position, n).clone())

    def build_graph(self) -> None:
        """Record the replay's graph, the token embeddings ``x`` its leaf, for `vjp`.

        Raises:
            InputError: if a target does not depend on the token embeddings.
        """
        self.x.requires_grad_(True)
        with torch.enable_grad():
            ys = {name: y[0] for name, y in self.replay(self.x).items()}
        for name, y in ys.items():
            if not y.requires_grad:
                raise InputError(f"{name!r} does not depend on the token embeddings (a frozen factor?).")
        self.ys = ys

    def push(self, embeddings: Float[Tensor, "batch pos d_in"]) -> dict[str, Float[Tensor, "batch d_out"]]:
        """The linear part ``Σ_i J_i e_i`` for a batch of embedding sequences, by forward passes.

        The first push of a system whose ``b`` is not known yet also computes it, as one more
        (all-zero) row of the same batch.

        Args:
            embeddings: Any embeddings, one sequence per batch row.

        Returns:
            Per target, ``F(e) − b`` at the target position.
        """
        if not self._biases and not self._biases_are_zero():
            # b rides along as one more, all-zero row: a forward of a few rows costs about what
            # one row costs (the weights are read once), a separate zero-input replay a whole one.
            ys = self.replay(torch.cat([embeddings, torch.zeros_like(embeddings[:1])]))
            self._biases = {name: y[-1].detach() for name, y in ys.items()}
            return {name: y[:-1] - self._biases[name] for name, y in ys.items()}
        return {name: y - self.biases[name] for name, y in self.replay(embeddings).items()}

    def vjp(self, name: str, rows: Float[Tensor, "k d_out"]) -> Float[Tensor, "k pos d_in"]:
        """``rows @ [J_0 … J_n]`` by one batched backward through the replay's graph.

        Args:
            name: Target hook name.
            rows: Output-space covectors.

        Returns:
            ``J_i^T r`` for every token ``i`` and row ``r``.

        Raises:
            FreezeError: if the system has no graph yet.
        """
        if not self.ys:
            raise FreezeError("This frozen system has no graph for reverse mode yet: call its build_graph() first.")
        return vjp(self.ys[name], self.x, rows)

    def window(self, start: int, *, graph: bool = True) -> FrozenSystem:
        """The same linear system restricted to inputs at positions ``start..position``.

        The prompt is cut to that window and replayed with the sliced factors, so products
        with one token's operator cost a forward or backward of ``position - start + 1``
        positions instead of the whole prompt (a single position for the target token).

        Args:
            start: First input position kept (``0 <= start <= position``).
            graph: Keep the window's graph for `vjp`; without it (forward products, `push`
                and `push_basis`, only) the window's ``biases`` come from its own zero-input
                replay on first use (an extra row of its first `push`).

        Returns:
            A `FrozenSystem` whose token 0 is this one's token ``start``; its ``biases``
            are the window's own affine part, so `push` still returns the linear part.
            Without ``graph``, a window that is the whole system is the system itself.
        """
        if start == 0 and self.position == self.tokens.shape[1] - 1 and not graph:
            return self  # no second zero-input replay of the same system
        tokens = self.tokens[:, start : self.position + 1]
        n = tokens.shape[1]
        factors = slice_factors(self.model, self.factors, start, self.position + 1)
        x = self.x.new_zeros(1, n, self.x.shape[-1])
        window = FrozenSystem(self.model, tokens, n - 1, self.names, x, factors, self.outputs, self.natives, self.trim, self.linear)
        if graph:  # the graph's own value is the replay at zero input
            window.build_graph()
            window._biases = {name: y.detach() for name, y in window.ys.items()}
        return window

    def push_basis(self, token: int, dims: range, scale: float = 1.0) -> dict[str, Float[Tensor, "k d_out"]]:
        """Columns ``J_token[:, dims]`` of every target at once, by one forward pass of ``len(dims)`` rows.

        Row ``r`` of the batch is the basis embedding ``e_{token, dims[r]}`` (one at that
        token and dimension, zero elsewhere); the replayed system is exactly affine, so
        ``F(e) − b`` is the matching column of ``J_token``. Only the target position of each
        target is kept, and the pass stops after the last target.

        ``scale`` multiplies the basis embeddings and divides the result: exact for a power
        of two, it keeps ``F(s·e) − b`` from cancelling when the bias ``b`` is large.

        Args:
            token: Input token index in this system (0 for a `window` starting at that token).
            dims: Input dimensions (at most ``d_in`` of them).
            scale: Length of the pushed basis embeddings (a power of two).

        Returns:
            Per target, one row per dimension: ``J_token[:, d]`` as ``(len(dims), d_out)``.

        Raises:
            FreezeError: if a target hook never fired.
        """
        x, k = self.x, len(dims)
        embeddings = torch.zeros(k, *x.shape[1:], dtype=x.dtype, device=x.device)
        embeddings[torch.arange(k, device=x.device), token, torch.as_tensor(dims, device=x.device)] = scale
        with torch.no_grad():
            return {name: (y - self.biases[name]) / scale for name, y in self.replay(embeddings).items()}

    def result_fields(self, name: str) -> dict:
        """The `tl_linmap.maps.TargetResult` fields of one target (inside `frozen_system`: they may run the model).

        Args:
            name: Target hook name.

        Returns:
            ``bias``, ``output``, ``native_output``, ``tokens``, ``target``, ``position``, ``readout``.
        """
        return dict(
            readout=self.readout(name),
            bias=self.biases[name],
            output=self.outputs[name],
            native_output=self.natives[name],
            tokens=self.tokens[0],
            target=name,
            position=self.position,
        )

    def readout(self, name: str) -> Readout:
        """How the target's vectors are read as tokens: through ``ln_final`` frozen at the target position.

        Args:
            name: Target hook name.

        Returns:
            A `tl_linmap.analysis.Readout` (no norm for the final norm's own output).
        """
        if name == OUTPUT_HOOK:
            return Readout(model=self.model, final_norm=None)
        return Readout(model=self.model, final_norm=self.frozen_norm("ln_final"), residual=name.endswith(RESIDUAL_HOOKS))

    def frozen_norm(self, norm: str) -> FrozenAffine:
        """A norm module frozen at the target position (see `frozen_norm`), computed once per norm.

        Args:
            norm: Module name.

        Returns:
            A `FrozenAffine`.
        """
        if norm not in self._norms:  # readouts and `linear_maps(norms=...)` both ask for ln_final
            self._norms[norm] = frozen_norm(self.model, norm, self.factors, self.position)
        return self._norms[norm]


@contextmanager
def frozen_system(
    model,
    prompt_or_tokens: Prompt,
    targets: Sequence[str],
    *,
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
    graph: bool = True,
) -> Iterator[FrozenSystem]:
    """Borrow the model and run the passes every linear-system computation shares.

    Args:
        model: A TransformerBridge of a supported architecture.
        prompt_or_tokens: One prompt as text or token ids.
        targets: Hook names (or ``"output"``).
        position: Sequence position of the targets.
        dtype: Working dtype (the model's own is restored on exit).
        graph: Build the replay's graph for reverse mode now (`FrozenSystem.vjp`; else
            `FrozenSystem.build_graph` builds it when needed).

    Returns:
        A context manager yielding the `FrozenSystem`.

    Raises:
        InputError: for a bad prompt, position or target, or a target that does not
            depend on the embeddings.
        FreezeError: if a freeze hook never ran.
    """
    tokens = to_tokens(model, prompt_or_tokens)
    n = tokens.shape[1]
    position = check_position(position, n)
    names = list(dict.fromkeys(resolve_target(model, t) for t in targets))
    with borrowed(model, dtype):
        natives = capture(model, tokens, names + [EMBED_HOOK])
        factors: Factors = {}
        with torch.no_grad():
            # Up to the final norm, so every factor is recorded (and checked) for the replay.
            outputs = capture(model, tokens, names + [OUTPUT_HOOK], freeze_hooks(model, factors=factors))
        check_factors(model, factors)
        at = {name: lambda acts, name=name: at_position(acts[name], position, n)[0].detach() for name in names}
        system = FrozenSystem(
            model=model,
            tokens=tokens,
            position=position,
            names=names,
            x=natives[EMBED_HOOK].detach().clone(),
            factors=factors,
            outputs={name: at[name](outputs) for name in names},
            natives={name: at[name](natives) for name in names},
            trim=trimmed_block(names, model.cfg),
            linear=purely_linear(model),
        )
        del natives, outputs
        if graph:
            system.build_graph()
        yield system
