"""Presenting values: notebook HTML and text views, circuitsvis views (`views`), matplotlib figures.
Knows no result class: `tl_linmap.results.maps` draws itself through it."""
