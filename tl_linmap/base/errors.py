"""Errors raised by tl_linmap, each naming what was wrong and what to do instead."""




class LinmapError(Exception):
    """Base class of every error tl_linmap raises on purpose."""


class UnsupportedArchitectureError(LinmapError):
    """The model's architecture (or one of its nonlinearities) has no freeze rule."""


class InputError(LinmapError, ValueError):
    """An argument cannot be used (a prompt, position, target, dtype, size, name ...); the message says what to pass."""


class FreezeError(LinmapError):
    """A freeze rule did not take effect, so the detached system is not exact."""


class MemoryBudgetError(LinmapError, MemoryError):
    """Even the smallest chunk of the computation would not fit in the memory budget."""
