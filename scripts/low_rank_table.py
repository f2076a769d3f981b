"""Measure how low-rank the last token's operator is on a real model (README table).

Usage: python scripts/low_rank_table.py [--model smollm2]
"""

import argparse
import warnings

import torch

import tl_linmap
from tl_linmap.reading.spectral import energy_rank, stable_rank
from tl_linmap.load.models import load_model

PROMPTS = [
    "The capital of France is",
    "One, two, three, four, five, six, seven,",
    "The Golden Gate Bridge is a suspension bridge in San Francisco, California.",
    "def add(a, b):\n    return",
    "She opened the door and saw that the garden was covered in fresh snow, so she",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model = load_model(args.model)
    print(f"{args.model}: {model.cfg.architecture}, d_model {model.cfg.d_model}, operators of the final-norm output, float64\n")
    print("| prompt | tokens | rel. error | last token: 90% | 99% | stable rank | first token: 90% | 99% | d_model |")
    print("|---|---|---|---|---|---|---|---|---|")
    for prompt in PROMPTS:
        lm = tl_linmap.linear_map(model, prompt)
        last, first = (torch.linalg.svdvals(lm.operators[i]) for i in (-1, 0))
        print(
            f"| {prompt[:40]!r} | {len(lm.tokens)} | {lm.relative_error():.1e} | {energy_rank(last, 0.9)} | "
            f"{energy_rank(last, 0.99)} | {stable_rank(last):.2f} | {energy_rank(first, 0.9)} | "
            f"{energy_rank(first, 0.99)} | {model.cfg.d_model} |"
        )


if __name__ == "__main__":
    main()
