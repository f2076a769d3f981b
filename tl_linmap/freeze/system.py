"""The frozen system of one inference: every pass the linear maps and matrix-free tools share.

Inside `frozen_system` the model is borrowed in the working dtype and has run:

1. a plain forward (the bridge's native value, for ``native_gap``);
2. a frozen forward, up to the final norm, recording the factors ``A(x)``; it is also the
   reference (``outputs``): detaching changes no value, so its activations are bit for bit
   those of the live forward with norms on the same code path (`tests/test_hooks.py`
   checks every activation).

The system's input is its *source*: the token embeddings (``hook_embed``) by default, or any
hook point with a position axis the targets depend on (``blocks.L.hook_resid_pre``,
``hook_attn_out``, ...). A replay replaces the source's activation by the given tensor
(`tl_linmap.freeze.capture.capture`), so ``y = Σ_i J_i s_i + b`` with ``s_i`` the source's value at
position ``i`` in the reference forward; the layers before the source still run but nothing
they compute reaches the targets except through the frozen factors.

A `FrozenSystem` is immutable and valid only inside its ``with`` block (afterwards every
method that would run the model refuses). What it gains is a new system: `FrozenSystem.with_graph`
adds a replay forward with the source as a leaf, for reverse mode (`FrozenSystem.vjp`);
`FrozenSystem.with_biases` the affine part ``b``, a replay with the source zero. ``b`` is
known from the start where it is exactly zero (`purely_linear` and a source that carries the
whole residual stream, once the graph shows every target to depend on it), comes from the
graph of a window (whose inputs are zero), or rides along the first `FrozenSystem.push` as
one more all-zero row; it is computed once per system, in one of these three ways.

Where `trimmed_block` allows, every replay computes the last block the targets read at the
target position only: the rows the other positions would cost there are never computed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_linmap.base.checks import check_dtype
from tl_linmap.base.compat import get_act_name
from tl_linmap.base.errors import FreezeError, InputError
from tl_linmap.base.guard import borrowed, hook_count
from tl_linmap.base.hook_names import (
    EMBED_HOOK,
    RESIDUAL_HOOKS,
    WHOLE_STREAM_SOURCES,
    independent_target,
    output_hook,
    target_depth,
)
from tl_linmap.base.prompts import Prompt, Prompts, read_prompts
from tl_linmap.freeze.architectures import naming_foreign
from tl_linmap.freeze.capture import at_position, capture, every_position
from tl_linmap.freeze.factors import (
    at_rows,
    pad_factors,
    slice_factors,
    trim_factors,
    trim_hooks,
    windowable,
)
from tl_linmap.freeze.hooks import Factors, factor_names, freeze_hooks, replay_hooks
from tl_linmap.freeze.norms import after_output, frozen_norm
from tl_linmap.freeze.targets import resolve_source, resolve_targets
from tl_linmap.reading.tokens import FrozenAffine, TokenReader

Vectors = dict[str, Tensor]


def check_factors(model, factors: Factors) -> None:
    """Raise `FreezeError` if some rule's factor was never recorded (its hook did not run).

    Args:
        model: The model.
        factors: Recorded by the frozen pass.
    """
    missing = [name for name in factor_names(model) if name not in factors]
    if missing:
        raise FreezeError(f"Freeze hooks never ran at {missing[:4]}: the model bypassed them; no exact map.")


def trimmed_block(names: Sequence[str], cfg, hooks: Container[str] | None = None) -> int | None:
    """The block replays may compute at the target position only (`tl_linmap.freeze.factors.trim_hooks`).

    That is the deepest block any target reads, provided every target inside it is the
    block's output: a target after the blocks reads one position of it, so the output
    projection and MLP rows of the other positions are wasted there. A target inside
    that block (its attention, its MLP) keeps the block whole, and so does
    ``cfg.use_attn_result`` (the bridge then reshapes ``hook_z`` to the whole sequence).

    Args:
        names: Target hook names.
        cfg: The model's config (``n_layers``, ``use_attn_result``).
        hooks: The model's hook names, if known: the block needs ``ln2.hook_in`` to be cut.

    Returns:
        The block index, or None when no block may be trimmed.
    """
    if getattr(cfg, "use_attn_result", False):
        return None
    last = max(target_depth(name, cfg.n_layers) for name in names) - 1
    if hooks is not None and f"blocks.{last}.ln2.hook_in" not in hooks:
        return None  # no hook to cut the MLP's input at (a HookedTransformer's norms have none)
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
    there); the reconstruction check of `tl_linmap.linear.dense.linear_map` then fails loudly.

    Args:
        model: A TransformerBridge or HookedTransformer.

    Returns:
        True only when none of those constants is present (False is the safe answer).
    """
    if getattr(model.cfg, "positional_embedding_type", None) != "rotary" or hook_count(model):
        return False
    return not any(_adds_a_constant(name, param) for name, param in model.named_parameters())


