"""Fast two-pass encoder for large click logs (Criteo, Avazu, KDD12 at full size): pyarrow tokenizer, native counts.

Same result as :func:`optembed_ext.data._stream.encode_table` (same vocabularies, ids, statistics of the
rows; ``tests/test_data_fast.py`` compares the two), at full-file scale:

* **Parsing.** The raw file is read in blocks of whole lines (``block_bytes``). A *regular* block -- every
  line has the schema's column count, no ``\\r``, no ``"`` in a comma-separated file -- is split by
  pyarrow's CSV reader (C++, values kept as bytes) and each used column is dictionary-encoded (C++), in a
  reader thread that runs ahead of the counting (both release the GIL, so two cores are used). Any other
  block (blank, short or long lines, CRLF, quotes) goes through the line-by-line Python cleaner of
  ``_stream``, so padded rows, quoting, line numbers and malformed-row reports are exactly those of the
  Python path. Labels and derived values (log buckets, hour -> weekday) are parsed once per distinct raw
  value of the whole file (values already seen are recognised by their key, without decoding them).
* **Keys.** Each distinct value of a block becomes a uint64 *key* (vectorised, numpy): a value of up to 7
  bytes is packed into the key as it is, 8 lowercase hex digits (Criteo's and Avazu's hashed ids) as their
  32-bit number; both are exact, so the value can be rebuilt from its key and needs no storage. Longer
  values get a 62-bit hash and are kept (as bytes, in pyarrow arrays) next to their keys; two such
  values with one hash are detected and reported, never merged silently.
* **Counting.** (key, count) pairs are merged into sorted numpy arrays (sorted runs merged geometrically):
  16 bytes per distinct raw value, no Python object per value, nothing per row.
* **Encoding.** Pass 1 spills each block's dictionary indices (4 bytes per value) and its distinct keys
  into ``work_dir``; pass 2 maps the keys of each block to ids with ``searchsorted`` on the sorted
  per-field table and writes the rows into ``X.npy`` (reads ahead and writes behind in a second thread).
* **Resuming.** With a ``work_dir`` every ``checkpoint_blocks`` blocks the counts gathered since the last
  checkpoint are written as one partial file, with the byte offset, line number and statistics reached;
  pass 2 records the rows written into ``X.npy``/``y.npy`` kept in ``work_dir``. A killed run started
  again with the same parameters continues from the last checkpoint.

Memory: a few blocks (~32 MB of text and their columns each) plus the per-field (key, count) tables of the
distinct raw values (16 bytes each; the ~34 million of the full Criteo file take ~0.55 GB) and their merge
buffers. Written rows go to the files with positional writes and never count in the process's memory.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ._stream import (_DECOMPRESS_ERRORS, _INVALID, _MAX_EXAMPLES, EMPTY_ID, EMPTY_TOKEN, OOV_ID, OOV_TOKEN, _BOM,
                      EncodedTable, RawSource, TableSchema, _ChunkCleaner, _decompress_failed, _new_stats,
                      _split_lines, open_raw, unusable_message)
from .errors import DataFormatError
from .types import FeatureMap

logger = logging.getLogger("optembed_ext.data")

__all__ = ["fast_path_available", "encode_table_fast"]

_P = np.uint64(0x100000001B3)  # FNV prime as the polynomial base
_STATE_VERSION = 2
_U = np.uint64
_TAG_SHORT = _U(1 << 62)   # key = tag | bytes << 3 | length (values of 1..7 bytes)
_TAG_HEX = _U(2 << 62)     # key = tag | 32-bit number (8 lowercase hex digits)
_TAG_LONG = _U(3 << 62)    # key = tag | 62-bit hash (any other value; the bytes are kept)
_LOW62 = _U((1 << 62) - 1)
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)], dtype=np.uint64)
_HEX_CHARS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_MERGE_MIN = 1 << 21


def fast_path_available(schema: TableSchema, source: RawSource) -> bool:
    """Whether :func:`encode_table_fast` serves this file: pyarrow installed, UTF-8, a one-character separator."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.csv  # noqa: F401  (the tokenizer)
    except ImportError:
        return False
    return source.encoding.lower().replace("-", "") == "utf8" and source.delimiter in ("\t", ",")


# ---------------------------------------------------------------------------------------------
# keys of distinct values


def _mix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _offsets_data(arr) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, value bytes) of a pyarrow binary array (any slice of it)."""
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=arr.offset + n + 1)[arr.offset:].astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    if end > start:
        data = np.frombuffer(bufs[2], dtype=np.uint8, count=end)[start:]
    else:
        data = np.zeros(0, dtype=np.uint8)
    return offsets - start, data


def _hash_values(arr) -> np.ndarray:
    """uint64 hash of each value of a pyarrow binary array (``b""`` -> 0, never 0 otherwise)."""
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets, data = _offsets_data(arr)
    lengths = np.diff(offsets)
    out = np.zeros(n, dtype=np.uint64)
    nonempty = lengths > 0
    if len(data):
        data = data.astype(np.uint64)
        rel = offsets[:-1]
        pos = np.arange(len(data), dtype=np.int64) - np.repeat(rel, lengths)
        maxlen = int(lengths.max())
        powers = np.ones(maxlen, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(1, maxlen):
                powers[k] = powers[k - 1] * _P
            contrib = (data + np.uint64(1)) * powers[pos]
            sums = np.add.reduceat(contrib, rel[nonempty])
            h = _mix64(sums ^ (lengths[nonempty].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
        h[h == 0] = np.uint64(1)
        out[nonempty] = h
    return out


def _hex8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For 8-byte words (little-endian, first character in the lowest byte): the 32-bit number of 8
    lowercase hex digits (byte i holds characters 2i and 2i+1) and whether the word is such digits."""
    ones = _U(0x0101010101010101)
    nib = (w & _U(0x0F0F0F0F0F0F0F0F)) + _U(9) * ((w >> _U(6)) & ones)           # per byte, no carries
    gt9 = ((nib + _U(0x7676767676767676)) >> _U(7)) & ones
    ok = (nib + _U(0x3030303030303030) + gt9 * _U(0x27)) == w                    # re-encodes to itself
    ok &= ((nib + _U(0x7070707070707070)) & _U(0x8080808080808080)) == 0          # and every digit < 16
    y = ((nib & _U(0x000F000F000F000F)) << _U(4)) | ((nib >> _U(8)) & _U(0x000F000F000F000F))
    z = (y | (y >> _U(8))) & _U(0x0000FFFF0000FFFF)
    return (z | (z >> _U(16))) & _U(0xFFFFFFFF), ok


