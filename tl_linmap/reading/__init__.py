"""Reading vectors: as tokens (the unembedding), as scalar readouts (logits, logit differences,
directions), as singular vectors and ranks. Imports only `tl_linmap.base`."""