def is_bias_name(name: str) -> bool:
    """Whether a parameter name is an additive weight.

    Args:
        name: A parameter's full name.

    Returns:
        True for Hugging Face's ``bias`` and a HookedTransformer's ``b``, ``b_*`` and its
        grouped-query ``_b_K``/``_b_V``.
    """
    return re.fullmatch(r"_?b(_\w+)?|bias", name.rsplit(".", 1)[-1]) is not None


def _adds_a_constant(name: str, param: Tensor) -> bool:
    # A HookedTransformer keeps its biases even when they are zero: only a nonzero one adds a constant.
    return is_bias_name(name) and bool(param.detach().any())


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


class _Lease:
    """Whether the model is still borrowed: shared by a system and every system derived from it."""

    active = True


@dataclass(frozen=True)
class FrozenSystem:
    """One prompt's frozen system, valid inside `frozen_system`.

    Attributes:
        model: The borrowed model.
        tokens: ``(1, pos)``.
        position: Target position (non-negative).
        names: Target hook names.
        x: The source activations (token embeddings by default), ``(1, pos, d_in)`` (flattened
            after the position axis); the leaf of the graph, if there is one.
        factors: The frozen factors by hook name.
        outputs: Per target, the reference value at ``position``.
        sequences: Per target, the reference value at every position, ``(pos, d_out)``.
        natives: Per target, the plain forward's value at ``position``.
        final_norm: ``ln_final`` frozen at ``position`` (how vectors are read as tokens; None
            for a model without a final norm).
        trim: The block replays compute at ``position`` only (see `trimmed_block`), or None.
        linear: The model adds no constant (see `purely_linear`).
        ys: Per target, its vector at ``position`` in the replay's graph (None: no graph).
        biases: Per target, the affine part ``b`` (None: not computed yet).
        start: For a `window` that could not be cut, its first position: ``x`` then covers
            positions ``start..position`` and every other input is held at zero.
        source: The hook point the system's input ``x`` replaces (``hook_embed``: the token embeddings).
    """

    model: object = field(repr=False)
    tokens: Int[Tensor, "1 pos"]
    position: int
    names: tuple[str, ...]
    x: Float[Tensor, "1 pos d_in"] = field(repr=False)
    factors: Factors = field(repr=False)
    outputs: Vectors = field(repr=False)
    sequences: Vectors = field(repr=False)
    natives: Vectors = field(repr=False)
    final_norm: FrozenAffine | None = field(repr=False)
    lease: _Lease = field(repr=False)
    trim: int | None = None
    linear: bool = False
    ys: Vectors | None = field(default=None, repr=False)
    biases: Vectors | None = field(default=None, repr=False)
    start: int = 0
    source: str = EMBED_HOOK

    def _alive(self) -> None:
        if not self.lease.active:
            raise InputError(
                "This frozen system was used after its `with` block ended: the model has been given "
                "back. Keep the work inside the block (or use the results it returned)."
            )

    def replay(self, embeddings: Float[Tensor, "batch pos d_in"], *, every: bool = False) -> Vectors:
        """The replayed system ``F(e) = Σ_i J_i e_i + b`` at the target position, one forward pass.

        Args:
            embeddings: Any source activations (embeddings by default), one sequence per batch row.
            every: Return every position, not just ``position`` (the block `trim` would cut then runs whole).

        Returns:
            Per target, its vectors at ``position``, ``(batch, d_out)`` (with ``every``: at every
            position, ``(batch, pos, d_out)``); a graph if ``embeddings`` has one.
        """
        self._alive()
        n = self.tokens.shape[1]
        if embeddings.shape[1] != n:  # a window that could not be cut: the other inputs are zero
            k, d = len(embeddings), embeddings.shape[-1]
            after = n - self.start - embeddings.shape[1]
            embeddings = torch.cat([embeddings.new_zeros(k, self.start, d), embeddings, embeddings.new_zeros(k, after, d)], dim=1)
        if self.trim is None or every:
            hooks = replay_hooks(self.model, self.factors)
        else:
            trimmed = trim_factors(self.model, self.factors, self.trim, self.position)
            # The cut first: a replay's hook at the same point (a rebuilt norm's input) sees the cut value.
            hooks = trim_hooks(self.trim, self.position) + replay_hooks(self.model, trimmed)
        tokens = self.tokens.expand(len(embeddings), -1)
        # First in the list, so every other hook at the source (a replay's) sees the replacement.
        hooks = [(self.source, lambda act, hook=None: embeddings.reshape(act.shape).to(act.device))] + hooks
        # A copy of the one position, so a wide batch does not keep whole activations alive.
        select = (lambda act: every_position(act, n).clone()) if every else (lambda act: at_position(act, self.position, n).clone())
        return capture(self.model, tokens, self.names, hooks, select=select)

    def with_graph(self) -> FrozenSystem:
        """This system with the replay's graph recorded, its source activations ``x`` the leaf (for `vjp`).

        Returns:
            A new `FrozenSystem`; where the model adds no constant (`purely_linear`) and the
            source is the whole residual stream, its ``b`` is now known to be exactly zero.

        Raises:
            InputError: if a target does not depend on the source.
        """
        x = self.x.detach().requires_grad_(True)
        with torch.enable_grad():
            ys = {name: y[0] for name, y in self.replay(x).items()}
        for name, y in ys.items():
            if not y.requires_grad:
                raise independent_target(name, self.source)
        biases = self.biases
        if biases is None and self.linear:
            # Every target depends on the embeddings and nothing adds a constant: b = 0 exactly.
            biases = {name: torch.zeros_like(y) for name, y in self.outputs.items()}
        return dataclasses.replace(self, x=x, ys=ys, biases=biases)

    def with_biases(self) -> FrozenSystem:
        """This system with its affine part ``b`` known: a replay with every embedding zero, if needed.

        Returns:
            A `FrozenSystem` whose ``biases`` is set (this one if it was already).
        """
        if self.biases is not None:
            return self
        with torch.no_grad():
            biases = {name: y[0] for name, y in self.replay(torch.zeros_like(self.x[:1])).items()}
        return dataclasses.replace(self, biases=biases)

    def push(self, embeddings: Float[Tensor, "batch pos d_in"], *, every: bool = False) -> tuple[Vectors, Vectors]:
        """The linear part ``Σ_i J_i e_i`` for a batch of embedding sequences, by one forward pass.

        Where ``b`` is not known yet it rides along as one more, all-zero row: a forward of a
        few rows costs about what one row costs (the weights are read once), a separate
        zero-input replay a whole one.

        Args:
            embeddings: Any source activations, one sequence per batch row.
            every: At every position (see `replay`); ``biases`` must then be None or of every position too.

        Returns:
            ``(linear, biases)``: per target ``F(e) − b`` at the target position, and ``b``
            (keep it with ``dataclasses.replace(system, biases=biases)`` for further pushes).
        """
        with torch.no_grad():
            if self.biases is not None:
                return {name: y - self.biases[name] for name, y in self.replay(embeddings, every=every).items()}, self.biases
            ys = self.replay(torch.cat([embeddings, torch.zeros_like(embeddings[:1])]), every=every)
        biases = {name: y[-1] for name, y in ys.items()}
        return {name: y[:-1] - biases[name] for name, y in ys.items()}, biases

    def push_basis(self, token: int, dims: range, scale: float = 1.0) -> tuple[Vectors, Vectors]:
        """Columns ``J_token[:, dims]`` of every target at once, by one forward pass of ``len(dims)`` rows.

        Row ``r`` of the batch is the basis embedding ``e_{token, dims[r]}`` (one at that
        token and dimension, zero elsewhere); the replayed system is exactly affine, so
        ``F(e) − b`` is the matching column of ``J_token``. ``scale`` multiplies the basis
        embeddings and divides the result: exact for a power of two, it keeps ``F(s·e) − b``
        from cancelling when the bias ``b`` is large.

        Args:
            token: Input token index in this system (0 for a `window` starting at that token).
            dims: Input dimensions (at most ``d_in`` of them).
            scale: Length of the pushed basis embeddings (a power of two).

        Returns:
            ``(columns, biases)``: per target ``J_token[:, d]`` as ``(len(dims), d_out)``, and ``b``.
        """
        x, k = self.x, len(dims)
        embeddings = torch.zeros(k, *x.shape[1:], dtype=x.dtype, device=x.device)
        embeddings[torch.arange(k, device=x.device), token, torch.as_tensor(dims, device=x.device)] = scale
        linear, biases = self.push(embeddings)
        return {name: y / scale for name, y in linear.items()}, biases

    def vjp(self, name: str, rows: Float[Tensor, "k d_out"]) -> Float[Tensor, "k pos d_in"]:
        """``rows @ [J_0 … J_n]`` by one batched backward through the replay's graph.

        Args:
            name: Target hook name.
            rows: Output-space covectors.

        Returns:
            ``J_i^T r`` for every token ``i`` and row ``r``.

        Raises:
            FreezeError: if the system has no graph (see `with_graph`).
        """
        self._alive()
        if self.ys is None:
            raise FreezeError("This frozen system has no graph for reverse mode: use system.with_graph().")
        with torch.enable_grad():
            return vjp(self.ys[name], self.x, rows)

    def window(self, start: int, *, graph: bool = True) -> FrozenSystem:
        """The same linear system restricted to inputs at positions ``start..position``.

        The prompt is cut to that window and replayed with the sliced factors, so products
        with one token's operator cost a forward or backward of ``position - start + 1``
        positions instead of the whole prompt (a single position for the target token).
        With the factors frozen, a window's linear part is exactly the whole prompt's
        restricted to its inputs: what earlier positions add is all affine. Where a factor
        cannot be cut (`tl_linmap.freeze.factors.windowable`), the window replays the whole prompt with
        the inputs outside it held at zero: the same system, at the whole prompt's cost.

        Args:
            start: First input position kept (``0 <= start <= position``).
            graph: Record the window's graph for `vjp` (its value, at zero embeddings, is
                the window's ``b``); without it, ``b`` rides along the first `push`.

        Returns:
            A `FrozenSystem` whose token 0 is this one's token ``start``; its ``biases``
            are the window's own affine part. Without ``graph``, a window that is the whole
            system is the system itself.
        """
        self._alive()
        if start == 0 and self.position == self.tokens.shape[1] - 1 and not graph:
            return self
        n = self.position + 1 - start
        x = self.x.new_zeros(1, n, self.x.shape[-1]).detach()
        if windowable(self.model):
            window = dataclasses.replace(
                self, tokens=self.tokens[:, start : self.position + 1], position=n - 1, x=x,
                factors=slice_factors(self.model, self.factors, start, self.position + 1), ys=None, biases=None,
                sequences={name: v[start : self.position + 1] for name, v in self.sequences.items()},
            )
        else:  # the whole prompt replayed, with the inputs outside the window held at zero
            window = dataclasses.replace(self, x=x, start=start, ys=None, biases=None)
        if not graph:
            return window
        window = window.with_graph()
        return dataclasses.replace(window, biases={name: y.detach() for name, y in window.ys.items()})

    def frozen_norm(self, norm: str) -> FrozenAffine:
        """A norm module frozen at the target position, as an affine map.

        Args:
            norm: Module name, e.g. ``"blocks.3.ln1_post"``.

        Returns:
            A `tl_linmap.reading.tokens.FrozenAffine`.
        """
        self._alive()
        return frozen_norm(self.model, norm, self.factors, self.position)

    def attention_pattern(self, layer: int) -> Float[Tensor, "n_heads query key"] | None:
        """One block's attention pattern as this system holds it frozen.

        Args:
            layer: Block index.

        Returns:
            ``pattern[h, q, k]``: the weight head ``h`` gives key position ``k`` at query position
            ``q`` (each row sums to one); None where the pattern is frozen through the queries and
            keys that make it (a wrapped attention whose ``hook_pattern`` only observes), so no
            pattern was recorded.
        """
        pattern = self.factors.get(get_act_name("pattern", layer))
        return None if pattern is None else pattern[0]

    def reader(self, name: str) -> TokenReader:
        """How a target's vectors are read as tokens: through ``ln_final`` frozen at the target position.

        Args:
            name: Target hook name.

        Returns:
            A `tl_linmap.reading.tokens.Readout` (no norm for the final norm's own output).
        """
        if name.startswith("ln_final."):  # the final norm's own hooks: only what follows them applies
            return TokenReader(model=self.model, final_norm=after_output(self.model, name))
        return TokenReader(model=self.model, final_norm=self.final_norm, residual=name.endswith(RESIDUAL_HOOKS))

    def reader_at(self, name: str, position: int) -> TokenReader:
        """`reader` of a target's vector at another position: ``ln_final`` frozen there.

        Args:
            name: Target hook name.
            position: Non-negative position.

        Returns:
            A `tl_linmap.reading.tokens.Readout`.
        """
        if position == self.position or name.startswith("ln_final.") or self.final_norm is None:
            return self.reader(name)
        self._alive()
        norm = frozen_norm(self.model, "ln_final", self.factors, position)
        return TokenReader(model=self.model, final_norm=norm, residual=name.endswith(RESIDUAL_HOOKS))

    def result_fields(self, name: str) -> dict:
        """The `tl_linmap.results.maps.TargetResult` fields of one target (``b`` must be known).

        Args:
            name: Target hook name.

        Returns:
            ``bias``, ``output``, ``native_output``, ``tokens``, ``target``, ``position``, ``reader``, ``source``.

        Raises:
            FreezeError: if ``b`` has not been computed (see `with_biases`).
        """
        if self.biases is None:
            raise FreezeError("b is not known yet: use system.with_biases().")
        return dict(
            reader=self.reader(name),
            bias=self.biases[name].detach(),
            output=self.outputs[name],
            native_output=self.natives[name],
            tokens=self.tokens[0],
            target=name,
            position=self.position,
            source=self.source,
        )


