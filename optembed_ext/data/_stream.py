"""Two-pass streaming encoder for delimited click logs.

Pass 1 reads the raw file in chunks of ``chunk_rows`` lines and counts every raw value of every
used column (``collections.Counter`` updated from whole columns, so the counting loop runs in C);
the vocabularies are then built from the counts. Pass 2 reads the file again and writes the
encoded ids chunk by chunk into a preallocated array (a ``np.memmap`` ``.npy`` file when a cache
folder is given). Memory is bounded by one chunk plus the value counts, never by the file size.

Raw values become tokens as follows (per field):

* a plain field's token is the raw string itself;
* a derived field applies ``FieldSpec.transform`` (e.g. log-bucketing of counts, hour -> weekday,
  user id -> gender). Transforms run once per distinct raw value (memoised);
* an empty raw value is always the field's empty token.

Per-field vocabulary: local id 0 = OOV (values seen fewer than ``min_count`` times in a
thresholded field, or unseen), 1 = empty value, 2.. = kept tokens by decreasing count, ties by
token string. Rows whose label or a derived value cannot be parsed, or with a wrong number of
columns, are malformed: counted in ``stats`` and skipped, or with ``strict=True`` a ``ValueError``
naming file, line and column is raised.
"""
from __future__ import annotations

import csv
import gzip
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import compress, islice, repeat
from pathlib import Path
from typing import Any

import numpy as np

from .types import FeatureMap

logger = logging.getLogger("optembed_ext.data")

__all__ = ["FieldSpec", "TableSchema", "RawSource", "EncodedTable", "encode_table", "iter_row_chunks"]

_INVALID = object()
OOV_ID = 0
EMPTY_ID = 1
OOV_TOKEN = "<OOV>"
EMPTY_TOKEN = "<EMPTY>"
_MAX_EXAMPLES = 20


@dataclass(frozen=True)
class FieldSpec:
    """One output field: read raw column ``column``; ``transform(raw) -> token`` (raises ``ValueError``
    on a malformed value) or ``None`` for the raw string itself; ``thresholded``: apply ``min_count``."""

    name: str
    column: int
    transform: Callable[[str], str] | None = None
    thresholded: bool = True


@dataclass
class TableSchema:
    """Layout of the raw rows: column names, the label column and its parser, the output fields.

    ``label_fn(raw) -> 1 | 0`` keeps the row with that label, ``-1`` drops it on purpose (counted as
    ``filtered``), ``ValueError`` marks it malformed. Rows with ``min_columns <= len < num_columns``
    columns are padded with empty values (trailing empty columns stripped by a text tool).
    """

    dataset: str
    column_names: list[str]
    label_column: int
    label_fn: Callable[[str], int]
    fields: list[FieldSpec]
    min_columns: int | None = None

    @property
    def num_columns(self) -> int:
        return len(self.column_names)


@dataclass
class RawSource:
    """A delimited text file (optionally ``.gz``), read in binary chunks and decoded per chunk."""

    path: Path
    delimiter: str
    has_header: bool = False
    encoding: str = "utf-8"


@dataclass
class EncodedTable:
    X: np.ndarray                 # (n, F) global ids, int32 when they fit, else int64
    y: np.ndarray                 # (n,) float32
    feature_map: FeatureMap
    vocab: dict[str, list[str]]   # field name -> tokens in local-id order
    stats: dict[str, Any]


def _split_lines(lines: list[str], delimiter: str, text: str) -> list[list[str]]:
    if delimiter == "," and '"' in text:
        # quoted fields (e.g. movie titles with commas): let the csv module parse this chunk
        return [r if r else [""] for r in csv.reader(lines)]
    return [line.split(delimiter) for line in lines]


def iter_row_chunks(source: RawSource, chunk_rows: int, max_rows: int | None = None,
                    on_progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, list[list[str]]]]:
    """Yield ``(first_line_number, rows)`` with at most ``chunk_rows`` split rows per chunk.

    Line numbers are 1-based and count the header. ``max_rows`` caps the data lines read.
    ``on_progress(nbytes)`` receives the (compressed) bytes consumed since the last call.
    """
    path = Path(source.path)
    with open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
        lineno = 1
        if source.has_header:
            f.readline()
            lineno = 2
        remaining = max_rows
        last = raw.tell()
        while remaining is None or remaining > 0:
            k = chunk_rows if remaining is None else min(chunk_rows, remaining)
            blines = list(islice(f, k))
            if not blines:
                break
            if remaining is not None:
                remaining -= len(blines)
            text = b"".join(blines).decode(source.encoding, errors="surrogateescape")
            if "\r" in text:
                text = text.replace("\r\n", "\n")
                if text.endswith("\r"):
                    text = text[:-1]
            if text.endswith("\n"):
                text = text[:-1]
            lines = text.split("\n")
            yield lineno, _split_lines(lines, source.delimiter, text)
            lineno += len(blines)
            if on_progress is not None:
                pos = raw.tell()
                on_progress(pos - last)
                last = pos


