"""Devices: where a model's tokens go, which devices its blocks run on, and weights accelerate offloaded.

A model dispatched by accelerate (``device_map``, ``max_memory``, ``offload_folder``; the
bridge's ``device_map``/``n_devices``) or split by HookedTransformer's ``n_devices`` runs each
block on its own device; a block offloaded to the CPU or disk holds meta tensors that its hook
loads for the block's forward. tl_linmap leaves every tensor of the pass where the model puts
it, gathers what it keeps (captured activations, results) on the *input device* (where the
token embeddings are computed), and plans memory on each device the model runs on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

META = torch.device("meta")


def _execution_device(module: nn.Module) -> torch.device | None:
    # accelerate's hook on a dispatched module says where its forward runs.
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return None if device is None else torch.device(device if not isinstance(device, int) else f"cuda:{device}")


def runs_on(module: nn.Module) -> torch.device | None:
    """The device a module computes on.

    Args:
        module: Any module.

    Returns:
        Its (or a submodule's) accelerate execution device if dispatched, else the device of its
        first weight that is not offloaded; None if it has neither.
    """
    for sub in module.modules():
        device = _execution_device(sub)
        if device is not None:
            return device
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device != META:
            return tensor.device
    return None


def input_device(model) -> torch.device:
    """Where the model's tokens go, and where tl_linmap gathers activations and results.

    Args:
        model: A TransformerBridge or HookedTransformer, dispatched or not.

    Returns:
        The device the token embedding runs on: its accelerate execution device if
        dispatched, else its weights' device, else ``cfg.device`` (CPU when unset or meta).
    """
    embed = getattr(model, "embed", None)
    device = runs_on(embed) if isinstance(embed, nn.Module) else None
    if device is None:
        device = _execution_device(getattr(model, "original_model", model)) or torch.device(getattr(model.cfg, "device", None) or "cpu")
    return torch.device("cpu") if device == META else device


def model_devices(model) -> list[torch.device]:
    """Every device the model's blocks compute on (memory is planned on each).

    Args:
        model: A TransformerBridge or HookedTransformer.

    Returns:
        The distinct devices, the input device first.
    """
    devices = [input_device(model)]
    for block in getattr(model, "blocks", None) or []:
        device = runs_on(block)
        if device is not None and device != META and device not in devices:
            devices.append(device)
    return devices


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloaded some of the module's weights (meta tensors until a forward loads them).

    Args:
        module: Any module.

    Returns:
        True if a parameter or buffer under it is on the meta device.
    """
    return any(t.device == META for t in (*module.parameters(), *module.buffers()))


@contextlib.contextmanager
def loaded(module: nn.Module) -> Iterator[None]:
    """Context manager: the module's offloaded weights loaded on its execution device, offloaded again after.

    For reading weights outside a forward (``W_U`` for logits, ``W_E`` to decode vectors). A
    module that is not offloaded is left alone.

    Args:
        module: A module (the unembedding, the embedding).

    Returns:
        A context manager.
    """
    if not is_offloaded(module):
        yield
        return
    from accelerate.utils import (
        align_module_device,  # only a dispatched model has meta weights, so accelerate is there
    )

    with contextlib.ExitStack() as stack:
        for sub in module.modules():  # accelerate hooks the leaves that own the weights
            stack.enter_context(align_module_device(sub))
        yield


def resident(model, name: str, owner: nn.Module | None = None) -> Tensor | None:
    """A weight a module exposes as an attribute (``W_U``, ``b_U``, ``W_E``, ``W_O``), loaded if offloaded.

    Args:
        model: A TransformerBridge or HookedTransformer, or the module holding the attribute.
        name: The attribute.
        owner: The submodule whose weights it is read from (default: the model's ``unembed`` for
            ``W_U``/``b_U``, its ``embed`` for ``W_E``, else ``model`` itself).

    Returns:
        The tensor, detached (a copy where it had to be loaded from an offload, else a view of the
        weight: copy it before keeping it across passes of a borrowed model), or None where there is
        no such attribute.
    """
    if owner is None:
        owner = getattr(model, {"W_U": "unembed", "b_U": "unembed", "W_E": "embed"}.get(name, ""), model)
    if not (isinstance(owner, nn.Module) and is_offloaded(owner)):
        value = getattr(model, name, None)
        return value.detach() if isinstance(value, Tensor) else value
    with loaded(owner):
        value = getattr(model, name, None)
        return value.detach().clone() if isinstance(value, Tensor) else value
