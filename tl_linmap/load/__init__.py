"""Getting models and data: `load_model` (hub names, local directories, GGUF files, bundled models),
the converted-model cache, random-weight toy models, the bundled phrases and prompt pairs."""
