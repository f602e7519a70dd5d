"""Raw formats of the public CTR datasets: column layouts, label rules and derived fields.

Each ``plan_<dataset>(path, **options)`` resolves the raw file(s) under ``path`` and returns a
:class:`Plan` (schema + source + every file read, for the cache key). Field lists:

* **criteo** (39 fields): ``I1..I13`` (integer counts: a value ``x > 2`` becomes the bucket token
  ``b<floor(log(x)^2)>``, any other value -- 0, 1, 2, negatives -- its own token, e.g. ``"-1"``;
  never thresholded), ``C1..C26`` (hashed categories, thresholded by ``min_count``). Empty values
  are the field's empty token. Accepts the Kaggle/dac ``train.txt`` (tab separated, no header) and
  CSV/TSV variants with a ``label,I1,..,C26`` header (sniffed from the first line). Rows with
  14..39 columns are padded with empty values (trailing empty columns stripped by text tools) and
  counted in ``stats["padded_rows"]``; with ``strict=True`` they are malformed (a truncated line
  cannot be told from a stripped one). Compression (gzip, bz2, xz) is detected from the content.
* **avazu** (23 fields): ``hour_of_day`` (``"00".."23"``) and ``weekday`` (``"0"`` = Monday ..
  ``"6"``) derived from ``hour`` (``YYMMDDHH``, never thresholded), then ``C1, banner_pos,
  site_id, site_domain, site_category, app_id, app_domain, app_category, device_id, device_ip,
  device_model, device_type, device_conn_type, C14..C21`` (thresholded). ``id`` is dropped;
  label = ``click``. With ``is_weekend=True`` a third derived field ``is_weekend`` (``"1"`` on
  Saturday and Sunday) follows ``weekday``: the 24 fields of the OptEmbed paper (the 22 columns
  besides ``id`` and ``click``, ``hour`` split in three). Keeping ``hour`` as one raw field
  instead would give 22 fields.
* **kdd12** (11 fields): KDD Cup 2012 track 2 ``training.txt`` (tab separated ``Click, Impression,
  DisplayURL, AdID, AdvertiserID, Depth, Position, QueryID, KeywordID, TitleID, DescriptionID,
  UserID``). Label = ``Click > 0``, one sample per line (impressions are *not* expanded into
  ``Impression`` samples, the usual CTR-benchmark practice). Fields: ``Impression`` (log-bucketed
  like the Criteo integers, not thresholded; drop it with ``include_impression=False`` for the
  10-field variant) and the 10 id columns (thresholded).
* **movielens1m / movielens100k** (8 fields): ``user_id, movie_id, gender, age, occupation, zip,
  year, genres``. Ratings 4-5 -> 1, 1-2 -> 0, 3 dropped (``stats["filtered"]``). ``year`` is the
  ``(YYYY)`` at the end of the title (MovieLens 100K falls back to the release date); ``genres``
  is one field whose token is the full genre combination string (``"Comedy|Drama"``; for 100K the
  flagged genres joined by ``|`` in ``u.genre`` order), so multi-genre movies keep their
  combination. ``age`` is the raw value (100K: years; 1M: the age-group code), ``occupation`` the
  raw value (100K: name; 1M: code). All fields thresholded. Also reads the joined CSV
  ``user_id,movie_id,rating,timestamp,title,genres,gender,age,occupation,zip`` when ``path`` is
  a file. Rows keep the file order (``split="sequential"`` splits by position, not by time).
  Side files (``u.user``, ``u.item``, ``u.genre``, ``users.dat``, ``movies.dat``): a line with the
  wrong number of columns or repeating an id is malformed (the first line of an id wins), counted
  in ``stats["side_malformed"]`` with its line in ``stats["side_malformed_examples"]``, or raised
  with ``strict=True``; a missing side file raises ``DataFileNotFoundError``, one without a usable
  line ``DataFormatError``.
"""
from __future__ import annotations

import datetime
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._stream import (_DECOMPRESS_ERRORS, FieldSpec, RawSource, TableSchema, _decompress_failed, cr_only_hint,
                      open_raw, read_first_line)
