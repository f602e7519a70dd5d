"""Fuzz tests of the raw-data loaders (hypothesis, bounded: well under a minute in all).

Random bytes, and random edits of the samples (byte flips, inserted quotes / tabs / commas / line ends / NULs,
deleted ranges, truncation), must never make ``preprocess`` fail with anything but our own
:class:`~optembed_ext.data.DataError` types, and every physical line must be accounted for.

Physical lines (the definition the loaders use): a line ends at ``\\n``; a non-empty last line without one counts
too; ``\\r\\n`` is one line end and a lone ``\\r`` ends nothing. For a successful run, and for a
``DataFormatError`` raised after the counting pass (``err.stats``)::

    stats["lines"] == physical lines of the file == stats["header_lines"] + stats["rows_read"]
    stats["rows_read"] == rows_kept + filtered + malformed + blank_lines

``header_lines`` is 1 for a format with a header line (Criteo/Avazu CSV with a header, the joined MovieLens
CSV) in a non-empty file, else 0. MovieLens side files (``u.user``...) are counted the same way in
``stats["side_files"][name]``: ``lines == rows + blank_lines + malformed``.

The samples are the shipped ones under ``shared/data`` when present, else small files generated here.
"""
import functools
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import _SHARED_DATA
from optembed_ext.data import DataError, DataFormatError, MalformedRowError, list_caches, preprocess
from optembed_ext.data._stream import detect_compression
from test_data import AVAZU_COLUMNS, CRITEO_NAMES, criteo_rows

# OPTEMBED_FUZZ_EXAMPLES=2000 for a longer, randomised local run; the default is bounded and reproducible.
_EXAMPLES = int(os.environ.get("OPTEMBED_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=_EXAMPLES, deadline=None, derandomize="OPTEMBED_FUZZ_EXAMPLES" not in os.environ,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ML_HEADER = "user_id,movie_id,rating,timestamp,title,genres,gender,age,occupation,zip"


def _shared(rel: str, max_lines: int | None = None) -> bytes | None:
    p = _SHARED_DATA / rel
    if not p.is_file():
        return None
    data = p.read_bytes()
    if max_lines is not None:
        data = b"".join(data.splitlines(keepends=True)[:max_lines])
    return data


@functools.lru_cache(maxsize=None)
def sample(kind: str) -> bytes:
    """The base file of each fuzzed format (a shipped sample when present, else generated)."""
    if kind == "criteo_csv":
        data = _shared("samples/criteo_sample.txt", 81)
        rows = criteo_rows(80, seed=1)
        return data or (",".join(CRITEO_NAMES) + "\n" + "".join(",".join(r) + "\n" for r in rows)).encode()
    if kind == "criteo_tsv":
        data = _shared("samples/criteo_train_head.txt", 80)
        return data or "".join("\t".join(r).rstrip("\t") + "\n" for r in criteo_rows(80, seed=2)).encode()
    if kind == "avazu":
        data = _shared("samples/avazu_sample.txt", 81)
        if data:
            return data
        rows = [[str(10**18 + i), str(i % 2), "1410210" + str(i % 10)] + [f"v{j}_{i % (j + 2)}" for j in range(21)]
                for i in range(80)]
        return (",".join(AVAZU_COLUMNS) + "\n" + "".join(",".join(r) + "\n" for r in rows)).encode()
    if kind == "movielens":
        data = _shared("samples/movielens_sample.txt", 81)
        if data:
            return data
        lines = [ML_HEADER] + [f'{i % 7},{i % 5},{1 + i % 5},{97800000 + i},"Movie, The ({1990 + i % 9})",'
                               f'Drama|Comedy,{"MF"[i % 2]},{18 + i % 30},{i % 20},{10000 + i}' for i in range(80)]
        return ("\n".join(lines) + "\n").encode()
    if kind == "kdd12":
        return "".join(f"{i % 3 // 2}\t{1 + i % 4}\t{i % 9}\t{i % 11}\t{i % 5}\t{1 + i % 3}\t{1 + i % 2}\t{i % 13}\t"
                       f"{i % 17}\t{i % 19}\t{i % 23}\t{i % 29}\n" for i in range(80)).encode()
    raise KeyError(kind)


FORMATS = {"criteo_csv": ("criteo", "train.csv"), "criteo_tsv": ("criteo", "train.txt"),
           "avazu": ("avazu", "train.csv"), "movielens": ("movielens1m", "ratings.csv"),
           "kdd12": ("kdd12", "training.txt")}

INSERTS = [b'"', b'""', b"\t", b",", b"\n", b"\r", b"\r\n", b"\x00", b"\xff", b"::", b"|", b" ", b"\n\n", b'",']
EDIT = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 30), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 30), st.sampled_from(INSERTS)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 30), st.integers(1, 60)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 30), st.just(0)),
)


