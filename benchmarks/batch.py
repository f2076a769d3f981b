"""Batched prompts against looping the one-prompt call, in one process, on SmolLM2.

Three tables (the longest bundled phrases, `tl_linmap.load.datasets.phrases`: 11-20 tokens on SmolLM2):

1. ``token_contributions`` of 32 prompts: one batched call vs 32 one-prompt calls, float32 and float64;
2. how the ratio grows with the number of prompts (1, 2, 4, 8, 16, 32), ``token_contributions``, float32;
3. ``layer_maps`` of 8 prompts: one batched call vs 8 one-prompt calls;
4. where the one-prompt call's time goes: its forwards (plain and frozen, which batching shares)
   against its pushes (one row per token, each as wide as the prompt: compute no batching shares),
   and so the most any batching of passes could gain (the call's time over its pushes' time).

Each row: seconds, peak extra resident memory (sampled, as in ``suite.py``), the ratio loop / batched,
and the largest difference between the batched and the one-prompt results.

Usage: python benchmarks/batch.py [--prompts 32] [--maps-prompts 8] [--maps-tokens 6] [--maps-dtype float32]
       [--skip-contributions] [--skip-maps] [--skip-growth] [--skip-split]
"""

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from suite import gib, measure  # noqa: E402

import tl_linmap  # noqa: E402
from tl_linmap.load import datasets  # noqa: E402
from tl_linmap.freeze.system import frozen_system  # noqa: E402


def longest_phrases(model, n_prompts: int) -> list[str]:
    """The ``n_prompts`` longest bundled phrases (mixed lengths, as a dataset has; the phrases are short,
    5-20 tokens on SmolLM2, so these are the ones nearest 16 tokens), in the dataset's order."""
    phrases = datasets.phrases()
    length = {p: model.to_tokens(p, truncate=False).shape[1] for p in phrases}
    keep = set(sorted(phrases, key=lambda p: -length[p])[:n_prompts])
    return [p for p in phrases if p in keep]


def phrases_of(model, n_tokens: int, n_prompts: int) -> list[str]:
    """Up to ``n_prompts`` bundled phrases of ``n_tokens`` tokens (the nearest lengths when too few)."""
    phrases = datasets.phrases()
    return sorted(phrases, key=lambda p: abs(model.to_tokens(p, truncate=False).shape[1] - n_tokens))[:n_prompts]


def split(model, prompts, dtype) -> None:
    """One row: the one-prompt call's seconds per prompt, its forwards', its pushes', the ceiling."""
    calls = forwards = 0.0
    tl_linmap.token_contributions(model, prompts[0], dtype=dtype)
    for prompt in prompts:
        start = time.perf_counter()
        with frozen_system(model, prompt, ["output"], dtype=dtype):
            pass
        middle = time.perf_counter()
        tl_linmap.token_contributions(model, prompt, dtype=dtype)
        forwards += middle - start
        calls += time.perf_counter() - middle
    n = len(prompts)
    print(f"| {str(dtype)[6:]} | {n} | {calls / n:.2f} | {forwards / n:.2f} | {(calls - forwards) / n:.2f} | "
          f"{calls / (calls - forwards):.2f} |", flush=True)


def _diff(batched, looped, field) -> float:
    return max(((field(b) - field(o)).abs().max() / field(o).abs().max()).item() for b, o in zip(batched, looped))


def compare(label, call, prompts, field):
    """One row: the loop of one-prompt calls, then the batched call, in this process."""
    call(prompts[:1])  # warm-up (first-call costs on both sides)
    t_loop, m_loop, looped = measure(lambda: [call(p) for p in prompts])
    t_batch, m_batch, batched = measure(lambda: call(prompts))
    print(f"| {label} | {len(prompts)} | {t_loop:.1f} | {gib(m_loop)} | {t_batch:.1f} | {gib(m_batch)} | "
          f"{t_loop / t_batch:.2f} | {_diff(batched, looped, field):.1e} |", flush=True)
    return t_loop / t_batch


HEADER = ("| call | prompts | loop s | peak GiB | batched s | peak GiB | loop / batched | max rel diff |\n"
          "|---|---|---|---|---|---|---|---|")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--maps-prompts", type=int, default=8)
    parser.add_argument("--maps-tokens", type=int, default=6, help="prompt length for the layer_maps row")
    parser.add_argument("--maps-dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--skip-contributions", action="store_true")
    parser.add_argument("--skip-split", action="store_true")
    parser.add_argument("--skip-maps", action="store_true")
    parser.add_argument("--skip-growth", action="store_true")
    args = parser.parse_args()
    model = tl_linmap.load_model(args.model)
    prompts = longest_phrases(model, args.prompts)
    lengths = [model.to_tokens(p, truncate=False).shape[1] for p in prompts]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; "
          f"{args.model}, prompts of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.1f})\n")
    values = lambda c: c.values  # noqa: E731
    if not args.skip_contributions:
        print(HEADER)
    for dtype in () if args.skip_contributions else (torch.float32, torch.float64):
        compare(f"token_contributions, {str(dtype)[6:]}", lambda p, d=dtype: tl_linmap.token_contributions(model, p, dtype=d),
                prompts, values)
    if not args.skip_growth:
        print("\nHow the ratio grows with the number of prompts (token_contributions, float32):\n")
        print(HEADER)
        for n in (1, 2, 4, 8, 16, 32):
            if n <= len(prompts):
                compare("token_contributions, float32", lambda p: tl_linmap.token_contributions(model, p, dtype=torch.float32),
                        prompts[:n], values)
    if not args.skip_split:
        print("\nWhere the one-prompt token_contributions call's time goes (seconds per prompt):\n")
        print("| dtype | prompts | call | forwards | pushes | most batching can gain (call / pushes) |\n|---|---|---|---|---|---|")
        for dtype in (torch.float32, torch.float64):
            split(model, prompts[:8], dtype)
    if not args.skip_maps:
        dtype = getattr(torch, args.maps_dtype)
        few = phrases_of(model, args.maps_tokens, args.maps_prompts)
        lengths = [model.to_tokens(p, truncate=False).shape[1] for p in few]
        print(f"\nlayer_maps, every layer's resid_post, prompts of {min(lengths)}-{max(lengths)} tokens:\n")
        print(HEADER)
        compare(f"layer_maps, {args.maps_dtype}", lambda p: tl_linmap.layer_maps(model, p, dtype=dtype),
                few, lambda maps: maps[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"].operators)
    print(f"\nload at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
