"""Data safety: no raw line lost or silently mis-parsed, unusable input rejected with our own errors, the cache
validated on load (checksums, id and label ranges), built once under concurrency, listed and cleaned.

Line accounting checked throughout (see ``optembed_ext.data._stream``)::

    lines == header_lines + rows_read,   rows_read == rows_kept + filtered + malformed + blank_lines
"""
import bz2
import csv
import gzip
import json
import logging
import lzma
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import require_file
from optembed_ext.data import (CacheError, DataError, DataFileNotFoundError, DataFormatError, DataUsageError,
                               MalformedRowError, clean_caches, list_caches, load_vocab, preprocess, verify_cache)
from optembed_ext.data import cache as cache_mod
from test_data import AVAZU_COLUMNS, CRITEO_NAMES, criteo_rows, write_tsv


def physical_lines(path):
    data = open(path, "rb").read()
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def assert_accounted(stats, path=None):
    assert stats["rows_read"] == stats["rows_kept"] + stats["filtered"] + stats["malformed"] + stats["blank_lines"]
    assert stats["lines"] == stats["header_lines"] + stats["rows_read"]
    if path is not None:
        assert stats["lines"] == physical_lines(path)


def quiet_preprocess(*args, **kwargs):
    kwargs.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return preprocess(*args, **kwargs)


def criteo_csv(path, n=200, seed=0):
    return write_tsv(path, criteo_rows(n, seed=seed), ",", CRITEO_NAMES)


def avazu_rows(n=100):
    hours = ["14102100", "14102523", "14102913"]
    return [[str(10**18 + i), str(int(i % 3 == 0)), hours[i % 3]] + [f"v{j}_{i % (j + 2)}" for j in range(21)]
            for i in range(n)]


def insert_quote(lines, lineno, column):
    """Put a stray double quote before the token of ``column`` (0-based) on 1-based physical line ``lineno``."""
    parts = lines[lineno - 1].split(",")
    parts[column] = '"' + parts[column]
    lines[lineno - 1] = ",".join(parts)


# ------------------------------------------------------------------------------- item 1: stray quotes in CSV
def test_stray_quote_costs_one_row_criteo_csv(tmp_path):
    path = criteo_csv(tmp_path / "train.csv")
    good = quiet_preprocess("criteo", path, min_count=2)
    lines = path.read_text().splitlines()
    insert_quote(lines, 6, 16)  # line 6 = data row 5
    bad = tmp_path / "quoted.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="malformed"):
        res = preprocess("criteo", bad, min_count=2, progress=False)
    st = res.stats
    assert st["rows_kept"] == 199 and st["malformed"] == 1 and st["malformed_by_reason"] == {"unclosed_quote": 1}
    assert st["malformed_examples"][0]["line"] == 6
    assert_accounted(st, bad)
    keep = np.ones(200, dtype=bool)
    keep[4] = False
    np.testing.assert_array_equal(res.y, good.y[keep])
    with pytest.raises(MalformedRowError, match=r"line 6\b.*unclosed double quote") as err:
        preprocess("criteo", bad, min_count=2, strict=True, progress=False)
    assert err.value.line == 6 and isinstance(err.value, ValueError)


def test_stray_quote_costs_one_row_avazu(tmp_path):
    rows = avazu_rows(100)
    path = write_tsv(tmp_path / "train.csv", rows, ",", AVAZU_COLUMNS)
    lines = path.read_text().splitlines()
    insert_quote(lines, 11, 5)
    path.write_text("\n".join(lines) + "\n")
    res = quiet_preprocess("avazu", path, min_count=1)
    assert res.X.shape == (99, 23) and res.stats["malformed"] == 1
    assert res.stats["malformed_examples"][0]["line"] == 11
    np.testing.assert_array_equal(res.y, [float(r[1]) for i, r in enumerate(rows) if i != 9])
    assert_accounted(res.stats, path)


