#!/usr/bin/env bash
# The browser libraries that circuit-tracer's graph browser loads from CDNs, from the npm registry,
# for rendering it offline in the tests (tests/ct_frontend.py): d3 7, d3-jetpack 2 (d3.conventions,
# selection.appendMany/.at/.st/.translate, d3.nestBy, ...), dagre 0.8.5 and pako 2.1.0 (the versions
# its index.html names), npyjs. Installed with `npm install --prefix` into a cache folder that git
# ignores: $1, else $TL_LINMAP_FRONTEND_LIBS, else .cache/frontend-libs. Does nothing when that
# folder already holds this list. Prints the folder (absolute) on stdout, npm's output on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-${TL_LINMAP_FRONTEND_LIBS:-.cache/frontend-libs}}"
packages=(d3@7.9.0 d3-jetpack@2.3.0 dagre@0.8.5 pako@2.1.0 npyjs@1.2.0)
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
if [ "$(cat "$dir/.installed" 2>/dev/null)" != "${packages[*]}" ]; then
    command -v npm >/dev/null || { echo "frontend_libs.sh: npm not found (apt-get install -y npm)" >&2; exit 1; }
    npm install --prefix "$dir" --no-audit --no-fund --loglevel=error "${packages[@]}" >&2
    echo "${packages[*]}" >"$dir/.installed"
fi
echo "$dir"
