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
columns, are malformed: counted in ``stats`` and skipped, or with ``strict=True`` a
:class:`~optembed_ext.data.errors.MalformedRowError` (a ``ValueError``) naming file, line and
column is raised.

Line accounting. A *physical line* is a run of bytes ended by ``\n`` (or by the end of a
non-empty file); ``\r\n`` counts as one line end, a lone ``\r`` does not end a line. Each
physical line is parsed on its own: a quoted CSV field never spans lines, and a line with an
unclosed quote is one malformed row. Without ``max_rows`` every line of the file is accounted for::

    stats["lines"] == stats["header_lines"] + stats["rows_read"]
    stats["rows_read"] == rows_kept + filtered + malformed + blank_lines

(``header_lines`` is 1 when the format has a header line and the file is not empty). Rows with
``min_columns <= len < num_columns`` columns are padded with empty values and counted in
``padded_rows`` (a subset of ``rows_kept + filtered``); with ``strict=True`` they are malformed.
A file without a single usable row raises :class:`~optembed_ext.data.errors.DataFormatError`
after the counting pass, before anything is written.

Compression is detected from the content (gzip, bz2, xz; zstd when the ``zstandard`` package is
installed), not from the file name.
"""
from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import logging
import lzma
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import compress, islice, repeat
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataFormatError, MalformedRowError
from .types import FeatureMap

logger = logging.getLogger("optembed_ext.data")

__all__ = ["FieldSpec", "TableSchema", "RawSource", "EncodedTable", "encode_table", "iter_row_chunks",
           "open_raw", "detect_compression", "read_first_line", "count_physical_lines"]

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


class _Unparsable(list):
    """A physical line that could not be split into columns (e.g. an unclosed quote): one malformed row."""

    def __init__(self, reason: str, kind: str, value: str | None = None):
        super().__init__()
        self.reason, self.kind, self.value = reason, kind, value


_END = "\x00<end of line>"


def _split_csv_line(line: str) -> list[str]:
    """Split one physical CSV line with quoting; a quote left open at the end of the line is malformed."""
    it = iter((line, _END))
    try:
        row = next(csv.reader(it))
    except csv.Error as e:
        return _Unparsable(f"cannot split the line into columns ({e})", "bad_quoting", _shorten(line))
    except StopIteration:  # pragma: no cover - csv always yields a row for one input line
        return [""]
    if next(it, None) is None:  # the reader went on to the next line: a quoted field was never closed
        return _Unparsable("unclosed double quote (a quoted field must end on its line)", "unclosed_quote",
                           _shorten(line))
    return row if row else [""]


def _shorten(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _split_lines(lines: list[str], delimiter: str, text: str) -> list[list[str]]:
    if delimiter == "," and '"' in text:
        # quoted fields (e.g. movie titles with commas): each physical line is parsed on its own, so a
        # stray quote costs one malformed row, never the rest of the chunk
        return [_split_csv_line(line) if '"' in line else line.split(delimiter) for line in lines]
    return [line.split(delimiter) for line in lines]


# ---------------------------------------------------------------------------------------------
# opening raw files: compression by content

_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


def detect_compression(path) -> str | None:
    """``"gzip"``, ``"bz2"``, ``"xz"``, ``"zstd"`` from the file's first bytes, or ``None`` (plain)."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            if kind == "bz2" and not (len(head) >= 4 and head[3:4] in b"123456789"):
                continue  # "BZh" must be followed by the block size digit
            return kind
    return None


def _zstd_reader(raw, path):
    try:
        import zstandard
    except ImportError:
        raise DataFormatError(f"{path} is zstd-compressed; decompress it first (zstd -d {path}) or install "
                              "the 'zstandard' package", file=path) from None
    import io

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))


@contextlib.contextmanager
def open_raw(path):
    """Yield ``(raw, stream, compression)``: the underlying binary file (for byte progress), a binary
    stream of the decompressed content, and the detected compression (``None`` when plain)."""
    path = Path(path)
    kind = detect_compression(path)
    with open(path, "rb") as raw:
        if kind is None:
            yield raw, raw, None
            return
        if kind == "gzip":
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif kind == "bz2":
            stream = bz2.BZ2File(raw, mode="rb")
        elif kind == "xz":
            stream = lzma.LZMAFile(raw, mode="rb")
        else:
            stream = _zstd_reader(raw, path)
        with stream:
            yield raw, stream, kind


def _decompress_failed(path, kind, e) -> DataFormatError:
    return DataFormatError(f"{path} looks {kind}-compressed (by its first bytes) but cannot be decompressed "
                           f"({type(e).__name__}: {e}); the file is probably truncated or corrupt -- "
                           "download or copy it again", file=path)


_FIRST_LINE_LIMIT = 1 << 20
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark (files saved by spreadsheet tools) is not part of the data


