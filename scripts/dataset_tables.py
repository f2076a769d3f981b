"""The corpus analysis of the bundled phrases on real models, as markdown tables (README).

Usage: python scripts/dataset_tables.py [--model smollm2 gemma3-270m] [--layers 0,15,29]
       [--dtype float32] [--limit N] [--out benchmarks/results/dataset-DATE.md] [--resume DIR]

For each model: the dimensionality of the residual stream's operators per layer and token role
(median and quartiles over the prompts), the tokens each layer's stacked operator writes most
often, and the averaged attribution profile of the predicted token's logit. Appends one section
per model to ``--out`` as soon as that model is done.

A hundred phrases take hours on two cores (each prompt's maps are compute-bound: d_model backward
rows through every layer mapped), so ``--resume DIR`` keeps each model's per-prompt summaries in
``DIR`` after every few prompts, with the seconds spent; run the same command again after an
interruption and it carries on where it stopped, the tables covering every prompt as one run.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import shlex
import sys
import time
import warnings

import torch

import tl_linmap
from tl_linmap.methods.corpus import PROMPTS_PER_CALL, corpus_analysis
from tl_linmap.results.corpus import CorpusAnalysis
from tl_linmap.load.datasets import phrases

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _layers(text: str | None, n_layers: int) -> list[int]:
    # "last" or a comma list; negative indices count from the end.
    if text is None:
        return list(range(n_layers))
    return [int(x) % n_layers if x != "last" else n_layers - 1 for x in text.split(",")]


def _spread(row, measure: str, digits: int = 1) -> str:
    # Ranks are integers, their quartiles halves at most: no trailing ".0".
    q1, median, q3 = (f"{getattr(row, f'{measure}_{s}'):.{digits}f}".removesuffix(".0") for s in ("q1", "median", "q3"))
    return f"{median} ({q1}-{q3})"


def _cell(token: str) -> str:
    # A token inside a markdown table: quoted so its spaces show, pipes escaped.
    return repr(token).replace("|", "\\|")


def markdown(analysis, name: str, cfg, dtype: torch.dtype, seconds: float, n_tokens: list[int]) -> str:
    """One model's section: its three tables as markdown.

    Args:
        analysis: The model's `tl_linmap.results.corpus.CorpusAnalysis`.
        name: The model's name.
        cfg: Its config (``d_model``, ``n_layers``).
        dtype: The working dtype.
        seconds: Wall time of the analysis.
        n_tokens: Tokens per prompt.

    Returns:
        Markdown text.
    """
    lines = [
        f"### {name} (d_model {cfg.d_model}, {cfg.n_layers} layers)",
        "",
        f"{len(analysis.summaries)} phrases ({min(n_tokens)}-{max(n_tokens)} tokens, median "
        f"{sorted(n_tokens)[len(n_tokens) // 2]}), {str(dtype).removeprefix('torch.')}, "
        f"`hook_resid_post` at the last position, {seconds / 60:.1f} min "
        f"({seconds / len(n_tokens):.1f} s per phrase).",
        "",
        "Ranks: median (first-third quartile) over the operators of each role.",
        "",
        "| layer | role | operators | 90% energy rank | 99% energy rank | stable rank |",
        "|---|---|---|---|---|---|",
    ]
    for row in analysis.dimensionality():
        layer = row.target.split(".")[1]
        lines.append(f"| {layer} | {row.role} | {row.operators} | {_spread(row, 'rank90')} | {_spread(row, 'rank99')} | {_spread(row, 'stable', 2)} |")
    lines += ["", f"Tokens written by the top {analysis.k} left singular vectors of each stacked operator "
              f"(first token out; top {analysis.top} tokens each), share of phrases:", "",
              "| layer | most frequent tokens |", "|---|---|"]
    for row in analysis.concepts(8):
        tokens = ", ".join(f"{_cell(t)} {share:.0%}" for t, share in row.tokens)
        lines.append(f"| {row.target.split('.')[1]} | {tokens} |")
    lines += ["", "Attribution of each phrase's predicted next token's logit (shares of Σ|terms|, averaged):", "",
              "| segment | tokens | mean share per token | mean share of the segment |", "|---|---|---|---|"]
    for row in analysis.attribution_profile():
        lines.append(f"| {row.segment} | {row.tokens} | {row.mean_share:+.3f} | {row.total_share:+.3f} |")
    return "\n".join(lines) + "\n"


def resumable_analysis(model, name: str, prompts: list[str], layers: list[int], dtype: torch.dtype, resume: pathlib.Path | None) -> tuple[CorpusAnalysis, float]:
    """`corpus_analysis` of ``prompts``, a few prompts at a time, saved to ``resume`` after each step.

    Args:
        model: The model.
        name: Its name (names the checkpoint).
        prompts: The phrases.
        layers: Layers analysed.
        dtype: Working dtype.
        resume: Checkpoint folder (None: one call, nothing saved).

    Returns:
        The analysis of every prompt, and the seconds spent on it over all runs.
    """
    if resume is None:
        start = time.perf_counter()
        return corpus_analysis(model, prompts, layers=layers, dtype=dtype), time.perf_counter() - start
    key = dict(model=name, layers=layers, dtype=str(dtype), prompts=prompts)
    path = resume / f"{name}-{dtype}-{'_'.join(map(str, layers))}.pt"
    saved = torch.load(path, weights_only=False) if path.exists() else None
    if saved is not None and saved["key"] != key:
        raise SystemExit(f"{path} holds a run with other settings; remove it or give another --resume folder.")
    analysis, seconds = (saved["analysis"], saved["seconds"]) if saved else (None, 0.0)
    done = len(analysis.summaries) if analysis else 0
    print(f"{name}: {done} of {len(prompts)} phrases done ({seconds / 60:.1f} min)", flush=True)
    for at in range(done, len(prompts), PROMPTS_PER_CALL):
        start = time.perf_counter()
        part = corpus_analysis(model, prompts[at : at + PROMPTS_PER_CALL], layers=layers, dtype=dtype)
        seconds += time.perf_counter() - start
        if analysis is None:
            analysis = part
        else:
            analysis.summaries += part.summaries
        resume.mkdir(parents=True, exist_ok=True)
        torch.save(dict(key=key, analysis=analysis, seconds=seconds), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # a run killed mid-save leaves the last checkpoint whole
        print(f"{name}: {len(analysis.summaries)} of {len(prompts)} phrases ({seconds / 60:.1f} min)", flush=True)
    return analysis, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["smollm2", "gemma3-270m"])
    parser.add_argument("--layers", help="comma list of layers (negative: from the end; default: all)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--limit", type=int, help="only the first N phrases of each kind")
    parser.add_argument("--resume", type=pathlib.Path, help="checkpoint folder: keep progress there, carry on from it")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / f"dataset-{datetime.date.today()}.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    dtype = getattr(torch, args.dtype)
    prompts = phrases()
    if args.limit:
        prompts = [p for kind in tl_linmap.datasets.phrase_kinds() for p in phrases(kind)[: args.limit]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:  # "x": one header, also when one process per model writes the same file
        with args.out.open("x") as out:
            out.write(f"# Corpus analysis of the bundled phrases ({datetime.date.today()})\n\n")
    except FileExistsError:
        pass
    for name in args.model:
        model = tl_linmap.load_model(name)
        n_tokens = [model.to_tokens(p).shape[1] for p in prompts]
        analysis, seconds = resumable_analysis(model, name, prompts, _layers(args.layers, model.cfg.n_layers), dtype, args.resume)
        text = markdown(analysis, name, model.cfg, dtype, seconds, n_tokens)
        text += f"\n`python scripts/dataset_tables.py {shlex.join(sys.argv[1:])}`\n"
        print(text, flush=True)
        with args.out.open("a") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
