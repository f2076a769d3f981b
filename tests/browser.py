"""Headless Chromium for the tests: serve a folder on localhost and render a page of it.

``render`` returns the page's DOM after its scripts ran (``--dump-dom``, with a virtual-time budget
that lets timers and fetches from the local server finish) and can save a screenshot in the same
run. Nothing here reaches past localhost.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
)


def chromium() -> str:
    """The headless Chromium to run: ``$TL_LINMAP_CHROMIUM``, else the first of `CANDIDATES` on ``PATH``.

    Returns:
        The executable's path. Skips the calling test (``pytest.skip``, with the reason) when there
        is none; under ``CI=true`` conftest turns that skip into a failure.
    """
    path = os.environ.get("TL_LINMAP_CHROMIUM") or next(filter(None, map(shutil.which, CANDIDATES)), None)
    if not path or not os.access(path, os.X_OK):
        pytest.skip("no headless Chromium on this machine (apt-get install -y chromium, or set TL_LINMAP_CHROMIUM)")
    return path


def render(url: str, png: str | os.PathLike | None = None, budget_ms: int = 15000,
           window: tuple[int, int] = (1600, 1000), console: list[str] | None = None, timeout: float = 120) -> str:
    """Load ``url`` in a fresh headless Chromium profile and return its DOM once the scripts ran.

    Args:
        url: The page (``http://`` from `serve`, or ``file://``).
        png: Where to save a screenshot of the window, or None for none.
        budget_ms: Chromium's ``--virtual-time-budget``: virtual milliseconds the page gets for its
            timers, animation frames and fetches before the DOM is taken (virtual time waits for
            network loads, so a fetch from the local server counts as finished, not as elapsed time).
        window: The window's width and height in pixels (the page's layout sees this viewport).
        console: A list to which the page's console messages (Chromium's ``CONSOLE`` log lines:
            ``console.log``/``error`` calls and uncaught errors) are appended, or None.
        timeout: Wall-clock seconds before Chromium is killed.

    Returns:
        The serialized DOM (``document.documentElement.outerHTML`` with a doctype).

    Raises:
        RuntimeError: Chromium exited with an error or printed no DOM (its stderr's tail in the message).
    """
    with tempfile.TemporaryDirectory(prefix="tl-linmap-chromium-") as profile:
        cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={int(budget_ms)}",
               f"--window-size={window[0]},{window[1]}"]
        if png is not None:
            cmd.append(f"--screenshot={os.fspath(png)}")
        run = subprocess.run([*cmd, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
    if console is not None:
        console.extend(line for line in run.stderr.splitlines() if ":CONSOLE" in line)
    if run.returncode != 0 or "<html" not in run.stdout:
        raise RuntimeError(f"chromium exited with {run.returncode} on {url}; stderr ends:\n{run.stderr[-3000:]}")
    return run.stdout


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from ``directory``; URL paths under a mount prefix come from that mount's folder."""

    def __init__(self, *args, mounts: Mapping[str, str], **kwargs):
        self.mounts = mounts
        super().__init__(*args, **kwargs)

    def translate_path(self, path: str) -> str:
        for prefix, root in self.mounts.items():
            if path.startswith(prefix):
                directory, self.directory = self.directory, root
                try:
                    return super().translate_path("/" + path[len(prefix):])
                finally:
                    self.directory = directory
        return super().translate_path(path)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args) -> None:  # quiet
        pass


@contextlib.contextmanager
def serve(folder: str | os.PathLike, mounts: Mapping[str, str | os.PathLike] | None = None) -> Iterator[str]:
    """Serve ``folder`` over HTTP on a free localhost port, from a thread, for the ``with`` block.

    Args:
        folder: The folder whose files the server returns (``/`` is its root).
        mounts: URL path prefixes (``"/data/"``) mapped to other folders, whose files then answer
            the paths under that prefix (``/data/x.json`` is ``<folder of "/data/">/x.json``).

    Returns:
        A context manager that yields the base URL, ``http://127.0.0.1:<port>/``, and stops the
        server on exit.
    """
    mounts = {prefix: os.fspath(root) for prefix, root in (mounts or {}).items()}
    handler = functools.partial(_Handler, directory=os.fspath(folder), mounts=mounts)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
