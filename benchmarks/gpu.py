"""Every route on SmolLM2 and on two random-weight models of the paper's widths, in float32 and float64.

    python benchmarks/gpu.py                       # on a GPU: under ten minutes by design (see BUDGET_S)
    python benchmarks/gpu.py --device cpu          # the same on the CPU (about 25 minutes on 2 cores)
    python benchmarks/gpu.py --device cpu --quick  # tiny stand-ins for every model: about 30 s (the test's run)

Models: SmolLM2-135M (`tl_linmap.load_model("smollm2")`, float32 weights, a 16-token text prompt)
and two layers of Qwen 3 14B's widths (d_model 5120, 40 query / 8 key-value heads of 128, d_mlp
17408) and of Llama 3.1 8B's (4096, 32 / 8 heads of 128, d_mlp 14336): random float32 weights,
the toy byte-level vocabulary (259 tokens), 16 random tokens. Each model is built once, in float32,
and mapped in float32 and in float64 (the working dtype; the borrow casts blocks).

Routes: `linear_map` of the final norm's output by rows and by columns, a `Logit` readout (one
reverse row), `token_contributions`, a top-8 `matrix_free` SVD of the last token and (SmolLM2
only) an `attribution_graph` with heads and MLP outputs as nodes. Each row: seconds, peak memory
the call added (GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's ``VmHWM``, reset
through ``/proc/self/clear_refs``, so memory freed earlier and reused reads low), the relative
error, and `tl_linmap.plan`'s prediction beside it (at the matmul rate its probe measures on this
device). A case the plan predicts will not fit, or will not finish in the time left, is skipped
and says so. The table goes to ``benchmarks/results/gpu-<device>-<date>.md``.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peak_memory import high_water, reset

import tl_linmap
from tl_linmap.base.exactness import relative
from tl_linmap.load.toy import toy_model

RESULTS = Path(__file__).parent / "results"
DTYPES = (torch.float32, torch.float64)
ROUTES = ("linear_map rows", "linear_map columns", "Logit readout", "token_contributions", "matrix_free svd k=8", "attribution_graph")
PROMPT = "The capital of France is Paris, and the capital of Germany is Berlin. The capital of Italy is"

#: Time budget of a whole run; a case is skipped where the time left is under SAFETY times its plan.
BUDGET_S = {"cuda": 540.0, "cpu": 1800.0}
#: The plan counts matmuls only; on small or hook-bound runs the measured time is up to ~20 times it.
SAFETY = 4.0
#: A case the plan predicts longer than this is skipped (at most a tenth of the budget).
CASE_LIMIT = 0.1

#: Width models: family and toy_model sizes (Hugging Face names where the config needs them).
WIDTHS = {
    "Qwen3-14B widths": ("qwen3", dict(d_model=5120, n_heads=40, d_mlp=17408, num_key_value_heads=8, head_dim=128)),
    "Llama-3.1-8B widths": ("llama", dict(d_model=4096, n_heads=32, d_mlp=14336, num_key_value_heads=8, head_dim=128)),
}
#: --quick: the same families and head layout at a tiny width.
TINY = dict(d_model=32, n_heads=4, d_mlp=64, num_key_value_heads=2, head_dim=8)
QUICK_WIDTHS = {"Qwen3 shape, tiny": ("qwen3", TINY), "Llama shape, tiny": ("llama", TINY)}


@dataclass
class Row:
    """One measured (or skipped) case."""

    model: str
    dtype: str
    route: str
    seconds: float = float("nan")
    peak_gib: float = float("nan")
    error: float = float("nan")
    plan_s: float = float("nan")
    plan_gib: float = float("nan")
    note: str = ""

    def cells(self) -> list[str]:
        """The row's table cells."""
        def ratio(p: float, m: float) -> str:
            return f"{p / m:.2f}" if not (math.isnan(p) or math.isnan(m)) and m > 0 else "–"

        def num(v: float, f: str) -> str:
            return "–" if math.isnan(v) else format(v, f)

        return [self.model, self.dtype, self.route, num(self.seconds, ".3g"), num(self.peak_gib, ".3g"), num(self.error, ".1e"),
                num(self.plan_s, ".3g"), ratio(self.plan_s, self.seconds), num(self.plan_gib, ".3g"), ratio(self.plan_gib, self.peak_gib), self.note]


