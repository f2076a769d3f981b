"""Which expert carried which token's contribution: a mixture-of-experts layer's output split by expert.

With the router and the experts' gates frozen (`tl_linmap.freeze.moe`), a block's MLP output is
the frozen-weighted sum of its experts' outputs, each linear in the embeddings: replaying the
frozen system with one expert's router weights kept splits each token's contribution by expert.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from tl_linmap.base.compat import check_model
from tl_linmap.base.errors import InputError
from tl_linmap.base.prompts import read_prompts
from tl_linmap.freeze.architectures import rules_for
from tl_linmap.freeze.system import frozen_system, one_token_rows
from tl_linmap.results.experts import ExpertContributions


def expert_contributions(
    model, prompt_or_tokens, layer: int, *, target: str = "output", position: int = -1, dtype: torch.dtype | None = torch.float64
) -> ExpertContributions:
    """Split every token's contribution to a target by the expert of one block that carried it.

    Each expert's part is a replay of the frozen system with the block's frozen router weights
    kept for that expert only, minus one with them all zero: one forward of one row per token each.

    Args:
        model: A TransformerBridge of a supported mixture-of-experts architecture.
        prompt_or_tokens: One prompt as text or token ids.
        layer: A block whose MLP is a mixture of experts.
        target: ``"output"`` or a hook name.
        position: Target position (``-1``: the last token).
        dtype: Working dtype (the model comes back bit for bit).

    Returns:
        An `ExpertContributions`.

    Raises:
        InputError: for a block without a router, or a bad prompt, target, position or dtype.
    """
    check_model(model)
    names = [n for rule in rules_for(model) if rule.kind == "router" for n in rule.hook_names()]
    weights = next((n for n in names if n.startswith(f"blocks.{layer}.") and n.endswith(".hook_expert_weights")), None)
    if not isinstance(layer, int) or weights is None:
        routed = sorted({int(n.split(".")[1]) for n in names})
        raise InputError(f"layer={layer!r} is not a block with a mixture-of-experts router; this model's are {routed}.")
    indices = weights.replace("hook_expert_weights", "hook_expert_indices")
    prompt = read_prompts(model, prompt_or_tokens, position=position, several=False)
    with frozen_system(model, prompt, [target], dtype=dtype) as system:
        name, last = system.names[0], system.position
        x = system.x[0].detach()
        rows = one_token_rows(x, range(last + 1))
        experts = tuple(torch.unique(system.factors[indices][: last + 1]).tolist())  # rows are the prompt's tokens
        recorded = system.factors[weights]

        def through(keep: list[int]) -> Tensor:
            mask = torch.zeros(recorded.shape[-1], dtype=recorded.dtype, device=recorded.device)
            mask[keep] = 1
            masked = dataclasses.replace(system, factors={**system.factors, weights: recorded * mask}, biases=None)
            return masked.push(rows)[0][name]

        with torch.no_grad():
            none = through([])
            values = torch.stack([through([e]) - none for e in experts])
            total = system.push(rows)[0][name]
        return ExpertContributions(
            values=_padded(values, len(x)), rest=_padded(total - values.sum(0), len(x)), experts=experts, layer=layer,
            target=name, position=last, tokens=system.tokens[0], model=model,
        )


def _padded(values: Tensor, n: int) -> Tensor:
    # Tokens after the target contribute nothing: zero rows up to the prompt's length.
    return torch.cat([values, values.new_zeros(*values.shape[:-2], n - values.shape[-2], values.shape[-1])], dim=-2)