def read_first_line(path, encoding: str = "utf-8") -> str:
    """The first line of a raw file (decompressed), without its line end.

    Raises :class:`DataFormatError` for a file with CR-only line ends (its "first line" would be the
    whole file) and for a compressed file that cannot be decompressed.
    """
    path = Path(path)
    with open_raw(path) as (_, f, kind):
        try:
            b = f.readline(_FIRST_LINE_LIMIT)
        except _DECOMPRESS_ERRORS as e:
            if kind is None:
                raise
            raise _decompress_failed(path, kind, e) from None
    if not b.endswith(b"\n") and b"\r" in b.rstrip(b"\r"):
        raise DataFormatError(f"{path} uses CR-only line ends (old Mac style): no '\\n' in its first "
                              f"{len(b)} bytes; convert them first, e.g. tr '\\r' '\\n' < {path.name} > fixed.txt",
                              file=path)
    if b.startswith(_BOM):
        b = b[len(_BOM):]
    return b.decode(encoding, errors="surrogateescape").rstrip("\r\n")


def cr_only_hint(path) -> str:
    """``"; ... CR-only line ends ..."`` when the file's first 64 KiB hold a ``\r`` but no ``\n``, else ``""``."""
    try:
        with open_raw(path) as (_, f, _):
            head = f.read(1 << 16)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError, DataFormatError):
        return ""
    if b"\n" not in head and b"\r" in head.rstrip(b"\r"):
        return (f"; the file uses CR-only line ends (old Mac style), convert them first, e.g. "
                f"tr '\\r' '\\n' < {Path(path).name} > fixed.txt")
    return ""


def count_physical_lines(path) -> int:
    """Physical lines of a (decompressed) raw file, as counted by the loaders: ``\n`` ends a line and a
    non-empty last line without one counts too."""
    n, last = 0, b"\n"
    with open_raw(path) as (_, f, _):
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def iter_row_chunks(source: RawSource, chunk_rows: int, max_rows: int | None = None,
                    on_progress: Callable[[int], None] | None = None,
                    info: dict | None = None) -> Iterator[tuple[int, list[list[str]]]]:
    """Yield ``(first_line_number, rows)`` with at most ``chunk_rows`` split rows per chunk.

    One row per physical line (see the module doc). Line numbers are 1-based and count the header.
    ``max_rows`` caps the data lines read. ``on_progress(nbytes)`` receives the (compressed) bytes
    consumed since the last call. ``info`` (a dict), when given, receives ``header_lines`` (0 or 1),
    ``header`` (the header text or None) and ``compression``.
    """
    path = Path(source.path)
    with open_raw(path) as (raw, f, kind):
        at_start = [True]

        def read_lines(k):
            try:
                out = list(islice(f, k))
            except _DECOMPRESS_ERRORS as e:
                if kind is None:
                    raise
                raise _decompress_failed(path, kind, e) from None
            if at_start[0] and out:
                at_start[0] = False
                if out[0].startswith(_BOM):
                    out[0] = out[0][len(_BOM):]
            return out

        lineno = 1
        header = None
        if source.has_header:
            first = read_lines(1)
            if first:
                header = first[0].decode(source.encoding, errors="surrogateescape").rstrip("\r\n")
                lineno = 2
        if info is not None:
            info.update(header_lines=lineno - 1, header=header, compression=kind)
        remaining = max_rows
        last = raw.tell()
        while remaining is None or remaining > 0:
            k = chunk_rows if remaining is None else min(chunk_rows, remaining)
            blines = read_lines(k)
            if not blines:
                break
            if remaining is not None:
                remaining -= len(blines)
            text = b"".join(blines).decode(source.encoding, errors="surrogateescape")
            if blines[-1].endswith(b"\n"):
                text = text[:-1]
            if "\r" in text:
                text = text.replace("\r\n", "\n")
                if text.endswith("\r"):  # the last line's CR (of a CRLF, or before the end of the file)
                    text = text[:-1]
            lines = text.split("\n")
            if len(lines) != len(blines):  # pragma: no cover - one row per physical line, always
                raise AssertionError(f"{path}: {len(blines)} lines split into {len(lines)} rows")
            yield lineno, _split_lines(lines, source.delimiter, text)
            lineno += len(blines)
            if on_progress is not None:
                pos = raw.tell()
                on_progress(pos - last)
                last = pos


