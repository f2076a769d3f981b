"""Deprecated module: see `tl_linmap.spectral`, `tl_linmap.readout` and `tl_linmap.results`."""

from tl_linmap.base.deprecation import forwarder
from tl_linmap.reading import spectral


def source_tokens(lm):
    """the map's ``sources`` property"""
    return lm.sources


def stacked_tokens(lm, skip_first):
    """tl_linmap.spectral.stacked_tokens(lm.position, skip_first)"""
    return spectral.stacked_tokens(lm.position, skip_first)


def operator_svd(lm, k=None, *, skip_first=False):
    """LinearMap.svd"""
    return lm.svd(k, skip_first=skip_first)


def dimensionality(lm, *, skip_first=False, per_token=True):
    """LinearMap.dimensionality"""
    return lm.dimensionality(skip_first=skip_first, per_token=per_token)


def logit_contributions(result, token):
    """the result's logit_contributions method"""
    return result.logit_contributions(token)


__getattr__ = forwarder(
    "tl_linmap.analysis", ["tl_linmap.reading.spectral", "tl_linmap.results.svd", "tl_linmap.results.logit_split", "tl_linmap.reading.tokens", "tl_linmap.results.maps"],
    {"Readout": ("tl_linmap.reading.tokens", "TokenReader")},
    adapters={f.__name__: f for f in (source_tokens, stacked_tokens, operator_svd, dimensionality, logit_contributions)},
)
del source_tokens, stacked_tokens, operator_svd, dimensionality, logit_contributions
