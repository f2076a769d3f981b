"""tl_linmap: a TransformerLens model's inference on one input as an exact linear system."""

from tl_linmap.decomposition import Attribution, LinearMaps, layer_maps, nonlinearity_gap, token_attribution
from tl_linmap.errors import FreezeError, InputError, LinmapError, MemoryBudgetError, UnsupportedArchitectureError
from tl_linmap.analysis import effective_rank, energy_rank, nearest_tokens, stable_rank, top_singular, top_tokens, unembed
from tl_linmap.freezing import freeze_hooks, frozen, replay_hooks, same_path_hooks
from tl_linmap.loading import BUNDLED, load_model
from tl_linmap.maps import LinearMap, linear_map, linear_maps
from tl_linmap.operators import Contributions, MatrixFree, matrix_free, randomized_svd, token_contributions
from tl_linmap.rules import FREEZE_RULES
from tl_linmap.steering import concept_vector, steering_hooks

__all__ = [
    "Contributions",
    "MatrixFree",
    "linear_maps",
    "matrix_free",
    "randomized_svd",
    "token_contributions",
    "Attribution",
    "LinearMaps",
    "concept_vector",
    "layer_maps",
    "nonlinearity_gap",
    "steering_hooks",
    "token_attribution",
    "BUNDLED",
    "effective_rank",
    "energy_rank",
    "load_model",
    "nearest_tokens",
    "stable_rank",
    "top_singular",
    "top_tokens",
    "unembed",
    "FREEZE_RULES",
    "FreezeError",
    "InputError",
    "LinearMap",
    "LinmapError",
    "MemoryBudgetError",
    "UnsupportedArchitectureError",
    "freeze_hooks",
    "frozen",
    "linear_map",
    "replay_hooks",
    "same_path_hooks",
]
