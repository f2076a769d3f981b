"""Borrowing the user's model: change dtype, grad flags and mode, then put everything back.

Whatever happens inside (an error half-way included), the model leaves `borrowed` bit for
bit as it came in: the very tensors it held (not casts of casts, which would round every
weight a narrowing working dtype cannot hold), with their ``requires_grad`` flags, the
train/eval mode of every module, ``cfg.dtype`` and its hooks.

A working dtype other than the model's costs no second copy of the model: a block's weights
are cast when the pass reaches the block (``blocks.L.hook_resid_pre``) and put back when it
leaves it (``hook_resid_post``), so a pass holds the model in its own dtype plus one block in
the working dtype. An autograd graph built on the way refers to the casts: where every block, cast,
fits in a quarter of free memory (`tl_linmap.base.budget.GRAPH_CAST_FRACTION`), a pass with
grad enabled keeps its blocks cast until the borrow ends, and each backward reads them as they are;
where they would not fit, what the graph saves of a cast weight (the weight, or a view of it) is
saved as a recipe, the model's own tensor and the view, and cast again whenever a backward pass
reads it (``torch.autograd.graph.saved_tensors_hooks``, pushed only while such a block runs), so
that the reverse-mode routes hold one block too, at the price of a cast per weight per backward.
The tensors outside the blocks (embeddings, unembedding, final norm, spliced dictionaries) are
cast on entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tl_linmap.base import budget
from tl_linmap.base.compat import get_act_name
from tl_linmap.base.errors import InputError


@dataclass(frozen=True)
class _Slot:
    """One place a module registers a parameter or buffer, and the tensor it held on entry."""

    module: nn.Module
    kind: str  # "_parameters" or "_buffers"
    key: str
    tensor: Tensor


def _dtype_attributes(modules: list[nn.Module]) -> list[tuple[nn.Module, torch.dtype]]:
    # A module that records its dtype as an attribute and casts its input to it (SAELens' SAE).
    return [(m, m.__dict__["dtype"]) for m in modules if isinstance(m.__dict__.get("dtype"), torch.dtype)]


def _modules(model: nn.Module) -> list[nn.Module]:
    # The module tree, and the modules a module keeps outside it: SAELens' _SAEWrapper holds its
    # SAE in __dict__ (so that hook names carry no ".sae."), yet it computes in the model's forward.
    tree = list(model.modules())
    seen = {id(m) for m in tree}
    kept = [v for m in tree for v in vars(m).values() if isinstance(v, nn.Module) and id(v) not in seen]
    return tree + [m for k in kept for m in k.modules() if id(m) not in seen and not seen.add(id(m))]


def _slots(model: nn.Module) -> list[_Slot]:
    # Every registration, not every tensor: a tied weight or one aliased under several
    # names sits in several slots, and each must get the same object back.
    return [
        _Slot(module, kind, key, tensor)
        for module in _modules(model)
        for kind in ("_parameters", "_buffers")
        for key, tensor in getattr(module, kind).items()
        if tensor is not None
    ]


Pool = dict[tuple, list[Tensor]]


@dataclass(frozen=True)
class _Recast:
    """What a graph saves in place of a view of a cast weight: the model's own tensor and the view."""

    own: Tensor
    dtype: torch.dtype
    size: torch.Size
    stride: tuple[int, ...]
    offset: int

    def tensor(self) -> Tensor:
        # The cast was `own.to(dtype)` (a fresh tensor), so casting again lays the values out as it did.
        return self.own.to(self.dtype).as_strided(self.size, self.stride, self.offset)


def _layout(tensor: Tensor) -> tuple:
    # What a spare must match to stand for `source.to(dtype)`: the same shape, strides and device
    # (a cast of another layout would round the products differently in the last bit).
    return tensor.shape, tensor.stride(), tensor.device


def _converted(source: Tensor, dtype: torch.dtype, pool: Pool | None) -> Tensor:
    # `source.to(dtype)`, into a tensor of that layout a block left behind where there is one:
    # blocks share their shapes, and copying into memory already mapped is several times
    # faster than a fresh allocation each pass.
    spares = pool.get(_layout(source)) if pool is not None else None
    return spares.pop().copy_(source) if spares else source.to(dtype)


