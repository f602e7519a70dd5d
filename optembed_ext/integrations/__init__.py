"""Adapters that put the compression tables into other CTR libraries' models, in place.

* :mod:`.deepctr` -- DeepCTR-Torch (``deepctr_torch``): its ``embedding_dict``, its L2 list, its summed loss;
* :mod:`.torchfm` -- torchfm: every ``FeaturesEmbedding``;
* :mod:`.torchrec` -- TorchRec: an ``EmbeddingBagCollection`` / ``EmbeddingCollection`` (``KeyedJaggedTensor`` in,
  ``KeyedTensor`` / ``dict[str, JaggedTensor]`` out), :func:`~.torchrec.from_torchrec`;
* :mod:`.generic` -- :func:`replace_embeddings` (dispatches to the adapters, or swaps a named ``nn.Embedding``)
  and :func:`search_dims` (the evolutionary dims search on any model).

No library is imported here (the adapters work on the models' structure), so importing this package needs
none of them.
"""
from . import deepctr, torchfm, torchrec
from .generic import replace_embeddings, search_dims

__all__ = ["deepctr", "torchfm", "torchrec", "replace_embeddings", "search_dims"]
