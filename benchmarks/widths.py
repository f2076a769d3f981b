"""The paper's widths on this machine: two layers of Qwen 3 14B's and Llama 3.1 8B's, float64.

    python benchmarks/widths.py            # about 10 minutes on 2 CPU cores; writes benchmarks/results/widths-<date>.md
    python benchmarks/widths.py --quick    # tiny stand-ins (seconds)

Each model is built with random float64 weights (a real Hugging Face Qwen3/Llama class through
`tl_linmap.load.toy`), two layers, the toy byte-level vocabulary (259 tokens), one at a time and
freed before the next. On 16 random tokens: a `Logit` readout (`linear_map` with
``target=tl_linmap.Logit(t)``, t the model's prediction), `token_contributions`, and a top-8
`matrix_free` SVD of the last token; each call's seconds and relative error (the SVD's: the
linearity probe's). Then the full depth (40 layers for Qwen 3 14B, 32 for Llama 3.1 8B): the
measured time scaled by layers, beside `tl_linmap.plan` for the real config (bfloat16 weights,
float64 working dtype) on this CPU (at the matmul rate it measures here) and on one H100 (its
assumed 40 TFLOP/s).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from gpu import (
    QUICK_WIDTHS,
    RESULTS,
    WIDTHS,
    measure,
    route_call,
    route_plan,
    top_token,
    width_model,
)

import tl_linmap

ROUTES = ("Logit readout", "token_contributions", "matrix_free svd k=8")
#: Width model -> the paper config whose depth and sizes it stands for.
REAL = {"Qwen3-14B widths": "Qwen/Qwen3-14B", "Llama-3.1-8B widths": "meta-llama/Llama-3.1-8B"}
WHAT = {"Logit readout": ("matrix_free", dict(products=2)), "token_contributions": ("token_contributions", {}),
        "matrix_free svd k=8": ("matrix_free", {})}
N_TOKENS = 16


def full_depth(name: str, route: str, n: int) -> tuple[int, float, float]:
    """The real model's depth and the plan's seconds for the route on this CPU and on one H100."""
    what, options = WHAT[route]
    cpu = tl_linmap.plan(name, n, what, dtype=torch.float64, devices="cpu", **options)
    h100 = tl_linmap.plan(name, n, what, dtype=torch.float64, devices="H100", **options)
    return tl_linmap.linear.plan.shape_of(name).n_layers, cpu.seconds, h100.seconds


def measure_model(label: str, family: str, sizes: dict, quick: bool) -> list[dict]:
    """Build one width model in float64, run the three calls, free it."""
    built = time.perf_counter()
    model = width_model(family, sizes, "cpu", dtype=torch.float64)
    tokens = torch.randint(3, 259, (1, N_TOKENS), generator=torch.Generator().manual_seed(0))
    token = top_token(model, tokens)
    print(f"(built {label} in {time.perf_counter() - built:.0f} s)", flush=True)
    rows = []
    for route in ROUTES:
        plan = route_plan(route, model, tokens, torch.float64, quick)
        seconds, peak, error = measure(route_call(route, model, tokens, torch.float64, token, quick), "cpu")
        real = REAL.get(label, "meta-llama/Llama-3.1-8B")
        layers, cpu_s, h100_s = full_depth(real, route, N_TOKENS)
        rows.append(dict(model=label, route=route, seconds=seconds, peak=peak, error=error, plan=plan.seconds,
                         layers=layers, scaled=seconds * layers / model.cfg.n_layers, cpu=cpu_s, h100=h100_s))
        print(rows[-1], flush=True)
    del model
    gc.collect()
    return rows


def table(rows: list[dict]) -> list[str]:
    """The markdown table of the measurements and the full-depth figures."""
    lines = [
        "| model (2 layers) | call | seconds | relative error | peak GiB | plan s (2 layers) | full depth: measured × layers/2 | plan, this CPU | plan, 1 H100 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['route']} | {r['seconds']:.3g} | {r['error']:.1e} | {r['peak']:.2f} | {r['plan']:.3g} | "
                     f"{r['scaled']:.3g} s ({r['layers']} layers) | {r['cpu']:.3g} s | {r['h100']:.2g} s |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    start, rows = time.perf_counter(), []
    for label, (family, sizes) in (QUICK_WIDTHS if args.quick else WIDTHS).items():
        rows += measure_model(label, family, sizes, args.quick)
    lines = [
        f"# `python benchmarks/widths.py{' --quick' if args.quick else ''}`, {time.strftime('%Y-%m-%d')}",
        "",
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; the whole run {time.perf_counter() - start:.0f} s.",
        f"Random float64 weights, 2 layers, toy vocabulary (259 tokens), {N_TOKENS} tokens, mapped in float64.",
        "Full depth: the 2-layer time scaled by layers, and `tl_linmap.plan` for the real config (bfloat16 weights, float64",
        "working dtype; the Logit readout planned as `matrix_free` with 2 products). The plan counts matmuls only.",
        "",
        *table(rows),
    ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"widths{'-quick' if args.quick else ''}-{time.strftime('%Y-%m-%d')}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
