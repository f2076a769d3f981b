"""Results of attribution patching, in the layouts of ``transformer_lens.patching``."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tl_linmap.base.checks import check_names
from tl_linmap.base.errors import InputError
from tl_linmap.base.saving import Saveable
from tl_linmap.base.table import Table, table_row
from tl_linmap.present import display
from tl_linmap.reading.readouts import LogitMetric


@dataclass(frozen=True)
class Layout:
    """One result layout of ``transformer_lens.patching``.

    Attributes:
        acts: The activation names patched (``get_act_name`` short names), one per leading
            "patch type" row; a single one has no such axis.
        axes: The axes after the patch-type axis, as ``transformer_lens.patching`` names them.
        function: The ``transformer_lens.patching`` function with this layout.
    """

    acts: tuple[str, ...]
    axes: tuple[str, ...]
    function: str


def _layouts() -> dict[str, Layout]:
    layouts = {name: Layout((name,), ("layer", "pos"), f"get_act_patch_{name}") for name in ("resid_pre", "resid_mid", "attn_out", "mlp_out")}
    for part, act in (("out", "z"), ("q", "q"), ("k", "k"), ("v", "v")):
        layouts[f"attn_head_{part}_all_pos"] = Layout((act,), ("layer", "head"), f"get_act_patch_attn_head_{part}_all_pos")
        layouts[f"attn_head_{part}_by_pos"] = Layout((act,), ("layer", "pos", "head"), f"get_act_patch_attn_head_{part}_by_pos")
    layouts["block_every"] = Layout(("resid_pre", "attn_out", "mlp_out"), ("layer", "pos"), "get_act_patch_block_every")
    return layouts


#: Every layout by name: the name of the ``transformer_lens.patching`` function without
#: ``get_act_patch_``. Head layouts of ``k`` and ``v`` have ``n_key_value_heads`` heads (GQA).
LAYOUTS = _layouts()


def check_layouts(layouts: Sequence[str] | None) -> list[str]:
    """Validate ``layouts=``.

    Args:
        layouts: Layout names (see `LAYOUTS`), or None for all of them.

    Returns:
        The names as a list.

    Raises:
        InputError: for a single string, an empty list or an unknown name (naming the closest).
    """
    if layouts is None:
        return list(LAYOUTS)
    names = check_names("layouts", layouts, "['resid_pre', 'attn_head_out_all_pos']")
    if not names:
        raise InputError("layouts is empty: give at least one layout such as 'resid_pre', or None for all.")
    for name in names:
        if name not in LAYOUTS:
            close = difflib.get_close_matches(str(name), LAYOUTS, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise InputError(f"Unknown patching layout {name!r}.{hint} The layouts are {', '.join(LAYOUTS)}.")
    return list(dict.fromkeys(names))


@table_row
@dataclass
class PatchComparison:
    """A linear prediction of patching next to true activation patching, in one layout.

    Attributes:
        layout: Layout name.
        mode: ``"detached"`` or ``"gradient"``.
        correlation: Pearson correlation over the cells (nan where either is constant).
        relative_error: ``‖predicted − actual‖ / ‖actual‖``.
        worst_cell: Index of the cell with the largest miss (in the layout's axes).
        predicted: The prediction there.
        actual: The true Δmetric there.
    """

    layout: str
    mode: str
    correlation: float
    relative_error: float
    worst_cell: tuple[int, ...]
    predicted: float
    actual: float


@table_row
@dataclass
class LayoutRow:
    """One layout of a `PatchingAttribution`, summarised.

    Attributes:
        layout: Layout name.
        axes: Its axes (with the patch-type axis of ``block_every`` first).
        largest_cell: Index of the patch predicted to move the metric most (either way).
        largest: Its predicted Δmetric.
        mean_abs: Mean ``|Δmetric|`` over the cells.
    """

    layout: str
    axes: str
    largest_cell: tuple[int, ...]
    largest: float
    mean_abs: float


def correlation(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two tensors' cells.

    Args:
        a: Any tensor.
        b: A tensor of the same number of cells.

    Returns:
        The correlation, nan when either is constant.
    """
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.norm() * b.norm()).item()
    return (a @ b).item() / denominator if denominator > 0 else float("nan")


