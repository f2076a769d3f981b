"""The demo: one prompt's exact linear system on a real model, printed."""

from __future__ import annotations

import time

import torch

from tl_linmap.freeze.architectures import architecture_of
from tl_linmap.linear.dense import linear_map


def _tokens(pairs: list[tuple[str, float]]) -> str:
    return "  ".join(f"{tok!r} {score:.2f}" for tok, score in pairs)


def _read(lm, vector, top: int, affine: bool = False) -> list[tuple[str, float]]:
    # Through the map's token reader: on a HookedTransformer the final norm's weight follows the output hook.
    return lm.reader.top(lm.reader.logits(vector, affine=affine), top)[0]


def demo_report(model, prompt: str, *, top: int = 5, n_singular: int = 3) -> str:
    """Compute and describe the linear map of the prompt's next-token output.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt: The input text.
        top: Tokens shown per list.
        n_singular: Singular triplets shown for the largest operator.

    Returns:
        The report as text.
    """
    start = time.perf_counter()
    lm = linear_map(model, prompt)
    seconds = time.perf_counter() - start
    lm32 = linear_map(model, prompt, dtype=torch.float32)
    str_tokens = lm.str_tokens
    with torch.no_grad():
        probs = torch.softmax(model(lm.tokens[None])[0, -1].double(), -1)
    model_top = [(model.tokenizer.decode([int(i)]), float(p)) for i, p in zip(*reversed(probs.topk(top)))]
    norms = lm.contributions().norm(dim=-1)
    largest = int(lm.operators.flatten(1).norm(dim=-1).argmax())
    svd = lm.svd(n_singular)
    lines = [
        f"model: {model.cfg.model_name} ({architecture_of(model)}, d_model {model.cfg.d_model}, {model.cfg.n_layers} layers)",
        f"prompt: {prompt!r} -> {len(lm.tokens)} tokens {str_tokens}",
        f"detached Jacobian: {len(lm.tokens)} operators of {lm.operators.shape[1]}x{lm.operators.shape[2]} in {seconds:.1f} s",
        f"relative reconstruction error  float64: {lm.relative_error():.2e}   float32: {lm32.relative_error():.2e}",
        f"gap of the plain forward (HF norm in float32) to the float64 reference: {lm.native_gap():.2e}",
        f"top next tokens, model (probability):        {_tokens(model_top)}",
        f"top next tokens, reconstruction (logit):     {_tokens(_read(lm, lm.reconstruct(), top, affine=True))}",
        f"top next token, float32 reconstruction:      {_read(lm32, lm32.reconstruct(), 1, affine=True)[0][0]!r}",
        "per-token contribution norms |J_i x_i|:",
    ]
    width = max(len(repr(t)) for t in str_tokens)
    for i, (tok, norm) in enumerate(zip(str_tokens, norms.tolist())):
        bar = "#" * round(40 * norm / norms.max().item())
        lines.append(f"  {i:3d} {tok!r:<{width}} {norm:9.3f} {bar}")
    lines.append(f"largest operator: token {largest} {str_tokens[largest]!r}, |J|_F = {lm.operators[largest].norm():.3f}")
    for j in range(n_singular):
        lines.append(f"  sigma_{j + 1} = {svd.values[largest, j]:.4f}")
        lines.append(f"    left  (via unembedding): {_tokens(_read(lm, svd.left[largest, j], top))}")
        lines.append(f"    right (via embeddings):  {_tokens(lm.reader.top(lm.reader.cosines(svd.right[largest, j]), top)[0])}")
    return "\n".join(lines)
