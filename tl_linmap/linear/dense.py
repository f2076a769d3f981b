"""Jacobian: the exact linear system of one inference, ``y = Σ_i J_i x_i + b``, as dense operators.

The operators come by one of two routes through the frozen system (`tl_linmap.freeze.system`),
equal to float64 rounding:

- ``"rows"``: reverse mode through the graph of the frozen system's replay, ``d_out`` batched
  vector-Jacobian rows per target, each only through the layers below it;
- ``"columns"``: the replayed system is exactly affine, so pushing the basis embedding
  ``e_{i,d}`` forward through it gives column ``d`` of ``J_i`` for every target at once
  (``d_in`` rows per token, each through the window from that token to the target).

``b`` comes from its own replay with zero embeddings (or is exactly zero, see
`tl_linmap.freeze.system.purely_linear`), so every map's reconstruction check (`tl_linmap.base.exactness`)
is a real check of ``J`` and ``b`` against the model's reference forward.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_linmap.base import budget  # by module: its memory readings are what tests stand in for
from tl_linmap.base.budget import (
    choose_route,
    forward_row_cost,
    memory_budget,
    parse_memory,
    plan_columns,
    plan_rows,
)
from tl_linmap.base.checks import check_names, check_positive
from tl_linmap.base.compat import check_model, get_act_name
from tl_linmap.base.deprecation import renamed_argument
from tl_linmap.base.errors import InputError, MemoryBudgetError
from tl_linmap.base.guard import borrowed
from tl_linmap.base.hook_names import EMBED_HOOK, independent_target, target_depth
from tl_linmap.base.prompts import Prompt, Prompts, read_prompts
from tl_linmap.base.progress import check_progress, progress_bar
from tl_linmap.base.devices import input_device, resident
from tl_linmap.base.spill import SpilledTensor, SpillWriter
from tl_linmap.freeze.architectures import naming_foreign
from tl_linmap.freeze.capture import at_position, capture, run_to_target
from tl_linmap.freeze.hooks import same_path_hooks
from tl_linmap.freeze.system import (
    FrozenSystem,
    SystemBatch,
    batchable,
    frozen_batch,
    frozen_system,
    vjp,
)
from tl_linmap.freeze.targets import check_norms, resolve_target, resolve_targets
from tl_linmap.linear.plan import refuse_unfit
from tl_linmap.reading.readouts import LinearReadout
from tl_linmap.reading.tokens import TokenReader
from tl_linmap.results.maps import (
    Contributions,
    HeadSplit,
    LinearMap,
    LinearMaps,
    MapStore,
    cast_maps,
)

#: Values of ``route=``: ``"rows"`` (reverse mode, ``d_out`` rows per target), ``"columns"``
#: (basis embeddings pushed forward, ``d_in`` per token), ``"auto"`` (the cheaper by `choose_route`).
ROUTES = ("auto", "rows", "columns")


_OLD_ROUTES = {"backward": "rows", "forward": "columns"}


# Gemma-style sandwich norms: the attention output passes this norm before the residual.
_POST_ATTN_NORM = "ln1_post"


def check_route(route: str) -> str:
    """Validate a ``route=`` value (the old names ``"backward"``/``"forward"`` still work, with a warning).

    Args:
        route: One of `ROUTES`.

    Returns:
        The route's current name.

    Raises:
        InputError: for anything else.
    """
    if not isinstance(route, str):
        raise InputError(f"route must be one of {', '.join(map(repr, ROUTES))}, got {route!r}.")
    if route in _OLD_ROUTES:
        new = _OLD_ROUTES[route]
        warnings.warn(f'route="{route}" is deprecated; use route="{new}".', DeprecationWarning, stacklevel=4)
        return new
    if route not in ROUTES:
        raise InputError(f"route must be one of {', '.join(map(repr, ROUTES))}, got {route!r}.")
    return route


#: Values of ``store=`` besides a directory: ``"memory"`` (every map in memory), ``"disk"`` (every map
#: in a temporary directory); None (the default) keeps maps in memory within the ``memory=`` budget and
#: spills the rest to a temporary directory.
STORES = ("memory", "disk")


def check_store(store: str | Path | None) -> str | Path | None:
    """Validate a ``store=`` value.

    Args:
        store: None, ``"memory"``, ``"disk"`` or a directory (a `pathlib.Path`, or a string with a
            ``/`` or naming an existing directory).

    Returns:
        None, ``"memory"``, ``"disk"`` or a `pathlib.Path`.

    Raises:
        InputError: for anything else, or a path that is a file.
    """
    advice = ('store must be None (maps in memory within memory=, the rest on disk), "memory", "disk" '
              '(a temporary directory) or a directory to keep the maps\' files in')
    if store is None or store in STORES:
        return store
    if not isinstance(store, (str, Path)) or not str(store).strip():
        raise InputError(f"{advice}; got {store!r}.")
    if isinstance(store, str) and "/" not in store and os.sep not in store and not Path(store).is_dir():
        # A bare word is more likely a mistyped keyword than a new directory in the working directory.
        raise InputError(f'store={store!r} is neither "memory" nor "disk": {advice} (a new one as Path({store!r}) or "./{store}").')
    path = Path(store).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"store={str(store)!r} is a file: {advice}.")
    return path


def check_maps_dtype(maps_dtype: torch.dtype | None) -> torch.dtype | None:
    """Validate a ``maps_dtype=`` value.

    Args:
        maps_dtype: None (keep the working dtype) or a floating torch dtype.

    Returns:
        The same value.

    Raises:
        InputError: for anything else.
    """
    if maps_dtype is None or maps_dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        return maps_dtype
    raise InputError(
        f"maps_dtype must be None (the working dtype) or torch.float64, torch.float32, torch.float16 or torch.bfloat16, "
        f"e.g. maps_dtype=torch.float32 to keep the maps in half the memory; got {maps_dtype!r}."
    )


def rows_argument(rows_per_pass: int | None, chunk_size: int | None) -> int | None:
    """Validate ``rows_per_pass`` (``chunk_size`` is its deprecated name).

    Args:
        rows_per_pass: Rows per batched pass, or None.
        chunk_size: The deprecated name, or None.

    Returns:
        The value to use.

    Raises:
        InputError: for a value that is not a positive int, or both names given.
    """
    rows_per_pass = renamed_argument("chunk_size", chunk_size, "rows_per_pass", rows_per_pass)
    return None if rows_per_pass is None else check_positive("rows_per_pass", rows_per_pass)


@dataclass(frozen=True)
class MapOptions:
    """The keyword options of the dense entry points, checked once (`map_options`) and passed down whole.

    The target position is the prompts' (`tl_linmap.base.prompts.Prompts.positions`: resolved
    per prompt), so it is not among them.

    Attributes:
        dtype: Working dtype (None: the model's own); checked where the model is borrowed
            (`tl_linmap.freeze.system.frozen_system`).
        rows_per_pass: Rows per batched pass (None: what fits in half the free memory).
        check: Check every map's reconstruction (`tl_linmap.base.exactness`).
        progress: A progress bar over Jacobian rows or columns: None (default) once the call lasts a few seconds, True at once, False never.
        norms: Further norm modules to return frozen.
        route: ``"rows"``, ``"columns"`` or ``"auto"``.
        source: The hook point the maps start from (None: the token embeddings); resolved
            where the model is borrowed.
        memory: The call's memory budget in bytes (None: `tl_linmap.base.budget.memory_budget`'s default).
        store: Where the maps go (`check_store`).
        maps_dtype: The dtype the maps are kept in (None: the working dtype).
    """

    dtype: torch.dtype | None = torch.float64
    rows_per_pass: int | None = None
    check: bool = True
    progress: bool | None = None
    norms: tuple[str, ...] = ()
    route: str = "auto"
    source: str | None = None
    memory: int | None = None
    store: str | Path | None = "memory"
    maps_dtype: torch.dtype | None = None


def map_options(
    model,
    *,
    dtype: torch.dtype | None = torch.float64,
    rows_per_pass: int | None = None,
    check: bool = True,
    progress: bool | None = None,
    norms: Sequence[str] = (),
    route: str = "auto",
    chunk_size: int | None = None,
    source: str | None = None,
    memory: int | str | None = None,
    store: str | Path | None = "memory",
    maps_dtype: torch.dtype | None = None,
) -> MapOptions:
    """The keyword options of a dense entry point (`linear_maps`), checked, as one value.

    Args:
        model: A TransformerBridge or HookedTransformer.
        dtype: As for `linear_maps` (checked where the model is borrowed).
        rows_per_pass: As for `linear_maps`.
        check: As for `linear_maps`.
        progress: As for `linear_maps`.
        norms: As for `linear_maps`.
        route: As for `linear_maps` (the old names warn).
        chunk_size: Deprecated name of ``rows_per_pass``.
        source: As for `linear_maps` (resolved where the model is borrowed).
        memory: As for `linear_maps`.
        store: As for `linear_maps` (default here ``"memory"``: the old behaviour, for callers
            that need every map in memory).
        maps_dtype: As for `linear_maps`.

    Returns:
        The `MapOptions`.

    Raises:
        InputError: for a bad ``rows_per_pass``, route, model, norm, ``memory``, ``store`` or ``maps_dtype``.
    """
    rows_per_pass = rows_argument(rows_per_pass, chunk_size)
    route = check_route(route)
    check_model(model)
    norms = tuple(check_norms(model, norms)) if norms else ()
    return MapOptions(
        dtype=dtype, rows_per_pass=rows_per_pass, check=check, progress=check_progress(progress), norms=norms, route=route, source=source,
        memory=None if memory is None else parse_memory(memory), store=check_store(store), maps_dtype=check_maps_dtype(maps_dtype),
    )


def _rows(y: Float[Tensor, " d_out"], x: Tensor, rows_per_pass: int, bar: tqdm) -> Float[Tensor, "pos d_out d_in"]:
    # One vmapped backward per chunk of output dimensions over the shared replay graph.
    eye = torch.eye(y.shape[0], dtype=y.dtype, device=y.device)
    rows = []
    for start in range(0, y.shape[0], rows_per_pass):
        rows.append(vjp(y, x, eye[start : start + rows_per_pass]))
        bar.update(len(rows[-1]))
    return einops.rearrange(torch.cat(rows), "d_out pos d_in -> pos d_out d_in")


def basis_scale(system: FrozenSystem) -> float:
    """Length ``s`` of the basis embeddings the columns route pushes: a power of two, at least 1.

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


