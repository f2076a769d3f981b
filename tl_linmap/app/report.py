"""Report: one prompt's linear system as a self-contained HTML page (figures embedded).

``python -m tl_linmap report "The capital of France is" -o report.html`` writes the
reconstruction check, the per-token contributions, the spectra and the decoded singular
vectors across layers. Nothing on the page is fetched: figures are inline PNGs, styles inline.
Every table has a caption saying what it holds and a legend of the columns it shows.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tl_linmap.base.compat import get_act_name
from tl_linmap.base.hook_names import output_hook
from tl_linmap.base.table import NUM_CELL, STYLE, Table, number_text
from tl_linmap.linear.dense import linear_maps
from tl_linmap.results.maps import LinearMaps

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
td, th { border: 1px solid #ddd; padding: .2em .5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } img { max-width: 100%; } .ok { color: #080; } .bad { color: #b00; }
code { background: #f3f3f3; padding: 0 .2em; }
.caption { font-weight: 600; margin: 1.2em 0 .2em; }
dl.legend { display: grid; grid-template-columns: max-content 1fr; gap: .1em .8em; font-size: .8em; color: #444; margin: .2em 0 1em; }
dl.legend dt { font-weight: 600; } dl.legend dd { margin: 0; }
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
    logits: str
    top_tokens: str


# Right-aligned numbers, as in tl_linmap.base.table.

#: What each table column means, by column name; a table's legend shows its own columns.
#: Decoded singular pairs of one token's operator J_i:
_PAIR_LEGEND = {
    "target": "hook whose residual stream is mapped",
    "source": "input token index i of the operator J_i",
    "token": "the input token i",
    "index": "j of the pair, 0 = largest singular value",
    "sigma": "the singular value σ_j",
    "share": "σ_j² / ‖J‖_F², the pair's share of the operator's squared Frobenius norm",
    "left": "tokens the left vector u_j writes: its logits through ln_final (frozen at this position) and W_U",
    "right": "tokens the right vector v_j reads: cosine of v_j with the token embeddings W_E",
}


#: The same for the stacked operator [J_1 … J_n], whose right vectors span every token.
_STACKED_PAIR_LEGEND = _PAIR_LEGEND | {
    "source": "all: the stacked operator [J_1 … J_n]",
    "token": "the input token whose block of v_j is largest",
    "right": "tokens that block of v_j reads: cosine with the token embeddings W_E",
    "block_share": "that block's share of ‖v_j‖² (1 = v_j reads that token alone)",
}


#: `tl_linmap.results.svd.RankRow` fields compared with and without the first token, with their header and meaning.
_RANKS = {
    "norm": ("‖J‖_F", "Frobenius norm of the stacked operator"),
    "stable_rank": ("stable rank", "Σσ² / σ_max²"),
    "effective_rank": ("effective rank", "exp of the entropy of σ_j / Σσ"),
    "rank90": ("rank90", "singular values needed for 90% of Σσ²"),
    "rank99": ("rank99", "singular values needed for 99% of Σσ²"),
}


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


def _legend(entries: Mapping[str, str]) -> str:
    items = "".join(f"<dt>{html.escape(name)}</dt><dd>{html.escape(text)}</dd>" for name, text in entries.items())
    return f'<dl class="legend">{items}</dl>'


def _filled(table: Table) -> Table:
    # The table without the columns that are empty (None) in every row.
    kept = [c for c in table.columns() if any(getattr(row, c) is not None for row in table)]
    if kept == table.columns():
        return table
    row_type = dataclasses.make_dataclass(type(table[0]).__name__, kept)
    return Table(row_type(**{c: getattr(row, c) for c in kept}) for row in table)


def _explained_table(table: Table, caption: str, legend: Mapping[str, str]) -> str:
    # Caption, the table without its empty columns, and the meaning of each column shown
    # (a KeyError for a column the legend lacks: nothing reaches the page unexplained).
    table = _filled(table)
    entries = {column: legend[column] for column in table.columns()}
    return f'<p class="caption">{html.escape(caption)}</p>{table._repr_html_()}{_legend(entries)}'


def _cell(value: float) -> str:
    return f"<td{NUM_CELL}>{number_text(value)}</td>"


def _rank_table(maps: LinearMaps, caption: str) -> str:
    # One row per map: each measure of the stacked operator with and without the first
    # token (an attention sink that can dominate it) side by side, to read across a row.
    n = next(iter(maps.values())).position + 1
    variants = {
        "with first": f"stacked [J_0 … J_{n - 1}]: all {n} tokens",
        "without first": f"stacked [J_1 … J_{n - 1}]: {n - 1} tokens, the first left out",
    }
    head = '<th rowspan="2">map</th>' + "".join(f'<th colspan="2">{html.escape(h)}</th>' for h, _ in _RANKS.values())
    subhead = "".join(f"<th{NUM_CELL}>{v}</th>" for _ in _RANKS for v in variants)
    rows = []
    for name, lm in maps.items():
        (a,) = lm.dimensionality(per_token=False)
        (b,) = lm.dimensionality(per_token=False, skip_first=True)
        cells = "".join(_cell(getattr(a, field)) + _cell(getattr(b, field)) for field in _RANKS)
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    table = (f'<style>{STYLE}</style><table class="tl-linmap-table"><thead><tr>{head}</tr><tr>{subhead}</tr></thead>'
             f"<tbody>{''.join(rows)}</tbody></table>")
    legend = {"map": "hook whose residual stream is mapped"} | dict(_RANKS.values()) | variants
    return f'<p class="caption">{html.escape(caption)}</p>{table}{_legend(legend)}'


def report_html(model, prompt: str, *, layers: Sequence[int] | None = None, k: int = 3, top: int = 8) -> str:
    """Compute one prompt's linear system and describe it as an HTML page.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt: The prompt.
        layers: Layers whose residual stream is mapped (default: six evenly spaced).
        k: Singular pairs decoded per operator.
        top: Tokens shown per decoded vector.

    Returns:
        The page, self-contained.
    """
    from tl_linmap.present import plotting  # matplotlib is an optional extra

    layers = default_layers(model.cfg.n_layers) if layers is None else list(layers)
    names = [get_act_name("resid_post", layer) for layer in layers]
    # One set of shared passes for the output and every layer's residual stream.
    computed = linear_maps(model, prompt, [output_hook(model), *names])
    lm = computed[output_hook(model)]
    resid = LinearMaps({name: computed[name] for name in names})
    tokens = lm.str_tokens
    with torch.no_grad():
        logits = model(lm.tokens[None])[0, -1].double()
    predicted = int(logits.argmax())
    split = lm.logit_contributions(predicted)
    error = lm.relative_error()
    verdict = '<span class="ok">exact</span>' if error < 1e-12 else '<span class="bad">not exact</span>'
    model_top = lm.reader.top(logits[None], top)[0]
    lens_top = lm.reader.top(lm.reader.logits(lm.reconstruct(), affine=True)[None], top)[0]
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
            _explained_table(predictions, f"Top {top} next tokens, from the model and from the linear system", {
                "logits": "model: the model's own forward; linear system: Σ_i J_i x_i + b read through "
                          "ln_final (frozen) and W_U",
                "top_tokens": "the tokens with the highest logits, highest first",
            }),
        ),
        _section(
            "contributions", "Per-token contributions",
            _p(f"Each input token's term J_i x_i and its exact share of the logit of {split.token!r} "
               f"({split.logit:.3f} = {split.per_token.sum():.3f} from tokens + {split.constant:.3f} constant)."),
            _explained_table(token_rows, "One row per input token i, at the model's output", {
                "position": "index i in the prompt",
                "token": "the input token",
                "norm": "‖J_i x_i‖, the size of the token's term in the output",
                "logit": f"w · J_i x_i, the token's exact share of the logit of {split.token!r} "
                         "(w: its W_U column through the frozen ln_final)",
            }),
            figure_html(plotting.plot_logit_contributions(split), "per-token logit contributions"),
            figure_html(plotting.plot_contribution_heatmap(resid), "contribution norms per token and layer"),
        ),
        _section(
            "spectra", "Singular value spectra across layers",
            _p("Singular values below σ_0 · eps · max(d_out, d_in) (the standard numerical-rank threshold) "
               "are rounding noise and are not drawn: a line that ends early shows its operator's numerical rank."),
            figure_html(plotting.plot_spectra(resid, source=-1), "spectra of the last token's operator"),
            figure_html(plotting.plot_spectra(resid, source="all", skip_first=True), "spectra of the stacked operators"),
            _rank_table(resid, "How many dimensions each layer's stacked operator uses, with and without the first token"),
        ),
        _section(
            "decoded", "Decoded singular vectors across layers",
            _p("Left vectors read through ln_final frozen at this position and W_U; right vectors by "
               "cosine with the token embeddings; each pair signed along the actual output."),
            figure_html(plotting.plot_decoded(resid, source=-1, k=k, top=3), "decoded singular vectors"),
            _explained_table(
                resid.decode(k=k, top=top, sources=-1),
                f"Top {k} singular pairs of the last token's operator J_{len(tokens) - 1} ({tokens[-1]!r}) per layer",
                _PAIR_LEGEND,
            ),
            _explained_table(
                resid.decode(k=k, top=top, sources=[], stacked=True, skip_first=True),
                f"Top {k} singular pairs of the stacked operator [J_1 … J_{len(tokens) - 1}] "
                "(first token left out) per layer",
                _STACKED_PAIR_LEGEND,
            ),
        ),
    ]
    title = html.escape(f"tl_linmap: {prompt}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>")


def write_report(model, prompt: str, path: str, **options) -> str:
    """Write `report_html` to a file.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt: The prompt.
        path: Where the page goes.
        **options: Passed to `report_html`.

    Returns:
        The path written.
    """
    with open(path, "w", encoding="utf-8") as f:
        f.write(report_html(model, prompt, **options))
    return path
