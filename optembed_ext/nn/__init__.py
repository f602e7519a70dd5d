"""Embedding modules: every compression method is an :class:`EmbeddingModule` that plugs into every model."""
from .base import EmbeddingModule
from .uniform import UniformEmbedding

__all__ = ["EmbeddingModule", "UniformEmbedding"]