class _Sink:
    """Where one target's columns go as the columns route computes them: a tensor in memory, or a spill file.

    A spilled target's columns are written as they come, ``J_i`` stored transposed (each pass's
    columns are then one contiguous run of the file), and its contributions ``J_i x_i`` are summed
    from the same float64 columns, for its exactness check.
    """

    def __init__(self, x: Float[Tensor, "pos d_in"], d_out: int, writer: SpillWriter | None):
        self.x, self.writer, self.nonzero = x, writer, False
        n, d_in = x.shape
        self.operators = x.new_zeros(n, d_out, d_in) if writer is None else None
        self.values = None if writer is None else x.new_zeros(n, d_out)

    def put(self, token: int, dims: range, cols: Float[Tensor, "k d_out"]) -> None:
        if self.writer is None:
            self.operators[token, :, dims.start : dims.stop] = cols.T
            return
        d_in, d_out = self.x.shape[1], cols.shape[1]
        self.writer.write((token * d_in + dims.start) * d_out, cols)
        self.values[token] += cols.T @ self.x[token, dims.start : dims.stop]
        self.nonzero = self.nonzero or bool(cols.any())

    def any(self) -> bool:
        return bool(self.operators.any()) if self.writer is None else self.nonzero


def _columns(
    system: FrozenSystem, rows_per_pass: int | None, bar: tqdm, writers: dict[str, SpillWriter] | None = None, memory: int | None = None,
) -> dict[str, _Sink]:
    # Every target's operators at once, by pushing basis embeddings through each token's window;
    # a target with a writer goes to disk as its columns come.
    writers = writers or {}
    x = system.x
    n, d_in = x.shape[1], x.shape[2]
    widths = [system.outputs[name].shape[0] for name in system.names]
    held = [w for name, w in zip(system.names, widths) if name not in writers]
    last = system.position
    chunks = [plan_columns(system.model, n, last + 1 - i, widths, x.dtype, rows_per_pass, x.device, memory=memory, held=held) for i in range(last + 1)]
    sinks = {name: _Sink(x[0].detach(), w, writers.get(name)) for name, w in zip(system.names, widths)}
    scale = basis_scale(system)
    for token, chunk in enumerate(chunks):
        window = system.window(token, graph=False)
        for start in range(0, d_in, chunk):
            dims = range(start, min(start + chunk, d_in))
            columns, biases = window.push_basis(0, dims, scale)
            window = dataclasses.replace(window, biases=biases)  # b once per window
            for name, cols in columns.items():
                sinks[name].put(token, dims, cols)
            del columns
            bar.update(len(dims))
    for name, sink in sinks.items():
        if not sink.any():
            raise independent_target(name, system.source)
    return sinks


