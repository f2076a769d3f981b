"""Maps: the exact linear system of one inference, ``y = Σ_i J_i x_i + b``.

`linear_map` runs four passes over one prompt, all through hook points:

1. a reference forward (norms on the same code path as the frozen pass) gives ``output``;
2. a frozen forward with the token embeddings as a leaf records the factors ``A(x)``;
   reverse mode through it, batched over output dimensions, gives the operators ``J_i``;
3. a replay forward with the recorded factors and all embeddings zero gives ``b``;
4. a plain forward gives the model's native value, reported as ``native_gap``.

``b`` comes from its own pass, so ``relative_error()`` is a real check of ``J`` and ``b``
against the model, not an identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_linmap.errors import FreezeError, InputError
from tl_linmap.freezing import Factors, HookList, factor_names, freeze_hooks, quiet_norm_edits, replay_hooks, same_path_hooks
from tl_linmap.guard import borrowed
from tl_linmap.inputs import EMBED_HOOK, Prompt, check_position, resolve_target, to_tokens


@dataclass
class LinearMap:
    """The detached-Jacobian linear system of one target vector of one inference.

    Attributes:
        operators: ``J_i``, one ``d_out x d_in`` block per input token (zero after ``position``).
        inputs: ``x_i``, the token embeddings (output of ``hook_embed``).
        bias: ``b``, everything that does not scale with the token embeddings
            (biases, learned positions), computed through the frozen system.
        output: The model's value of the target (reference forward, true working dtype).
        native_output: The value from a plain forward on the bridge's native norm path
            (HF computes RMSNorm in float32 even in float64 models).
        tokens: The input tokens.
        target: The hook name mapped (flattened after the position axis).
        position: The sequence position of the target.
    """

    operators: Float[Tensor, "pos d_out d_in"]
    inputs: Float[Tensor, "pos d_in"]
    bias: Float[Tensor, " d_out"]
    output: Float[Tensor, " d_out"]
    native_output: Float[Tensor, " d_out"] = field(repr=False)
    tokens: Int[Tensor, " pos"] = field(repr=False)
    target: str = "ln_final.hook_out"
    position: int = -1

    def contributions(self) -> Float[Tensor, "pos d_out"]:
        """Per-token contributions ``J_i x_i``.

        Returns:
            One output-space vector per input token; they sum to ``output - bias``.
        """
        return einops.einsum(self.operators, self.inputs, "pos d_out d_in, pos d_in -> pos d_out")

    def reconstruct(self) -> Float[Tensor, " d_out"]:
        """The linear system's value ``Σ_i J_i x_i + b``.

        Returns:
            The reconstructed target vector.
        """
        return self.contributions().sum(0) + self.bias

    def relative_error(self) -> float:
        """``‖reconstruct() − output‖ / ‖output‖``.

        Returns:
            The relative reconstruction error (below 1e-12 in float64).
        """
        return _relative(self.reconstruct(), self.output)

    def native_gap(self) -> float:
        """``‖output − native_output‖ / ‖output‖``: the bridge's native-path rounding, not an error of the map.

        Returns:
            The relative gap (about 1e-7 for RMSNorm models in float64, 0 for LayerNorm ones).
        """
        return _relative(self.native_output, self.output)


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class _Stop(Exception):
    """Raised by the capture hook: nothing after the target is needed."""


def run_to_target(
    model,
    tokens: Int[Tensor, "batch pos"],
    target: str,
    hooks: HookList = (),
    embeddings: Tensor | None = None,
    stop: bool = True,
) -> Tensor:
    """Run the model with hooks until ``target`` fires and return its activation.

    Args:
        model: A TransformerBridge.
        tokens: Input tokens; their batch must match ``embeddings``' if given.
        target: Hook name whose activation is returned.
        hooks: Extra ``(name, fn)`` forward hooks (freeze, replay, user's).
        embeddings: If given, replace the output of ``hook_embed``.
        stop: Abort the forward once the target fired (False: run every hook).

    Returns:
        The activation at ``target`` (with its batch axis).

    Raises:
        FreezeError: if the target hook never fired.
    """
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook=None) -> None:
        captured["act"] = act
        if stop:
            raise _Stop

    fwd = list(hooks) + [(target, capture)]
    if embeddings is not None:
        fwd.insert(0, (EMBED_HOOK, lambda act, hook=None: embeddings))
    with quiet_norm_edits(), model.hooks(fwd_hooks=fwd):
        try:
            model(tokens)
        except _Stop:
            pass
    if "act" not in captured:
        raise FreezeError(f"The hook point {target!r} never fired in a forward pass of this model.")
    return captured["act"]


def _at(act: Tensor, position: int, n_tokens: int) -> Tensor:
    if act.ndim < 3 or act.shape[1] != n_tokens:
        raise InputError(
            f"The target's activation has shape {tuple(act.shape)}, not (batch, pos={n_tokens}, ...): "
            "tl_linmap maps activations indexed by sequence position."
        )
    return act[:, position].flatten(1)


def _jacobian(y: Float[Tensor, " d_out"], x: Tensor, chunk_size: int, progress: bool) -> Float[Tensor, "pos d_out d_in"]:
    # One vmapped backward per chunk of output dimensions over a single retained graph.
    eye = torch.eye(y.shape[0], dtype=y.dtype, device=y.device)
    starts = range(0, y.shape[0], chunk_size)
    rows = [
        torch.autograd.grad(y, x, eye[s : s + chunk_size], is_grads_batched=True, retain_graph=True)[0][:, 0]
        for s in tqdm(starts, disable=not progress, desc="detached Jacobian")
    ]
    return einops.rearrange(torch.cat(rows), "d_out pos d_in -> pos d_out d_in")


def _check_factors(model, factors: Factors) -> None:
    missing = [name for name in factor_names(model) if name not in factors]
    if missing:
        raise FreezeError(f"Freeze hooks never ran at {missing[:4]}: the bridge bypassed them; no exact map.")


def linear_map(
    model,
    prompt_or_tokens: Prompt,
    *,
    target: str = "output",
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
    chunk_size: int | None = None,
    check: bool = True,
    progress: bool = False,
) -> LinearMap:
    """The exact linear system of one target vector of one inference.

    Args:
        model: A TransformerBridge of a supported architecture (see `tl_linmap.rules`).
        prompt_or_tokens: One prompt as text or token ids.
        target: ``"output"`` (the final norm's output, read by the unembedding) or any
            hook name such as ``"blocks.3.hook_resid_post"``.
        position: Sequence position of the target vector.
        dtype: Working dtype (float64 for exactness; None keeps the model's). The model's
            own dtype is restored afterwards.
        chunk_size: Output dimensions per batched backward pass (default: all at once).
        check: Raise `FreezeError` if the system does not reconstruct the output
            (a freeze rule silently had no effect).
        progress: Show a progress bar over chunks.

    Returns:
        A `LinearMap`.

    Raises:
        InputError: for a bad prompt, position, target or chunk size.
        UnsupportedArchitectureError: if the architecture has no freeze rules.
        FreezeError: if a freeze hook did not take effect.
    """
    tokens = to_tokens(model, prompt_or_tokens)
    n = tokens.shape[1]
    position = check_position(position, n)
    name = resolve_target(model, target)
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be a positive number of output dimensions, got {chunk_size}.")
    with borrowed(model, dtype):
        native = _at(run_to_target(model, tokens, name), position, n)[0]
        output = _at(run_to_target(model, tokens, name, same_path_hooks(model)), position, n)[0]
        inputs = run_to_target(model, tokens, EMBED_HOOK)
        x = inputs.detach().clone().requires_grad_(True)
        factors: Factors = {}
        with torch.enable_grad():
            # The whole forward runs so every factor is recorded (and checked) for the replay.
            frozen_act = run_to_target(model, tokens, name, freeze_hooks(model, factors=factors), x, stop=False)
            y = _at(frozen_act, position, n)[0]
            _check_factors(model, factors)
            if not y.requires_grad:
                raise InputError(f"{target!r} does not depend on the token embeddings (a frozen factor?).")
            operators = _jacobian(y, x, chunk_size or y.shape[0], progress)
        bias = _at(run_to_target(model, tokens, name, replay_hooks(model, factors), torch.zeros_like(inputs)), position, n)[0]
    result = LinearMap(
        operators=operators,
        inputs=inputs[0].detach(),
        bias=bias.detach(),
        output=output.detach(),
        native_output=native.detach(),
        tokens=tokens[0],
        target=name,
        position=position,
    )
    tolerance = torch.finfo(operators.dtype).eps ** 0.5
    if check and result.relative_error() > tolerance:
        raise FreezeError(
            f"The detached system misses the model's output by {result.relative_error():.2e} "
            f"(tolerance {tolerance:.1e}): a freeze rule had no effect, or the model's weights were "
            "processed in a way the rules do not cover."
        )
    return result
