"""Datasets: raw-format loaders (on small files written here and on the real samples), the preprocessing cache,
splits, batching, the feature map and the synthetic generator.

Expected encodings are computed here from the raw text with plain Python (counting values, the bucketing formula
``floor(log(x)^2)``, ``datetime``), never taken from the loader.
"""
import csv
import datetime
import gzip
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import require_file
from optembed_ext.data import (CTRDataset, CTRSplit, FeatureMap, batches, canonical_name, load_dataset, load_vocab,
                               make_synthetic, preprocess, split_indices)

CRITEO_NAMES = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
AVAZU_COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
                 "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
                 "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]


# ------------------------------------------------------------------------------------------------ helpers
def local_ids(X, fmap):
    return np.asarray(X, dtype=np.int64) - np.asarray(fmap.offsets, dtype=np.int64)


def int_key(s):
    """Independent statement of the Criteo integer rule: empty, a log bucket for x > 2, else the value."""
    if s == "":
        return ("empty",)
    x = float(s)
    if x > 2:
        return ("bucket", int(np.floor(np.log(x) ** 2)))
    return ("value", x)


def assert_partition(local, keys, oov_keys=frozenset()):
    """Cells with equal keys share one local id, different keys different ids; OOV keys map to 0, empty to 1."""
    seen = {}
    for lid, key in zip(local.tolist(), keys):
        if key == ("empty",) or key == "":
            assert lid == 1, f"empty value got id {lid}"
            continue
        if key in oov_keys:
            assert lid == 0, f"rare value {key!r} got id {lid}, expected the OOV id 0"
            continue
        assert lid >= 2, f"value {key!r} got reserved id {lid}"
        assert seen.setdefault(key, lid) == lid, f"value {key!r} got two ids"
    ids = list(seen.values())
    assert len(set(ids)) == len(ids), "two different values share an id"


def criteo_rows(n=60, seed=0):
    rng = random.Random(seed)
    ints = ["", "0", "1", "2", "3", "-1", "7", "10", "150", "4000", "12345"]
    rows = []
    for i in range(n):
        label = str(rng.random() < 0.3 and 1 or 0)
        row = [label] + [rng.choice(ints) for _ in range(13)]
        for c in range(26):
            # per field a frequent value, a few mid values and singletons; some empties
            r = rng.random()
            if r < 0.1:
                row.append("")
            elif r < 0.5:
                row.append(f"{c:02x}aaaaaa")
            elif r < 0.8:
                row.append(f"{c:02x}b{rng.randrange(4):05d}")
            else:
                row.append(f"{c:02x}u{i:05d}")
        rows.append(row)
    return rows


def write_tsv(path, rows, sep="\t", header=None):
    with open(path, "w", newline="") as f:
        if header:
            f.write(sep.join(header) + "\n")
        for r in rows:
            f.write(sep.join(r) + "\n")
    return path


def check_criteo_encoding(res, rows, min_count):
    fm = res.feature_map
    assert fm.field_names == CRITEO_NAMES[1:]
    assert res.X.shape == (len(rows), 39)
    np.testing.assert_array_equal(res.y, np.array([float(r[0]) for r in rows], dtype=np.float32))
    loc = local_ids(res.X, fm)
    assert (loc >= 0).all() and (loc < np.asarray(fm.cardinalities)).all()
    for f in range(13):
        assert_partition(loc[:, f], [int_key(r[1 + f]) for r in rows])
    for f in range(13, 39):
        col = [r[1 + f] for r in rows]
        counts = Counter(v for v in col if v)
        rare = {v for v, c in counts.items() if c < min_count}
        assert_partition(loc[:, f], col, oov_keys=rare)
        # one id per frequent value, plus OOV and empty
        assert fm.cardinalities[f] == 2 + sum(1 for c in counts.values() if c >= min_count)


# ---------------------------------------------------------------------------------------------- feature map
def test_feature_map_layout_and_json(tmp_path):
    fm = FeatureMap("toy", ["a", "b", "c"], [3, 1, 4])
    assert fm.offsets == [0, 3, 4] and fm.num_fields == 3 and fm.num_features == 8
    assert fm.field_of_row().tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert fm.field_of_row().dtype == torch.int64
    fm.to_json(tmp_path / "fm.json")
    back = FeatureMap.from_json(tmp_path / "fm.json")
    assert (back.dataset, back.field_names, back.cardinalities) == ("toy", ["a", "b", "c"], [3, 1, 4])
    with pytest.raises(ValueError, match="cardinalities"):
        FeatureMap("x", ["a", "b"], [3])
    with pytest.raises(ValueError, match="cardinalities"):
        FeatureMap("x", ["a"], [0])
    with pytest.raises(ValueError, match="field_names"):
        FeatureMap("x", ["a", "a"], [2, 2])


