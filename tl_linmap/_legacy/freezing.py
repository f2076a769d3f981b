"""Deprecated module: see `tl_linmap.hooks`."""

from tl_linmap.base.deprecation import forwarder

__getattr__ = forwarder("tl_linmap.freezing", ["tl_linmap.freeze.hooks", "tl_linmap.freeze.factors", "tl_linmap.freeze.apply"])
