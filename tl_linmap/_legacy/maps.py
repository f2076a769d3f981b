"""Deprecated module: see `tl_linmap.jacobian`, `tl_linmap.results` and `tl_linmap.budget`."""

from tl_linmap.base import budget
from tl_linmap.base.deprecation import forwarder


def plan_chunk(model, n_tokens, d_out, n_targets, dtype, chunk_size, device):
    """tl_linmap.base.budget.plan_rows"""
    return budget.plan_rows(model, n_tokens, d_out, n_targets, dtype, chunk_size, device)


__getattr__ = forwarder(
    "tl_linmap.maps", ["tl_linmap.linear.dense", "tl_linmap.results.maps", "tl_linmap.base.budget"],
    {"_relative": ("tl_linmap.base.exactness", "relative")}, adapters={"plan_chunk": plan_chunk},
)
del plan_chunk
