#!/usr/bin/env bash
# Builds the documentation site (mkdocs, strict: a broken link or a warning fails) into OUTDIR (default site/).
# The Tutorials pages are docs/tutorials/<stem>.ipynb: the executed copies the tests write there (outputs
# included), or, for a tutorial without one, its unexecuted notebook made here from tutorials/<stem>.py.
set -euo pipefail
out="${1:-$(dirname "$0")/../site}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac  # OUTDIR is relative to where this is called from
cd "$(dirname "$0")/.."
mkdir -p docs/tutorials
for script in tutorials/[0-9]*.py; do
    stem="$(basename "$script" .py)"
    if [ ! -f "docs/tutorials/$stem.ipynb" ]; then
        jupytext --quiet --to ipynb --output "docs/tutorials/$stem.ipynb" "$script"
    fi
done
export NO_MKDOCS_2_WARNING=1  # mkdocs-material's banner about MkDocs 2.0 (not a warning of this build)
mkdocs build --strict --site-dir "$out"
