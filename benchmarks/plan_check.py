"""`tl_linmap.plan` against measurements on the CPU: four model sizes, two prompt lengths, two routes.

    python benchmarks/plan_check.py            # writes benchmarks/results/plan_check.md

Each run is a fresh subprocess: a random-weight Llama-like bridge in float32 (`tl_linmap.load.toy`),
mapped in float64; its peak resident memory over what was resident after loading (Linux's
``VmHWM``, reset through ``/proc/self/clear_refs``) and its wall time, beside the plan's
prediction (the new bytes: the peak less the loaded weights; the time at the matmul rate the plan
measures). Plan and borrow alike cast one block at a time on routes without a graph.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from peak_memory import PRELUDE

SIZES = [(256, 2), (512, 2), (768, 4), (1024, 4)]  # (d_model, n_layers); d_mlp = 2 d_model, d_head 64
LENGTHS = [8, 32]
WHATS = ["token_contributions", "linear_map"]
OUT = Path(__file__).parent / "results" / "plan_check.md"

CHILD = r"""
import json, sys, time
import torch, tl_linmap
from peak_memory import high_water, reset
from tl_linmap.load.toy import toy_model

d_model, n_layers, n, what = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = toy_model("llama", d_model=d_model, n_layers=n_layers, n_heads=d_model // 64, d_mlp=2 * d_model, n_ctx=64, dtype=torch.float32)
tokens = torch.randint(2, 200, (1, n), generator=torch.Generator().manual_seed(0))
plan = tl_linmap.plan(model, tokens, what, dtype=torch.float64)
call = tl_linmap.linear_map if what == "linear_map" else tl_linmap.token_contributions
start_bytes, start = reset(), time.perf_counter()
call(model, tokens, dtype=torch.float64, check=False, progress=False)
seconds = time.perf_counter() - start
device = plan.devices[0]
print(json.dumps(dict(
    predicted=(device.peak_gib - device.weights_gib) * 2**30, measured=high_water() - start_bytes,
    predicted_s=plan.seconds, measured_s=seconds, route=plan.route, rows=plan.rows_per_pass, rate=plan.rate,
)))
"""


def run(d_model: int, n_layers: int, n: int, what: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PRELUDE + CHILD, str(d_model), str(n_layers), str(n), what],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    lines = [
        "# Plan against measurement (CPU)",
        "",
        f"`python benchmarks/plan_check.py`, {time.strftime('%Y-%m-%d')}: random-weight Llama-like bridges in float32 mapped in",
        "float64, each run in a fresh process. Memory: peak resident bytes the run added (MB); the plan's",
        "prediction (one block cast at a time without a graph, as the borrow does). Time: seconds, the plan's at",
        "the matmul rate its probe measured (1024² float64).",
        "",
        "| d_model × layers | tokens | what | route, rows | predicted MB | measured MB | pred/meas | predicted s | measured s | pred/meas s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d_model, n_layers in SIZES:
        for n in LENGTHS:
            for what in WHATS:
                r = run(d_model, n_layers, n, what)
                row = (f"| {d_model} × {n_layers} | {n} | {what} | {r['route']}, {r['rows']} | {r['predicted'] / 1e6:.0f} | "
                       f"{r['measured'] / 1e6:.0f} | {r['predicted'] / r['measured']:.2f} | "
                       f"{r['predicted_s']:.3g} | {r['measured_s']:.3g} | {r['predicted_s'] / r['measured_s']:.2f} |")
                print(row, flush=True)
                lines.append(row)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
