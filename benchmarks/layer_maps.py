"""layer_maps for all layers against one linear_map call per target, same process.

Usage: python benchmarks/layer_maps.py [--model smollm2 | --d-model 512 --layers 8] [--tokens 16]
"""

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import tl_linmap  # noqa: E402
from tl_linmap.toy import toy_model  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a load_model name; default: a random Llama-like model")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    if args.model:
        model = tl_linmap.load_model(args.model)
        label = args.model
    else:
        model = toy_model("llama", d_model=args.d_model, n_layers=args.layers, n_heads=8, d_mlp=3 * args.d_model,
                          n_ctx=max(64, args.tokens), dtype=torch.float32)
        label = f"random Llama-like d_model {args.d_model}, {args.layers} layers"
    tokens = torch.randint(3, min(model.cfg.d_vocab, 5000), (1, args.tokens))
    t_shared, maps = timed(lambda: tl_linmap.layer_maps(model, tokens))
    t_separate, separate = timed(lambda: {name: tl_linmap.linear_map(model, tokens, target=name) for name in maps})
    diff = max((maps[n].operators - separate[n].operators).abs().max().item() for n in maps)
    print(f"{label}, {args.tokens} tokens, float64, {len(maps)} targets (resid_mid and resid_post of every layer)")
    print("| layer_maps (shared passes) s | one linear_map per target s | ratio | max abs diff |")
    print("|---|---|---|---|")
    print(f"| {t_shared:.2f} | {t_separate:.2f} | {t_separate / t_shared:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
