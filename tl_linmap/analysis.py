"""Deprecated module: see `tl_linmap.spectral`, `tl_linmap.readout` and `tl_linmap.results`."""

from tl_linmap._deprecated import forwarder

__getattr__ = forwarder("tl_linmap.analysis", ["tl_linmap.spectral", "tl_linmap.readout", "tl_linmap.results"])