def _check_order(source: str, names: Sequence[str], fired: Sequence[str]) -> None:
    # A target that fires before its source cannot depend on it (the forward runs in this order).
    early = [name for name in names if fired.index(name) < fired.index(source)]
    if early:
        raise InputError(
            f"The target {early[0]!r} comes before the source {source!r} in the forward pass: it cannot depend on it. "
            "Pass a source that comes before every target (an earlier layer, or source=None for the token embeddings)."
        )


@contextmanager
def frozen_system(
    model,
    prompt_or_tokens: Prompts | Prompt,
    targets: Sequence[str],
    *,
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
    source: str | None = None,
    native: bool = True,
) -> Iterator[FrozenSystem]:
    """Borrow the model and run the passes every linear-system computation shares.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt_or_tokens: One prompt as read by its entry point (`tl_linmap.base.prompts.Prompts`,
            which holds its target position), or as text or token ids.
        targets: Hook names (or ``"output"``).
        position: Sequence position of the targets, for a prompt not read yet.
        dtype: Working dtype (the model comes back bit for bit on exit).
        source: The hook point the system starts from (`tl_linmap.freeze.targets.resolve_source`;
            None: the token embeddings). Every target must fire at or after it.
        native: Run the plain forward, for ``natives`` (a map's native gap); False: a call that reports
            none saves that pass, and ``natives`` are the frozen forward's.

    Returns:
        A context manager yielding the `FrozenSystem` (without graph or ``b``: see
        `FrozenSystem.with_graph`, `FrozenSystem.with_biases`, `FrozenSystem.push`).

    Raises:
        InputError: for a bad model, prompt, dtype, position, targets or source (also a
            target that fires before the source).
        FreezeError: if a freeze hook never ran.
    """
    # Every argument is checked before the model is borrowed.
    if not isinstance(prompt_or_tokens, Prompts):
        prompt_or_tokens = read_prompts(model, prompt_or_tokens, position=position, several=False)
    (tokens,), (position,) = prompt_or_tokens.tokens, prompt_or_tokens.positions
    dtype = check_dtype(dtype)
    names = resolve_targets(model, targets)
    source = resolve_source(model, source, factor_names(model))
    lease = _Lease()
    linear = purely_linear(model)  # before the borrow, whose own hooks add nothing
    with borrowed(model, dtype), naming_foreign(model):
        try:
            natives, outputs, factors = _forwards(model, tokens, names, source, native)
            yield _system(model, tokens, position, names, source, natives, outputs, factors, lease, linear)
        finally:
            lease.active = False


