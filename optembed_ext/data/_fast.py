"""Fast two-pass encoder for large click logs (Criteo, Avazu, KDD12 at full size): pyarrow tokenizer, native counts.

Same result as :func:`optembed_ext.data._stream.encode_table` (same vocabularies, ids, statistics of the
rows; ``tests/test_data_fast.py`` compares the two), at full-file scale:

* **Parsing.** The raw file is read in blocks of whole lines (``block_bytes``). A *regular* block -- every
  line has the schema's column count, no ``\\r``, no ``"`` in a comma-separated file -- is split by
  pyarrow's CSV reader (C++, values kept as bytes). Any other block (blank, short or long lines,
  CRLF, quotes) goes through the line-by-line Python cleaner of ``_stream``, so padded rows, quoting,
  line numbers and malformed-row reports are exactly those of the Python path. Labels and derived
  values (log buckets, hour -> weekday) are parsed once per distinct raw value per block.
* **Counting.** Each used column of a block is dictionary-encoded (C++); its distinct values are hashed
  to uint64 (a vectorised polynomial hash over the value bytes), and (hash, count, value) triples are
  merged into sorted numpy arrays -- about 20 bytes per distinct raw value, never Python objects per
  value, nothing per row. Two values with one hash are detected and reported (probability ~1e-5 at
  34 million values), never merged silently.
* **Encoding.** Pass 2 maps the hashes of each block's distinct values to ids with ``searchsorted`` on the
  sorted per-field table and writes the (rows, fields) ids into the ``.npy`` memory map.
* **Resuming.** With a ``work_dir`` every ``checkpoint_blocks`` blocks the counts gathered since the last
  checkpoint are written as one partial file, with the byte offset, line number and statistics reached;
  pass 2 records the rows written into ``X.npy``/``y.npy`` kept in ``work_dir``. A killed run started
  again with the same parameters continues from the last checkpoint.

Memory: one block (~32 MB of text and its columns) plus the per-field tables (hash, count, value) of the
distinct raw values, plus the output memory map's dirty pages (flushed by the OS).
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator
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
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_EMPTY_HASH = np.uint64(0)
_STATE_VERSION = 1


def fast_path_available(schema: TableSchema, source: RawSource) -> bool:
    """Whether :func:`encode_table_fast` serves this file: pyarrow installed, UTF-8, a one-character separator."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.csv  # noqa: F401
    except ImportError:
        return False
    return source.encoding.lower().replace("-", "") == "utf8" and source.delimiter in ("\t", ",")


# ---------------------------------------------------------------------------------------------
# hashing distinct values


def _mix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _hash_values(arr) -> np.ndarray:
    """uint64 hash of each value of a pyarrow binary array (``b""`` -> 0, never 0 otherwise)."""
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=arr.offset + n + 1)[arr.offset:].astype(np.int64)
    lengths = np.diff(offsets)
    start, end = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(bufs[2], dtype=np.uint8, count=end)[start:].astype(np.uint64) if end > start else \
        np.zeros(0, dtype=np.uint64)
    out = np.zeros(n, dtype=np.uint64)
    nonempty = lengths > 0
    if end > start:
        rel = offsets[:-1] - start
        pos = np.arange(end - start, dtype=np.int64) - np.repeat(rel, lengths)
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


class _FieldCounts:
    """Sorted (hash, count, value) of the distinct raw values of one column; merged block by block."""

    def __init__(self):
        self.hashes = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.values = None  # pyarrow binary array aligned with hashes
        self.pending: list[tuple[np.ndarray, np.ndarray, Any]] = []
        self.pending_len = 0

    def add(self, hashes, counts, values) -> None:
        self.pending.append((hashes, counts, values))
        self.pending_len += len(hashes)
        if self.pending_len > max(2_000_000, len(self.hashes)):
            self.merge()

    def merge(self) -> None:
        if not self.pending:
            return
        import pyarrow as pa

        parts = ([(self.hashes, self.counts, self.values)] if self.values is not None else []) + self.pending
        self.pending, self.pending_len = [], 0
        self.hashes, self.counts, self.values = _merge(parts, pa)


