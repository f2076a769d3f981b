"""tl_linmap: a TransformerLens model's inference on one input as an exact linear system."""

from tl_linmap import datasets
from tl_linmap.corpus import CorpusAnalysis, corpus_analysis
from tl_linmap.decomposition import layer_maps, nonlinearity_gap, token_attribution
from tl_linmap.errors import (
    FreezeError,
    InputError,
    LinmapError,
    MemoryBudgetError,
    UnsupportedArchitectureError,
)
from tl_linmap.exactness import tolerance
from tl_linmap.functionals import Direction, LinearReadout, Logit, LogitDiff
from tl_linmap.hooks import freeze_hooks, frozen, replay_hooks, same_path_hooks
from tl_linmap.implicit import (
    MatrixFree,
    Pushed,
    matrix_free,
    push_forward,
    randomized_svd,
    token_contributions,
)
from tl_linmap.jacobian import linear_map, linear_maps
from tl_linmap.loading import BUNDLED, load_model
from tl_linmap.patching import (
    PatchComparison,
    PatchingAttribution,
    attribution_patching,
    prompt_pairs,
)
from tl_linmap.plotting import (
    plot_contribution_heatmap,
    plot_decoded,
    plot_logit_contributions,
    plot_patching,
    plot_sequence_attribution,
    plot_spectra,
)
from tl_linmap.readout import nearest_tokens, top_tokens, unembed
from tl_linmap.results import Attribution, Contributions, GapRow, LinearMap, LinearMaps
from tl_linmap.rules import SUPPORTED
from tl_linmap.sequence import (
    SequenceAttribution,
    SequenceRow,
    generation_attribution,
    sequence_attribution,
)
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
    OperatorSteering,
    Steering,
    alpha_sweep,
    compare_methods,
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
    "CorpusAnalysis",
    "DecodedPair",
    "Direction",
    "FreezeError",
    "GapRow",
    "InputError",
    "LinearMap",
    "LinearMaps",
    "LinearReadout",
    "LinmapError",
    "Logit",
    "LogitDiff",
    "LogitSplit",
    "MatrixFree",
    "MemoryBudgetError",
    "OperatorSVD",
    "OperatorSteering",
    "PatchComparison",
    "PatchingAttribution",
    "Pushed",
    "RankRow",
    "SequenceAttribution",
    "SequenceRow",
    "Steering",
    "Table",
    "UnsupportedArchitectureError",
    "alpha_sweep",
    "attribution_patching",
    "compare_methods",
    "concept_vector",
    "corpus_analysis",
    "datasets",
    "effective_rank",
    "energy_rank",
    "freeze_hooks",
    "frozen",
    "generation_attribution",
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
    "plot_patching",
    "plot_sequence_attribution",
    "plot_spectra",
    "prompt_pairs",
    "push_forward",
    "randomized_svd",
    "replay_hooks",
    "same_path_hooks",
    "sequence_attribution",
    "stable_rank",
    "steering_hooks",
    "token_attribution",
    "token_contributions",
    "tolerance",
    "top_tokens",
    "unembed",
    "word_tokens",
]