def _forwards(model, tokens: Tensor, names: Sequence[str], source: str, native: bool = True) -> tuple[Vectors, Vectors, Factors]:
    # The plain forward (natives; without `native`, the frozen one stands in) and the frozen one
    # (outputs, factors) of a borrowed model.
    factors: Factors = {}
    with torch.no_grad():  # values only: the replay builds the graph a route needs
        natives = capture(model, tokens, [*names, EMBED_HOOK]) if native else None
        # Up to the final norm, so every factor is recorded (and checked) for the replay.
        outputs = capture(model, tokens, [*names, output_hook(model), source, EMBED_HOOK], freeze_hooks(model, factors=factors))
    check_factors(model, factors)
    _check_order(source, names, list(outputs))
    return natives if native else outputs, outputs, factors


def _system(
    model, tokens, position: int, names, source: str, natives: Vectors, outputs: Vectors, factors: Factors, lease: _Lease, linear: bool
) -> FrozenSystem:
    # One prompt's system from its plain and frozen activations (batch 1, no padding); `linear`: `purely_linear(model)`.
    n = tokens.shape[1]
    x = every_position(outputs[source], n) if source != EMBED_HOOK else natives[EMBED_HOOK]
    trim = trimmed_block(names, model.cfg, model.hook_dict) if windowable(model) else None
    if trim is not None and target_depth(source, model.cfg.n_layers) > trim:
        trim = None  # the source is inside the block: a cut there would cut the source too
    return FrozenSystem(
        model=model,
        tokens=tokens,
        position=position,
        names=names,
        x=x.detach().clone(),
        factors=factors,
        outputs={name: at_position(outputs[name], position, n)[0].detach() for name in names},
        sequences={name: every_position(outputs[name], n)[0].detach() for name in names},
        natives={name: at_position(natives[name], position, n)[0].detach() for name in names},
        final_norm=frozen_norm(model, "ln_final", factors, position) if "ln_final.hook_scale" in factors else None,
        lease=lease,
        trim=trim,
        linear=linear and source.endswith(WHOLE_STREAM_SOURCES),
        source=source,
    )