def _value_keys(arr) -> np.ndarray:
    """uint64 key of each value of a pyarrow binary array: ``b""`` -> 0; one key per value, exact for values
    of up to 7 bytes and for 8 lowercase hex digits, a hash (top two bits set) for any other value."""
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets, data = _offsets_data(arr)
    lengths = np.diff(offsets)
    words = np.zeros(len(data) // 8 + 2, dtype="<u8")
    words.view(np.uint8)[:len(data)] = data
    s = offsets[:-1]
    q = s >> 3
    r = (s & 7).astype(np.uint64) << _U(3)
    w = (words[q] >> r) | ((words[q + 1] << (_U(63) - r)) << _U(1))  # the 8 bytes from each value's start
    short = lengths < 8
    keys = ((w & _MASKS[np.minimum(lengths, 7)]) << _U(3)) | lengths.astype(np.uint64) | _TAG_SHORT
    keys[lengths == 0] = 0
    other = ~short
    if other.any():
        eight = np.flatnonzero(lengths == 8)
        if len(eight):
            v, ok = _hex8(w[eight])
            keys[eight[ok]] = v[ok] | _TAG_HEX
            other[eight[ok]] = False
        if other.any():
            import pyarrow as pa

            at = np.flatnonzero(other)
            keys[at] = (_hash_values(arr.take(pa.array(at))) & _LOW62) | _TAG_LONG
    return keys


def _is_long(keys: np.ndarray) -> np.ndarray:
    return keys >= _TAG_LONG


def _key_values(keys: np.ndarray, long: "_LongValues"):
    """The values (a pyarrow ``large_binary`` array) behind ``keys``: rebuilt from the key, or looked up."""
    import pyarrow as pa

    n = len(keys)
    tag = keys >> _U(62)
    mat = np.zeros((n, 8), dtype=np.uint8)
    lengths = np.zeros(n, dtype=np.int64)
    short = np.flatnonzero(tag == 1)
    if len(short):
        ks = keys[short]
        lengths[short] = (ks & _U(7)).astype(np.int64)
        mat[short] = ((ks >> _U(3)) & _U((1 << 56) - 1)).astype("<u8").view(np.uint8).reshape(-1, 8)
    hexes = np.flatnonzero(tag == 2)
    if len(hexes):
        vb = (keys[hexes] & _U(0xFFFFFFFF)).astype("<u8").view(np.uint8).reshape(-1, 8)[:, :4]
        chars = np.empty((len(hexes), 8), dtype=np.uint8)
        chars[:, 0::2] = _HEX_CHARS[vb >> 4]
        chars[:, 1::2] = _HEX_CHARS[vb & 15]
        mat[hexes] = chars
        lengths[hexes] = 8
    data = mat[np.arange(8) < lengths[:, None]]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    out = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    longs = np.flatnonzero(tag == 3)
    if len(longs):
        vals = long.lookup(keys[longs])
        perm = np.arange(n, dtype=np.int64)
        perm[longs] = n + np.arange(len(longs))
        out = pa.concat_arrays([out, vals]).take(pa.array(perm))
    return out


def _index_dtype(n: int):
    return np.uint8 if n <= 1 << 8 else np.uint16 if n <= 1 << 16 else np.int32


def _decode(arr) -> list[str]:
    return [b.decode("utf-8", errors="surrogateescape") for b in arr.to_pylist()]


# ---------------------------------------------------------------------------------------------
# counts: sorted runs of (key, count)


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One sorted run of unique keys with summed counts from runs of (keys, counts) (each any order)."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    k = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    c = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    order = np.argsort(k, kind="stable")  # timsort: sorted runs are merged, not sorted again
    ks = k[order]
    del k
    first = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    if len(first) == len(ks):
        return ks, c[order].astype(np.int64, copy=False)
    return ks[first], np.add.reduceat(c[order].astype(np.int64, copy=False), first)


class _FieldCounts:
    """Counts of the distinct raw values of one column, by key: a sorted table plus sorted runs, merged when
    the runs outgrow the table (so each count is merged a logarithmic number of times); ``unsaved`` holds the
    runs since the last checkpoint."""

    def __init__(self):
        self.keys = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.runs_len = 0
        self.since: list[tuple[np.ndarray, np.ndarray]] = []
        self.since_len = 0
        self.unsaved: list[tuple[np.ndarray, np.ndarray]] = []
        self.long = _LongValues()

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self.since.append((keys, counts))
        self.since_len += len(keys)
        if self.since_len > max(_MERGE_MIN, len(self.keys) // 4):
            self._flush_since()

    def _flush_since(self) -> None:
        if not self.since:
            return
        run = _merge_counts(self.since)
        self.since, self.since_len = [], 0
        self.unsaved.append(run)
        self.push(run)

    def push(self, run) -> None:
        self.runs.append(run)
        self.runs_len += len(run[0])
        if self.runs_len > max(_MERGE_MIN, len(self.keys)):
            self.merge()

    def merge(self) -> None:
        self._flush_since()
        if self.runs:
            self.keys, self.counts = _merge_counts([(self.keys, self.counts)] + self.runs)
            self.runs, self.runs_len = [], 0

    def take_unsaved(self) -> tuple[np.ndarray, np.ndarray]:
        """The counts added since the last call (one sorted run), for a checkpoint."""
        self._flush_since()
        run = _merge_counts(self.unsaved)
        self.unsaved = []
        return run


class _LongValues:
    """The bytes of the values with hashed keys, sorted by key (merged geometrically); two values with one key
    raise."""

    def __init__(self):
        self.keys = np.zeros(0, dtype=np.uint64)
        self.values = None
        self.pending: list = []
        self.pending_len = 0
        self.unsaved: list = []

    def add(self, keys: np.ndarray, values) -> None:
        if not len(keys):
            return
        import pyarrow as pa

        part = (keys, values.cast(pa.large_binary()))
        self.pending.append(part)
        self.unsaved.append(part)
        self.pending_len += len(keys)
        if self.pending_len > max(1 << 16, len(self.keys)):
            self.merge()

    def merge(self) -> None:
        if self.pending:
            parts = ([(self.keys, self.values)] if self.values is not None else []) + self.pending
            self.keys, self.values = _merge_values(parts)
            self.pending, self.pending_len = [], 0

    def take_unsaved(self):
        run = _merge_values(self.unsaved) if self.unsaved else None
        self.unsaved = []
        return run

    def lookup(self, keys: np.ndarray):
        import pyarrow as pa

        self.merge()
        pos = np.searchsorted(self.keys, keys)
        return self.values.take(pa.array(pos))


def _merge_values(parts):
    import pyarrow as pa
    import pyarrow.compute as pc

    k = np.concatenate([p[0] for p in parts])
    v = pa.concat_arrays([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    order = np.argsort(k, kind="stable")
    ks = k[order]
    first = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    if len(first) != len(ks):  # a value seen before: equal keys must hold equal values
        group = np.repeat(first, np.diff(np.r_[first, len(ks)]))
        if not pc.all(pc.equal(v.take(pa.array(order)), v.take(pa.array(order[group])))).as_py():
            raise RuntimeError("two distinct raw values share a 62-bit hash; preprocess with engine='python'")
    return ks[first], v.take(pa.array(order[first]))


# ---------------------------------------------------------------------------------------------
# reading blocks


def _iter_blocks(source: RawSource, block_bytes: int, max_rows: int | None, start: dict | None,
                 info: dict) -> Iterator[tuple[int, int, bytes, int]]:
    """Yield ``(first_line_number, line_count, text, end_offset)`` for blocks of whole lines.

    ``end_offset`` is the decompressed byte offset after the block (for resuming: ``start`` =
    ``{"offset", "lineno"}`` skips to it). Line numbers are 1-based and count the header."""
    path = Path(source.path)
    with open_raw(path) as (raw, f, kind):
        def read(n):
            try:
                return f.read(n)
            except _DECOMPRESS_ERRORS as e:
                if kind is None:
                    raise
                raise _decompress_failed(path, kind, e) from None

        info["compression"] = kind
        offset, lineno, header = 0, 1, None
        rest = b""
        if start is None:
            head = read(min(block_bytes, 1 << 20))
            if head.startswith(_BOM):
                head = head[len(_BOM):]
                offset = len(_BOM)
            if source.has_header and head:
                while b"\n" not in head:
                    more = read(1 << 20)
                    if not more:
                        break
                    head += more
                i = head.find(b"\n")
                line = head if i < 0 else head[:i + 1]
                header = line.decode(source.encoding, errors="surrogateescape").rstrip("\r\n")
                offset += len(line)
                lineno = 2
                rest = b"" if i < 0 else head[i + 1:]
            else:
                rest = head
            info.update(header_lines=lineno - 1, header=header)
        else:
            offset, lineno = int(start["offset"]), int(start["lineno"])
            skip = offset
            while skip > 0:  # decompressed streams cannot seek cheaply; read past the done part
                got = read(min(skip, 1 << 24))
                if not got:
                    break
                skip -= len(got)
        remaining = max_rows
        while remaining is None or remaining > 0:
            chunk = read(block_bytes)
            buf = rest + chunk
            if not buf:
                break
            if chunk:  # more may follow: cut after the last line end
                cut = buf.rfind(b"\n")
                if cut < 0:  # a line longer than the block: read on
                    rest = buf
                    continue
                rest, buf = buf[cut + 1:], buf[:cut + 1]
            else:  # end of the file: the last line may lack its line end
                rest = b""
            nlines = buf.count(b"\n") + (not buf.endswith(b"\n"))
            if remaining is not None and nlines > remaining:
                cut = -1
                for _ in range(remaining):
                    cut = buf.index(b"\n", cut + 1)
                buf, nlines = buf[:cut + 1], remaining
            if remaining is not None:
                remaining -= nlines
            offset += len(buf)
            yield lineno, nlines, buf, offset
            lineno += nlines
            if not chunk:
                break


_DONE = object()


class _KeySet:
    """A growing set of uint64 keys, tested an array at a time: a sorted array plus a small sorted one of the
    recent additions (merged into the first when it grows past a quarter of it)."""

    def __init__(self):
        self.big = np.zeros(0, dtype=np.uint64)
        self.recent = np.zeros(0, dtype=np.uint64)

    @staticmethod
    def _in(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
        if not len(table):
            return np.zeros(len(keys), dtype=bool)
        pos = np.searchsorted(table, keys)
        np.minimum(pos, len(table) - 1, out=pos)
        return table[pos] == keys

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return self._in(self.big, keys) | self._in(self.recent, keys)

    def add(self, keys: np.ndarray) -> None:
        """Add keys not in the set yet (distinct)."""
        # two sorted runs: the stable sort (timsort) merges them in linear time
        self.recent = np.sort(np.concatenate([self.recent, np.sort(keys)]), kind="stable")
        if len(self.recent) > len(self.big) // 4 + 4096:
            self.big = np.sort(np.concatenate([self.big, self.recent]), kind="stable")
            self.recent = np.zeros(0, dtype=np.uint64)


class _BlockReader:
    """In a thread of its own: reads blocks and splits each regular one with pyarrow into dictionary-encoded
    columns (C++, without the GIL), a few blocks ahead of the counting."""

    def __init__(self, schema: TableSchema, source: RawSource, wanted: list[int], blocks: Iterator, ahead: int = 3,
                 workers: int = 2):
        self.cpu_seconds = 0.0
        self.workers = workers
        import pyarrow as pa
        import pyarrow.csv as pcsv

        self.pa, self.pcsv = pa, pcsv
        self.source = source
        self.names = [f"c{i}" for i in range(schema.num_columns)]
        self.wanted = wanted
        # one thread, one chunk per block: this thread already runs beside the counting
        self.read_opts = pcsv.ReadOptions(column_names=self.names, use_threads=False, block_size=1 << 26)
        self.convert = pcsv.ConvertOptions(column_types={self.names[c]: pa.binary() for c in wanted},
                                           include_columns=[self.names[c] for c in wanted],
                                           strings_can_be_null=False, quoted_strings_can_be_null=False)
        self.blocks = blocks
        self.queue: queue.Queue = queue.Queue(maxsize=ahead)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="optembed-read", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()
        return False

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item[:4] + (item[4].result(),)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        cpu: list[float] = []

        def split(text, nlines):
            c0 = time.thread_time()
            try:
                return self._regular(text, nlines)
            finally:
                cpu.append(time.thread_time() - c0)

        # two workers split consecutive blocks at once; the blocks are handed on in file order
        with ThreadPoolExecutor(self.workers, thread_name_prefix="optembed-split") as pool:
            try:
                for lineno0, nlines, text, end in self.blocks:
                    if not self._put((lineno0, nlines, text, end, pool.submit(split, text, nlines))):
                        return
                self._put(_DONE)
            except BaseException as e:  # handed to the consumer, raised there
                self._put(e)
            finally:
                self.blocks.close()
        self.cpu_seconds = time.thread_time() + sum(cpu)

    def _regular(self, text: bytes, nlines: int):
        """``{column: DictionaryArray}`` of a regular block, or None (the block goes line by line)."""
        if b"\r" in text or b"\n\n" in text or text.startswith(b"\n") or (
                self.source.delimiter == "," and b'"' in text):
            return None  # CR, blank lines (pyarrow reads them as rows of empty values) or quotes: line by line
        irregular = []

        def handler(row):
            irregular.append(row)
            return "skip"

        pcsv = self.pcsv
        parse = pcsv.ParseOptions(delimiter=self.source.delimiter, quote_char=False, double_quote=False,
                                  escape_char=False, newlines_in_values=False, ignore_empty_lines=False,
                                  invalid_row_handler=handler)
        try:
            table = pcsv.read_csv(self.pa.py_buffer(text), read_options=self.read_opts, parse_options=parse,
                                  convert_options=self.convert)
        except self.pa.ArrowInvalid:
            return None
        if irregular or table.num_rows != nlines:
            return None
        return {c: table.column(self.names[c]).combine_chunks().dictionary_encode() for c in self.wanted}


class _BlockParser:
    """Turns a block (split by the reader, or line by line here) into kept columns (dictionary-encoded pyarrow
    arrays, by raw column), their keys and the labels."""

    def __init__(self, schema: TableSchema, source: RawSource, cleaner: _ChunkCleaner, used: list[int]):
        import pyarrow as pa

        self.pa = pa
        self.schema, self.source, self.cleaner, self.used = schema, source, cleaner, used
        self.wanted = sorted(set(used) | {schema.label_column})
        self.transforms = [(f.column, m, f.transform) for f, m in zip(schema.fields, cleaner.memos) if m is not None]
        self.known: dict[int, dict[int, Any]] = {}     # id(memo) -> {key: parsed value or _INVALID}
        self.seen: dict[int, _KeySet] = {}             # id(memo) -> the same keys, to test whole arrays
        self.invalid: dict[int, dict[int, str]] = {}   # id(memo) -> {key: raw value} of the invalid ones
        self.fast_blocks = self.slow_blocks = 0

    def parse(self, lineno0: int, nlines: int, text: bytes, cols, stats: dict):
        """``(columns, keys, labels)``: ``keys[c]`` the keys of ``columns[c].dictionary``."""
        if cols is None:
            self.slow_blocks += 1
            return self._slow(lineno0, text, stats)
        self.fast_blocks += 1
        pa = self.pa
        stats["rows_read"] += nlines
        stats["chunks"] += 1
        n = nlines
        bad: dict[int, tuple] = {}
        drop = np.zeros(n, dtype=bool)
        label_vals = None
        keys: dict[int, np.ndarray] = {}
        checks = [(self.schema.label_column, self.cleaner.label_memo, self.schema.label_fn, True)]
        checks += [(c, m, fn, False) for c, m, fn in self.transforms]
        for c, memo, fn, is_label in checks:
            d = cols[c]
            k = keys[c] if c in keys else _value_keys(d.dictionary)
            keys[c] = k
            known = self.known.setdefault(id(memo), {})
            invalid = self.invalid.setdefault(id(memo), {})
            seen = self.seen.setdefault(id(memo), _KeySet())
            new = np.flatnonzero(~seen.contains(k))
            if len(new):  # values not seen before: the line reader's per-value rule, memoised
                uniq = _decode(d.dictionary.take(pa.array(new)))
                self.cleaner._validate(uniq, memo, fn, is_label)
                for key, v in zip(k[new].tolist(), uniq):
                    r = known[key] = memo[v]
                    if r is _INVALID:
                        invalid[key] = v
                seen.add(k[new])
            idx = None
            if invalid:
                is_bad = np.isin(k, np.fromiter(invalid, dtype=np.uint64, count=len(invalid)))
                if is_bad.any():
                    idx = d.indices.to_numpy(zero_copy_only=False)
                    errs = self.cleaner.label_errors if is_label else self.cleaner.errors
                    kind = "bad_label" if is_label else "bad_value"
                    for i in np.flatnonzero(is_bad[idx]):
                        i = int(i)
                        drop[i] = True
                        if i not in bad:
                            v = invalid[int(k[idx[i]])]
                            bad[i] = (c, v, errs[(id(memo), v)], kind)
            if is_label:
                if idx is None:
                    idx = d.indices.to_numpy(zero_copy_only=False)
                res = [known[key] for key in k.tolist()]
                label_vals = np.asarray([-2 if r is _INVALID else r for r in res], dtype=np.int8)[idx]
        if bad:
            self.cleaner._report(stats, bad, lineno0)
        keep = ~drop & (label_vals >= 0)
        filtered = int((~drop & (label_vals < 0)).sum())
        stats["filtered"] += filtered
        if not keep.all():
            mask = pa.array(keep)
            cols = {c: a.filter(mask) for c, a in cols.items()}
            label_vals = label_vals[keep]
        stats["rows_kept"] += int(label_vals.shape[0])
        return cols, keys, label_vals.astype(np.float32)

    def _slow(self, lineno0: int, text: bytes, stats: dict):
        pa = self.pa
        s = text.decode(self.source.encoding, errors="surrogateescape")
        if text.endswith(b"\n"):
            s = s[:-1]
        if "\r" in s:
            s = s.replace("\r\n", "\n")
            if s.endswith("\r"):
                s = s[:-1]
        lines = s.split("\n")
        rows = _split_lines(lines, self.source.delimiter, s)
        cols, lab = self.cleaner.clean(rows, lineno0, stats)
        if not cols:
            return {}, {}, lab
        out = {c: pa.array([v.encode("utf-8", errors="surrogateescape") for v in cols[c]],
                           type=pa.binary()).dictionary_encode() for c in self.wanted}
        return out, {}, lab


# ---------------------------------------------------------------------------------------------
# resumable state and spill files


def _save_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _write_arrays(path: Path, arrays: list[np.ndarray]) -> None:
    """Arrays one after the other as ``.npy`` records (no zip, no checksum: read back by :func:`_read_arrays`)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        for a in arrays:
            np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)
    os.replace(tmp, path)


def _read_arrays(path: Path, count: int) -> list[np.ndarray]:
    with open(path, "rb") as f:
        return [np.lib.format.read_array(f, allow_pickle=False) for _ in range(count)]


def _save_partial(work: Path, k: int, counts: dict[int, _FieldCounts]) -> None:
    """Counts gathered since the last checkpoint -> ``work/p1-<k>.npz`` (keys, counts) and, for columns with
    hashed keys, one ``work/p1-<k>-c<column>.arrow`` (their values)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    arrays = {}
    for c, fc in counts.items():
        h, n = fc.take_unsaved()
        arrays[f"h{c}"], arrays[f"n{c}"] = h, n
        run = fc.long.take_unsaved()
        if run is not None:
            arrays[f"l{c}"] = run[0]
            tmp = work / f"p1-{k}-c{c}.part"
            with ipc.new_file(str(tmp), pa.schema([("v", pa.large_binary())])) as w:
                w.write_batch(pa.RecordBatch.from_arrays([run[1]], names=["v"]))
            os.replace(tmp, work / f"p1-{k}-c{c}.arrow")
    with open(work / f"p1-{k}.part", "wb") as f:
        np.savez(f, **arrays)
    os.replace(work / f"p1-{k}.part", work / f"p1-{k}.npz")


def _load_partials(work: Path, n: int, counts: dict[int, _FieldCounts]) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    for k in range(n):
        with np.load(work / f"p1-{k}.npz") as z:
            for c, fc in counts.items():
                if f"h{c}" in z.files:
                    fc.push((z[f"h{c}"], z[f"n{c}"]))
                if f"l{c}" in z.files:
                    with ipc.open_file(str(work / f"p1-{k}-c{c}.arrow")) as r:
                        v = pa.concat_arrays([r.get_batch(j).column(0) for j in range(r.num_record_batches)])
                    fc.long.add(z[f"l{c}"], v)
    for fc in counts.values():
        fc.unsaved = []  # already in a partial file
        fc.long.unsaved = []


# ---------------------------------------------------------------------------------------------


def _progress_bar(progress: bool, total: int, desc: str, unit: str = "B"):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc, disable=not progress, leave=False)


def encode_table_fast(schema: TableSchema, source: RawSource, *, min_count: int, strict: bool = False,
                      max_rows: int | None = None, block_bytes: int = 32 << 20, progress: bool = True,
                      out_dir: Path | None = None, work_dir: Path | None = None,
                      checkpoint_blocks: int = 16, stop_after_blocks: int | None = None) -> EncodedTable:
    """The two passes of :func:`~optembed_ext.data._stream.encode_table` with the fast parser and native counts.

    Pass 1 parses the file and spills each block's value indices into ``work_dir`` (about 4 bytes per
    value); pass 2 encodes from the spill without parsing again. ``work_dir`` holds the resumable state
    and is removed when the table is complete; without one a private temporary folder is used (and the
    run cannot be resumed). ``stop_after_blocks`` (testing) raises ``KeyboardInterrupt`` after that many
    blocks of this call, as a kill would stop it. ``stats["engine"]`` records ``"arrow"``,
    ``stats["python_blocks"]`` the blocks that took the Python line-by-line path."""
    owner = _claim(Path(work_dir)) if work_dir is not None else None
    own = owner is None  # no work dir, or another live process is resuming in it: a private one
    if own:
        import tempfile

        work_dir = Path(tempfile.mkdtemp(prefix="optembed-encode-"))
    try:
        return _encode_fast(schema, source, min_count=min_count, strict=strict, max_rows=max_rows,
                            block_bytes=block_bytes, progress=progress, out_dir=out_dir, work_dir=Path(work_dir),
                            checkpoint_blocks=checkpoint_blocks, stop_after_blocks=stop_after_blocks)
    except Exception:  # bad data or a full disk: resuming would not help; a kill or Ctrl-C keeps the work
        if not own:
            _remove(work_dir)
        raise
    finally:
        if own:
            _remove(work_dir)
        else:
            owner.close()


def _claim(work: Path):
    """An open file holding an exclusive lock on ``work`` (released when the process ends, even by a kill),
    or None when another process holds it or the file system has no locks."""
    try:
        import fcntl

        work.mkdir(parents=True, exist_ok=True)
        f = open(work / ".owner", "a")
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def _encode_fast(schema, source, *, min_count, strict, max_rows, block_bytes, progress, out_dir, work_dir,
                 checkpoint_blocks, stop_after_blocks) -> EncodedTable:
    import pyarrow as pa
    import pyarrow.compute as pc

    path = Path(source.path)
    total = path.stat().st_size
    fields = schema.fields
    used = sorted({f.column for f in fields})
    J = len(used)
    cleaner = _ChunkCleaner(schema, path, strict)
    parser = _BlockParser(schema, source, cleaner, used)
    params = {"version": _STATE_VERSION, "min_count": min_count, "strict": strict, "max_rows": max_rows,
              "block_bytes": block_bytes, "path": str(path), "size": total}
    state: dict[str, Any] = {}
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        state = json.loads((work_dir / "state.json").read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("params") != params:
        for p in work_dir.iterdir():
            if p.name != ".owner":
                p.unlink()
        state = {}
    blocks_done = [0]

    def tick():
        blocks_done[0] += 1
        if stop_after_blocks is not None and blocks_done[0] >= stop_after_blocks:
            raise KeyboardInterrupt("stop_after_blocks")

    # ---- pass 1: count raw values per used column, spill each block's value indices and keys ---------
    counts = {c: _FieldCounts() for c in used}
    t0 = time.perf_counter()
    cpu0, reader_cpu = time.thread_time(), 0.0
    if state.get("pass1_done"):
        stats = state["stats"]
        nblocks = int(state["blocks"])
        _load_partials(work_dir, state["partials"], counts)
    else:
        stats = state.get("stats") or _new_stats()
        partials = int(state.get("partials", 0))
        nblocks = int(state.get("blocks", 0))
        start = state.get("resume1")
        info: dict[str, Any] = {"header_lines": stats.get("header_lines", 0)}
        if partials:
            _load_partials(work_dir, partials, counts)
        since = 0
        rows0 = stats["rows_read"]
        blocks = _iter_blocks(source, block_bytes, max_rows, start, info)
        with _progress_bar(progress, total, f"{schema.dataset}: counting (1/2)") as bar, \
                _BlockReader(schema, source, parser.wanted, blocks) as reader:
            bar.update(int(start["offset"]) if start else 0)
            for lineno0, nlines, text, end, split in reader:
                cols, keys, lab = parser.parse(lineno0, nlines, text, split, stats)
                m = lab.shape[0]
                spill = [lab]
                for c in used:
                    if not m:
                        spill += [np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.uint64)]
                        continue
                    d = cols[c]
                    k = keys[c] if c in keys else _value_keys(d.dictionary)
                    idx = d.indices.to_numpy(zero_copy_only=False)
                    cnt = np.bincount(idx, minlength=len(k))
                    seen = cnt > 0
                    if seen.all():
                        counts[c].add(k, cnt)
                    else:  # values of dropped rows only
                        counts[c].add(k[seen], cnt[seen])
                    long = _is_long(k)
                    if long.any():
                        long &= seen
                        counts[c].long.add(k[long], d.dictionary.filter(pa.array(long)))
                    spill += [idx.astype(_index_dtype(len(k)), copy=False), k]  # narrow: less to write and read
                _write_arrays(work_dir / f"b{nblocks}.bin", spill)
                nblocks += 1
                since += 1
                bar.update(len(text))
                bar.set_postfix(rows_s=f"{(stats['rows_read'] - rows0) / max(time.perf_counter() - t0, 1e-9):,.0f}")
                if since >= checkpoint_blocks:
                    _save_partial(work_dir, partials, counts)
                    partials += 1
                    since = 0
                    stats["header_lines"] = info.get("header_lines", 0)
                    _save_json(work_dir / "state.json", {"params": params, "stats": stats, "partials": partials,
                                                         "blocks": nblocks,
                                                         "resume1": {"offset": end, "lineno": lineno0 + nlines}})
                tick()
        reader_cpu = reader.cpu_seconds
        stats["header_lines"] = info.get("header_lines", 0)
        stats["lines"] = stats["header_lines"] + stats["rows_read"]
        if info.get("compression"):
            stats["compression"] = info["compression"]
        if since:
            _save_partial(work_dir, partials, counts)
            partials += 1
        _save_json(work_dir / "state.json", {"params": params, "stats": stats, "partials": partials,
                                             "blocks": nblocks, "pass1_done": True})
        state = {"partials": partials}
    for fc in counts.values():
        fc.merge()
        fc.long.merge()
    seconds1 = time.perf_counter() - t0
    n = stats["rows_kept"]
    if n == 0:
        _remove(work_dir)
        raise DataFormatError(unusable_message(schema, source, stats), file=path, stats=stats)

    # ---- vocabularies --------------------------------------------------------------------------
    t_vocab = time.perf_counter()
    luts, vocab, field_stats, cards = [], {}, [], []
    for f, memo in zip(fields, cleaner.memos):
        fc = counts[f.column]
        if memo is not None:
            raw = _decode(_key_values(fc.keys, fc.long))
            tok_counts = Counter()
            toks = []
            for r, cnt in zip(raw, fc.counts.tolist()):
                t = memo.get(r)
                if t is None:  # a value first seen on resume: parse it now
                    try:
                        t = "" if r == "" else f.transform(r)
                    except ValueError:
                        t = _INVALID
                    memo[r] = t
                toks.append(t)
                if t is not _INVALID:
                    tok_counts[t] += cnt
            kept = [t for t, cnt in tok_counts.items() if t != "" and (not f.thresholded or cnt >= min_count)]
            kept.sort(key=lambda t: (-tok_counts[t], t))
            tok2id = dict(zip(kept, range(2, len(kept) + 2)))
            tok2id[""] = EMPTY_ID
            ids = np.fromiter((tok2id.get(t, OOV_ID) if t is not _INVALID else OOV_ID for t in toks),
                              dtype=np.int64, count=len(toks))
            empty = tok_counts.get("", 0)
            kept_total = sum(tok_counts[t] for t in kept)
            distinct = len(tok_counts) - (1 if empty else 0)
        else:
            is_empty = fc.keys == 0
            empty = int(fc.counts[is_empty].sum())
            sel = ~is_empty if not f.thresholded else (~is_empty & (fc.counts >= min_count))
            pos = np.flatnonzero(sel)
            vals = _key_values(fc.keys[pos], fc.long)
            # by decreasing count, ties by the token (the same order as sorting the decoded strings for UTF-8
            # text: code point order is byte order)
            order = pc.sort_indices(pa.table({"n": pa.array(-fc.counts[pos]), "v": vals}),
                                    sort_keys=[("n", "ascending"), ("v", "ascending")]).to_numpy()
            ids = np.zeros(len(fc.keys), dtype=np.int64)
            ids[pos[order]] = np.arange(2, len(pos) + 2)
            ids[is_empty] = EMPTY_ID
            kept = _decode(vals.take(pa.array(order)))
            kept_total = int(fc.counts[pos].sum())
            distinct = int((~is_empty).sum())
        oov = n - empty - kept_total
        luts.append((fc.keys, ids))
        vocab[f.name] = [OOV_TOKEN, EMPTY_TOKEN] + kept
        cards.append(len(kept) + 2)
        field_stats.append({"name": f.name, "cardinality": len(kept) + 2, "distinct_tokens": int(distinct),
                            "oov_occurrences": int(oov), "empty_occurrences": int(empty),
                            "thresholded": f.thresholded})
    for c in used:
        counts[c].counts = counts[c].long = None  # only the keys are still needed
    stats["fields"] = field_stats
    stats["min_count"] = min_count
    fmap = FeatureMap(schema.dataset, [f.name for f in fields], cards, stats=stats)
    dtype = np.int32 if fmap.num_features < 2**31 else np.int64
    luts = [(k, (ids + off).astype(dtype)) for (k, ids), off in zip(luts, fmap.offsets)]  # global ids
    seconds_vocab = time.perf_counter() - t_vocab

    # ---- pass 2: encode the spilled blocks into a preallocated array -------------------------------
    F = len(fields)
    t1 = time.perf_counter()
    target = work_dir if out_dir is not None else None
    pos, first = 0, 0
    if target is not None:
        xp, yp = target / "X.npy", target / "y.npy"
        resume2 = state.get("resume2")
        resume = resume2 is not None and xp.exists() and yp.exists()
        X, y = _NpyRows(xp, dtype, (n, F), create=not resume), _NpyRows(yp, np.float32, (n,), create=not resume)
        if resume:
            pos, first = int(resume2["rows"]), int(resume2["block"])
    else:
        X = np.empty((n, F), dtype=dtype)
        y = np.empty((n,), dtype=np.float32)
    col_of = [used.index(f.column) for f in fields]

    def load(k):
        return _read_arrays(work_dir / f"b{k}.bin", 1 + 2 * J)

    def write(at, block, lab):
        X[at:at + len(lab)] = block.T  # file writes, not a memory map: the rows never count in our RSS
        y[at:at + len(lab)] = lab

    since, done = 0, []
    with _progress_bar(progress, nblocks, f"{schema.dataset}: encoding (2/2)", unit="block") as bar, \
            ThreadPoolExecutor(2, thread_name_prefix="optembed-encode") as pool:
        nxt = pool.submit(load, first) if first < nblocks else None
        writes = []
        for k in range(first, nblocks):
            arrays = nxt.result()
            nxt = pool.submit(load, k + 1) if k + 1 < nblocks else None  # read ahead
            lab = arrays[0]
            m = lab.shape[0]
            if m:
                block = np.empty((F, m), dtype=dtype)
                for fi, (j, (table, ids)) in enumerate(zip(col_of, luts)):
                    idx, h = arrays[1 + 2 * j], arrays[2 + 2 * j]
                    order = np.argsort(h)  # sorted queries walk the (large) table in order: far fewer misses
                    at = np.empty(len(h), dtype=np.int64)
                    at[order] = np.searchsorted(table, h[order])
                    np.minimum(at, len(table) - 1, out=at)
                    np.take(ids[at], idx, out=block[fi])
                writes.append(pool.submit(write, pos, block, lab))  # written behind
                pos += m
            del arrays
            while len(writes) > 1:
                writes.pop(0).result()
            since += 1
            done.append(k)
            bar.update(1)
            bar.set_postfix(rows_s=f"{pos / max(time.perf_counter() - t1, 1e-9):,.0f}")
            if target is not None and since >= checkpoint_blocks * 4:
                for w in writes:
                    w.result()
                writes = []
                since = 0
                _save_json(work_dir / "state.json",
                           {"params": params, "stats": stats, "partials": state["partials"], "blocks": nblocks,
                            "pass1_done": True, "resume2": {"rows": pos, "block": k + 1}})
                for j in done:  # encoded and recorded: the spill is no longer needed
                    (work_dir / f"b{j}.bin").unlink(missing_ok=True)
                done = []
            tick()
        for w in writes:
            w.result()
    if pos != n:
        raise DataFormatError(f"{path} changed while it was being preprocessed ({pos} rows in pass 2, {n} in "
                              "pass 1); run again once nothing writes to it", file=path)
    if out_dir is not None:
        X.close()
        y.close()
        del X, y
        os.replace(work_dir / "X.npy", Path(out_dir) / "X.npy")
        os.replace(work_dir / "y.npy", Path(out_dir) / "y.npy")
        X = np.load(Path(out_dir) / "X.npy", mmap_mode="r+")
        y = np.load(Path(out_dir) / "y.npy", mmap_mode="r+")
    _remove(work_dir)
    seconds2 = time.perf_counter() - t1
    stats["engine"] = "arrow"
    stats["python_blocks"] = parser.slow_blocks
    stats["block_bytes"] = block_bytes
    stats["seconds"] = {"count": round(seconds1, 3), "vocabulary": round(seconds_vocab, 3),
                        "encode": round(seconds2, 3)}
    # processor time of this call's threads (what a loaded machine does not inflate as it does the wall time)
    stats["cpu_seconds"] = {"main": round(time.thread_time() - cpu0, 3), "reader": round(reader_cpu, 3)}
    if stats["malformed"]:
        warnings.warn(
            f"{path}: skipped {stats['malformed']} malformed rows of {stats['rows_read']} "
            f"({stats['malformed_by_reason']}); first: {stats['malformed_examples'][0]}",
            stacklevel=3,
        )
    stats["malformed_examples"] = stats["malformed_examples"][:_MAX_EXAMPLES]
    logger.info("%s: encoded %d rows x %d fields, %d features (%s blocks by pyarrow, %s line by line)",
                schema.dataset, n, F, fmap.num_features, parser.fast_blocks, parser.slow_blocks)
    return EncodedTable(X=X, y=y, feature_map=fmap, vocab=vocab, stats=stats)


class _NpyRows:
    """Rows of a ``.npy`` file written with positional writes (``X[a:b] = rows``): the written pages stay in the
    page cache, not in the process's memory, whatever the file size."""

    def __init__(self, path: Path, dtype, shape: tuple, create: bool):
        if create:
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            del mm
        mm = np.load(path, mmap_mode="r")
        self.offset, self.dtype = int(mm.offset), np.dtype(dtype)
        self.row_bytes = self.dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        del mm
        self.fd = os.open(path, os.O_RDWR)

    def __setitem__(self, rows: slice, values) -> None:
        data = memoryview(np.ascontiguousarray(values, dtype=self.dtype)).cast("B")
        at = self.offset + rows.start * self.row_bytes
        while len(data):
            k = os.pwrite(self.fd, data, at)
            data, at = data[k:], at + k

    def flush(self) -> None:
        pass  # written data is in the page cache: it survives a kill of the process

    def close(self) -> None:
        os.close(self.fd)


def _remove(work: Path) -> None:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