def _cast(slots: list[_Slot], dtype: torch.dtype, pool: Pool | None = None) -> None:
    # What nn.Module.to(dtype) does, but once per distinct tensor, so shared tensors stay
    # shared. Gradients are left alone: nothing inside reads them.
    cast_buffers: dict[int, Tensor] = {}
    cast_params: set[int] = set()
    for slot in slots:
        tensor = slot.tensor
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            continue
        if slot.kind == "_parameters":
            if id(tensor) not in cast_params:
                cast_params.add(id(tensor))
                tensor.data = _converted(tensor.data, dtype, pool)
        else:
            if id(tensor) not in cast_buffers:
                cast_buffers[id(tensor)] = _converted(tensor, dtype, pool)
            slot.module._buffers[slot.key] = cast_buffers[id(tensor)]


def _casts_of(slots: list[_Slot], datas: dict[int, Tensor]) -> list[tuple[Tensor, Tensor]]:
    # The working-dtype tensors a cast block holds now, each once, with the model's own tensor each was
    # cast from (an offloaded block's are meta: none).
    held = {}
    for slot in slots:
        if slot.kind == "_parameters":
            current, own = slot.tensor.data, datas[id(slot.tensor)]
        else:
            current, own = slot.module._buffers[slot.key], slot.tensor
        if current.device.type != "meta" and current.data_ptr() != own.data_ptr():
            held[current.data_ptr()] = (current, own)
    return list(held.values())


def _restore(slots: list[_Slot], datas: dict[int, Tensor]) -> None:
    # Undo `_cast`: each slot gets its own tensor back, each parameter its own storage.
    for slot in slots:
        if slot.kind == "_parameters":
            slot.tensor.data = datas[id(slot.tensor)]
        else:
            slot.module._buffers[slot.key] = slot.tensor


def _split_by_block(model, slots: list[_Slot]) -> tuple[list[_Slot], list[list[_Slot]]]:
    # (slots cast on entry, slots cast with their block). A tensor goes with a block only if it is
    # registered in that block alone: one shared with another block or with the rest of the model
    # (a tied weight, a shared rotary buffer) must stay cast while either is running.
    blocks = list(getattr(model, "blocks", None) or [])
    if not blocks or not hasattr(model, "hooks"):
        return slots, []
    owner = {id(m): layer for layer, block in enumerate(blocks) for m in block.modules()}
    homes: dict[int, set] = {}
    for slot in slots:
        homes.setdefault(id(slot.tensor), set()).add(owner.get(id(slot.module)))
    alone = {key: next(iter(home)) for key, home in homes.items() if len(home) == 1 and None not in home}
    per_block: list[list[_Slot]] = [[] for _ in blocks]
    for slot in slots:
        if id(slot.tensor) in alone:
            per_block[alone[id(slot.tensor)]].append(slot)
    return [s for s in slots if id(s.tensor) not in alone], per_block