def batchable(model) -> bool:
    """Whether several prompts' systems can share padded passes (`frozen_batch`).

    Prompts of different lengths are padded on the right: under causal attention a pad after
    a prompt's tokens changes nothing before it, and positions stay the unpadded call's. Each
    prompt's factors are then the batch's cut to its tokens, which needs factors that can be
    cut to a window (`tl_linmap.freeze.factors.windowable`); other models run prompt by prompt.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.

    Returns:
        True where the batched passes are exact.
    """
    return windowable(model)


@dataclass(frozen=True)
class SystemBatch:
    """Several prompts' frozen systems, recorded in one padded frozen forward, valid inside `frozen_batch`.

    Each prompt's `FrozenSystem` (``systems``) is exactly the one `frozen_system` gives for it
    alone. The batch replays many rows of many prompts in one forward: row ``r`` of a replay
    over ``members`` (indices of prompts) belongs to prompt ``members[r % len(members)]``, so
    the batched factors, repeated along the batch, line up with the rows
    (`tl_linmap.freeze.hooks.broadcast`), and each row is read at its own prompt's target position.

    Attributes:
        systems: One `FrozenSystem` per prompt.
        tokens: ``(batch, pos)``, padded on the right (a pad repeats the prompt's last token).
        factors: Every prompt's frozen factors, padded on the right (`tl_linmap.freeze.factors.pad_factors`);
            None for a model that is not `batchable`, whose prompts share only the borrow and the
            first forwards (each `FrozenSystem` still serves alone).
    """

    systems: tuple[FrozenSystem, ...]
    tokens: Int[Tensor, "batch pos"] = field(repr=False)
    factors: Factors | None = field(repr=False)

    def positions(self, members: Sequence[int]) -> Tensor:
        """Target positions of some prompts.

        Args:
            members: Prompt indices.

        Returns:
            ``(len(members),)`` positions.
        """
        return torch.tensor([self.systems[b].position for b in members], device=self.tokens.device)

    def groups(self, start: int, fits, *, share: float = 0.9) -> list[list[int]]:
        """Prompts whose target is at ``start`` or later, in groups of similar window length.

        Every row of a replay runs over the longest window of its group, so a group holds
        prompts whose windows (``start`` to their target) are at least ``share`` of its longest
        (less two positions): short prompts do not pay for the long ones' positions.

        Args:
            start: First position of the window.
            fits: ``fits(window)``: how many prompts fit in one pass for that window length.
            share: Shortest window of a group, as a share of its longest.

        Returns:
            Lists of prompt indices, longest windows first.
        """
        lasts = {b: s.position for b, s in enumerate(self.systems) if s.position >= start}
        groups: list[list[int]] = []
        for b in sorted(lasts, key=lambda b: -lasts[b]):
            longest = lasts[groups[-1][0]] + 1 - start if groups else 0
            # Two positions of slack: for short windows a pass's fixed cost outweighs a few wasted positions.
            if groups and lasts[b] + 3 - start >= share * longest and len(groups[-1]) < max(1, fits(longest)):
                groups[-1].append(b)
            else:
                groups.append([b])
        return groups

    def replay(self, members: Sequence[int], embeddings: Float[Tensor, "rows pos d_in"], start: int = 0) -> Vectors:
        """The replayed systems of ``members`` on a window from ``start``, one forward of all rows.

        Args:
            members: Prompt indices (each target position at least ``start``).
            embeddings: Source activations, ``len(members) · m`` rows over the positions
                ``start..`` up to the members' last target position; row ``r`` is prompt
                ``members[r % len(members)]``'s.
            start: First position of the window (the same for every member).

        Returns:
            Per target, ``(rows, d_out)``: each row at its prompt's target position; a graph if
            ``embeddings`` has one.

        Raises:
            InputError: for a batch of a model that is not `batchable` (no padded factors).
        """
        first = self.systems[0]
        first._alive()
        if self.factors is None:
            raise InputError("This model's factors cannot be cut to one prompt of a batch (see batchable): replay each system alone.")
        model, index = first.model, torch.tensor(list(members), device=self.tokens.device)
        stop = start + embeddings.shape[1]
        positions = self.positions(members) - start
        factors = {name: f.index_select(0, index) for name, f in self.factors.items()}
        factors = slice_factors(model, factors, start, stop)
        rows = positions.repeat(len(embeddings) // len(members))
        hooks = replay_hooks(model, factors) if first.trim is None else (
            trim_hooks(first.trim, rows) + replay_hooks(model, trim_factors(model, factors, first.trim, positions))
        )
        hooks = [(first.source, lambda act, hook=None: embeddings.reshape(act.shape))] + hooks
        tokens = self.tokens.index_select(0, index)[:, start:stop].repeat(len(embeddings) // len(members), 1)
        return capture(model, tokens, first.names, hooks, select=lambda act: _at_own_position(act, rows, stop - start))

    def push(self, members: Sequence[int], embeddings: Float[Tensor, "rows pos d_in"], start: int = 0) -> tuple[Vectors, Vectors]:
        """``Σ_i J_i e_i`` per row (see `replay`), with each member's ``b`` riding along as one more row.

        Args:
            members: Prompt indices.
            embeddings: As for `replay`.
            start: First position of the window.

        Returns:
            ``(linear, biases)``: per target ``(rows, d_out)``, and each member's window ``b``,
            ``(len(members), d_out)``.
        """
        g = len(members)
        with torch.no_grad():
            ys = self.replay(members, torch.cat([embeddings, embeddings.new_zeros(g, *embeddings.shape[1:])]), start)
        biases = {name: y[-g:] for name, y in ys.items()}
        return {name: y[:-g] - biases[name].repeat(len(y) // g - 1, 1) for name, y in ys.items()}, biases

    def x(self, members: Sequence[int], stop: int) -> Float[Tensor, "members pos d_in"]:
        """The members' source activations, padded with zeros on the right to ``stop`` positions.

        Args:
            members: Prompt indices.
            stop: Positions kept.

        Returns:
            ``(len(members), stop, d_in)``.
        """
        xs = [self.systems[b].x[0, :stop] for b in members]
        out = xs[0].new_zeros(len(xs), stop, xs[0].shape[-1])
        for row, x in zip(out, xs):
            row[: len(x)] = x
        return out


def _at_own_position(act: Tensor, positions: Tensor, n_tokens: int) -> Tensor:
    # Each row's vector at its own position: indexing by a tensor copies, so a wide batch keeps
    # no whole activation alive.
    return at_rows(every_position(act, n_tokens), positions)[:, 0]


@contextmanager
def frozen_batch(
    model,
    prompts: Prompts,
    targets: Sequence[str],
    *,
    dtype: torch.dtype | None = torch.float64,
    source: str | None = None,
) -> Iterator[SystemBatch]:
    """`frozen_system` of several prompts: one borrow, one plain and one frozen forward for all.

    The plain and frozen forwards run once per prompt length (the prompts of one length in one
    batch, unpadded: a padded row changes the model's own float32 softmax by a longer sum; once
    per prompt for a model that is not `batchable`), so each prompt's system is exactly its
    one-prompt system. The replays then pad every prompt
    on the right to the longest (`tl_linmap.freeze.factors.pad_factors`): under causal attention nothing
    after a position changes it, and positions stay the unpadded call's, so no attention mask
    is needed (TransformerLens leaves right padding unmasked for the same reason).

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture; the padded
            replays (`SystemBatch.replay`, `SystemBatch.push`) need one whose factors can be cut (`batchable`).
        prompts: The prompts and their target positions (`tl_linmap.base.prompts.read_prompts`).
        targets: Hook names (or ``"output"``).
        dtype: Working dtype (the model comes back bit for bit on exit).
        source: As for `frozen_system`.

    Returns:
        A context manager yielding the `SystemBatch`.

    Raises:
        InputError: as `frozen_system`.
    """
    dtype = check_dtype(dtype)
    names = resolve_targets(model, targets)
    source = resolve_source(model, source, factor_names(model))
    lengths = prompts.lengths
    longest = max(lengths)
    lease = _Lease()
    systems: list[FrozenSystem | None] = [None] * len(prompts)
    linear = purely_linear(model)
    with borrowed(model, dtype):
        try:
            # One forward per prompt length: a padded row would change the model's own float32
            # softmax (a longer sum), so each prompt's factors are those of its unpadded forward.
            # A model that is not batchable may record factors over flattened tokens (OPT's MLP, a
            # mixture of experts' routers), from which no row can be cut: one forward per prompt.
            cuttable = batchable(model)
            if cuttable:
                groups = [[b for b, length in enumerate(lengths) if length == n] for n in sorted(set(lengths))]
            else:
                groups = [[b] for b in range(len(prompts))]
            for members in groups:
                tokens = torch.cat([prompts.tokens[b] for b in members])
                natives, outputs, factors = _forwards(model, tokens, names, source)
                for row, b in enumerate(members):
                    own = factors if len(members) == 1 else {name: f[row : row + 1] for name, f in factors.items()}
                    acts = [{name: a[row : row + 1] for name, a in group.items()} for group in (natives, outputs)]
                    systems[b] = _system(model, tokens[row : row + 1], prompts.positions[b], names, source, *acts, own, lease, linear)
            tokens = torch.stack([torch.cat([t[0], t[0, -1:].expand(longest - len(t[0]))]) for t in prompts.tokens])
            factors = None
            if cuttable:
                padded = [pad_factors(model, s.factors, longest) for s in systems]
                factors = {name: torch.cat([p[name] for p in padded]) for name in padded[0]}
            yield SystemBatch(tuple(systems), tokens, factors)
        finally:
            lease.active = False


def one_token_rows(x: Float[Tensor, "*prompts pos d"], tokens: range) -> Float[Tensor, "rows *prompts pos d"]:
    """Inputs that push one token each through a frozen system (`FrozenSystem.push`).

    Args:
        x: The embeddings (of one prompt, or of several along leading axes).
        tokens: The tokens to push, one per row.

    Returns:
        Row ``r``: token ``tokens[r]``'s own embedding at its position, zero elsewhere (of each prompt).
    """
    rows = torch.zeros(len(tokens), *x.shape, dtype=x.dtype, device=x.device)
    rows[torch.arange(len(tokens), device=x.device), ..., list(tokens), :] = x[..., list(tokens), :].movedim(-2, 0)
    return rows
