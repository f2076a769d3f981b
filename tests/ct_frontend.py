"""circuit-tracer's own graph browser, served offline for the tests.

Its ``frontend/assets/index.html`` loads six scripts from CDNs (transformer-circuits.pub and unpkg).
`serve_circuit_tracer` copies the installed assets folder to a temporary folder, rewrites those
``<script>`` tags there to local copies, and serves the copy with the graph data the way
``circuit_tracer.frontend.local_server`` does (``/data/`` and ``/graph_data/`` both answer from the
data folder). Nothing of circuit-tracer's or npm's is kept in this repository: the libraries come
from the npm registry (``scripts/frontend_libs.sh``, into a git-ignored cache), and the few lines
that npm has no equivalent for are written here.

What the page uses of each CDN script, and what stands in for it:

* ``d3.js``: d3 7 (``d3.select``, scales, ``d3.forceSimulation``, ``d3.drag``, ...): npm ``d3@7``.
* ``jetpack_2024-07-20.js``: d3-jetpack's ``d3.conventions`` (with ``layers``), ``d3.nestBy``,
  ``d3.clamp``, ``d3.attachTooltip`` and its selection methods (``append('div.class')``,
  ``appendMany``, ``at``, ``st``, ``translate``, ``selectAppend``, ``parent``): npm ``d3-jetpack@2``'s
  UMD build, run through its CommonJS branch with the page's d3 as every d3 module it requires
  (npm ``d3-collection`` for ``d3.nest``, which ``nestBy`` uses). Its browser branch would replace
  the global ``d3`` by an empty object, and its ``d3v7+jetpack.js`` bundle patches a second copy of
  d3-selection, not the one ``d3.select`` returns. Added here: ``c.drawAxis(svg)`` on what
  ``d3.conventions`` returns (the page calls it; npm's jetpack has ``d3.drawAxis(c)`` only).
* ``npy_v0.js``: ``npyjs.parse`` (only for ``.npy`` files, which the graph page does not load):
  npm ``npyjs``, an ES module, as a module script.
* ``dagre.min.js`` (``dagre.layout``, the subgraph's layout), ``pako.min.js`` (``pako.inflate``,
  for ``.json.gz``): the same versions from npm.
* ``hotserver-client-ws.js``: a live-reload client for the authors' dev server; nothing else on
  the page refers to it. Replaced by an empty script.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlencode

import pytest

from browser import serve

REPO = Path(__file__).resolve().parent.parent
LIBS_SCRIPT = REPO / "scripts" / "frontend_libs.sh"
OFFLINE = "_offline"  # the folder in the assets copy that holds the local scripts

#: npm files copied as they are: name in the copy -> path under node_modules.
NPM_FILES = {
    "d3.min.js": "d3/dist/d3.min.js",
    "dagre.min.js": "dagre/dist/dagre.min.js",
    "pako.min.js": "pako/dist/pako.min.js",
    "npyjs.js": "npyjs/dist/index.js",
}
JETPACK_SOURCES = ("d3-collection/dist/d3-collection.js", "d3-jetpack/build/d3-jetpack.cjs")

#: The CDN scripts of index.html, by file name, and the tags that replace them.
TAGS = {
    "hotserver-client-ws.js": f"<script src='./{OFFLINE}/hotserver-client-ws.js'></script>",
    "d3.js": f"<script src='./{OFFLINE}/d3.min.js'></script>",
    "jetpack_2024-07-20.js": f"<script src='./{OFFLINE}/jetpack.js'></script>",
    "npy_v0.js": f"<script type='module'>import * as npyjs from './{OFFLINE}/npyjs.js'; window.npyjs = npyjs</script>",
    "dagre.min.js": f"<script src='./{OFFLINE}/dagre.min.js'></script>",
    "pako.min.js": f"<script src='./{OFFLINE}/pako.min.js'></script>",
}

HOTSERVER = "// circuit-tracer's live-reload client for its authors' dev server: nothing to reload here.\n"

JETPACK = """\
// npm d3-jetpack on the page's d3 (written by tl_linmap's tests/ct_frontend.py). Its UMD build runs
// through its CommonJS branch; every d3 module it requires is a snapshot of the global d3 (npm d3 7),
// except d3-collection (npm), which d3 7 no longer has. Only names d3 lacks are added to d3.
(function () {
  var base = Object.assign({}, d3)
  function require(name) { return name === 'd3-collection' ? collection : base }
  function load(source) { var module = {exports: {}}; source(module, module.exports, require); return module.exports }
  var collection = load(function (module, exports, require) {
%s
  })
  var jetpack = load(function (module, exports, require) {
%s
  })
  Object.keys(jetpack).forEach(function (name) { if (!(name in d3)) d3[name] = jetpack[name] })

  // The page calls c.drawAxis(svg) on what d3.conventions returns: the axes of c drawn into svg.
  var conventions = d3.conventions
  d3.conventions = function (options) {
    var c = conventions(options)
    c.drawAxis = function (svg) { return d3.drawAxis(Object.assign({}, c, {svg: svg || c.svg})) }
    return c
  }
})()
"""

PROBE = """\
// Test probe (tl_linmap's tests/ct_frontend.py, not circuit-tracer): the link graph draws its edges
// on <canvas>, which the DOM does not show. Once its nodes are drawn, <html data-canvas-ink> gets,
// for each canvas of .link-graph in order, how many of its pixels are painted (alpha > 0).
(function poll() {
  if (!document.querySelector('.link-graph text.node')) return setTimeout(poll, 100)
  setTimeout(function () {
    var ink = Array.from(document.querySelectorAll('.link-graph canvas'), function (canvas) {
      var px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data, n = 0
      for (var i = 3; i < px.length; i += 4) n += px[i] > 0
      return n
    })
    document.documentElement.dataset.canvasInk = JSON.stringify(ink)
  }, 500)
})()
"""


def frontend_libs() -> Path:
    """The npm libraries' folder (its ``node_modules``), installed by ``scripts/frontend_libs.sh`` if needed.

    The folder is ``$TL_LINMAP_FRONTEND_LIBS``, else ``.cache/frontend-libs`` in the repository.

    Returns:
        The folder. Skips the calling test (with npm's message) when the libraries are missing and
        cannot be installed (no npm, no registry).
    """
    folder = Path(os.environ.get("TL_LINMAP_FRONTEND_LIBS") or REPO / ".cache" / "frontend-libs")
    needed = [*NPM_FILES.values(), *JETPACK_SOURCES]
    if all((folder / "node_modules" / f).is_file() for f in needed):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".frontend-libs.lock", "w") as lock:  # one npm install at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = subprocess.run(["bash", str(LIBS_SCRIPT), str(folder)], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        pytest.skip(f"the frontend's libraries are not installed and scripts/frontend_libs.sh failed: {run.stderr[-2000:]}")
    folder = Path(run.stdout.split()[-1])
    missing = [f for f in needed if not (folder / "node_modules" / f).is_file()]
    assert not missing, f"scripts/frontend_libs.sh left out {missing} in {folder}"
    return folder


def assets_dir() -> Path:
    """circuit-tracer's installed ``frontend/assets`` folder (what ``local_server.serve`` serves)."""
    from circuit_tracer.frontend.local_server import DEFAULT_FRONTEND_DIR

    return Path(str(DEFAULT_FRONTEND_DIR))


def patched_assets(dest: str | os.PathLike, libs: str | os.PathLike | None = None, probe: bool = True) -> Path:
    """Copy circuit-tracer's assets folder to ``dest`` with ``index.html``'s CDN scripts made local.

    Args:
        dest: A folder that does not exist yet.
        libs: The npm libraries' folder; `frontend_libs` when None.
        probe: Also load `PROBE` (which records the link graph's painted canvas pixels in the DOM).

    Returns:
        ``dest``.

    Raises:
        RuntimeError: index.html loads a script from outside that has no local stand-in here (a
            circuit-tracer version other than 0.5's), or still refers to a remote URL after the rewrite.
    """
    dest = Path(dest)
    modules = Path(libs or frontend_libs()) / "node_modules"
    shutil.copytree(assets_dir(), dest)
    offline = dest / OFFLINE
    offline.mkdir()
    for name, source in NPM_FILES.items():
        shutil.copyfile(modules / source, offline / name)
    collection, jetpack = ((modules / f).read_text(encoding="utf-8") for f in JETPACK_SOURCES)
    (offline / "jetpack.js").write_text(JETPACK % (collection, jetpack), encoding="utf-8")
    (offline / "hotserver-client-ws.js").write_text(HOTSERVER, encoding="utf-8")
    (offline / "probe.js").write_text(PROBE, encoding="utf-8")

    index = dest / "index.html"
    html = index.read_text(encoding="utf-8")

    def local(match: re.Match) -> str:
        name = match.group(2).rsplit("/", 1)[-1]
        if name not in TAGS:
            raise RuntimeError(f"circuit-tracer's index.html loads {match.group(2)}, which has no offline stand-in")
        return TAGS[name]

    html = re.sub(r"<script\s+src=(['\"])(https?://[^'\"]+)\1\s*>\s*</script>", local, html)
    remote = re.findall(r"(?:src|href)\s*=\s*['\"]((?:https?:)?//[^'\"]+)", html)
    if remote:
        raise RuntimeError(f"index.html still loads {remote} after the rewrite")
    if probe:
        html += f"\n<script src='./{OFFLINE}/probe.js'></script>\n"
    index.write_text(html, encoding="utf-8")
    return dest


@contextlib.contextmanager
def serve_circuit_tracer(data_dir: str | os.PathLike, params: Mapping[str, str] | None = None,
                         probe: bool = True) -> Iterator[str]:
    """Serve circuit-tracer's graph browser, made offline, on the graphs in ``data_dir``.

    Args:
        data_dir: A folder written by ``circuit_tracer.utils.create_graph_files`` (``<slug>.json``
            and ``graph-metadata.json``), served under ``/data/`` and ``/graph_data/`` as
            ``local_server`` does.
        params: The page's URL query (``slug``, ``pinnedIds``, ``clickedId``, ...); the first graph
            of ``graph-metadata.json`` when it names no slug.
        probe: Load `PROBE` into the page.

    Returns:
        A context manager yielding the graph page's URL while the server runs.
    """
    libs = frontend_libs()
    with tempfile.TemporaryDirectory(prefix="tl-linmap-ct-frontend-") as tmp:
        site = patched_assets(Path(tmp) / "assets", libs, probe=probe)
        data = os.fspath(Path(data_dir).resolve())
        with serve(site, mounts={"/data/": data, "/graph_data/": data}) as base:
            yield base + "index.html" + (f"?{urlencode(dict(params))}" if params else "")
