"""Freezing a model into its detached linear system: the rule types, a model's rules (from its
structure or config, mixtures of experts included), the hook lists that freeze and replay factors,
one captured pass, and `FrozenSystem`, the frozen system of one inference."""
