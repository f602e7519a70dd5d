"""Embedding modules: every compression method is an :class:`EmbeddingModule` that plugs into every model.

==========================  ==========================================================================
module                      method
==========================  ==========================================================================
``UniformEmbedding``        the plain ``(N, D)`` table (the original model)
``OptEmbedEmbedding``       OptEmbed: learned row pruning + searched field dims (Lyu et al., CIKM 2022)
``CompactEmbedding``        the served form of a searched table: kept rows only, each field at its dim
``PEPEmbedding``            PEP: learnable soft thresholds, element-wise pruning (Liu et al., ICLR 2021)
``AutoDimEmbedding``        AutoDim supernet: weighted candidate dims per field (Zhao et al., WWW 2021)
``MixedDimEmbedding``       AutoDim's retraining table: one chosen dim per field
``QREmbedding``             quotient-remainder compositional embeddings (Shi et al., KDD 2020)
``AutoFieldEmbedding``      AutoField supernet: learned field selection gates (Wang et al., WWW 2022)
``FieldSelectedEmbedding``  AutoField's retraining table: the selected fields only
==========================  ==========================================================================

Module-level helpers that plug the tables into any PyTorch CTR code (:mod:`.plugin`): ``make_optimizer``,
``regularization``, ``SupernetHook``, ``to_compact`` (the dims search on any model and the table swap of foreign
models: ``optembed_ext.integrations.search_dims`` / ``replace_embeddings``); every table has
``from_cardinalities(cards, dim, local_ids=True)``.

Every module imports only :mod:`torch` and :mod:`.base` at import time (the compiled ops are loaded on first use),
so importing this package is cheap and cycle-free.
"""
from .autodim import AutoDimEmbedding, MixedDimEmbedding
from .autofield import AutoFieldEmbedding, FieldSelectedEmbedding
from .base import EmbeddingModule
from .compact import CompactEmbedding
from .optembed import OptEmbedEmbedding
from .pep import PEPEmbedding
from .plugin import (CombinedOptimizer, SupernetHook, describe, embedding_modules, make_optimizer, make_table,
                     regularization, sparsity, to_compact)
from .qr import QREmbedding
from .uniform import UniformEmbedding

__all__ = [
    "EmbeddingModule",
    "UniformEmbedding",
    "OptEmbedEmbedding",
    "CompactEmbedding",
    "PEPEmbedding",
    "AutoDimEmbedding",
    "MixedDimEmbedding",
    "QREmbedding",
    "AutoFieldEmbedding",
    "FieldSelectedEmbedding",
    "CombinedOptimizer",
    "SupernetHook",
    "describe",
    "embedding_modules",
    "make_optimizer",
    "make_table",
    "regularization",
    "sparsity",
    "to_compact",
]
