"""A Hugging Face model as a HookedTransformer, where TransformerLens has no hub name for it."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from tl_linmap.base.errors import LinmapError, UnsupportedArchitectureError
from tl_linmap.load.bundled import BUNDLED

# Config fields TransformerLens's converter misses for some Hugging Face configs (GPT-2 with n_inner).
_HF_FIELD_FIXES = {"GPT2LMHeadModel": lambda config: {"d_mlp": config.n_inner or 4 * config.n_embd}}


def _gemma3_sizes(config) -> dict:
    # Gemma 3's TransformerLens config exists only per hub name; take one and put this config's sizes in.
    rope = getattr(config, "rope_parameters", None) or {}
    return dict(
        d_model=config.hidden_size, d_head=config.head_dim, n_heads=config.num_attention_heads,
        n_key_value_heads=config.num_key_value_heads, d_mlp=config.intermediate_size,
        n_layers=config.num_hidden_layers, n_ctx=config.max_position_embeddings, eps=config.rms_norm_eps,
        d_vocab=config.vocab_size, window_size=config.sliding_window,
        attn_types=["local" if kind == "sliding_attention" else "global" for kind in config.layer_types],
        attn_scale=config.query_pre_attn_scalar**0.5,
        rotary_base=rope.get("full_attention", {}).get("rope_theta", getattr(config, "rope_theta", None)),
        rotary_base_local=rope.get("sliding_attention", {}).get("rope_theta", getattr(config, "rope_local_base_freq", None)),
    )


#: Architectures TransformerLens converts only by a hub name: (that name, this config's own sizes).
_HOOKED_TEMPLATES = {"Gemma3ForCausalLM": ("google/gemma-3-270m", _gemma3_sizes)}


def hooked_from_hf(hf_model, tokenizer, *, hub_name: str | None = None, dtype: torch.dtype = torch.float32, device: str | None = None):
    """A HookedTransformer of a Hugging Face model, offline, through TransformerLens's own conversions.

    The config comes from TransformerLens's converter: by hub name where TransformerLens knows
    the model (e.g. ``google/gemma-3-270m``); for an architecture it converts only by hub name
    (Gemma 3), from such a name with this config's sizes put in; else from the model's own config
    saved to a temporary directory (SmolLM2, toy models). The weights are converted by TransformerLens and
    left unprocessed (as `HookedTransformer.from_pretrained_no_processing`).

    Args:
        hf_model: A Hugging Face causal LM.
        tokenizer: Its tokenizer.
        hub_name: The model's hub name, if it has one.
        dtype: Parameter dtype.
        device: Device (default: CPU).

    Returns:
        A HookedTransformer in eval mode.

    Raises:
        UnsupportedArchitectureError: where this TransformerLens cannot convert the architecture.
    """
    import transformer_lens.loading_from_pretrained as tl_loading
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = hf_model.config
    template = _HOOKED_TEMPLATES.get((config.architectures or [None])[0])
    known = hub_name in getattr(tl_loading, "OFFICIAL_MODEL_NAMES", ())
    if template and not known and template[0] not in getattr(tl_loading, "OFFICIAL_MODEL_NAMES", ()):
        template = None  # this TransformerLens does not know the architecture at all
    with tempfile.TemporaryDirectory() as directory:
        source = hub_name if known else template[0] if template else directory
        if source == directory:
            config.save_pretrained(directory)
        try:
            fields = tl_loading.convert_hf_model_config(source)
        except (NotImplementedError, AttributeError, ValueError) as error:
            raise UnsupportedArchitectureError(
                f"This TransformerLens cannot convert a {config.architectures[0]} to a HookedTransformer: {error}"
            ) from error
        fields.update(_HF_FIELD_FIXES.get(fields.get("original_architecture"), lambda c: {})(config))
        if template and not known:
            fields.update({k: v for k, v in template[1](config).items() if v is not None})
        fields.update(dtype=dtype, device=device or "cpu")
        cfg = HookedTransformerConfig(**{k: v for k, v in fields.items() if k in HookedTransformerConfig.__dataclass_fields__})
        flags = [param.requires_grad for param in hf_model.parameters()]
        try:
            state = tl_loading.get_pretrained_state_dict(source, cfg, hf_model, dtype=dtype)
        finally:  # TransformerLens 2.x turns the Hugging Face model's gradients off
            for param, flag in zip(hf_model.parameters(), flags):
                param.requires_grad_(flag)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    return model.to(cfg.device).eval()


def from_pretrained(name_or_path: str, location: str, dtype: torch.dtype, *, gguf_file: str | None = None):
    """(tokenizer, HF model) from a directory or hub name, or a GGUF file in a directory."""
    import transformers

    offline = _offline()
    # local_files_only makes an uncached hub name fail at once instead of retrying the network; a GGUF
    # is local anyway, and its tokenizer would save the flag into the cache entry.
    shared = {"gguf_file": gguf_file} if gguf_file else {"local_files_only": offline}
    # Dense weights even where a GGUF matmul kernel is installed: freeze rules need plain Linear layers.
    # (Transformers before GgufConfig, 4.x beside TransformerLens 2.x, always dequantises.)
    gguf_config = getattr(transformers, "GgufConfig", None)
    dense = {"quantization_config": gguf_config(dequantize=True)} if gguf_file and gguf_config else {}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, **shared)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **shared, **dense)
    except OSError as err:
        hint = f" Offline, use a local directory or .gguf file, or one of {sorted(BUNDLED)}."
        if offline:
            raise LinmapError(
                f"Could not load {name_or_path!r}: offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE) "
                f"and it is not in the Hugging Face cache.{hint}"
            ) from err
        raise LinmapError(f"Could not load {name_or_path!r}: {err}.{hint if not Path(location).exists() else ''}") from err
    return tokenizer, hf_model


def say(message: str) -> None:
    print(f"tl_linmap: {message}", file=sys.stderr, flush=True)


# huggingface_hub's spellings of a true switch.
_TRUE = {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    """Whether Hugging Face offline mode is on, as huggingface_hub saw it at import or the environment says now."""
    import huggingface_hub

    switches = (os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    # huggingface_hub 1.x has is_offline_mode(); 0.x (beside TransformerLens 2.x) only the constant.
    seen = getattr(huggingface_hub, "is_offline_mode", None)
    return (seen() if seen else bool(huggingface_hub.constants.HF_HUB_OFFLINE)) or any(switches)
