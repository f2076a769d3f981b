"""A/B of two versions of tl_linmap on the same calls: is a change a slowdown?

Each version runs in its own process (a version is a directory holding a `tl_linmap` package,
e.g. a `git worktree` of an older commit), alternating A, B, A, B, ... so that a host's load
drifts over both alike; the table gives each call's median seconds and the ratio B / A.

    git worktree add /tmp/old <commit>
    python benchmarks/ab_versions.py /tmp/old .          # about 10 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

CALLS = {
    "linear_map, toy llama d256, 32 tokens, float64": "tl_linmap.linear_map(toy('llama', d_model=256, n_layers=4, d_mlp=768), T(32))",
    "linear_map, toy gpt2 d256, 32 tokens, float64": "tl_linmap.linear_map(toy('gpt2', d_model=256, n_layers=4, d_mlp=768), T(32))",
    "token_contributions, toy llama d256, 64 tokens": "tl_linmap.token_contributions(toy('llama', d_model=256, n_layers=4, d_mlp=768), T(64))",
    "matrix_free svd, toy llama d256, 32 tokens": (
        "with tl_linmap.matrix_free(toy('llama', d_model=256, n_layers=4, d_mlp=768), T(32)) as mf: mf.svd(-1, k=8)"
    ),
    "linear_map, SmolLM2, 12 tokens, float32": "tl_linmap.linear_map(smollm2(), 'The capital of France is a city that', dtype=torch.float32)",
    # The float32 model mapped in float64: its blocks cast as the pass reaches them (issue 27).
    "token_contributions, SmolLM2 float32 in float64, 12 tokens": (
        "tl_linmap.token_contributions(smollm2(), 'The capital of France is a city that')"
    ),
    "linear_map rows, SmolLM2 float32 in float64, 12 tokens": (
        "tl_linmap.linear_map(smollm2(), 'The capital of France is a city that', route='rows')"
    ),
    # A graph per token window, a backward per product: where the cast blocks fit, the graph keeps them.
    "matrix_free svd, SmolLM2 float32 in float64, 12 tokens": (
        "with tl_linmap.matrix_free(smollm2(), 'The capital of France is a city that') as mf: mf.svd(-1, k=4)"
    ),
}

_CHILD = r"""
import json, sys, time, warnings, functools
warnings.filterwarnings("ignore")
import torch, tl_linmap
from tl_linmap.toy import toy_model
toy = functools.cache(lambda family, **kw: toy_model(family, **kw))
smollm2 = functools.cache(lambda: tl_linmap.load_model("smollm2"))
T = lambda n: torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(n))
times = {"__file__": tl_linmap.__file__}
for label, call in json.loads(sys.argv[1]).items():
    exec(call)  # warm: model built, first-call costs paid
    start = time.perf_counter(); exec(call); times[label] = time.perf_counter() - start
print(json.dumps(times))
"""


def run(version: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(version), "HF_HUB_OFFLINE": "1"}
    # Run inside the version: `python -c` puts the working directory before PYTHONPATH, so a run
    # from the repository root would time the checkout there whatever the version asked.
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(CALLS)], env=env, cwd=version, capture_output=True, text=True, check=True)
    times = json.loads(out.stdout.strip().splitlines()[-1])
    where = times.pop("__file__")
    assert where.startswith(os.path.abspath(version)), f"{version} imported tl_linmap from {where}"
    return times


def main() -> None:
    a, b = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    samples: dict[str, dict[str, list[float]]] = {a: {}, b: {}}
    for _ in range(rounds):
        for version in (a, b):
            for label, seconds in run(version).items():
                samples[version].setdefault(label, []).append(seconds)
    print(f"| call | A: {a} s | B: {b} s | B / A |\n|---|---|---|---|")
    for label in CALLS:
        ta, tb = statistics.median(samples[a][label]), statistics.median(samples[b][label])
        print(f"| {label} | {ta:.2f} | {tb:.2f} | {tb / ta:.2f} |")


if __name__ == "__main__":
    main()