from .errors import DataFileNotFoundError, DataFormatError, DataUsageError

__all__ = ["Plan", "PLANNERS", "PRESETS", "resolve_preset", "criteo_int_token"]


@dataclass
class Plan:
    """``files``: every file read (main file first), for the cache fingerprint. ``side_issues``: the
    malformed lines of side files (MovieLens ``u.user``/``u.item``/``users.dat``...), each a dict with
    ``file``, ``line``, ``column``, ``column_name``, ``reason``, ``value``, ``kind``; ``side_stats``:
    per side file ``{"lines", "rows", "blank_lines", "malformed"}``."""

    schema: TableSchema
    source: RawSource
    files: list[Path]
    options: dict[str, Any] = field(default_factory=dict)
    side_issues: list[dict[str, Any]] = field(default_factory=list)
    side_stats: dict[str, dict[str, int]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# shared helpers


def _first_line(path: Path, encoding: str = "utf-8") -> str:
    return read_first_line(path, encoding)


def _first_nonblank_line(path: Path, limit: int = 100) -> str:
    """The first non-blank line among the first ``limit`` lines (for sniffing a separator), or ``""``."""
    with open_raw(path) as (_, f, kind):
        try:
            for _, b in zip(range(limit), f):
                if b.strip():
                    return b.decode("utf-8", errors="surrogateescape")
        except _DECOMPRESS_ERRORS as e:
            if kind is None:
                raise
            raise _decompress_failed(path, kind, e) from None
    return ""


def _resolve(path, candidates: tuple[str, ...], what: str) -> Path:
    if path is None:
        raise DataUsageError(f"data_dir is required to load {what}: pass the folder holding the raw files "
                             "(or the file itself)")
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for c in candidates:
            if (p / c).is_file():
                return p / c
        raise DataFileNotFoundError(f"data_dir {p} holds none of {list(candidates)} ({what}); pass the folder "
                                    "holding the raw file or the file itself")
    raise DataFileNotFoundError(f"data_dir {p} does not exist ({what}); check the path")


def _no_options(what: str, options: dict) -> None:
    if options:
        raise TypeError(f"unexpected options for {what}: {sorted(options)}")


def _binary_label(s: str) -> int:
    if s == "0":
        return 0
    if s == "1":
        return 1
    try:
        v = float(s)
    except ValueError:
        v = None
    if v == 0.0:
        return 0
    if v == 1.0:
        return 1
    raise ValueError("label must be 0 or 1")


def finite_float(s: str) -> float:
    """``float(s)``; ``ValueError`` ("not a number" / "not a finite number") for anything else, NaN and infinities."""
    try:
        x = float(s)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(x):
        raise ValueError("not a finite number")
    return x


def criteo_int_token(s: str) -> str:
    """Token of one Criteo integer value: ``b<floor(log(x)^2)>`` for ``x > 2``, else the value itself."""
    x = finite_float(s)
    if x > 2:
        return f"b{int(math.floor(math.log(x) ** 2))}"
    if x == int(x):
        return str(int(x))
    return repr(x)


def _columns_by_name(header: list[str], wanted: list[str], path: Path) -> dict[str, int]:
    lower = {h.strip().lower(): i for i, h in enumerate(header)}
    missing = [w for w in wanted if w.lower() not in lower]
    if missing:
        raise DataFormatError(f"{path}: header lacks columns {missing} (header: {header[:60]}); the first line "
                              "must name the columns", file=path)
    return {w: lower[w.lower()] for w in wanted}


# ---------------------------------------------------------------------------------------------
# Criteo

CRITEO_INT = [f"I{i}" for i in range(1, 14)]
CRITEO_CAT = [f"C{i}" for i in range(1, 27)]


def plan_criteo(path, **options) -> Plan:
    _no_options("criteo", options)
    p = _resolve(path, ("train.txt", "dac/train.txt", "train.txt.gz", "train.csv"), "criteo")
    first = _first_line(p)
    delim = "\t" if "\t" in (first if first.strip() else _first_nonblank_line(p)) else ","
    parts = first.split(delim)
    has_header = parts[0].strip().lower() == "label"
    names = ["label"] + CRITEO_INT + CRITEO_CAT
    if has_header:
        idx = _columns_by_name(parts, names, p)
        column_names = [h.strip() for h in parts]
    else:
        idx = {n: i for i, n in enumerate(names)}
        column_names = names
    fields = [FieldSpec(n, idx[n], criteo_int_token, thresholded=False) for n in CRITEO_INT]
    fields += [FieldSpec(n, idx[n]) for n in CRITEO_CAT]
    schema = TableSchema("criteo", column_names, idx["label"], _binary_label, fields,
                         min_columns=min(len(column_names), 14))
    return Plan(schema, RawSource(p, delim, has_header), [p], {})


# ---------------------------------------------------------------------------------------------
# Avazu

AVAZU_COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
                 "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
                 "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
AVAZU_CAT = AVAZU_COLUMNS[3:]


def _avazu_date(s: str) -> datetime.date:
    if len(s) != 8 or not s.isdigit():
        raise ValueError("hour must be YYMMDDHH")
    if int(s[6:8]) > 23:
        raise ValueError("hour of day must be 00..23")
    try:
        return datetime.date(2000 + int(s[0:2]), int(s[2:4]), int(s[4:6]))
    except ValueError:
        raise ValueError("hour holds an invalid date") from None


def avazu_hour_of_day(s: str) -> str:
    _avazu_date(s)
    return s[6:8]


def avazu_weekday(s: str) -> str:
    return str(_avazu_date(s).weekday())


def avazu_is_weekend(s: str) -> str:
    return "1" if _avazu_date(s).weekday() >= 5 else "0"


def plan_avazu(path, *, is_weekend: bool = False, **options) -> Plan:
    _no_options("avazu", options)
    p = _resolve(path, ("train", "train.csv", "train.gz", "train.csv.gz"), "avazu")
    parts = _first_line(p).split(",")
    has_header = parts[0].strip().lower() == "id" or "click" in [x.strip().lower() for x in parts]
    if has_header:
        idx = _columns_by_name(parts, AVAZU_COLUMNS, p)
        column_names = [h.strip() for h in parts]
    else:
        idx = {n: i for i, n in enumerate(AVAZU_COLUMNS)}
        column_names = list(AVAZU_COLUMNS)
    fields = [FieldSpec("hour_of_day", idx["hour"], avazu_hour_of_day, thresholded=False),
              FieldSpec("weekday", idx["hour"], avazu_weekday, thresholded=False)]
    if is_weekend:
        fields.append(FieldSpec("is_weekend", idx["hour"], avazu_is_weekend, thresholded=False))
    fields += [FieldSpec(n, idx[n]) for n in AVAZU_CAT]
    schema = TableSchema("avazu", column_names, idx["click"], _binary_label, fields)
    # the option enters the cache key only when set, so caches of the default layout keep their folder
    return Plan(schema, RawSource(p, ",", has_header), [p], {"is_weekend": True} if is_weekend else {})


# ---------------------------------------------------------------------------------------------
# KDD Cup 2012 track 2

KDD12_COLUMNS = ["Click", "Impression", "DisplayURL", "AdID", "AdvertiserID", "Depth", "Position", "QueryID",
                 "KeywordID", "TitleID", "DescriptionID", "UserID"]


def _kdd12_label(s: str) -> int:
    if not s.isdigit():
        raise ValueError("Click must be a non-negative integer")
    return 1 if int(s) > 0 else 0


def _kdd12_impression(s: str) -> str:
    if not s.isdigit() or int(s) < 1:
        raise ValueError("Impression must be a positive integer")
    return criteo_int_token(s)


def plan_kdd12(path, *, include_impression: bool = True, **options) -> Plan:
    _no_options("kdd12", options)
    p = _resolve(path, ("training.txt", "track2/training.txt", "training.txt.gz"), "kdd12")
    parts = _first_line(p).split("\t")
    has_header = parts[0].strip().lower() == "click"
    if has_header:
        idx = _columns_by_name(parts, KDD12_COLUMNS, p)
        column_names = [h.strip() for h in parts]
    else:
        idx = {n: i for i, n in enumerate(KDD12_COLUMNS)}
        column_names = list(KDD12_COLUMNS)
    fields = []
    if include_impression:
        fields.append(FieldSpec("Impression", idx["Impression"], _kdd12_impression, thresholded=False))
    fields += [FieldSpec(n, idx[n]) for n in KDD12_COLUMNS[2:]]
    schema = TableSchema("kdd12", column_names, idx["Click"], _kdd12_label, fields)
    return Plan(schema, RawSource(p, "\t", has_header), [p], {"include_impression": bool(include_impression)})


# ---------------------------------------------------------------------------------------------
# MovieLens

MOVIELENS_FIELDS = ["user_id", "movie_id", "gender", "age", "occupation", "zip", "year", "genres"]
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]
_YEAR_RE = re.compile(r"\((\d{4})\)\s*$")


