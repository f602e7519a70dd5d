"""optembed-ext: fused kernels and a search pipeline for learned embedding-table compression in CTR models.

Submodules are imported on first use, so ``import optembed_ext`` stays cheap:

- ``optembed_ext.ops``        fused torch ops (``torch.ops.optembed.*``) with autograd and fake kernels
- ``optembed_ext.reference``  the pure-PyTorch reference of every op
- ``optembed_ext.nn``         embedding modules (uniform, OptEmbed, compact, PEP, AutoDim, QR, AutoField)
- ``optembed_ext.models``     CTR backbones (FM, DeepFM, DCN, FNN, IPNN, Wide&Deep, AutoInt)
- ``optembed_ext.data``       dataset loaders, preprocessing cache, synthetic data
- ``optembed_ext.train``      trainer, its optimizers, metrics, checkpoints
- ``optembed_ext.results``    what a finished run leaves behind (result rows, searched tables) and how to reload it
- ``optembed_ext.export``     physically compact export of a searched model
- ``optembed_ext.search``     the ``Method`` interface and registry: OptEmbed, the baselines, the comparison harness
- ``optembed_ext.cli``        the ``optembed`` command line

Imports point down this list (``docs/architecture.md``).
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("ops", "reference", "nn", "models", "data", "train", "results", "search", "export", "optim")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
