"""Getting models and data: `load_model` (hub names, local directories, GGUF files, bundled models),
the converted-model cache, random-weight toy models, the bundled phrases and prompt pairs, SAEs.

The package is also callable: ``tl_linmap.load(path)`` reads back a result a ``.save(path)`` wrote
(`tl_linmap.load.saved.load`).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    # So that ``tl_linmap.load(path)`` works however the package was first imported: a function of that
    # name would be replaced by this package the first time one of its modules is imported.
    def __call__(self, path):
        from tl_linmap.load.saved import load

        return load(path)


sys.modules[__name__].__class__ = _CallablePackage
