"""Checking arguments: dtypes, indices, counts, names, positions, layers, vectors.

Every argument a public call takes is checked before the model is borrowed, and a wrong one
raises `tl_linmap.base.errors.InputError` saying what to pass instead.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
from torch import Tensor

from tl_linmap.base.errors import InputError


def check_dtype(dtype) -> torch.dtype | None:
    """Check a working ``dtype=``: a floating torch dtype, or None for the model's own.

    Args:
        dtype: What the user passed.

    Returns:
        ``dtype`` unchanged.

    Raises:
        InputError: for a string, a Python type, or an integer, boolean or complex dtype.
    """
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    raise InputError(
        f"dtype must be a floating torch dtype such as torch.float64 (the default, for exactness) or "
        f"torch.float32, or None to keep the model's own; got {dtype!r}."
    )


def is_int(value) -> bool:
    """Whether a value is an integer Python indexes with: an int, a NumPy integer, a 0-d integer tensor.

    Args:
        value: Anything.

    Returns:
        True for those, False for anything else and for bool (True is 1, but never meant as one).
    """
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def as_index(name: str, value) -> int:
    """An integer argument as a Python int: an int, a NumPy integer or a 0-d integer tensor.

    Args:
        name: The argument's name, for the message.
        value: What the user passed.

    Returns:
        The int.

    Raises:
        InputError: for a bool, a float, a string or anything else that is not an integer.
    """
    if not is_int(value):
        raise InputError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    return operator.index(value)


def check_positive(name: str, value, at_most: int | None = None) -> int:
    """A count argument (``k``, ``top``, ``rows_per_pass``, ...): a positive int.

    Args:
        name: The argument's name, for the message.
        value: What the user passed.
        at_most: Largest value that makes sense (e.g. the vocabulary size), or None.

    Returns:
        The int.

    Raises:
        InputError: for anything but an int in ``[1, at_most]``.
    """
    number = operator.index(value) if is_int(value) else 0
    if number < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}.")
    if at_most is not None and number > at_most:
        raise InputError(f"{name} must be at most {at_most}, got {number}.")
    return number


def check_names(name: str, names, example: str) -> list[str]:
    """A list of names, such as hook or module names (not one string, which would be iterated).

    Args:
        name: The argument's name, for the message.
        names: What the user passed.
        example: A valid value, shown in the message.

    Returns:
        The names as a list (each is checked where it is used).

    Raises:
        InputError: for a single string or anything that is not iterable.
    """
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise InputError(f"{name} must be a list of names, e.g. {name}={example}; got {names!r}.")
    return list(names)


def check_position(position: int, n_tokens: int) -> int:
    """Normalise a (possibly negative) position.

    Args:
        position: Index into the sequence, Python-style.
        n_tokens: Sequence length.

    Returns:
        The position as a non-negative index.

    Raises:
        InputError: if it is not an int, or out of range.
    """
    position = as_index("position", position)
    if not -n_tokens <= position < n_tokens:
        raise InputError(
            f"Position {position} is out of range for a prompt of {n_tokens} tokens: "
            f"pass one in [{-n_tokens}, {n_tokens}) (-1: the last token)."
        )
    return position % n_tokens


def check_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """Block indices for ``layers=``.

    Args:
        layers: Block indices, or None for every block.
        n_layers: Number of blocks of the model.

    Returns:
        The indices as a list.

    Raises:
        InputError: for a single int or a string, an empty list, or an index that is not a
            block of the model.
    """
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, str) or not isinstance(layers, Iterable):
        raise InputError(f"layers must be a list of block indices, e.g. layers=[{n_layers - 1}]; got {layers!r}.")
    layers = list(layers)
    if not layers:
        raise InputError("layers is empty: give at least one block index, or layers=None for every block.")
    bad = [layer for layer in layers if not is_int(layer) or not 0 <= operator.index(layer) < n_layers]
    if bad:
        raise InputError(f"layers must be block indices in [0, {n_layers}), got {bad}.")
    return [operator.index(layer) for layer in layers]


def check_vector(model, vector, *, one: bool) -> Tensor:
    """A residual-space vector (or several) to read as tokens.

    Args:
        model: A TransformerBridge or HookedTransformer.
        vector: What the user passed.
        one: Require a single vector, shape ``(d_model,)``.

    Returns:
        ``vector`` unchanged.

    Raises:
        InputError: for anything but a floating tensor whose last axis is ``d_model``.
    """
    d_model = model.cfg.d_model
    shape = f"({d_model},)" if one else f"(..., {d_model})"
    if not isinstance(vector, Tensor) or not vector.is_floating_point():
        got = f"a {vector.dtype} tensor" if isinstance(vector, Tensor) else type(vector).__name__
        raise InputError(f"Pass a floating tensor of shape {shape}, got {got}.")
    if vector.ndim == 0 or vector.shape[-1] != d_model or (one and vector.ndim != 1):
        hint = " (one vector; call once per row)" if one and vector.ndim > 1 else ""
        raise InputError(f"Expected a vector of shape {shape}{hint}, got {tuple(vector.shape)}.")
    return vector