class Targets(NamedTuple):
    """A dense call's targets, split by what each costs (`split_targets`).

    Attributes:
        hooks: What the frozen system captures (each readout's hook included).
        maps: The hook names mapped whole.
        readouts: The linear readouts, checked against the model.
    """

    hooks: list
    maps: list[str]
    readouts: list[LinearReadout]


def split_targets(model, targets) -> Targets:
    r"""Targets as hook points to capture, full maps wanted, and linear readouts (`tl_linmap.reading.readouts`).

    Args:
        model: A TransformerBridge or HookedTransformer.
        targets: Hook names (or ``"output"``) and linear readouts (`tl_linmap.reading.readouts.LinearReadout`).

    Returns:
        The `Targets`.

    Raises:
        InputError: for a single target given as the list, an empty list, or a bad readout.
    """
    targets = [targets] if isinstance(targets, LinearReadout) else check_names("targets", targets, "['output']")
    readouts = [t for t in targets if isinstance(t, LinearReadout)]
    for readout in readouts:
        readout.check(model)
    names = len({r.name for r in readouts})
    if names < len(readouts):
        raise InputError("Two readouts have the same name: give each Direction its own label=.")
    hooks = [t.hook if isinstance(t, LinearReadout) else t for t in targets]
    return Targets(hooks, [t for t in targets if not isinstance(t, LinearReadout)], readouts)


def _readout_weights(system: FrozenSystem, readouts: Sequence[LinearReadout]) -> dict[str, tuple[str, Tensor, Tensor]]:
    # Per readout: the hook it reads, its covector w and constant c, in the working dtype.
    weights = {}
    for readout in readouts:
        name = resolve_target(system.model, readout.hook)
        w, c = readout.weights(system.reader(name), system.outputs[name].shape[0])
        weights[readout.name] = (name, w.to(system.x), c.to(system.x))
    return weights


def _scalar_map(system: FrozenSystem, name: str, w: Tensor, c: Tensor, label: str, operators: Tensor) -> LinearMap:
    # A readout's map: (pos, 1, d_in) operators, and every vector field read through w and c.
    fields = system.result_fields(name)
    read = {key: (w @ fields[key] + c)[None] for key in ("bias", "output", "native_output")}
    scale = float(w.norm() * fields["output"].norm() + c.abs())
    fields.update(read, target=label, reader=TokenReader(model=system.model, residual=False), scale=scale)
    return LinearMap(operators=operators, inputs=system.x[0].detach(), **fields)