def _rating_label(s: str) -> int:
    s = s.strip()
    if s in ("4", "5"):
        return 1
    if s in ("1", "2"):
        return 0
    if s == "3":
        return -1
    try:
        v = float(s)
    except ValueError:
        raise ValueError("rating must be a number 1..5") from None
    if v in (4.0, 5.0):
        return 1
    if v in (1.0, 2.0):
        return 0
    if v == 3.0:
        return -1
    raise ValueError("rating must be 1..5")


def movielens_year(title: str, release_date: str = "") -> str:
    m = _YEAR_RE.search(title)
    if m:
        return m.group(1)
    tail = release_date.strip()[-4:]
    return tail if len(tail) == 4 and tail.isdigit() else ""


class _SideFiles:
    """Reads the small side tables of a dataset (MovieLens users and movies) line by line.

    A line with the wrong number of columns, or repeating an id already listed, is malformed: it is
    skipped (the first line of an id wins) and recorded in ``issues`` with its line number, so
    ``preprocess`` can count it, or raise under ``strict``. A missing file raises
    :class:`DataFileNotFoundError`, a file without a usable line :class:`DataFormatError`.
    """

    def __init__(self, dataset: str, main: Path):
        self.dataset, self.main = dataset, main
        self.issues: list[dict[str, Any]] = []
        self.stats: dict[str, dict[str, int]] = {}

    def read(self, path: Path, sep: str, ncols: int, layout: str, encoding: str = "latin-1") -> dict[str, list[str]]:
        if not path.is_file():
            raise DataFileNotFoundError(
                f"{path} is missing: {self.dataset} reads {path.name} ({layout}) from the folder of "
                f"{self.main.name}; unpack the complete {self.dataset} archive there")
        out: dict[str, list[str]] = {}
        first: dict[str, int] = {}
        st = {"lines": 0, "rows": 0, "blank_lines": 0, "malformed": 0}

        def issue(i, column, reason, kind, value=None):
            st["malformed"] += 1
            self.issues.append({"file": str(path), "line": i, "column": column,
                                "column_name": None if column is None else "id", "reason": reason,
                                "value": value, "kind": kind})

        with open_raw(path) as (_, f, kind):
            try:
                for i, b in enumerate(f, 1):
                    st["lines"] = i
                    line = b.decode(encoding, errors="surrogateescape")
                    if line.endswith("\n"):
                        line = line[:-1]
                    if line.endswith("\r"):
                        line = line[:-1]
                    if not line:
                        st["blank_lines"] += 1
                        continue
                    parts = line.split(sep)
                    if len(parts) != ncols:
                        issue(i, None, f"expected {ncols} '{sep}'-separated columns, got {len(parts)}",
                              "wrong_column_count")
                        continue
                    k = parts[0]
                    if k in out:
                        issue(i, 1, f"duplicate id {k!r} (first listed on line {first[k]}, which is kept)",
                              "duplicate_id", k)
                        continue
                    out[k] = parts
                    first[k] = i
            except _DECOMPRESS_ERRORS as e:
                if kind is None:
                    raise
                raise _decompress_failed(path, kind, e) from None
        st["rows"] = len(out)
        self.stats[path.name] = st
        if not out:
            what = "the file is empty" if st["lines"] == 0 else (
                f"{st['lines']} lines read: {st['malformed']} malformed, {st['blank_lines']} blank, 0 usable")
            first_issue = next((x for x in self.issues if x["file"] == str(path)), None)
            if first_issue is not None:
                what += f"; first: line {first_issue['line']}: {first_issue['reason']}"
            raise DataFormatError(f"{path}: no usable rows ({what}); each line must be {layout}"
                                  f"{cr_only_hint(path)}", file=path)
        return out

    def plan(self, schema: TableSchema, source: RawSource, files: list[Path], options: dict) -> "Plan":
        return Plan(schema, source, files, options, side_issues=self.issues, side_stats=self.stats)


