"""Results: what the linear maps and the methods return (`LinearMap`, `Contributions`, `LinearMaps`,
attributions, SVDs, logit splits, patching, sequence, corpus and expert results), with their
tables, views and plots."""

from tl_linmap.base.deprecation import forwarder

# `tl_linmap.results` was one module before the subpackages: its names, for one release.
__getattr__ = forwarder("tl_linmap.results", ["tl_linmap.results.maps", "tl_linmap.results.attribution"])
