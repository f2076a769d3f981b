"""Mixture-of-experts layers: the router's choice and weights, and the experts' activations, frozen."""

from __future__ import annotations

from tl_linmap.errors import UnsupportedArchitectureError


def router_rules(model, layers: list[int]) -> list:
    """Rules freezing the mixture-of-experts MLPs of some blocks.

    Args:
        model: A TransformerBridge.
        layers: Blocks whose MLP is a mixture of experts.

    Returns:
        The rules.
    """
    raise UnsupportedArchitectureError(f"{model.cfg.architecture}: mixture-of-experts blocks {layers} are not supported yet.")
