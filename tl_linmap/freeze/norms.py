"""Frozen norms as affine maps, probed through the model's own hook points."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tl_linmap.base.devices import input_device, runs_on
from tl_linmap.base.guard import borrowed
from tl_linmap.freeze.hooks import (
    Factors,
    HookList,
    norm_replay_hooks,
    quiet_norm_edits,
)
from tl_linmap.reading.tokens import FrozenAffine


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
    # The model's own norm module, its scale replaced by the frozen one as the replays do.
    scale = f"{norm}.hook_scale"
    return _probed(model, norm, lambda probes: norm_replay_hooks(model, scale, factors[scale][:, position : position + 1]))


def _probed(model, module: str, hooks: Callable[[Tensor], HookList]) -> FrozenAffine:
    # The module as an affine map: run on the zero vector and the basis vectors, with hooks
    # (made knowing the probes) replacing what the input would have decided.
    # Called outside a pass, the module has no block cast for it (`borrowed`): borrow it alone.
    norm = model.get_submodule(module)
    dtype, device = model.cfg.dtype, runs_on(norm) or input_device(model)
    probes = torch.cat([torch.zeros(1, model.cfg.d_model, dtype=dtype), torch.eye(model.cfg.d_model, dtype=dtype)]).to(device)[:, None]
    with borrowed(norm, dtype), quiet_norm_edits(), model.hooks(fwd_hooks=hooks(probes)), torch.no_grad():
        out = norm(probes)[:, 0].to(input_device(model))
    return FrozenAffine(matrix=(out[1:] - out[0]).T, offset=out[0])


def after_output(model, output: str) -> FrozenAffine | None:
    """What the final norm still applies after one of its hook points.

    A bridge's ``ln_final.hook_out`` is the norm's result: nothing follows. Its
    ``hook_normalized``, and a HookedTransformer's (RMSNorm; LayerNorm in TransformerLens
    3.x), come before the weight, which then multiplies (and the bias adds). Found by replacing
    the hook's value with probe vectors and reading the module's result, so no norm code is
    copied here and every version's placement is measured, not assumed.

    Args:
        model: The model, in the working dtype.
        output: A hook name of the final norm, e.g. the output hook (`tl_linmap.base.hook_names.output_hook`).

    Returns:
        The affine map from the hook's value to the norm's result, or None where it is the identity.
    """
    if not output.startswith("ln_final."):
        return None
    after = _probed(model, "ln_final", lambda probes: [(output, lambda act, hook=None: probes.to(act))])
    identity = torch.eye(model.cfg.d_model, dtype=after.matrix.dtype, device=after.matrix.device)
    return None if torch.equal(after.matrix, identity) and not after.offset.any() else after