class _Lookup:
    """Transform: id -> one attribute of the joined user/movie table (unknown id = malformed row)."""

    def __init__(self, table: dict[str, tuple], k: int, what: str):
        self.table, self.k, self.what = table, k, what

    def __call__(self, s: str) -> str:
        row = self.table.get(s)
        if row is None:
            raise ValueError(f"{self.what} id not found")
        return row[self.k]


def _movielens_fields(users, movies, users_file, movies_file) -> list[FieldSpec]:
    u = f"user (not in {users_file})"
    m = f"movie (not in {movies_file})"
    return [
        FieldSpec("user_id", 0), FieldSpec("movie_id", 1),
        FieldSpec("gender", 0, _Lookup(users, 0, u)), FieldSpec("age", 0, _Lookup(users, 1, u)),
        FieldSpec("occupation", 0, _Lookup(users, 2, u)), FieldSpec("zip", 0, _Lookup(users, 3, u)),
        FieldSpec("year", 1, _Lookup(movies, 0, m)), FieldSpec("genres", 1, _Lookup(movies, 1, m)),
    ]


def _plan_movielens_joined(p: Path, dataset: str) -> Plan:
    header = [h.strip().lower() for h in _first_line(p).split(",")]
    wanted = ["user_id", "movie_id", "rating", "title", "genres", "gender", "age", "occupation", "zip"]
    idx = _columns_by_name(header, wanted, p)
    fields = [FieldSpec(n, idx[n]) for n in ("user_id", "movie_id", "gender", "age", "occupation", "zip")]
    fields += [FieldSpec("year", idx["title"], movielens_year), FieldSpec("genres", idx["genres"])]
    schema = TableSchema(dataset, header, idx["rating"], _rating_label, fields)
    return Plan(schema, RawSource(p, ",", True, encoding="utf-8"), [p], {"format": "joined-csv"})


