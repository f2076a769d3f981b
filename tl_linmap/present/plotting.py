"""Plotting: figures of the linear maps of one inference (needs the ``plot`` extra).

matplotlib is imported when a function is called, not with this module, so ``import
tl_linmap`` works without it; calling a plot function without it raises an ImportError
that says ``pip install tl_linmap[plot]``. Every function draws into ``ax`` when one is
given (creating a figure otherwise) and returns the matplotlib Figure.

Maps are passed as a `tl_linmap.results.maps.LinearMaps` (or any Mapping of name to
`tl_linmap.results.maps.LinearMap`, drawn in its order, so layer by layer for `layer_maps`) or as
a single `LinearMap`. Tokens are shown through `token_label`, which makes spaces, control
characters and byte pieces visible.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.deprecation import renamed_argument
from tl_linmap.base.errors import InputError
from tl_linmap.present.display import component_rows
from tl_linmap.reading.spectral import input_index, stacked_tokens

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


__all__ = [
    "plot_component_contributions", "plot_contribution_heatmap", "plot_decoded", "plot_expert_contributions",
    "plot_logit_contributions", "plot_of", "plot_sequence_attribution", "plot_singular_values", "plot_spectra", "token_label",
]


# Results are recognised by what they hold, not by class: `tl_linmap.results.maps` draws itself through
# this module (`.plot()`), so this module cannot import it.
#: A `LinearMap` or `Contributions` (`tl_linmap.results.maps.maps`): tokens, a target position, contributions.
TargetResult = Any
#: A `LinearMap`: a `TargetResult` with the operators ``J_i``.
LinearMap = Any
#: A `tl_linmap.results.maps.logit_split.LogitSplit`: one token's logit split over input tokens.
LogitSplit = Any
#: One map, or several by name (a `LinearMaps` or a dict), drawn in their order.
MapsLike = Mapping[str, LinearMap] | LinearMap


def _is_result(value) -> bool:
    return all(hasattr(value, name) for name in ("contributions", "position", "str_tokens"))


def _is_linear(value) -> bool:
    return _is_result(value) and hasattr(value, "operators")


def _is_split(value) -> bool:
    return all(hasattr(value, name) for name in ("per_token", "constant", "logit", "token"))


#: An input token index (Python-style over the prompt: -1 is its last token), or the stacked operator.
TokenChoice = int | Literal["all"]


# Legends stop being readable beyond about this many entries; a colorbar takes over.
_MAX_LEGEND = 10


# Characters that would otherwise print as blank or break a line.
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥"}


# Most token bars that still have room for their values written on them.
_MAX_BAR_LABELS = 16


# Longest token label inside a grid cell before it is cut with an ellipsis.
_MAX_CELL_LABEL = 14


def plot_of(kind: str | None, plots: Mapping[str, str]) -> Callable[..., Figure]:
    """The function of this module a result's ``.plot(kind)`` draws with.

    Args:
        kind: One of ``plots``' kinds (None: the first).
        plots: Kind -> name of a plotting function here, as the result offers them.

    Returns:
        The function; it takes the result first, then the plot's own options.

    Raises:
        InputError: for a kind the result does not offer.
    """
    kind = next(iter(plots)) if kind is None else kind
    if kind not in plots:
        raise InputError(f"kind must be one of {', '.join(map(repr, plots))}, got {kind!r}.")
    return getattr(sys.modules[__name__], plots[kind])


def _pyplot():
    # Imported here so that tl_linmap (and this module) load without matplotlib.
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("tl_linmap.present.plotting needs matplotlib: pip install tl_linmap[plot]") from error
    return plt


def _figure(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = _pyplot().subplots(figsize=size, layout="constrained")
    return fig, ax


def token_label(token: str) -> str:
    """A token string made visible for a plot label.

    Spaces become ``␣``, newlines ``↵``, tabs ``⇥``, other unprintable characters their
    escape (``\\x1c``), an empty string ``∅``; ``$`` is escaped so matplotlib does not
    read two of them as mathtext. Byte pieces of a multi-byte character decode to ``�``
    and stay so.

    Args:
        token: A decoded token.

    Returns:
        The label.
    """
    if not token:
        return "∅"
    visible = "".join(_VISIBLE.get(c, c if c.isprintable() else repr(c)[1:-1]) for c in token)
    return visible.replace("$", r"\$")


def _clip(label: str, width: int = _MAX_CELL_LABEL) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _short_name(name: str) -> str:
    # "blocks.10.hook_resid_post" -> "L10 resid_post": row and legend labels stay narrow.
    return re.sub(r"^blocks\.(\d+)\.", r"L\1 ", name).replace("hook_", "")


def _named(maps: Mapping[str, TargetResult] | TargetResult) -> dict[str, TargetResult]:
    if _is_result(maps):
        return {maps.target: maps}
    if not isinstance(maps, Mapping) or not all(_is_result(lm) for lm in maps.values()):
        raise InputError(
            f"Plots take a LinearMap (or Contributions), or LinearMaps / a dict of them, got {type(maps).__name__}."
        )
    if not maps:
        raise InputError("No maps to plot.")
    # LinearMaps as they are: a map kept on disk is read when drawn, not all at once.
    return maps if isinstance(maps, dict) or hasattr(maps, "spilled") else dict(maps)


def _linear(named: dict[str, TargetResult]) -> dict[str, LinearMap]:
    # Spectra and singular vectors need the operators, which matrix-free results (Contributions) lack.
    for name, lm in named.items():
        if not _is_linear(lm):
            raise InputError(f"{name} is a {type(lm).__name__}, not a LinearMap: it has no operators to decompose.")
    return named


def _shared_tokens(named: dict[str, TargetResult]) -> TargetResult:
    # One column per input token only makes sense if every map read the same prompt.
    first = next(iter(named.values()))
    for name, lm in named.items():
        if lm.position != first.position or not torch.equal(lm.tokens, first.tokens):
            raise InputError(f"{name} comes from another prompt or position than the first map; plot them separately.")
    return first


def _index(lm: TargetResult, token: int, skip_first: bool) -> int:
    index = input_index(token, len(lm.tokens), lm.position)
    if skip_first and index == 0:
        raise InputError("skip_first leaves out token 0, the token asked for.")
    return index


def _source_choice(source: TokenChoice | None, token: TokenChoice | None) -> TokenChoice:
    # `token=` was this argument's old name; the default is the prompt's last token.
    source = renamed_argument("token", token, "source", source)
    if isinstance(source, str) and source != "all":
        raise InputError(f"source must be an input token index or 'all' (the stacked operator), got {source!r}.")
    return -1 if source is None else source


def _operator(lm: LinearMap, token: TokenChoice, skip_first: bool) -> Float[Tensor, "d_out d_in_total"]:
    # One J_i, or [J_first ... J_position] side by side (what `OperatorSVD.stacked` decomposes).
    if token == "all":
        blocks = lm.operators[stacked_tokens(lm.position, skip_first)]
        return einops.rearrange(blocks, "pos d_out d_in -> d_out (pos d_in)")
    return lm.operators[_index(lm, token, skip_first)]


def _noise_factor(dtype: torch.dtype, shape: tuple[int, ...]) -> float:
    # The standard numerical-rank tolerance (numpy.linalg.matrix_rank): singular values
    # below σ_max · eps · max(d_out, d_in) are what rounding alone can produce.
    return torch.finfo(dtype).eps * max(shape)


def _above_noise(values: Float[Tensor, " r"], factor: float, normalize: bool) -> Float[Tensor, " r"]:
    # Descending singular values without the rounding noise (below σ_0 · factor).
    # A zero operator keeps no value: it has no scale and nothing above the noise.
    values = values[values > values[0] * factor]
    return values / values[0] if normalize and len(values) else values


def _spectrum(lm: LinearMap, token: TokenChoice, skip_first: bool, normalize: bool) -> tuple[Float[Tensor, " r"], float]:
    # The singular values above the rounding noise, and the noise factor (floor / σ_max).
    operator = _operator(lm, token, skip_first)
    factor = _noise_factor(operator.dtype, operator.shape)
    return _above_noise(torch.linalg.svdvals(operator), factor, normalize), factor


def _noise_note(factors: set[float], dtypes: set[torch.dtype]) -> str:
    # One factor when the operators share their shape and dtype (a plot of one layer range).
    bound = f"σ_0 · {factors.pop():.2g}" if len(factors) == 1 else "σ_0 · eps · max(d_out, d_in)"
    precision = ", ".join(str(d).removeprefix("torch.") for d in sorted(dtypes, key=str))
    return f"not shown: σ_j < {bound}, rounding noise in {precision}"


def _operator_label(lm: LinearMap, token: TokenChoice, skip_first: bool) -> str:
    if token == "all":
        tokens = stacked_tokens(lm.position, skip_first)
        return f"stacked [J_{tokens[0]} … J_{tokens[-1]}]"
    index = _index(lm, token, skip_first)
    return f"J_{index} ({token_label(lm.str_tokens[index])})"


def _depth_colors(n: int) -> list:
    # viridis without its palest yellow, which is hard to see on white.
    cmap = _pyplot().get_cmap("viridis")
    return [cmap(0.9 * i / max(n - 1, 1)) for i in range(n)]


def _depth_key(fig: Figure, ax: Axes, names: list[str], colors: list, what: str = "map", order: str = "depth") -> None:
    # Few lines: a legend; many: a discrete colorbar labelled with a subset of names.
    if len(names) <= _MAX_LEGEND:
        ax.legend(fontsize="small", title=what)
        return
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap

    norm = BoundaryNorm([i - 0.5 for i in range(len(names) + 1)], len(names))
    bar = fig.colorbar(ScalarMappable(norm, ListedColormap(colors)), ax=ax, label=f"{what} ({order})")
    step = -(-len(names) // _MAX_LEGEND)  # ceiling division
    ticks = list(range(0, len(names), step))
    bar.set_ticks(ticks, labels=[_short_name(names[i]) for i in ticks])
    bar.ax.invert_yaxis()  # shallow layers on top, as in the heatmaps


def plot_spectra(
    maps: MapsLike,
    source: TokenChoice | None = None,
    *,
    skip_first: bool = False,
    normalize: bool = False,
    ax: Axes | None = None,
    token: TokenChoice | None = None,
) -> Figure:
    """Singular value spectra of one input token's operator, one line per map.

    Args:
        maps: Maps by name (drawn in order, coloured by depth), or one `LinearMap`.
        source: Input token index ``i`` of ``J_i`` (default ``-1``, the prompt's last token),
            or ``"all"`` for the stacked operator ``[J_0 … J_n]``.
        skip_first: Leave the first token out of the stacked operator (and refuse
            ``source=0``).
        normalize: Divide each spectrum by its largest value, to compare shapes.
        ax: Axes to draw into (default: a new figure).
        token: Deprecated name of ``source``.

    Only the numerically meaningful values are drawn: singular values below
    ``σ_0 · eps · max(d_out, d_in)`` (``eps`` of the operator's dtype; the standard
    numerical-rank threshold, as in ``numpy.linalg.matrix_rank``) are rounding noise, and
    would stretch the log axis down to ``1e-15``. A line ends at its operator's numerical
    rank, and the note under the axis label gives the bound.

    Returns:
        The Figure: one line per map, ``y`` = singular values ``σ_j`` (descending) above
        the rounding noise, on a log axis.

    Raises:
        InputError: for a token index outside the prompt, or a map without operators.
    """
    token = _source_choice(source, token)
    _pyplot()  # fail before any decomposition when matplotlib is missing
    named = _linear(_named(maps))
    fig, ax = _figure(ax, (7, 4.5))
    colors = _depth_colors(len(named))
    factors = set()
    for (name, lm), color in zip(named.items(), colors):
        values, factor = _spectrum(lm, token, skip_first, normalize)
        factors.add(factor)
        ax.plot(range(len(values)), values.detach().cpu().numpy(), color=color, label=_short_name(name))
    ax.set_yscale("log")
    dtypes = {lm.operators.dtype for lm in named.values()}
    ax.set_xlabel(f"j (0 = largest)\n{_noise_note(factors, dtypes)}")
    ax.set_ylabel("σ_j / σ_0" if normalize else "σ_j")
    ax.set_title(f"Singular values of {_operator_label(next(iter(named.values())), token, skip_first)}")
    ax.grid(True, which="major", alpha=0.3)
    _depth_key(fig, ax, list(named), colors)
    return fig


def plot_singular_values(svd, *, normalize: bool = False, ax: Axes | None = None) -> Figure:
    """Singular values of every operator one SVD holds: one line per input token, the stacked operator dashed.

    Where `plot_spectra` compares one operator across maps, this compares the operators of
    one map; the rounding noise is left out as there.

    Args:
        svd: A `tl_linmap.results.svd.OperatorSVD` (dense: every value; matrix-free: the top k).
        normalize: Divide each line by its largest value, to compare shapes.
        ax: Axes to draw into (default: a new figure).

    Returns:
        The Figure: ``ax.lines[r]`` holds ``svd.values[r]`` above the noise (input token
        ``svd.tokens[r]``, coloured by position), then a black dashed line for the stacked
        operator when the SVD has one; log ``y`` axis.

    Raises:
        InputError: for anything but an `OperatorSVD`.
    """
    if not all(hasattr(svd, name) for name in ("values", "tokens", "str_tokens", "stacked", "left", "right")):
        raise InputError(f"plot_singular_values takes an OperatorSVD (lm.svd(), mf.svd(i)), got {type(svd).__name__}.")
    _pyplot()  # fail before any work when matplotlib is missing
    fig, ax = _figure(ax, (7, 4.5))
    d_out, d_in = svd.left.shape[-1], svd.right.shape[-1]
    factor = _noise_factor(svd.values.dtype, (d_out, d_in))
    names = [f"{i} {token_label(svd.str_tokens[i])}" for i in svd.tokens]
    colors = _depth_colors(len(names))
    for values, name, color in zip(svd.values, names, colors):
        ax.plot(_above_noise(values, factor, normalize).detach().cpu().numpy(), color=color, label=name)
    factors = {factor}
    if svd.stacked is not None:
        wide = _noise_factor(svd.values.dtype, (d_out, len(svd.stacked_tokens) * d_in))
        factors.add(wide)
        values = _above_noise(svd.stacked.values, wide, normalize).detach().cpu().numpy()
        stacked = ax.plot(values, color="black", linestyle="--", label="stacked")
    ax.set_yscale("log")
    ax.set_xlabel(f"j (0 = largest)\n{_noise_note(factors, {svd.values.dtype})}")
    ax.set_ylabel("σ_j / σ_0" if normalize else "σ_j")
    ax.set_title(f"Singular values of each J_i of {svd.target}", fontsize="medium")
    ax.grid(True, which="major", alpha=0.3)
    if len(names) > _MAX_LEGEND and svd.stacked is not None:
        ax.add_artist(ax.legend(handles=stacked, loc="upper right", fontsize="small"))  # the colorbar keys only the tokens
    _depth_key(fig, ax, names, colors, "input token", "position")
    return fig


def _contribution_norms(named: dict[str, TargetResult]) -> Float[Tensor, "n_maps pos"]:
    # Tokens after the target position contribute nothing, so columns stop there.
    n = next(iter(named.values())).position + 1
    return torch.stack([lm.contributions()[:n].norm(dim=-1) for lm in named.values()]).detach().cpu()


def _text_color(rgba) -> str:
    # Black on light cells, white on dark ones (perceived luminance).
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _annotate(ax: Axes, image, values: Float[Tensor, "rows cols"], fontsize: float) -> None:
    for (row, col), value in zip(((r, c) for r in range(values.shape[0]) for c in range(values.shape[1])), values.flatten()):
        color = _text_color(image.cmap(image.norm(float(value))))
        ax.text(col, row, f"{float(value):.3g}", ha="center", va="center", color=color, fontsize=fontsize)


def plot_contribution_heatmap(
    maps: Mapping[str, TargetResult] | TargetResult,
    *,
    skip_first: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Contribution norms ``‖J_i x_i‖`` per map (rows) and input token (columns).

    The first token (BOS, or the first word) is usually an attention sink whose
    contribution dwarfs the others and would flatten a shared colour scale, so it gets
    a narrow panel of its own on the left, with its own colour map and its values
    written in the cells; the main axes hold the other tokens.

    Args:
        maps: Maps by name from one prompt (rows, in order), or one map; anything with
            ``contributions()`` (`LinearMap`, `tl_linmap.results.maps.Contributions`).
        skip_first: Leave the first token out altogether.
        ax: Axes for the main heatmap (default: a new figure with the first-token panel
            as a subplot); with ``ax``, the first-token panel is an inset to its left,
            outside ``ax``, so leave room there.

    Returns:
        The Figure. The main axes' ``images[0]`` holds the ``(n_maps, n_tokens - 1)``
        norms of tokens ``1 … position``, the first-token panel's the ``(n_maps, 1)`` rest.

    Raises:
        InputError: if the maps come from different prompts or the prompt has one token.
    """
    _pyplot()  # fail before any decomposition when matplotlib is missing
    named = _named(maps)
    first = _shared_tokens(named)
    norms = _contribution_norms(named)
    if norms.shape[1] < 2:
        raise InputError("A one-token prompt has no tokens besides the first to show.")
    labels = [token_label(s) for s in first.str_tokens[: norms.shape[1]]]
    rows = [_short_name(name) for name in named]
    fig, sink, ax = _heatmap_axes(ax, norms.shape[1] - 1, len(rows), skip_first)

    image = ax.imshow(norms[:, 1:].numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(norms.shape[1] - 1), labels[1:], rotation=90)
    ax.set_xlabel("input token i")
    fig.colorbar(image, ax=ax, label="‖J_i x_i‖", fraction=0.05, pad=0.02)
    ax.set_title("Contribution norms ‖J_i x_i‖" + ("\n(first token left out)" if skip_first else ""), fontsize="medium")
    if sink is None:
        ax.set_yticks(range(len(rows)), rows)
        return fig
    sink_image = sink.imshow(norms[:, :1].numpy(), aspect="auto", cmap="Reds", interpolation="nearest")
    _annotate(sink, sink_image, norms[:, :1], fontsize=7)
    sink.set_xticks([0], labels[:1], rotation=90)
    sink.set_yticks(range(len(rows)), rows)
    sink.set_title("first\n(own scale)", fontsize="small")
    ax.tick_params(labelleft=False)
    return fig


def _heatmap_axes(ax: Axes | None, columns: int, rows: int, skip_first: bool) -> tuple[Figure, Axes | None, Axes]:
    # Returns (figure, first-token axes or None, main axes).
    if ax is not None:
        # The caller owns the layout: the first-token panel is an inset left of ax, one
        # main column wide (at least 8% of ax, to fit its numbers), sharing its rows.
        width = max(1 / columns, 0.08)
        return ax.figure, None if skip_first else ax.inset_axes([-width - 0.02, 0, width, 1], sharey=ax), ax
    size = (max(5.0, 3.0 + 0.4 * columns), 1.8 + 0.35 * rows)
    if skip_first:
        fig, main = _figure(None, size)
        return fig, None, main
    # The first-token panel: one main column wide, but at least ~0.7 inch to fit its numbers
    # (the main panel gets about 2.6 inches less than the figure).
    cell = (size[0] - 2.6) / columns
    fig, (sink, main) = _pyplot().subplots(
        1, 2, figsize=size, width_ratios=[max(1.0, 0.7 / cell), columns], sharey=True, layout="constrained"
    )
    return fig, sink, main


def _split(lm_or_split: TargetResult | LogitSplit, token: int | str | None) -> LogitSplit:
    if not (_is_result(lm_or_split) or _is_split(lm_or_split)):
        raise InputError(
            f"plot_logit_contributions takes one map (e.g. maps['blocks.5.hook_resid_post']) or a LogitSplit, "
            f"got {type(lm_or_split).__name__}."
        )
    if _is_split(lm_or_split):
        if token is not None:
            raise InputError("A LogitSplit already has its token; pass token only with a map.")
        return lm_or_split
    if token is None:
        # Default: the token the target's own value predicts.
        if lm_or_split.reader is None:
            raise InputError("This map has no token reader to pick a token; pass token explicitly.")
        token = int(lm_or_split.reader.logits(lm_or_split.output, affine=True).argmax())
    return lm_or_split.logit_contributions(token)


def plot_logit_contributions(
    lm_or_split: TargetResult | LogitSplit,
    token: int | str | None = None,
    *,
    skip_first: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Bar chart of one logit split exactly over the input tokens, plus the constant.

    Args:
        lm_or_split: A map of a residual-stream target (its logit lens, with
            ``ln_final`` frozen) or an already computed `LogitSplit`.
        token: Output token id or single-token string (only with a map; default: the
            token the target's value gives the highest logit).
        skip_first: Leave the first token's bar out (the title says how much it held).
        ax: Axes to draw into (default: a new figure).

    Returns:
        The Figure: ``ax.containers[0]`` holds one bar per input token
        (``w · J_i x_i``), ``ax.containers[1]`` the hatched constant bar.

    Raises:
        InputError: for a token given with a `LogitSplit`, or a map without a token reader.
    """
    _pyplot()  # fail before any decomposition when matplotlib is missing
    split = _split(lm_or_split, token)
    start = 1 if skip_first else 0
    values = split.per_token[start:].detach().cpu()
    labels = [token_label(s) for s in split.str_tokens[start:]]
    fig, ax = _figure(ax, (max(6.0, 2.0 + 0.35 * (len(values) + 2)), 4.5))

    colors = ["tab:blue" if v >= 0 else "tab:red" for v in values.tolist()]
    bars = ax.bar(range(len(values)), values.numpy(), color=colors, label="input tokens")
    # The constant sits one slot apart, grey and hatched: it does not come from any token.
    constant = ax.bar([len(values) + 0.5], [split.constant], color="lightgrey", edgecolor="dimgrey", hatch="//", label="constant")
    # Values on the bars: small parts (often the constant) are otherwise invisible; on
    # many token bars they would collide, so then only the constant gets one.
    for container in (bars, constant) if len(values) <= _MAX_BAR_LABELS else (constant,):
        ax.bar_label(container, fmt="%.3g", fontsize="x-small", padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.1)
    ax.set_xticks([*range(len(values)), len(values) + 0.5], [*labels, "constant"], rotation=90)
    ax.set_xlabel("input token i")
    ax.set_ylabel("logit contribution w · J_i x_i")
    title = (f"Logit of '{token_label(split.token)}' = {split.logit:.4g}\n"
             f"= Σ tokens ({float(split.per_token.sum()):.4g}) + constant ({split.constant:.4g})")
    if skip_first:
        title += f"\nfirst token '{token_label(split.str_tokens[0])}' ({float(split.per_token[0]):.4g}) not shown"
    ax.set_title(title, fontsize="medium")
    return fig


def plot_component_contributions(attribution, *, ax: Axes | None = None) -> Figure:
    """Bar chart of one logit split over components (embeddings, each layer's attention and MLP), plus its constants.

    Args:
        attribution: A `tl_linmap.results.attribution.Attribution` (`token_attribution`).
        ax: Axes to draw into (default: a new figure).

    Returns:
        The Figure: ``ax.containers[0]`` holds one bar per component (its total over source
        tokens), ``ax.containers[1]`` the hatched constant bars (``constant``, then ``b_U``);
        together they sum to the logit.

    Raises:
        InputError: for anything without per-component parts.
    """
    if not all(hasattr(attribution, name) for name in ("per_component", "constant", "logit", "token")):
        raise InputError(f"plot_component_contributions takes an Attribution (token_attribution), got {type(attribution).__name__}.")
    _pyplot()  # fail before any work when matplotlib is missing
    rows = component_rows(attribution)
    parts, constants = rows[: len(attribution.per_component)], rows[len(attribution.per_component) :]
    fig, ax = _figure(ax, (max(6.0, 2.0 + 0.3 * len(rows)), 4.5))
    values = [row.total for row in parts]
    bars = ax.bar(range(len(parts)), values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    # The constants sit apart, grey and hatched, as in `plot_logit_contributions`: no component holds them.
    slots = [len(parts) + 0.5 + c for c in range(len(constants))]
    constant = ax.bar(slots, [row.total for row in constants], color="lightgrey", edgecolor="dimgrey", hatch="//")
    for container in (bars, constant) if len(parts) <= _MAX_BAR_LABELS else (constant,):
        ax.bar_label(container, fmt="%.3g", fontsize="x-small", padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.1)
    ax.set_xticks([*range(len(parts)), *slots], [_short_name(row.component) for row in rows], rotation=90)
    ax.set_ylabel("logit contribution")
    ax.set_title(f"Logit of '{token_label(attribution.token)}' = {attribution.logit:.4g} by component", fontsize="medium")
    return fig


def plot_expert_contributions(split, *, rest: bool = False, ax: Axes | None = None) -> Figure:
    """How much each expert of one block carried of each token's contribution, as an expert x token heatmap.

    Args:
        split: A `tl_linmap.results.experts.ExpertContributions`.
        rest: Add a last row for every other path (attention, the residual stream, other
            blocks); it is usually much the largest and flattens the experts' colour scale.
        ax: Axes to draw into (default: a new figure).

    Returns:
        The Figure: ``ax.images[0]`` holds ``‖values[j, i]‖`` per expert ``j`` (rows, then the
        rest's norms if asked) and input token ``i`` up to the target position.

    Raises:
        InputError: for anything but an `ExpertContributions`.
    """
    if not all(hasattr(split, name) for name in ("values", "rest", "experts", "position", "str_tokens")):
        raise InputError(f"plot_expert_contributions takes an ExpertContributions, got {type(split).__name__}.")
    _pyplot()  # fail before any work when matplotlib is missing
    columns = split.position + 1  # the tokens after the target carry nothing
    norms = split.values[:, :columns].norm(dim=-1)
    names = [f"expert {e}" for e in split.experts]
    if rest:
        norms, names = torch.cat([norms, split.rest[None, :columns].norm(dim=-1)]), [*names, "rest"]
    fig, ax = _figure(ax, (max(5.0, 3.0 + 0.4 * columns), 1.8 + 0.3 * len(names)))
    image = ax.imshow(norms.detach().cpu().numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(columns), [token_label(t) for t in split.str_tokens[:columns]], rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("input token i")
    fig.colorbar(image, ax=ax, label="‖part of J_i x_i‖", fraction=0.05, pad=0.02)
    ax.set_title(f"Block {split.layer}'s experts: their parts of each token's contribution to {split.target}", fontsize="medium")
    return fig


def _decoded_rows(lm: LinearMap, token: TokenChoice, k: int, top: int, skip_first: bool) -> list:
    if token == "all":
        return list(lm.decode(k, top, [], skip_first=skip_first, stacked=True))
    return list(lm.decode(k, top, _index(lm, token, skip_first), skip_first=skip_first))


def _cell_text(row) -> str:  # a tl_linmap.results.maps.svd.DecodedPair
    head = f"σ_{row.index} {row.sigma:.3g} · {row.share:.0%}"
    if row.source == "all":
        head += f"\nfrom {token_label(row.token)} ({row.block_share:.0%})"  # the token whose block of v is largest
    return "\n".join([head, *(_clip(token_label(t)) for t, _ in row.left)])


def plot_decoded(
    maps: MapsLike,
    source: TokenChoice | None = None,
    *,
    k: int = 3,
    top: int = 3,
    skip_first: bool = False,
    ax: Axes | None = None,
    token: TokenChoice | None = None,
) -> Figure:
    """The tokens the top-k left singular vectors write, as a map x ``j`` grid.

    Each cell lists the top tokens of ``u_j`` (read through the frozen ``ln_final`` and
    ``W_U``, see `tl_linmap.results.maps.LinearMap.decode`) under ``σ_j`` and its share
    ``σ_j² / Σσ²`` of the operator's squared Frobenius norm, which also sets the
    cell's colour.

    Args:
        maps: Maps by name (rows, in order), or one `LinearMap`; residual-stream targets.
        source: Input token index of ``J_i`` (default ``-1``), or ``"all"`` for the stacked operator (then
            each cell also names the token whose block of ``v_j`` is largest).
        k: Singular pairs (columns).
        top: Tokens per cell.
        skip_first: Leave the first token out of the stacked operator (and refuse ``source=0``).
        ax: Axes to draw into (default: a new figure).
        token: Deprecated name of ``source``.

    Returns:
        The Figure: ``ax.images[0]`` holds the ``(n_maps, k)`` shares, ``ax.texts`` one
        text per cell, row by row.

    Raises:
        InputError: for a token outside the prompt, or maps that cannot be read as tokens.
    """
    token = _source_choice(source, token)
    _pyplot()  # fail before any decomposition when matplotlib is missing
    named = _linear(_named(maps))
    grid = [_decoded_rows(lm, token, k, top, skip_first) for lm in named.values()]
    columns = max(len(rows) for rows in grid)
    shares = torch.full((len(grid), columns), float("nan"))
    for r, rows in enumerate(grid):
        shares[r, : len(rows)] = torch.tensor([row.share for row in rows])
    lines = top + 1 + (token == "all")
    fig, ax = _figure(ax, (2.0 + 1.7 * columns, 1.2 + 0.17 * lines * len(grid)))

    image = ax.imshow(shares.numpy(), aspect="auto", cmap="YlOrBr", vmin=0, interpolation="nearest")
    for r, rows in enumerate(grid):
        for row in rows:
            color = _text_color(image.cmap(image.norm(row.share)))
            ax.text(row.index, r, _cell_text(row), ha="center", va="center", fontsize=7, color=color, linespacing=1.15)
    ax.set_xticks(range(columns), [f"u_{j}" for j in range(columns)])
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(grid)), [_short_name(name) for name in named])
    fig.colorbar(image, ax=ax, label="σ_j² / Σσ²", fraction=0.05, pad=0.02)
    operator = _operator_label(next(iter(named.values())), token, skip_first)
    ax.set_title(f"Top tokens of the left singular vectors of {operator}", fontsize="medium")
    return fig


# Patching layouts (`tl_linmap.results.patching.LAYOUTS`), by the axes after the layer axis: how a
# result is laid out as one image, rows the layers, columns grouped by the leading axis.
_PATCH_TYPES = ("resid_pre", "attn_out", "mlp_out")


def _patching_grid(values: Tensor, layout: str, labels: list[str] | None) -> tuple[Tensor, list[str], list[tuple[str, int]]]:
    # Returns (layers x columns image, column labels, column groups as (name, width)).
    values = values.detach().cpu().double()

    def pos_labels(n: int) -> list[str]:
        return [token_label(t) for t in labels] if labels and len(labels) == n else [str(p) for p in range(n)]

    if layout == "block_every":  # (3, layer, pos): the three patch types side by side
        n = values.shape[-1]
        return einops.rearrange(values, "kind layer pos -> layer (kind pos)"), pos_labels(n) * 3, [(k, n) for k in _PATCH_TYPES]
    if values.ndim == 3:  # (layer, pos, head): one group of heads per position
        n, heads = values.shape[1:]
        groups = [(_clip(label), heads) for label in pos_labels(n)]
        return einops.rearrange(values, "layer pos head -> layer (pos head)"), [str(h) for _ in range(n) for h in range(heads)], groups
    if layout.startswith("attn_head_"):  # (layer, head)
        return values, [str(h) for h in range(values.shape[1])], []
    return values, pos_labels(values.shape[1]), []


def plot_patching(
    values: Tensor,
    layout: str,
    *,
    labels: list[str] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Heatmap of a patching result in a ``transformer_lens.patching`` layout, layers as rows.

    Draws a prediction (`tl_linmap.results.patching.PatchingAttribution`'s ``values[layout]``, or its
    ``plot``) or a true patching result alike, on a diverging colour scale centred at zero.
    Layouts with three axes are drawn as one image: ``block_every`` with its three patch
    types side by side, ``*_by_pos`` head layouts with one group of head columns per position.

    Args:
        values: The result, shaped as the layout's ``transformer_lens.patching`` function returns it.
        layout: Its layout name (see `tl_linmap.results.patching.LAYOUTS`).
        labels: One label per position (e.g. the tokens), or None for position numbers.
        title: Axes title (default: the layout name).
        ax: Axes to draw into (default: a new figure).

    Returns:
        The Figure; its first image holds the ``(n_layers, columns)`` values.

    Raises:
        InputError: for values that are not 2-d or 3-d.
    """
    _pyplot()
    if not isinstance(values, Tensor) or values.ndim not in (2, 3):
        raise InputError(f"values must be a patching result of 2 or 3 axes (layer first), got {getattr(values, 'shape', type(values).__name__)}.")
    grid, columns, groups = _patching_grid(values, layout, labels)
    rows, cols = grid.shape
    fig, ax = _figure(ax, (max(4.5, 2.5 + 0.28 * cols), max(3.0, 1.2 + 0.16 * rows)))
    limit = float(grid.abs().max()) or 1.0
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="RdBu", vmin=-limit, vmax=limit, interpolation="nearest")
    if rows <= 40:
        ax.set_yticks(range(rows))
    ax.set_ylabel("layer")
    # Beyond about 60 columns the labels overlap; the group labels on top still say where each group is.
    if cols <= 60:
        ax.set_xticks(range(cols), columns, rotation=90, fontsize="small" if groups else None)
    else:
        ax.set_xticks([])
    kind = "head" if layout.startswith("attn_head_") else "position"
    if groups:
        centres, start = [], 0
        for _, width in groups:
            if start:
                ax.axvline(start - 0.5, color="black", linewidth=0.8)
            centres.append(start + (width - 1) / 2)
            start += width
        top = ax.secondary_xaxis("top")
        top.set_xticks(centres, [name for name, _ in groups], rotation=90 if kind == "head" else 0, fontsize="small")
        kind = "head (one group per position)" if kind == "head" else "position (one group per patch type)"
    ax.set_xlabel(kind)
    fig.colorbar(image, ax=ax, label="Δ metric", fraction=0.05, pad=0.02)
    ax.set_title(title or layout, fontsize="medium")
    return fig


def plot_sequence_attribution(attribution, *, skip_first: bool = False, ax: Axes | None = None) -> Figure:
    """Contributions of every source position (columns) to every target position (rows).

    Shares of a linear readout (a logit difference, a generated token's logit) get a
    diverging colour map centred on zero; contribution norms a sequential one. Cells after
    a row's position (no contribution: attention is causal) are left blank.

    Args:
        attribution: A `tl_linmap.results.sequence.SequenceAttribution`.
        skip_first: Leave the first source token (BOS, attention sink) out, so that it does
            not flatten the colour scale.
        ax: Axes to draw in (default: a new figure).

    Returns:
        The Figure; ``ax.images[0]`` holds the ``(rows, sources)`` values shown (NaN where blank).

    Raises:
        InputError: for anything but a `SequenceAttribution`, or nothing left to show.
    """
    if not all(hasattr(attribution, a) for a in ("positions", "values", "kind", "str_tokens")):
        raise InputError(f"plot_sequence_attribution takes a SequenceAttribution, got {type(attribution).__name__}.")
    _pyplot()  # fail before any work when matplotlib is missing
    values = attribution.values.detach().double().cpu().clone()
    positions = torch.as_tensor(attribution.positions)
    values[torch.arange(values.shape[1])[None] > positions[:, None]] = float("nan")
    first = 1 if skip_first else 0
    values = values[:, first : int(positions.max()) + 1]
    if values.shape[1] == 0:
        raise InputError("skip_first leaves no source token to show: pass skip_first=False.")
    str_tokens = attribution.str_tokens
    labels = [token_label(str_tokens[i]) for i in range(first, first + values.shape[1])]
    predicted = attribution.predicted
    rows = [f"{p} {token_label(str_tokens[p])}" + (f" → {token_label(predicted[r])}" if predicted else "") for r, p in enumerate(attribution.positions)]
    fig, ax = _figure(ax, (max(5.0, 3.0 + 0.35 * len(labels)), max(3.0, 1.5 + 0.3 * len(rows))))
    if attribution.kind == "value":
        bound = float(values.nan_to_num().abs().max()) or 1.0
        image = ax.imshow(values.numpy(), aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
        label = "share"
    else:
        image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        label = "‖J_{t,i} x_i‖"
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("source position i")
    ax.set_ylabel("target position t" + (" → generated token" if predicted else ""))
    fig.colorbar(image, ax=ax, label=label, fraction=0.05, pad=0.02)
    ax.set_title(f"{attribution.target}" + ("\n(first token left out)" if skip_first else ""), fontsize="medium")
    return fig


def _corpus(analysis) -> None:
    if not all(hasattr(analysis, name) for name in ("summaries", "dimensionality", "concepts", "attribution_profile")):
        raise InputError(f"Corpus plots take a CorpusAnalysis (tl_linmap.methods.corpus.corpus_analysis), got {type(analysis).__name__}.")


def plot_corpus_dimensionality(
    analysis,
    measure: Literal["rank90", "rank99", "stable"] = "rank90",
    *,
    ax: Axes | None = None,
) -> Figure:
    """Median and interquartile band of one rank measure across prompts, per layer and token role.

    Args:
        analysis: A `tl_linmap.results.corpus.CorpusAnalysis`.
        measure: ``"rank90"`` / ``"rank99"`` (90% / 99% energy rank) or ``"stable"`` (stable rank).
        ax: Axes to draw into (default: a new figure).

    Returns:
        The Figure: one line (median) and one shaded band (first to third quartile) per
        token role, layers along ``x``.

    Raises:
        InputError: for something other than a `CorpusAnalysis`, or an unknown measure.
    """
    _pyplot()  # fail before any work when matplotlib is missing
    _corpus(analysis)
    if measure not in ("rank90", "rank99", "stable"):
        raise InputError(f"measure must be 'rank90', 'rank99' or 'stable', got {measure!r}.")
    rows = analysis.dimensionality()
    fig, ax = _figure(ax, (7, 4.5))
    names = list(analysis.targets)
    for role, color in zip(("first", "middle", "last", "stacked"), ("tab:grey", "tab:blue", "tab:orange", "tab:green")):
        mine = {row.target: row for row in rows if row.role == role}
        if not mine:
            continue
        x = [names.index(t) for t in mine]
        q = [[getattr(row, f"{measure}_{s}") for s in ("q1", "median", "q3")] for row in mine.values()]
        ax.plot(x, [v[1] for v in q], marker="o", color=color, label=f"{role} (n={next(iter(mine.values())).operators})")
        ax.fill_between(x, [v[0] for v in q], [v[2] for v in q], color=color, alpha=0.2)
    ax.set_xticks(range(len(names)), [_short_name(n) for n in names], rotation=45 if len(names) > 8 else 0)
    labels = {"rank90": "90% energy rank", "rank99": "99% energy rank", "stable": "stable rank Σσ²/σ_max²"}
    ax.set_ylabel(labels[measure])
    ax.set_yscale("log")  # a sink's rank 1 and a last token's hundreds on one axis
    from matplotlib.ticker import ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_title(f"{labels[measure]} across {len(analysis.summaries)} prompts: median, quartile band", fontsize="medium")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", title="operator")
    return fig


def plot_corpus_concepts(analysis, *, top: int = 5, ax: Axes | None = None) -> Figure:
    """The tokens each layer's stacked operator writes most often across prompts, as a layer x rank grid.

    Args:
        analysis: A `tl_linmap.results.corpus.CorpusAnalysis`.
        top: Tokens per layer (columns).
        ax: Axes to draw into (default: a new figure).

    Returns:
        The Figure: ``ax.images[0]`` holds the ``(n_layers, top)`` shares of prompts, each
        cell names its token.

    Raises:
        InputError: for something other than a `CorpusAnalysis`.
    """
    _pyplot()  # fail before any work when matplotlib is missing
    _corpus(analysis)
    rows = analysis.concepts(top)
    shares = torch.full((len(rows), top), float("nan"))
    for r, row in enumerate(rows):
        shares[r, : len(row.tokens)] = torch.tensor([share for _, share in row.tokens])
    fig, ax = _figure(ax, (2.0 + 1.3 * top, 1.2 + 0.35 * len(rows)))
    image = ax.imshow(shares.numpy(), aspect="auto", cmap="YlOrBr", vmin=0, vmax=1, interpolation="nearest")
    for r, row in enumerate(rows):
        for c, (token, share) in enumerate(row.tokens):
            color = _text_color(image.cmap(image.norm(share)))
            ax.text(c, r, f"{_clip(token_label(token))}\n{share:.0%}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(top), [f"#{c + 1}" for c in range(top)])
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)), [_short_name(row.target) for row in rows])
    fig.colorbar(image, ax=ax, label="share of prompts", fraction=0.05, pad=0.02)
    ax.set_title(f"Tokens written by the top {analysis.k} left singular vectors (stacked, first token out)", fontsize="medium")
    return fig


def plot_corpus_attribution(analysis, *, bands: int = 3, ax: Axes | None = None) -> Figure:
    """The averaged attribution profile: each segment's mean share of a prompt's logit split.

    Args:
        analysis: A `tl_linmap.results.corpus.CorpusAnalysis`.
        bands: Bands of relative position the middle tokens are split into.
        ax: Axes to draw into (default: a new figure).

    Returns:
        The Figure: ``ax.containers[0]`` holds one bar per segment (mean summed share per prompt).

    Raises:
        InputError: for something other than a `CorpusAnalysis`.
    """
    _pyplot()  # fail before any work when matplotlib is missing
    _corpus(analysis)
    rows = analysis.attribution_profile(bands)
    fig, ax = _figure(ax, (max(5.0, 1.5 + 1.1 * len(rows)), 4))
    values = [row.total_share for row in rows]
    bars = ax.bar(range(len(rows)), values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    ax.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.1)
    ax.set_xticks(range(len(rows)), [row.segment for row in rows], rotation=30)
    ax.set_ylabel("share of Σ|logit terms| (mean over prompts)")
    ax.set_title(f"Where the predicted token's logit comes from ({len(analysis.summaries)} prompts)", fontsize="medium")
    return fig


def plot_feature_contributions(result, *, n: int = 20, ax: Axes | None = None) -> Figure:
    """The largest terms of a feature split (features, error terms, tokens), as horizontal bars.

    Args:
        result: A `tl_linmap.results.features.FeatureContributions`.
        n: How many terms, largest magnitude first.
        ax: Axes to draw into (default: a new figure).

    Returns:
        The Figure: one bar per term (``ax.patches``), features blue, error terms grey, tokens orange.

    Raises:
        InputError: for anything but a `FeatureContributions`.
    """
    if not all(hasattr(result, name) for name in ("rows", "target", "scalar")):
        raise InputError(f"plot_feature_contributions takes a FeatureContributions, got {type(result).__name__}.")
    _pyplot()
    rows = sorted(result.rows(), key=lambda r: -abs(r.contribution))[:n][::-1]
    colours = {"feature": "tab:blue", "error": "tab:gray", "token": "tab:orange", "attn": "tab:green", "mlp": "tab:red"}
    labels = [
        f"{r.site} #{r.feature} @{r.position} {token_label(r.token)}" if r.kind == "feature" else f"{r.kind} {r.site} @{r.position} {token_label(r.token)}"
        for r in rows
    ]
    fig, ax = _figure(ax, (7.0, 1.0 + 0.28 * len(rows)))
    ax.barh(range(len(rows)), [r.contribution for r in rows], color=[colours[r.kind] for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize="small")
    ax.axvline(0, color="black", linewidth=0.5)
    kinds = dict.fromkeys(r.kind for r in rows)
    ax.legend(handles=[_pyplot().Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds], labels=list(kinds), fontsize="small")
    ax.set_xlabel("direct effect on the target" if result.scalar else "‖direct effect‖")
    ax.set_title(f"Largest terms of {result.target}", fontsize="medium")
    return fig
