"""Deprecated module: see `tl_linmap.implicit`, `tl_linmap.results` and `tl_linmap.budget`."""

from tl_linmap._deprecated import forwarder

__getattr__ = forwarder("tl_linmap.operators", ["tl_linmap.implicit", "tl_linmap.results", "tl_linmap.budget"])
