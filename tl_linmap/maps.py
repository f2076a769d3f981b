"""Deprecated module: see `tl_linmap.jacobian`, `tl_linmap.results` and `tl_linmap.budget`."""

from tl_linmap._deprecated import forwarder

__getattr__ = forwarder(
    "tl_linmap.maps", ["tl_linmap.jacobian", "tl_linmap.results", "tl_linmap.budget"],
    {"plan_chunk": ("tl_linmap.budget", "plan_rows"), "_relative": ("tl_linmap.exactness", "relative")},
)