HEADER = ["model", "dtype", "route", "seconds", "peak GiB", "relative error", "plan s", "plan/meas s", "plan GiB", "plan/meas GiB", "note"]


# --- models ----------------------------------------------------------------------------------


def width_model(family: str, sizes: dict, device: str, dtype: torch.dtype = torch.float32, n_layers: int = 2):
    """A random-weight bridge of these widths, built on the CPU and moved to ``device``."""
    model = toy_model(family, n_layers=n_layers, n_ctx=64, dtype=dtype, **sizes)
    return model.to(device) if device != "cpu" else model


def models(device: str, quick: bool) -> dict[str, Callable[[], tuple[object, torch.Tensor, bool]]]:
    """Per model a builder of (model, tokens, whether the graph route runs on it)."""
    n = 4 if quick else 16
    random_tokens = torch.randint(3, 259, (1, n), generator=torch.Generator().manual_seed(0))

    def smollm2():
        if quick:  # SmolLM2's family at a tiny width: the same routes, in seconds
            return width_model("llama", TINY, device), random_tokens, True
        model = tl_linmap.load_model("smollm2", device=device)
        return model, model.to_tokens(PROMPT, move_to_device=False)[:, :n], True

    def width(family, sizes):
        return lambda: (width_model(family, sizes, device), random_tokens, False)

    builders = {"SmolLM2 stand-in (toy llama 32×2)" if quick else "SmolLM2-135M": smollm2}
    builders.update({name: width(*spec) for name, spec in (QUICK_WIDTHS if quick else WIDTHS).items()})
    return builders


# --- measuring -------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(call: Callable[[], float], device: str) -> tuple[float, float, float]:
    """Run ``call`` (which returns its relative error): seconds, peak GiB it added, the error."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset()
    _sync(device)
    start = time.perf_counter()
    error = call()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else high_water()
    return seconds, max(0, peak - base) / 2**30, error


def probe_error(system) -> float:
    """`matrix_free`'s linearity probe (even plus odd tokens give the output), its relative error."""
    x = system.x
    even = torch.zeros_like(x)
    even[:, 0::2] = x[:, 0::2]
    linear, biases = system.push(torch.cat([even, x - even]))
    return max(relative(linear[n].sum(0) + biases[n], system.outputs[n]) for n in system.names)


def route_call(route: str, model, tokens: torch.Tensor, dtype: torch.dtype, token: int, quick: bool) -> Callable[[], float]:
    """The call one route makes, returning its relative error."""
    common = dict(dtype=dtype, progress=False)
    if route.startswith("linear_map"):
        return lambda: tl_linmap.linear_map(model, tokens, route=route.split()[1], check=False, **common).relative_error()
    if route == "Logit readout":
        return lambda: tl_linmap.linear_map(model, tokens, target=tl_linmap.Logit(token), check=False, **common).relative_error()
    if route == "token_contributions":
        return lambda: tl_linmap.token_contributions(model, tokens, check=False, **common).relative_error()
    if route == "attribution_graph":
        return lambda: tl_linmap.attribution_graph(model, tokens, tl_linmap.Logit(token), modules=True, max_nodes=8 if quick else 32,
                                                   **common).relative_error()

    def svd() -> float:
        with tl_linmap.matrix_free(model, tokens, dtype=dtype, check=False) as mf:
            error = probe_error(mf.system)
            mf.svd(k=8)
        return error

    return svd


