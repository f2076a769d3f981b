"""The hook-point vocabulary: where a model's output is, which hook points live in the residual stream,
how deep a hook point lies."""

from __future__ import annotations

import re

from tl_linmap.base.errors import InputError

#: ``target="output"`` on a TransformerBridge: the final norm's output, the vector the unembedding reads.
OUTPUT_HOOK = "ln_final.hook_out"


#: The same on a HookedTransformer, whose final norm may have no hook after its weight: its last hook
#: (before RMSNorm's weight; LayerNorm's too in TransformerLens 3.x, after it in 2.x;
#: `tl_linmap.freeze.norms.after_output` finds and applies what follows).
HOOKED_OUTPUT_HOOK = "ln_final.hook_normalized"


#: Hook names (by suffix) whose vectors live in the residual stream, where the unembedding reads.
RESIDUAL_HOOKS = (
    "hook_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    OUTPUT_HOOK, HOOKED_OUTPUT_HOOK,
)


EMBED_HOOK = "hook_embed"


def output_hook(model) -> str:
    """The hook point ``target="output"`` names: the last one before the unembedding.

    Args:
        model: A TransformerBridge or HookedTransformer.

    Returns:
        ``ln_final.hook_out`` (bridge), ``ln_final.hook_normalized`` (HookedTransformer), or the
        last block's ``hook_resid_post`` for a model without a final norm.
    """
    for name in (OUTPUT_HOOK, HOOKED_OUTPUT_HOOK):
        if name in model.hook_dict:
            return name
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def independent_target(name: str, source: str = EMBED_HOOK) -> InputError:
    """The error for a target whose value does not depend on the source (the token embeddings by default).

    Args:
        name: Hook name.
        source: The source hook point of the map.

    Returns:
        The `InputError` to raise.
    """
    if source == EMBED_HOOK:
        return InputError(
            f"{name!r} does not depend on the token embeddings (a frozen factor such as a norm scale, or a constant): "
            "map an activation the embeddings flow into, such as 'blocks.0.hook_resid_post' or 'output'."
        )
    return InputError(
        f"{name!r} does not depend on the source {source!r} (it reads only frozen factors, constants, or a branch "
        "the source does not feed, such as a parallel block's MLP): map a hook point after the source that it "
        "flows into, such as the next hook_resid_post or 'output', or pick an earlier source."
    )


#: Source hook points that carry the whole residual stream: nothing after them depends on the tokens
#: except through them (so ``b = 0`` wherever the model adds no constant).
WHOLE_STREAM_SOURCES = (EMBED_HOOK, "hook_resid_pre", "hook_resid_mid", "hook_resid_post")


def target_depth(name: str, n_layers: int) -> int:
    """Blocks a forward pass runs through before a hook point fires.

    Args:
        name: Hook name.
        n_layers: Number of blocks.

    Returns:
        ``L + 1`` inside ``blocks.L``; 0 for the embeddings; ``n_layers`` after the blocks.
    """
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return 0 if name in (EMBED_HOOK, "hook_pos_embed") or name.startswith(("embed.", "pos_embed.")) else n_layers