def test_quoted_field_never_spans_lines(tmp_path):
    header = "user_id,movie_id,rating,timestamp,title,genres,gender,age,occupation,zip"
    lines = [header,
             '1,10,5,1,"American President, The (1995)",Comedy|Drama,F,1,10,48067',
             '2,11,4,2,"Heat',                                       # a quoted title broken over two lines
             '(1995)",Action,M,56,16,70072',
             '3,12,4,3,Casablanca (1942),Drama,M,25,15,55117',
             '4,13,4,4,"Cr\rlf",Drama,M,25,15,55117',                  # a lone CR inside a quoted field: fine
             '5,13,4,4,"Bad"\r,Drama,M,25,15,55117',                  # a lone CR outside the quotes
             '6,14,1,5,"Odd "" quoted (1999)",Drama,M,25,15,55117']
    path = tmp_path / "ml.csv"
    path.write_bytes(("\n".join(lines) + "\n").encode())
    res = quiet_preprocess("movielens1m", path, min_count=1)
    st = res.stats
    assert st["rows_kept"] == 4 and st["malformed"] == 3 and st["rows_read"] == 7
    assert sorted(ex["line"] for ex in st["malformed_examples"]) == [3, 4, 7]
    assert st["malformed_by_reason"]["unclosed_quote"] == 1
    assert_accounted(st, path)
    vocab = quiet_preprocess("movielens1m", path, tmp_path / "c", min_count=1)
    assert "1995" in load_vocab(vocab.cache_path)["year"]


# ---------------------------------------------------------------------- item 10: truncated lines and padding
def test_truncated_criteo_line_is_padded_and_counted_or_rejected_when_strict(tmp_path):
    rows = criteo_rows(30, seed=11)
    lines = ["\t".join(r) for r in rows]
    lines[7] = "\t".join(rows[7][:30])[:-3]  # cut inside the token of column 30
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    res = preprocess("criteo", path, min_count=1, progress=False)
    assert res.padded_rows == 1 and res.stats["padded_rows"] == 1 and res.malformed_rows == 0
    assert res.summary()["stats"]["padded_rows"] == 1 and res.rows_read == 30
    assert_accounted(res.stats, path)
    with pytest.raises(MalformedRowError, match=r"line 8\b.*expected 40 columns, got 30.*padded") as err:
        preprocess("criteo", path, min_count=1, strict=True, progress=False)
    assert err.value.line == 8
    # a complete file is not affected by strict
    full = write_tsv(tmp_path / "full.txt", rows)
    assert preprocess("criteo", full, min_count=1, strict=True, progress=False).padded_rows == 0


# -------------------------------------------------------------------------- item 3: unusable input is an error
def _criteo_header():
    return ",".join(CRITEO_NAMES) + "\n"


@pytest.mark.parametrize("content, match", [
    (b"", r"the file is empty"),
    (_criteo_header().encode(), r"only a header line"),
    (b"\n\n\r\n", r"only blank lines"),
    ((_criteo_header() + "1,2,3\n" * 5).replace("\n", "\r").encode(), r"CR-only line ends"),
    (("x" + "\t1" * 39 + "\n") * 4, r"no usable rows \(4 lines read.*4 malformed.*4 bad_label.*line 1"),
    (("0" + ";1" * 39 + "\n") * 4, r"semicolon-separated"),
])
def test_unusable_criteo_file_fails_at_preprocessing(tmp_path, content, match):
    path = tmp_path / "train.txt"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    cache = tmp_path / "cache"
    with pytest.raises(DataFormatError, match=match) as err:
        preprocess("criteo", path, cache, progress=False)
    assert str(path) in str(err.value)
    assert not cache.exists()  # nothing cached, not even an empty cache dir
    if err.value.stats is not None:
        assert_accounted(err.value.stats, path)
    with pytest.raises(DataFormatError, match=match):  # the same without a cache
        preprocess("criteo", path, progress=False)


def ml100k_folder(tmp_path, users=None, data=None, items=True):
    folder = tmp_path / "ml"
    folder.mkdir(parents=True)
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
              "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
              "War", "Western"]
    if items:
        rows = []
        for k, title, g in (("1", "Toy Story (1995)", "Animation"), ("2", "Heat (1995)", "Action")):
            rows.append("|".join([k, title, "01-Jan-1995", "", "http://x"] + ["1" if x == g else "0" for x in genres]))
        (folder / "u.item").write_text("\n".join(rows) + "\n")
    if users is None:
        users = "1|24|M|technician|85711\n2|53|F|other|94043\n"
    if users is not False:
        (folder / "u.user").write_text(users)
    if data is None:
        data = "".join(f"{u}\t{m}\t{r}\t88125{i}\n" for i, (u, m, r) in
                       enumerate([(1, 1, 5), (2, 2, 1), (1, 2, 4), (2, 1, 2), (1, 1, 3)]))
    (folder / "u.data").write_text(data)
    return folder


