"""Exactness: one tolerance per dtype and one check for every result that claims to be exact.

The detached system reconstructs its target to rounding: ~1e-15 relative in float64 on every
model tested, ~1e-7 in float32. The bounds below sit a few orders above that, far below
anything a freeze rule without effect produces (1e-3 and more), so a pass never hides one.
"""

from __future__ import annotations

import torch

from tl_linmap.base.errors import FreezeError, InputError

#: Largest relative reconstruction error accepted, per working dtype.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-4,
    torch.float16: 5e-2,
    torch.bfloat16: 1e-1,
}


def tolerance(dtype: torch.dtype) -> float:
    """The relative error below which a result in ``dtype`` counts as exact.

    Args:
        dtype: The working dtype of the computation.

    Returns:
        The bound from `TOLERANCES` (1e-12 for float64).

    Raises:
        InputError: for anything but a floating torch dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"tolerance takes a floating torch dtype such as torch.float64, got {dtype!r}.")
    return TOLERANCES.get(dtype, torch.finfo(dtype).eps ** 0.5)


def check_exact(error: float, dtype: torch.dtype, what: str) -> float:
    """Raise `FreezeError` unless a measured relative error is within `tolerance`.

    Args:
        error: The measured relative error (NaN fails).
        dtype: The working dtype.
        what: What was checked (named in the message), e.g. the target hook name.

    Returns:
        The error, for chaining.

    Raises:
        FreezeError: naming the error, the bound and the likely cause.
    """
    bound = tolerance(dtype)
    if not error <= bound:  # NaN fails too
        raise FreezeError(
            f"The detached system of {what} misses the model's output by {error:.2e} (tolerance "
            f"{bound:.0e} in {str(dtype).removeprefix('torch.')}): a freeze rule had no effect, or the "
            "model's weights were processed in a way the rules do not cover."
        )
    return error


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖``.

    Args:
        a: Value to judge.
        b: Reference.

    Returns:
        The relative error (0 where both are zero, inf where only ``b`` is).
    """
    gap, scale = (a - b).norm().item(), b.norm().item()
    return gap / scale if scale else (0.0 if gap == 0 else float("inf"))
