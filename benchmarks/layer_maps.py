"""Dense maps of every layer's residual stream: shared passes, and the rows route vs the columns route.

Two tables on the same model and prompt, in one process:

1. ``layer_maps`` (shared passes) against one ``linear_map`` call per target;
2. ``linear_maps(route="rows")`` (``d_out`` backward rows per target) against
   ``route="columns"`` (``d_in`` basis embeddings per token, pushed through that token's
   window, serving every target at once), for ``hook_resid_mid`` and ``hook_resid_post``
   of every layer, and for the output alone, with the route ``"auto"`` picks.

Usage: python benchmarks/layer_maps.py [--model smollm2 | --d-model 512 --layers 8] [--tokens 16 64]
       [--routes-only]
"""

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import tl_linmap  # noqa: E402
from tl_linmap.base import budget  # noqa: E402
from tl_linmap.freeze.targets import resolve_target  # noqa: E402
from tl_linmap.base.hook_names import target_depth
from tl_linmap.load.toy import toy_model  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def residual_targets(model):
    """``layer_maps``' default targets: resid_mid (where the block has one) and resid_post of every layer."""
    names = [f"blocks.{layer}.hook_{kind}" for layer in range(model.cfg.n_layers) for kind in ("resid_mid", "resid_post")]
    return [name for name in names if name in model.hook_dict]


def tokens_for(model, n):
    return torch.randint(3, min(model.cfg.d_vocab, 5000), (1, n), generator=torch.Generator().manual_seed(n))


def auto_route(model, tokens, targets):
    """The route ``route="auto"`` takes (the pure rule, fed the targets' widths and depths)."""
    d = model.cfg.d_model
    shapes = [(d, target_depth(resolve_target(model, t), model.cfg.n_layers)) for t in targets]
    cost = budget.forward_row_cost(model.cfg)
    return budget.choose_route(d, tokens.shape[1], tokens.shape[1] - 1, shapes, cost)


def shared_table(model, label, n_tokens):
    tokens = tokens_for(model, n_tokens)
    t_shared, maps = timed(lambda: tl_linmap.layer_maps(model, tokens))
    t_separate, separate = timed(lambda: {name: tl_linmap.linear_map(model, tokens, target=name) for name in maps})
    diff = max((maps[n].operators - separate[n].operators).abs().max().item() for n in maps)
    print(f"\n### {label}, {n_tokens} tokens, float64, {len(maps)} targets (resid_mid and resid_post of every layer)\n")
    print("| layer_maps (shared passes) s | one linear_map per target s | ratio | max abs diff |")
    print("|---|---|---|---|")
    print(f"| {t_shared:.2f} | {t_separate:.2f} | {t_separate / t_shared:.2f} | {diff:.1e} |")


def route_table(model, label, lengths):
    print(f"\n### Rows vs columns route: {label}, float64, last position\n")
    print("| targets | tokens | rows s | columns s | rows / columns | auto picks | max rel diff of operators | max reconstruction error |")
    print("|---|---|---|---|---|---|---|---|")
    residual = residual_targets(model)
    for targets, what in ((residual, f"{len(residual)} residual"), (["output"], "output only")):
        for n in lengths:
            tokens = tokens_for(model, n)
            t_back, back = timed(lambda t=tokens, ts=targets: tl_linmap.linear_maps(model, t, ts, route="rows"))
            t_fwd, fwd = timed(lambda t=tokens, ts=targets: tl_linmap.linear_maps(model, t, ts, route="columns"))
            diff = max(((fwd[k].operators - back[k].operators).norm() / back[k].operators.norm()).item() for k in back)
            error = max(lm.relative_error() for lm in (*back.values(), *fwd.values()))
            print(f"| {what} | {n} | {t_back:.2f} | {t_fwd:.2f} | {t_back / t_fwd:.2f} | {auto_route(model, tokens, targets)} "
                  f"| {diff:.1e} | {error:.1e} |", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a load_model name; default: a random Llama-like model")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16])
    parser.add_argument("--routes-only", action="store_true", help="skip the shared-vs-separate table")
    args = parser.parse_args()
    if args.model:
        model = tl_linmap.load_model(args.model)
        label = args.model
    else:
        model = toy_model("llama", d_model=args.d_model, n_layers=args.layers, n_heads=8, d_mlp=3 * args.d_model,
                          n_ctx=max(64, *args.tokens), dtype=torch.float32)
        label = f"random Llama-like d_model {args.d_model}, MLP {3 * args.d_model}, {args.layers} layers"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.routes_only:
        shared_table(model, label, args.tokens[0])
    route_table(model, label, args.tokens)


if __name__ == "__main__":
    main()
