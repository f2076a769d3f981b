"""The base layer: errors, TransformerLens versions, borrowing the model, memory budgets, exactness,
argument checks, the hook-point vocabulary, prompts, tables. Imports nothing else of tl_linmap."""
