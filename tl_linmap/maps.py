"""Maps: the exact linear system of one inference, ``y = Σ_i J_i x_i + b``.

The operators ``J_i`` come from reverse mode through the graph of the frozen system's replay
(`tl_linmap.system.frozen_system`), batched over output dimensions, or from basis embeddings
pushed forward through it; ``b`` comes from its own replay pass with zero embeddings (or is
exactly zero, see `tl_linmap.system.purely_linear`), so ``relative_error()`` is a real check
of ``J`` and ``b`` against the model's reference forward, not an identity.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_linmap.analysis import (
    LogitSplit,
    OperatorSVD,
    Readout,
    dimensionality,
    logit_contributions,
    operator_svd,
)
from tl_linmap.errors import FreezeError, InputError, MemoryBudgetError
from tl_linmap.freezing import same_path_hooks
from tl_linmap.guard import borrowed
from tl_linmap.inputs import EMBED_HOOK, Prompt, check_position, target_depth, to_tokens
from tl_linmap.system import (
    FrozenAffine,
    FrozenSystem,
    at_position,
    capture,
    frozen_system,
    run_to_target,
    vjp,
)
from tl_linmap.table import Table


@dataclass(kw_only=True)
class TargetResult:
    """What every result about one target vector shares: its affine part and the model's values.

    Attributes:
        bias: ``b``, everything that does not scale with the token embeddings
            (biases, learned positions), computed through the frozen system.
        output: The model's value of the target (reference forward, true working dtype).
        native_output: The value from a plain forward on the bridge's native norm path
            (HF computes RMSNorm in float32 even in float64 models).
        tokens: The input tokens.
        target: The hook name mapped (flattened after the position axis).
        position: The sequence position of the target.
        readout: How its vectors are read as tokens (`tl_linmap.analysis.Readout`).
    """

    bias: Float[Tensor, " d_out"]
    output: Float[Tensor, " d_out"]
    native_output: Float[Tensor, " d_out"] = field(repr=False)
    tokens: Int[Tensor, " pos"] = field(repr=False)
    target: str = "ln_final.hook_out"
    position: int = -1
    readout: Readout | None = field(default=None, repr=False)

    def contributions(self) -> Float[Tensor, "pos d_out"]:
        """Per-token contributions ``J_i x_i``; they sum to ``output - bias``.

        Returns:
            One output-space vector per input token.
        """
        raise NotImplementedError

    def logit_contributions(self, token: int | str) -> LogitSplit:
        """One token's logit split exactly over the input tokens (see `tl_linmap.analysis.logit_contributions`).

        Args:
            token: Output token id or single-token string.

        Returns:
            A `LogitSplit`.
        """
        return logit_contributions(self, token)

    def reconstruct(self) -> Float[Tensor, " d_out"]:
        """The linear system's value ``Σ_i J_i x_i + b``.

        Returns:
            The reconstructed target vector.
        """
        return self.contributions().sum(0) + self.bias

    def relative_error(self) -> float:
        """``‖reconstruct() − output‖ / ‖output‖``.

        Returns:
            The relative reconstruction error (below 1e-12 in float64).
        """
        return _relative(self.reconstruct(), self.output)

    def native_gap(self) -> float:
        """``‖output − native_output‖ / ‖output‖``: the bridge's native-path rounding, not an error of the map.

        Returns:
            The relative gap (about 1e-7 for RMSNorm models in float64, 0 for LayerNorm ones).
        """
        return _relative(self.native_output, self.output)


@dataclass(kw_only=True)
class LinearMap(TargetResult):
    """The detached-Jacobian linear system of one target vector of one inference.

    Attributes:
        operators: ``J_i``, one ``d_out x d_in`` block per input token (zero after ``position``).
        inputs: ``x_i``, the token embeddings (output of ``hook_embed``).
    """

    operators: Float[Tensor, "pos d_out d_in"]
    inputs: Float[Tensor, "pos d_in"]

    def contributions(self) -> Float[Tensor, "pos d_out"]:
        """Per-token contributions ``J_i x_i``.

        Returns:
            One output-space vector per input token; they sum to ``output - bias``.
        """
        return einops.einsum(self.operators, self.inputs, "pos d_out d_in, pos d_in -> pos d_out")

    def svd(self, k: int | None = None, *, skip_first: bool = False) -> OperatorSVD:
        """SVD of each token's operator and of the stacked operator (see `tl_linmap.analysis.operator_svd`).

        Args:
            k: Pairs kept per operator (default: all).
            skip_first: Leave the first token (BOS, attention sink) out of the stacked operator.

        Returns:
            An `OperatorSVD`, each pair signed so that ``u`` points along the output.
        """
        return operator_svd(self, k, skip_first=skip_first)

    def decode(self, k: int = 3, top: int = 10, tokens: list[int] | int | None = None, *, skip_first: bool = False, stacked: bool = False) -> Table:
        """The top-k singular pairs of the operators, read as tokens (see `OperatorSVD.decode`).

        Args:
            k: Pairs per operator.
            top: Tokens per vector.
            tokens: Input token indices (default: all up to the target position).
            skip_first: Leave the first token out.
            stacked: Also read the stacked operator ``[J_0 … J_n]``.

        Returns:
            A `tl_linmap.table.Table` of `DecodedPair`.
        """
        return self.svd(k, skip_first=skip_first).decode(k, top, tokens, skip_first=skip_first, stacked=stacked)

    def dimensionality(self, *, skip_first: bool = False, per_token: bool = True) -> Table:
        """Stable, effective and 90%/99% energy ranks (see `tl_linmap.analysis.dimensionality`).

        Args:
            skip_first: Leave the first token out.
            per_token: One row per token as well as the stacked operator's.

        Returns:
            A `tl_linmap.table.Table` of `RankRow`.
        """
        return dimensionality(self, skip_first=skip_first, per_token=per_token)


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _jacobian(y: Float[Tensor, " d_out"], x: Tensor, chunk_size: int, bar: tqdm) -> Float[Tensor, "pos d_out d_in"]:
    # One vmapped backward per chunk of output dimensions over the shared replay graph.
    eye = torch.eye(y.shape[0], dtype=y.dtype, device=y.device)
    rows = []
    for start in range(0, y.shape[0], chunk_size):
        rows.append(vjp(y, x, eye[start : start + chunk_size]))
        bar.update(len(rows[-1]))
    return einops.rearrange(torch.cat(rows), "d_out pos d_in -> pos d_out d_in")


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors on a device.

    Args:
        device: Where the computation runs.

    Returns:
        Free bytes (GPU: ``cuda.mem_get_info``; CPU: available physical pages).
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def activation_bytes(model, n_tokens: int, itemsize: int) -> int:
    """Rough memory one batch row holds in a pass: about ten activations of the widest layer.

    Args:
        model: The model (for its widths).
        n_tokens: Prompt length.
        itemsize: Bytes per number.

    Returns:
        Bytes per row in flight.
    """
    width = max(model.cfg.d_model, getattr(model.cfg, "d_mlp", None) or 0)
    return itemsize * n_tokens * 10 * width


def _fit_rows(per_row: int, operators: int, limit: int, chunk_size: int | None, device: torch.device) -> int:
    # Rows per pass that fit in half the free memory once the operators are stored.
    free = available_bytes(device)
    budget = free // 2 - operators
    gib = 2**30
    if budget < per_row:
        raise MemoryBudgetError(
            f"The operators need {operators / gib:.2f} GiB, with {free / gib:.2f} GiB free: "
            "use fewer targets or a shorter prompt."
        )
    fits = int(min(limit, budget // per_row))
    if chunk_size is not None and chunk_size > fits:
        raise MemoryBudgetError(
            f"chunk_size={chunk_size} risks running out of memory (about {chunk_size * per_row / gib:.2f} GiB "
            f"in flight, {budget / gib:.2f} GiB to spare); use chunk_size={fits} or less."
        )
    return chunk_size or fits


#: Rows times positions per batched backward: past this the products are wide enough to run
#: at the matmul rate, and more rows in flight only cost memory (SmolLM2, 16 tokens: 128 rows
#: ran 5% faster than all 576 at a third of the peak memory).
ROW_POSITIONS = 2048


def plan_chunk(model, n_tokens: int, d_out: int, n_targets: int, dtype: torch.dtype, chunk_size: int | None, device: torch.device) -> int:
    """Output rows per batched backward: about `ROW_POSITIONS` row-positions, within half the free memory.

    A rough but conservative memory model: each row in flight holds a gradient of the
    embeddings plus about ten activation-sized gradients of the widest layer.

    Args:
        model: The model (for its widths).
        n_tokens: Prompt length.
        d_out: Rows of the largest target.
        n_targets: Targets whose operators are kept.
        dtype: Working dtype.
        chunk_size: The user's choice, or None to pick one.
        device: Where the computation runs.

    Returns:
        The chunk size to use.

    Raises:
        MemoryBudgetError: if the operators themselves, or the user's chunk, would not fit.
    """
    item = torch.finfo(dtype).bits // 8
    per_row = item * n_tokens * model.cfg.d_model + activation_bytes(model, n_tokens, item)  # + the row's gradient
    operators = item * n_tokens * d_out * model.cfg.d_model * n_targets
    fits = _fit_rows(per_row, operators, d_out, chunk_size, device)
    return chunk_size or min(fits, max(32, ROW_POSITIONS // n_tokens))


def plan_columns(model, n_tokens: int, window: int, widths: Sequence[int], dtype: torch.dtype, chunk_size: int | None, device: torch.device) -> int:
    """Basis embeddings per forward pass of one token's window that fit in half the free memory.

    Each row in flight holds its embeddings, about ten activations of the widest layer
    over the window, and its target vectors; the operators of every target are stored too.

    Args:
        model: The model (for its widths).
        n_tokens: Prompt length (operators cover every token).
        window: Positions in the window (token to target position).
        widths: ``d_out`` of each target.
        dtype: Working dtype.
        chunk_size: The user's choice, or None to pick one.
        device: Where the computation runs.

    Returns:
        The chunk size to use (at most ``d_model``, the basis of one token).

    Raises:
        MemoryBudgetError: if the operators themselves, or the user's chunk, would not fit.
    """
    item = torch.finfo(dtype).bits // 8
    d_in = model.cfg.d_model
    per_row = item * (window * d_in + sum(widths)) + activation_bytes(model, window, item)
    operators = item * n_tokens * d_in * sum(widths)
    return _fit_rows(per_row, operators, d_in, chunk_size, device)


#: Values of ``linear_maps(route=...)``.
ROUTES = ("auto", "backward", "forward")


def forward_row_cost(cfg) -> float:
    """Cost of one forward-route row per position and layer, relative to one backward row.

    A backward row only multiplies through the live projections (V, O and the MLP's
    ``W_in``/``W_up`` and ``W_out``): the frozen factors' inputs get no gradient. A forward
    row of the replayed system still computes Q, K and the gated MLP's gate before their
    factors replace them. The ratio of the matmul widths: about 1.6 for Llama-like blocks
    (GQA, SwiGLU), 1.2 for GPT-2-like ones; it matches the measured time ratio.

    Args:
        cfg: The model's config (``d_head``, ``n_heads``, ``n_key_value_heads``, ``d_mlp``,
            ``gated_mlp``).

    Returns:
        The ratio (at least 1).
    """
    d_q = cfg.n_heads * cfg.d_head
    d_kv = (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    gated = bool(getattr(cfg, "gated_mlp", False))
    live = d_kv + d_q + 2 * d_mlp  # V, O, MLP in/up and out
    frozen = d_q + d_kv + (d_mlp if gated else 0)  # Q, K, gate: computed, then replaced
    return (live + frozen) / live


def choose_route(d_in: int, n_tokens: int, position: int, targets: Sequence[tuple[int, int]], forward_cost: float = 1.0) -> str:
    """Pick the cheaper way to compute dense operators, by a count of row-position-layers.

    The backward route runs ``d_out`` vector-Jacobian rows per target, each through the
    target's depth over the whole prompt: ``Σ_targets d_out · depth · n_tokens``. The
    forward route pushes ``d_in`` basis embeddings per token ``i <= position`` through its
    window ``i..position`` up to the deepest target, serving every target at once:
    ``forward_cost · Σ_i d_in · (position − i + 1) · max depth``. So the forward route wins
    for many targets and short prompts (e.g. every layer's residual stream), the backward
    one for a few narrow targets (e.g. only the output) or long prompts.

    Args:
        d_in: Embedding width.
        n_tokens: Prompt length.
        position: Target position (non-negative).
        targets: ``(d_out, depth)`` per target, depth in blocks (see `target_depth`).
        forward_cost: Cost of a forward row relative to a backward row, per position and
            layer (see `forward_row_cost`).

    Returns:
        ``"forward"`` if its estimated work is smaller, else ``"backward"``.
    """
    windows = (position + 1) * (position + 2) // 2  # Σ_i (position − i + 1)
    forward = forward_cost * d_in * windows * max((depth for _, depth in targets), default=0)
    backward = n_tokens * sum(d_out * depth for d_out, depth in targets)
    return "forward" if forward < backward else "backward"


def basis_scale(system: FrozenSystem) -> float:
    """Length ``s`` of the basis embeddings the forward route pushes: a power of two, at least 1.

    ``F(s·e) − b`` loses about ``eps·‖b‖`` to cancellation, so a model with a large affine
    part (biases, learned positions) needs ``s·‖J e‖`` well above ``‖b‖``. A column is about
    as long as the linear part per unit of input, ``‖y − b‖ / Σ_i ‖x_i‖``; ``s`` makes
    ``s·‖J e‖ ≈ 16·‖b‖`` for the target with the largest ``‖b‖ / ‖y − b‖``, capped at ``2**16``
    and at a quarter of the dtype's exponent range (float16). Without an affine part ``s = 1``.

    Args:
        system: The frozen system.

    Returns:
        The scale (exact to multiply and divide by).
    """
    x = system.x[0, : system.position + 1].detach()
    gain = x.norm(dim=-1).sum().item()
    ratios = [
        (system.biases[name].norm() / linear).item()
        for name in system.names
        if (linear := (system.outputs[name] - system.biases[name]).norm()) > 0
    ]
    wanted = 16 * max(ratios, default=0.0) * gain
    if not math.isfinite(wanted) or wanted <= 1:
        return 1.0
    cap = min(16, math.floor(math.log2(torch.finfo(x.dtype).max) / 4))
    return float(2 ** min(round(math.log2(wanted)), cap))


def _columns(system: FrozenSystem, chunk_size: int | None, bar: tqdm) -> dict[str, Float[Tensor, "pos d_out d_in"]]:
    # Every target's operators at once, by pushing basis embeddings through each token's window.
    x = system.x
    n, d_in = x.shape[1], x.shape[2]
    widths = [system.outputs[name].shape[0] for name in system.names]
    last = system.position
    chunks = [plan_columns(system.model, n, last + 1 - i, widths, x.dtype, chunk_size, x.device) for i in range(last + 1)]
    operators = {name: x.new_zeros(n, w, d_in) for name, w in zip(system.names, widths)}
    scale = basis_scale(system)
    for token, chunk in enumerate(chunks):
        window = system.window(token, graph=False)
        for start in range(0, d_in, chunk):
            dims = range(start, min(start + chunk, d_in))
            for name, cols in window.push_basis(0, dims, scale).items():
                operators[name][token, :, dims.start : dims.stop] = cols.T
            bar.update(len(dims))
    for name, ops in operators.items():
        if not ops.any():
            raise InputError(f"{name!r} does not depend on the token embeddings (a frozen factor?).")
    return operators


def linear_maps(
    model,
    prompt_or_tokens: Prompt,
    targets: Sequence[str],
    *,
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
    chunk_size: int | None = None,
    check: bool = True,
    progress: bool = False,
    norms: Sequence[str] = (),
    route: str = "auto",
) -> tuple[dict[str, LinearMap], dict[str, FrozenAffine]]:
    """Linear maps of several targets of one inference, sharing every forward pass.

    One plain and one frozen forward serve all targets, and so does the zero-input replay for
    ``b`` where ``b`` is not exactly zero (see `tl_linmap.system`). The operators then come by
    one of two routes, equal to float64 rounding:

    - ``"backward"``: per target, batched backward passes from its own node of one shared
      replay graph (``d_out`` rows per target, each only through the layers below it);
    - ``"forward"``: the replayed system is exactly affine, so pushing the basis embedding
      ``e_{i,d}`` through it gives column ``d`` of ``J_i`` for every target at once
      (``d_in`` rows per token, each through the window from that token to ``position``).

    Args:
        model: A TransformerBridge of a supported architecture.
        prompt_or_tokens: One prompt as text or token ids.
        targets: Hook names (or ``"output"``).
        position: Sequence position of the targets.
        dtype: Working dtype (the model's own is restored afterwards).
        chunk_size: Rows per batched pass: output dimensions per backward pass, or basis
            embeddings per forward pass (default: as many as fit in half the free memory,
            for backward passes at most about `ROW_POSITIONS` rows times positions).
        check: Raise `FreezeError` if a map does not reconstruct its output.
        progress: Show a progress bar over Jacobian rows (backward) or columns (forward).
        norms: Norm modules (e.g. ``"ln_final"``) to also return frozen at ``position``.
        route: ``"backward"``, ``"forward"``, or ``"auto"`` for the one `choose_route`
            estimates cheaper (forward for many targets on a short prompt, backward for
            one narrow target or a long prompt).

    Returns:
        ``(maps, frozen_norms)``: a `LinearMap` per target name, a `FrozenAffine` per norm.

    Raises:
        InputError: for a bad prompt, position, target, chunk size or route.
        MemoryBudgetError: if the operators, or the given chunk size, would not fit.
        FreezeError: if ``check`` and a map does not reconstruct its output.
    """
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be a positive number of rows per pass, got {chunk_size}.")
    if route not in ROUTES:
        raise InputError(f"route must be one of {', '.join(map(repr, ROUTES))}, got {route!r}.")
    with frozen_system(model, prompt_or_tokens, targets, position=position, dtype=dtype, graph=False) as system:
        x = system.x
        if route == "auto":
            shapes = [(system.outputs[name].shape[0], target_depth(name, model.cfg.n_layers)) for name in system.names]
            route = choose_route(x.shape[-1], x.shape[1], system.position, shapes, forward_row_cost(model.cfg))
        if route == "forward":
            total = (system.position + 1) * x.shape[-1]
            with tqdm(total=total, disable=not progress, desc="detached Jacobian columns (forward)") as bar:
                operators = _columns(system, chunk_size, bar)
        else:
            system.build_graph()
            ys = system.ys
            chunk = plan_chunk(model, x.shape[1], max(y.shape[0] for y in ys.values()), len(ys), x.dtype, chunk_size, x.device)
            total = sum(y.shape[0] for y in ys.values())
            with torch.enable_grad(), tqdm(total=total, disable=not progress, desc="detached Jacobian rows (backward)") as bar:
                operators = {name: _jacobian(ys[name], x, chunk, bar) for name in system.names}
        frozen_norms = {norm: system.frozen_norm(norm) for norm in norms}
        maps = {
            name: LinearMap(operators=operators[name], inputs=x[0].detach(), **system.result_fields(name))
            for name in system.names
        }
    if check:
        for lm in maps.values():
            _check_exact(lm)
    return maps, frozen_norms


def plain_jacobians(model, prompt_or_tokens: Prompt, targets: Sequence[str], *, position: int = -1, dtype: torch.dtype | None = torch.float64) -> dict[str, Float[Tensor, "pos d_out d_in"]]:
    """Ordinary (not detached) Jacobians of targets, for comparison with the detached ones.

    Args:
        model: A TransformerBridge of a supported architecture.
        prompt_or_tokens: One prompt.
        targets: Hook names.
        position: Sequence position.
        dtype: Working dtype.

    Returns:
        Operators per target, as in `LinearMap.operators`.
    """
    tokens = to_tokens(model, prompt_or_tokens)
    n = tokens.shape[1]
    position = check_position(position, n)
    with borrowed(model, dtype), torch.enable_grad():
        x = run_to_target(model, tokens, EMBED_HOOK).detach().clone().requires_grad_(True)
        acts = capture(model, tokens, targets, same_path_hooks(model), x)
        ys = {name: at_position(acts[name], position, n)[0] for name in targets}
        chunk = plan_chunk(model, n, max(y.shape[0] for y in ys.values()), len(ys), x.dtype, None, x.device)
        with tqdm(disable=True) as bar:
            return {name: _jacobian(y, x, chunk, bar) for name, y in ys.items()}


def _check_exact(lm: LinearMap) -> None:
    tolerance = torch.finfo(lm.operators.dtype).eps ** 0.5
    if not lm.relative_error() <= tolerance:  # NaN fails too
        raise FreezeError(
            f"The detached system of {lm.target} misses the model's output by {lm.relative_error():.2e} "
            f"(tolerance {tolerance:.1e}): a freeze rule had no effect, or the model's weights were "
            "processed in a way the rules do not cover."
        )


def linear_map(
    model,
    prompt_or_tokens: Prompt,
    *,
    target: str = "output",
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
    chunk_size: int | None = None,
    check: bool = True,
    progress: bool = False,
    route: str = "auto",
) -> LinearMap:
    """The exact linear system of one target vector of one inference.

    Args:
        model: A TransformerBridge of a supported architecture (see `tl_linmap.rules`).
        prompt_or_tokens: One prompt as text or token ids.
        target: ``"output"`` (the final norm's output, read by the unembedding) or any
            hook name such as ``"blocks.3.hook_resid_post"``.
        position: Sequence position of the target vector.
        dtype: Working dtype (float64 for exactness; None keeps the model's). The model's
            own dtype is restored afterwards.
        chunk_size: Output dimensions per batched backward pass (default: about
            `ROW_POSITIONS` rows times positions, within half the free memory; a larger one
            than fits raises `MemoryBudgetError` with a safe size).
        check: Raise `FreezeError` if the system does not reconstruct the output
            (a freeze rule silently had no effect).
        progress: Show a progress bar over Jacobian rows (backward) or columns (forward).
        route: ``"backward"``, ``"forward"`` or ``"auto"`` (see `linear_maps`); for one target
            ``"auto"`` almost always picks the backward route.

    Returns:
        A `LinearMap`.

    Raises:
        InputError: for a bad prompt, position, target or chunk size.
        UnsupportedArchitectureError: if the architecture has no freeze rules.
        FreezeError: if a freeze hook did not take effect.
    """
    maps, _ = linear_maps(
        model, prompt_or_tokens, [target], position=position, dtype=dtype, chunk_size=chunk_size, check=check,
        progress=progress, route=route,
    )
    return next(iter(maps.values()))
