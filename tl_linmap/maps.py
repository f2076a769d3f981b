"""Deprecated module: see `tl_linmap.jacobian`, `tl_linmap.results` and `tl_linmap.budget`."""

from tl_linmap import budget
from tl_linmap._deprecated import forwarder


def plan_chunk(model, n_tokens, d_out, n_targets, dtype, chunk_size, device):
    """tl_linmap.budget.plan_rows"""
    return budget.plan_rows(model, n_tokens, d_out, n_targets, dtype, chunk_size, device)


__getattr__ = forwarder(
    "tl_linmap.maps", ["tl_linmap.jacobian", "tl_linmap.results", "tl_linmap.budget"],
    {"_relative": ("tl_linmap.exactness", "relative")}, adapters={"plan_chunk": plan_chunk},
)
del plan_chunk