@dataclass
class _BlockCasts:
    """Which blocks hold working-dtype weights now, which a graph keeps, and what of them a graph saves as a `_Recast`."""

    per_block: list[list[_Slot]]
    datas: dict[int, Tensor]
    dtype: torch.dtype
    recast: bool  # a graph saves casts as recipes (they would not fit), instead of keeping the blocks cast
    cast: set[int] = field(default_factory=set)
    kept: set[int] = field(default_factory=set)  # cast until the borrow ends: a graph reads them
    graphed: set[int] = field(default_factory=set)  # cast in a pass with grad enabled, saved as recipes: never pooled
    pool: Pool = field(default_factory=dict)  # a restored block's casts, for the next block to copy into
    owners: dict[int, Tensor] = field(default_factory=dict)  # a cast's storage -> the model's own tensor
    hooks_on: torch.autograd.graph.saved_tensors_hooks | None = None  # pushed while a graphed block runs

    def enter(self, layer: int) -> None:
        graph = torch.is_grad_enabled()
        # A pass stopped inside a block (a target there) never left it: put that one back now.
        for other in self.cast - self.kept - {layer}:
            self.leave(other)
        if graph and self.recast and layer in self.cast and layer not in self.graphed:
            self.leave(layer)  # cast by a pass without a graph: cast afresh, where pack knows the casts
        if layer not in self.cast:
            # A graph's casts are fresh tensors, never pooled: memory a graph may still read is not reused.
            _cast(self.per_block[layer], self.dtype, None if graph else self.pool)
            self.pool.clear()  # spares of shapes this block has not: never more than one block's worth
            self.cast.add(layer)
            if graph and self.recast:
                self.graphed.add(layer)
                self.owners.update({cast.untyped_storage().data_ptr(): own for cast, own in _casts_of(self.per_block[layer], self.datas)})
                self._recipes(True)
        if graph and not self.recast:
            self.kept.add(layer)

    def leave(self, layer: int) -> None:
        if layer in self.cast and layer not in self.kept:
            spares = [cast for cast, _ in _casts_of(self.per_block[layer], self.datas)]
            _restore(self.per_block[layer], self.datas)
            for spare in spares:
                if layer in self.graphed:
                    self.owners.pop(spare.untyped_storage().data_ptr(), None)
                else:
                    self.pool.setdefault(_layout(spare), []).append(spare)
            self.cast.discard(layer)
            if layer in self.graphed:
                self.graphed.discard(layer)
                if not self.graphed:
                    self._recipes(False)

    def _recipes(self, on: bool) -> None:
        # The graph's saved-tensor hooks are pushed only while a block cast for a graph is running, so that
        # code between passes (torch.func refuses such hooks) and tensors saved elsewhere never meet them.
        if on and self.hooks_on is None:
            self.hooks_on = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            self.hooks_on.__enter__()
        elif not on and self.hooks_on is not None:
            self.hooks_on.__exit__(None, None, None)
            self.hooks_on = None

    def close(self) -> None:
        """Pop the graph's hooks where a pass stopped inside a block left them pushed (the blocks are restored apart)."""
        self._recipes(False)

    def pack(self, tensor: Tensor):
        """What a graph saves of ``tensor``: a `_Recast` for a view of a block's cast, else the tensor."""
        if tensor.layout is not torch.strided or tensor.device.type == "meta" or tensor.dtype != self.dtype:
            return tensor
        try:
            own = self.owners.get(tensor.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # a tensor subclass without a storage
            return tensor
        if own is None:
            return tensor
        return _Recast(own, tensor.dtype, tensor.size(), tensor.stride(), tensor.storage_offset())

    @staticmethod
    def unpack(saved) -> Tensor:
        """A saved tensor back, cast again where it was a `_Recast`."""
        return saved.tensor() if isinstance(saved, _Recast) else saved

    def hooks(self) -> list:
        """``(name, fn)`` hooks casting each block on entry and restoring it on exit."""
        hooks = []
        for layer in range(len(self.per_block)):
            hooks.append((get_act_name("resid_pre", layer), lambda act, hook=None, layer=layer: self.enter(layer)))
            hooks.append((get_act_name("resid_post", layer), lambda act, hook=None, layer=layer: self.leave(layer)))
        return hooks


def _casts_fit(per_block: list[list[_Slot]], dtype: torch.dtype) -> bool:
    # Whether every block, cast, fits in a graph's share of its device's free memory (an offloaded
    # block's weights, on meta, take none): then a graph may keep them.
    need: dict[torch.device, int] = {}
    seen: set[int] = set()
    for slot in (slot for block in per_block for slot in block):
        tensor = slot.tensor
        if tensor.is_floating_point() and tensor.dtype != dtype and tensor.device.type != "meta" and id(tensor) not in seen:
            seen.add(id(tensor))
            need[tensor.device] = need.get(tensor.device, 0) + tensor.numel() * (torch.finfo(dtype).bits // 8)
    return all(size <= budget.available_bytes(device) * budget.GRAPH_CAST_FRACTION for device, size in need.items())


def _hookable(model, names: list[str]) -> bool:
    # Every block boundary is a plain hook point: not where a spliced SAE (SAELens' _SAEWrapper) took its
    # place, whose boundary hooks run inside the SAE; such a model is cast whole on entry instead.
    points = model.hook_dict
    return all(hasattr(points.get(name), "add_hook") for name in names)


def hook_count(model) -> int:
    """Number of forward and backward hooks attached to the model's hook points.

    Args:
        model: A TransformerBridge or HookedTransformer.

    Returns:
        The total, counted over distinct hook points.
    """
    points = {id(p): p for p in model.hook_dict.values()}.values()
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in points)


#: The models a running borrow casts block by block (id -> working dtype): a borrow inside one works
#: in it, since two borrows casting and putting back the same blocks would each restore the other's
#: casts (and a pooled cast holds another block's weights by then).
_CASTING: dict[int, torch.dtype] = {}


@contextmanager
def borrowed(model, dtype: torch.dtype | None) -> Iterator[None]:
    """Temporarily put the model in eval mode, without parameter grads, in ``dtype``.

    The original tensors stay referenced while the model is borrowed and are put back on
    exit, so a narrowing ``dtype`` (float64 -> float32, float32 -> bfloat16) loses nothing.
    A block's weights are cast only while a pass runs through it, except in passes with grad
    enabled, whose graph keeps them where they fit and saves them as recipes to cast again where
    they would not (see the module docstring); everything outside the blocks is cast on entry.

    Inside a borrow that casts the model block by block (a call inside ``with
    tl_linmap.matrix_free(...)``), a borrow in the same dtype (or None) works in the running one.

    Args:
        model: A TransformerBridge or HookedTransformer, or any ``nn.Module`` (one without
            ``blocks`` and hook points is cast whole on entry).
        dtype: Working floating dtype, or None to keep the model's own.

    Returns:
        A context manager; on exit the model is as it was, bit for bit.

    Raises:
        InputError: inside a running borrow of the model in another dtype.
    """
    running = _CASTING.get(id(model))
    if running is not None:
        if dtype not in (None, running):
            raise InputError(
                f"This model is in use by a tl_linmap call working in {running} (a `with tl_linmap.matrix_free(...)` "
                f"block?): pass dtype={running} here, or make this call outside that block."
            )
        yield  # the running borrow has the model as this one would: eval mode, no grads, its casts
        return
    slots = _slots(model)
    params = {id(s.tensor): s.tensor for s in slots if s.kind == "_parameters"}.values()
    # `.data` aliases the storage (no copy); the cast swaps in a new one, so these keep the bits.
    datas = [(p, p.data, p.requires_grad) for p in params]
    modules = _modules(model)
    modes = [(m, m.training) for m in modules]
    dtypes = _dtype_attributes(modules)
    cfg = getattr(model, "cfg", None)  # a submodule borrowed alone has none
    cfg_dtype = getattr(cfg, "dtype", None)
    try:
        model.eval()
        model.requires_grad_(False)
        for module, _ in modes:  # also those kept outside the tree
            module.training = False
        for param, _, _ in datas:
            param.requires_grad_(False)
        if dtype is None:
            yield
            return
        if cfg is not None:
            cfg.dtype = dtype
        for module, _ in dtypes:
            module.dtype = dtype
        on_entry, per_block = _split_by_block(model, slots)
        _cast(on_entry, dtype)
        if not any(s.tensor.is_floating_point() and s.tensor.dtype != dtype for block in per_block for s in block):
            yield  # nothing to cast in the blocks (the model is in the working dtype already)
            return
        casts = _BlockCasts(per_block, {id(p): data for p, data, _ in datas}, dtype, recast=not _casts_fit(per_block, dtype))
        if not _hookable(model, [name for name, _ in casts.hooks()]):
            _cast([s for block in per_block for s in block], dtype)
            yield
            return
        _CASTING[id(model)] = dtype
        try:
            with model.hooks(fwd_hooks=casts.hooks()):
                yield
        finally:
            del _CASTING[id(model)]
            casts.close()
    finally:
        for slot in slots:
            getattr(slot.module, slot.kind)[slot.key] = slot.tensor
        for param, data, flag in datas:
            param.data = data
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode
        if dtype is not None and cfg is not None:
            cfg.dtype = cfg_dtype
            for module, own in dtypes:
                module.dtype = own