def test_containers_validate_shapes():
    with pytest.raises(ValueError, match="X must be 2-D"):
        CTRSplit(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="y must have shape"):
        CTRSplit(np.zeros((3, 2)), np.zeros(2))
    fm = FeatureMap("toy", ["a"], [2])
    s = CTRSplit(np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="columns"):
        CTRDataset(fm, s, s, s)


# --------------------------------------------------------------------------------------------------- criteo
def test_criteo_tsv_encoding(tmp_path):
    rows = criteo_rows()
    path = write_tsv(tmp_path / "train.txt", rows)
    res = preprocess("criteo", tmp_path, min_count=3, progress=False)  # folder: finds train.txt
    check_criteo_encoding(res, rows, 3)
    assert res.stats["rows_kept"] == len(rows) and res.stats["malformed"] == 0
    # the vocabulary names the tokens: raw value for a category, b<floor(log(x)^2)> for an integer x > 2
    res_cached = preprocess("criteo", path, tmp_path / "cache", min_count=3, progress=False)
    res_vocab = load_vocab(res_cached.cache_path)
    vocab = res_vocab["I9"]
    loc = local_ids(res_cached.X, res_cached.feature_map)
    for r, lid in zip(rows, loc[:, 8]):
        v = r[9]
        if v and float(v) > 2:
            assert vocab[lid] == f"b{math.floor(math.log(float(v)) ** 2)}"
    for r, lid in zip(rows, loc[:, 13]):
        if lid >= 2:
            assert res_vocab["C1"][lid] == r[14]
    assert res_vocab["C1"][:2] == ["<OOV>", "<EMPTY>"]


def test_criteo_variants_give_the_same_encoding(tmp_path):
    rows = criteo_rows(seed=1)
    base = preprocess("criteo", write_tsv(tmp_path / "train.txt", rows), min_count=2, progress=False)
    # CSV with a header, integers written as floats ("3.0"), as in re-saved copies of the data
    as_float = [[r[0]] + [(v + ".0" if v else v) for v in r[1:14]] + r[14:] for r in rows]
    csv_res = preprocess("criteo", write_tsv(tmp_path / "train.csv", as_float, ",", CRITEO_NAMES),
                         min_count=2, progress=False)
    np.testing.assert_array_equal(csv_res.X, base.X)
    # gzip, and trailing empty columns stripped by a text tool
    gz = tmp_path / "g" / "train.txt.gz"
    gz.parent.mkdir()
    with gzip.open(gz, "wt") as f:
        for r in rows:
            f.write("\t".join(r).rstrip("\t") + "\n")
    gz_res = preprocess("criteo", gz, min_count=2, progress=False)
    np.testing.assert_array_equal(gz_res.X, base.X)
    # streaming in tiny chunks and a row cap
    chunked = preprocess("criteo", tmp_path / "train.txt", min_count=2, chunk_rows=7, progress=False)
    np.testing.assert_array_equal(chunked.X, base.X)
    assert chunked.stats["chunks"] == math.ceil(len(rows) / 7)
    capped = preprocess("criteo", tmp_path / "train.txt", min_count=2, max_rows=10, progress=False)
    assert capped.X.shape == (10, 39)
    check_criteo_encoding(capped, rows[:10], 2)


