"""Bring your own data: CSV / TSV / Parquet files described by a YAML feature spec.

A spec names the label and its positive rule, the feature columns and how each becomes tokens, optional side
tables joined by a key, ``min_count`` and the split::

    name: clicks                       # cache folder prefix (lower-case letters and digits; default "csv")
    input: {format: csv}               # csv | tsv | parquet (default: from the file suffix); see below
    label: {column: clicked, positive: "== 1"}
    fields:
      - {column: user}                           # categorical: the raw value is the token
      - {columns: [ad, site]}                     # shorthand: one categorical field per column
      - {column: price, type: numeric, bucketing: log2}            # Criteo's rule: b<floor(log(x)^2)> for x > 2
      - {column: age, type: numeric, bucketing: quantile, buckets: 10}
      - {column: hour, type: numeric, bucketing: fixed, boundaries: [6, 12, 18]}
      - {column: tags, type: multi, separator: "|", slots: 3}     # -> fields tags_1, tags_2, tags_3
    min_count: 2
    split: {by: time, column: ts}      # or {by: random, seed: 2022} or {by: file}; ratios: [0.8, 0.1, 0.1]

**input** (and each join): ``format`` (``csv``, ``tsv``, ``parquet``), ``separator`` (one character; default
``,`` for csv, tab for tsv), ``header`` (the first line names the columns; default true), ``columns`` (the names
when there is no header), ``encoding`` (default utf-8), ``min_columns`` (rows with at least that many but fewer
than all columns are padded with empty values and counted in ``stats["padded_rows"]``, as the built-in Criteo
loader does for lines whose trailing empty columns a text tool stripped; default: every column is required).
CSV/TSV files are read by the built-in line reader (:func:`optembed_ext.data._stream.iter_row_chunks`: one row per
physical line, ``"``-quoted values in comma-separated files, any separator string such as ``::``, compression
gzip/bz2/xz detected from the content); Parquet files by pyarrow in record batches.

**label**: ``column``; ``positive`` -- a comparison (``">= 4"``, ``"== 1"``, ``"!= 0"``), a value or a list of
values; ``negative`` (optional) likewise: rows matching neither are dropped on purpose (``stats["filtered"]``,
e.g. MovieLens' rating 3); without it every row that is not positive is negative. A comparison needs a number
(another value is a malformed row).

**fields** (each gives one field, ``multi`` gives ``slots`` fields): ``name`` (default: the column),
``column``, ``type`` and ``thresholded`` (apply ``min_count``; default true, false for numeric fields):

* ``categorical`` (default): the raw string; ``extract`` -- a regular expression whose first group is the token
  (no match: empty); ``fallback`` -- a column whose value (or its ``fallback_extract``) is used when the token is
  empty (MovieLens' year: from the title, else the release date);
* ``numeric``: ``bucketing`` ``log2`` (Criteo's integer rule), ``quantile`` (``buckets`` equal-frequency buckets
  over the values of the whole file -- the first 10 million when there are more --, computed in a first pass),
  ``fixed`` (``boundaries``, ascending) or ``none`` (the number itself); a value that is not a number makes the row
  malformed;
* ``multi``: ``separator``; ``slots: k`` gives ``k`` fields ``<name>_1 .. <name>_k`` holding the first ``k``
  values (``sort: true`` sorts them first; missing slots are empty, extra values dropped and counted in
  ``stats["truncated_values"]``): our models take one id per field, so a value list becomes a fixed number of
  slot fields, each with its own vocabulary; ``slots: 0`` keeps the whole (optionally sorted) list as one token;
* ``flags``: ``flags: [col, ...]`` binary columns; the token is the names of the columns holding a true value
  (``true_values``, default ``["1"]``) joined by ``join`` (default ``"|"``), e.g. MovieLens 100K's genre flags.

**joins**: side tables read whole into memory, each with ``file`` (relative to the input's folder), the input
options above, ``key`` (its key column) and ``on`` (the main table's column, default ``key``). Their other columns
can be used by fields as if they were columns of the main table. A key not in the side table makes the row
malformed; a repeated key keeps its first row (``stats["side_duplicates"]``).

Rows: a row with the wrong number of columns, a label or numeric value that cannot be parsed, a missing join key or
an unparsable time is malformed: counted (``stats["malformed"]``, ``malformed_by_reason``, the first examples
with their row and column) and skipped, or with ``strict=True`` a :class:`MalformedRowError` naming the file, the
row and the column. A bad spec raises :class:`SpecError` naming the key (``fields[2].bucketing: ...``).

How it runs: pyarrow reads the input in record batches; pass 0 turns each batch into one token per field
(transforms run once per distinct value) and writes the kept rows as a tab-separated token file in the cache's
work folder; the built-in two-pass streaming encoder (:func:`optembed_ext.data._stream.encode_table`: vocabularies
with ``<OOV>`` at 0 and ``<EMPTY>`` at 1, tokens by decreasing count) encodes it; the arrays go into the
same cache as the built-in formats (:mod:`optembed_ext.data.cache`: a folder keyed by the spec, the parameters and
the fingerprints of every file read; validated on load). A time split stores the rows sorted by the time column
(stable), then takes train/val/test in that order. Tabs and line ends inside tokens become spaces.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import _fast, _stream
from . import cache as _cache
from .batching import make_splits
from .errors import DataFileNotFoundError, DataFormatError, DataUsageError, MalformedRowError
from .formats import criteo_int_token, finite_float
from .loaders import PreprocessResult
from .types import CTRDataset, _jsonable

__all__ = ["SpecError", "Spec", "load_spec", "preprocess_generic", "load_generic", "FORMATS", "BUCKETINGS"]

FORMATS = ("csv", "tsv", "parquet")
FIELD_TYPES = ("categorical", "numeric", "multi", "flags")
BUCKETINGS = ("log2", "quantile", "fixed", "none")
SPLITS = ("random", "time", "file")
GENERIC_VERSION = 1
QUANTILE_SAMPLE = 10_000_000
CHUNK_ROWS = 65536
ENGINES = ("auto", "python", "arrow")
ARROW_MIN_BYTES = 32 << 20  # engine="auto": token files from this size on are encoded by the arrow engine
_NAME_RE = re.compile(r"^[a-z0-9]+$")
_RULE_RE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")
_SANITIZE = re.compile(r"[\t\r\n]")


class SpecError(DataUsageError):
    """A feature spec that cannot be used; the message names the key (``fields[2].bucketing: ...``)."""


# ------------------------------------------------------------------------------------------------ the spec
def _err(where: str, msg: str) -> SpecError:
    return SpecError(f"{where}: {msg}")


def _check_keys(d, allowed: set, where: str) -> dict:
    if not isinstance(d, dict):
        raise _err(where, f"must be a mapping, got {type(d).__name__} {d!r}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise _err(where, f"unknown keys {unknown}; expected some of {sorted(allowed)}")
    return d


def _str(d: dict, key: str, where: str, default=None, required: bool = False):
    v = d.get(key, default)
    if v is None:
        if required:
            raise _err(f"{where}.{key}" if where else key, "is required")
        return None
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise _err(f"{where}.{key}" if where else key, f"must be a string, got {v!r}")
    return str(v)


def _bool(d: dict, key: str, where: str, default):
    v = d.get(key, default)
    if v is not None and not isinstance(v, bool):
        raise _err(f"{where}.{key}", f"must be true or false, got {v!r}")
    return v


def _int(d: dict, key: str, where: str, default, minimum: int):
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _err(f"{where}.{key}", f"must be an integer >= {minimum}, got {v!r}")
    return v


@dataclass
class InputSpec:
    format: str | None = None
    separator: str | None = None
    header: bool = True
    columns: list[str] | None = None
    encoding: str = "utf-8"
    min_columns: int | None = None

    @classmethod
    def parse(cls, d, where: str) -> "InputSpec":
        d = _check_keys({} if d is None else d, {"format", "separator", "header", "columns", "encoding", "min_columns"},
                        where)
        fmt = _str(d, "format", where)
        if fmt is not None and fmt.lower() not in FORMATS:
            raise _err(f"{where}.format", f"must be one of {list(FORMATS)}, got {fmt!r}")
        sep = d.get("separator")
        if sep is not None and (not isinstance(sep, str) or sep == "" or "\n" in sep or "\r" in sep):
            raise _err(f"{where}.separator", f"must be a non-empty string without line ends, got {sep!r}")
        header = _bool(d, "header", where, True)
        cols = d.get("columns")
        if cols is not None:
            if not isinstance(cols, list) or not cols or not all(isinstance(c, (str, int)) for c in cols):
                raise _err(f"{where}.columns", f"must be a non-empty list of names, got {cols!r}")
            cols = [str(c) for c in cols]
            if len(set(cols)) != len(cols):
                raise _err(f"{where}.columns", f"names must be unique, got {cols}")
        if header and cols is not None:
            raise _err(f"{where}.columns", "is only for files without a header line (header: false); with a "
                       "header the first line names the columns")
        if not header and cols is None:
            raise _err(f"{where}.columns", "is required when header is false (the file does not name its columns)")
        enc = _str(d, "encoding", where, "utf-8")
        try:
            "".encode(enc)
        except LookupError:
            raise _err(f"{where}.encoding", f"unknown encoding {enc!r}") from None
        minc = None if d.get("min_columns") is None else _int(d, "min_columns", where, None, 1)
        return cls(None if fmt is None else fmt.lower(), sep, header, cols, enc, minc)

    def resolved_format(self, path: Path) -> str:
        if self.format is not None:
            return self.format
        suffixes = [s.lower() for s in path.suffixes]
        for s in reversed(suffixes):
            if s in (".parquet", ".pq"):
                return "parquet"
            if s in (".tsv", ".tab"):
                return "tsv"
            if s in (".csv", ".txt", ".data"):
                return "tsv" if s == ".data" else "csv"
        return "csv"


@dataclass
class LabelRule:
    column: str
    positive: Any
    negative: Any = None

    @staticmethod
    def _rule(v, where: str):
        if isinstance(v, bool) or v is None:
            raise _err(where, f"must be a comparison such as '>= 4', a value or a list of values, got {v!r}")
        if isinstance(v, (int, float)):
            return ("==", float(v))
        if isinstance(v, list):
            if not v or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v):
                raise _err(where, f"a list of values must be non-empty strings or numbers, got {v!r}")
            return ("in", frozenset(str(x) for x in v))
        if not isinstance(v, str):
            raise _err(where, f"must be a comparison, a value or a list, got {v!r}")
        m = _RULE_RE.match(v)
        if m:
            try:
                return (m.group(1), float(m.group(2)))
            except ValueError:
                raise _err(where, f"the comparison {v!r} needs a number after {m.group(1)!r}") from None
        return ("in", frozenset([v]))

    @classmethod
    def parse(cls, d) -> "LabelRule":
        if d is None:
            raise _err("label", "is required (label: {column: ..., positive: ...})")
        d = _check_keys(d, {"column", "positive", "negative"}, "label")
        col = _str(d, "column", "label", required=True)
        if "positive" not in d:
            raise _err("label.positive", "is required (e.g. positive: '>= 4' or positive: 1)")
        pos = cls._rule(d["positive"], "label.positive")
        neg = None if d.get("negative") is None else cls._rule(d["negative"], "label.negative")
        return cls(col, pos, neg)

    @staticmethod
    def _match(rule, s: str) -> bool:
        op, ref = rule
        if op == "in":
            return s in ref
        try:
            x = float(s)
        except ValueError:
            raise ValueError(f"label {s!r} is not a number (the rule compares numbers)") from None
        if math.isnan(x):
            raise ValueError("label is NaN")
        return {">=": x >= ref, "<=": x <= ref, "==": x == ref, "!=": x != ref, ">": x > ref, "<": x < ref}[op]

    def __call__(self, s: str) -> int:
        s = s.strip()
        if s == "":
            raise ValueError("empty label")
        if self._match(self.positive, s):
            return 1
        if self.negative is None or self._match(self.negative, s):
            return 0
        return -1


@dataclass
class FieldRule:
    name: str
    type: str
    column: str | None = None
    thresholded: bool = True
    extract: re.Pattern | None = None
    fallback: str | None = None
    fallback_extract: re.Pattern | None = None
    bucketing: str = "none"
    buckets: int = 10
    boundaries: list[float] | None = None
    separator: str = "|"
    slots: int = 1
    sort: bool = False
    flags: list[str] | None = None
    true_values: frozenset = frozenset({"1"})
    join: str = "|"

    @property
    def output_names(self) -> list[str]:
        if self.type == "multi" and self.slots > 0:
            return [f"{self.name}_{i + 1}" for i in range(self.slots)]
        return [self.name]

    @property
    def columns(self) -> list[str]:
        if self.type == "flags":
            return list(self.flags)
        return [self.column] + ([self.fallback] if self.fallback else [])


_COMMON_KEYS = {"name", "column", "columns", "type", "thresholded"}
_TYPE_KEYS = {"categorical": {"extract", "fallback", "fallback_extract"},
              "numeric": {"bucketing", "buckets", "boundaries"},
              "multi": {"separator", "slots", "sort"},
              "flags": {"flags", "true_values", "join"}}


def _regex(d, key, where):
    v = _str(d, key, where)
    if v is None:
        return None
    try:
        pat = re.compile(v)
    except re.error as e:
        raise _err(f"{where}.{key}", f"is not a valid regular expression ({e})") from None
    if pat.groups < 1:
        raise _err(f"{where}.{key}", f"needs a group (...) holding the token, got {v!r}")
    return pat


def _parse_fields(items) -> list[FieldRule]:
    if not isinstance(items, list) or not items:
        raise _err("fields", "must be a non-empty list of field entries")
    out = []
    for i, d in enumerate(items):
        where = f"fields[{i}]"
        if isinstance(d, str):
            d = {"column": d}
        kind = (d.get("type", "categorical") if isinstance(d, dict) else "categorical")
        if kind not in FIELD_TYPES:
            raise _err(f"{where}.type", f"must be one of {list(FIELD_TYPES)}, got {kind!r}")
        d = _check_keys(d, _COMMON_KEYS | _TYPE_KEYS[kind], where)
        if "columns" in d:
            if "column" in d or "name" in d:
                raise _err(where, "give either columns (one field per column, named after it) or column/name")
            cols = d["columns"]
            if not isinstance(cols, list) or not cols:
                raise _err(f"{where}.columns", f"must be a non-empty list of column names, got {cols!r}")
            for c in cols:
                out.append(_parse_field({**{k: v for k, v in d.items() if k != "columns"}, "column": c}, where,
                                        kind))
        else:
            out.append(_parse_field(d, where, kind))
    names = [n for f in out for n in f.output_names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _err("fields", f"field names must be unique, repeated: {dup} (set name: on one of them)")
    return out


def _parse_field(d: dict, where: str, kind: str) -> FieldRule:
    if kind == "flags":
        flags = d.get("flags")
        if not isinstance(flags, list) or not flags or not all(isinstance(c, (str, int)) for c in flags):
            raise _err(f"{where}.flags", f"must be a non-empty list of column names, got {flags!r}")
        name = _str(d, "name", where, required=True)
        tv = d.get("true_values", ["1"])
        if not isinstance(tv, list) or not tv:
            raise _err(f"{where}.true_values", f"must be a non-empty list, got {tv!r}")
        return FieldRule(name, kind, None, _bool(d, "thresholded", where, True), flags=[str(c) for c in flags],
                         true_values=frozenset(str(v) for v in tv), join=_str(d, "join", where, "|"))
    col = _str(d, "column", where, required=True)
    name = _str(d, "name", where, col)
    f = FieldRule(name, kind, col, _bool(d, "thresholded", where, kind != "numeric"))
    if kind == "categorical":
        f.extract = _regex(d, "extract", where)
        f.fallback = _str(d, "fallback", where)
        f.fallback_extract = _regex(d, "fallback_extract", where)
        if f.fallback_extract is not None and f.fallback is None:
            raise _err(f"{where}.fallback_extract", "needs fallback (the column it applies to)")
    elif kind == "numeric":
        b = _str(d, "bucketing", where, "none")
        if b not in BUCKETINGS:
            raise _err(f"{where}.bucketing", f"must be one of {list(BUCKETINGS)}, got {b!r}")
        f.bucketing = b
        if b == "quantile":
            f.buckets = _int(d, "buckets", where, 10, 2)
        elif "buckets" in d:
            raise _err(f"{where}.buckets", "applies to bucketing: quantile only")
        if b == "fixed":
            bd = d.get("boundaries")
            if not isinstance(bd, list) or not bd or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                             for x in bd):
                raise _err(f"{where}.boundaries", f"must be a non-empty list of numbers, got {bd!r}")
            if any(b2 <= b1 for b1, b2 in zip(bd, bd[1:])):
                raise _err(f"{where}.boundaries", f"must be strictly increasing, got {bd}")
            f.boundaries = [float(x) for x in bd]
        elif "boundaries" in d:
            raise _err(f"{where}.boundaries", "applies to bucketing: fixed only")
    else:  # multi
        sep = _str(d, "separator", where, required=True)
        if sep == "":
            raise _err(f"{where}.separator", "must not be empty")
        f.separator = sep
        f.slots = _int(d, "slots", where, 1, 0)
        f.sort = bool(_bool(d, "sort", where, False))
    return f


@dataclass
class JoinSpec:
    file: str
    input: InputSpec
    key: str
    on: str

    @classmethod
    def parse(cls, d, i: int) -> "JoinSpec":
        where = f"joins[{i}]"
        d = _check_keys(d, {"file", "key", "on", "format", "separator", "header", "columns", "encoding", "min_columns"},
                        where)
        file = _str(d, "file", where, required=True)
        key = _str(d, "key", where, required=True)
        inp = InputSpec.parse({k: v for k, v in d.items() if k not in ("file", "key", "on")}, where)
        if inp.columns is not None and key not in inp.columns:
            raise _err(f"{where}.key", f"{key!r} is not one of its columns {inp.columns}")
        return cls(file, inp, key, _str(d, "on", where, key))


@dataclass
class SplitSpec:
    by: str = "random"
    column: str | None = None
    seed: int = 2022
    ratios: tuple = (0.8, 0.1, 0.1)

    @classmethod
    def parse(cls, d) -> "SplitSpec":
        d = _check_keys({} if d is None else d, {"by", "column", "seed", "ratios"}, "split")
        by = _str(d, "by", "split", "random")
        if by not in SPLITS:
            raise _err("split.by", f"must be one of {list(SPLITS)}, got {by!r}")
        col = _str(d, "column", "split")
        if by == "time" and col is None:
            raise _err("split.column", "is required with by: time (the column holding each row's time)")
        if by != "time" and col is not None:
            raise _err("split.column", "applies to by: time only")
        seed = _int(d, "seed", "split", 2022, 0)
        ratios = d.get("ratios", [0.8, 0.1, 0.1])
        if (not isinstance(ratios, list) or len(ratios) != 3
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r >= 0 for r in ratios)
                or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6)):
            raise _err("split.ratios", f"must be three non-negative numbers summing to 1, got {ratios!r}")
        return cls(by, col, seed, tuple(float(r) for r in ratios))


@dataclass
class Spec:
    """A parsed feature spec (see the module doc); ``raw`` is the mapping it came from."""

    name: str
    input: InputSpec
    label: LabelRule
    fields: list[FieldRule]
    joins: list[JoinSpec] = field(default_factory=list)
    min_count: int = 2
    split: SplitSpec = field(default_factory=SplitSpec)
    raw: dict = field(default_factory=dict)
    source: str = "<spec>"

    @property
    def field_names(self) -> list[str]:
        return [n for f in self.fields for n in f.output_names]

    @classmethod
    def from_dict(cls, d, source: str = "<spec>") -> "Spec":
        try:
            d = _check_keys(d, {"name", "description", "input", "label", "fields", "joins", "min_count", "split"},
                            "spec")
            name = _str(d, "name", "", "csv")
            if not _NAME_RE.match(name):
                raise _err("name", f"must be lower-case letters and digits (it names the cache folder), got {name!r}")
            joins = d.get("joins") or []
            if not isinstance(joins, list):
                raise _err("joins", f"must be a list, got {joins!r}")
            spec = cls(name, InputSpec.parse(d.get("input"), "input"), LabelRule.parse(d.get("label")),
                       _parse_fields(d.get("fields")), [JoinSpec.parse(j, i) for i, j in enumerate(joins)],
                       _int(d, "min_count", "spec", 2, 1), SplitSpec.parse(d.get("split")), dict(d), source)
        except SpecError as e:
            raise SpecError(f"{source}: {e}") from None
        return spec


def load_spec(spec) -> Spec:
    """A :class:`Spec` from a YAML file path, a YAML string holding a mapping, a dict or a :class:`Spec`."""
    import yaml

    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, dict):
        return Spec.from_dict(spec)
    if isinstance(spec, Path) or (isinstance(spec, str) and "\n" not in spec and not spec.lstrip().startswith("{")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataFileNotFoundError(f"spec file {path} does not exist")
        text, source = path.read_text(), str(path)
    elif isinstance(spec, str):
        text, source = spec, "<spec>"
    else:
        raise SpecError(f"spec must be a YAML file path, YAML text or a mapping, got {type(spec).__name__}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML ({e})") from None
    return Spec.from_dict(data, source)


# --------------------------------------------------------------------------------------------- reading
def _pa():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pacsv
    except ImportError:
        raise DataUsageError("reading CSV/TSV/Parquet files with a spec needs the pyarrow package "
                             "(pip install pyarrow)") from None
    return pa, pc, pacsv


class _Issues:
    """Malformed rows of one file: counts, the first examples, and the strict-mode error."""

    def __init__(self, path: Path, strict: bool, stats: dict):
        self.path, self.strict, self.stats = path, strict, stats

    def add(self, row: int | None, column: str | None, reason: str, kind: str, value=None, line=None):
        where = f"row {row}" if row is not None else f"line {line}"
        if self.strict:
            col = "" if column is None else f", column {column!r}"
            shown = "" if value is None else f" (value {value!r})"
            raise MalformedRowError(f"malformed row in {self.path}: {where}{col}: {reason}{shown}", file=self.path,
                                    line=line if line is not None else row, reason=reason, stats=self.stats)
        st = self.stats
        st["malformed"] += 1
        st["malformed_by_reason"][kind] = st["malformed_by_reason"].get(kind, 0) + 1
        if len(st["malformed_examples"]) < _stream._MAX_EXAMPLES:
            st["malformed_examples"].append({"file": str(self.path), "row": row, "line": line,
                                             "column_name": column, "reason": reason, "value": value})


def _text_batches(path: Path, inp: InputSpec, sep: str, all_columns: list[str], columns: list[str],
                  max_rows: int | None, stats: dict | None):
    """``(n, {column: pyarrow string array}, line numbers, issues)`` of a delimited text file, chunk by chunk,
    through the built-in line reader: blank lines skipped, rows with a wrong column count left out (or padded) and
    listed in ``issues`` as ``(line, reason, kind, value)``."""
    pa, _, _ = _pa()
    ncols = len(all_columns)
    minc = inp.min_columns or ncols
    where = [all_columns.index(c) for c in columns]
    source = _stream.RawSource(path, sep, inp.header, encoding=inp.encoding)
    for lineno0, rows in _stream.iter_row_chunks(source, CHUNK_ROWS, max_rows):
        kept, lines, issues = [], [], []
        for i, r in enumerate(rows):
            n = len(r)
            if n == ncols and type(r) is list:
                pass
            elif type(r) is not list:  # a line the reader could not split (an unclosed quote)
                issues.append((lineno0 + i, r.reason, r.kind, r.value))
                continue
            elif n == 1 and r[0] == "":
                if stats is not None:
                    stats["blank_lines"] += 1
                continue
            elif minc <= n < ncols:
                r = r + [""] * (ncols - n)
                if stats is not None:
                    stats["padded_rows"] += 1
            else:
                issues.append((lineno0 + i, f"expected {ncols} {_sep_name(sep)}-separated columns, got {n}",
                               "wrong_column_count", None))
                continue
            kept.append(r)
            lines.append(lineno0 + i)
        if stats is not None and "rows_read" in stats:
            stats["rows_read"] += len(rows) - len(kept)  # the kept rows are counted by the caller
        cols = list(zip(*kept)) if kept else [()] * ncols
        yield len(kept), {c: pa.array(list(cols[j]), pa.string()) for c, j in zip(columns, where)}, \
            np.asarray(lines, dtype=np.int64), issues


def _sep_name(sep: str) -> str:
    return {",": "comma", "\t": "tab"}.get(sep, repr(sep))


def _arrow_error(path: Path, e) -> DataFormatError:
    msg = str(e).split("\n")[0]
    return DataFormatError(f"{path}: cannot read the file ({msg}); check the spec's input format", file=path)


def _shorten(s, n: int = 80):
    if s is None:
        return None
    return s if len(s) <= n else s[:n] + "..."


class _Reader:
    """One input (main file or side table): its format, its column names and a batch iterator."""

    def __init__(self, path: Path, inp: InputSpec, what: str):
        if not path.is_file():
            raise DataFileNotFoundError(f"{what} {path} does not exist")
        self.path, self.inp = path, inp
        self.format = inp.resolved_format(path)
        self.numbering = "row" if self.format == "parquet" else "line"
        self.columns = self._column_names()

    def _column_names(self) -> list[str]:
        pa, pc, pacsv = _pa()
        if self.format == "parquet":
            import pyarrow.parquet as pq

            if self.inp.columns is not None and not self.inp.header:
                raise SpecError(f"{self.path}: a Parquet file names its columns; drop columns/header from the spec")
            try:
                return list(pq.ParquetFile(self.path).schema_arrow.names)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataFormatError(f"{self.path}: not a readable Parquet file ({e})", file=self.path) from None
        if not self.inp.header:
            return list(self.inp.columns)
        sep = self.separator
        first = _stream.read_first_line(self.path, self.inp.encoding)
        if not first.strip():
            raise DataFormatError(f"{self.path}: the first line is empty but the spec says it names the columns "
                                  "(header: true)", file=self.path)
        header = _stream._split_lines([first], sep, first)[0]  # as the line reader splits it (quotes in CSV)
        if type(header) is not list:
            raise DataFormatError(f"{self.path}: cannot split the header line into columns ({header.reason})",
                                  file=self.path)
        return [c.strip() for c in header]

    def require(self, names: Sequence[str], where: str) -> None:
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise SpecError(f"{where}: columns {missing} are not in {self.path.name} (its columns: "
                            f"{self.columns[:40]})")

    @property
    def separator(self) -> str:
        return self.inp.separator or ("\t" if self.format == "tsv" else ",")

    def batches(self, columns: list[str], max_rows: int | None = None, stats: dict | None = None):
        """``(n, {column: string array}, numbers, issues)``: ``numbers`` are the rows' physical lines (text files)
        or 1-based row numbers (Parquet); ``issues`` the left-out lines ``(line, reason, kind, value)``."""
        pa, pc, _ = _pa()
        if self.format != "parquet":
            yield from _text_batches(self.path, self.inp, self.separator, self.columns, columns, max_rows, stats)
            return
        import pyarrow.parquet as pq

        seen = 0
        try:
            it = pq.ParquetFile(self.path).iter_batches(batch_size=CHUNK_ROWS, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise _arrow_error(self.path, e) from None
        for batch in it:
            if max_rows is not None and seen + batch.num_rows > max_rows:
                batch = batch.slice(0, max_rows - seen)
            cols = {}
            for name in columns:
                arr = batch.column(batch.schema.get_field_index(name))
                if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
                    arr = _to_string(arr)
                cols[name] = pc.fill_null(arr, "")
            yield batch.num_rows, cols, np.arange(seen + 1, seen + batch.num_rows + 1), []
            seen += batch.num_rows
            if max_rows is not None and seen >= max_rows:
                return


def _to_string(arr):
    """A Parquet column as strings: integers and integral floats without a decimal point, others as cast."""
    pa, pc, _ = _pa()
    if pa.types.is_floating(arr.type):
        vals = arr.to_pylist()
        return pa.array(["" if v is None else _number_token(v) for v in vals], pa.string())
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        return pc.cast(pc.cast(arr, pa.int64()) if pa.types.is_timestamp(arr.type) else arr, pa.string())
    return pc.cast(arr, pa.string())


def _number_token(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if x == int(x) and abs(x) < 1e16:
        return str(int(x))
    return repr(float(x))


# -------------------------------------------------------------------------------------------- tokens
class _Column:
    """Token builder of one field rule: per-distinct-value transforms, memoised across batches."""

    def __init__(self, rule: FieldRule):
        self.rule = rule
        self.memo: dict = {}
        self.fb_memo: dict = {}
        self.truncated = 0
        self.quantiles: np.ndarray | None = None

    # value -> token(s); ValueError -> malformed
    def _numeric(self, s: str) -> str:
        r = self.rule
        if r.bucketing == "log2":
            return criteo_int_token(s)
        x = finite_float(s)
        if r.bucketing == "none":
            return _number_token(x)
        bounds = r.boundaries if r.bucketing == "fixed" else self.quantiles
        i = int(np.searchsorted(bounds, x, side="right"))
        if i == 0:
            return f"<{bounds[0]:g}"
        if i == len(bounds):
            return f">={bounds[-1]:g}"
        return f"[{bounds[i - 1]:g},{bounds[i]:g})"

    def _categorical(self, s: str) -> str:
        pat = self.rule.extract
        if pat is None:
            return s
        m = pat.search(s)
        return "" if m is None or m.group(1) is None else m.group(1)

    def _fallback(self, s: str) -> str:
        pat = self.rule.fallback_extract
        if pat is None:
            return s.strip()
        m = pat.search(s)
        return "" if m is None or m.group(1) is None else m.group(1)

    def _multi(self, s: str):
        r = self.rule
        vals = [v.strip() for v in s.split(r.separator)]
        vals = [v for v in vals if v]
        if r.sort:
            vals.sort()
        if r.slots == 0:
            return (r.separator.join(vals), 0)
        extra = max(0, len(vals) - r.slots)
        return tuple(vals[:r.slots]) + ("",) * max(0, r.slots - len(vals)) + (extra,)

    def _flags(self, s: str) -> str:
        r = self.rule
        parts = s.split("\x1f")
        return r.join.join(n for n, v in zip(r.flags, parts) if v.strip() in r.true_values)

    def tokens(self, cols: dict, n: int):
        """``([token arrays], bad positions {row: (column, value, reason)})`` for one batch."""
        pa, pc, _ = _pa()
        r = self.rule
        bad: dict[int, tuple] = {}
        if r.type == "flags":
            src = pc.binary_join_element_wise(*[cols[c] for c in r.flags], "\x1f")
            return [_map_unique(src, self._flags, self.memo, bad, r.flags[0])], bad
        src = cols[r.column]
        if r.type == "numeric":
            return [_map_unique(src, self._numeric, self.memo, bad, r.column, empty="")], bad
        if r.type == "categorical":
            tok = src if r.extract is None else _map_unique(src, self._categorical, self.memo, bad, r.column)
            if r.fallback is not None:
                fb = _map_unique(cols[r.fallback], self._fallback, self.fb_memo, bad, r.fallback)
                tok = pc.if_else(pc.equal(tok, ""), fb, tok)
            return [tok], bad
        # multi
        dic = pc.dictionary_encode(src)
        uniq = dic.dictionary.to_pylist()
        outs = [self.memo[v] if v in self.memo else self.memo.setdefault(v, self._multi(v)) for v in uniq]
        idx = dic.indices
        extra = np.asarray([o[-1] for o in outs], dtype=np.int64)
        if len(extra):
            self.truncated += int(extra[np.asarray(idx)].sum())
        k = max(1, r.slots)
        return [pc.take(pa.array([o[j] for o in outs], pa.string()), idx) for j in range(k)], bad


def _map_unique(arr, fn, memo: dict, bad: dict, column: str, empty: str | None = ""):
    """``fn`` applied once per distinct value of ``arr`` (``""`` stays ``empty``); rows whose value raises
    ``ValueError`` are recorded in ``bad`` and get an empty token."""
    pa, pc, _ = _pa()
    dic = pc.dictionary_encode(arr)
    uniq = dic.dictionary.to_pylist()
    out, failed = [], []
    for j, v in enumerate(uniq):
        if v == "" and empty is not None:
            out.append(empty)
            continue
        t = memo.get(v)
        if t is None:
            try:
                t = fn(v)
            except ValueError as e:
                t = _Bad(str(e))
            memo[v] = t
        if isinstance(t, _Bad):
            failed.append(j)
            out.append("")
        else:
            out.append(t)
    idx = dic.indices
    if failed:
        codes = np.asarray(idx)
        for row in np.flatnonzero(np.isin(codes, failed)).tolist():
            if row not in bad:
                v = uniq[codes[row]]
                bad[row] = (column, v, memo[v].reason)
    return pc.take(pa.array(out, pa.string()), idx)


class _Bad:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _time_value(s: str) -> float:
    s = s.strip()
    if s == "":
        raise ValueError("empty time")
    try:
        x = float(s)
    except ValueError:
        pass
    else:
        if math.isnan(x):
            raise ValueError("time is NaN")
        return x
    try:
        t = datetime.datetime.fromisoformat(s)
    except ValueError:
        raise ValueError("time is neither a number nor an ISO 8601 date/time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


# --------------------------------------------------------------------------------------------- pass 0
class _SideTable:
    def __init__(self, join: JoinSpec, base: Path, strict: bool, stats: dict):
        path = (base / join.file) if not Path(join.file).is_absolute() else Path(join.file)
        self.reader = _Reader(path.expanduser(), join.input, "join file")
        self.join = join
        self.reader.require([join.key], f"joins: key of {path.name}")
        self.path = self.reader.path
        self.stats = {"rows": 0, "duplicates": 0, "blank_lines": 0, "padded_rows": 0, "malformed": 0,
                      "malformed_by_reason": {}, "malformed_examples": []}
        issues = _Issues(self.path, strict, self.stats)
        pa, pc, _ = _pa()
        tables = []
        for _, cols, _, bad in self.reader.batches(self.reader.columns, stats=self.stats):
            for line, reason, kind, value in bad:
                issues.add(None, None, reason, kind, _shorten(value), line=line)
            tables.append(pa.table(cols))
        if not tables:
            raise DataFormatError(f"{self.path}: the side table holds no rows", file=self.path)
        table = pa.concat_tables(tables)
        keys = table.column(join.key).to_pylist()
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k in first:
                self.stats["duplicates"] += 1
            else:
                first[k] = i
        self.stats["rows"] = len(first)
        rows = pa.array(list(first.values()), pa.int64())
        self.table = table.take(rows)
        self.keys = pa.array(list(first.keys()), pa.string())
        stats.setdefault("side_files", {})[self.path.name] = self.stats

    def columns(self) -> list[str]:
        return [c for c in self.reader.columns if c != self.join.key]


def _plan_columns(spec: Spec, main: _Reader, sides: list[_SideTable]) -> dict[str, Any]:
    """Where each column used by the spec comes from: ``None`` (main table) or the side table."""
    owner: dict[str, Any] = {c: None for c in main.columns}
    for side in sides:
        main.require([side.join.on], f"{side.path.name} joins on")
        for c in side.columns():
            if c in owner:
                where = "the main table" if owner[c] is None else owner[c].path.name
                raise SpecError(f"joins: column {c!r} of {side.path.name} is also a column of {where}; rename one "
                                "(columns: [...] with header: false)")
            owner[c] = side
    needed = [spec.label.column] + ([spec.split.column] if spec.split.column else [])
    for f in spec.fields:
        needed += f.columns
    missing = [c for c in dict.fromkeys(needed) if c not in owner]
    if missing:
        raise SpecError(f"{spec.source}: columns {missing} are neither in {main.path.name} (its columns: "
                        f"{main.columns[:40]}) nor in a joined table")
    for f in spec.fields:
        if f.type == "numeric" and f.bucketing == "quantile" and owner[f.column] is not None:
            raise SpecError(f"{spec.source}: field {f.name!r}: quantile buckets need a column of the main table "
                            f"({f.column!r} comes from {owner[f.column].path.name})")
    return owner


def _main_columns(spec: Spec, owner: dict, sides) -> list[str]:
    cols = [spec.label.column] + ([spec.split.column] if spec.split.column else [])
    cols += [s.join.on for s in sides]
    for f in spec.fields:
        cols += [c for c in f.columns if owner[c] is None]
    return list(dict.fromkeys(cols))


def _quantile_boundaries(spec: Spec, main: _Reader, builders: list[_Column], max_rows) -> None:
    qs = [b for b in builders if b.rule.type == "numeric" and b.rule.bucketing == "quantile"]
    if not qs:
        return
    values = {b.rule.column: [] for b in qs}
    counts = dict.fromkeys(values, 0)
    for _, cols, _, _ in main.batches(list(values), max_rows):
        for c in values:
            if counts[c] >= QUANTILE_SAMPLE:
                continue
            arr = np.asarray([_num_or_nan(s) for s in cols[c].to_pylist()], dtype=np.float64)
            arr = arr[np.isfinite(arr)][:QUANTILE_SAMPLE - counts[c]]
            values[c].append(arr)
            counts[c] += arr.size
    for b in qs:
        v = np.concatenate(values[b.rule.column]) if values[b.rule.column] else np.zeros(0)
        if v.size == 0:
            raise DataFormatError(f"{main.path}: column {b.rule.column!r} holds no number to compute the quantile "
                                  f"buckets of field {b.rule.name!r}", file=main.path)
        k = b.rule.buckets
        bounds = np.unique(np.quantile(v, [i / k for i in range(1, k)]))
        b.quantiles = bounds if bounds.size else np.asarray([float(v[0])])


def _num_or_nan(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return math.nan


def _write_tokens(spec: Spec, main: _Reader, sides: list[_SideTable], owner: dict, builders: list[_Column],
                  out, strict: bool, max_rows, stats: dict) -> np.ndarray | None:
    """Pass 0: the kept rows of the input as ``label \\t token ...`` lines into ``out``; returns the time of
    each kept row (``None`` without a time split)."""
    pa, pc, _ = _pa()
    issues = _Issues(main.path, strict, stats)
    times = [] if spec.split.by == "time" else None
    time_memo: dict = {}
    label_memo: dict = {}
    for n, cols, numbers, left_out in main.batches(_main_columns(spec, owner, sides), max_rows, stats):
        stats["rows_read"] += n
        bad: dict[int, tuple] = {}
        for side in sides:  # join: the side table's columns taken at each row's key
            idx = pc.index_in(cols[side.join.on], value_set=side.keys)
            missing = pc.is_null(idx)
            if pc.any(missing).as_py():
                for row in np.flatnonzero(np.asarray(missing.to_numpy(zero_copy_only=False))).tolist():
                    bad.setdefault(row, (side.join.on, cols[side.join.on][row].as_py(),
                                         f"key not found in {side.path.name}"))
            idx = pc.fill_null(idx, 0)
            for c in side.columns():
                cols[c] = pc.fill_null(side.table.column(c).take(idx).combine_chunks(), "")
        labels = _map_unique(cols[spec.label.column], lambda v: str(spec.label(v)), label_memo, bad,
                             spec.label.column, empty=None)
        tokens = []
        for b in builders:
            arrs, fb = b.tokens(cols, n)
            for row, v in fb.items():
                bad.setdefault(row, v)
            tokens += arrs
        if times is not None:
            tcol = _map_unique(cols[spec.split.column], lambda s: repr(_time_value(s)), time_memo, bad,
                               spec.split.column, empty=None)
        keep = np.ones(n, dtype=bool)
        found = [(line, None, reason, kind, value) for line, reason, kind, value in left_out]
        for row, (column, value, reason) in bad.items():
            kind = "missing_key" if reason.startswith("key not found") else (
                "bad_label" if column == spec.label.column else "bad_value")
            found.append((int(numbers[row]), column, reason, kind, value))
            keep[row] = False
        for num, column, reason, kind, value in sorted(found, key=lambda t: t[0]):  # in file order
            issues.add(num if main.numbering == "row" else None, column, reason, kind, _shorten(value),
                       line=num if main.numbering == "line" else None)
        lab = np.asarray(pc.cast(pc.if_else(pc.equal(labels, ""), "-2", labels), pa.int64()))
        filtered = keep & (lab == -1)
        stats["filtered"] += int(filtered.sum())
        keep &= lab >= 0
        if not keep.any():
            continue
        mask = pa.array(keep)
        parts = [pc.filter(pa.array(lab.astype(str)), mask)]
        parts += [pc.replace_substring_regex(pc.filter(t, mask), _SANITIZE.pattern, " ") for t in tokens]
        lines = pc.binary_join_element_wise(*parts, "\t").to_pylist()
        out.write(("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"))
        stats["rows_kept"] += len(lines)
        if times is not None:
            times.append(np.asarray(pc.cast(pc.filter(tcol, mask), pa.float64())))
    for b in builders:
        if b.rule.type == "multi":
            stats["truncated_values"] = stats.get("truncated_values", 0) + b.truncated
    if times is None:
        return None
    return np.concatenate(times) if times else np.zeros(0)


def _new_stats() -> dict:
    return {"rows_read": 0, "rows_kept": 0, "filtered": 0, "blank_lines": 0, "padded_rows": 0, "malformed": 0,
            "malformed_by_reason": {}, "malformed_examples": []}


def _label_fn(s: str) -> int:
    return int(s)


# ------------------------------------------------------------------------------------------ preprocess
@dataclass
class GenericResult(PreprocessResult):
    """What :func:`preprocess_generic` produced or found: a
    :class:`~optembed_ext.data.loaders.PreprocessResult` plus the spec."""

    spec: Spec | None = None


def _input_path(input) -> Path:
    if input is None:
        raise DataUsageError("input is required: the CSV/TSV/Parquet file the spec describes")
    p = Path(input).expanduser()
    if not p.exists():
        raise DataFileNotFoundError(f"input file {p} does not exist")
    if p.is_dir():
        raise DataUsageError(f"input {p} is a folder; pass the data file itself")
    return p


def preprocess_generic(spec, input, cache_dir=None, *, min_count: int | None = None, strict: bool = False,
                       max_rows: int | None = None, progress: bool = False, force: bool = False,
                       chunk_rows: int = 100_000, engine: str = "auto") -> GenericResult:
    """Encode ``input`` (a CSV, TSV or Parquet file) as ``spec`` (a :class:`Spec`, a YAML path, YAML text or a
    mapping) describes; with a ``cache_dir`` the arrays are cached like the built-in formats'.

    ``min_count`` overrides the spec's; ``max_rows`` caps the data rows read; ``strict`` raises
    :class:`MalformedRowError` at the first malformed row. Rows are stored in file order, or sorted by the time
    column (stable) when the spec's split is ``by: time``. ``engine`` encodes the token file of pass 0:
    ``"python"`` (the line-by-line encoder), ``"arrow"`` (the pyarrow encoder of the click logs,
    :mod:`optembed_ext.data._fast`) or ``"auto"`` (arrow for token files of 32 MiB and more when pyarrow is
    installed); both give the same arrays, so the engine is not part of the cache key.
    """
    from .loaders import FORMAT_VERSION, _build_or_load_in, _cache_folder  # the built-in formats' cache flow

    spec = load_spec(spec)
    path = _input_path(input)
    if min_count is None:
        min_count = spec.min_count
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
    if engine not in ENGINES:
        raise DataUsageError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    main = _Reader(path, spec.input, "input file")
    files = [path]
    pre_stats = _new_stats()
    sides = [_SideTable(j, path.parent, strict, pre_stats) for j in spec.joins]
    files += [s.path for s in sides]
    owner = _plan_columns(spec, main, sides)
    raw_spec = _jsonable({k: v for k, v in spec.raw.items() if k not in ("description", "min_count")})
    params = {"dataset": spec.name, "format": "spec", "spec": raw_spec, "min_count": min_count,
              "strict": bool(strict), "max_rows": max_rows, "format_version": FORMAT_VERSION,
              "generic_version": GENERIC_VERSION}

    def encode(out_dir=None):
        with contextlib.ExitStack() as stack:
            work = Path(out_dir) if out_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
            tokens_path = work / "tokens.tsv"
            stats = dict(pre_stats, side_files=dict(pre_stats.get("side_files", {})))
            stats["malformed_by_reason"] = dict(pre_stats["malformed_by_reason"])
            stats["malformed_examples"] = list(pre_stats["malformed_examples"])
            builders = [_Column(f) for f in spec.fields]
            _quantile_boundaries(spec, main, builders, max_rows)
            try:
                with open(tokens_path, "wb") as out:
                    times = _write_tokens(spec, main, sides, owner, builders, out, strict, max_rows, stats)
                if stats["rows_kept"] == 0:
                    raise DataFormatError(_unusable(path, stats), file=path, stats=stats)
                names = spec.field_names
                thresholded = [f.thresholded for f in spec.fields for _ in f.output_names]
                schema = _stream.TableSchema(spec.name, ["label"] + names, 0, _label_fn,
                                             [_stream.FieldSpec(n, i + 1, None, t)
                                              for i, (n, t) in enumerate(zip(names, thresholded))])
                source = _stream.RawSource(tokens_path, "\t", False)
                arrow = engine == "arrow" or (engine == "auto" and tokens_path.stat().st_size >= ARROW_MIN_BYTES)
                if arrow and not _fast.fast_path_available(schema, source):
                    if engine == "arrow":
                        raise DataUsageError("engine='arrow' needs the pyarrow package; install it or pass "
                                             "engine='python'")
                    arrow = False
                if arrow:
                    table = _fast.encode_table_fast(schema, source, min_count=min_count, strict=True,
                                                    progress=progress, out_dir=out_dir)
                else:
                    table = _stream.encode_table(schema, source, min_count=min_count, strict=True,
                                                 chunk_rows=chunk_rows, progress=progress, out_dir=out_dir)
            finally:
                tokens_path.unlink(missing_ok=True)
            if times is not None:
                _sort_rows(table, times, out_dir)
            if out_dir is None:
                table.X, table.y = np.array(table.X), np.array(table.y)
            encoded = table.stats
            for k in ("lines", "header_lines", "chunks", "chunk_rows"):
                encoded.pop(k, None)
            for k in ("rows_read", "rows_kept", "filtered", "blank_lines", "padded_rows", "malformed",
                      "malformed_by_reason", "malformed_examples"):
                encoded[k] = stats[k]
            encoded["input_format"] = main.format
            for k in ("side_files", "truncated_values"):
                if k in stats:
                    encoded[k] = stats[k]
            if stats.get("side_files"):
                encoded["side_malformed"] = sum(s["malformed"] for s in stats["side_files"].values())
                encoded["side_duplicates"] = sum(s["duplicates"] for s in stats["side_files"].values())
            encoded["quantile_boundaries"] = {b.rule.name: b.quantiles.tolist() for b in builders
                                              if b.quantiles is not None}
            if stats["malformed"]:
                import warnings

                warnings.warn(f"{path}: skipped {stats['malformed']} malformed rows of {stats['rows_read']} "
                              f"({stats['malformed_by_reason']}); first: {stats['malformed_examples'][0]}",
                              stacklevel=4)
            return table

    if cache_dir is None:
        table = encode()
        return GenericResult(spec.name, None, table.feature_map, table.X, table.y, table.stats, False, params, spec)
    final, fingerprints, created_dir = _cache_folder(spec.name, cache_dir, files, params)
    res = _build_or_load_in(spec.name, final, params, force, encode, fingerprints, created_dir)
    return GenericResult(spec.name, res.cache_path, res.feature_map, res.X, res.y, res.stats, res.from_cache,
                         params, spec)


def _unusable(path: Path, stats: dict) -> str:
    msg = (f"{path}: no usable rows ({stats['rows_read']} rows read: {stats['malformed']} malformed, "
           f"{stats['filtered']} filtered by the label rule, 0 usable)")
    if stats["malformed_examples"]:
        ex = stats["malformed_examples"][0]
        where = f"row {ex['row']}" if ex.get("row") is not None else f"line {ex.get('line')}"
        col = f", column {ex['column_name']!r}" if ex.get("column_name") else ""
        msg += f"; first: {where}{col}: {ex['reason']}"
    return msg + "; nothing was cached"


def _sort_rows(table, times: np.ndarray, out_dir) -> None:
    """Reorder the encoded rows by time (stable), in blocks (the arrays may be memory-mapped files)."""
    if times.shape[0] != table.X.shape[0]:  # pragma: no cover - pass 0 writes exactly the kept rows
        raise AssertionError(f"{times.shape[0]} times for {table.X.shape[0]} rows")
    order = np.argsort(times, kind="stable")
    if np.array_equal(order, np.arange(order.size)):
        return
    if out_dir is None:
        table.X, table.y = np.asarray(table.X)[order], np.asarray(table.y)[order]
        return
    out_dir = Path(out_dir)
    for name in ("X", "y"):
        src = getattr(table, name)
        dst = np.lib.format.open_memmap(out_dir / f"{name}.sorted.npy", mode="w+", dtype=src.dtype, shape=src.shape)
        step = 1 << 18
        for a in range(0, order.size, step):
            dst[a:a + step] = src[order[a:a + step]]
        dst.flush()
        del dst
        setattr(table, name, None)
        del src
        shutil.move(str(out_dir / f"{name}.sorted.npy"), str(out_dir / f"{name}.npy"))
        setattr(table, name, np.load(out_dir / f"{name}.npy", mmap_mode="r+"))


def load_generic(spec, input, *, cache_dir=None, min_count: int | None = None, strict: bool = False,
                 max_rows: int | None = None, progress: bool = False, force: bool = False, split: str | None = None,
                 seed: int | None = None, ratios: Sequence[float] | None = None, engine: str = "auto",
                 lazy: bool | None = None) -> CTRDataset:
    """:func:`preprocess_generic`, then the train/val/test splits of the spec (``split``/``seed``/``ratios``
    override it: ``"random"``, or ``"sequential"`` -- the stored order: by time for a time split, else the file's).
    ``lazy``: as :func:`~optembed_ext.data.batching.make_splits` (views of the cached arrays instead of copies).
    """
    res = preprocess_generic(spec, input, cache_dir, min_count=min_count, strict=strict, max_rows=max_rows,
                             progress=progress, force=force, engine=engine)
    sp = res.spec.split
    how = split if split is not None else ("random" if sp.by == "random" else "sequential")
    if how not in ("random", "sequential"):
        raise ValueError(f"split must be 'random' or 'sequential', got {how!r}")
    seed = sp.seed if seed is None else seed
    ratios = sp.ratios if ratios is None else tuple(ratios)
    train, val, test = make_splits(res.X, res.y, split=how, seed=seed, ratios=ratios, lazy=lazy)
    info = {"dataset": res.dataset, "cache_path": None if res.cache_path is None else str(res.cache_path),
            "from_cache": res.from_cache, "num_rows": res.num_rows, "stats": res.stats,
            "min_count": res.params["min_count"], "spec": res.spec.source,
            "split": how if not (how == "sequential" and sp.by == "time") else "time", "seed": seed,
            "ratios": tuple(ratios)}
    return CTRDataset(res.feature_map, train, val, test, info)
