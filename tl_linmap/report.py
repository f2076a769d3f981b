"""Report: one prompt's linear system as a self-contained HTML page (figures embedded).

``python -m tl_linmap report "The capital of France is" -o report.html`` writes the
reconstruction check, the per-token contributions, the spectra and the decoded singular
vectors across layers. Nothing on the page is fetched: figures are inline PNGs, styles inline.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tl_linmap.compat import get_act_name
from tl_linmap.inputs import OUTPUT_HOOK
from tl_linmap.jacobian import linear_maps
from tl_linmap.results import LinearMaps
from tl_linmap.table import Table

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
td, th { border: 1px solid #ddd; padding: .2em .5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } img { max-width: 100%; } .ok { color: #080; } .bad { color: #b00; }
code { background: #f3f3f3; padding: 0 .2em; }
"""


@dataclass
class TokenRow:
    """One input token's share of the prediction.

    Attributes:
        position: Index in the prompt.
        token: The token.
        norm: ``‖J_i x_i‖``.
        logit: Its exact share of the predicted token's logit.
    """

    position: int
    token: str
    norm: float
    logit: float


@dataclass
class _Prediction:
    # One line of the predictions table.
    source: str
    top_tokens: str


def figure_html(fig, alt: str) -> str:
    """Embed a matplotlib figure as an inline PNG and close it.

    Args:
        fig: A matplotlib Figure.
        alt: Alternative text.

    Returns:
        An ``<img>`` tag with a ``data:`` URI.
    """
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def default_layers(n_layers: int, count: int = 6) -> list[int]:
    """Evenly spaced layers, first and last included.

    Args:
        n_layers: The model's depth.
        count: How many layers at most.

    Returns:
        Sorted distinct layer indices.
    """
    return sorted({round(j * (n_layers - 1) / max(count - 1, 1)) for j in range(count)})


def _section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def report_html(model, prompt: str, *, layers: Sequence[int] | None = None, k: int = 3, top: int = 8) -> str:
    """Compute one prompt's linear system and describe it as an HTML page.

    Args:
        model: A TransformerBridge of a supported architecture.
        prompt: The prompt.
        layers: Layers whose residual stream is mapped (default: six evenly spaced).
        k: Singular pairs decoded per operator.
        top: Tokens shown per decoded vector.

    Returns:
        The page, self-contained.
    """
    from tl_linmap import plotting  # matplotlib is an optional extra

    layers = default_layers(model.cfg.n_layers) if layers is None else list(layers)
    names = [get_act_name("resid_post", layer) for layer in layers]
    # One set of shared passes for the output and every layer's residual stream.
    computed = linear_maps(model, prompt, [OUTPUT_HOOK, *names])
    lm = computed[OUTPUT_HOOK]
    resid = LinearMaps({name: computed[name] for name in names})
    tokens = lm.sources
    with torch.no_grad():
        logits = model(lm.tokens[None])[0, -1].double()
    predicted = int(logits.argmax())
    split = lm.logit_contributions(predicted)
    error = lm.relative_error()
    verdict = '<span class="ok">exact</span>' if error < 1e-12 else '<span class="bad">not exact</span>'
    model_top = lm.readout.top(logits[None], top)[0]
    lens_top = lm.readout.top(lm.readout.logits(lm.reconstruct(), affine=True)[None], top)[0]
    predictions = Table(
        [_Prediction("model", ", ".join(f"{t!r}" for t, _ in model_top)),
         _Prediction("linear system", ", ".join(f"{t!r}" for t, _ in lens_top))]
    )
    token_rows = Table(
        TokenRow(i, repr(tok), float(n), float(v))
        for i, (tok, n, v) in enumerate(zip(tokens, lm.contributions().norm(dim=-1), split.per_token))
    )
    worst = max(m.relative_error() for m in resid.values())
    body = [
        f"<h1>tl_linmap report: <code>{html.escape(prompt)}</code></h1>",
        _p(f"Model {model.cfg.model_name}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; "
           f"{len(tokens)} tokens: {tokens!r}."),
        _section(
            "reconstruction", "Reconstruction check",
            f"<p>Final-norm output at the last position, float64: relative error <b>{error:.2e}</b> {verdict}; "
            f"worst layer map {worst:.2e}. Gap of the plain forward (Hugging Face norm path) to the float64 "
            f"reference: {lm.native_gap():.2e} (rounding of the native path, not an error of the map).</p>",
            predictions._repr_html_(),
        ),
        _section(
            "contributions", "Per-token contributions",
            _p(f"Each input token's term J_i x_i and its exact share of the logit of {split.token!r} "
               f"({split.logit:.3f} = {split.per_token.sum():.3f} from tokens + {split.constant:.3f} constant)."),
            token_rows._repr_html_(),
            figure_html(plotting.plot_logit_contributions(split), "per-token logit contributions"),
            figure_html(plotting.plot_contribution_heatmap(resid), "contribution norms per token and layer"),
        ),
        _section(
            "spectra", "Singular value spectra across layers",
            figure_html(plotting.plot_spectra(resid, source=-1), "spectra of the last token's operator"),
            figure_html(plotting.plot_spectra(resid, source="all", skip_first=True), "spectra of the stacked operators"),
            _p("Dimensionality per layer (stacked operator), first token included and left out:"),
            resid.dimensionality(per_token=False)._repr_html_(),
            resid.dimensionality(per_token=False, skip_first=True)._repr_html_(),
        ),
        _section(
            "decoded", "Decoded singular vectors across layers",
            _p("Left vectors read through ln_final frozen at this position and W_U; right vectors by "
               "cosine with the token embeddings; each pair signed along the actual output."),
            figure_html(plotting.plot_decoded(resid, source=-1, k=k, top=3), "decoded singular vectors"),
            resid.decode(k=k, top=top, sources=-1)._repr_html_(),
            _p("Stacked operators, first token left out:"),
            resid.decode(k=k, top=top, sources=[], stacked=True, skip_first=True)._repr_html_(),
        ),
    ]
    title = html.escape(f"tl_linmap: {prompt}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>")


def write_report(model, prompt: str, path: str, **options) -> str:
    """Write `report_html` to a file.

    Args:
        model: A TransformerBridge of a supported architecture.
        prompt: The prompt.
        path: Where the page goes.
        **options: Passed to `report_html`.

    Returns:
        The path written.
    """
    with open(path, "w", encoding="utf-8") as f:
        f.write(report_html(model, prompt, **options))
    return path