def route_plan(route: str, model, tokens: torch.Tensor, dtype: torch.dtype, quick: bool):
    """`tl_linmap.plan` of a route on this model and device.

    The Logit readout (a forward and one reverse row) is planned as `matrix_free` with two products.
    """
    if route.startswith("linear_map"):
        return tl_linmap.plan(model, tokens, "linear_map", dtype=dtype, route=route.split()[1])
    if route == "Logit readout":
        return tl_linmap.plan(model, tokens, "matrix_free", dtype=dtype, products=2)
    if route == "attribution_graph":
        return tl_linmap.plan(model, tokens, "attribution_graph", dtype=dtype, max_nodes=8 if quick else 32)
    return tl_linmap.plan(model, tokens, "token_contributions" if route == "token_contributions" else "matrix_free", dtype=dtype)


def top_token(model, tokens: torch.Tensor) -> int:
    """The model's prediction after the prompt (the readout's and the graph's target)."""
    with torch.no_grad():
        return int(model(tokens.to(next(model.parameters()).device))[0, -1].argmax())


def run_case(name: str, route: str, model, tokens, dtype, token: int, quick: bool, device: str, left: float) -> Row:
    """Plan one case; run it unless the plan says it will not fit or not finish in the time left."""
    row = Row(name, str(dtype).removeprefix("torch."), route)
    plan = route_plan(route, model, tokens, dtype, quick)
    row.plan_s, row.plan_gib = plan.seconds, max(d.peak_gib - d.weights_gib for d in plan.devices)
    if not plan.fits:
        row.note = "skipped: the plan says it does not fit"
    elif SAFETY * plan.seconds > (left if quick else min(left, CASE_LIMIT * BUDGET_S[device.split(":")[0]])):
        row.note = f"skipped: plan {plan.seconds:.3g} s × {SAFETY:g} over the time allowed"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row.seconds, row.peak_gib, row.error = measure(route_call(route, model, tokens, dtype, token, quick), device)
    return row


# --- the run ---------------------------------------------------------------------------------


def run(device: str, quick: bool, out: Path) -> Path:
    """Every model, dtype and route; prints each row and writes the table."""
    start, rows = time.perf_counter(), []
    budget = BUDGET_S[device.split(":")[0]]
    print("| " + " | ".join(HEADER) + " |", flush=True)
    for name, build in models(device, quick).items():
        built = time.perf_counter()
        model, tokens, graph = build()
        token = top_token(model, tokens)
        print(f"(built {name} in {time.perf_counter() - built:.1f} s)", flush=True)
        for dtype in DTYPES:
            for route in ROUTES:
                if route == "attribution_graph" and not graph:
                    continue
                row = run_case(name, route, model, tokens, dtype, token, quick, device, budget - (time.perf_counter() - start))
                rows.append(row)
                print("| " + " | ".join(row.cells()) + " |", flush=True)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return write(rows, device, quick, out, time.perf_counter() - start)


def write(rows: list[Row], device: str, quick: bool, out: Path, seconds: float) -> Path:
    """The markdown table, with what ran where."""
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"# `python benchmarks/gpu.py --device {device}{' --quick' if quick else ''}`, {time.strftime('%Y-%m-%d')}",
        "",
        f"Device: {where}; torch {torch.__version__}; the whole run {seconds:.0f} s. Width models: 2 layers, random float32",
        "weights, the toy vocabulary (259 tokens); each model mapped in float32 and float64. Peak: memory the call added.",
        "Plan: `tl_linmap.plan` at the matmul rate measured here (the Logit readout planned as `matrix_free` with 2 products).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *("| " + " | ".join(r.cells()) + " |" for r in rows),
    ]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-{device.split(':')[0]}{'-quick' if quick else ''}-{time.strftime('%Y-%m-%d')}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({seconds:.0f} s)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny stand-ins for every model (a test's run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        torch.set_num_threads(1)  # tiny matmuls: a second thread only waits (and, on a busy host, wakes late)
    run(args.device, args.quick, args.out)


if __name__ == "__main__":
    main()