def test_criteo_malformed_rows_counted_or_rejected(tmp_path):
    rows = criteo_rows(30, seed=2)
    bad = {
        4: ["1"] * 45,                                   # too many columns
        9: ["0", "1", "2"],                              # too few columns (fewer than label + 13 ints)
        15: ["x"] + rows[0][1:],                         # label not 0/1
        21: rows[0][:3] + ["abc"] + rows[0][4:],         # I3 not a number
    }
    lines = []
    for i, r in enumerate(rows):
        if i in bad:
            lines.append(bad[i])
        lines.append(r)
    path = write_tsv(tmp_path / "train.txt", lines)
    with pytest.warns(UserWarning, match="malformed"):
        res = preprocess("criteo", path, min_count=2, progress=False)
    check_criteo_encoding(res, rows, 2)  # the good rows, as if the bad ones were absent
    st = res.stats
    assert st["malformed"] == 4 and st["rows_read"] == len(lines) and st["rows_kept"] == len(rows)
    assert st["malformed_by_reason"] == {"wrong_column_count": 2, "bad_label": 1, "bad_value": 1}
    # line numbers of the bad rows (1-based; bad row i sits after the rows before it and the earlier bad ones)
    bad_lines = sorted(ex["line"] for ex in st["malformed_examples"])
    assert bad_lines == [i + k + 1 for k, i in enumerate(sorted(bad))]
    value_error = [ex for ex in st["malformed_examples"] if ex["reason"] != "" and ex["value"] == "abc"]
    assert value_error and value_error[0]["column_name"] == "I3"
    with pytest.raises(ValueError, match=r"line 5\b.*expected 40 columns"):
        preprocess("criteo", path, min_count=2, strict=True, progress=False)
    (tmp_path / "t2").mkdir()
    path2 = write_tsv(tmp_path / "t2" / "train.txt", [rows[0], bad[21]])
    with pytest.raises(ValueError, match=r"line 2, column 4 \(I3\).*'abc'"):
        preprocess("criteo", path2, min_count=1, strict=True, progress=False)


def test_blank_lines_and_crlf_are_tolerated(tmp_path):
    rows = criteo_rows(12, seed=3)
    with open(tmp_path / "train.txt", "w", newline="") as f:
        for i, r in enumerate(rows):
            f.write("\t".join(r) + "\r\n")
            if i == 5:
                f.write("\r\n")
    res = preprocess("criteo", tmp_path / "train.txt", min_count=1, progress=False)
    check_criteo_encoding(res, rows, 1)
    assert res.stats["blank_lines"] == 1 and res.stats["malformed"] == 0


# ---------------------------------------------------------------------------------------------------- avazu
def test_avazu_hour_split_and_id_dropped(tmp_path):
    hours = ["14102100", "14102523", "14102913", "14103005"]
    rows = []
    for i in range(40):
        h = hours[i % 4]
        rows.append([str(10**18 + i), str(i % 3 == 0 and 1 or 0), h] + [f"v{j}_{i % (j + 2)}" for j in range(21)])
    path = write_tsv(tmp_path / "train.csv", rows, ",", AVAZU_COLUMNS)
    cache = tmp_path / "cache"
    res = preprocess("avazu", path, cache, min_count=1, progress=False)
    fm = res.feature_map
    assert fm.num_fields == 23 and "id" not in fm.field_names and "hour" not in fm.field_names
    assert fm.field_names[:2] == ["hour_of_day", "weekday"] and fm.field_names[2:] == AVAZU_COLUMNS[3:]
    np.testing.assert_array_equal(res.y, [float(r[1]) for r in rows])
    vocab = load_vocab(res.cache_path)
    loc = local_ids(res.X, fm)
    for r, lid_h, lid_w in zip(rows, loc[:, 0], loc[:, 1]):
        h = r[2]
        day = datetime.date(2000 + int(h[:2]), int(h[2:4]), int(h[4:6]))
        assert vocab["hour_of_day"][lid_h] == h[6:8]
        assert vocab["weekday"][lid_w] == str(day.weekday())  # 2014-10-21 was a Tuesday -> "1"
    assert vocab["weekday"][loc[0, 1]] == "1"
    for f in range(2, 23):
        assert_partition(loc[:, f], [r[f + 1] for r in rows])
    # a malformed hour (month 13) is a malformed row
    bad = rows[:3] + [[rows[0][0], "0", "14132100"] + rows[0][3:]]
    with pytest.warns(UserWarning, match="malformed"):
        res2 = preprocess("avazu", write_tsv(tmp_path / "bad.csv", bad, ",", AVAZU_COLUMNS), min_count=1,
                          progress=False)
    assert res2.stats["malformed"] == 1 and res2.X.shape == (3, 23)
    with pytest.raises(ValueError, match="line 5"):
        preprocess("avazu", tmp_path / "bad.csv", min_count=1, strict=True, progress=False)


