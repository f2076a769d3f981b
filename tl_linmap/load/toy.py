"""Toy models: random-weight bridges of every supported family, built offline.

Each is a real Hugging Face model class booted through ``TransformerBridge.boot_transformers``,
so the real architecture adapters run; only the weights are random and the sizes tiny.
Used by the tests and benchmarks, and handy for trying tl_linmap without a download.
"""

from __future__ import annotations

import functools
import tempfile

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tl_linmap.freeze.system import is_bias_name

_MLA = dict(q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=8, v_head_dim=16)


#: Family name -> (HF config class, HF model class, architecture name).
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
    "pythia": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM),
}


#: More families, each a Hugging Face architecture with a tiny config made from its defaults
#: (`transformers.AutoConfig.for_model`) and these settings: family -> (model type, architecture, settings).
#: The settings give each family what distinguishes it (biases, partial rotary, softcapping, ...).
MORE_FAMILIES: dict[str, tuple[str, str, dict]] = {
    "mistral": ("mistral", "MistralForCausalLM", dict(sliding_window=4)),
    "ministral": ("ministral3", "Ministral3ForCausalLM", dict(sliding_window=4)),
    "gemma": ("gemma", "GemmaForCausalLM", {}),
    "gemma2": ("gemma2", "Gemma2ForCausalLM", dict(sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "olmo": ("olmo", "OlmoForCausalLM", dict(clip_qkv=None)),
    "olmo2": ("olmo2", "Olmo2ForCausalLM", {}),
    "olmo3": ("olmo3", "Olmo3ForCausalLM", dict(sliding_window=4)),
    "phi": ("phi", "PhiForCausalLM", dict(partial_rotary_factor=0.5)),
    "phi3": ("phi3", "Phi3ForCausalLM", {}),
    "stablelm": ("stablelm", "StableLmForCausalLM", dict(partial_rotary_factor=0.25, use_qkv_bias=True)),
    "gptj": ("gptj", "GPTJForCausalLM", dict(rotary_dim=8)),
    "gpt_neo": ("gpt_neo", "GPTNeoForCausalLM", dict(attention_types=[[["global", "local"], 1]], window_size=4)),
    "opt": ("opt", "OPTForCausalLM", dict(word_embed_proj_dim=64)),
    "bloom": ("bloom", "BloomForCausalLM", {}),
    "falcon": ("falcon", "FalconForCausalLM", dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=True)),
    "cohere": ("cohere", "CohereForCausalLM", dict(logit_scale=0.5, use_qk_norm=False)),
    "granite": ("granite", "GraniteForCausalLM", dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=4.0)),
    "starcoder2": ("starcoder2", "Starcoder2ForCausalLM", dict(use_bias=True, sliding_window=4)),
    "gpt_bigcode": ("gpt_bigcode", "GPTBigCodeForCausalLM", dict(multi_query=True)),
    "codegen": ("codegen", "CodeGenForCausalLM", dict(rotary_dim=8)),
    "smollm3": ("smollm3", "SmolLM3ForCausalLM", dict(no_rope_layers=[1, 0])),
    "apertus": ("apertus", "ApertusForCausalLM", {}),  # xIELU activation, q/k norms
    "arcee": ("arcee", "ArceeForCausalLM", {}),  # relu² activation
    "cohere2": ("cohere2", "Cohere2ForCausalLM", dict(sliding_window=4)),
    "ernie4_5": ("ernie4_5", "Ernie4_5ForCausalLM", {}),
    "exaone4": ("exaone4", "Exaone4ForCausalLM", dict(sliding_window=4)),
    "glm": ("glm", "GlmForCausalLM", {}),
    "glm4": ("glm4", "Glm4ForCausalLM", {}),
    "hunyuan": ("hunyuan_v1_dense", "HunYuanDenseV1ForCausalLM", {}),
    "jais2": ("jais2", "Jais2ForCausalLM", {}),
    "mpt": ("mpt", "MptForCausalLM", {}),  # ALiBi
    "nemotron": ("nemotron", "NemotronForCausalLM", {}),
    "seed_oss": ("seed_oss", "SeedOssForCausalLM", {}),
    "vaultgemma": ("vaultgemma", "VaultGemmaForCausalLM", {}),
    # Mixtures of experts: four experts, two per token, small experts.
    "mixtral": ("mixtral", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "olmoe": ("olmoe", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=True)),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
    "minimax_m2": ("minimax_m2", "MiniMaxM2ForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    # Structurally refused: LFM2 with its input-gated convolution layers beside attention.
    "lfm2": ("lfm2", "Lfm2ForCausalLM", dict(layer_types=["conv", "full_attention"])),
    "gpt_oss": ("gpt_oss", "GptOssForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=4)),
    # Multi-head latent attention (MLA): low-rank query and key/value latents, each RMS-normed; the
    # rotary part of the head (qk_rope_head_dim) is the config's head_dim, which the sizes above set.
    "youtu": ("youtu", "YoutuForCausalLM", dict(_MLA)),
    "glm4_moe_lite": ("glm4_moe_lite", "Glm4MoeLiteForCausalLM", dict(_MLA)),  # block 0 dense, block 1 routed
    "deepseek_v3": ("deepseek_v3", "DeepseekV3ForCausalLM", dict(_MLA, first_k_dense_replace=1, n_group=2, topk_group=1)),
    "granite_moe": ("granitemoe", "GraniteMoeForCausalLM", {}),
    "modernbert_decoder": ("modernbert-decoder", "ModernBertDecoderForCausalLM", {}),
    "openai_gpt": ("openai-gpt", "OpenAIGPTLMHeadModel", {}),
    "xglm": ("xglm", "XGLMForCausalLM", {}),
    # Text halves of multimodal families (their own model types), and LFM2's mixture of experts.
    "llama4": ("llama4_text", "Llama4ForCausalLM", dict(interleave_moe_layer_step=2, no_rope_layers=[1, 0])),
    "qwen3_5": ("qwen3_5_text", "Qwen3_5ForCausalLM", dict(layer_types=["linear_attention", "full_attention"])),
    "qwen3_5_moe": ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", dict(layer_types=["linear_attention", "full_attention"])),
    "gemma4": ("gemma4_text", "Gemma4ForCausalLM", {}),
    "lfm2_moe": ("lfm2_moe", "Lfm2MoeForCausalLM", dict(layer_types=["conv", "full_attention"], num_dense_layers=1)),
}


_SPECIAL = ("<bos>", "<eos>", "<unk>")


@functools.cache
def _tokenizer_dir() -> str:
    # Saved to disk because the bridge re-loads the tokenizer by path to force a BOS token.
    vocab = {tok: i for i, tok in enumerate(_SPECIAL)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):  # a set: its order changes from process to process
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )
    path = tempfile.mkdtemp(prefix="tl_linmap_toy_tokenizer_")
    fast.save_pretrained(path)
    return path


def toy_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges) with BOS/EOS.

    Returns:
        A fast tokenizer with a vocabulary of 259 tokens.
    """
    return transformers.AutoTokenizer.from_pretrained(_tokenizer_dir())


def _config(family: str, d_model: int, n_layers: int, n_heads: int, d_mlp: int, n_ctx: int, vocab: int, **overrides):
    config_cls, model_cls = FAMILIES[family]
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "gpt2":
        kwargs = dict(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp, n_positions=n_ctx)
    else:
        kwargs = dict(
            hidden_size=d_model,
            intermediate_size=d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            max_position_embeddings=n_ctx,
        )
    if family in ("llama", "qwen2", "qwen3", "gemma3"):
        kwargs.update(num_key_value_heads=max(1, n_heads // 2), head_dim=d_model // n_heads)  # GQA
    if family == "gemma3":
        # A short window that test prompts cross, on alternating sliding/full layers.
        kinds = ("sliding_attention", "full_attention")
        kwargs.update(sliding_window=4, layer_types=[kinds[i % 2] for i in range(n_layers)])
    if family == "pythia":
        kwargs.update(rotary_pct=0.25)  # partial rotary
    kwargs.update(common, architectures=[model_cls.__name__], **overrides)
    return config_cls(**kwargs), model_cls


def _more_config(family: str, d_model: int, n_layers: int, n_heads: int, d_mlp: int, n_ctx: int, vocab: int, **overrides):
    model_type, architecture, settings = MORE_FAMILIES[family] if family in MORE_FAMILIES else (*_model_type(family), {})
    config = transformers.AutoConfig.for_model(model_type)
    if hasattr(config, "allow_global_per_layer_attribute_access"):  # Gemma 4: the toy's sizes are the same in every layer
        config.allow_global_per_layer_attribute_access = True
    sizes = dict(
        hidden_size=d_model, n_embd=d_model, num_hidden_layers=n_layers, n_layer=n_layers, num_layers=n_layers,
        num_attention_heads=n_heads, n_head=n_heads, num_key_value_heads=max(1, n_heads // 2), head_dim=d_model // n_heads,
        intermediate_size=d_mlp, ffn_dim=d_mlp, n_inner=d_mlp, max_position_embeddings=n_ctx, n_positions=n_ctx, n_ctx=n_ctx,
        vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False,
        num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, n_shared_experts=1,
    )
    for key, value in {**sizes, **settings, **overrides}.items():
        if key in sizes and not (hasattr(config, key) or key in getattr(config, "attribute_map", {})):
            continue  # a size this config does not have
        try:
            setattr(config, key, value)
        except AttributeError:  # a size this config derives (Falcon's head_dim)
            continue
    if getattr(config, "layer_types", None) is not None and len(config.layer_types) != n_layers:
        kinds = list(dict.fromkeys(config.layer_types))  # every kind of layer the model has, in order
        config.layer_types = [kinds[i % len(kinds)] for i in range(n_layers)]
    config.architectures = [architecture]
    return config, getattr(transformers, architecture)


def _model_type(architecture: str) -> tuple[str, str]:
    # The model type whose causal-LM class is this architecture (the one named like it, if several).
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = [t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls == architecture]
    if not types:
        raise ValueError(f"{architecture!r} is not a Hugging Face causal language model class.")
    stem = architecture.lower().replace("forcausallm", "").replace("lmheadmodel", "")
    return min(types, key=lambda t: (t.replace("_", "").replace("-", "") != stem, len(t))), architecture


def toy_model(
    family: str = "llama",
    *,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    d_mlp: int = 96,
    n_ctx: int = 64,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    **overrides,
):
    """A TransformerBridge of one family with random weights.

    Args:
        family: One of `FAMILIES` or `MORE_FAMILIES`, or any Hugging Face causal-LM architecture
            name (``"FalconH1ForCausalLM"``: its config's defaults with the tiny sizes).
        d_model: Residual width.
        n_layers: Number of blocks.
        n_heads: Attention heads (key/value heads are half of them where the family has GQA).
        d_mlp: MLP width.
        n_ctx: Context length.
        dtype: Parameter dtype.
        seed: Torch seed for the weights.
        **overrides: Extra Hugging Face config fields.

    Returns:
        A TransformerBridge in eval mode, with the toy tokenizer.
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as error:
        raise ValueError("This TransformerLens has no TransformerBridge (it came in 3.0); use hooked_toy_model.") from error
    if family not in FAMILIES and family not in MORE_FAMILIES and not family[:1].isupper():
        raise ValueError(
            f"Unknown toy family {family!r}; choose from {sorted(FAMILIES) + sorted(MORE_FAMILIES)}, "
            "or give a Hugging Face causal-LM architecture name (its defaults, made tiny)."
        )
    tokenizer = toy_tokenizer()
    make = _config if family in FAMILIES else _more_config
    config, model_cls = make(family, d_model, n_layers, n_heads, d_mlp, n_ctx, len(tokenizer), **overrides)
    torch.manual_seed(seed)
    hf_model = model_cls(config).to(dtype).eval()
    # Random init leaves norm gains at one and biases at zero; perturb both so that
    # neither the norms' weights nor the affine part are trivial.
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias") or name.endswith("_bias"):
                param.add_(0.1 * torch.randn_like(param))
    bridge = TransformerBridge.boot_transformers(model_cls.__name__, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype)
    return bridge.eval()


#: HookedTransformer toy families: ``HookedTransformerConfig`` settings on top of the common sizes.
#: Each covers one kind of norm, MLP, attention or position that `tl_linmap.freeze.architectures.hooked_rules` freezes.
HOOKED_FAMILIES: dict[str, dict] = {
    "gpt2": dict(normalization_type="LN", act_fn="gelu_new", positional_embedding_type="standard"),
    "llama": dict(normalization_type="RMS", act_fn="silu", gated_mlp=True, positional_embedding_type="rotary", n_key_value_heads=2),
    "pythia": dict(normalization_type="LN", act_fn="gelu", parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=4),
    "gemma2": dict(normalization_type="RMS", act_fn="gelu_pytorch_tanh", gated_mlp=True, positional_embedding_type="rotary",
                   use_normalization_before_and_after=True, attn_scores_soft_cap=50.0),
    "qwen3": dict(normalization_type="RMS", act_fn="silu", gated_mlp=True, positional_embedding_type="rotary", use_qk_norm=True),
    "solu": dict(normalization_type="LN", act_fn="solu_ln", positional_embedding_type="standard"),
    "relu_pre": dict(normalization_type="LNPre", act_fn="relu", positional_embedding_type="standard"),  # as after fold_ln
    "rms_pre": dict(normalization_type="RMSPre", act_fn="gelu_fast", positional_embedding_type="rotary"),
    "attn_only": dict(normalization_type="LN", attn_only=True, positional_embedding_type="shortformer"),
    "alibi": dict(normalization_type="LN", act_fn="gelu", positional_embedding_type="alibi"),
}


def hooked_toy_model(
    family: str = "gpt2",
    *,
    d_model: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    d_mlp: int = 48,
    n_ctx: int = 64,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    **overrides,
):
    """A HookedTransformer (TransformerLens 2.x/3.x) of one family with random weights.

    Built from a ``HookedTransformerConfig`` alone (no ``original_architecture``), so the freeze
    rules come from the config. Biases and norm weights are perturbed away from zero and one.

    Args:
        family: One of `HOOKED_FAMILIES`.
        d_model: Residual width.
        n_layers: Number of blocks.
        n_heads: Attention heads.
        d_mlp: MLP width.
        n_ctx: Context length.
        dtype: Parameter dtype.
        seed: Torch seed for the weights.
        **overrides: Extra config fields.

    Returns:
        A HookedTransformer in eval mode, with the toy tokenizer.

    Raises:
        ValueError: for an unknown family, or where the installed TransformerLens has no HookedTransformer.
    """
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as error:
        raise ValueError("This TransformerLens has no HookedTransformer (it is gone in 4.0).") from error
    if family not in HOOKED_FAMILIES:
        raise ValueError(f"Unknown HookedTransformer toy family {family!r}; choose from {sorted(HOOKED_FAMILIES)}.")
    tokenizer = toy_tokenizer()
    settings = {**HOOKED_FAMILIES[family], **overrides}
    cfg = HookedTransformerConfig(
        d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_head=d_model // n_heads, d_mlp=d_mlp, n_ctx=n_ctx,
        d_vocab=len(tokenizer), dtype=dtype, seed=seed, device="cpu", default_prepend_bos=True, **settings,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "w" or is_bias_name(name):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()