def _head_splits(system: FrozenSystem) -> dict[int, HeadSplit]:
    # Per layer whose hook_z is a target: W_O, b_O, the frozen post-attention norm and pattern, for per-head maps.
    model, readouts = system.model, {}
    for layer in range(model.cfg.n_layers):
        if get_act_name("z", layer) not in system.names:
            continue
        attn = model.blocks[layer].attn
        # Copies: a block a stopped pass left cast lends its memory to the next block's cast (`borrowed`).
        w_o, b_o = resident(attn, "W_O"), resident(attn, "b_O")
        post = f"blocks.{layer}.{_POST_ATTN_NORM}"
        readouts[layer] = HeadSplit(
            W_O=w_o.to(system.x.dtype, copy=True),
            b_O=(w_o.new_zeros(w_o.shape[-1]) if b_o is None else b_o.detach()).to(system.x.dtype, copy=True),
            post=system.frozen_norm(post) if f"{post}.hook_scale" in model.hook_dict else None,
            pattern=system.attention_pattern(layer),
        )
    return readouts


def linear_maps(
    model,
    prompt_or_tokens: Prompt,
    targets: Sequence[str],
    *,
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
    rows_per_pass: int | None = None,
    check: bool = True,
    progress: bool | None = None,
    norms: Sequence[str] = (),
    route: str = "auto",
    chunk_size: int | None = None,
    source: str | None = None,
    attention_mask: Tensor | None = None,
    memory: int | str | None = None,
    store: str | Path | None = None,
    maps_dtype: torch.dtype | None = None,
) -> LinearMaps | list[LinearMaps]:
    """Linear maps of several targets of one inference, sharing every forward pass.

    One plain and one frozen forward serve all targets, and so does the zero-input replay for
    ``b`` where ``b`` is not exactly zero (see `tl_linmap.freeze.system`).

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt_or_tokens: One prompt as text or token ids.
        targets: Hook names (or ``"output"``) and linear readouts (`tl_linmap.reading.readouts`;
            each a scalar map keyed by its ``name``, costing one reverse row).
        position: Sequence position of the targets (``-1``: the last token).
        dtype: Working dtype (float64 for exactness; None keeps the model's). The model comes
            back bit for bit.
        rows_per_pass: Rows per batched pass: output dimensions per backward pass (``"rows"``)
            or basis embeddings per forward pass (``"columns"``); default: what fits in half
            the free memory, for backward passes about `tl_linmap.base.budget.ROW_POSITIONS` rows
            times positions. One that risks running out of memory raises
            `tl_linmap.base.errors.MemoryBudgetError` naming a safe one.
        check: Raise `tl_linmap.base.errors.FreezeError` if a map does not reconstruct its output
            within `tl_linmap.base.exactness.tolerance` (1e-12 in float64).
        progress: A progress bar over Jacobian rows or columns: None (default) once the call lasts a few seconds, True at once, False never.
        norms: Further norm modules (e.g. ``"blocks.3.ln2"``) to return frozen at ``position``
            (``ln_final`` and the post-attention norms of mapped ``hook_z`` always are).
        route: ``"rows"``, ``"columns"`` or ``"auto"`` (whichever `tl_linmap.base.budget.choose_route`
            estimates cheaper: columns for many targets on a short prompt, rows for one narrow
            target or a long prompt).
        chunk_size: Deprecated name of ``rows_per_pass``.
        source: The hook point the maps start from, so that ``y = Σ_i J_i s_i + b`` with
            ``s_i`` its activation at position ``i`` (``blocks.L.hook_resid_pre``,
            ``hook_attn_out``, ``hook_mlp_out``, ``hook_resid_post``); None: the token
            embeddings. ``b`` is what the frozen system gives with the source zero. Every
            target must come at or after it and depend on it.
        attention_mask: With a padded token batch ``(batch, pos)``: 1 for real tokens, 0 for
            padding, on either side (`tl_linmap.base.prompts.prompt_batch`).
        memory: The call's memory budget beyond the model: its passes in flight and the maps it
            keeps in memory (half of it at most; the rest is the passes'). Bytes, or text such as
            ``"2GB"`` or ``"512MiB"``; default: `tl_linmap.base.budget.MEMORY_FRACTION` of the
            free memory, at most `tl_linmap.base.budget.DEFAULT_MEMORY` (512 MiB).
        store: Where the maps go. None (default): in memory within ``memory``, the rest written
            to a temporary directory as they are computed (removed with the result) and read back
            on access; ``"memory"``: every map in memory (`MemoryBudgetError` if they exceed a
            given ``memory``); ``"disk"``: every map to a temporary directory; a directory (a
            `pathlib.Path` or a string): every map there, kept. A map a readout reads stays in
            memory. Indexing gives the same `LinearMap`, bit for bit, wherever it is kept
            (`tl_linmap.results.maps.LinearMaps.spilled` names those on disk).
        maps_dtype: The dtype the maps are kept in (None: the working ``dtype``), e.g.
            ``torch.float32`` for half the memory or disk. Every map is checked (``check``) in
            the working dtype first; the kept maps then hold every float tensor in ``maps_dtype``
            (their own ``check`` then at its tolerance).

    Returns:
        `tl_linmap.results.maps.LinearMaps` keyed by hook name; for a list of prompts (or a token
        batch), a list of them, one per prompt, each equal to the one-prompt call's
        (`batched_linear_maps`; prompt by prompt where their maps would not all stay in memory).

    Raises:
        InputError: for a bad model, prompt, dtype, position, targets, norms,
            ``rows_per_pass``, route, ``memory``, ``store`` or ``maps_dtype``.
        MemoryBudgetError: if the given ``rows_per_pass``, or a pass's row, would not fit the budget.
        FreezeError: if ``check`` and a map does not reconstruct its output.
    """
    options = map_options(
        model, dtype=dtype, rows_per_pass=rows_per_pass, chunk_size=chunk_size, check=check, progress=progress,
        route=route, source=source, norms=norms, memory=memory, store=store, maps_dtype=maps_dtype,
    )
    targets = split_targets(model, targets)
    prompts = read_prompts(model, prompt_or_tokens, position=position, attention_mask=attention_mask)
    return maps_of(model, prompts, targets, options)