# ---------------------------------------------------------------------------------------------------- kdd12
def test_kdd12_click_label_and_fields(tmp_path):
    rng = random.Random(4)
    rows = []
    for i in range(50):
        clicks = rng.choice([0, 0, 0, 1, 2, 5])
        imps = clicks + rng.choice([1, 2, 10])
        rows.append([str(clicks), str(imps)] + [str(rng.randrange(1, 6) * (k + 1)) for k in range(10)])
    write_tsv(tmp_path / "training.txt", rows)
    res = preprocess("kdd12", tmp_path, min_count=2, progress=False)
    fm = res.feature_map
    assert fm.num_fields == 11
    assert fm.field_names == ["Impression", "DisplayURL", "AdID", "AdvertiserID", "Depth", "Position", "QueryID",
                              "KeywordID", "TitleID", "DescriptionID", "UserID"]
    np.testing.assert_array_equal(res.y, [1.0 if int(r[0]) > 0 else 0.0 for r in rows])
    loc = local_ids(res.X, fm)
    assert_partition(loc[:, 0], [int_key(r[1]) for r in rows])
    for f in range(1, 11):
        col = [r[f + 1] for r in rows]
        rare = {v for v, c in Counter(col).items() if c < 2}
        assert_partition(loc[:, f], col, oov_keys=rare)
    ten = preprocess("kdd12", tmp_path, min_count=2, include_impression=False, progress=False)
    assert ten.feature_map.num_fields == 10 and "Impression" not in ten.feature_map.field_names
    np.testing.assert_array_equal(ten.X - np.asarray(ten.feature_map.offsets), loc[:, 1:])
    with pytest.raises(TypeError, match="unexpected options"):
        preprocess("kdd12", tmp_path, include_impressions=False, progress=False)


# ------------------------------------------------------------------------------------------------ movielens
ML_MOVIES = {"1": ("Toy Story (1995)", "Animation|Children's|Comedy"), "2": ("Heat (1995)", "Action|Crime|Thriller"),
             "3": ("Casablanca (1942)", "Drama|Romance|War")}
ML_USERS = {"1": ("F", "1", "10", "48067"), "2": ("M", "56", "16", "70072"), "3": ("M", "25", "15", "55117")}
ML_FIELDS = ["user_id", "movie_id", "gender", "age", "occupation", "zip", "year", "genres"]


def ml_ratings(n=60, seed=5):
    rng = random.Random(seed)
    return [(str(rng.randrange(1, 4)), str(rng.randrange(1, 4)), str(rng.randrange(1, 6)), str(978300000 + i))
            for i in range(n)]


def check_movielens(res, ratings, users, movies, vocab):
    kept = [r for r in ratings if r[2] != "3"]
    assert res.feature_map.field_names == ML_FIELDS
    assert res.X.shape == (len(kept), 8)
    assert res.stats["filtered"] == len(ratings) - len(kept)
    np.testing.assert_array_equal(res.y, [1.0 if r[2] in ("4", "5") else 0.0 for r in kept])
    loc = local_ids(res.X, res.feature_map)
    for (u, m, _, _), row in zip(kept, loc):
        tokens = [vocab[f][i] for f, i in zip(ML_FIELDS, row)]
        title, genres = movies[m]
        assert tokens == [u, m, *users[u], title[-5:-1], genres]


def test_movielens1m_dat_files(tmp_path):
    ratings = ml_ratings()
    (tmp_path / "users.dat").write_text("".join(f"{k}::{'::'.join(v)}\n" for k, v in ML_USERS.items()),
                                        encoding="latin-1")
    (tmp_path / "movies.dat").write_text("".join(f"{k}::{t}::{g}\n" for k, (t, g) in ML_MOVIES.items()),
                                         encoding="latin-1")
    lines = ["::".join(r) for r in ratings]
    (tmp_path / "ratings.dat").write_text("\n".join(lines) + "\n")
    res = preprocess("ml-1m", tmp_path, tmp_path / "cache", min_count=1, progress=False)
    assert res.dataset == "movielens1m"
    check_movielens(res, ratings, ML_USERS, ML_MOVIES, load_vocab(res.cache_path))
    # a rating of an unknown movie is a malformed row, reported with its line
    (tmp_path / "ratings.dat").write_text("\n".join(lines[:5] + ["1::99::5::978300000"] + lines[5:]) + "\n")
    with pytest.warns(UserWarning, match="malformed"):
        res2 = preprocess("movielens1m", tmp_path, min_count=1, progress=False)
    assert res2.stats["malformed"] == 1 and res2.stats["malformed_examples"][0]["line"] == 6
    with pytest.raises(ValueError, match="line 6.*movie"):
        preprocess("movielens1m", tmp_path, min_count=1, strict=True, progress=False)