def _new_stats() -> dict[str, Any]:
    return {
        "lines": 0, "header_lines": 0,
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
            raise MalformedRowError(f"malformed row in {where}: {reason}{shown}", file=self.path,
                                    line=lineno0 + i, column=None if c is None else c + 1, reason=reason,
                                    stats=stats)
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
        padded = []   # positions (in the kept rows) of rows padded with empty values
        if set(map(len, rows)) != {ncols}:
            minc = schema.min_columns or ncols
            kept, index = [], []
            for i, r in enumerate(rows):
                n = len(r)
                if n == ncols and type(r) is list:
                    pass
                elif type(r) is _Unparsable:
                    bad[i] = (None, r.value, r.reason, r.kind)
                    continue
                elif n == 1 and r[0] == "":
                    stats["blank_lines"] += 1
                    continue
                elif minc <= n < ncols:
                    if self.strict:
                        bad[i] = (None, None, f"expected {ncols} columns, got {n} (a truncated line; without "
                                  "strict it would be padded with empty values and counted as padded)",
                                  "missing_columns")
                        continue
                    r.extend(repeat("", ncols - n))
                    padded.append(len(kept))
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
        if padded:  # a padded row that is malformed anyway counts as malformed only
            stats["padded_rows"] += sum(1 for j in padded if j not in drop)
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


_DELIMITER_NAMES = {",": "comma", "\t": "tab", "::": "'::'", "|": "'|'", ";": "semicolon", " ": "space"}


def _delimiter_hint(schema: TableSchema, source: RawSource) -> str:
    """`` (the lines look X-separated ...)`` when another separator splits the first lines into the
    expected number of columns, else ``""``."""
    ncols, minc = schema.num_columns, schema.min_columns or schema.num_columns
    try:
        with open_raw(source.path) as (_, f, _):
            lines = list(islice(f, int(source.has_header), 21))
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError, DataFormatError):
        return ""
    lines = [b.decode(source.encoding, errors="surrogateescape").rstrip("\r\n") for b in lines]
    lines = [ln for ln in lines if ln]
    if not lines:
        return ""
    for d, name in _DELIMITER_NAMES.items():
        if d == source.delimiter:
            continue
        fits = sum(minc <= len(ln.split(d)) <= ncols for ln in lines)
        if fits * 2 > len(lines):
            want = _DELIMITER_NAMES.get(source.delimiter, repr(source.delimiter))
            return (f"; the lines look {name}-separated, but this {schema.dataset} file must be {want}-separated "
                    f"with {ncols} columns")
    return ""


def unusable_message(schema: TableSchema, source: RawSource, stats: dict[str, Any]) -> str:
    """One-line description of a raw file without a single usable row (for :class:`DataFormatError`)."""
    path = source.path
    rows, header = stats["rows_read"], stats.get("header_lines", 0)
    if rows == 0:
        if header:
            return (f"{path}: the file holds only a header line and no data rows (1 line read); "
                    "nothing was cached")
        return f"{path}: the file is empty (0 lines read); nothing was cached"
    counts = (f"{stats['lines']} lines read ({header} header, {rows} data): {stats['malformed']} malformed, "
              f"{stats['blank_lines']} blank, {stats['filtered']} filtered, 0 usable")
    if stats["blank_lines"] == rows:
        return f"{path}: no usable rows, the file holds only blank lines ({counts}); nothing was cached"
    what = ""
    if stats["malformed"]:
        reasons = ", ".join(f"{v} {k}" for k, v in sorted(stats["malformed_by_reason"].items()))
        ex = stats["malformed_examples"][0] if stats["malformed_examples"] else None
        what = f" [{reasons}]"
        if ex is not None:
            col = f", column {ex['column']}" if ex.get("column") else ""
            what += f"; first: line {ex['line']}{col}: {ex['reason']}"
        if stats["malformed_by_reason"].get("wrong_column_count"):
            hint = cr_only_hint(path) or _delimiter_hint(schema, source)
            what += hint or (f"; check that this is a {schema.dataset} file with {schema.num_columns} "
                             f"{_DELIMITER_NAMES.get(source.delimiter, repr(source.delimiter))}-separated columns")
    elif stats["filtered"]:
        what = " (every row was filtered out by the label rule)"
    return f"{path}: no usable rows ({counts}){what}; nothing was cached"


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
    info: dict[str, Any] = {}
    with _progress_bar(progress, total, f"{schema.dataset}: counting (1/2)") as bar:
        for lineno0, rows in iter_row_chunks(source, chunk_rows, max_rows, bar.update, info=info):
            cols, _ = cleaner.clean(rows, lineno0, stats)
            if cols:
                for c in used_columns:
                    counters[c].update(cols[c])
    stats["header_lines"] = info.get("header_lines", 0)
    stats["lines"] = stats["header_lines"] + stats["rows_read"]
    if info.get("compression"):
        stats["compression"] = info["compression"]
    n = stats["rows_kept"]
    if n == 0:
        raise DataFormatError(unusable_message(schema, source, stats), file=path, stats=stats)

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
                raise DataFormatError(f"{path} changed while it was being preprocessed (more rows in pass 2); "
                                      "run again once nothing writes to it", file=path)
            block = np.empty((m, F), dtype=np.int64)
            for j, (f, lut) in enumerate(zip(fields, luts)):
                block[:, j] = np.fromiter(map(lut.get, cols[f.column], repeat(OOV_ID)), dtype=np.int64, count=m)
            block += offsets
            X[pos:pos + m] = block
            y[pos:pos + m] = lab
            pos += m
    if pos != n:
        raise DataFormatError(f"{path} changed while it was being preprocessed ({pos} rows in pass 2, {n} in "
                              "pass 1); run again once nothing writes to it", file=path)
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