@dataclass
class PatchingAttribution(Saveable):
    """Predicted Δmetric of every activation patch of a clean/corrupted pair, per layout.

    ``values[layout]`` has the shape ``transformer_lens.patching``'s function of that layout
    returns (`LAYOUTS`); each cell is the predicted change of the metric when that activation
    of the clean run is replaced by the corrupted run's (for ``attn_head_*_all_pos``: that
    head at every position at once).

    Attributes:
        mode: ``"detached"`` (frozen clean system) or ``"gradient"`` (plain gradient).
        metric: The metric.
        values: Predicted Δmetric per layout.
        clean_metric: The metric of the clean run.
        corrupted_metric: The metric of the corrupted run.
        clean_tokens: The clean prompt's tokens as strings.
        corrupted_tokens: The corrupted prompt's.
    """

    mode: str
    metric: LogitMetric
    values: dict[str, Tensor] = field(repr=False)
    clean_metric: float
    corrupted_metric: float
    clean_tokens: list[str] = field(repr=False)
    corrupted_tokens: list[str] = field(repr=False)

    _STR_TOKENS = "clean_tokens"

    def __getitem__(self, layout: str) -> Tensor:
        """The predicted Δmetric of one layout.

        Args:
            layout: Layout name (see `LAYOUTS`).

        Returns:
            The tensor, in ``transformer_lens.patching``'s shape for that layout.

        Raises:
            InputError: for a layout that was not computed.
        """
        if layout not in self.values:
            raise InputError(f"No layout {layout!r} here; computed: {', '.join(self.values)}. Pass layouts=[{layout!r}].")
        return self.values[layout]

    def patched(self, layout: str) -> Tensor:
        """The predicted metric of each patched run: ``clean_metric + Δmetric``.

        This is what ``transformer_lens.patching``'s function returns for the same patches
        (called with the clean tokens as its ``corrupted_tokens`` and the corrupted cache).

        Args:
            layout: Layout name.

        Returns:
            The tensor.
        """
        return self.clean_metric + self[layout]

    @property
    def labels(self) -> list[str]:
        """One label per position: the clean token, or ``clean→corrupted`` where they differ."""
        return [c if c == k else f"{c}→{k}" for c, k in zip(self.clean_tokens, self.corrupted_tokens)]

    def compare(self, layout: str, actual: Tensor, *, baseline: float | None = None) -> PatchComparison:
        """This prediction next to true activation patching of the same patches.

        Args:
            layout: Layout name.
            actual: The metric of each truly patched run, as ``transformer_lens.patching``'s
                function of that layout returns it (clean run, corrupted activations).
            baseline: The metric of the unpatched clean run ``actual`` is measured against
                (default: ``clean_metric``; pass the one of the forward that produced ``actual``).

        Returns:
            A `PatchComparison`.

        Raises:
            InputError: for a layout not computed or an ``actual`` of another shape.
        """
        predicted = self[layout].detach().cpu().double()
        actual = torch.as_tensor(actual).detach().cpu().double()
        if actual.shape != predicted.shape:
            raise InputError(f"actual has shape {tuple(actual.shape)}, but layout {layout!r} has {tuple(predicted.shape)}.")
        delta = actual - (self.clean_metric if baseline is None else baseline)
        miss = (predicted - delta).abs()
        worst = tuple(int(i) for i in torch.unravel_index(miss.argmax(), miss.shape))
        norm = delta.norm().item()
        return PatchComparison(
            layout=layout,
            mode=self.mode,
            correlation=correlation(predicted, delta),
            relative_error=(predicted - delta).norm().item() / norm if norm > 0 else float("nan"),
            worst_cell=worst,
            predicted=predicted[worst].item(),
            actual=delta[worst].item(),
        )

    def compare_all(self, actuals: Mapping[str, Tensor], *, baseline: float | None = None) -> Table:
        """`compare` for several layouts.

        Args:
            actuals: True patching results by layout name.
            baseline: See `compare`.

        Returns:
            A `tl_linmap.base.table.Table` of `PatchComparison`, one row per layout.
        """
        return Table(self.compare(layout, actual, baseline=baseline) for layout, actual in actuals.items())

    def plot(self, layout: str, *, ax=None):
        """Heatmap of one layout (see `tl_linmap.present.plotting.plot_patching`).

        Args:
            layout: Layout name.
            ax: Matplotlib axes to draw into (default: a new figure).

        Returns:
            The Figure.
        """
        from tl_linmap.present.plotting import plot_patching

        return plot_patching(self[layout], layout, labels=self.labels, title=f"{self.mode} attribution patching: {layout}", ax=ax)

    def __repr__(self) -> str:
        return (
            f"PatchingAttribution({self.mode}, metric {self.metric}; clean {self.clean_metric:.4g}, "
            f"corrupted {self.corrupted_metric:.4g}; layouts {', '.join(self.values)})"
        )

    def _repr_html_(self) -> str:
        facts = [("mode", self.mode, False), ("metric", str(self.metric), False), ("clean metric", f"{self.clean_metric:.4g}", True),
                 ("corrupted metric", f"{self.corrupted_metric:.4g}", True), ("positions", " ".join(map(repr, self.labels)), False)]
        return display.summary_html(f"{self.mode.capitalize()} attribution patching", facts, self.to_table()._repr_html_())

    def to_table(self) -> Table:
        """One row per layout computed: its largest predicted patch and the mean effect.

        Returns:
            A `tl_linmap.base.table.Table` of `LayoutRow` (`compare_all` puts a prediction next to true patching).
        """
        rows = Table()
        for layout, values in self.values.items():
            values = values.detach().cpu().double()
            cell = tuple(int(i) for i in torch.unravel_index(values.abs().argmax(), values.shape))
            kinds = ("patch type",) if len(LAYOUTS[layout].acts) > 1 else ()
            rows.append(LayoutRow(layout, " x ".join(kinds + LAYOUTS[layout].axes), cell, values[cell].item(), values.abs().mean().item()))
        return rows
