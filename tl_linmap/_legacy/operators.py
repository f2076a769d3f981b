"""Deprecated module: see `tl_linmap.implicit`, `tl_linmap.results` and `tl_linmap.budget`."""

from tl_linmap.base.deprecation import forwarder

__getattr__ = forwarder("tl_linmap.operators", ["tl_linmap.linear.matrix_free", "tl_linmap.results.maps", "tl_linmap.base.budget"])
