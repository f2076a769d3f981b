"""Deprecated module: see `tl_linmap.hooks`."""

from tl_linmap._deprecated import forwarder

__getattr__ = forwarder("tl_linmap.freezing", ["tl_linmap.hooks"])