def _new_stats() -> dict[str, Any]:
    return {
        "rows_read": 0, "rows_kept": 0, "blank_lines": 0, "padded_rows": 0, "filtered": 0,
        "malformed": 0, "malformed_by_reason": {}, "malformed_examples": [], "chunks": 0,
    }


class _ChunkCleaner:
    """Drops blank/malformed rows and parses labels; keeps memo tables across chunks."""

    def __init__(self, schema: TableSchema, path: Path, strict: bool):
        self.schema = schema
        self.path = path
        self.strict = strict
        self.label_memo: dict[str, Any] = {}
        self.memos: list[dict[str, Any] | None] = [{} if f.transform else None for f in schema.fields]
        self.errors: dict[tuple[int, str], str] = {}
        self.label_errors: dict[str, str] = {}

    def _column_desc(self, c: int | None) -> str:
        if c is None:
            return ""
        return f", column {c + 1} ({self.schema.column_names[c]})"

    def _report(self, stats, bad: dict[int, tuple], lineno0: int):
        if self.strict:
            i = min(bad)
            c, value, reason, _ = bad[i]
            where = f"{self.path}: line {lineno0 + i}{self._column_desc(c)}"
            shown = "" if value is None else f" (value {value!r})"
            raise ValueError(f"malformed row in {where}: {reason}{shown}")
        for i in sorted(bad):
            c, value, reason, kind = bad[i]
            stats["malformed"] += 1
            stats["malformed_by_reason"][kind] = stats["malformed_by_reason"].get(kind, 0) + 1
            if len(stats["malformed_examples"]) < _MAX_EXAMPLES:
                stats["malformed_examples"].append({
                    "file": str(self.path), "line": lineno0 + i,
                    "column": None if c is None else c + 1,
                    "column_name": None if c is None else self.schema.column_names[c],
                    "reason": reason, "value": value,
                })

    def _validate(self, col, memo, fn, is_label):
        """Fill ``memo`` for new distinct values; return True when some value of ``col`` is invalid."""
        distinct = set(col)
        any_bad = False
        for v in distinct:
            r = memo.get(v)
            if r is None:
                if v == "" and not is_label:
                    r = ""
                else:
                    try:
                        r = fn(v)
                    except ValueError as e:
                        r = _INVALID
                        (self.label_errors if is_label else self.errors)[(id(memo), v)] = str(e)
                memo[v] = r
            if r is _INVALID:
                any_bad = True
        return any_bad

    def clean(self, rows: list[list[str]], lineno0: int, stats) -> tuple[list[tuple], np.ndarray]:
        schema = self.schema
        ncols = schema.num_columns
        stats["rows_read"] += len(rows)
        stats["chunks"] += 1
        bad: dict[int, tuple] = {}
        index = None  # original position of each kept row when some rows were removed
        if set(map(len, rows)) != {ncols}:
            minc = schema.min_columns or ncols
            kept, index = [], []
            for i, r in enumerate(rows):
                n = len(r)
                if n == ncols:
                    pass
                elif n == 1 and r[0] == "":
                    stats["blank_lines"] += 1
                    continue
                elif minc <= n < ncols:
                    r.extend(repeat("", ncols - n))
                    stats["padded_rows"] += 1
                else:
                    bad[i] = (None, None, f"expected {ncols} columns, got {n}", "wrong_column_count")
                    continue
                kept.append(r)
                index.append(i)
            rows = kept
        if not rows:
            if bad:
                self._report(stats, bad, lineno0)
            return [], np.zeros(0, dtype=np.float32)
        cols = list(zip(*rows))
        checks = [(schema.label_column, self.label_memo, schema.label_fn, True)]
        checks += [(f.column, m, f.transform, False) for f, m in zip(schema.fields, self.memos) if m is not None]
        drop = set()
        for c, memo, fn, is_label in checks:
            if self._validate(cols[c], memo, fn, is_label):
                errs = self.label_errors if is_label else self.errors
                kind = "bad_label" if is_label else "bad_value"
                for i, v in enumerate(cols[c]):
                    if memo[v] is _INVALID:
                        drop.add(i)
                        oi = i if index is None else index[i]
                        if oi not in bad:
                            bad[oi] = (c, v, errs[(id(memo), v)], kind)
        if bad:
            self._report(stats, bad, lineno0)
        if drop:
            rows = [r for i, r in enumerate(rows) if i not in drop]
            if not rows:
                return [], np.zeros(0, dtype=np.float32)
            cols = list(zip(*rows))
        lab = np.fromiter(map(self.label_memo.__getitem__, cols[schema.label_column]), dtype=np.int8,
                          count=len(rows))
        keep = lab >= 0
        if not keep.all():
            stats["filtered"] += int((~keep).sum())
            mask = keep.tolist()
            cols = [tuple(compress(c, mask)) for c in cols]
            lab = lab[keep]
        stats["rows_kept"] += int(lab.shape[0])
        return cols, lab.astype(np.float32)


def _progress_bar(progress: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False)


