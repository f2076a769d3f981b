"""The demo and command line, on a toy model saved to disk (the bundled one runs in CI's demo step)."""

import re

import transformers

from tl_linmap.__main__ import main
from tl_linmap.load.toy import toy_tokenizer


def test_cli_demo_prints_exact_errors_and_predictions(tmp_path, capsys):
    tokenizer = toy_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, architectures=["LlamaForCausalLM"],
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    main(["demo", "Hello there", "--model", str(tmp_path), "--top", "3"])
    out = capsys.readouterr().out
    float64, float32 = map(float, re.search(r"float64: (\S+)\s+float32: (\S+)", out).groups())
    assert float64 < 1e-12 and float32 < 1e-4
    model_top = re.search(r"model \(probability\):\s+('.*?')", out).group(1)
    recon_top = re.search(r"reconstruction \(logit\):\s+('.*?')", out).group(1)
    assert model_top == recon_top
    assert out.count("sigma_") == 3
