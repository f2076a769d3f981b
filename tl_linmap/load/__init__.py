"""Getting models and data: `load_model` (hub names, local directories, GGUF files, bundled models),
the converted-model cache, random-weight toy models, the bundled phrases and prompt pairs, SAEs, and
saved results (`saved`: ``tl_linmap.load(path)``, which ``tl_linmap/__init__.py`` makes this package answer)."""