def test_unusable_movielens_files_fail_with_the_file_named(tmp_path):
    folder = ml100k_folder(tmp_path / "a", users="")
    with pytest.raises(DataFormatError, match=r"u\.user: no usable rows \(the file is empty\)"):
        preprocess("movielens100k", folder, tmp_path / "cache", progress=False)
    folder = ml100k_folder(tmp_path / "b", data="1,1,5,881250949\n2,2,1,881250950\n")
    with pytest.raises(DataFormatError, match=r"u\.data: no usable rows \(2 lines read.*comma-separated.*tab"):
        preprocess("movielens100k", folder, tmp_path / "cache", progress=False)
    folder = ml100k_folder(tmp_path / "d", data="1\t1\t5\t1\r2\t2\t1\t2\r")
    with pytest.raises(DataFormatError, match=r"u\.data: no usable rows \(1 lines read.*CR-only line ends"):
        preprocess("movielens100k", folder, tmp_path / "cache", progress=False)
    folder = ml100k_folder(tmp_path / "e", users="1|24|M|technician|85711\r2|53|F|other|94043\r")
    with pytest.raises(DataFormatError, match=r"u\.user: no usable rows \(1 lines read.*CR-only line ends"):
        preprocess("movielens100k", folder, tmp_path / "cache", progress=False)
    folder = ml100k_folder(tmp_path / "c", data="1\t1\t3\t1\n")  # every rating a 3: all filtered
    with pytest.raises(DataFormatError, match=r"1 filtered, 0 usable.*filtered out"):
        preprocess("movielens100k", folder, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------- item 8: user mistakes get one message
def test_missing_side_files_are_named(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"u\.user is missing.*unpack the complete"):
        preprocess("movielens100k", ml100k_folder(tmp_path / "a", users=False), progress=False)
    with pytest.raises(DataFileNotFoundError, match=r"u\.item is missing"):
        preprocess("movielens100k", ml100k_folder(tmp_path / "b", items=False), progress=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ratings.dat").write_text("1::1::5::1\n")
    with pytest.raises(DataFileNotFoundError, match=r"users\.dat is missing") as err:
        preprocess("movielens1m", tmp_path / "c", progress=False)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, DataError)
    with pytest.raises(DataUsageError, match="data_dir is required"):
        preprocess("criteo", None, progress=False)
    with pytest.raises(DataUsageError, match="unknown dataset name"):
        preprocess("critteo", tmp_path, progress=False)


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compression_is_detected_by_content(tmp_path, compress):
    plain = criteo_csv(tmp_path / "train.csv", n=40)
    base = preprocess("criteo", plain, min_count=1, progress=False)
    packed = tmp_path / "no_suffix.txt"
    packed.write_bytes(compress(plain.read_bytes()))
    res = preprocess("criteo", packed, min_count=1, progress=False)
    np.testing.assert_array_equal(res.X, base.X)
    assert res.stats["lines"] == 41 and res.stats["compression"]
    cut = tmp_path / "cut.txt"
    cut.write_bytes(packed.read_bytes()[: len(packed.read_bytes()) // 2])
    with pytest.raises(DataFormatError, match=r"compressed.*cannot be decompressed"):
        preprocess("criteo", cut, min_count=1, progress=False)


def test_plain_file_named_gz_is_read_as_text(tmp_path):
    plain = criteo_csv(tmp_path / "train.csv", n=20)
    named = tmp_path / "train.txt.gz"
    shutil.copy(plain, named)
    assert preprocess("criteo", named, min_count=1, progress=False).X.shape == (20, 39)


# ---------------------------------------------------------------------- item 12: duplicate ids in side files
def test_duplicate_user_is_malformed_first_line_wins(tmp_path):
    users = "1|24|M|technician|85711\n2|53|F|other|94043\n1|99|F|writer|00000\n2|53\n"
    folder = ml100k_folder(tmp_path, users=users)
    with pytest.warns(UserWarning, match=r"2 malformed lines of side files.*u\.user: line 3: duplicate id '1'"):
        res = preprocess("movielens100k", folder, tmp_path / "cache", min_count=1, progress=False)
    st = res.stats
    assert st["side_malformed"] == 2 and st["side_malformed_by_reason"] == {"duplicate_id": 1,
                                                                             "wrong_column_count": 1}
    assert [(x["line"], x["file"].endswith("u.user")) for x in st["side_malformed_examples"]] == [(3, True),
                                                                                                  (4, True)]
    assert st["side_files"]["u.user"] == {"lines": 4, "rows": 2, "blank_lines": 0, "malformed": 2}
    vocab = load_vocab(res.cache_path)
    assert "24" in vocab["age"] and "99" not in vocab["age"]  # user 1 keeps its first line
    assert_accounted(st)
    with pytest.raises(MalformedRowError, match=r"u\.user: line 3, column 1 \(id\): duplicate id '1'"):
        preprocess("movielens100k", folder, min_count=1, strict=True, progress=False)


# ---------------------------------------------------------------------------- item 9: cache validated on load
@pytest.fixture
def built_cache(tmp_path):
    path = criteo_csv(tmp_path / "train.csv", n=120, seed=3)
    cache = tmp_path / "cache"
    res = preprocess("criteo", path, cache, min_count=2, progress=False)
    return path, cache, res


def _edit_npy(npy, edit):
    arr = np.load(npy)
    edit(arr)
    os.chmod(npy, 0o644)
    np.save(npy, arr)


@pytest.mark.parametrize("what", ["in_range_id", "huge_id", "label_7", "feature_map", "meta_missing",
                                  "truncated_X", "vocab"])
def test_corrupt_cache_is_detected_and_rebuilt(built_cache, caplog, what):
    path, cache, first = built_cache
    folder = first.cache_path
    X0, y0 = np.array(first.X), np.array(first.y)
    del first
    if what == "in_range_id":  # a valid id of the same field, in another row: only the checksum sees it
        def edit(a):
            a[0, 20], a[1, 20] = a[1, 20], a[0, 20]
            if a[0, 20] == a[1, 20]:
                a[0, 20] = a[0, 20] + 1 if a[0, 20] + 1 < a[:, 21].min() else a[0, 20] - 1
        _edit_npy(folder / "X.npy", edit)
    elif what == "huge_id":
        _edit_npy(folder / "X.npy", lambda a: a.__setitem__((5, 3), 10**9))
    elif what == "label_7":
        _edit_npy(folder / "y.npy", lambda a: a.__setitem__(7, 7.0))
    elif what == "feature_map":
        fm = json.loads((folder / "feature_map.json").read_text())
        fm["cardinalities"][0] += 1
        (folder / "feature_map.json").write_text(json.dumps(fm, indent=1))
    elif what == "meta_missing":
        (folder / "meta.json").unlink()
    elif what == "truncated_X":
        data = (folder / "X.npy").read_bytes()
        (folder / "X.npy").write_bytes(data[:-100])
    elif what == "vocab":
        (folder / "vocab.json").write_text((folder / "vocab.json").read_text().replace("<OOV>", "<OOW>"))
        with pytest.raises(CacheError, match="vocab.json changed"):
            load_vocab(folder)
    with pytest.raises(CacheError):
        verify_cache(folder)
    [entry] = list_caches(cache)
    assert entry.status == "corrupt" and entry.reason
    with caplog.at_level(logging.WARNING, logger="optembed_ext.data"):
        again = preprocess("criteo", path, cache, min_count=2, progress=False)
    assert f"cache {folder} is corrupt, rebuilding" in caplog.text
    assert not again.from_cache and again.cache_path == folder
    np.testing.assert_array_equal(again.X, X0)
    np.testing.assert_array_equal(again.y, y0)
    assert [e.status for e in list_caches(cache)] == ["valid"]
    assert preprocess("criteo", path, cache, min_count=2, progress=False).from_cache


def test_range_checks_catch_what_checksums_would_miss(built_cache):
    """An edit whose checksums were recomputed (so only the range validation can see it)."""
    _, cache, res = built_cache
    folder = res.cache_path
    del res
    _edit_npy(folder / "X.npy", lambda a: a.__setitem__((2, 0), a[2, 1]))  # field 1's id in field 0
    meta = json.loads((folder / "meta.json").read_text())
    meta["checksums"] = cache_mod.compute_checksums(folder)
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"row 2, field 0 \(I1\) holds id \d+, outside the field's rows \[0, \d+\)"):
        verify_cache(folder)
    _edit_npy(folder / "X.npy", lambda a: a.__setitem__((2, 0), 0))
    _edit_npy(folder / "y.npy", lambda a: a.__setitem__(3, np.nan))
    meta["checksums"] = cache_mod.compute_checksums(folder)
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"y.npy row 3 holds label nan"):
        verify_cache(folder)


def test_same_size_edit_keeping_mtime_gets_a_new_cache(tmp_path):
    rows = criteo_rows(60, seed=4)
    path = write_tsv(tmp_path / "train.txt", rows)
    cache = tmp_path / "cache"
    first = preprocess("criteo", path, cache, min_count=1, progress=False)
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = data.index(b"\t", 0) - 1  # the label of line 1 ...
    data[i:i + 1] = b"1" if data[i:i + 1] == b"0" else b"0"  # ... flipped: same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # like cp -p
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    second = preprocess("criteo", path, cache, min_count=1, progress=False)
    assert not second.from_cache and second.cache_path != first.cache_path
    assert second.y[0] != first.y[0]
    statuses = {e.path: e.status for e in list_caches(cache)}
    assert statuses == {first.cache_path: "stale", second.cache_path: "valid"}
    os.utime(path)  # touch alone does not rebuild a fully hashed file
    assert preprocess("criteo", path, cache, min_count=1, progress=False).from_cache


def test_list_and_clean_caches(tmp_path):
    a = criteo_csv(tmp_path / "a.csv", n=30, seed=1)
    b = write_tsv(tmp_path / "b.csv", avazu_rows(20), ",", AVAZU_COLUMNS)
    cache = tmp_path / "cache"
    ra = preprocess("criteo", a, cache, min_count=1, progress=False)
    rb = preprocess("avazu", b, cache, min_count=1, progress=False)
    rc = preprocess("criteo", a, cache, min_count=2, progress=False)
    (rc.cache_path / "X.npy").write_bytes(b"garbage")  # corrupt
    b.unlink()  # rb's raw file is gone: stale
    dead = _dead_pid()
    orphan = cache / f".criteo-0123456789abcdef.tmp-{dead}-1.{cache_mod._host()}"
    orphan.mkdir()
    (orphan / "X.npy").write_bytes(b"x" * 10)
    entries = {e.path: e for e in list_caches(cache)}
    assert {p: e.status for p, e in entries.items()} == {ra.cache_path: "valid", rb.cache_path: "stale",
                                                          rc.cache_path: "corrupt", orphan: "orphaned"}
    ea = entries[ra.cache_path]
    assert ea.dataset == "criteo" and ea.rows == 30 and ea.size_bytes > 0 and ea.files == [str(a.resolve())]
    assert "gone" in entries[rb.cache_path].reason and entries[rb.cache_path].dataset == "avazu"
    json.dumps([e.to_dict() for e in entries.values()])
    assert {e.path for e in clean_caches(cache, dry_run=True)} == {rb.cache_path, rc.cache_path, orphan}
    assert len(list_caches(cache)) == 4
    assert {e.path for e in clean_caches(cache, statuses="corrupt")} == {rc.cache_path}
    assert {e.path for e in clean_caches(cache)} == {rb.cache_path, orphan}
    assert [e.path for e in list_caches(cache)] == [ra.cache_path]
    assert clean_caches(cache, statuses="all", datasets="avazu") == []
    assert [e.path for e in clean_caches(cache, statuses="all")] == [ra.cache_path]
    assert list(cache.iterdir()) == [] and list_caches(tmp_path / "nowhere") == []
    with pytest.raises(ValueError, match="statuses"):
        clean_caches(cache, statuses=("rotten",))


# -------------------------------------------------------------------- item 4: concurrency and stale temporaries
def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _worker(args):
    path, cache, force, barrier = args
    barrier.wait()
    try:
        res = preprocess("criteo", path, cache, min_count=2, force=force, progress=False)
        return str(res.cache_path), np.asarray(res.X).tobytes(), np.asarray(res.y).tobytes(), None
    except BaseException as e:  # reported to the parent
        return None, None, None, f"{type(e).__name__}: {e}"


def _run_concurrently(path, cache, n, force=False):
    ctx = mp.get_context("fork")
    barrier = ctx.Manager().Barrier(n)
    with ctx.Pool(n) as pool:
        return pool.map(_worker, [(str(path), str(cache), force, barrier)] * n)


def test_concurrent_preprocessing_into_one_cache(tmp_path):
    path = criteo_csv(tmp_path / "train.csv", n=400, seed=5)
    expected = preprocess("criteo", path, min_count=2, progress=False)
    for trial in range(3):
        cache = tmp_path / f"cache{trial}"
        out = _run_concurrently(path, cache, 4, force=trial == 2)
        assert [o[3] for o in out] == [None] * 4
        assert len({o[0] for o in out}) == 1
        for _, X, y, _ in out:
            assert X == np.asarray(expected.X).tobytes() and y == np.asarray(expected.y).tobytes()
        assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []
        assert [e.status for e in list_caches(cache)] == ["valid"]
    # force=True rebuilds concurrently into an existing folder
    out = _run_concurrently(path, tmp_path / "cache0", 3, force=True)
    assert [o[3] for o in out] == [None] * 3 and len({o[0] for o in out}) == 1
    assert [e.status for e in list_caches(tmp_path / "cache0")] == ["valid"]


def test_stale_temporaries_of_dead_processes_are_cleaned(tmp_path):
    path = criteo_csv(tmp_path / "train.csv", n=30)
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = _dead_pid()
    host = cache_mod._host()
    stale = [cache / f".criteo-0123456789abcdef.tmp-{dead}-17.{host}",
             cache / f".criteo-0123456789abcdef.tmp-{dead}-18",  # the older naming, without host
             cache / f".criteo-0123456789abcdef.old-{dead}-19.{host}"]
    live = cache / f".criteo-0123456789abcdef.tmp-{os.getppid()}-20.{host}"  # a live process: kept
    other_host = cache / f".criteo-0123456789abcdef.tmp-{dead}-21.elsewhere-host"  # cannot tell: kept
    for p in stale + [live, other_host]:
        p.mkdir()
        (p / "X.npy").write_bytes(b"partial")
    lock = cache / ".criteo-0123456789abcdef.lock"  # left by a killed process (flock released with it)
    lock.write_text("")
    res = preprocess("criteo", path, cache, min_count=1, progress=False)
    left = sorted(p.name for p in cache.iterdir())
    assert left == sorted([live.name, other_host.name, res.cache_path.name])
    assert [e.status for e in list_caches(cache) if e.path == live] == ["building"]


def test_concurrent_preprocessing_without_file_locks(tmp_path, monkeypatch):
    """Where flock is unavailable the atomic rename alone must tolerate a concurrent winner."""
    import contextlib

    monkeypatch.setattr(cache_mod, "cache_lock", lambda *a, **k: contextlib.nullcontext(False))
    path = criteo_csv(tmp_path / "train.csv", n=300, seed=6)
    expected = preprocess("criteo", path, min_count=2, progress=False)
    for trial in range(2):
        cache = tmp_path / f"cache{trial}"
        out = _run_concurrently(path, cache, 4)  # forked workers inherit the patched module
        assert [o[3] for o in out] == [None] * 4 and len({o[0] for o in out}) == 1
        assert all(o[1] == np.asarray(expected.X).tobytes() for o in out)
        assert [p.name for p in cache.iterdir()] == [Path(out[0][0]).name]


_KILLED_CHILD = """
import sys, time
from optembed_ext.data import _stream, preprocess
encode = _stream.encode_table
def slow(*args, **kwargs):
    table = encode(*args, **kwargs)
    print("encoded", flush=True)
    time.sleep(120)
    return table
_stream.encode_table = slow
preprocess("criteo", sys.argv[1], sys.argv[2], min_count=1, progress=False, engine="python")
"""


def test_kill_9_during_preprocessing_leaves_nothing_that_blocks_or_stays(tmp_path):
    import signal

    path = criteo_csv(tmp_path / "train.csv", n=50)
    cache = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(path), str(cache)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "encoded"
        [tmp] = [p for p in cache.iterdir() if ".tmp-" in p.name]
        [lock] = [p for p in cache.iterdir() if p.name.endswith(".lock")]
        with cache_mod.cache_lock(lock, blocking=False) as held:
            assert held is False  # the child holds the lock
        assert [e.status for e in list_caches(cache)] == ["building"]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert tmp.is_dir() and lock.exists()  # what kill -9 leaves behind ...
    assert [e.status for e in list_caches(cache)] == ["orphaned"]
    res = preprocess("criteo", path, cache, min_count=1, progress=False)  # ... does not block the next run
    assert not res.from_cache
    assert [p.name for p in cache.iterdir()] == [res.cache_path.name]  # and is removed by it


def test_cache_of_an_older_format_is_listed_stale(built_cache):
    _, cache, res = built_cache
    meta = json.loads((res.cache_path / "meta.json").read_text())
    del meta["checksums"]
    meta["params"]["format_version"] = 1
    (res.cache_path / "meta.json").write_text(json.dumps(meta))
    [entry] = list_caches(cache)
    assert entry.status == "stale" and "another version" in entry.reason


def test_lock_waits_for_the_holder(tmp_path):
    lock = tmp_path / ".x.lock"
    with cache_mod.cache_lock(lock) as held:
        assert held and lock.exists()
        with cache_mod.cache_lock(lock, blocking=False) as again:  # another open file description: refused
            assert again is False
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------- real samples
def test_real_samples_with_a_stray_quote(shared_data, tmp_path):
    for rel, name, col, n in (("samples/criteo_sample.txt", "criteo", 16, 200),
                              ("samples/avazu_sample.txt", "avazu", 5, 100)):
        src = require_file(shared_data, rel)
        lines = src.read_text().splitlines()
        insert_quote(lines, 6, col)
        path = tmp_path / f"{name}.csv"
        path.write_text("\n".join(lines) + "\n")
        res = quiet_preprocess(name, path, min_count=2)
        assert res.stats["rows_kept"] == n - 1 and res.stats["malformed"] == 1
        assert res.stats["malformed_examples"][0]["line"] == 6
        assert_accounted(res.stats, path)
        with pytest.raises(MalformedRowError, match=r"line 6\b"):
            preprocess(name, path, min_count=2, strict=True, progress=False)


def test_real_samples_are_fully_accounted_and_cached_valid(shared_data, tmp_path):
    for rel, name in (("samples/criteo_sample.txt", "criteo"), ("samples/criteo_train_head.txt", "criteo"),
                      ("samples/avazu_sample.txt", "avazu"), ("samples/movielens_sample.txt", "movielens1m")):
        path = require_file(shared_data, rel)
        res = preprocess(name, path, tmp_path / "cache", min_count=2, progress=False)
        assert_accounted(res.stats, path)
        assert res.stats["malformed"] == 0
    head = preprocess("criteo", shared_data / "samples/criteo_train_head.txt", min_count=2, progress=False)
    assert head.padded_rows == sum(1 for ln in open(shared_data / "samples/criteo_train_head.txt")
                                   if len(ln.rstrip("\n").split("\t")) < 40)
    assert {e.status for e in list_caches(tmp_path / "cache")} == {"valid"}
    with open(shared_data / "samples/criteo_sample.txt", newline="") as f:
        assert next(csv.reader(f)) == CRITEO_NAMES


def test_utf8_byte_order_mark_is_not_data(tmp_path):
    rows = criteo_rows(20, seed=9)
    base = preprocess("criteo", write_tsv(tmp_path / "train.txt", rows), min_count=1, progress=False)
    for name, sep, header in (("bom.txt", "\t", None), ("bom.csv", ",", CRITEO_NAMES)):
        path = write_tsv(tmp_path / name, rows, sep, header)
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        res = preprocess("criteo", path, min_count=1, progress=False)
        assert res.stats["malformed"] == 0 and res.stats["header_lines"] == (1 if header else 0)
        np.testing.assert_array_equal(res.X, base.X)


def test_full_disk_while_writing_the_cache_is_named(tmp_path, monkeypatch):
    import errno

    path = criteo_csv(tmp_path / "train.csv", n=20)

    def no_space(folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "X.npy"))

    monkeypatch.setattr(cache_mod, "compute_checksums", no_space)
    cache = tmp_path / "cache"
    with pytest.raises(CacheError, match=r"cannot write the cache in .*cache \(No space left on device\)"):
        preprocess("criteo", path, cache, progress=False)
    assert not cache.exists()  # the partial folder is gone


