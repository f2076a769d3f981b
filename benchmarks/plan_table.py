"""The paper's configurations as `tl_linmap.plan` predicts them (no weights, no GPU needed).

    python benchmarks/plan_table.py            # prints the table; writes it into docs/scale.md and README.md

Qwen 3 14B, Gemma 3 12B, Llama 3.1 8B (bundled configs, bfloat16 weights), 16 and 256 tokens,
float32 and float64, on one H100, one H200 and two H100s, for `token_contributions` and
`linear_map` (the final norm's output, the route "auto" picks).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

import tl_linmap
from tl_linmap.linear.plan import paper_configs

LENGTHS = (16, 256)
DTYPES = (torch.float32, torch.float64)
DEVICES = {"1 H100": "H100", "1 H200": "H200", "2 H100": ["H100", "H100"]}
WHATS = ("token_contributions", "linear_map")
ROOT = Path(__file__).parents[1]
DOCUMENTS = (ROOT / "docs" / "scale.md", ROOT / "README.md")
START, END = "<!-- plan_table: start -->", "<!-- plan_table: end -->"


def cell(plan) -> str:
    """One plan as ``peak GiB (largest device), fits, seconds``."""
    peak = max(d.peak_gib for d in plan.devices)
    if plan.reason:  # over the runtime's budget: half the free memory for results and rows in flight
        return f"{peak:.0f} GiB ✗*"
    if not plan.fits:
        return f"{peak:.0f} GiB ✗"
    return f"{peak:.0f} GiB ✓ {plan.seconds:.2g} s"


def table() -> list[str]:
    """The markdown table: a row per model, length and dtype; a column per entry point and devices."""
    heads = [f"{what} {devices}" for what in WHATS for devices in DEVICES]
    lines = ["| model | tokens | dtype | " + " | ".join(heads) + " |", "|---|---|---|" + "---|" * len(heads)]
    for name in paper_configs():
        for n in LENGTHS:
            for dtype in DTYPES:
                cells = [cell(tl_linmap.plan(name, n, what, dtype=dtype, devices=devices)) for what in WHATS for devices in DEVICES.values()]
                lines.append(f"| {name.split('/')[1]} | {n} | {str(dtype)[6:]} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    lines = table()
    print("\n".join(lines))
    block = "\n".join([START, *lines, END])
    for document in DOCUMENTS:
        text = document.read_text()
        document.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))
        print(f"wrote {document}")


if __name__ == "__main__":
    main()
