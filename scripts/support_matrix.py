"""Generate the support matrix: every decoder-only text architecture TransformerLens's bridge boots.

For each, a tiny random-weight model is booted (`tl_linmap.load.toy.toy_model`) and either mapped
(float64 and float32 error of the output map, against its own forward) or refused, with
tl_linmap's reason. Writes `tl_linmap/support_matrix.json` (read by the tests) and the table of the
documentation's Supported architectures page (`docs/support.md`) between its SUPPORT-MATRIX markers.

    python scripts/support_matrix.py                        # every architecture: about 25 min on 2 cores
    python scripts/support_matrix.py --only XGLMForCausalLM  # recompute these rows, keep the others
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import re
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = {"LlamaForCausalLM": "SmolLM2-135M", "Gemma3ForCausalLM": "Gemma 3 270M", "GPT2LMHeadModel": "", "Qwen3ForCausalLM": ""}
PROMPT = "The cat sat on the mat, and then"


def decoder_only_text() -> list[str]:
    """TransformerLens bridge architectures that are Hugging Face causal language models of text."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    # Multimodal wrappers and BERT used as a decoder are not decoder-only text models.
    return sorted(a for a in SUPPORTED_ARCHITECTURES if a in causal and "ConditionalGeneration" not in a and a != "BertLMHeadModel")


def _frozen_parts(rules) -> str:
    parts = []
    for rule in rules:
        names = rule.hook_names() if hasattr(rule, "names") else [post for _, post in rule.hook_names()]
        where = sorted({re.sub(r"blocks\.\d+\.", "", n).replace(".hook_scale", "").replace(".hook_out", "") for n in names})
        parts.append(f"{rule.kind}: {', '.join(where)}")
    return "; ".join(parts)


def examine(architecture: str) -> dict:
    """Boot a tiny model of one architecture and map it, or record why not."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    import tl_linmap
    from tl_linmap.base.errors import UnsupportedArchitectureError
    from tl_linmap.freeze.architectures import rules_for
    from tl_linmap.load.toy import MORE_FAMILIES, toy_model

    family = next((f for f, (_, arch, _) in MORE_FAMILIES.items() if arch == architecture), None)
    family = family or {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                        "Gemma3ForCausalLM": "gemma3", "GPT2LMHeadModel": "gpt2", "GPTNeoXForCausalLM": "pythia"}.get(architecture, architecture)
    row = {"architecture": architecture, "real_model": REAL.get(architecture, "")}
    try:
        model = toy_model(family)
    except Exception as error:  # noqa: BLE001 - any failure to build is the row's finding
        return {**row, "status": "refused", "reason": f"a tiny config does not boot: {type(error).__name__}: {str(error)[:160]}"}
    try:
        rules = rules_for(model)
        errors = {}
        for dtype in (torch.float64, torch.float32):
            subject = model if dtype == torch.float64 else toy_model(family)
            errors[str(dtype).split(".")[-1]] = tl_linmap.linear_map(subject, PROMPT, dtype=dtype).relative_error()
    except UnsupportedArchitectureError as error:
        return {**row, "status": "refused", "reason": str(error).removeprefix(f"{architecture}: ")}
    except Exception as error:  # noqa: BLE001
        return {**row, "status": "refused", "reason": f"{type(error).__name__}: {str(error)[:160]}"}
    return {**row, "status": "supported", "frozen": _frozen_parts(rules), **errors}


def markdown(rows: list[dict]) -> str:
    supported = [r for r in rows if r["status"] == "supported"]
    refused = [r for r in rows if r["status"] != "supported"]
    lines = ["| architecture | frozen | float64 | float32 | real model checked |", "|---|---|---|---|---|"]
    lines += [f"| {r['architecture']} | {r['frozen']} | {r['float64']:.1e} | {r['float32']:.1e} | {r['real_model'] or 'no'} |" for r in supported]
    lines += ["", f"Refused ({len(refused)}), each with tl_linmap's reason:", "", "| architecture | why |", "|---|---|"]
    lines += [f"| {r['architecture']} | {r['reason'].replace('|', '/')} |" for r in refused]
    return "\n".join(lines)


def merged(kept: list[dict], fresh: list[dict]) -> list[dict]:
    """The matrix's rows with some recomputed: ``fresh`` replaces ``kept``'s row of the same architecture.

    Args:
        kept: The rows of the existing matrix.
        fresh: Rows just examined.

    Returns:
        Every architecture's row, sorted by architecture.
    """
    rows = {row["architecture"]: row for row in kept}
    rows.update({row["architecture"]: row for row in fresh})
    return [rows[architecture] for architecture in sorted(rows)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ARCH", help="recompute only these rows; the others stay as the JSON has them")
    only = parser.parse_args(argv).only
    unknown = sorted(set(only or ()) - set(decoder_only_text()))
    if unknown:
        parser.error(f"not an architecture TransformerLens boots as a decoder-only text model: {unknown}")
    matrix = ROOT / "tl_linmap" / "support_matrix.json"
    with multiprocessing.get_context("spawn").Pool(2, maxtasksperchild=1) as pool:
        rows = []
        for row in pool.imap(examine, only or decoder_only_text()):
            print(f"{row['architecture']:36s} {row['status']}: {row.get('float64', row.get('reason', ''))}", flush=True)
            rows.append(row)
    if only:
        rows = merged(json.loads(matrix.read_text()), rows)
    matrix.write_text(json.dumps(rows, indent=1) + "\n")
    page = ROOT / "docs" / "support.md"
    text = page.read_text()
    begin, end = "<!-- SUPPORT-MATRIX -->", "<!-- /SUPPORT-MATRIX -->"
    if begin in text:
        head, rest = text.split(begin)
        text = head + begin + "\n" + markdown(rows) + "\n" + end + rest.split(end)[1]
        page.write_text(text)


if __name__ == "__main__":
    main()
