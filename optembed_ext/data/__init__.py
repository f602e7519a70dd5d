"""Datasets: raw-format loaders with a preprocessing cache, synthetic planted-signal data, batching.

Public API::

    FeatureMap, CTRSplit, CTRDataset                # containers (types.py)
    load_dataset(name, data_dir=None, *, cache_dir=None, min_count=None, split="random", seed=2022,
                 ratios=(0.8, 0.1, 0.1), strict=False, max_rows=None, progress=True, **kwargs)
    preprocess(name, data_dir, cache_dir=None, *, min_count=None, strict=False, max_rows=None,
               chunk_rows=100_000, progress=True, force=False, **options) -> PreprocessResult
    make_synthetic(num_samples=20000, num_fields=8, vocab_sizes=100, informative_fields=None, seed=0, ...)
    batches(split, batch_size, *, shuffle=False, seed=0, epoch=0, drop_last=False)

    list_caches(root) -> [CacheEntry]; clean_caches(root, statuses=..., datasets=None, dry_run=False)
    DataError, DataFormatError, MalformedRowError, DataFileNotFoundError, DataUsageError, CacheError  # errors.py

Field lists and preprocessing rules of each dataset: see ``optembed_ext.data.formats``; the cache:
``optembed_ext.data.cache``; the error types: ``optembed_ext.data.errors``.
"""
from .batching import batches, make_splits, split_indices
from .cache import CacheEntry, clean_caches, list_caches, verify_cache
from .errors import CacheError, DataError, DataFileNotFoundError, DataFormatError, DataUsageError, MalformedRowError
from .loaders import DATASETS, DEFAULT_MIN_COUNT, PreprocessResult, canonical_name, load_dataset, load_vocab, preprocess
from .synthetic import make_synthetic
from .types import CTRDataset, CTRSplit, FeatureMap

__all__ = [
    "FeatureMap", "CTRSplit", "CTRDataset",
    "load_dataset", "preprocess", "PreprocessResult", "load_vocab", "canonical_name", "DATASETS",
    "DEFAULT_MIN_COUNT", "make_synthetic", "batches", "make_splits", "split_indices",
    "CacheEntry", "list_caches", "clean_caches", "verify_cache",
    "DataError", "DataFormatError", "MalformedRowError", "DataFileNotFoundError", "DataUsageError", "CacheError",
]
