"""Adapters that put the compression tables into other CTR libraries' models, in place.

* :mod:`.deepctr` -- DeepCTR-Torch (``deepctr_torch``): its ``embedding_dict``, its L2 list, its summed loss;
* :mod:`.torchfm` -- torchfm: every ``FeaturesEmbedding``.

Neither library is imported here (the adapters work on the models' structure), so importing this package needs
neither of them.
"""
from . import deepctr, torchfm

__all__ = ["deepctr", "torchfm"]