def plan_movielens1m(path, **options) -> Plan:
    _no_options("movielens1m", options)
    if path is not None and Path(path).expanduser().is_file():
        return _plan_movielens_joined(Path(path).expanduser(), "movielens1m")
    ratings = _resolve(path, ("ratings.dat", "ml-1m/ratings.dat"), "movielens1m")
    users_file, movies_file = ratings.parent / "users.dat", ratings.parent / "movies.dat"
    side = _SideFiles("movielens1m", ratings)
    # users.dat: UserID::Gender::Age::Occupation::Zip-code ; movies.dat: MovieID::Title::Genres
    users = {k: (v[1], v[2], v[3], v[4]) for k, v in
             side.read(users_file, "::", 5, "UserID::Gender::Age::Occupation::Zip-code").items()}
    movies = {k: (movielens_year(v[1]), v[2]) for k, v in
              side.read(movies_file, "::", 3, "MovieID::Title::Genres").items()}
    schema = TableSchema("movielens1m", ["UserID", "MovieID", "Rating", "Timestamp"], 2, _rating_label,
                         _movielens_fields(users, movies, users_file.name, movies_file.name))
    return side.plan(schema, RawSource(ratings, "::", False, encoding="latin-1"), [ratings, users_file, movies_file],
                     {"format": "dat"})


