"""Benchmark suite: dense detached Jacobians, and the routes that avoid them.

Every table compares methods on the same model, prompt and frozen function, in one process,
and prints ratios against the baseline (> 1: the tl_linmap route is faster / smaller).
Peak memory is the resident-set growth during a call (sampled every 5 ms).

Usage:
    python benchmarks/suite.py              # everything (15-40 minutes on 2 cores, by the host)
    python benchmarks/suite.py --quick      # smaller sizes, no SmolLM2 long-prompt row
"""

import argparse
import ctypes
import os
import threading
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

_libc = ctypes.CDLL("libc.so.6")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn):
    """(seconds, peak extra resident bytes, result) of one call."""
    _libc.malloc_trim(0)  # hand freed memory back, so the baseline is honest
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss() - base)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    return seconds, max(peak[0], _rss() - base), result


def matmul_gflops(dtype, n=2048):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    seconds = min(measure(lambda: a @ b)[0] for _ in range(3))
    return 2 * n**3 / seconds / 1e9


def useful_flops(model, n_tokens: int) -> float:
    """Products one detached Jacobian of the last position's output needs, in FLOPs.

    Per output row and layer: the input gradients of V, O, and the MLP's up and down
    projections (Q, K and a gated MLP's gate projection carry no gradient once the pattern
    and the gate are frozen). In the last layer O and the MLP are needed at the target
    position only; the baseline computes them at every position (on the d512 model this sum
    with the last layer whole is 257.7 GFLOP; torch.profiler counts 259.0 GFLOP of aten::mm).
    """
    cfg = model.cfg
    d_kv = (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head
    value = 2 * cfg.d_model * d_kv
    after_attention = 2 * (cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.d_mlp)
    per_row = cfg.n_layers * n_tokens * value + ((cfg.n_layers - 1) * n_tokens + 1) * after_attention
    return per_row * cfg.d_model


def llama(d_model, layers=8, n_ctx=512):
    return toy_model("llama", d_model=d_model, n_layers=layers, n_heads=8, d_mlp=3 * d_model, n_ctx=n_ctx, dtype=torch.float32)


def tokens_for(model, n):
    return torch.randint(3, min(model.cfg.d_vocab, 5000), (1, n), generator=torch.Generator().manual_seed(n))


def gib(b):
    return f"{b / 2**30:.2f}"


def dense_table(model, label, n_tokens):
    tokens = tokens_for(model, n_tokens)
    print(f"\n### Dense detached Jacobian: {label}, {n_tokens} tokens, last position, final-norm output\n")
    print("| dtype | matmul GFLOP/s | method | s | peak GiB | ratio vs autograd.jacobian | useful GFLOP/s | % of matmul |")
    print("|---|---|---|---|---|---|---|---|")
    flops = useful_flops(model, n_tokens)
    for dtype in (torch.float32, torch.float64):
        peak_gflops = matmul_gflops(dtype)
        rows = {}
        with borrowed(model, dtype):
            x = run_to_target(model, tokens, "hook_embed")[0]

            def frozen(x):
                return run_to_target(model, tokens, "ln_final.hook_out", freeze_hooks(model), x[None])[0, -1]

            with torch.enable_grad():
                rows["torch.autograd.functional.jacobian(vectorize=True)"] = measure(
                    lambda: torch.autograd.functional.jacobian(frozen, x, vectorize=True))
                rows["torch.func.jacrev"] = measure(lambda: torch.func.jacrev(frozen)(x))
            # Also on the model already cast: the cast is a one-off either route would pay.
            rows["tl_linmap.linear_map"] = measure(lambda: tl_linmap.linear_map(model, tokens, dtype=dtype))
        baseline = rows["torch.autograd.functional.jacobian(vectorize=True)"][0]
        reference = rows["torch.autograd.functional.jacobian(vectorize=True)"][2].permute(1, 0, 2)
        assert torch.allclose(rows["tl_linmap.linear_map"][2].operators, reference, atol=1e-4 if dtype == torch.float32 else 1e-12)
        for method, (seconds, peak, _) in rows.items():
            achieved = flops / seconds / 1e9
            print(f"| {str(dtype)[6:]} | {peak_gflops:.0f} | {method} | {seconds:.2f} | {gib(peak)} | "
                  f"{baseline / seconds:.2f} | {achieved:.0f} | {100 * achieved / peak_gflops:.0f}% |")


def contributions_table(model, label, lengths, dense_up_to=256):
    print(f"\n### Per-token contributions, float64: {label}\n")
    print("| tokens | Jacobian route s | peak GiB | forward route s | peak GiB | speed-up | max rel diff |")
    print("|---|---|---|---|---|---|---|")
    for n in lengths:
        tokens = tokens_for(model, n)
        t_fast, m_fast, fast = measure(lambda: tl_linmap.token_contributions(model, tokens))
        if n > dense_up_to:  # the dense route would take many minutes here: forward route only
            print(f"| {n} | - | - | {t_fast:.2f} | {gib(m_fast)} | - | reconstruction {fast.relative_error():.1e} |")
            continue
        t_dense, m_dense, lm = measure(lambda: tl_linmap.linear_map(model, tokens))
        diff = float((fast.contributions() - lm.contributions()).norm() / lm.output.norm())
        print(f"| {n} | {t_dense:.2f} | {gib(m_dense)} | {t_fast:.2f} | {gib(m_fast)} | {t_dense / t_fast:.1f} | {diff:.1e} |")


def svd_table(models, n_tokens, k=8):
    print(f"\n### Top-{k} singular triplets of the last token's operator, float64, {n_tokens} tokens\n")
    print("| model | d_model | dense: Jacobian + SVD s | matrix-free s | speed-up | max rel error of σ |")
    print("|---|---|---|---|---|---|")
    for label, model in models:
        tokens = tokens_for(model, n_tokens)

        def dense():
            return torch.linalg.svdvals(tl_linmap.linear_map(model, tokens).operators[-1])[:k]

        def free():
            with tl_linmap.matrix_free(model, tokens) as mf:
                return mf.svd(-1, k=k, max_iter=200).values[0]

        t_dense, _, values = measure(dense)
        t_free, _, approx = measure(free)
        error = float(((approx - values).abs() / values).max())
        print(f"| {label} | {model.cfg.d_model} | {t_dense:.2f} | {t_free:.2f} | {t_dense / t_free:.1f} | {error:.1e} |")


def scaling_table(lengths, widths):
    print("\n### Scaling of the dense Jacobian (float32, 8 layers, final-norm output)\n")
    print("| d_model | tokens | s | peak GiB | useful GFLOP/s |")
    print("|---|---|---|---|---|")
    for d in widths:
        model = llama(d)
        for n in lengths:
            seconds, peak, _ = measure(lambda: tl_linmap.linear_map(model, tokens_for(model, n), dtype=torch.float32))
            print(f"| {d} | {n} | {seconds:.2f} | {gib(peak)} | {useful_flops(model, n) / seconds / 1e9:.0f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = llama(256 if args.quick else 512)
    label = f"random Llama-like, d_model {base.cfg.d_model}, MLP {base.cfg.d_mlp}, 8 layers, 8 heads"
    dense_table(base, label, 16)
    contributions_table(base, label, [16] if args.quick else [16, 64])
    smollm2 = tl_linmap.load_model("smollm2")
    dense_table(smollm2, "SmolLM2-135M", 16)
    contributions_table(smollm2, "SmolLM2-135M", [16] if args.quick else [16, 64, 256], dense_up_to=64)
    widths = [128, 256] if args.quick else [256, 512, 1024]
    svd_table([("SmolLM2-135M", smollm2)] + [(f"random Llama-like d{d}", llama(d)) for d in widths], 16)
    scaling_table([8, 32] if args.quick else [8, 32, 128, 256], [256] if args.quick else [256, 512])


if __name__ == "__main__":
    main()
