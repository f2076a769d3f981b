"""Peak resident memory of a call on Linux, as every benchmark here measures it.

The kernel's high-water mark (``VmHWM``), reset to the current resident set before the call
(``/proc/self/clear_refs``), so that what loading a model took does not hide what the call takes.
A benchmark's child process (``python -c``) gets this module by starting with `PRELUDE`.
"""

from __future__ import annotations

import re
from pathlib import Path

#: Code that makes this module importable in a child process started with ``python -c``.
PRELUDE = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset() -> int:
    """Reset the high-water mark to the current resident set.

    Returns:
        The resident bytes now (the baseline a call's peak is measured from).
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def high_water() -> int:
    """The peak resident bytes since the last `reset`."""
    return _status("VmHWM")