def apply_edits(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for op, pos, arg in edits:
        i = pos % (len(b) + 1)
        if op == "flip" and b:
            i = pos % len(b)
            b[i] ^= arg
        elif op == "insert":
            b[i:i] = arg
        elif op == "delete":
            del b[i:i + arg]
        elif op == "truncate":
            del b[i:]
    return bytes(b)


def physical_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def check_accounting(stats, data: bytes | None):
    assert stats["rows_read"] == stats["rows_kept"] + stats["filtered"] + stats["malformed"] + stats["blank_lines"]
    assert stats["lines"] == stats["header_lines"] + stats["rows_read"]
    assert stats["header_lines"] in (0, 1)
    if data is not None:
        assert stats["lines"] == physical_lines(data)


def check_result(res, data: bytes | None):
    check_accounting(res.stats, data)
    fm = res.feature_map
    X = np.asarray(res.X, dtype=np.int64)
    assert X.shape == (res.stats["rows_kept"], fm.num_fields)
    lo = np.asarray(fm.offsets)
    assert ((X >= lo) & (X < lo + np.asarray(fm.cardinalities))).all()
    assert set(np.unique(res.y).tolist()) <= {0.0, 1.0}
    assert res.stats["padded_rows"] <= res.stats["rows_kept"] + res.stats["filtered"]


def run_loader(dataset: str, path: Path, data: bytes, *, strict=False, chunk_rows=100_000, cache=None):
    """Preprocess ``path``; check the accounting of a success or of our own error. Returns the result or None."""
    main = path / "u.data" if path.is_dir() else path
    plain = detect_compression(main) is None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = preprocess(dataset, path, cache, min_count=1, strict=strict, chunk_rows=chunk_rows,
                             progress=False)
    except MalformedRowError as e:
        assert strict and e.line is not None and e.line >= 1
        return None
    except DataFormatError as e:
        assert str(path.name) in str(e)
        if e.stats is not None:
            check_accounting(e.stats, data if plain else None)
        return None
    except DataError:
        return None
    check_result(res, data if plain else None)
    return res


@pytest.mark.parametrize("kind", list(FORMATS))
@FUZZ
@given(edits=st.lists(EDIT, min_size=1, max_size=6), chunk_rows=st.sampled_from([1, 7, 100_000]),
       strict=st.booleans())
def test_edited_samples_are_read_or_rejected_cleanly(kind, edits, chunk_rows, strict):
    dataset, name = FORMATS[kind]
    data = apply_edits(sample(kind), edits)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        run_loader(dataset, path, data, strict=strict, chunk_rows=chunk_rows)


@pytest.mark.parametrize("kind", list(FORMATS))
@FUZZ
@given(data=st.one_of(st.binary(max_size=3000),
                      st.lists(st.sampled_from([b"0", b"1", b",", b"\t", b"\n", b"\r", b'"', b"a", b"::", b"|",
                                                b"\x1f\x8b", b"BZh9", b"4", b"14102100"]),
                               max_size=300).map(b"".join)))
def test_random_bytes_are_read_or_rejected_cleanly(kind, data):
    dataset, name = FORMATS[kind]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        run_loader(dataset, path, data)


@FUZZ
@given(edits=st.lists(EDIT, min_size=1, max_size=4))
def test_edited_samples_through_the_cache(edits):
    data = apply_edits(sample("criteo_csv"), edits)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.csv"
        path.write_bytes(data)
        cache = Path(d) / "cache"
        first = run_loader("criteo", path, data, cache=cache)
        if first is None:
            assert not cache.exists() or [e.status for e in list_caches(cache)] == []
            return
        again = run_loader("criteo", path, data, cache=cache)
        assert again.from_cache and again.cache_path == first.cache_path
        np.testing.assert_array_equal(again.X, first.X)
        assert [e.status for e in list_caches(cache)] == ["valid"]


def _ml100k_base(folder: Path):
    src = _SHARED_DATA / "ml-100k"
    users = (src / "u.user").read_bytes() if (src / "u.user").is_file() else \
        b"".join(b"%d|%d|%s|other|%05d\n" % (i, 20 + i, b"MF"[i % 2:i % 2 + 1], i) for i in range(1, 30))
    items = [b"|".join([b"%d" % k, b"Movie %d (199%d)" % (k, k % 10), b"01-Jan-1995", b"", b"http://x"]
                       + [b"1" if g == k % 19 else b"0" for g in range(19)]) + b"\n" for k in range(1, 40)]
    data = b"".join(b"%d\t%d\t%d\t%d\n" % (1 + i % 29, 1 + i % 39, 1 + i % 5, 881250949 + i) for i in range(150))
    (folder / "u.item").write_bytes(b"".join(items))
    return {"u.user": users, "u.data": data}


@FUZZ
@given(target=st.sampled_from(["u.user", "u.data"]), edits=st.lists(EDIT, min_size=1, max_size=5),
       strict=st.booleans())
def test_edited_movielens100k_folder(target, edits, strict):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        files = _ml100k_base(folder)
        files[target] = apply_edits(files[target], edits)
        for name, content in files.items():
            (folder / name).write_bytes(content)
        res = run_loader("movielens100k", folder, files["u.data"], strict=strict)
        if res is not None:
            side = res.stats.get("side_files", {}).get("u.user")
            assert side is not None and side["lines"] == physical_lines(files["u.user"])
            assert side["lines"] == side["rows"] + side["blank_lines"] + side["malformed"]


@functools.lru_cache(maxsize=None)
def _built_cache():
    """One cache folder of the Criteo CSV sample, built once; each example edits a copy."""
    d = Path(tempfile.mkdtemp(prefix="optembed-fuzz-cache-"))
    raw = d / "train.csv"
    raw.write_bytes(sample("criteo_csv"))
    res = preprocess("criteo", raw, d / "cache", min_count=2, progress=False)
    return raw, res.cache_path, np.array(res.X), np.array(res.y)


@FUZZ
@given(target=st.sampled_from(["X.npy", "y.npy", "feature_map.json", "vocab.json", "meta.json"]),
       edits=st.lists(EDIT, min_size=1, max_size=3))
def test_edited_cache_files_are_detected_and_rebuilt(target, edits):
    import shutil

    from optembed_ext.data import CacheError, verify_cache

    raw, folder, X0, y0 = _built_cache()
    with tempfile.TemporaryDirectory() as d:
        cache = Path(d) / "cache"
        copy = cache / folder.name
        shutil.copytree(folder, copy)
        before = (copy / target).read_bytes()
        after = apply_edits(before, edits)
        (copy / target).write_bytes(after)
        try:
            verify_cache(copy)
            ok = True
        except CacheError:
            ok = False
        if after != before and target != "meta.json":
            assert not ok  # every change of a checksummed file is seen
        if ok and target == "meta.json":  # only informational parts changed (statistics, dates)
            meta0, meta1 = (json.loads(b) for b in (before, after))
            assert all(meta0[k] == meta1[k] for k in ("params", "files", "checksums", "rows"))
        assert [e.status for e in list_caches(cache)] == ["valid" if ok else "corrupt"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = preprocess("criteo", raw, cache, min_count=2, progress=False)
        assert res.cache_path == copy and res.from_cache == ok
        np.testing.assert_array_equal(res.X, X0)
        np.testing.assert_array_equal(res.y, y0)
