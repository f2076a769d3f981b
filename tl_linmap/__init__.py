"""tl_linmap: a TransformerLens model's inference on one input as an exact linear system.

Every public name is loaded on first use from the module that defines it (`PUBLIC`), so
``import tl_linmap`` costs little and plotting, loading and the corpus tools load only when used.
"""

import importlib
import sys
import types
import warnings

import tl_linmap.load  # noqa: F401 - made callable below
from tl_linmap import _legacy

_legacy.install()


class _LoadPackage(types.ModuleType):
    """``tl_linmap.load`` is the loading subpackage and, called, `tl_linmap.load.saved.load`: a function of that
    name would be replaced by the subpackage the first time one of its modules is imported."""

    def __call__(self, path, model=None):
        """Load a result a ``.save(path)`` wrote: `tl_linmap.load.saved.load`.

        Args:
            path: The file.
            model: The model the result was computed with (optional: without it the result keeps what it saved of it).

        Returns:
            The result.
        """
        return importlib.import_module("tl_linmap.load.saved").load(path, model)


sys.modules["tl_linmap.load"].__class__ = _LoadPackage

#: Public name -> the module that defines it.
PUBLIC: dict[str, str] = {
    **dict.fromkeys(["FreezeError", "InputError", "LinmapError", "MemoryBudgetError", "UnsupportedArchitectureError"], "base.errors"),
    "tolerance": "base.exactness",
    "Table": "base.table",
    **dict.fromkeys(["CenteredLogit", "Direction", "LinearReadout", "Logit", "LogitCombination", "LogitDiff"], "reading.readouts"),
    **dict.fromkeys(["nearest_tokens", "top_tokens", "unembed"], "reading.tokens"),
    **dict.fromkeys(["effective_rank", "energy_rank", "stable_rank"], "reading.spectral"),
    "SUPPORTED": "freeze.architectures",
    **dict.fromkeys(["freeze_hooks", "replay_hooks", "same_path_hooks"], "freeze.hooks"),
    "frozen": "freeze.apply",
    "Dictionary": "freeze.dictionary",
    "spliced": "freeze.splicing",
    "feature_contributions": "linear.features",
    "attribution_graph": "linear.graph",
    "Graph": "results.graph",
    **dict.fromkeys(["FeatureContributions", "FeaturePatching"], "results.features"),
    **dict.fromkeys([
        "plot_contribution_heatmap", "plot_decoded", "plot_logit_contributions", "plot_patching",
        "plot_sequence_attribution", "plot_spectra",
    ], "present.plotting"),
    **dict.fromkeys(["Contributions", "LinearMap", "LinearMaps"], "results.maps"),
    **dict.fromkeys(["Attribution", "GapRow"], "results.attribution"),
    **dict.fromkeys(["DecodedPair", "OperatorSVD", "RankRow"], "results.svd"),
    "LogitSplit": "results.logit_split",
    **dict.fromkeys(["PatchComparison", "PatchingAttribution"], "results.patching"),
    **dict.fromkeys(["SequenceAttribution", "SequenceRow"], "results.sequence"),
    "CorpusAnalysis": "results.corpus",
    **dict.fromkeys(["linear_map", "linear_maps"], "linear.dense"),
    **dict.fromkeys(["MatrixFree", "Pushed", "matrix_free", "push_forward", "randomized_svd", "token_contributions"], "linear.matrix_free"),
    **dict.fromkeys(["ModelShape", "plan"], "linear.plan"),
    "Plan": "results.plan",
    "load_model": "load.models",
    **dict.fromkeys(["bundled_saes", "load_sae", "sae_stats"], "load.saes"),
    "BUNDLED": "load.bundled",
    "prompt_pairs": "load.datasets",
    **dict.fromkeys(["layer_maps", "nonlinearity_gap", "token_attribution"], "methods.decomposition"),
    **dict.fromkeys(["generation_attribution", "sequence_attribution"], "methods.sequence"),
    "attribution_patching": "methods.patching",
    **dict.fromkeys([
        "OperatorSteering", "Steering", "alpha_sweep", "compare_methods", "concept_vector", "feature_steering", "steering_hooks",
        "word_tokens",
    ], "methods.steering"),
    "corpus_analysis": "methods.corpus",
    **dict.fromkeys(["FeatureMap", "feature_map", "feature_patching", "feature_sources"], "methods.features"),
}
#: Public modules reached as attributes (``tl_linmap.load.datasets.phrases()``).
MODULES: dict[str, str] = {"datasets": "load.datasets", "load": "load"}  # load: also callable (_LoadPackage)
#: Names kept for one release: old name -> (module, name), each use warned about.
DEPRECATED_NAMES: dict[str, tuple[str, str]] = {"top_singular": ("reading.spectral", "top_singular")}

__all__ = sorted([*PUBLIC, *MODULES])


def __getattr__(name: str):
    if name in PUBLIC:
        value = getattr(importlib.import_module(f"tl_linmap.{PUBLIC[name]}"), name)
    elif name in MODULES:
        value = importlib.import_module(f"tl_linmap.{MODULES[name]}")
    elif name in _legacy.MOVED or name in _legacy.DEPRECATED:
        return importlib.import_module(f"tl_linmap.{name}")  # an old module path (warns)
    elif name in DEPRECATED_NAMES:
        module, new = DEPRECATED_NAMES[name]
        warnings.warn(f"tl_linmap.{name} is deprecated; use tl_linmap.{module}.{new}.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"tl_linmap.{module}"), new)
    else:
        raise AttributeError(f"module 'tl_linmap' has no attribute {name!r}")
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
