"""Per-token contributions of a long prompt on a real model: time, exactness and peak memory.

    python benchmarks/long_prompt.py [--model smollm2 --tokens 256 --dtype float64]
"""

import argparse
import resource
import time

import torch

import tl_linmap

TEXT = ("The history of the city is long and full of surprising turns, from its founding by traders "
        "to its growth as a centre of learning. ") * 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = parser.parse_args()
    model = tl_linmap.load_model(args.model)
    tokens = model.to_tokens(TEXT)[0, : args.tokens]
    start = time.perf_counter()
    c = tl_linmap.token_contributions(model, tokens, dtype=getattr(torch, args.dtype))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    print(f"| {args.model} | {len(tokens)} tokens | {args.dtype} | {seconds:.0f} s | "
          f"relative error {c.relative_error():.1e} | peak RSS {peak:.1f} GiB |")


if __name__ == "__main__":
    main()
