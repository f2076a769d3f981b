"""tl_linmap: a TransformerLens model's inference on one input as an exact linear system."""

from tl_linmap.decomposition import layer_maps, nonlinearity_gap, token_attribution
from tl_linmap.errors import (
    FreezeError,
    InputError,
    LinmapError,
    MemoryBudgetError,
    UnsupportedArchitectureError,
)
from tl_linmap.exactness import tolerance
from tl_linmap.hooks import freeze_hooks, frozen, replay_hooks, same_path_hooks
from tl_linmap.implicit import (
    MatrixFree,
    matrix_free,
    randomized_svd,
    token_contributions,
)
from tl_linmap.jacobian import linear_map, linear_maps
from tl_linmap.loading import BUNDLED, load_model
from tl_linmap.plotting import (
    plot_contribution_heatmap,
    plot_decoded,
    plot_logit_contributions,
    plot_spectra,
)
from tl_linmap.readout import nearest_tokens, top_tokens, unembed
from tl_linmap.results import Attribution, Contributions, GapRow, LinearMap, LinearMaps
from tl_linmap.rules import SUPPORTED
from tl_linmap.spectral import (
    DecodedPair,
    LogitSplit,
    OperatorSVD,
    RankRow,
    effective_rank,
    energy_rank,
    stable_rank,
)
from tl_linmap.steering import (
    Steering,
    alpha_sweep,
    concept_vector,
    steering_hooks,
    word_tokens,
)
from tl_linmap.table import Table


def __getattr__(name: str):
    # Public names kept for one release.
    if name == "top_singular":
        from tl_linmap.spectral import top_singular

        return top_singular
    raise AttributeError(f"module 'tl_linmap' has no attribute {name!r}")

__all__ = [
    "BUNDLED",
    "SUPPORTED",
    "Attribution",
    "Contributions",
    "DecodedPair",
    "FreezeError",
    "GapRow",
    "InputError",
    "LinearMap",
    "LinearMaps",
    "LinmapError",
    "LogitSplit",
    "MatrixFree",
    "MemoryBudgetError",
    "OperatorSVD",
    "RankRow",
    "Steering",
    "Table",
    "UnsupportedArchitectureError",
    "alpha_sweep",
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
    "tolerance",
    "top_tokens",
    "unembed",
    "word_tokens",
]
