"""Detached Jacobian: tl_linmap.linear_map against torch.autograd.functional.jacobian.

Same model, same frozen function, same process; ratios > 1 mean tl_linmap is faster.
Usage: python benchmarks/jacobian.py [--d-model 512 --layers 8 --tokens 16 --repeat 3]
"""

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import tl_linmap  # noqa: E402
from tl_linmap.freeze.hooks import freeze_hooks  # noqa: E402
from tl_linmap.base.guard import borrowed  # noqa: E402
from tl_linmap.freeze.capture import run_to_target  # noqa: E402
from tl_linmap.load.toy import toy_model  # noqa: E402


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def matmul_gflops(dtype, n=2048, repeat=3):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds, _ = best_of(lambda: a @ b, repeat)
    return 2 * n**3 / seconds / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model = toy_model("llama", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      d_mlp=3 * args.d_model, n_ctx=max(64, args.tokens), dtype=torch.float32)
    tokens = torch.randint(3, 259, (1, args.tokens))
    print(f"Llama-like random model: d_model {args.d_model}, MLP {3 * args.d_model}, {args.layers} layers, "
          f"{args.heads} heads, {args.tokens} tokens, torch threads {torch.get_num_threads()}")
    print("| dtype | matmul GFLOP/s | autograd.functional.jacobian s | linear_map s | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        with borrowed(model, dtype):
            x = run_to_target(model, tokens, "hook_embed")[0]

            def frozen(x):
                return run_to_target(model, tokens, "ln_final.hook_out", freeze_hooks(model), x[None])[0, -1]

            def reference():
                with torch.enable_grad():
                    return torch.autograd.functional.jacobian(frozen, x, vectorize=True)

            t_ref, jac = best_of(reference, args.repeat)
            # Also on the model already cast: the cast is a one-off either route would pay.
            t_ours, lm = best_of(lambda: tl_linmap.linear_map(model, tokens, dtype=dtype), args.repeat)
        diff = (jac.permute(1, 0, 2) - lm.operators).abs().max().item()
        print(f"| {str(dtype)[6:]} | {matmul_gflops(dtype):.0f} | {t_ref:.2f} | {t_ours:.2f} | {t_ref / t_ours:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
