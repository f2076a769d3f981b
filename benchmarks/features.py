"""Feature contributions: tl_linmap.feature_contributions against the same numbers by hand-written autograd.

SmolLM2-135M with the SAE of scripts/train_sae.py spliced in (or a random one, --random-sae), a 16-token
prompt, the logit of the model's top next token as target. The baseline is what a user would write with
TransformerLens hooks: the model's factors frozen (tl_linmap.freeze_hooks), the SAE spliced by hand with
its activations and error as leaves, one backward, activation times gradient. Same process, same model in
float64; ratio > 1 means tl_linmap is faster. One run each (after a warm-up of both).
Usage: python benchmarks/features.py [--tokens 16] [--random-sae]
"""

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import tl_linmap  # noqa: E402
from tl_linmap.base.guard import borrowed  # noqa: E402
from tl_linmap.freeze.capture import run_to_target  # noqa: E402
from tl_linmap.freeze.hooks import freeze_hooks  # noqa: E402

TEXT = "The Eiffel Tower is in the city of Paris, and the Colosseum is in the city of Rome. The Louvre is in"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def by_hand(model, tokens, sae, token):
    """Every active feature's contribution to one logit, with hooks written here (model already float64)."""
    w = {k: getattr(sae, k).to(torch.float64) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    live = {}

    def take(act, hook=None):
        live["x"] = act

    def splice(act, hook=None):
        x = live.pop("x")
        pre = (x - w["b_dec"] * sae.apply_b_dec_to_input) @ w["W_enc"] + w["b_enc"]
        mask = sae.mask(x, pre).detach()
        live["acts"] = acts = (pre * mask).detach().requires_grad_(True)
        recons = acts @ w["W_dec"] + w["b_dec"]
        live["error"] = error = (act - recons).detach().requires_grad_(True)
        return recons + error

    with torch.enable_grad():
        embeddings = run_to_target(model, tokens, "hook_embed").detach().requires_grad_(True)
        hooks = freeze_hooks(model) + [(sae.hook_in, take), (sae.hook_out, splice)]
        final = run_to_target(model, tokens, "ln_final.hook_out", hooks, embeddings)
        logit = final[0, -1] @ model.W_U[:, token] + (model.b_U[token] if getattr(model, "b_U", None) is not None else 0)
        logit.backward()
    acts = live["acts"]
    return (acts.grad * acts)[acts != 0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--random-sae", action="store_true")
    args = parser.parse_args()
    model = tl_linmap.load_model("smollm2")
    tokens = model.to_tokens(TEXT)[:, : args.tokens]
    if args.random_sae:
        g = torch.Generator().manual_seed(0)
        d, n = model.cfg.d_model, 4096
        sae = tl_linmap.Dictionary(torch.randn(d, n, generator=g) / d**0.5, torch.zeros(n), torch.randn(n, d, generator=g) / n**0.5,
                                   torch.zeros(d), hook_in="blocks.15.hook_resid_post", activation="topk", k=32)
    else:
        sae = tl_linmap.load_sae("smollm2-resid15")
    token = int(model(tokens)[0, -1].argmax())
    print(f"SmolLM2-135M, {tokens.shape[1]} tokens, SAE {sae.name} ({sae.activation}, d_sae {sae.d_sae}), target logit "
          f"{model.to_string([token])!r}, torch threads {torch.get_num_threads()}")

    def ours():
        return tl_linmap.feature_contributions(model, tokens, target=tl_linmap.Logit(token), dictionaries=[sae])

    def reference():
        with borrowed(model, torch.float64):
            return by_hand(model, tokens, sae, token)

    ours(), reference()  # warm-up
    t_ref, values = timed(reference)
    t_ours, result = timed(ours)
    diff = (result.values[:, 0] - values).abs().max().item()  # both in (position, feature) order
    print("| route | s | active features | ratio (autograd / tl_linmap) | max abs diff |")
    print("|---|---|---|---|---|")
    print(f"| autograd by hand (frozen model, SAE leaves) | {t_ref:.2f} | {len(values)} | | |")
    print(f"| tl_linmap.feature_contributions (checked exact, errors, tokens, constant) | {t_ours:.2f} | {len(result.features)} | "
          f"{t_ref / t_ours:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
