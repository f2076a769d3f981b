"""Borrowing the user's model: change dtype, grad flags and mode, then put everything back.

Whatever happens inside (an error half-way included), the model leaves `borrowed` with
the dtypes, ``requires_grad`` flags, train/eval mode and hooks it came in with; the
weights round-trip through the working dtype, which is exact when widening
(float32/bfloat16 -> float64 -> back).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _tensor_slots(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    slots = []
    for module in model.modules():
        slots += [(module, "_parameters", k) for k, v in module._parameters.items() if v is not None]
        slots += [(module, "_buffers", k) for k, v in module._buffers.items() if v is not None]
    return slots


def hook_count(model) -> int:
    """Number of forward and backward hooks attached to the model's hook points.

    Args:
        model: A TransformerBridge.

    Returns:
        The total, counted over distinct hook points.
    """
    points = {id(p): p for p in model.hook_dict.values()}.values()
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in points)


@contextmanager
def borrowed(model, dtype: torch.dtype | None) -> Iterator[None]:
    """Temporarily put the model in eval mode, without parameter grads, in ``dtype``.

    Args:
        model: A TransformerBridge (any ``nn.Module`` with a ``cfg`` works).
        dtype: Working floating dtype, or None to keep the model's own.

    Returns:
        A context manager; on exit the model is as it was.
    """
    slots = _tensor_slots(model)
    dtypes = [getattr(m, kind)[k].dtype for m, kind, k in slots]
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    cfg_dtype = getattr(model.cfg, "dtype", None)
    try:
        model.eval()
        model.requires_grad_(False)
        if dtype is not None:
            # nn.Module.to, not the bridge's .to, which prints on every dtype change.
            nn.Module.to(model, dtype)
            model.cfg.dtype = dtype
        yield
    finally:
        for (module, kind, key), original in zip(slots, dtypes):
            tensor = getattr(module, kind)[key]
            if tensor.dtype != original:
                if kind == "_parameters":
                    tensor.data = tensor.data.to(original)
                else:
                    module._buffers[key] = tensor.to(original)
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)
        for module, mode in zip(model.modules(), modes):
            module.training = mode
        if cfg_dtype is not None:
            model.cfg.dtype = cfg_dtype