def test_movielens100k_files(tmp_path):
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
              "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
              "War", "Western"]
    (tmp_path / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(genres)) + "\n")
    items = []
    for k, (title, combo) in ML_MOVIES.items():
        flags = ["1" if g in combo.split("|") else "0" for g in genres]
        items.append("|".join([k, title, "01-Jan-1995", "", "http://x"] + flags))
    (tmp_path / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    # u.user: id|age|gender|occupation|zip
    (tmp_path / "u.user").write_text("".join(f"{k}|{a}|{g}|{o}|{z}\n" for k, (g, a, o, z) in ML_USERS.items()))
    ratings = ml_ratings(seed=6)
    (tmp_path / "u.data").write_text("".join("\t".join(r) + "\n" for r in ratings))
    res = preprocess("movielens100k", tmp_path, tmp_path / "cache", min_count=1, progress=False)
    check_movielens(res, ratings, ML_USERS, ML_MOVIES, load_vocab(res.cache_path))
    # u.data given as a file works too
    res_file = preprocess("ml-100k", tmp_path / "u.data", min_count=1, progress=False)
    np.testing.assert_array_equal(res_file.X, res.X)


def test_movielens_joined_csv_with_quoted_titles(tmp_path):
    header = "user_id,movie_id,rating,timestamp,title,genres,gender,age,occupation,zip"
    lines = [header,
             '1,10,5,1,"American President, The (1995)",Comedy|Drama|Romance,F,1,10,48067',
             "2,11,3,2,Heat (1995),Action|Crime|Thriller,M,56,16,70072",
             "2,10,1,3,\"American President, The (1995)\",Comedy|Drama|Romance,M,56,16,70072"]
    (tmp_path / "ml.csv").write_text("\n".join(lines) + "\n")
    res = preprocess("movielens1m", tmp_path / "ml.csv", tmp_path / "c", min_count=1, progress=False)
    assert res.X.shape == (2, 8) and res.y.tolist() == [1.0, 0.0] and res.stats["filtered"] == 1
    vocab = load_vocab(res.cache_path)
    loc = local_ids(res.X, res.feature_map)
    assert vocab["year"][loc[0, 6]] == "1995" and vocab["genres"][loc[0, 7]] == "Comedy|Drama|Romance"
    assert vocab["gender"][loc[1, 2]] == "M"


# ----------------------------------------------------------------------------------------- cache and splits
def test_cache_is_reused_and_invalidated(tmp_path):
    rows = criteo_rows(40, seed=7)
    path = write_tsv(tmp_path / "train.txt", rows)
    cache = tmp_path / "cache"
    first = preprocess("criteo", path, cache, min_count=2, progress=False)
    assert not first.from_cache and first.cache_path.parent == cache
    for name in ("X.npy", "y.npy", "feature_map.json", "vocab.json", "meta.json"):
        assert (first.cache_path / name).is_file()
    assert FeatureMap.from_json(first.cache_path / "feature_map.json").cardinalities == \
        first.feature_map.cardinalities
    second = preprocess("criteo", path, cache, min_count=2, progress=False)
    assert second.from_cache and second.cache_path == first.cache_path
    np.testing.assert_array_equal(second.X, first.X)
    np.testing.assert_array_equal(second.y, first.y)
    data = load_dataset("criteo", path, cache_dir=cache, min_count=2, progress=False)
    assert data.info["from_cache"] and data.info["cache_path"] == str(first.cache_path)
    other = preprocess("criteo", path, cache, min_count=3, progress=False)
    assert not other.from_cache and other.cache_path != first.cache_path
    assert preprocess("criteo", path, cache, min_count=2, force=True, progress=False).from_cache is False
    # a changed raw file gets a new cache folder
    write_tsv(path, rows[:-1])
    changed = preprocess("criteo", path, cache, min_count=2, progress=False)
    assert not changed.from_cache and changed.cache_path != first.cache_path and changed.X.shape[0] == 39
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_progress_bar(tmp_path, capsys):
    path = write_tsv(tmp_path / "train.txt", criteo_rows(10))
    preprocess("criteo", path, min_count=1, progress=True)
    err = capsys.readouterr().err
    assert "counting" in err and "encoding" in err
    preprocess("criteo", path, min_count=1, progress=False)
    assert capsys.readouterr().err == ""


def test_random_and_positional_splits(tmp_path):
    rows = criteo_rows(101, seed=8)
    path = write_tsv(tmp_path / "train.txt", rows)
    full = preprocess("criteo", path, min_count=2, progress=False)
    n = full.X.shape[0]
    data = load_dataset("criteo", path, min_count=2, seed=3, progress=False)
    assert (len(data.train), len(data.val), len(data.test)) == (80, 10, 11)
    assert data.train.X.dtype == np.int64 and data.train.y.dtype == np.float32
    # together the three splits are exactly the encoded rows (as a multiset of (x, y) rows)
    joined = np.concatenate([np.column_stack([s.X, s.y]) for s in (data.train, data.val, data.test)])
    expected = np.column_stack([full.X.astype(np.int64), full.y])
    np.testing.assert_array_equal(joined[np.lexsort(joined.T[::-1])], expected[np.lexsort(expected.T[::-1])])
    again = load_dataset("criteo", path, min_count=2, seed=3, progress=False)
    np.testing.assert_array_equal(again.test.X, data.test.X)
    other = load_dataset("criteo", path, min_count=2, seed=4, progress=False)
    assert not np.array_equal(other.test.X, data.test.X)
    seq = load_dataset("criteo", path, min_count=2, split="sequential", ratios=(0.5, 0.25, 0.25), progress=False)
    np.testing.assert_array_equal(seq.train.X, full.X[:50])
    np.testing.assert_array_equal(seq.val.X, full.X[50:75])
    np.testing.assert_array_equal(seq.test.X, full.X[75:])
    tr, va, te = split_indices(n, seed=5)
    assert len(set(tr) | set(va) | set(te)) == n and len(tr) + len(va) + len(te) == n


def test_bad_arguments_are_named(tmp_path):
    path = write_tsv(tmp_path / "train.txt", criteo_rows(5))
    with pytest.raises(ValueError, match="unknown dataset name"):
        load_dataset("critteo", path)
    assert canonical_name("ML-1M") == "movielens1m" and canonical_name("kdd2012") == "kdd12"
    with pytest.raises(ValueError, match="min_count"):
        load_dataset("criteo", path, min_count=0, progress=False)
    with pytest.raises(ValueError, match="split"):
        load_dataset("criteo", path, split="time", progress=False)
    with pytest.raises(ValueError, match="ratios"):
        load_dataset("criteo", path, ratios=(0.8, 0.3, 0.1), progress=False)
    with pytest.raises(ValueError, match="max_rows"):
        load_dataset("criteo", path, max_rows=0, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("criteo", tmp_path / "nowhere", progress=False)
    with pytest.raises(FileNotFoundError, match="holds none of"):
        load_dataset("avazu", tmp_path, progress=False)
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("kdd12", None)


# ---------------------------------------------------------------------------------------------- real samples
def test_real_criteo_raw_head(shared_data):
    path = require_file(shared_data, "samples/criteo_train_head.txt")
    lines = [ln.rstrip("\r\n") for ln in open(path, encoding="utf-8") if ln.strip()]
    rows = [ln.split("\t") for ln in lines]
    rows = [r + [""] * (40 - len(r)) for r in rows]  # the sample has trailing empty columns stripped
    res = preprocess("criteo", path, min_count=2, progress=False)
    assert res.stats["malformed"] == 0 and res.stats["rows_kept"] == len(lines)
    assert res.X.shape == (len(lines), 39)
    check_criteo_encoding(res, rows, 2)
    assert int(res.y.sum()) == sum(r[0] == "1" for r in rows)


def test_real_criteo_csv_sample(shared_data):
    path = require_file(shared_data, "samples/criteo_sample.txt")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == CRITEO_NAMES
        rows = list(reader)
    res = preprocess("criteo", path, min_count=2, progress=False)
    assert res.stats["malformed"] == 0
    check_criteo_encoding(res, rows, 2)


def test_real_avazu_sample(shared_data):
    path = require_file(shared_data, "samples/avazu_sample.txt")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    res = preprocess("avazu", path, min_count=2, progress=False)
    assert res.stats["malformed"] == 0 and res.X.shape == (len(rows), 23)
    np.testing.assert_array_equal(res.y, [float(r["click"]) for r in rows])
    loc = local_ids(res.X, res.feature_map)
    assert_partition(loc[:, 0], [r["hour"][6:8] for r in rows])
    col = [r["site_id"] for r in rows]
    rare = {v for v, c in Counter(col).items() if c < 2}
    assert_partition(loc[:, res.feature_map.field_names.index("site_id")], col, oov_keys=rare)


def test_real_movielens_joined_sample(shared_data):
    path = require_file(shared_data, "samples/movielens_sample.txt")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if r["rating"] != "3"]
    data = load_dataset("movielens1m", path, min_count=1, progress=False)
    assert data.feature_map.field_names == ML_FIELDS
    n = len(data.train) + len(data.val) + len(data.test)
    assert n == len(kept) and data.info["stats"]["filtered"] == len(rows) - len(kept)
    pos = sum(r["rating"] in ("4", "5") for r in kept)
    assert sum(float(s.y.sum()) for s in (data.train, data.val, data.test)) == pos


def test_real_movielens100k(shared_data, tmp_path):
    folder = require_file(shared_data, "ml-100k")
    require_file(shared_data, "ml-100k/u.data")
    raw = np.loadtxt(folder / "u.data", dtype=np.int64)
    kept = raw[raw[:, 2] != 3]
    res = preprocess("movielens100k", folder, tmp_path / "cache", min_count=2, progress=False)
    assert res.X.shape == (len(kept), 8) and res.stats["malformed"] == 0
    np.testing.assert_array_equal(res.y, (kept[:, 2] >= 4).astype(np.float32))
    users, counts = np.unique(kept[:, 0], return_counts=True)
    assert res.feature_map.cardinalities[0] == 2 + int((counts >= 2).sum())
    vocab = load_vocab(res.cache_path)
    loc = local_ids(res.X, res.feature_map)
    # movie 1 is Toy Story (1995): Animation, Children's, Comedy
    i = int(np.flatnonzero(kept[:, 1] == 1)[0])
    assert vocab["genres"][loc[i, 7]] == "Animation|Children's|Comedy" and vocab["year"][loc[i, 6]] == "1995"
    # user 1 is a 24-year-old male technician (u.user)
    j = int(np.flatnonzero(kept[:, 0] == 1)[0])
    assert [vocab[f][loc[j, k]] for k, f in ((2, "gender"), (3, "age"), (4, "occupation"))] == \
        ["M", "24", "technician"]


# ------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_planted_signal():
    data = make_synthetic(num_samples=6000, num_fields=6, vocab_sizes=[50, 30, 20, 40, 10, 25],
                          informative_fields=[0, 2], seed=1)
    fm = data.feature_map
    assert fm.cardinalities == [50, 30, 20, 40, 10, 25]
    assert (len(data.train), len(data.val), len(data.test)) == (4800, 600, 600)
    for s in (data.train, data.val, data.test):
        loc = local_ids(s.X, fm)
        assert (loc >= 0).all() and (loc < np.asarray(fm.cardinalities)).all()
    info = data.info
    assert info["informative_fields"] == [0, 2] and info["noise_fields"] == [1, 3, 4, 5]
    w = info["row_weights"]
    field = fm.field_of_row().numpy()
    assert np.all(w[np.isin(field, [1, 3, 4, 5])] == 0)
    useful = info["useful_rows"]
    assert np.all(w[useful] != 0) and np.count_nonzero(w) == len(useful)
    assert set(field[useful]) == {0, 2}
    # the logit is bias + the planted weights of the sample's ids, and it predicts the labels
    logit = info["bias"] + w[data.test.X].sum(1)
    np.testing.assert_allclose(info["true_logit_test"], logit, rtol=1e-5, atol=1e-5)
    assert roc_auc_score(data.test.y, logit) > 0.65
    same = make_synthetic(num_samples=6000, num_fields=6, vocab_sizes=[50, 30, 20, 40, 10, 25],
                          informative_fields=[0, 2], seed=1)
    np.testing.assert_array_equal(same.train.X, data.train.X)
    assert not np.array_equal(make_synthetic(num_samples=6000, num_fields=6, seed=2).train.y[:100],
                              make_synthetic(num_samples=6000, num_fields=6, seed=3).train.y[:100])
    crit = load_dataset("synthetic", preset="criteo", max_vocab=50, num_samples=500, seed=0)
    assert crit.feature_map.num_fields == 39 and max(crit.feature_map.cardinalities) <= 50
    with pytest.raises(ValueError, match="informative_fields"):
        make_synthetic(num_fields=3, informative_fields=[5])
    with pytest.raises(ValueError, match="num_samples"):
        make_synthetic(num_samples=0)


def _first_order_auc(data):
    """Test AUC of a one-hot logistic regression: the best a model without feature interactions does."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import OneHotEncoder

    enc = OneHotEncoder(handle_unknown="ignore").fit(data.train.X)
    lr = LogisticRegression(C=1.0, max_iter=500).fit(enc.transform(data.train.X), data.train.y)
    return roc_auc_score(data.test.y, lr.decision_function(enc.transform(data.test.X)))


def test_synthetic_pairwise_interactions():
    from sklearn.metrics import roc_auc_score

    kw = dict(num_samples=20000, num_fields=6, vocab_sizes=40, seed=0)
    plain = make_synthetic(**kw)
    zero = make_synthetic(**kw, interaction_strength=0.0)
    for a, b in ((plain.train, zero.train), (plain.test, zero.test)):  # off by default, same data bit for bit
        assert np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y)
    assert plain.info["interaction_ranks"] == [0] * 6 and "interaction_vectors" not in plain.info

    data = make_synthetic(**kw, signal_scale=0.0, interaction_strength=3.0, interaction_rank=[2, 5, 3])
    info = data.info
    assert info["interaction_ranks"] == [2, 5, 3, 0, 0, 0]
    V = info["interaction_vectors"]
    fmap = data.feature_map
    useful = np.zeros(fmap.num_features, dtype=bool)
    useful[info["useful_rows"]] = True
    assert not V[~useful].any()  # only useful rows of informative fields carry vectors ...
    for f, r in enumerate(info["interaction_ranks"]):  # ... with exactly the field's rank of non-zero entries
        rows = slice(fmap.offsets[f], fmap.offsets[f] + fmap.cardinalities[f])
        assert not V[rows, r:].any()
        assert (V[rows][useful[rows], :r] != 0).all()
    # the planted logit is the pairwise term, recomputed here from the formula
    X = data.test.X
    term = sum((V[X[:, a]] * V[X[:, b]]).sum(1) / np.sqrt(min(r_a, r_b))
               for a, r_a in ((0, 2), (1, 5), (2, 3)) for b, r_b in ((0, 2), (1, 5), (2, 3)) if a < b)
    np.testing.assert_allclose(info["true_logit_test"], -1.0 + 3.0 / np.sqrt(3) * term, rtol=1e-4, atol=1e-4)
    # labels follow the planted logit, and a first-order model cannot recover most of it
    true_auc = roc_auc_score(data.test.y, info["true_logit_test"])
    assert true_auc > 0.65
    assert true_auc - _first_order_auc(data) > 0.05
    first = make_synthetic(**kw)  # first-order labels: a first-order model is about as good as the truth
    assert roc_auc_score(first.test.y, first.info["true_logit_test"]) - _first_order_auc(first) < 0.03

    crit = load_dataset("synthetic", preset="criteo_interactions", num_samples=400, seed=0)
    assert crit.feature_map.num_fields == 39 and max(crit.feature_map.cardinalities) == 10000
    ranks = crit.info["interaction_ranks"]
    assert [f for f, r in enumerate(ranks) if r] == crit.info["informative_fields"] and len(set(ranks) - {0}) > 1
    assert crit.info["interaction_strength"] > 0 and len(crit.info["noise_fields"]) == 27
    with pytest.raises(ValueError, match="interaction_strength"):
        make_synthetic(num_samples=10, interaction_strength=-1.0)
    with pytest.raises(ValueError, match="interaction_rank"):
        make_synthetic(num_samples=10, num_fields=4, interaction_strength=1.0, interaction_rank=[1, 2, 3])
    with pytest.raises(ValueError, match="preset"):
        make_synthetic(num_samples=10, preset="avazu")


def test_batches_cover_each_row_once_and_are_seeded():
    X = np.arange(23 * 2).reshape(23, 2)
    split = CTRSplit(X, (np.arange(23) % 2).astype(np.float32))
    plain = list(batches(split, 5))
    assert [b[0].shape[0] for b in plain] == [5, 5, 5, 5, 3]
    assert plain[0][0].dtype == torch.int64 and plain[0][1].dtype == torch.float32
    np.testing.assert_array_equal(torch.cat([b[0] for b in plain]).numpy(), X)
    shuffled = list(batches(split, 5, shuffle=True, seed=1, epoch=0))
    rows = torch.cat([b[0] for b in shuffled])
    labels = torch.cat([b[1] for b in shuffled])
    assert sorted(rows[:, 0].tolist()) == X[:, 0].tolist()
    np.testing.assert_array_equal(labels.numpy(), split.y[rows[:, 0].numpy() // 2])  # labels follow their rows
    again = torch.cat([b[0] for b in batches(split, 5, shuffle=True, seed=1, epoch=0)])
    assert torch.equal(again, rows)
    assert not torch.equal(torch.cat([b[0] for b in batches(split, 5, shuffle=True, seed=1, epoch=1)]), rows)
    assert [b[0].shape[0] for b in batches(split, 5, drop_last=True)] == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(split, 0))