def maps_of(model, prompts: Prompts, targets: Targets, options: MapOptions) -> LinearMaps | list[LinearMaps]:
    """`linear_maps` of prompts and options its entry point has already read and checked.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompts: From `tl_linmap.base.prompts.read_prompts`.
        targets: From `split_targets`.
        options: From `map_options`.

    Returns:
        As `linear_maps`: one `tl_linmap.results.maps.LinearMaps`, or a list for a batch.

    Raises:
        As `linear_maps`.
    """
    if targets.maps:  # readouts alone cost a reverse row each: nothing to plan
        longest = max(range(len(prompts)), key=lambda i: prompts.lengths[i])
        refuse_unfit(model, prompts.lengths[longest], "linear_map", options.dtype, targets=targets.maps, route=options.route,
                     rows_per_pass=options.rows_per_pass, position=prompts.positions[longest])
    if not prompts.batch:
        return _prompt_maps(model, prompts, targets, options)
    if batchable(model) and len(prompts) > 1 and _batch_in_memory(model, prompts, targets, options):  # one prompt has nothing to share
        return batched_linear_maps(model, prompts, targets, options)
    return [_prompt_maps(model, prompt, targets, options, index) for index, prompt in enumerate(prompts.singles())]


def _batch_in_memory(model, prompts: Prompts, targets: Targets, options: MapOptions) -> bool:
    # The batched route holds every prompt's maps at once: only where they all stay in memory
    # (estimated at d_model wide each, before anything runs); else prompt by prompt, each spilling.
    if options.store == "memory":
        return True
    if options.store is not None:
        return False
    item = torch.finfo(options.dtype or model.cfg.dtype).bits // 8
    n = sum(tokens.shape[-1] for tokens in prompts.tokens)
    size = item * n * model.cfg.d_model**2 * len(targets.maps)
    return size <= memory_budget(options.memory, torch.device(model.cfg.device)) // 2


@dataclass
class _Spill:
    """Where one prompt's maps go: which stay in memory, and the directory of those that do not.

    Attributes:
        held: Hook names kept in memory.
        directory: Where spilled maps' files go (None: none spilled).
        temporary: Whether ``directory`` is removed with the result.
        memory: The call's budget for passes and held maps (None: plan on the free memory).
    """

    held: set[str]
    directory: Path | None
    temporary: bool
    memory: int | None

    def writer(self, index: int, name: str, shape: tuple[int, ...], dtype: torch.dtype, order: tuple[int, ...], contiguous: bool) -> SpillWriter:
        file = f"{index:04d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.safetensors"
        return SpillWriter(self.directory / file, shape, dtype, order, contiguous)

    def discard(self) -> None:
        if self.temporary and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def _plan_spill(options: MapOptions, sizes: dict[str, int], keep: set[str], device: torch.device, prompt_index: int | None) -> _Spill:
    # Maps stay in memory, in order, while they fit in half the budget (the rest is the passes');
    # ``keep`` (the hooks readouts read) always stays.
    memory = None if options.store == "memory" and options.memory is None else memory_budget(options.memory, device)
    if options.store == "memory":
        if memory is not None and sum(sizes.values()) > memory:
            raise MemoryBudgetError(
                f"The maps take {sum(sizes.values()) / 2**30:.2f} GiB, over memory={memory} bytes: leave store= out "
                "(maps beyond the budget go to disk), or give a larger memory=."
            )
        return _Spill(set(sizes), None, False, memory)
    held, total = set(keep), sum(sizes[name] for name in keep if name in sizes)
    if options.store is None:
        for name, size in sizes.items():
            if name not in held and total + size <= memory // 2:
                held.add(name)
                total += size
    if set(sizes) <= held:
        return _Spill(held, None, False, memory)
    if isinstance(options.store, Path):
        directory = options.store if prompt_index is None else options.store / f"prompt-{prompt_index}"
        directory.mkdir(parents=True, exist_ok=True)
        return _Spill(held, directory, False, memory)
    return _Spill(held, Path(tempfile.mkdtemp(prefix="tl_linmap-maps-")), True, memory)


def _prompt_maps(model, prompt: Prompts, targets: Targets, options: MapOptions, prompt_index: int | None = None) -> LinearMaps:
    # One prompt's maps: every target from one frozen system, by the route options (or its cost)
    # picks; maps beyond the budget are written to disk as they are computed, and checked then.
    route = options.route
    with frozen_system(model, prompt, targets.hooks, dtype=options.dtype, source=options.source) as system:
        n, d_in = system.x.shape[1:]
        wanted = list(dict.fromkeys(resolve_target(model, t) for t in targets.maps))
        weights = _readout_weights(system, targets.readouts)
        if route == "auto":
            route = _cheaper_route(system, wanted, weights)
        item = system.x.element_size()
        sizes = {name: item * n * system.outputs[name].shape[0] * d_in for name in wanted}
        spill = _plan_spill(options, sizes, {name for name, _, _ in weights.values()}, system.x.device, prompt_index)
        try:
            with naming_foreign(model):
                route_maps = _columns_maps if route == "columns" else _rows_maps
                system, operators, spilled = route_maps(system, wanted, weights, spill, options)
            scalar_ops = operators.pop(_SCALARS)
            maps = _assemble(system, wanted, weights, operators, scalar_ops, options.norms, spilled, spill)
        except BaseException:
            spill.discard()
            raise
    if options.check:
        with naming_foreign(model):
            for name in maps.maps:
                if name not in spilled:  # the spilled maps were checked as they were written
                    maps[name].check()
    return maps if options.maps_dtype in (None, system.x.dtype) else cast_maps(maps, options.maps_dtype)


