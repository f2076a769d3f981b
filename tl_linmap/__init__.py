"""tl_linmap: a TransformerLens model's inference on one input as an exact linear system."""

from tl_linmap.analysis import (
    effective_rank,
    energy_rank,
    nearest_tokens,
    stable_rank,
    top_singular,
    top_tokens,
    unembed,
)
from tl_linmap.decomposition import (
    Attribution,
    LinearMaps,
    layer_maps,
    nonlinearity_gap,
    token_attribution,
)
from tl_linmap.errors import (
    FreezeError,
    InputError,
    LinmapError,
    MemoryBudgetError,
    UnsupportedArchitectureError,
)
from tl_linmap.freezing import freeze_hooks, frozen, replay_hooks, same_path_hooks
from tl_linmap.loading import BUNDLED, load_model
from tl_linmap.maps import LinearMap, linear_map, linear_maps
from tl_linmap.operators import (
    Contributions,
    MatrixFree,
    matrix_free,
    randomized_svd,
    token_contributions,
)
from tl_linmap.plotting import (
    plot_contribution_heatmap,
    plot_decoded,
    plot_logit_contributions,
    plot_spectra,
)
from tl_linmap.rules import FREEZE_RULES
from tl_linmap.steering import concept_vector, steering_hooks

__all__ = [
    "BUNDLED",
    "FREEZE_RULES",
    "Attribution",
    "Contributions",
    "FreezeError",
    "InputError",
    "LinearMap",
    "LinearMaps",
    "LinmapError",
    "MatrixFree",
    "MemoryBudgetError",
    "UnsupportedArchitectureError",
    "concept_vector",
    "effective_rank",
    "energy_rank",
    "freeze_hooks",
    "frozen",
    "layer_maps",
    "linear_map",
    "linear_maps",
    "load_model",
    "matrix_free",
    "nearest_tokens",
    "nonlinearity_gap",
    "plot_contribution_heatmap",
    "plot_decoded",
    "plot_logit_contributions",
    "plot_spectra",
    "randomized_svd",
    "replay_hooks",
    "same_path_hooks",
    "stable_rank",
    "steering_hooks",
    "token_attribution",
    "token_contributions",
    "top_singular",
    "top_tokens",
    "unembed",
]
