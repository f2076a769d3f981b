"""Sparse autoencoders shipped with tl_linmap (or saved in SAELens' layout) as `tl_linmap.Dictionary` objects.

A folder holds ``sae_weights.safetensors`` (``W_enc (d_in, d_sae)``, ``b_enc``, ``W_dec (d_sae, d_in)``,
``b_dec``, and ``threshold`` for a JumpReLU) and ``cfg.json`` (``architecture``, ``hook_name``, ``k``,
``apply_b_dec_to_input``, ...): SAELens' own layout, so no SAELens install is needed to read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tl_linmap.base.errors import InputError
from tl_linmap.freeze.dictionary import Dictionary

#: The SAEs in the package, by name: trained by ``scripts/train_sae.py`` (see its ``stats.json``).
SAE_DIR = Path(__file__).parent / "saes"


#: SAELens architecture names and the activation each computes (transcoders: a ``hook_name_out`` in the cfg).
ARCHITECTURES = {
    "standard": "relu", "jumprelu": "jumprelu", "topk": "topk", "abstopk": "abstopk",
    "transcoder": "relu", "skip_transcoder": "relu", "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu",
}


def bundled_saes() -> list[str]:
    """The names of the SAEs shipped with tl_linmap.

    Returns:
        Folder names under `SAE_DIR`.
    """
    return sorted(p.name for p in SAE_DIR.iterdir() if (p / "cfg.json").exists()) if SAE_DIR.exists() else []


def _folder(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if (path / "cfg.json").exists():
        return path
    if (SAE_DIR / str(name_or_path) / "cfg.json").exists():
        return SAE_DIR / str(name_or_path)
    raise InputError(
        f"No SAE {str(name_or_path)!r}: give a folder with cfg.json and sae_weights.safetensors, or one of the "
        f"bundled SAEs: {', '.join(bundled_saes()) or 'none'}."
    )


def sae_stats(name_or_path: str | Path) -> dict:
    """What was measured of an SAE when it was trained (``stats.json``: explained variance, mean L0, ...).

    Args:
        name_or_path: A bundled SAE's name or a folder.

    Returns:
        The stats (empty where the folder has none).
    """
    stats = _folder(name_or_path) / "stats.json"
    return json.loads(stats.read_text()) if stats.exists() else {}


def load_sae(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32) -> Dictionary:
    """An SAE in SAELens' saved layout, as a `tl_linmap.Dictionary` to splice in (`tl_linmap.spliced`).

    Args:
        name_or_path: A bundled SAE's name (`bundled_saes`, e.g. ``"smollm2-resid15"``) or a folder.
        dtype: The weights' dtype (the bundled ones are stored in float16).

    Returns:
        The dictionary, reading and writing the cfg's ``hook_name``.

    Raises:
        InputError: for an unknown name or an architecture this loader does not read.
    """
    folder = _folder(name_or_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    architecture = cfg.get("architecture", "standard")
    if architecture not in ARCHITECTURES:
        raise InputError(f"{folder}: architecture {architecture!r}; this loader reads {', '.join(ARCHITECTURES)}.")
    if cfg.get("normalize_activations", "none") not in ("none", None) or cfg.get("rescale_acts_by_decoder_norm"):
        raise InputError(
            f"{folder}: normalize_activations={cfg.get('normalize_activations')!r}, rescale_acts_by_decoder_norm="
            f"{cfg.get('rescale_acts_by_decoder_norm', False)!r}: fold them into the weights first (SAELens: "
            "fold_activation_norm_scaling_factor, fold_W_dec_norm), so that the features are a mask times a linear map."
        )
    weights = {k: v.to(dtype) for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    metadata = cfg.get("metadata", {})
    hook = cfg.get("hook_name") or metadata.get("hook_name")
    hook_out = cfg.get("hook_name_out") or metadata.get("hook_name_out") or hook
    return Dictionary(
        W_enc=weights["W_enc"], b_enc=weights["b_enc"], W_dec=weights["W_dec"], b_dec=weights["b_dec"], threshold=weights.get("threshold"),
        W_skip=weights.get("W_skip"), hook_in=hook, hook_out=hook_out, activation=ARCHITECTURES[architecture], k=cfg.get("k"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)), name=f"{folder.name} @ {hook_out}",
    )