def _merge(parts, pa):
    h = np.concatenate([p[0] for p in parts])
    c = np.concatenate([p[1] for p in parts])
    v = pa.concat_arrays([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]
    order = np.argsort(h, kind="stable")
    hs = h[order]
    first = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])
    counts = np.add.reduceat(c[order], first) if len(hs) else c
    if len(first) != len(hs):  # some values seen before: check that equal hashes hold equal values
        group = np.repeat(first, np.diff(np.r_[first, len(hs)]))
        a, b = v.take(pa.array(order)), v.take(pa.array(order[group]))
        import pyarrow.compute as pc

        if not pc.all(pc.equal(a, b)).as_py():
            raise RuntimeError("two distinct raw values share a 64-bit hash; preprocess with engine='python'")
    values = v.take(pa.array(order[first]))
    return hs[first], counts, values


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


class _BlockParser:
    """Turns a block of lines into kept columns (pyarrow binary arrays, by raw column) and labels."""

    def __init__(self, schema: TableSchema, source: RawSource, cleaner: _ChunkCleaner, used: list[int]):
        import pyarrow as pa
        import pyarrow.csv as pcsv

        self.pa, self.pcsv = pa, pcsv
        self.schema, self.source, self.cleaner, self.used = schema, source, cleaner, used
        self.names = [f"c{i}" for i in range(schema.num_columns)]
        wanted = sorted(set(used) | {schema.label_column})
        self.wanted = wanted
        self.read_opts = pcsv.ReadOptions(column_names=self.names, use_threads=True, block_size=1 << 24)
        self.convert = pcsv.ConvertOptions(column_types={self.names[c]: pa.binary() for c in wanted},
                                           include_columns=[self.names[c] for c in wanted],
                                           strings_can_be_null=False, quoted_strings_can_be_null=False)
        self.transforms = [(f.column, m, f.transform) for f, m in zip(schema.fields, cleaner.memos) if m is not None]
        self.fast_blocks = self.slow_blocks = 0

    def _regular_table(self, text: bytes, nlines: int):
        if b"\r" in text or b"\n\n" in text or text.startswith(b"\n") or (
                self.source.delimiter == "," and b'"' in text):
            return None  # CR, blank lines (pyarrow reads them as rows of empty values) or quotes: line by line
        irregular = []

        def handler(row):
            irregular.append(row)
            return "skip"

        parse = self.pcsv.ParseOptions(delimiter=self.source.delimiter, quote_char=False, double_quote=False,
                                       escape_char=False, newlines_in_values=False, ignore_empty_lines=False,
                                       invalid_row_handler=handler)
        try:
            table = self.pcsv.read_csv(self.pa.py_buffer(text), read_options=self.read_opts, parse_options=parse,
                                       convert_options=self.convert)
        except self.pa.ArrowInvalid:
            return None
        if irregular or table.num_rows != nlines:
            return None
        return table

    def parse(self, lineno0: int, nlines: int, text: bytes, stats: dict) -> tuple[dict[int, Any], np.ndarray]:
        table = self._regular_table(text, nlines)
        if table is None:
            self.slow_blocks += 1
            return self._slow(lineno0, text, stats)
        self.fast_blocks += 1
        pa = self.pa
        stats["rows_read"] += nlines
        stats["chunks"] += 1
        cols = {c: table.column(self.names[c]).combine_chunks().dictionary_encode() for c in self.wanted}
        n = nlines
        bad: dict[int, tuple] = {}
        drop = np.zeros(n, dtype=bool)
        label_vals = None
        checks = [(self.schema.label_column, self.cleaner.label_memo, self.schema.label_fn, True)]
        checks += [(c, m, fn, False) for c, m, fn in self.transforms]
        for c, memo, fn, is_label in checks:
            d = cols[c]
            idx = d.indices.to_numpy(zero_copy_only=False)
            uniq = [b.decode("utf-8", errors="surrogateescape") for b in d.dictionary.to_pylist()]
            self.cleaner._validate(uniq, memo, fn, is_label)  # the line reader's per-value rule, memoised
            res = [memo[v] for v in uniq]
            invalid = np.fromiter((r is _INVALID for r in res), dtype=bool, count=len(res))
            if invalid.any():
                errs = self.cleaner.label_errors if is_label else self.cleaner.errors
                kind = "bad_label" if is_label else "bad_value"
                for i in np.flatnonzero(invalid[idx]):
                    i = int(i)
                    drop[i] = True
                    if i not in bad:
                        v = uniq[idx[i]]
                        bad[i] = (c, v, errs[(id(memo), v)], kind)
            if is_label:
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
        return cols, label_vals.astype(np.float32)

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
            return {}, lab
        out = {c: pa.array([v.encode("utf-8", errors="surrogateescape") for v in cols[c]],
                           type=pa.binary()).dictionary_encode() for c in self.wanted}
        return out, lab


