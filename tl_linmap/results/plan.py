"""Plan: what `tl_linmap.plan` predicts of a run before it starts (peak memory per device, time, route, rows).

A result like the others: it prints, shows as a table, and `Plan.check` refuses a run that
will not fit with the plan's own numbers (the entry points call it before any work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tl_linmap.base.errors import MemoryBudgetError
from tl_linmap.base.saving import Saveable
from tl_linmap.base.table import Table, table_row

_GIB = 2**30


@table_row
@dataclass(frozen=True)
class DevicePeak:
    """One device's share of a plan, in GiB (one row of `Plan.to_table`).

    Attributes:
        device: The device's name.
        capacity_gib: Memory the run may use there (free memory, or a named card's memory).
        weights_gib: The model's own weights placed there, in their own dtype.
        casts_gib: Weights cast to the working dtype (non-block parameters, and one block or
            every block: see `tl_linmap.linear.plan`).
        work_gib: Frozen factors, the autograd graph where the route keeps one, and the rows in flight.
        results_gib: What the run stores (dense operators, a graph's rows).
        peak_gib: The predicted peak: the larger of the set-up (reference forward, logits) and the passes.
        fits: Whether the peak fits the capacity.
    """

    device: str
    capacity_gib: float
    weights_gib: float
    casts_gib: float
    work_gib: float
    results_gib: float
    peak_gib: float
    fits: bool


@dataclass(frozen=True)
class Plan(Saveable):
    """A run's predicted peak memory per device and time, and the route and rows per pass it takes.

    Attributes:
        what: The entry point planned (``"linear_map"``, ``"token_contributions"``,
            ``"matrix_free"``, ``"attribution_graph"``).
        model: The model's name.
        n_tokens: Prompt length.
        dtype: Working dtype's name.
        route: ``"rows"`` or ``"columns"`` (`linear_map`), ``"tokens"``, ``"products"``, ``"graph rows"``.
        rows_per_pass: Rows (or tokens) per pass, as the run picks them (the same budget functions).
        devices: Per device, its `DevicePeak`.
        flops: Floating-point operations the route counts.
        rate: FLOP/s assumed or measured on the first device (None: not asked for, as in the
            entry points' own check).
        seconds: ``flops / rate`` (NaN without a rate).
        reason: Why it does not fit ("" when it does).
    """

    what: str
    model: str
    n_tokens: int
    dtype: str
    route: str
    rows_per_pass: int
    devices: tuple[DevicePeak, ...]
    flops: float
    rate: float | None
    seconds: float
    reason: str = ""

    @property
    def fits(self) -> bool:
        """Whether the run fits: every device's peak within its capacity and the budget's rows found."""
        return not self.reason and all(d.fits for d in self.devices)

    @property
    def peak_bytes(self) -> tuple[int, ...]:
        """Predicted peak bytes per device."""
        return tuple(int(d.peak_gib * _GIB) for d in self.devices)

    def to_table(self) -> Table:
        """The plan per device.

        Returns:
            A `tl_linmap.Table` of `DevicePeak` rows.
        """
        return Table(self.devices)

    def _time(self) -> str:
        if self.rate is None or math.isnan(self.seconds):
            return "time not predicted"
        return f"{self.seconds:.3g} s at {self.rate / 1e12:.3g} TFLOP/s ({self.flops:.3g} FLOP)"

    def __repr__(self) -> str:
        peaks = ", ".join(f"{d.peak_gib:.2f} of {d.capacity_gib:.2f} GiB on {d.device}" for d in self.devices)
        verdict = "fits" if self.fits else f"does not fit: {self.reason or 'over capacity'}"
        return (
            f"Plan({self.what} of {self.model}, {self.n_tokens} tokens in {self.dtype}: route {self.route!r}, "
            f"{self.rows_per_pass} rows per pass; peak {peaks}; {verdict}; {self._time()})"
        )

    def _repr_html_(self) -> str:
        return f"<p>{self!r}</p>" + self.to_table()._repr_html_()

    def check(self) -> Plan:
        """Refuse a run that will not fit, with the plan's numbers.

        Returns:
            The plan itself, when it fits.

        Raises:
            MemoryBudgetError: naming each device over its capacity (peak and capacity in GiB), or
                why no rows per pass fit.
        """
        if self.fits:
            return self
        over = [d for d in self.devices if not d.fits]
        detail = "; ".join(
            f"{d.device}: peak {d.peak_gib:.2f} GiB (weights {d.weights_gib:.2f}, casts {d.casts_gib:.2f}, "
            f"work {d.work_gib:.2f}, results {d.results_gib:.2f}) with {d.capacity_gib:.2f} GiB to use"
            for d in over
        )
        raise MemoryBudgetError(
            f"{self.what} of {self.model} on {self.n_tokens} tokens in {self.dtype} will not fit, so nothing ran: "
            f"{self.reason or detail}. Use a shorter prompt, fewer targets, a narrower dtype or more devices "
            "(tl_linmap.plan predicts each)."
        )