def plan_movielens100k(path, **options) -> Plan:
    _no_options("movielens100k", options)
    if path is not None and Path(path).expanduser().is_file() and Path(path).name != "u.data":
        return _plan_movielens_joined(Path(path).expanduser(), "movielens100k")
    data = _resolve(path, ("u.data", "ml-100k/u.data"), "movielens100k")
    users_file, items_file, genre_file = data.parent / "u.user", data.parent / "u.item", data.parent / "u.genre"
    genres = list(ML100K_GENRES)
    files = [data, users_file, items_file]
    side = _SideFiles("movielens100k", data)
    if genre_file.is_file():
        files.append(genre_file)
        table = side.read(genre_file, "|", 2, "genre|index")
        try:
            genres = [name for name, _ in sorted(((v[0], int(v[1])) for v in table.values()), key=lambda t: t[1])]
        except ValueError:
            raise DataFormatError(f"{genre_file}: a genre index is not an integer; each line must be genre|index",
                                  file=genre_file) from None
    # u.user: id|age|gender|occupation|zip ; u.item: id|title|release|video release|url|19 genre flags
    users = {k: (v[2], v[1], v[3], v[4]) for k, v in
             side.read(users_file, "|", 5, "id|age|gender|occupation|zip").items()}
    movies = {}
    item_layout = f"id|title|release date|video release date|url|{len(genres)} genre flags"
    for k, v in side.read(items_file, "|", 5 + len(genres), item_layout).items():
        combo = "|".join(g for g, flag in zip(genres, v[5:]) if flag.strip() == "1")
        movies[k] = (movielens_year(v[1], v[2]), combo)
    schema = TableSchema("movielens100k", ["user", "item", "rating", "timestamp"], 2, _rating_label,
                         _movielens_fields(users, movies, users_file.name, items_file.name))
    return side.plan(schema, RawSource(data, "\t", False, encoding="latin-1"), files, {"format": "u.data"})


PLANNERS = {
    "criteo": plan_criteo,
    "avazu": plan_avazu,
    "kdd12": plan_kdd12,
    "movielens1m": plan_movielens1m,
    "movielens100k": plan_movielens100k,
}


# ---------------------------------------------------------------------------------------------
# presets: named preprocessing rules (min_count + format options) per dataset

#: ``PRESETS[dataset][preset] = {"min_count": ..., "options": {...}}``. ``default`` is this package's
#: long-standing behaviour (values seen fewer than 10 times are OOV for the click logs); ``paper`` the
#: rules of the OptEmbed paper (Lyu et al., CIKM 2022, Table 1): values seen fewer than 2 times are
#: OOV, Criteo 39 fields (about 6.8e6 feature values on the full Kaggle file), Avazu 24 fields (``hour``
#: split into hour of day, weekday and is_weekend; about 4.4e6), KDD12 11 fields (about 6.0e6).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "criteo": {"default": {"min_count": 10, "options": {}},
               "paper": {"min_count": 2, "options": {}}},
    "avazu": {"default": {"min_count": 10, "options": {}},
              "paper": {"min_count": 2, "options": {"is_weekend": True}}},
    "kdd12": {"default": {"min_count": 10, "options": {}},
              "paper": {"min_count": 2, "options": {"include_impression": True}}},
    "movielens1m": {"default": {"min_count": 2, "options": {}}},
    "movielens100k": {"default": {"min_count": 2, "options": {}}},
}


def resolve_preset(dataset: str, preset: str | None) -> dict[str, Any]:
    """``{"min_count", "options"}`` of ``preset`` (``None`` = ``"default"``) for ``dataset``; an unknown
    preset is a :class:`DataUsageError` naming the ones there are."""
    table = PRESETS[dataset]
    name = "default" if preset is None else preset
    if not isinstance(name, str) or name.strip().lower() not in table:
        raise DataUsageError(f"unknown preprocessing preset {preset!r} for {dataset}; expected one of {list(table)}")
    chosen = table[name.strip().lower()]
    return {"min_count": chosen["min_count"], "options": dict(chosen["options"])}