def test_leading_blank_lines_do_not_change_the_separator(tmp_path):
    rows = criteo_rows(20, seed=10)
    base = preprocess("criteo", write_tsv(tmp_path / "train.txt", rows), min_count=1, progress=False)
    path = tmp_path / "blank_first.txt"
    path.write_text("\n\n" + (tmp_path / "train.txt").read_text())
    res = preprocess("criteo", path, min_count=1, progress=False)
    assert res.stats["blank_lines"] == 2 and res.stats["malformed"] == 0
    np.testing.assert_array_equal(res.X, base.X)
    assert_accounted(res.stats, path)


def test_big_cache_modes_sampled_checks_and_full_listing(tmp_path, monkeypatch):
    """Large raw files get a sampled fingerprint (with mtime), large caches sampled checks on load; a full check
    (list_caches(full=True)) still sees an edit anywhere. Sizes are shrunk so small files take these paths."""
    monkeypatch.setattr(cache_mod, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(cache_mod, "SAMPLE_BLOCK", 64)
    monkeypatch.setattr(cache_mod, "SAMPLE_BLOCKS", 2)
    monkeypatch.setattr(cache_mod, "FULL_VERIFY_BYTES", 0)
    monkeypatch.setattr(cache_mod, "CHECKSUM_BLOCK", 256)
    monkeypatch.setattr(cache_mod, "_SAMPLED_CHUNKS", 1)
    monkeypatch.setattr(cache_mod, "_RANGE_ROWS", 8)
    path = criteo_csv(tmp_path / "train.csv", n=200, seed=12)
    cache = tmp_path / "cache"
    first = preprocess("criteo", path, cache, min_count=2, progress=False)
    meta = json.loads((first.cache_path / "meta.json").read_text())
    assert meta["files"][0]["hash_mode"] == "sampled" and len(meta["checksums"]["X.npy"]["blocks"]) > 20
    assert preprocess("criteo", path, cache, min_count=2, progress=False).from_cache
    # a same-size edit in the sampled tail block keeping the mtime is still seen
    st = path.stat()
    data = bytearray(path.read_bytes())
    j = max(i for i in range(len(data) - 60, len(data)) if chr(data[i]).isalnum())
    data[j:j + 1] = b"q" if data[j:j + 1] != b"q" else b"r"
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = preprocess("criteo", path, cache, min_count=2, progress=False)
    assert not second.from_cache and second.cache_path != first.cache_path
    # with a sampled fingerprint the mtime is part of the key: touch rebuilds
    os.utime(path)
    third = preprocess("criteo", path, cache, min_count=2, progress=False)
    assert not third.from_cache and third.cache_path not in (first.cache_path, second.cache_path)
    # an edit of a middle block of X.npy: sampled checks may miss it, the full check does not
    X = np.load(third.cache_path / "X.npy")
    mid = X.shape[0] // 2
    X[mid, 13], X[mid + 1, 13] = X[mid + 1, 13], X[mid, 13]
    if X[mid, 13] == X[mid + 1, 13]:
        X[mid, 14], X[mid + 1, 14] = X[mid + 1, 14], X[mid, 14]
    np.save(third.cache_path / "X.npy", X)
    del X
    with pytest.raises(CacheError, match="checksum mismatch"):
        verify_cache(third.cache_path, full=True)
    statuses = {e.path: e.status for e in list_caches(cache, full=True)}
    assert statuses[third.cache_path] == "corrupt" and statuses[first.cache_path] == "stale"