_SCALARS = "$scalars"  # the readouts' maps, among a route's operators


def _checked_spill(system: FrozenSystem, name: str, spilled: SpilledTensor, values: Tensor | None, lm: LinearMap | None, check: bool) -> SpilledTensor:
    # The exactness check of a map written to disk, on its float64 values before any down-cast.
    if check:
        (lm or Contributions(values=values, **system.result_fields(name))).check()
    return spilled


def _columns_maps(system: FrozenSystem, wanted: list[str], weights: dict, spill: _Spill, options: MapOptions) -> tuple[FrozenSystem, dict, dict]:
    system = system.with_biases()
    n, d_in = system.x.shape[1:]
    dtype = options.maps_dtype or system.x.dtype
    writers = {
        name: spill.writer(index, name, (n, system.outputs[name].shape[0], d_in), dtype, (0, 2, 1), True)
        for index, name in enumerate(wanted) if name not in spill.held
    }
    with progress_bar((system.position + 1) * d_in, "detached Jacobian columns", options.progress) as bar:
        sinks = _columns(system, options.rows_per_pass, bar, writers, spill.memory)
    spilled = {name: _checked_spill(system, name, w.spilled, sinks[name].values, None, options.check) for name, w in writers.items()}
    operators = {name: sink.operators for name, sink in sinks.items() if name not in writers}
    operators[_SCALARS] = {
        label: einops.einsum(operators[name], w, "pos d_out d_in, d_out -> pos d_in")[:, None] for label, (name, w, _) in weights.items()
    }
    return system, operators, spilled


def _rows_maps(system: FrozenSystem, wanted: list[str], weights: dict, spill: _Spill, options: MapOptions) -> tuple[FrozenSystem, dict, dict]:
    system = system.with_graph().with_biases()
    ys, x = system.ys, system.x
    n = x.shape[1]
    rows = [ys[name].shape[0] for name in wanted] + [1] * len(weights)
    held = [r for name, r in zip(wanted, rows) if name in spill.held]
    chunk = plan_rows(system.model, n, max(rows), max(len(held), 1), x.dtype, options.rows_per_pass, x.device, memory=spill.memory)
    operators, spilled = {}, {}
    with torch.enable_grad(), progress_bar(sum(rows), "detached Jacobian rows", options.progress) as bar:
        for index, name in enumerate(wanted):
            ops = _rows(ys[name], x, chunk, bar)
            if name in spill.held:
                operators[name] = ops
                continue
            lm = LinearMap(operators=ops, inputs=x[0].detach(), **system.result_fields(name))
            order = tuple(sorted(range(ops.ndim), key=lambda d: -ops.stride(d)))  # its memory order, so it loads with its strides
            writer = spill.writer(index, name, tuple(ops.shape), options.maps_dtype or x.dtype, order, ops.is_contiguous())
            writer.write_tensor(ops)
            spilled[name] = _checked_spill(system, name, writer.spilled, None, lm, options.check)
            del ops, lm
        operators[_SCALARS] = {label: vjp(ys[name], x, w[None]).transpose(0, 1) for label, (name, w, _) in weights.items()}
        bar.update(len(weights))
    return system, operators, spilled


def _cheaper_route(system: FrozenSystem, wanted: list[str], weights: dict) -> str:
    # route="auto" for one system's targets (for a batch, the system whose target is furthest on).
    n_layers = system.model.cfg.n_layers
    shapes = [(system.outputs[name].shape[0], target_depth(name, n_layers)) for name in wanted]
    shapes += [(1, target_depth(name, n_layers)) for name, _, _ in weights.values()]  # a readout is one row
    n, d_in = system.x.shape[1:]
    route = choose_route(d_in, n, system.position, shapes, forward_row_cost(system.model.cfg))
    return route if route == "columns" or _offloaded_casts_fit(system.model, system.x.dtype) else "columns"