def encode_table(schema: TableSchema, source: RawSource, *, min_count: int, strict: bool = False,
                 max_rows: int | None = None, chunk_rows: int = 100_000, progress: bool = True,
                 out_dir: Path | None = None) -> EncodedTable:
    """Run both passes over ``source``; write ``X.npy``/``y.npy`` into ``out_dir`` when given."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    path = Path(source.path)
    total = path.stat().st_size
    fields = schema.fields
    used_columns = sorted({f.column for f in fields})

    # ---- pass 1: count raw values per used column ------------------------------------------
    stats = _new_stats()
    counters = {c: Counter() for c in used_columns}
    cleaner = _ChunkCleaner(schema, path, strict)
    with _progress_bar(progress, total, f"{schema.dataset}: counting (1/2)") as bar:
        for lineno0, rows in iter_row_chunks(source, chunk_rows, max_rows, bar.update):
            cols, _ = cleaner.clean(rows, lineno0, stats)
            if cols:
                for c in used_columns:
                    counters[c].update(cols[c])
    n = stats["rows_kept"]

    # ---- vocabularies ------------------------------------------------------------------------
    luts, vocab, field_stats, cards = [], {}, [], []
    last_use = {f.column: i for i, f in enumerate(fields)}
    for i, (f, memo) in enumerate(zip(fields, cleaner.memos)):
        counter = counters[f.column]
        if memo is not None:
            tok_counts = Counter()
            for raw, cnt in counter.items():
                tok_counts[memo[raw]] += cnt
        else:
            tok_counts = counter
        kept = [t for t, cnt in tok_counts.items() if t != "" and (not f.thresholded or cnt >= min_count)]
        kept.sort(key=lambda t: (-tok_counts[t], t))
        tok2id = dict(zip(kept, range(2, len(kept) + 2)))
        tok2id[""] = EMPTY_ID
        empty = tok_counts.get("", 0)
        oov = n - empty - sum(tok_counts[t] for t in kept)
        if memo is not None:
            lut = {raw: tok2id.get(tok, OOV_ID) for raw, tok in memo.items() if tok is not _INVALID}
        else:
            lut = tok2id
        luts.append(lut)
        vocab[f.name] = [OOV_TOKEN, EMPTY_TOKEN] + kept
        cards.append(len(kept) + 2)
        field_stats.append({
            "name": f.name, "cardinality": len(kept) + 2, "distinct_tokens": len(tok_counts) - (1 if empty else 0),
            "oov_occurrences": int(oov), "empty_occurrences": int(empty), "thresholded": f.thresholded,
        })
        if last_use[f.column] == i:
            del counters[f.column]  # free the (possibly large) raw counts early
        del tok_counts, counter
    stats["fields"] = field_stats
    stats["min_count"] = min_count
    stats["chunk_rows"] = chunk_rows
    fmap = FeatureMap(schema.dataset, [f.name for f in fields], cards, stats=stats)
    offsets = np.asarray(fmap.offsets, dtype=np.int64)
    dtype = np.int32 if fmap.num_features < 2**31 else np.int64

    # ---- pass 2: encode into a preallocated array ---------------------------------------------
    F = len(fields)
    if out_dir is not None:
        X = np.lib.format.open_memmap(Path(out_dir) / "X.npy", mode="w+", dtype=dtype, shape=(n, F))
        y = np.lib.format.open_memmap(Path(out_dir) / "y.npy", mode="w+", dtype=np.float32, shape=(n,))
    else:
        X = np.empty((n, F), dtype=dtype)
        y = np.empty((n,), dtype=np.float32)
    stats2 = _new_stats()
    pos = 0
    with _progress_bar(progress, total, f"{schema.dataset}: encoding (2/2)") as bar:
        for lineno0, rows in iter_row_chunks(source, chunk_rows, max_rows, bar.update):
            cols, lab = cleaner.clean(rows, lineno0, stats2)
            m = lab.shape[0]
            if m == 0:
                continue
            if pos + m > n:
                raise RuntimeError(f"{path} changed while it was being preprocessed (more rows in pass 2)")
            block = np.empty((m, F), dtype=np.int64)
            for j, (f, lut) in enumerate(zip(fields, luts)):
                block[:, j] = np.fromiter(map(lut.get, cols[f.column], repeat(OOV_ID)), dtype=np.int64, count=m)
            block += offsets
            X[pos:pos + m] = block
            y[pos:pos + m] = lab
            pos += m
    if pos != n:
        raise RuntimeError(f"{path} changed while it was being preprocessed ({pos} rows in pass 2, {n} in pass 1)")
    if isinstance(X, np.memmap):
        X.flush()
        y.flush()
    if stats["malformed"]:
        warnings.warn(
            f"{path}: skipped {stats['malformed']} malformed rows of {stats['rows_read']} "
            f"({stats['malformed_by_reason']}); first: {stats['malformed_examples'][0]}",
            stacklevel=3,
        )
    logger.info("%s: encoded %d rows x %d fields, %d features", schema.dataset, n, F, fmap.num_features)
    return EncodedTable(X=X, y=y, feature_map=fmap, vocab=vocab, stats=stats)
