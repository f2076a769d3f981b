"""Plan a run before it starts: peak memory per device, time, route and rows per pass.

One memory model, from `tl_linmap.base.budget` (so that a plan names the rows per pass a run
takes: it calls the same functions with the free memory the run will see). Per device:

- the model's own weights, in their own dtype, where they are placed;
- weights cast to the working dtype where it differs from the model's: the non-block
  parameters (embedding, unembedding, final norm), and one block at a time on routes without
  an autograd graph (token pushes, the columns route); on routes with one (the rows route of
  `linear_map`, `matrix_free`'s windows, `attribution_graph`) every block where they fit a
  quarter of free memory (`budget.GRAPH_CAST_FRACTION`), else one block, the graph saving recipes to cast again
  (`tl_linmap.base.guard`);
- the frozen factors of every layer (attention patterns, norm scales, MLP activations), the
  graph of one forward where the route keeps one, and the rows in flight (`budget.row_bytes`);
- the results: dense operators ``pos × d_out × d_in`` per target, a graph's rows.

The time is the route's floating-point operations divided by a matmul rate: measured by a short
probe (`matmul_rate`) on a local device, assumed (`DEVICES`) for a named card.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import torch

from tl_linmap.base import budget
from tl_linmap.base.checks import check_dtype
from tl_linmap.base.errors import InputError, MemoryBudgetError
from tl_linmap.base.hook_names import target_depth
from tl_linmap.freeze.targets import resolve_targets
from tl_linmap.results.plan import DevicePeak, Plan

#: The entry points a plan covers.
WHATS = ("linear_map", "token_contributions", "matrix_free", "attribution_graph")

_GIB = 2**30

#: Memory a CUDA context and the allocator's slack take on a named card before any tensor.
CONTEXT_BYTES = 1 * _GIB

#: Activation-sized tensors one layer of a kept forward graph saves per position, in units of
#: ``d_model`` and ``d_mlp``: residual, two norm outputs, Q/K/V and z (about 6 ``d_model``) and
#: the MLP's gate, up and activation (3 ``d_mlp``).
GRAPH_PER_LAYER = (6, 3)

#: Products `matrix_free` is planned for by default: a rank-8 randomized SVD of one token's
#: operator (block Krylov, 12 vectors, a few iterations of a product and its transpose).
DEFAULT_PRODUCTS = 100


@dataclass(frozen=True)
class DeviceSpec:
    """A device to plan for: its memory and sustained matmul rates.

    Attributes:
        name: Its name in the plan.
        memory: Bytes a run may use (a card's memory less `CONTEXT_BYTES`).
        rates: Sustained matmul FLOP/s per working dtype name (``"float32"``, ``"float64"``).
        device: The local torch device, where the spec describes one (its free memory and rate
            are read there); None for a named card.
    """

    name: str
    memory: int
    rates: dict[str, float] = field(default_factory=dict)
    device: torch.device | None = None


# H100 SXM 80 GB: peak 67 TFLOP/s in float64 (tensor cores) and float32 (no TF32: PyTorch keeps
# float32 matmuls exact by default); sustained large GEMMs reach about 60% of that. The H200 is the
# same GH100 chip with 141 GB of HBM3e. torch reports 79.1 GiB and 139.8 GiB of total memory.
#: Named cards: (total GiB, sustained float32 and float64 matmul TFLOP/s), assumptions stated above.
DEVICES: dict[str, tuple[float, float, float]] = {
    "H100": (79.1, 40.0, 40.0),
    "H200": (139.8, 40.0, 40.0),
}


@dataclass(frozen=True)
class ModelShape:
    """A model's sizes, enough to plan a run (a loaded model's, a TransformerLens config's, or a paper config's).

    The field names are TransformerLens' (``HookedTransformerConfig``), so `tl_linmap.base.budget`
    reads a shape as it reads ``model.cfg``.

    Attributes:
        name: The model's name.
        d_model: Residual width.
        n_layers: Blocks.
        n_heads: Query heads.
        n_key_value_heads: Key/value heads.
        d_head: Head width.
        d_mlp: MLP width.
        d_vocab: Vocabulary size.
        gated_mlp: A gated MLP (gate, up, down).
        dtype: The weights' own dtype.
        block_params: Numbers per block (empty: from the widths).
        other_params: Numbers outside the blocks (None: embedding, unembedding unless tied, final norm).
        tied_embeddings: One matrix embeds and unembeds.
        norms_per_block: Norm weights per block (Gemma's sandwich norms: 4).
        qk_norm: Per-head query and key norms.
        block_devices: Per block, the device its weights are on (empty: placed by the plan).
        other_devices: Per device, the non-block numbers there (empty: embedding on the first
            device, the rest on the last).
    """

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    gated_mlp: bool = True
    dtype: torch.dtype = torch.float32
    block_params: tuple[int, ...] = ()
    other_params: int | None = None
    tied_embeddings: bool = False
    norms_per_block: int = 2
    qk_norm: bool = False
    block_devices: tuple[str, ...] = ()
    other_devices: tuple[tuple[str, int], ...] = ()

    @property
    def cfg(self) -> ModelShape:
        """The shape itself: `tl_linmap.base.budget` reads ``model.cfg``."""
        return self

    @property
    def blocks(self) -> tuple[int, ...]:
        """Numbers per block: as loaded, or counted from the widths."""
        if self.block_params:
            return self.block_params
        d_q, d_kv = self.n_heads * self.d_head, self.n_key_value_heads * self.d_head
        attention = 2 * self.d_model * (d_q + d_kv)  # Q and O; K and V
        mlp = (3 if self.gated_mlp else 2) * self.d_model * self.d_mlp
        norms = self.norms_per_block * self.d_model + (2 * self.d_head if self.qk_norm else 0)
        return (attention + mlp + norms,) * self.n_layers

    @property
    def others(self) -> int:
        """Numbers outside the blocks."""
        if self.other_params is not None:
            return self.other_params
        return self.d_vocab * self.d_model * (1 if self.tied_embeddings else 2) + self.d_model

    @property
    def n_params(self) -> int:
        """Every number of the model."""
        return sum(self.blocks) + self.others


def paper_configs() -> dict[str, dict]:
    """The paper's models' sizes, as their Hugging Face config.json files name them (bundled data).

    Returns:
        Model name -> its fields (and ``source``, where they were read).
    """
    text = resources.files("tl_linmap").joinpath("data/paper_configs.json").read_text()
    return {name: fields for name, fields in json.loads(text).items() if not name.startswith("_")}


def _from_hf(name: str, fields: dict) -> ModelShape:
    heads = fields["num_attention_heads"]
    return ModelShape(
        name=name, d_model=fields["hidden_size"], n_layers=fields["num_hidden_layers"], n_heads=heads,
        n_key_value_heads=fields.get("num_key_value_heads") or heads, d_head=fields.get("head_dim") or fields["hidden_size"] // heads,
        d_mlp=fields["intermediate_size"], d_vocab=fields["vocab_size"], gated_mlp=True,
        dtype=getattr(torch, fields.get("torch_dtype", "float32")), tied_embeddings=bool(fields.get("tie_word_embeddings")),
        norms_per_block=fields.get("norms_per_block", 2), qk_norm=bool(fields.get("qk_norm")),
    )


def _from_cfg(cfg, name: str | None = None) -> ModelShape:
    heads = cfg.n_heads
    d_mlp = getattr(cfg, "d_mlp", None) or 0
    return ModelShape(
        name=name or getattr(cfg, "model_name", None) or "model", d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=heads,
        n_key_value_heads=getattr(cfg, "n_key_value_heads", None) or heads, d_head=cfg.d_head, d_mlp=d_mlp,
        d_vocab=cfg.d_vocab, gated_mlp=bool(getattr(cfg, "gated_mlp", False)), dtype=getattr(cfg, "dtype", None) or torch.float32,
        qk_norm=bool(getattr(cfg, "use_qk_norm", False)),
    )


def _from_model(model) -> ModelShape:
    # The loaded model's own numbers, dtype and placement: distinct tensors only (tied weights once).
    seen: set[int] = set()
    blocks, devices = [], []
    for block in model.blocks:
        params = [p for p in block.parameters() if id(p) not in seen and not seen.add(id(p))]
        blocks.append(sum(p.numel() for p in params))
        devices.append(str(params[0].device) if params else "cpu")
    others: dict[str, int] = {}
    dtypes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            dtypes[p.dtype] = dtypes.get(p.dtype, 0) + p.numel()
        if id(p) not in seen and not seen.add(id(p)):
            others[str(p.device)] = others.get(str(p.device), 0) + p.numel()
    shape = _from_cfg(model.cfg, getattr(model.cfg, "model_name", None))
    return ModelShape(
        **{**shape.__dict__, "dtype": max(dtypes, key=dtypes.get) if dtypes else shape.dtype, "block_params": tuple(blocks),
           "other_params": sum(others.values()), "block_devices": tuple(devices), "other_devices": tuple(others.items())},
    )


def shape_of(model) -> ModelShape:
    """The sizes of what `plan` is given.

    Args:
        model: A TransformerBridge or HookedTransformer (its weights counted where they are), a
            ``HookedTransformerConfig`` (or anything with its field names), a `ModelShape`, or the
            name of a paper model (`paper_configs`: ``"Qwen/Qwen3-14B"``).

    Returns:
        The `ModelShape`.

    Raises:
        InputError: for anything else.
    """
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        configs = paper_configs()
        if model not in configs:
            raise InputError(f"No bundled config named {model!r}: pass a model, a HookedTransformerConfig, or one of {sorted(configs)}.")
        return _from_hf(model, configs[model])
    if hasattr(model, "blocks") and hasattr(model, "cfg"):
        return _from_model(model)
    if all(hasattr(model, key) for key in ("d_model", "n_layers", "n_heads", "d_head", "d_vocab")):
        return _from_cfg(model)
    raise InputError(
        f"plan needs a model, a HookedTransformerConfig, a tl_linmap.linear.plan.ModelShape or a paper model's name; got {type(model).__name__}."
    )


def _device_spec(device) -> DeviceSpec:
    if isinstance(device, DeviceSpec):
        return device
    if isinstance(device, tuple) and len(device) == 2 and all(isinstance(v, (int, float)) for v in device):
        memory, rate = device
        return DeviceSpec(f"{memory / _GIB:.0f} GiB device", int(memory), {"float32": float(rate), "float64": float(rate)})
    if isinstance(device, str) and device.upper() in DEVICES:
        total, f32, f64 = DEVICES[device.upper()]
        return DeviceSpec(device.upper(), int(total * _GIB) - CONTEXT_BYTES, {"float32": f32 * 1e12, "float64": f64 * 1e12})
    try:
        local = torch.device(device)
    except (TypeError, RuntimeError) as error:
        raise InputError(
            f"devices must be 'H100', 'H200', a torch device ('cpu', 'cuda:0'), a (bytes, FLOP/s) pair, or a list of them; got {device!r}."
        ) from error
    return DeviceSpec(str(local), 0, device=local)


def device_specs(devices, shape: ModelShape) -> list[DeviceSpec]:
    """The devices a plan is for.

    Args:
        devices: None (a loaded model's own devices, else the CPU), one device, or a list: named
            cards (``"H100"``, ``"H200"``), torch devices, ``(bytes, FLOP/s)`` pairs or `DeviceSpec`.
        shape: The model (a loaded model's devices).

    Returns:
        One `DeviceSpec` per device, in order (blocks are placed in this order).

    Raises:
        InputError: for anything else.
    """
    if devices is None:
        devices = list(dict.fromkeys([*(d for d, _ in shape.other_devices[:1]), *shape.block_devices])) or ["cpu"]
    if isinstance(devices, (str, DeviceSpec, torch.device)) or (isinstance(devices, tuple) and len(devices) == 2 and not isinstance(devices[0], (str, tuple))):
        devices = [devices]
    specs = [_device_spec(d) for d in devices]
    if not specs:
        raise InputError("devices is empty: name at least one ('H100', 'cpu', ...).")
    return specs


def place_blocks(shape: ModelShape, n_devices: int) -> tuple[list[int], list[int]]:
    """Which device each block goes on, balanced by memory as accelerate's ``device_map="auto"`` does.

    The embedding goes on the first device and the unembedding and final norm on the last;
    blocks fill the devices in order, each up to an equal share of the whole model.

    Args:
        shape: The model.
        n_devices: Devices to spread it over.

    Returns:
        Per block its device index, and per device the non-block numbers there.
    """
    blocks, others = shape.blocks, [0] * n_devices
    embed = shape.d_vocab * shape.d_model
    others[0] += min(embed, shape.others)
    others[-1] += shape.others - min(embed, shape.others)
    share = (sum(blocks) + shape.others) / n_devices
    where, device, used = [], 0, others[0]
    for numbers in blocks:
        if device < n_devices - 1 and used + numbers / 2 > share * (device + 1) - others[device] * (device > 0):
            device += 1
        where.append(device)
        used += numbers
    return where, others


@dataclass(frozen=True)
class _Work:
    # What a route adds to memory and time, before it is spread over devices.
    route: str
    rows: int
    graph: bool  # the route keeps an autograd graph (and with it the cast blocks, where they fit)
    in_flight: int  # bytes of the rows in flight
    stored: int  # results kept
    flops: float
    free_error: str = ""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _factors(shape: ModelShape, n: int, item: int) -> int:
    # Frozen factors per layer: attention patterns, norm scales, the MLP's activation factor.
    return item * shape.n_layers * (shape.n_heads * n * n + n * shape.d_mlp + 4 * n)


def _graph(shape: ModelShape, n: int, item: int) -> int:
    per_model, per_mlp = GRAPH_PER_LAYER
    return item * shape.n_layers * n * (per_model * shape.d_model + per_mlp * shape.d_mlp + shape.n_heads * n)


def _forward_flops(shape: ModelShape, positions: int) -> float:
    # One row through one block at ``positions`` positions: every matmul, and attention over about half the context.
    block = sum(shape.blocks) / max(1, shape.n_layers)
    return 2 * positions * (block + positions * shape.n_heads * shape.d_head)


def _backward_flops(shape: ModelShape, positions: int) -> float:
    # A reverse row multiplies only through the live projections (`budget.forward_row_cost`).
    return _forward_flops(shape, positions) / budget.forward_row_cost(shape)


def _target_width(shape: ModelShape, name: str) -> int:
    if name.endswith(("mlp.hook_pre", "mlp.hook_post", "hook_pre_linear")):
        return shape.d_mlp
    if name.endswith(("hook_z", "hook_q", "hook_result")):
        return shape.n_heads * shape.d_head
    return shape.d_model


def _free_for_rows(free: int, fixed: int) -> int:
    # What `budget.available_bytes` will report when the run plans its rows: the fixed parts are allocated by then.
    return max(0, free - fixed)


def _route(shape: ModelShape, what: str, n: int, last: int, targets: Sequence[str], route: str) -> tuple[str, bool]:
    # The route the run takes (for "auto", by the run's own count) and whether it keeps a graph.
    if what == "token_contributions":
        return "tokens", False
    if what == "matrix_free":
        return "products", True  # each token's window keeps a graph for the transposed products
    if what == "attribution_graph":
        return "graph rows", True
    if route == "auto":
        shapes = [(_target_width(shape, t), target_depth(t, shape.n_layers)) for t in targets]
        route = budget.choose_route(shape.d_model, n, last, shapes, budget.forward_row_cost(shape))
    return route, route == "rows"


def _work(shape: ModelShape, what: str, route: str, n: int, last: int, dtype: torch.dtype, device: torch.device, free: int, *,
          targets: Sequence[str], rows_per_pass: int | None, max_nodes: int | None, products: int) -> _Work:
    # Rows per pass by the budget function the run calls, the bytes in flight and stored, the FLOPs.
    item = _itemsize(dtype)
    setup = 3 * shape.n_layers * _forward_flops(shape, n) + 2 * n * shape.d_model * shape.d_vocab  # plain, frozen, b
    if route == "tokens":
        step = budget.plan_tokens(shape, n, last, dtype, rows_per_pass, device, free)
        pushes = sum(min(step, last + 1 - s) * _forward_flops(shape, last + 1 - s) for s in range(0, last + 1, step))
        return _Work(route, step, False, step * budget.row_bytes(shape, n, item), item * n * shape.d_model, setup + shape.n_layers * pushes)
    if route == "products":
        return _Work(route, 1, True, budget.row_bytes(shape, n, item), 0, setup + products * shape.n_layers * _forward_flops(shape, n))
    if route == "graph rows":
        inner = n * shape.n_layers * (shape.n_heads + 1)  # heads and MLP outputs per position
        rows = (inner if max_nodes is None else min(max_nodes, inner)) + 1
        step = rows_per_pass or 64
        return _Work(route, step, True, step * budget.row_bytes(shape, n, item), item * rows * (inner + n),
                     setup + shape.n_layers * (_forward_flops(shape, n) + rows * _backward_flops(shape, n)))
    shapes = [(_target_width(shape, t), target_depth(t, shape.n_layers)) for t in targets]
    widths = [w for w, _ in shapes]
    # As `linear_maps` by default: maps stay in memory while they fit half the call's budget, the rest go to disk.
    memory = budget.DefaultBudget(min(int(free * budget.MEMORY_FRACTION), budget.DEFAULT_MEMORY))
    held, total = [], 0
    for width in widths:
        if total + item * n * shape.d_model * width <= memory // 2:
            held.append(width)
            total += item * n * shape.d_model * width
    stored = total
    if route == "columns":
        rows = budget.plan_columns(shape, n, last + 1, widths, dtype, rows_per_pass, device, free, memory=memory, held=held)
        depth = max(d for _, d in shapes)
        pushes = sum(shape.d_model * depth * _forward_flops(shape, last + 1 - i) for i in range(last + 1))
        return _Work(route, rows, False, rows * budget.column_bytes(shape, last + 1, widths, item), stored, setup + pushes)
    rows = budget.plan_rows(shape, n, max(widths), max(len(held), 1), dtype, rows_per_pass, device, free, memory=memory)
    backward = sum(w * d * _backward_flops(shape, n) for w, d in shapes)
    return _Work(route, rows, True, rows * budget.row_bytes(shape, n, item), stored, setup + shape.n_layers * _forward_flops(shape, n) + backward)


_RATES: dict[tuple[str, torch.dtype], float] = {}


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 3) -> float:
    """Measured matmul rate on a device in a dtype (a short probe, cached per device and dtype).

    Args:
        device: Where to measure.
        dtype: The working dtype.
        size: Side of the square matrices.
        repeats: Products timed (after one warm-up); the fastest counts.

    Returns:
        FLOP/s.
    """
    key = (str(device), dtype)
    if key not in _RATES:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        best = math.inf
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        _RATES[key] = 2 * size**3 / best
    return _RATES[key]


def _check_what(what: str) -> str:
    if what not in WHATS:
        raise InputError(f"what must be one of {', '.join(map(repr, WHATS))}, got {what!r}.")
    return what


def _n_tokens(model, prompt_or_length) -> int:
    if isinstance(prompt_or_length, bool) or prompt_or_length is None:
        raise InputError(f"prompt_or_length must be a prompt (text or token ids) or a positive int, got {prompt_or_length!r}.")
    if isinstance(prompt_or_length, int):
        if prompt_or_length < 1:
            raise InputError(f"prompt_or_length must be a prompt (text or token ids) or a positive int, got {prompt_or_length!r}.")
        return prompt_or_length
    if isinstance(prompt_or_length, torch.Tensor):
        return int(prompt_or_length.shape[-1])
    if isinstance(prompt_or_length, str) and hasattr(model, "to_tokens"):
        return int(model.to_tokens(prompt_or_length, move_to_device=False).shape[-1])
    raise InputError(f"prompt_or_length must be token ids or a length here (text needs a model with a tokenizer), got {type(prompt_or_length).__name__}.")


def _bytes_per_device(shape: ModelShape, specs: list[DeviceSpec]) -> tuple[list[int], list[int], list[list[int]]]:
    # Per device: own-dtype block numbers, non-block numbers, and the blocks' numbers there.
    names = [s.name for s in specs]
    if shape.block_devices and all(d in names for d in shape.block_devices):
        where = [names.index(d) for d in shape.block_devices]
        others = [dict(shape.other_devices).get(name, 0) for name in names]
    else:
        where, others = place_blocks(shape, len(specs))
    per_device = [[b for b, w in zip(shape.blocks, where) if w == i] for i in range(len(specs))]
    return [sum(b) for b in per_device], others, per_device


def make_plan(
    model, prompt_or_length, what: str = "linear_map", *, dtype: torch.dtype = torch.float64, devices=None,
    targets: Sequence[str] = ("output",), route: str = "auto", rows_per_pass: int | None = None, position: int = -1,
    max_nodes: int | None = None, products: int = DEFAULT_PRODUCTS, timed: bool = True, loaded: bool | None = None,
) -> Plan:
    """`plan` with the options the entry points' own check needs (``timed=False``: no probe).

    Args:
        model: As for `plan`.
        prompt_or_length: As for `plan`.
        what: As for `plan`.
        dtype: As for `plan`.
        devices: As for `plan`.
        targets: As for `plan`.
        route: As for `plan`.
        rows_per_pass: As for `plan`.
        position: As for `plan`.
        max_nodes: As for `plan`.
        products: As for `plan`.
        timed: Predict the time (a matmul probe on a local device).
        loaded: The weights are already on the local devices (None: a loaded model's are).

    Returns:
        The `tl_linmap.results.plan.Plan`.
    """
    what = _check_what(what)
    if route not in ("auto", "rows", "columns"):
        raise InputError(f"route must be 'auto', 'rows' or 'columns', got {route!r}.")
    shape = shape_of(model)
    n = _n_tokens(model, prompt_or_length)
    dtype = check_dtype(dtype) or shape.dtype
    specs = device_specs(devices, shape)
    loaded = bool(shape.block_devices) if loaded is None else loaded
    own, item = _itemsize(shape.dtype), _itemsize(dtype)
    cast = shape.dtype != dtype
    blocks, others, per_device = _bytes_per_device(shape, specs)
    share = [len(b) / max(1, shape.n_layers) for b in per_device]
    free = []
    for spec, b, o in zip(specs, blocks, others):
        if spec.device is not None:
            weights = 0 if loaded else own * (b + o)
            free.append(budget.available_bytes(spec.device) - weights)
        else:
            free.append(spec.memory - own * (b + o))
    route, graph_route = _route(shape, what, n, position % n, targets, route)
    keeps = graph_route and all(item * b <= f * budget.GRAPH_CAST_FRACTION for b, f in zip(blocks, free))  # as `borrowed` decides
    factors, graph = _factors(shape, n, item), _graph(shape, n, item)

    def casts(i: int) -> int:  # the non-block weights, and every block where a graph keeps them, else one
        return item * (others[i] + (blocks[i] if keeps else max(per_device[i], default=0))) if cast else 0

    def fixed(i: int) -> int:  # allocated before the passes: casts, factors, the graph
        return casts(i) + int(share[i] * (factors + (graph if graph_route else 0)))

    first = specs[0].device or torch.device("cpu")
    options = dict(targets=targets, rows_per_pass=rows_per_pass, max_nodes=max_nodes, products=products)
    reason = ""
    try:
        work = _work(shape, what, route, n, position % n, dtype, first, _free_for_rows(free[0], fixed(0)), **options)
    except MemoryBudgetError as error:
        reason = str(error)
        # What the run would store and count, had it room for one row per pass.
        work = _work(shape, what, route, n, position % n, dtype, first, 2**62, **{**options, "rows_per_pass": 1})
        work = dataclasses.replace(work, rows=0, in_flight=0)
    rows = []
    logits = item * n * shape.d_vocab
    for i, spec in enumerate(specs):
        weights = own * (blocks[i] + others[i])
        work_bytes = fixed(i) - casts(i) + work.in_flight
        results = work.stored if i == 0 else 0
        passes = work_bytes + results
        setup = int(share[i] * factors) + (logits if i == len(specs) - 1 else 0)  # the reference forward's logits
        new = casts(i) + max(passes, setup)
        capacity = free[i] + weights  # free already counts the weights out, loaded or to load
        fits = new <= free[i]
        rows.append(DevicePeak(
            device=spec.name, capacity_gib=capacity / _GIB, weights_gib=weights / _GIB, casts_gib=casts(i) / _GIB,
            work_gib=work_bytes / _GIB, results_gib=results / _GIB, peak_gib=(weights + new) / _GIB, fits=fits,
        ))
    rate = None
    if timed and not math.isnan(work.flops):
        spec = specs[0]
        rate = matmul_rate(spec.device, dtype) if spec.device is not None else spec.rates.get(str(dtype).removeprefix("torch."))
    seconds = work.flops / rate if rate else math.nan
    return Plan(
        what=what, model=shape.name, n_tokens=n, dtype=str(dtype).removeprefix("torch."), route=work.route, rows_per_pass=work.rows,
        devices=tuple(rows), flops=work.flops, rate=rate, seconds=seconds, reason=reason,
    )


def plan(
    model, prompt_or_length, what: str = "linear_map", *, dtype: torch.dtype = torch.float64, devices=None,
    targets: Sequence[str] = ("output",), route: str = "auto", rows_per_pass: int | None = None, position: int = -1,
    max_nodes: int | None = None, products: int = DEFAULT_PRODUCTS,
) -> Plan:
    """Predict a run before it starts: peak memory per device, time, and the route and rows per pass it takes.

    The memory model is the module's (`tl_linmap.linear.plan`); the rows per pass come from the
    budget functions the run calls (`tl_linmap.base.budget`), given the free memory it will see.
    The time is the route's floating-point operations over the matmul rate: measured by a short
    probe on a local device (cached), assumed for a named card (`DEVICES`). A plan that does not
    fit says why (`tl_linmap.results.plan.Plan.check` raises it); the entry points refuse such a
    run before any work.

    Args:
        model: A TransformerBridge or HookedTransformer, or only its sizes: a
            ``HookedTransformerConfig``, a `ModelShape`, or a paper model's name
            (``"Qwen/Qwen3-14B"``, ``"google/gemma-3-12b-pt"``, ``"meta-llama/Llama-3.1-8B"``).
        prompt_or_length: The prompt (text needs a loaded model; token ids) or its length in tokens.
        what: ``"linear_map"`` (with ``targets``: `tl_linmap.linear.dense.linear_maps`),
            ``"token_contributions"``, ``"matrix_free"`` (its set-up and ``products`` products) or
            ``"attribution_graph"`` (heads and MLP outputs as nodes).
        dtype: Working dtype.
        devices: None (the model's own devices; the CPU for a config), or a device or list of
            them: ``"H100"``, ``"H200"``, ``["H100", "H100"]`` (blocks placed like accelerate's
            ``device_map="auto"``), a torch device, a ``(bytes, FLOP/s)`` pair.
        targets: For ``"linear_map"``: hook names (or ``"output"``).
        route: For ``"linear_map"``: ``"rows"``, ``"columns"`` or ``"auto"`` (as the run picks it).
        rows_per_pass: The run's ``rows_per_pass`` (``tokens_per_pass``, for token contributions);
            None: as the run picks it.
        position: Target position.
        max_nodes: For ``"attribution_graph"``.
        products: For ``"matrix_free"``: products with the operator to time.

    Returns:
        A `tl_linmap.results.plan.Plan`.

    Raises:
        InputError: for a model, length, ``what``, dtype or device it cannot plan.
    """
    return make_plan(model, prompt_or_length, what, dtype=dtype, devices=devices, targets=targets, route=route,
                     rows_per_pass=rows_per_pass, position=position, max_nodes=max_nodes, products=products)


def refuse_unfit(model, n_tokens: int, what: str, dtype: torch.dtype | None, **options) -> None:
    """Refuse a run that will not fit, before any work: the plan's memory check, no probe.

    Args:
        model: The loaded model.
        n_tokens: Prompt length (the longest prompt of a batch).
        what: The entry point (`WHATS`).
        dtype: Working dtype (None: the model's own).
        **options: `make_plan`'s (targets, route, rows_per_pass, max_nodes, position).

    Raises:
        MemoryBudgetError: with the plan's numbers (or the budget's own message about ``rows_per_pass``).
    """
    # The entry point's own checks first, so a bad argument is refused in their words, not the plan's.
    check_dtype(dtype)
    if "targets" in options:
        options["targets"] = resolve_targets(model, options["targets"])
    shape = shape_of(model)
    try:
        plan_ = make_plan(shape, n_tokens, what, dtype=dtype or shape.dtype, timed=False, loaded=True, **options)
    except InputError:
        return  # what the plan cannot model (an unusual target) is not refused here
    if plan_.reason:
        raise MemoryBudgetError(plan_.reason)  # the budget's own words (a safe rows_per_pass)
    plan_.check()