def _offloaded_casts_fit(model, dtype: torch.dtype) -> bool:
    # Weights offloaded to disk are loaded (in the working dtype) inside each module's forward, out of the
    # borrow's reach: a graph keeps every one it reads, and no recipe stands for them. The rows route takes
    # them only where they fit a graph's share of the input device's memory.
    offloaded = [p for block in model.blocks for p in block.parameters() if p.device.type == "meta" and p.is_floating_point()]
    need = sum(p.numel() for p in offloaded) * (torch.finfo(dtype).bits // 8)
    return need <= budget.available_bytes(input_device(model)) * budget.GRAPH_CAST_FRACTION


def _assemble(
    system: FrozenSystem, wanted: list[str], weights: dict, operators: dict, scalar_ops: dict, norms: Sequence[str],
    spilled: dict[str, SpilledTensor] | None = None, spill: _Spill | None = None,
) -> LinearMaps:
    # One prompt's LinearMaps from its operators (b known), with its head readouts and frozen norms;
    # a map whose operators went to disk holds its SpilledTensor, read back on access (MapStore).
    spilled = spilled or {}
    inputs = system.x[0].detach()
    head_splits = _head_splits(system)
    frozen_norms = {f"blocks.{layer}.{_POST_ATTN_NORM}": r.post for layer, r in head_splits.items() if r.post is not None}
    results = {
        name: LinearMap(operators=spilled[name] if name in spilled else operators[name], inputs=inputs, **system.result_fields(name))
        for name in wanted
    }
    results.update({label: _scalar_map(system, name, w, c, label, scalar_ops[label]) for label, (name, w, c) in weights.items()})
    ordered = {key: results[key] for key in [*wanted, *weights]}
    return LinearMaps(
        MapStore(ordered, spill.directory, spill.temporary) if spilled else ordered,
        head_splits=head_splits,
        norms={"ln_final": system.final_norm, **frozen_norms, **{norm: system.frozen_norm(norm) for norm in norms}},
    )


def _batch_rows(batch: SystemBatch, wanted: list[str], weights: list[dict], rows_per_pass: int | None, bar: tqdm) -> tuple[list[dict], list[dict]]:
    # Reverse rows of every prompt at once: one graph over the padded batch, each backward row
    # e_j applied to every prompt's target (prompts are independent rows of the batch).
    systems, members = batch.systems, range(len(batch.systems))
    stop = max(s.position for s in systems) + 1
    x = batch.x(members, stop).requires_grad_(True)
    with torch.enable_grad():
        ys = batch.replay(members, x)
    for name, y in ys.items():
        if not y.requires_grad:
            raise independent_target(name, systems[0].source)
    model, sizes = systems[0].model, [s.x.shape[1] for s in systems]
    chunk = plan_rows(model, stop * len(systems), max(ys[n].shape[1] for n in ys), len(wanted) + 1, x.dtype, rows_per_pass, x.device)

    def backward(name: str, rows: Tensor) -> list[Tensor]:  # rows: (k, prompts, d_out) -> per prompt (pos, k, d_in)
        with torch.enable_grad():
            grads = torch.autograd.grad(ys[name], x, rows, is_grads_batched=True, retain_graph=True)[0]
        out = []
        for b, n in enumerate(sizes):
            op = grads.new_zeros(n, len(rows), grads.shape[-1])
            op[: min(n, stop)] = grads[:, b, : min(n, stop)].transpose(0, 1)
            out.append(op)
        return out

    operators: list[dict] = [{} for _ in systems]
    for name in wanted:
        width = ys[name].shape[1]
        eye = torch.eye(width, dtype=x.dtype, device=x.device)
        parts = []
        for start in range(0, width, chunk):
            rows = eye[start : start + chunk]
            parts.append(backward(name, rows[:, None].expand(-1, len(systems), -1)))
            bar.update(len(rows) * len(systems))
        for b, ops in enumerate(operators):
            ops[name] = torch.cat([part[b] for part in parts], dim=1)
    scalar_ops: list[dict] = [{} for _ in systems]
    for label in weights[0]:
        name = weights[0][label][0]
        rows = torch.stack([w[label][1] for w in weights])[None]
        for b, op in enumerate(backward(name, rows)):
            scalar_ops[b][label] = op
        bar.update(len(systems))
    return operators, scalar_ops


def batched_linear_maps(model, prompts: Prompts, targets: Targets, options: MapOptions) -> list[LinearMaps]:
    """`linear_maps` of several prompts, their passes shared (one map per prompt, as the one-prompt call).

    One plain and one frozen forward of the prompts padded on the right (`tl_linmap.freeze.system.frozen_batch`),
    one zero-input replay for every ``b``; then, by ``route``, each backward row runs for every
    prompt at once (``"rows"``), or each prompt's columns are pushed as in the one-prompt call
    (``"columns"``: ``d_model`` basis rows per token already fill a pass, and the same pushes
    padded across prompts measured 0.6x the loop on SmolLM2; ``"auto"`` decides on the longest
    prompt). `maps_of` maps prompt by prompt where nothing is shared: a model whose factors
    cannot be cut to a prompt (`tl_linmap.freeze.system.batchable`), or a single prompt.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompts: Two or more prompts and their target positions (`tl_linmap.base.prompts.read_prompts`).
        targets: From `split_targets`.
        options: From `map_options` (``rows_per_pass`` is per prompt; the progress bar counts
            the rows or columns of all prompts).

    Returns:
        One `tl_linmap.results.maps.LinearMaps` per prompt.

    Raises:
        InputError: for any argument the one-prompt call refuses.
    """
    route = options.route
    with frozen_batch(model, prompts, targets.hooks, dtype=options.dtype, source=options.source) as batch:
        systems = batch.systems
        wanted = list(dict.fromkeys(resolve_target(model, t) for t in targets.maps))
        longest = max(systems, key=lambda s: s.position)
        d_in = longest.x.shape[-1]
        weights = [_readout_weights(system, targets.readouts) for system in systems]
        if route == "auto":
            route = _cheaper_route(longest, wanted, weights[0])
        members = range(len(systems))
        with torch.no_grad():
            zero = batch.x(members, longest.position + 1).zero_()
            biases = batch.replay(members, zero)
        systems = [dataclasses.replace(s, biases={name: y[b] for name, y in biases.items()}) for b, s in enumerate(systems)]
        batch = dataclasses.replace(batch, systems=tuple(systems))
        if route == "columns":
            total = sum((s.position + 1) * d_in for s in systems)
            with progress_bar(total, "detached Jacobian columns", options.progress) as bar:
                all_ops = [
                    {name: sink.operators for name, sink in _columns(system, options.rows_per_pass, bar).items()} for system in systems
                ]
            scalar_ops = [
                {label: einops.einsum(ops[name], w, "pos d_out d_in, d_out -> pos d_in")[:, None] for label, (name, w, _) in ws.items()}
                for ops, ws in zip(all_ops, weights)
            ]
        else:
            total = (sum(systems[0].outputs[name].shape[0] for name in wanted) + len(targets.readouts)) * len(systems)
            with progress_bar(total, "detached Jacobian rows", options.progress) as bar:
                all_ops, scalar_ops = _batch_rows(batch, wanted, weights, options.rows_per_pass, bar)
        results = [_assemble(s, wanted, ws, ops, sops, options.norms) for s, ws, ops, sops in zip(systems, weights, all_ops, scalar_ops)]
    if options.check:
        with naming_foreign(model):
            for maps in results:
                for lm in maps.values():
                    lm.check()
    if options.maps_dtype not in (None, results[0][wanted[0]].operators.dtype if wanted else None):
        results = [cast_maps(maps, options.maps_dtype) for maps in results]
    return results


def plain_jacobians(model, prompt: Prompts, targets: Sequence[str], *, dtype: torch.dtype | None) -> dict[str, Float[Tensor, "pos d_out d_in"]]:
    """Ordinary (not detached) Jacobians of targets, for comparison with the detached ones.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt: One prompt and its target position (`tl_linmap.base.prompts.read_prompts`).
        targets: Hook names.
        dtype: Working dtype, already checked (`tl_linmap.base.checks.check_dtype`).

    Returns:
        Operators per target, as in `LinearMap.operators`.
    """
    (tokens,), (position,) = prompt.tokens, prompt.positions
    n = tokens.shape[1]
    targets = resolve_targets(model, targets)
    with borrowed(model, dtype), torch.enable_grad():
        x = run_to_target(model, tokens, EMBED_HOOK).detach().clone().requires_grad_(True)
        acts = capture(model, tokens, targets, same_path_hooks(model), x)
        ys = {name: at_position(acts[name], position, n)[0] for name in targets}
        chunk = plan_rows(model, n, max(y.shape[0] for y in ys.values()), len(ys), x.dtype, None, x.device)
        with progress_bar(None, "", False) as bar:
            return {name: _rows(y, x, chunk, bar) for name, y in ys.items()}


def linear_map(
    model,
    prompt_or_tokens: Prompt,
    *,
    target: str = "output",
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
    rows_per_pass: int | None = None,
    check: bool = True,
    progress: bool | None = None,
    route: str = "auto",
    chunk_size: int | None = None,
    source: str | None = None,
    attention_mask: Tensor | None = None,
) -> LinearMap | list[LinearMap]:
    """The exact linear system of one target vector of one inference.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture (see `tl_linmap.freeze.architectures`).
        prompt_or_tokens: One prompt as text or token ids.
        target: ``"output"`` (the final norm's output, read by the unembedding), any
            hook name with a position axis, such as ``"blocks.3.hook_resid_post"``, or a
            linear readout (`tl_linmap.reading.readouts`: ``LogitDiff(" Paris", " London")``,
            ``Logit``, ``Direction``): a scalar map, one reverse row.
        position: Sequence position of the target vector (``-1``: the last token).
        dtype: Working dtype (float64 for exactness; None keeps the model's). The model comes
            back bit for bit.
        rows_per_pass: Rows per batched pass (see `linear_maps`).
        check: Raise `tl_linmap.base.errors.FreezeError` unless the system reconstructs the output
            within `tl_linmap.base.exactness.tolerance` (1e-12 in float64).
        progress: A progress bar over Jacobian rows or columns: None (default) once the call lasts a few seconds, True at once, False never.
        route: ``"rows"``, ``"columns"`` or ``"auto"`` (see `linear_maps`); for one target
            ``"auto"`` almost always picks rows.
        chunk_size: Deprecated name of ``rows_per_pass``.
        source: Where the map starts (see `linear_maps`): e.g. ``target="blocks.5.hook_resid_post",
            source="blocks.2.hook_resid_pre"`` maps layers 2 to 5; None: the token embeddings.
        attention_mask: With a padded token batch: 1 for real tokens, 0 for padding (see `linear_maps`).

    Returns:
        A `tl_linmap.results.maps.LinearMap`; for a list of prompts (or a token batch), one per prompt.

    Raises:
        InputError: for a bad model, prompt, dtype, position, target, ``rows_per_pass`` or route.
        UnsupportedArchitectureError: if the architecture has no freeze rules.
        FreezeError: if a freeze hook did not take effect.
    """
    options = map_options(
        model, dtype=dtype, rows_per_pass=rows_per_pass, chunk_size=chunk_size, check=check, progress=progress,
        route=route, source=source,
    )
    targets = split_targets(model, [target])
    prompts = read_prompts(model, prompt_or_tokens, position=position, attention_mask=attention_mask)
    maps = maps_of(model, prompts, targets, options)
    if isinstance(maps, list):
        return [next(iter(m.values())) for m in maps]
    return next(iter(maps.values()))
