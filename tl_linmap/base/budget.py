"""Budget: how much memory a pass may take, how many rows fit, and which route costs less.

Every planner here works from one memory model: a batch row in flight holds about
`ACTIVATIONS_PER_ROW` activations of the model's widest layer over the positions it runs,
plus its own inputs and outputs; the results (dense operators) are stored beside it; and
together they may use `MEMORY_FRACTION` of the memory the device reports free.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from collections.abc import Sequence

import torch

from tl_linmap.base.devices import model_devices
from tl_linmap.base.errors import InputError, MemoryBudgetError

#: Share of the free memory one computation may fill; the rest is left to the user's session.
MEMORY_FRACTION = 0.5

#: Share of the free memory an autograd graph may keep cast blocks in (half the computation's):
#: beyond it the graph saves recipes to cast again (`tl_linmap.base.guard`), and the rest is for
#: the rows in flight and the results.
GRAPH_CAST_FRACTION = MEMORY_FRACTION / 2


#: Most memory a dense call (`tl_linmap.linear.dense.linear_maps`) takes by default for its passes in
#: flight and the maps it keeps in memory, whatever is free: maps beyond it go to disk, where reading
#: one back costs milliseconds, while memory held by results stays taken for the whole session.
DEFAULT_MEMORY = 2**29


#: Activation-sized tensors one batch row keeps alive in a pass (a rough, conservative count:
#: the residual, norm, attention and MLP intermediates and their gradients).
ACTIVATIONS_PER_ROW = 10


#: Free memory assumed where the operating system reports none (it is only a planning figure;
#: a user's explicit rows_per_pass or tokens_per_pass still gets checked against it).
FALLBACK_FREE_BYTES = 4 * 2**30


#: Rows times positions per batched backward: past this the products are wide enough to run
#: at the matmul rate, and more rows in flight only cost memory (SmolLM2, 16 tokens: 128 rows
#: ran 5% faster than all 576 at a third of the peak memory).
ROW_POSITIONS = 2048


#: Tokens per forward pass of `tl_linmap.linear.matrix_free.token_contributions` below which a window
#: of its own costs more (one more pass, hooks included) than the positions it skips.
WINDOW_ROWS = 32


#: Most windows `token_contributions` splits a prompt into.
MAX_WINDOWS = 8


_GIB = 2**30


def _linux_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # macOS and Windows have no such name
        return None


def _windows_available() -> int | None:
    if sys.platform != "win32":
        return None

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
            (name, ctypes.c_ulonglong)
            for name in ("total_phys", "avail_phys", "total_page", "avail_page", "total_virtual", "avail_virtual", "extended")
        ]

    status = MemoryStatus()
    status.length = ctypes.sizeof(MemoryStatus)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return None
    return int(status.avail_phys)


def _macos_available() -> int | None:
    if sys.platform != "darwin":
        return None
    try:
        libc = ctypes.CDLL("libc.dylib")
        value, size = ctypes.c_uint64(0), ctypes.c_size_t(8)
        # Free plus inactive pages would be kinder, but free pages alone are the safe figure.
        if libc.sysctlbyname(b"vm.page_free_count", ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
            return None
        return int(value.value) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, AttributeError, ValueError):
        return None


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors on a device.

    Args:
        device: Where the computation runs.

    Returns:
        Free bytes: ``torch.cuda.mem_get_info`` on a GPU; on the CPU what Linux, Windows or
        macOS reports available, else `FALLBACK_FREE_BYTES`.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for probe in (_linux_available, _windows_available, _macos_available):
        free = probe()
        if free:
            return free
    return FALLBACK_FREE_BYTES


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(memory: int | str) -> int:
    """A memory size as bytes: an int, or text such as ``"2GB"``, ``"512 MiB"``, ``"1.5g"``.

    Args:
        memory: Bytes (a positive int), or a number and a unit (B, KB, MB, GB, TB: powers of 1000;
            KiB, MiB, GiB, TiB: powers of 1024; case does not matter).

    Returns:
        The bytes.

    Raises:
        InputError: for anything else, saying what to pass.
    """
    advice = 'give memory as bytes (an int, e.g. 2_000_000_000) or text such as "2GB" or "512MiB"'
    if isinstance(memory, bool) or not isinstance(memory, (int, str)):
        raise InputError(f"memory must be bytes or a size as text: {advice}; got {memory!r}.")
    if isinstance(memory, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", memory.lower())
        if match is None or match.group(2) not in _UNITS:
            raise InputError(f"memory={memory!r} is not a size: {advice}.")
        memory = int(float(match.group(1)) * _UNITS[match.group(2)])
    if memory <= 0:
        raise InputError(f"memory must be positive: {advice}; got {memory!r}.")
    return memory


class DefaultBudget(int):
    """The budget a call takes when the user gave none: where one row of a pass needs more, the pass
    gets `MEMORY_FRACTION` of the free memory instead of being refused (maps still spill beyond it)."""


def memory_budget(memory: int | str | None, device: torch.device) -> int:
    """The memory a dense call may take for its passes and the maps it keeps in memory.

    Args:
        memory: The user's budget (see `parse_memory`), or None for the default: `MEMORY_FRACTION`
            of the free memory (`available_bytes`), at most `DEFAULT_MEMORY`.
        device: Where the computation runs.

    Returns:
        The budget in bytes.

    Raises:
        InputError: for a ``memory`` that is not a size.
    """
    if memory is not None:
        return parse_memory(memory)
    return DefaultBudget(min(int(available_bytes(device) * MEMORY_FRACTION), DEFAULT_MEMORY))


def activation_bytes(model, n_tokens: int, itemsize: int) -> int:
    """Memory one batch row holds in a pass: `ACTIVATIONS_PER_ROW` activations of the widest layer.

    Args:
        model: The model (for its widths).
        n_tokens: Positions the pass runs.
        itemsize: Bytes per number.

    Returns:
        Bytes per row in flight.
    """
    width = max(model.cfg.d_model, getattr(model.cfg, "d_mlp", None) or 0)
    return itemsize * n_tokens * ACTIVATIONS_PER_ROW * width


def row_bytes(model, n_tokens: int, itemsize: int) -> int:
    """Memory one row of a backward pass or a token push holds: its input (or gradient) and its activations.

    Args:
        model: The model (for its widths).
        n_tokens: Positions the pass runs.
        itemsize: Bytes per number.

    Returns:
        Bytes per row in flight.
    """
    return itemsize * n_tokens * model.cfg.d_model + activation_bytes(model, n_tokens, itemsize)


def column_bytes(model, window: int, widths: Sequence[int], itemsize: int) -> int:
    """Memory one basis embedding pushed through a window holds: its input, its outputs and its activations.

    Args:
        model: The model (for its widths).
        window: Positions in the window.
        widths: ``d_out`` of each target.
        itemsize: Bytes per number.

    Returns:
        Bytes per row in flight.
    """
    # A row's outputs are held three times over: the replay's, less b, divided by the basis' scale.
    return itemsize * (window * model.cfg.d_model + 3 * sum(widths)) + activation_bytes(model, window, itemsize)


def fit_rows(
    per_row: int,
    stored: int,
    limit: int,
    requested: int | None,
    device: torch.device,
    name: str,
    free: int | None = None,
    others: Sequence[torch.device] = (),
    memory: int | None = None,
) -> int:
    """Rows per pass that fit in the budget once the results are stored.

    A model split over devices runs each block's rows on that block's device: every device
    must hold a row's activations, the results are stored on ``device`` only.

    Args:
        per_row: Bytes one row holds in flight.
        stored: Bytes of results kept for the whole computation.
        limit: Most rows a pass can usefully take.
        requested: The user's choice, or None to pick one.
        device: Where the results are kept (the model's input device).
        name: The argument the user sets (named in the error).
        free: Free bytes on the device (None: `available_bytes` now); `tl_linmap.linear.plan`
            passes the figure a run will see, so that plan and run pick the same rows.
        others: The other devices the model's blocks run on (`tl_linmap.base.devices.model_devices`).
        memory: The call's budget in bytes (`memory_budget`), instead of `MEMORY_FRACTION` of ``free``.

    Returns:
        The rows per pass.

    Raises:
        MemoryBudgetError: if the results alone, or the user's choice, would not fit;
            the message gives a size that fits.
    """
    free = available_bytes(device) if free is None else free
    budget = (int(free * MEMORY_FRACTION) if memory is None else memory) - stored
    if budget < per_row and isinstance(memory, DefaultBudget):
        budget = int(free * MEMORY_FRACTION) - stored  # the default's cap is for the maps held, not a reason to refuse
    elif budget < per_row and memory is not None:
        raise MemoryBudgetError(
            f"memory={memory} bytes leaves no room for one row of a pass (about {(per_row + stored) / 2**20:.0f} MiB with the maps "
            f"kept in memory): give memory={max(per_row + stored, 2 * per_row)} or more (or a smaller rows_per_pass)."
        )
    if budget < per_row:
        raise MemoryBudgetError(
            f"The results need {stored / _GIB:.2f} GiB, with {free / _GIB:.2f} GiB free on {device}: "
            "use fewer targets or a shorter prompt."
        )
    spare = {device: budget, **{d: int(available_bytes(d) * MEMORY_FRACTION) for d in others if d != device}}
    tightest = min(spare, key=spare.get)
    fits = int(min(limit, spare[tightest] // per_row))
    if fits < 1:
        raise MemoryBudgetError(f"One row of the pass needs {per_row / _GIB:.2f} GiB, with {spare[tightest] / _GIB:.2f} GiB to spare on {tightest}.")
    if requested is not None and requested > fits:
        raise MemoryBudgetError(
            f"{name}={requested} risks running out of memory (about {requested * per_row / _GIB:.2f} GiB "
            f"in flight, {spare[tightest] / _GIB:.2f} GiB to spare on {tightest}); use {name}={fits} or less."
        )
    return requested or fits


def _others(model, free: int | None) -> list[torch.device]:
    # A plan gives the free memory it foresees (and plans each device itself); a run looks at every device.
    return model_devices(model) if free is None else []


def plan_rows(
    model, n_tokens: int, d_out: int, n_targets: int, dtype: torch.dtype, requested: int | None, device: torch.device,
    free: int | None = None, memory: int | None = None,
) -> int:
    """Output rows per batched backward: about `ROW_POSITIONS` row-positions, within the budget.

    Args:
        model: The model (for its widths).
        n_tokens: Prompt length.
        d_out: Rows of the largest target.
        n_targets: Targets whose operators are kept.
        dtype: Working dtype.
        requested: The user's ``rows_per_pass``, or None to pick one.
        device: Where the computation runs.
        free: Free bytes on the device (None: `available_bytes` now).
        memory: The call's budget (see `fit_rows`).

    Returns:
        Rows per pass.

    Raises:
        MemoryBudgetError: if the operators themselves, or the user's choice, would not fit.
    """
    item = torch.finfo(dtype).bits // 8
    per_row = row_bytes(model, n_tokens, item)
    operators = item * n_tokens * d_out * model.cfg.d_model * n_targets
    fits = fit_rows(per_row, operators, d_out, requested, device, "rows_per_pass", free, _others(model, free), memory)
    return requested or min(fits, max(32, ROW_POSITIONS // n_tokens))


def plan_columns(
    model, n_tokens: int, window: int, widths: Sequence[int], dtype: torch.dtype, requested: int | None, device: torch.device,
    free: int | None = None, memory: int | None = None, held: Sequence[int] | None = None,
) -> int:
    """Basis embeddings per forward pass of one token's window, within the budget.

    Args:
        model: The model (for its widths).
        n_tokens: Prompt length (operators cover every token).
        window: Positions in the window (token to target position).
        widths: ``d_out`` of each target.
        dtype: Working dtype.
        requested: The user's ``rows_per_pass``, or None to pick one.
        device: Where the computation runs.
        free: Free bytes on the device (None: `available_bytes` now).
        memory: The call's budget (see `fit_rows`).
        held: ``d_out`` of the targets whose operators stay in memory (None: every target's).

    Returns:
        Rows per pass (at most ``d_model``, the basis of one token).

    Raises:
        MemoryBudgetError: if the operators themselves, or the user's choice, would not fit.
    """
    item = torch.finfo(dtype).bits // 8
    d_in = model.cfg.d_model
    per_row = column_bytes(model, window, widths, item)
    operators = item * n_tokens * d_in * sum(widths if held is None else held)
    return fit_rows(per_row, operators, d_in, requested, device, "rows_per_pass", free, _others(model, free), memory)


def plan_tokens(model, n_tokens: int, last: int, dtype: torch.dtype, requested: int | None, device: torch.device, free: int | None = None) -> int:
    """Tokens per forward pass of `tl_linmap.linear.matrix_free.token_contributions`.

    As many as fit, in up to `MAX_WINDOWS` windows of at least `WINDOW_ROWS` tokens: each
    window is one more pass, so very short ones cost more than the positions they skip.

    Args:
        model: The model (for its widths).
        n_tokens: Prompt length.
        last: Target position (tokens ``0..last`` are pushed).
        dtype: Working dtype.
        requested: The user's ``tokens_per_pass``, or None to pick one.
        device: Where the computation runs.
        free: Free bytes on the device (None: `available_bytes` now).

    Returns:
        Tokens per pass.

    Raises:
        MemoryBudgetError: if the user's choice would not fit.
    """
    item = torch.finfo(dtype).bits // 8
    per_row = row_bytes(model, n_tokens, item)
    fits = fit_rows(per_row, 0, last + 1, requested, device, "tokens_per_pass", free, _others(model, free))
    return requested or max(1, min(fits, max(WINDOW_ROWS, -(-(last + 1) // MAX_WINDOWS))))


def forward_row_cost(cfg) -> float:
    """Cost of one column-route row per position and layer, relative to one row-route row.

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

    The ``"rows"`` route runs ``d_out`` vector-Jacobian rows per target, each through the
    target's depth over the whole prompt: ``Σ_targets d_out · depth · n_tokens``. The
    ``"columns"`` route pushes ``d_in`` basis embeddings per token ``i <= position`` through
    its window ``i..position`` up to the deepest target, serving every target at once:
    ``forward_cost · Σ_i d_in · (position − i + 1) · max depth``. So columns win for many
    targets on short prompts (every layer's residual stream), rows for a few narrow targets
    (only the output) or long prompts.

    Args:
        d_in: Embedding width.
        n_tokens: Prompt length.
        position: Target position (non-negative).
        targets: ``(d_out, depth)`` per target, depth in blocks (see
            `tl_linmap.base.hook_names.target_depth`).
        forward_cost: Cost of a column row relative to a Jacobian row, per position and
            layer (see `forward_row_cost`).

    Returns:
        ``"columns"`` if its estimated work is smaller, else ``"rows"``.
    """
    windows = (position + 1) * (position + 2) // 2  # Σ_i (position − i + 1)
    forward = forward_cost * d_in * windows * max((depth for _, depth in targets), default=0)
    backward = n_tokens * sum(d_out * depth for d_out, depth in targets)
    return "columns" if forward < backward else "rows"
