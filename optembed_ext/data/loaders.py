"""``load_dataset`` and ``preprocess``: raw file -> cached encoded arrays -> train/val/test splits.

Cache layout: ``cache_dir/<dataset>-<key>/`` with ``X.npy`` (n, F) global ids (int32 when the
table has fewer than 2**31 rows), ``y.npy`` (n,) float32, ``feature_map.json``, ``vocab.json``
(field -> tokens in local-id order) and ``meta.json`` (parameters, fingerprints of the source
files, statistics, checksums). ``<key>`` hashes the preprocessing parameters and the fingerprint
(path, size, content hash) of every raw file read, so a changed file or parameter gets a new
folder; the split is applied at load time and never invalidates the cache. Every load validates
the folder (checksums, id and label ranges) and rebuilds a corrupt one; concurrent processes
build a folder once under a file lock. Details: :mod:`optembed_ext.data.cache`.

Errors: bad input raises a :class:`~optembed_ext.data.errors.DataError` subclass
(:class:`DataFormatError` for an unusable file -- nothing is cached then --,
:class:`MalformedRowError` under ``strict``, :class:`DataFileNotFoundError` for a missing file).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _fast, _stream
from . import cache as _cache
from .batching import make_splits
from .errors import CacheError, DataError, DataUsageError, MalformedRowError
from .formats import PLANNERS, PRESETS, resolve_preset
from .types import CTRDataset, FeatureMap, _jsonable

logger = logging.getLogger("optembed_ext.data")

__all__ = ["DATASETS", "DEFAULT_MIN_COUNT", "PRESETS", "PreprocessResult", "preprocess", "load_dataset", "load_vocab",
           "canonical_name"]

FORMAT_VERSION = _cache.CACHE_FORMAT_VERSION
DATASETS = ("criteo", "avazu", "kdd12", "movielens1m", "movielens100k", "synthetic")
DEFAULT_MIN_COUNT = {"criteo": 10, "avazu": 10, "kdd12": 10, "movielens1m": 2, "movielens100k": 2}
_FAST_DATASETS = ("criteo", "avazu", "kdd12")
_ALIASES = {
    "ml-1m": "movielens1m", "ml1m": "movielens1m", "movielens-1m": "movielens1m",
    "ml-100k": "movielens100k", "ml100k": "movielens100k", "movielens-100k": "movielens100k",
    "kdd2012": "kdd12", "kddcup2012": "kdd12",
}


def canonical_name(name: str) -> str:
    """Canonical dataset name (accepts a few aliases such as ``ml-1m``); ``ValueError`` if unknown."""
    if not isinstance(name, str):
        raise DataUsageError(f"name must be a dataset name string, got {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataUsageError(f"unknown dataset name {name!r}; expected one of {list(DATASETS)}")
    return key


@dataclass
class PreprocessResult:
    """What :func:`preprocess` produced or found: encoded arrays (memory-mapped from the cache when
    there is one), the feature map and the preprocessing statistics."""

    dataset: str
    cache_path: Path | None
    feature_map: FeatureMap
    X: np.ndarray
    y: np.ndarray
    stats: dict[str, Any]
    from_cache: bool
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def rows_read(self) -> int:
        """Data lines of the main raw file read (header excluded)."""
        return int(self.stats.get("rows_read", 0))

    @property
    def malformed_rows(self) -> int:
        """Malformed lines skipped in the main raw file (side files: ``stats["side_malformed"]``)."""
        return int(self.stats.get("malformed", 0))

    @property
    def padded_rows(self) -> int:
        """Rows kept although they lacked trailing columns (padded with empty values)."""
        return int(self.stats.get("padded_rows", 0))

    def summary(self) -> dict[str, Any]:
        """JSON-ready overview (for a run's metrics file or the CLI)."""
        return _jsonable({
            "dataset": self.dataset, "cache_path": None if self.cache_path is None else str(self.cache_path),
            "from_cache": self.from_cache, "num_rows": self.num_rows, "num_fields": self.feature_map.num_fields,
            "num_features": self.feature_map.num_features, "field_names": self.feature_map.field_names,
            "cardinalities": self.feature_map.cardinalities, "positive_rate": float(np.mean(self.y)) if len(self.y) else None,
            "params": self.params,
            "stats": {k: v for k, v in self.stats.items() if k != "fields"},
        })


def _check_int(name: str, value, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def preprocess(name: str, data_dir, cache_dir=None, *, min_count: int | None = None, strict: bool = False,
               max_rows: int | None = None, chunk_rows: int | None = None, progress: bool = True,
               force: bool = False, preset: str | None = None, engine: str = "auto",
               **options) -> PreprocessResult:
    """Encode the raw files of dataset ``name`` found at ``data_dir`` (a folder or the file itself).

    Streams the raw file twice (count, then encode) in chunks of ``chunk_rows`` lines. With a
    ``cache_dir`` the result is stored in ``cache_dir/<name>-<key>/`` and reused on the next call
    with the same parameters and unchanged files (``force=True`` rebuilds it); without one the
    arrays are built in memory. ``min_count=None`` uses the dataset default
    (:data:`DEFAULT_MIN_COUNT`: 10 for criteo/avazu/kdd12, 2 for MovieLens). ``max_rows`` caps the
    data lines read. ``strict=True`` raises :class:`MalformedRowError` (a ``ValueError``; file, line,
    column) on the first malformed row -- including a row lacking trailing columns and a malformed
    line of a side file -- instead of skipping and counting it. A file without a usable row raises
    :class:`~optembed_ext.data.errors.DataFormatError` and caches nothing. ``options`` are format options
    (kdd12: ``include_impression``; avazu: ``is_weekend``).

    ``preset`` names a set of preprocessing rules (:data:`~optembed_ext.data.formats.PRESETS`):
    ``"default"`` (the behaviour above) or, for criteo/avazu/kdd12, ``"paper"`` -- the OptEmbed
    paper's rules (``min_count=2``; Avazu with 24 fields). An explicit ``min_count`` or format option
    wins over the preset's. Equal rules share one cache folder whatever preset named them.

    ``engine``: ``"python"`` (line by line), ``"arrow"`` (pyarrow tokenizer and native hashed counts,
    :mod:`optembed_ext.data._fast`; for the large click logs criteo/avazu/kdd12: ~10x faster, memory
    bounded by the distinct values, resumable after a kill when there is a ``cache_dir``) or ``"auto"``
    (arrow when pyarrow is installed, the dataset is one of those and no ``chunk_rows`` -- the
    line-by-line reader's chunk size, default 100000 lines -- is given). Both give the same arrays,
    vocabularies and row statistics, so the engine is not part of the cache key.
    """
    name = canonical_name(name)
    if name == "synthetic":
        raise ValueError("the synthetic dataset is generated, not preprocessed; use make_synthetic")
    rules = resolve_preset(name, preset)
    min_count = _check_int("min_count", rules["min_count"] if min_count is None else min_count, 1)
    max_rows = _check_int("max_rows", max_rows, 1, allow_none=True)
    python_chunks = chunk_rows is not None  # the line-by-line reader's chunk size: that engine is asked for
    chunk_rows = _check_int("chunk_rows", 100_000 if chunk_rows is None else chunk_rows, 1)
    options = {**rules["options"], **options}
    plan = PLANNERS[name](data_dir, **options)
    params = {"dataset": name, "min_count": min_count, "strict": bool(strict), "max_rows": max_rows,
              "options": plan.options, "format_version": FORMAT_VERSION}
    _side_issues(plan, strict)

    if engine not in ("auto", "python", "arrow"):
        raise DataUsageError(f"engine must be 'auto', 'python' or 'arrow', got {engine!r}")
    fast = (engine == "arrow" or (engine == "auto" and not python_chunks)) and name in _FAST_DATASETS and _fast.fast_path_available(plan.schema, plan.source)
    if engine == "arrow" and not fast:
        raise DataUsageError(f"engine='arrow' needs the pyarrow package and one of {list(_FAST_DATASETS)} "
                             "(UTF-8, tab or comma separated); install pyarrow or pass engine='python'")

    def encode(out_dir=None):
        if fast:
            work = None if out_dir is None else Path(out_dir).parent / f".{final.name}.work"
            try:
                table = _fast.encode_table_fast(plan.schema, plan.source, min_count=min_count, strict=strict,
                                                max_rows=max_rows, progress=progress, out_dir=out_dir, work_dir=work)
            except DataError:
                # bad input (a strict malformed row, no usable row): a rerun fails the same way, so the partial
                # results kept for resuming after a kill are of no use
                if work is not None:
                    shutil.rmtree(work, ignore_errors=True)
                raise
        else:
            table = _stream.encode_table(plan.schema, plan.source, min_count=min_count, strict=strict,
                                         max_rows=max_rows, chunk_rows=chunk_rows, progress=progress,
                                         out_dir=out_dir)
        if plan.side_stats:
            table.stats["side_files"] = plan.side_stats
            table.stats["side_malformed"] = len(plan.side_issues)
            by_reason = {}
            for x in plan.side_issues:
                by_reason[x["kind"]] = by_reason.get(x["kind"], 0) + 1
            table.stats["side_malformed_by_reason"] = by_reason
            table.stats["side_malformed_examples"] = [{k: v for k, v in x.items() if k != "kind"}
                                                      for x in plan.side_issues[:_stream._MAX_EXAMPLES]]
        return table

    if cache_dir is None:
        table = encode()
        return PreprocessResult(name, None, table.feature_map, table.X, table.y, table.stats, False, params)

    final, fingerprints, created_dir = _cache_folder(name, cache_dir, plan.files, params)
    return _build_or_load_in(name, final, params, force, encode, fingerprints, created_dir)


def _cache_folder(name: str, cache_dir, files, params) -> tuple[Path, list, bool]:
    """The cache folder of ``name`` for these raw ``files`` and ``params`` (the cache dir is created and its stale
    temporaries removed), the files' fingerprints, and whether the cache dir was created here."""
    fingerprints = [_cache.file_fingerprint(p) for p in files]
    key = _cache.cache_key(params, fingerprints)
    cache_dir = Path(cache_dir).expanduser()
    created_dir = not cache_dir.exists()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(cache_dir, e) from None
    _cache.clean_stale_temporaries(cache_dir)
    return cache_dir / f"{name}-{key}", fingerprints, created_dir


def _build_or_load_in(name, final: Path, params, force, encode, fingerprints, created_dir: bool) -> PreprocessResult:
    """:func:`_build_or_load` into the folder of :func:`_cache_folder`; a cache dir created for it is removed again
    when nothing was cached."""
    wait = f"{name}: waiting for another process that is preprocessing into {final}"
    try:
        return _build_or_load(name, final, params, force, encode, fingerprints, wait)
    except BaseException:
        if created_dir:
            try:
                final.parent.rmdir()  # nothing was cached: leave no empty cache dir behind
            except OSError:
                pass
        raise


def _build_or_load(name, final: Path, params, force, encode, fingerprints, wait) -> PreprocessResult:
    cache_dir = final.parent
    with _cache.cache_lock(cache_dir / f".{final.name}.lock", wait_message=wait):
        replace = final.is_dir()
        if replace and not force:
            try:
                return _load_cached(name, final, params)
            except CacheError as e:
                reason = str(e)
                if reason.startswith(f"{final}: "):
                    reason = reason[len(str(final)) + 2:]
                logger.warning("cache %s is corrupt, rebuilding: %s", final, reason)
        tmp = cache_dir / _cache.temp_name(final.name)
        try:
            tmp.mkdir()
        except OSError as e:
            raise _unwritable(cache_dir, e) from None
        try:
            table = encode(tmp)
            del table.X, table.y  # flushed memory maps; reopened read-only below
            table.feature_map.to_json(tmp / "feature_map.json")
            (tmp / "vocab.json").write_text(json.dumps(table.vocab))
            meta = {"params": params, "files": fingerprints, "stats": table.stats,
                    "rows": int(table.stats["rows_kept"]), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "checksums": _cache.compute_checksums(tmp)}
            (tmp / "meta.json").write_text(json.dumps(_jsonable(meta), indent=1))
            won = _cache.install_folder(tmp, final, replace=replace)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in _WRITE_ERRNOS and not _is_raw_file(e, fingerprints):
                raise _unwritable(cache_dir, e) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not won:
            logger.info("%s: another process wrote %s first; using it", name, final)
            return _load_cached(name, final, params)
        logger.info("%s: wrote cache %s", name, final)
        result = _load_cached(name, final, params, announce=False, full=False)
    result.from_cache = False
    return result


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}


def _is_raw_file(e: OSError, fingerprints) -> bool:
    return e.filename is not None and str(Path(e.filename).resolve()) in {fp["path"] for fp in fingerprints}


def _unwritable(cache_dir: Path, e: OSError) -> CacheError:
    return CacheError(f"cannot write the cache in {cache_dir} ({e.strerror or e}); free some space or pass "
                      "another, writable cache dir")


def _side_issues(plan, strict: bool) -> None:
    """Malformed lines of side files: raise the first under ``strict``, else warn once."""
    issues = plan.side_issues
    if not issues:
        return
    if strict:
        x = issues[0]
        col = "" if x["column"] is None else f", column {x['column']} ({x['column_name']})"
        shown = "" if x["value"] is None else f" (value {x['value']!r})"
        raise MalformedRowError(f"malformed row in {x['file']}: line {x['line']}{col}: {x['reason']}{shown}",
                                file=x["file"], line=x["line"], column=x["column"], reason=x["reason"])
    x = issues[0]
    warnings.warn(f"skipped {len(issues)} malformed lines of side files; first: {x['file']}: line {x['line']}: "
                  f"{x['reason']}", stacklevel=3)


def _load_cached(name: str, folder: Path, params: dict, announce: bool = True,
                 full: bool | None = None) -> PreprocessResult:
    fmap, meta, X, y = _cache.verify_cache(folder, full=full, format_version=FORMAT_VERSION)
    if meta.get("params") != _jsonable(params):
        raise CacheError(f"{folder}: meta.json parameters {meta.get('params')} differ from {params}")
    if announce:
        logger.info("%s: using cached preprocessing %s", name, folder)
    return PreprocessResult(name, folder, fmap, X, y, meta.get("stats", {}), True, params)


def load_vocab(cache_path) -> dict[str, list[str]]:
    """Field -> tokens in local-id order, from a cache folder (``<OOV>`` at 0, ``<EMPTY>`` at 1).

    Raises :class:`CacheError` when ``vocab.json`` is missing, unreadable or was changed after the
    cache was written."""
    folder = Path(cache_path)
    try:
        data = (folder / "vocab.json").read_bytes()
        want = json.loads((folder / "meta.json").read_text()).get("checksums", {}).get("vocab.json")
        if want is not None and hashlib.blake2b(data, digest_size=16).hexdigest() != want:
            raise CacheError(f"{folder}: vocab.json changed since the cache was written (checksum mismatch)")
        vocab = json.loads(data)
    except CacheError:
        raise
    except (OSError, ValueError) as e:
        raise CacheError(f"{folder}: vocab.json is unreadable ({e})") from None
    if not isinstance(vocab, dict):
        raise CacheError(f"{folder}: vocab.json is not a JSON object")
    return vocab


def load_dataset(name: str, data_dir=None, *, cache_dir=None, min_count: int | None = None, split: str = "random",
                 seed: int = 2022, ratios: Sequence[float] = (0.8, 0.1, 0.1), strict: bool = False,
                 max_rows: int | None = None, progress: bool = True, preset: str | None = None,
                 lazy: bool | None = None, **kwargs) -> CTRDataset:
    """Load dataset ``name`` as a :class:`CTRDataset` with train/val/test splits.

    ``name`` in ``criteo, avazu, kdd12, movielens1m, movielens100k, synthetic``. Raw datasets go
    through :func:`preprocess` (``kwargs``: ``chunk_rows``, ``force`` and format options), then
    are split ``ratios`` (default 8:1:1) at random with ``seed`` or, with ``split="sequential"``,
    in file order. ``preset`` (``"default"`` or ``"paper"``) picks the preprocessing rules, see
    :func:`preprocess` (for ``"synthetic"``: the generator's preset). ``"synthetic"`` forwards ``seed``, ``split``, ``ratios`` and ``kwargs`` to
    :func:`make_synthetic` (``data_dir`` is ignored).

    ``lazy`` (raw datasets): ``True`` cuts the splits as views of the cached arrays that read nothing until
    used (see :func:`~optembed_ext.data.batching.make_splits`); ``None``: its default.

    ``info`` holds ``dataset``, ``cache_path``, ``from_cache``, ``num_rows``, ``stats`` (row counts,
    malformed rows, per-field vocabulary figures), ``min_count``, ``split``, ``seed``, ``ratios``.
    """
    name = canonical_name(name)
    if split not in ("random", "sequential"):
        raise ValueError(f"split must be 'random' or 'sequential', got {split!r}")
    if name == "synthetic":
        from .synthetic import make_synthetic

        if preset is not None:  # the synthetic data's own presets (criteo, criteo_interactions)
            kwargs["preset"] = preset
        return make_synthetic(seed=seed, split=split, ratios=ratios, **kwargs)
    res = preprocess(name, data_dir, cache_dir, min_count=min_count, strict=strict, max_rows=max_rows,
                     progress=progress, preset=preset, **kwargs)
    train, val, test = make_splits(res.X, res.y, split=split, seed=seed, ratios=ratios, lazy=lazy)
    info = {
        "dataset": name, "cache_path": None if res.cache_path is None else str(res.cache_path),
        "from_cache": res.from_cache, "num_rows": res.num_rows, "stats": res.stats,
        "min_count": res.params["min_count"], "preset": "default" if preset is None else preset,
        "split": split, "seed": seed, "ratios": tuple(ratios),
    }
    return CTRDataset(res.feature_map, train, val, test, info)
