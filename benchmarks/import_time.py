"""How long ``import tl_linmap`` takes, in two versions (A/B, fresh processes, alternating).

Three rows per version: the bare ``import tl_linmap``; the import plus ``tl_linmap.linear_map``
(what a first call needs: torch, TransformerLens, the freezing code); and ``import torch`` alone,
the floor that any version pays before its first map. Each sample is a fresh interpreter;
A and B alternate so that a host's load drifts over both alike; the table gives medians and B / A.

    git worktree add /tmp/old <commit>
    python benchmarks/import_time.py /tmp/old .          # about a minute on 2 cores
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

ROWS = {
    "import tl_linmap": "import tl_linmap",
    "import tl_linmap; tl_linmap.linear_map": "import tl_linmap; tl_linmap.linear_map",
    "import torch (the floor)": "import torch",
}

_CHILD = (
    "import time; start = time.perf_counter(); {code}; took = time.perf_counter() - start\n"
    "import tl_linmap; print(tl_linmap.__file__); print(took)"
)


def sample(version: str, code: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(version), "HF_HUB_OFFLINE": "1"}
    # Run inside the version: `python -c` puts the working directory before PYTHONPATH.
    out = subprocess.run([sys.executable, "-c", _CHILD.format(code=code)], env=env, cwd=version, capture_output=True, text=True, check=True)
    where, took = out.stdout.strip().splitlines()[-2:]
    assert where.startswith(os.path.abspath(version)), f"{version} imported tl_linmap from {where}"
    return float(took)


def main() -> None:
    a, b = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for label, code in ROWS.items():
            for version in (a, b):
                samples.setdefault((version, label), []).append(sample(version, code))
    print(f"| what | A: {a} s | B: {b} s | B / A |\n|---|---|---|---|")
    for label in ROWS:
        ta, tb = (statistics.median(samples[(v, label)]) for v in (a, b))
        print(f"| {label} | {ta:.3f} | {tb:.3f} | {tb / ta:.2f} |")
    print(f"\n{rounds} rounds, medians; one fresh interpreter per sample.")


if __name__ == "__main__":
    main()