# ---------------------------------------------------------------------------------------------
# resumable state


def _save_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _save_partial(work: Path, k: int, counts: dict[int, _FieldCounts]) -> None:
    """Counts gathered since the last checkpoint -> ``work/p1-<k>.npz`` (hashes, counts) and one
    ``work/p1-<k>-c<column>.arrow`` per column (the values)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    arrays = {}
    for c, fc in counts.items():
        if not fc.pending:
            continue
        h, n, v = _merge(fc.pending, pa)
        fc.pending, fc.pending_len = [(h, n, v)], len(h)
        fc.merge()  # into the running totals: the next partial holds only what comes after this one
        arrays[f"h{c}"], arrays[f"n{c}"] = h, n
        tmp = work / f"p1-{k}-c{c}.part"
        with ipc.new_file(str(tmp), pa.schema([("v", pa.binary())])) as w:
            w.write_batch(pa.RecordBatch.from_arrays([v], names=["v"]))
        os.replace(tmp, work / f"p1-{k}-c{c}.arrow")
    with open(work / f"p1-{k}.part", "wb") as f:
        np.savez(f, **arrays)
    os.replace(work / f"p1-{k}.part", work / f"p1-{k}.npz")


def _load_partials(work: Path, n: int, counts: dict[int, _FieldCounts]) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    for k in range(n):
        z = np.load(work / f"p1-{k}.npz")
        for c, fc in counts.items():
            if f"h{c}" in z.files:
                with ipc.open_file(str(work / f"p1-{k}-c{c}.arrow")) as r:
                    v = pa.concat_arrays([r.get_batch(j).column(0) for j in range(r.num_record_batches)])
                fc.add(z[f"h{c}"], z[f"n{c}"], v)
    for fc in counts.values():
        fc.merge()  # into the running totals: a later partial must not repeat them


# ---------------------------------------------------------------------------------------------


def _progress_bar(progress: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False)


def encode_table_fast(schema: TableSchema, source: RawSource, *, min_count: int, strict: bool = False,
                      max_rows: int | None = None, block_bytes: int = 32 << 20, progress: bool = True,
                      out_dir: Path | None = None, work_dir: Path | None = None,
                      checkpoint_blocks: int = 8, stop_after_blocks: int | None = None) -> EncodedTable:
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

    path = Path(source.path)
    total = path.stat().st_size
    fields = schema.fields
    used = sorted({f.column for f in fields})
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

    # ---- pass 1: count raw values per used column, spill each block's value indices -----------
    counts = {c: _FieldCounts() for c in used}
    t0 = time.perf_counter()
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
        with _progress_bar(progress, total, f"{schema.dataset}: counting (1/2)") as bar:
            bar.update(int(start["offset"]) if start else 0)
            for lineno0, nlines, text, end in _iter_blocks(source, block_bytes, max_rows, start, info):
                cols, lab = parser.parse(lineno0, nlines, text, stats)
                m = lab.shape[0]
                spill = {"y": lab, "idx": np.empty((m, len(used)), dtype=np.int32)}
                for j, c in enumerate(used if m else ()):
                    d = cols[c]
                    idx = d.indices.to_numpy(zero_copy_only=False)
                    h = _hash_values(d.dictionary)
                    cnt = np.bincount(idx, minlength=len(d.dictionary))
                    seen = cnt > 0
                    if seen.all():
                        counts[c].add(h, cnt.astype(np.int64), d.dictionary)
                    else:  # values of dropped rows only
                        counts[c].add(h[seen], cnt[seen].astype(np.int64), d.dictionary.filter(pa.array(seen)))
                    spill["idx"][:, j] = idx
                    spill[f"h{j}"] = h
                with open(work_dir / f"b{nblocks}.npz", "wb") as fh:
                    np.savez(fh, **spill)
                nblocks += 1
                since += 1
                bar.update(len(text))
                bar.set_postfix(rows_s=f"{stats['rows_read'] / max(time.perf_counter() - t0, 1e-9):,.0f}")
                if since >= checkpoint_blocks:
                    _save_partial(work_dir, partials, counts)
                    partials += 1
                    since = 0
                    stats["header_lines"] = info.get("header_lines", 0)
                    _save_json(work_dir / "state.json", {"params": params, "stats": stats, "partials": partials,
                                                         "blocks": nblocks,
                                                         "resume1": {"offset": end, "lineno": lineno0 + nlines}})
                tick()
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
    seconds1 = time.perf_counter() - t0
    n = stats["rows_kept"]
    if n == 0:
        _remove(work_dir)
        raise DataFormatError(unusable_message(schema, source, stats), file=path, stats=stats)

    # ---- vocabularies --------------------------------------------------------------------------
    import pyarrow.compute as pc

    luts, vocab, field_stats, cards = [], {}, [], []
    for f, memo in zip(fields, cleaner.memos):
        fc = counts[f.column]
        raw = [b.decode("utf-8", errors="surrogateescape") for b in fc.values.to_pylist()] if memo is not None \
            else None
        if memo is not None:
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
            is_empty = fc.hashes == _EMPTY_HASH
            empty = int(fc.counts[is_empty].sum())
            sel = ~is_empty if not f.thresholded else (~is_empty & (fc.counts >= min_count))
            pos = np.flatnonzero(sel)
            vals = fc.values.take(pa.array(pos))
            # by decreasing count, ties by the token (the same order as sorting the decoded strings for UTF-8
            # text: code point order is byte order)
            order = pc.sort_indices(pa.table({"n": pa.array(-fc.counts[pos]), "v": vals}),
                                    sort_keys=[("n", "ascending"), ("v", "ascending")]).to_numpy()
            ids = np.zeros(len(fc.hashes), dtype=np.int64)
            ids[pos[order]] = np.arange(2, len(pos) + 2)
            ids[is_empty] = EMPTY_ID
            kept = [b.decode("utf-8", errors="surrogateescape") for b in vals.take(pa.array(order)).to_pylist()]
            kept_total = int(fc.counts[pos].sum())
            distinct = int((~is_empty).sum())
        oov = n - empty - kept_total
        luts.append((fc.hashes, ids.astype(np.int32)))
        vocab[f.name] = [OOV_TOKEN, EMPTY_TOKEN] + kept
        cards.append(len(kept) + 2)
        field_stats.append({"name": f.name, "cardinality": len(kept) + 2, "distinct_tokens": int(distinct),
                            "oov_occurrences": int(oov), "empty_occurrences": int(empty),
                            "thresholded": f.thresholded})
    for c in used:
        counts[c].values = None  # the values themselves are no longer needed
    stats["fields"] = field_stats
    stats["min_count"] = min_count
    fmap = FeatureMap(schema.dataset, [f.name for f in fields], cards, stats=stats)
    offsets = np.asarray(fmap.offsets, dtype=np.int64)
    dtype = np.int32 if fmap.num_features < 2**31 else np.int64

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
    since = 0
    with _progress_bar(progress, nblocks, f"{schema.dataset}: encoding (2/2)") as bar:
        bar.update(first)
        for k in range(first, nblocks):
            with np.load(work_dir / f"b{k}.npz") as z:
                lab, idx = z["y"], z["idx"]
                m = lab.shape[0]
                if m:
                    block = np.empty((m, F), dtype=np.int64)
                    for fi, (j, (hashes, ids)) in enumerate(zip(col_of, luts)):
                        h = z[f"h{j}"]
                        order = np.argsort(h)  # sorted queries walk the (large) table in order: far fewer misses
                        at = np.empty(len(h), dtype=np.int64)
                        at[order] = np.minimum(np.searchsorted(hashes, h[order]), len(hashes) - 1)
                        block[:, fi] = ids[at][idx[:, j]]
                    block += offsets
                    X[pos:pos + m] = block  # file writes, not a memory map: the rows never count in our RSS
                    y[pos:pos + m] = lab
                    pos += m
            since += 1
            bar.update(1)
            if target is not None and since >= checkpoint_blocks * 4:
                X.flush()
                y.flush()
                since = 0
                _save_json(work_dir / "state.json",
                           {"params": params, "stats": stats, "partials": state["partials"], "blocks": nblocks,
                            "pass1_done": True, "resume2": {"rows": pos, "block": k + 1}})
            tick()
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
    stats["seconds"] = {"count": round(seconds1, 3), "encode": round(seconds2, 3)}
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
        data = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
        at = self.offset + rows.start * self.row_bytes
        while data:
            k = os.pwrite(self.fd, data, at)
            data, at = data[k:], at + k

    def flush(self) -> None:
        pass  # written data is in the page cache: it survives a kill of the process

    def close(self) -> None:
        os.close(self.fd)


def _count_partials(work: Path) -> int:
    return len(list(work.glob("p1-*.npz")))


def _remove(work: Path) -> None:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
