"""The linear maps: dense operators by rows or columns (`linear_map`, `linear_maps`) and the
matrix-free routes (`token_contributions`, `matrix_free`, `push_forward`, `randomized_svd`)."""
