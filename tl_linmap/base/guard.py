"""Borrowing the user's model: change dtype, grad flags and mode, then put everything back.

Whatever happens inside (an error half-way included), the model leaves `borrowed` bit for
bit as it came in: the very tensors it held (not casts of casts, which would round every
weight a narrowing working dtype cannot hold), with their ``requires_grad`` flags, the
train/eval mode of every module, ``cfg.dtype`` and its hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


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


def _cast(slots: list[_Slot], dtype: torch.dtype) -> None:
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
                tensor.data = tensor.data.to(dtype)
        else:
            if id(tensor) not in cast_buffers:
                cast_buffers[id(tensor)] = tensor.to(dtype)
            slot.module._buffers[slot.key] = cast_buffers[id(tensor)]


def hook_count(model) -> int:
    """Number of forward and backward hooks attached to the model's hook points.

    Args:
        model: A TransformerBridge or HookedTransformer.

    Returns:
        The total, counted over distinct hook points.
    """
    points = {id(p): p for p in model.hook_dict.values()}.values()
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in points)


@contextmanager
def borrowed(model, dtype: torch.dtype | None) -> Iterator[None]:
    """Temporarily put the model in eval mode, without parameter grads, in ``dtype``.

    The original tensors stay referenced while the model is borrowed and are put back on
    exit, so a narrowing ``dtype`` (float64 -> float32, float32 -> bfloat16) loses nothing;
    the price is holding the model in both dtypes meanwhile (nothing extra when ``dtype``
    is None or the model's own).

    Args:
        model: A TransformerBridge or HookedTransformer (any ``nn.Module`` with a ``cfg`` works).
        dtype: Working floating dtype, or None to keep the model's own.

    Returns:
        A context manager; on exit the model is as it was, bit for bit.
    """
    slots = _slots(model)
    params = {id(s.tensor): s.tensor for s in slots if s.kind == "_parameters"}.values()
    # `.data` aliases the storage (no copy); the cast swaps in a new one, so these keep the bits.
    datas = [(p, p.data, p.requires_grad) for p in params]
    modules = _modules(model)
    modes = [(m, m.training) for m in modules]
    dtypes = _dtype_attributes(modules)
    cfg_dtype = getattr(model.cfg, "dtype", None)
    try:
        model.eval()
        model.requires_grad_(False)
        for module, _ in modes:  # also those kept outside the tree
            module.training = False
        for param, _, _ in datas:
            param.requires_grad_(False)
        if dtype is not None:
            model.cfg.dtype = dtype
            for module, _ in dtypes:
                module.dtype = dtype
            _cast(slots, dtype)
        yield
    finally:
        for slot in slots:
            getattr(slot.module, slot.kind)[slot.key] = slot.tensor
        for param, data, flag in datas:
            param.data = data
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode
        if dtype is not None:
            model.cfg.dtype = cfg_dtype
            for module, own in dtypes:
                module.dtype = own
