"""Progress bars on long work: on by default once a call has lasted a few seconds, off with ``progress=False``.

Every long entry point takes ``progress: bool | None = None``. None shows a `tqdm.auto` bar (a widget in
notebooks, text in terminals) only after `DELAY` seconds, so quick calls print nothing and slow ones are
never silent; True shows it at once; False never.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

# tqdm.auto draws a widget in notebooks, which needs ipywidgets; without it, its text bar and no warning.
if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

from tl_linmap.base.errors import InputError

#: Seconds a bar waits under ``progress=None`` before it appears (tqdm's ``delay``).
DELAY = 2.0


def check_progress(progress) -> bool | None:
    """Check a ``progress`` argument.

    Args:
        progress: True, False or None.

    Returns:
        The same value.

    Raises:
        InputError: for anything else.
    """
    if progress is not None and not isinstance(progress, bool):
        raise InputError(f"progress must be True (a bar at once), False (none) or None (a bar once the call lasts {DELAY:g} s); got {progress!r}.")
    return progress


def progress_bar(total: int | None, desc: str, progress: bool | None, iterable: Iterable | None = None) -> tqdm:
    """A progress bar as the caller asked for it.

    Args:
        total: Steps in all (None: unknown).
        desc: What is counted.
        progress: True: shown at once; None: shown once the work has lasted `DELAY` seconds; False: never.
        iterable: Something to iterate through the bar (optional).

    Returns:
        A `tqdm.auto.tqdm`, to use as a context manager or an iterator.

    Raises:
        InputError: for a ``progress`` that is not True, False or None.
    """
    check_progress(progress)
    return tqdm(iterable, total=total, desc=desc, disable=progress is False, delay=0 if progress else DELAY)
