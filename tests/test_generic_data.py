"""Bring your own data: CSV / TSV / Parquet files described by a YAML feature spec (optembed_ext.data.generic).

* the shipped specs reproduce the built-in loaders: MovieLens 100K (joins, year extraction, genre flags; same ids,
  vocabularies and labels) and Criteo (log^2 buckets, padded short rows; same ids) on the real data in
  ../shared/data (skipped when absent);
* every field type, the label rules, min_count / OOV, the time and random splits, the cache, on small files built
  here in CSV, TSV and Parquet (the three give the same arrays);
* bad specs and malformed rows raise errors naming the key / the line and column;
* ``optembed preprocess --dataset csv --spec ... --input ...``.
"""
import json

import numpy as np
import pytest
import yaml

from optembed_ext import cli
from optembed_ext.data import MalformedRowError, load_vocab, preprocess
from optembed_ext.data.errors import DataFileNotFoundError, DataFormatError
from optembed_ext.data.generic import SpecError, load_generic, load_spec, preprocess_generic

from conftest import require_file
from pathlib import Path

SPECS = Path(__file__).resolve().parents[1] / "configs" / "specs"

HEADER = ["user", "ad", "price", "age", "tags", "rating", "ts", "f_a", "f_b"]
ROWS = [
    ["u1", "a1", "3.5", "31", "x|y", "5", "2024-01-05", "1", "0"],
    ["u2", "a1", "100", "45", "y", "1", "2024-01-01", "0", "0"],
    ["u1", "a2", "", "22", "", "4", "2024-01-03", "1", "1"],
    ["u3", "a2", "7", "60", "z|x|y", "3", "2024-01-02", "0", "1"],
    ["u1", "a1", "1", "38", "x", "2", "2024-01-04", "1", "0"],
    ["u2", "a3", "0", "51", "y|x", "4", "2024-01-06", "0", "0"],
]
SPEC = {
    "name": "toy",
    "label": {"column": "rating", "positive": ">= 4", "negative": "<= 2"},
    "fields": [
        "user",
        {"column": "ad"},
        {"column": "price", "type": "numeric", "bucketing": "log2"},
        {"name": "age_q", "column": "age", "type": "numeric", "bucketing": "quantile", "buckets": 2},
        {"name": "age_f", "column": "age", "type": "numeric", "bucketing": "fixed", "boundaries": [30, 50]},
        {"column": "tags", "type": "multi", "separator": "|", "slots": 2},
        {"name": "tagset", "column": "tags", "type": "multi", "separator": "|", "slots": 0, "sort": True},
        {"name": "flags", "type": "flags", "flags": ["f_a", "f_b"]},
    ],
    "min_count": 1,
    "split": {"by": "time", "column": "ts", "ratios": [0.6, 0.2, 0.2]},
}
FIELDS = ["user", "ad", "price", "age_q", "age_f", "tags_1", "tags_2", "tagset", "flags"]


def write_table(path: Path, rows=ROWS, header=HEADER, sep=","):
    path.write_text("\n".join(sep.join(r) for r in [header] + rows) + "\n")
    return path


def write_parquet(path: Path, rows=ROWS, header=HEADER):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = list(zip(*rows))
    table = pa.table({h: pa.array(list(c), pa.string()) for h, c in zip(header, cols)})
    pq.write_table(table, path)
    return path


def tokens(res, row: int) -> dict:
    """The tokens of one encoded row (field -> token), through the cache's vocabularies."""
    vocab = load_vocab(res.cache_path)
    fm = res.feature_map
    return {n: vocab[n][int(res.X[row, f]) - fm.offsets[f]] for f, n in enumerate(fm.field_names)}


# ----------------------------------------------------------------------------------------- field types
def test_every_field_type_label_rule_and_time_order(tmp_path):
    path = write_table(tmp_path / "toy.csv")
    res = preprocess_generic(SPEC, path, tmp_path / "cache")
    assert res.feature_map.field_names == FIELDS and res.cache_path.name.startswith("toy-")
    # rating 3 dropped on purpose; rows stored by time: 01-01, 01-03, 01-04, 01-05, 01-06
    assert res.stats["filtered"] == 1 and res.stats["malformed"] == 0 and res.num_rows == 5
    np.testing.assert_array_equal(res.y, [0, 1, 0, 1, 1])
    first = tokens(res, 0)   # u2, a1, price 100, age 45, tags "y", flags 0 0
    assert first == {"user": "u2", "ad": "a1", "price": "b21", "age_q": ">=41.5", "age_f": "[30,50)",
                     "tags_1": "y", "tags_2": "<EMPTY>", "tagset": "y", "flags": "<EMPTY>"}
    third = tokens(res, 2)   # u1, a1, price 1, age 38, tags "x", flags 1 0
    assert third["price"] == "1" and third["age_q"] == "<41.5" and third["flags"] == "f_a"
    last = tokens(res, 4)    # u2, a3, price 0, age 51, tags "y|x"
    assert last == {"user": "u2", "ad": "a3", "price": "0", "age_q": ">=41.5", "age_f": ">=50", "tags_1": "y",
                    "tags_2": "x", "tagset": "x|y", "flags": "<EMPTY>"}
    second = tokens(res, 1)  # u1, a2, price empty, age 22, tags empty, flags 1 1
    assert second["price"] == "<EMPTY>" and second["age_q"] == "<41.5" and second["age_f"] == "<30"
    assert second["tags_1"] == "<EMPTY>" and second["flags"] == "f_a|f_b"
    assert res.stats["quantile_boundaries"] == {"age_q": [41.5]}  # median of the 6 ages, over the whole file
    # the time split takes the rows in time order: test = the latest
    data = load_generic(SPEC, path, cache_dir=tmp_path / "cache")
    assert data.info["split"] == "time" and data.info["from_cache"]
    assert (len(data.train), len(data.val), len(data.test)) == (3, 1, 1)
    np.testing.assert_array_equal(data.test.X[0], np.asarray(res.X[4]))


def test_multi_value_slots_count_the_dropped_values(tmp_path):
    spec = {"label": {"column": "rating", "positive": ">= 4"}, "min_count": 1,
            "fields": [{"column": "tags", "type": "multi", "separator": "|", "slots": 1, "sort": True}]}
    res = preprocess_generic(spec, write_table(tmp_path / "t.csv"))
    # 6 rows (no negative rule: rating 3 is negative), tags x|y, y, "", x|y|z, x, x|y -> 1 + 2 + 1 dropped
    assert res.num_rows == 6 and res.stats["truncated_values"] == 4
    assert res.feature_map.field_names == ["tags_1"] and res.feature_map.dataset == "csv"
    np.testing.assert_array_equal(res.y, [1, 0, 1, 0, 0, 1])


def test_min_count_makes_rare_values_oov(tmp_path):
    path = write_table(tmp_path / "toy.csv")
    spec = dict(SPEC, min_count=2, split={"by": "file"})
    res = preprocess_generic(spec, path, tmp_path / "cache")
    vocab = load_vocab(res.cache_path)
    # counted over the kept rows: user u1 x3, u2 x2 (u3 only in the dropped rating-3 row); ad a1 x3, a2 and a3 once
    assert vocab["user"] == ["<OOV>", "<EMPTY>", "u1", "u2"]
    assert vocab["ad"] == ["<OOV>", "<EMPTY>", "a1"]
    assert vocab["price"][2:] and "b21" in vocab["price"]             # numeric fields are not thresholded
    local = np.asarray(res.X) - np.asarray(res.feature_map.offsets)
    assert local[2, 1] == local[4, 1] == 0 and local[0, 1] == 2       # a2, a3 -> OOV id 0; a1 -> 2
    # the same call with another min_count gets its own cache folder
    res1 = preprocess_generic(spec, path, tmp_path / "cache", min_count=1)
    assert res1.cache_path != res.cache_path and len(load_vocab(res1.cache_path)["ad"]) == 5


def test_csv_tsv_and_parquet_give_the_same_arrays(tmp_path):
    pytest.importorskip("pyarrow.parquet")
    base = preprocess_generic(SPEC, write_table(tmp_path / "toy.csv"), tmp_path / "cache")
    tsv = preprocess_generic(SPEC, write_table(tmp_path / "toy.tsv", sep="\t"), tmp_path / "cache")
    pq_spec = dict(SPEC, input={"format": "parquet"})
    par = preprocess_generic(pq_spec, write_parquet(tmp_path / "toy.parquet"), tmp_path / "cache")
    for other in (tsv, par):
        assert other.feature_map.cardinalities == base.feature_map.cardinalities
        np.testing.assert_array_equal(other.X, base.X)
        np.testing.assert_array_equal(other.y, base.y)
        assert load_vocab(other.cache_path) == load_vocab(base.cache_path)
    assert tsv.stats["input_format"] == "tsv" and par.stats["input_format"] == "parquet"
    # typed Parquet columns (numbers, timestamps) read as their text: 4.0 -> "4", 7 -> "7"
    import pyarrow as pa
    import pyarrow.parquet as pq

    typed = pa.table({"user": ["u1", "u2", "u1"], "rating": pa.array([4.0, 1.0, 5.0]), "n": pa.array([7, 1, 7]),
                      "ts": pa.array([3, 1, 2], pa.int64())})
    pq.write_table(typed, tmp_path / "typed.parquet")
    spec = {"label": {"column": "rating", "positive": ">= 4"}, "fields": ["user", "n"], "min_count": 1,
            "split": {"by": "time", "column": "ts"}}
    res = preprocess_generic(spec, tmp_path / "typed.parquet", tmp_path / "cache")
    np.testing.assert_array_equal(res.y, [0, 1, 1])
    assert load_vocab(res.cache_path)["n"] == ["<OOV>", "<EMPTY>", "7", "1"]


def test_arrow_and_python_engines_give_the_same_arrays(tmp_path):
    pytest.importorskip("pyarrow")
    path = write_table(tmp_path / "toy.csv")
    py = preprocess_generic(SPEC, path, tmp_path / "c1", engine="python")
    ar = preprocess_generic(SPEC, path, tmp_path / "c2", engine="arrow")
    assert ar.cache_path.name == py.cache_path.name  # the engine is not part of the cache key
    np.testing.assert_array_equal(ar.X, py.X)
    np.testing.assert_array_equal(ar.y, py.y)
    assert load_vocab(ar.cache_path) == load_vocab(py.cache_path)
    with pytest.raises(ValueError, match="engine must be one of"):
        preprocess_generic(SPEC, path, engine="fast")


def test_without_cache_and_random_split_and_compression(tmp_path):
    import gzip

    raw = write_table(tmp_path / "toy.csv").read_bytes()
    (tmp_path / "toy.csv.gz").write_bytes(gzip.compress(raw))
    spec = dict(SPEC, split={"by": "random", "seed": 3})
    a = preprocess_generic(spec, tmp_path / "toy.csv")
    b = preprocess_generic(spec, tmp_path / "toy.csv.gz", tmp_path / "cache")
    assert a.cache_path is None and b.cache_path is not None
    np.testing.assert_array_equal(a.X, b.X)
    # random split: file order in the cache, the split shuffles with the seed
    np.testing.assert_array_equal(a.y, [1, 0, 1, 0, 1])
    d1, d2 = load_generic(spec, tmp_path / "toy.csv"), load_generic(spec, tmp_path / "toy.csv", seed=4)
    assert d1.info["split"] == "random" and d1.info["seed"] == 3 and d2.info["seed"] == 4
    assert sorted(map(tuple, np.concatenate([d1.train.X, d1.val.X, d1.test.X]))) == sorted(map(tuple, a.X))
    # a time split without a cache sorts the in-memory arrays
    t = preprocess_generic(SPEC, tmp_path / "toy.csv")
    np.testing.assert_array_equal(t.y, [0, 1, 0, 1, 1])
    c = preprocess_generic(SPEC, tmp_path / "toy.csv", tmp_path / "cache")
    np.testing.assert_array_equal(t.X, c.X)


# ------------------------------------------------------------------------------------ malformed rows
def test_malformed_rows_are_counted_or_raised_with_line_and_column(tmp_path):
    rows = ROWS + [["u4", "a1", "abc", "30", "x", "5", "2024-01-07", "1", "0"],   # line 8: price not a number
                   ["u4", "a1", "2", "30", "x", "five", "2024-01-07", "1", "0"],  # line 9: label
                   ["u4", "a1", "2"],                                               # line 10: 3 columns
                   ["u4", "a1", "2", "30", "x", "5", "someday", "1", "0"]]         # line 11: time
    path = write_table(tmp_path / "bad.csv", rows)
    with pytest.warns(UserWarning, match="skipped 4 malformed rows"):
        res = preprocess_generic(SPEC, path, tmp_path / "cache")
    assert res.num_rows == 5 and res.stats["malformed"] == 4 and res.stats["rows_read"] == 10
    assert res.stats["malformed_by_reason"] == {"bad_value": 2, "bad_label": 1, "wrong_column_count": 1}
    ex = {e["line"]: e for e in res.stats["malformed_examples"]}
    assert ex[8]["column_name"] == "price" and ex[8]["value"] == "abc" and "not a number" in ex[8]["reason"]
    assert ex[9]["column_name"] == "rating" and "not a number" in ex[9]["reason"]
    assert "expected 9 comma-separated columns, got 3" in ex[10]["reason"]
    assert ex[11]["column_name"] == "ts" and "ISO 8601" in ex[11]["reason"]
    with pytest.raises(MalformedRowError, match=r"line 8, column 'price': not a number \(value 'abc'\)") as err:
        preprocess_generic(SPEC, path, tmp_path / "cache2", strict=True)
    assert err.value.line == 8
    assert not (tmp_path / "cache2").exists() or not any((tmp_path / "cache2").iterdir())
    # every row malformed or filtered: nothing cached, a clear error
    spec = dict(SPEC, label={"column": "rating", "positive": "== 9", "negative": "== 8"})
    with pytest.raises(DataFormatError, match="no usable rows.*6 filtered by the label rule"):
        preprocess_generic(spec, write_table(tmp_path / "ok.csv"), tmp_path / "cache3")


def test_quoted_csv_header_and_values(tmp_path):
    (tmp_path / "q.csv").write_text('"user","price, usd",clicked\nu1,"3,5",1\nu2,"4",0\n')
    spec = {"label": {"column": "clicked", "positive": 1}, "fields": ["user", "price, usd"], "min_count": 1}
    res = preprocess_generic(spec, tmp_path / "q.csv", tmp_path / "cache")
    assert res.feature_map.field_names == ["user", "price, usd"]
    assert load_vocab(res.cache_path)["price, usd"][2:] == ["3,5", "4"]


def test_join_side_table_and_missing_keys(tmp_path):
    (tmp_path / "users.txt").write_text("u1|F|31\nu2|M|45\nu1|M|99\n")             # u1 twice: the first wins
    rows = [["u1", "a1", "1"], ["u2", "a2", "0"], ["u9", "a1", "1"]]
    path = write_table(tmp_path / "clicks.csv", rows, ["uid", "ad", "click"])
    spec = {"label": {"column": "click", "positive": 1},
            "joins": [{"file": "users.txt", "separator": "|", "header": False, "columns": ["uid", "gender", "age"],
                       "key": "uid"}],
            "fields": ["uid", "gender", "age"], "min_count": 1, "split": {"by": "file"}}
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        res = preprocess_generic(spec, path, tmp_path / "cache")
    assert res.num_rows == 2 and res.stats["side_duplicates"] == 1
    assert tokens(res, 0) == {"uid": "u1", "gender": "F", "age": "31"}
    ex = res.stats["malformed_examples"][0]
    assert ex["line"] == 4 and ex["column_name"] == "uid" and "not found in users.txt" in ex["reason"]
    with pytest.raises(DataFileNotFoundError, match="join file"):
        preprocess_generic(dict(spec, joins=[dict(spec["joins"][0], file="nope.txt")]), path)


# ---------------------------------------------------------------------------------------- bad specs
BAD_SPECS = [
    ({"fields": ["user"]}, r"label: is required"),
    ({"label": {"column": "rating"}, "fields": ["user"]}, r"label.positive: is required"),
    ({"label": {"column": "rating", "positive": ">= x"}, "fields": ["user"]}, r"label.positive: the comparison"),
    ({"label": {"column": "rating", "positive": 1}, "fields": []}, r"fields: must be a non-empty list"),
    ({"label": {"column": "rating", "positive": 1}, "fields": ["user"], "mincount": 2}, r"unknown keys \['mincount'\]"),
    ({"label": {"column": "rating", "positive": 1}, "fields": [{"column": "price", "type": "numeric",
                                                                "bucketing": "log"}]},
     r"fields\[0\].bucketing: must be one of \['log2', 'quantile', 'fixed', 'none'\], got 'log'"),
    ({"label": {"column": "rating", "positive": 1}, "fields": [{"column": "age", "type": "numeric",
                                                                "bucketing": "fixed", "boundaries": [5, 3]}]},
     r"fields\[0\].boundaries: must be strictly increasing"),
    ({"label": {"column": "rating", "positive": 1}, "fields": ["user", {"column": "ts", "extract": "[0-9]+"}]},
     r"fields\[1\].extract: needs a group"),
    ({"label": {"column": "rating", "positive": 1}, "fields": ["user", "user"]}, r"repeated: \['user'\]"),
    ({"label": {"column": "rating", "positive": 1}, "fields": [{"column": "tags", "type": "multi"}]},
     r"fields\[0\].separator: is required"),
    ({"label": {"column": "rating", "positive": 1}, "fields": ["user"], "split": {"by": "time"}},
     r"split.column: is required with by: time"),
    ({"label": {"column": "rating", "positive": 1}, "fields": ["user"], "split": {"ratios": [0.5, 0.5, 0.5]}},
     r"split.ratios: must be three non-negative numbers summing to 1"),
    ({"label": {"column": "rating", "positive": 1}, "fields": ["user"], "name": "My Data"},
     r"name: must be lower-case letters and digits"),
    ({"label": {"column": "rating", "positive": 1}, "fields": ["user"], "input": {"header": False}},
     r"input.columns: is required when header is false"),
    ({"label": {"column": "rating", "positive": 1}, "fields": [{"type": "kind"}]}, r"fields\[0\].type: must be one"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS)
def test_bad_specs_name_the_key(spec, message):
    with pytest.raises(SpecError, match=message):
        load_spec(spec)


def test_spec_columns_must_exist_and_yaml_errors(tmp_path):
    path = write_table(tmp_path / "toy.csv")
    spec = {"label": {"column": "rating", "positive": 1}, "fields": ["user", "colour"]}
    with pytest.raises(SpecError, match=r"columns \['colour'\] are neither in toy.csv"):
        preprocess_generic(spec, path)
    (tmp_path / "s.yaml").write_text("label: {column: rating, positive: 1\nfields: [user]\n")
    with pytest.raises(SpecError, match="s.yaml: not valid YAML"):
        load_spec(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"label": {"column": "rating", "positive": 1},
                                                     "fields": [{"column": "user", "slots": 2}]}))
    with pytest.raises(SpecError, match=r"s.yaml: fields\[0\]: unknown keys \['slots'\]"):
        load_spec(tmp_path / "s.yaml")
    with pytest.raises(DataFileNotFoundError, match="input file"):
        preprocess_generic(spec, tmp_path / "missing.csv")


# ------------------------------------------------------------------------------- the shipped specs
def test_movielens_100k_spec_reproduces_the_builtin_loader(shared_data, tmp_path):
    folder = require_file(shared_data, "ml-100k")
    require_file(shared_data, "ml-100k/u.data")
    spec = load_spec(SPECS / "movielens_100k.yaml")
    res = preprocess_generic(spec, folder / "u.data", tmp_path / "cache")
    ref = preprocess("movielens100k", folder, tmp_path / "cache", progress=False)
    assert res.feature_map.field_names == ref.feature_map.field_names
    assert res.feature_map.cardinalities == ref.feature_map.cardinalities
    np.testing.assert_array_equal(res.X, ref.X)
    np.testing.assert_array_equal(res.y, ref.y)
    assert load_vocab(res.cache_path) == load_vocab(ref.cache_path)
    assert res.stats["filtered"] == ref.stats["filtered"] == 100_000 - res.num_rows


def test_criteo_spec_reproduces_the_builtin_loader(shared_data, tmp_path):
    raw = require_file(shared_data, "samples/criteo_train_head.txt")
    for min_count in (1, 10):
        res = preprocess_generic(SPECS / "criteo.yaml", raw, min_count=min_count)
        ref = preprocess("criteo", raw, min_count=min_count, progress=False)
        assert res.feature_map.cardinalities == ref.feature_map.cardinalities
        np.testing.assert_array_equal(res.X, ref.X)
        np.testing.assert_array_equal(res.y, ref.y)
        assert res.stats["padded_rows"] == ref.stats["padded_rows"] > 0  # stripped trailing columns


# ---------------------------------------------------------------------------------------- command line
def test_preprocess_command_with_a_spec(tmp_path, capsys):
    path = write_table(tmp_path / "toy.csv")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    argv = ["preprocess", "--dataset", "csv", "--spec", str(tmp_path / "spec.yaml"), "--input", str(path),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "toy: 9 fields" in out and "train/val/test 3/1/1" in out and "1 filtered" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["field_names"] == FIELDS and metrics["from_cache"] is False
    # a bad spec is one line naming the key, not a traceback
    (tmp_path / "bad.yaml").write_text("label: {column: rating, positive: 1}\nfields: [{column: user, type: x}]\n")
    assert cli.main(argv[:4] + [str(tmp_path / "bad.yaml")] + argv[5:-1] + [str(tmp_path / "run2")]) == 2
    assert "fields[0].type: must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs --spec"):
        cli.main(["preprocess", "--dataset", "csv", "--input", str(path), "--out", str(tmp_path / "run3")])


# ------------------------------------------------------------------------------------ the README's spec
def _readme_yaml(heading: str) -> str:
    """The first ```yaml block after ``heading`` in the README."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```yaml\n", text.index(heading)) + len("```yaml\n")
    return text[start:text.index("```", start)]


def test_readme_spec_example_runs(tmp_path):
    """The README's "Bring your own data" spec, as written, on a file with its columns."""
    spec_text = _readme_yaml("### Bring your own data")
    (tmp_path / "clicks.yaml").write_text(spec_text)
    rng = np.random.default_rng(0)
    lines = ["user_id,ad_id,site,price,age,tags,clicked,timestamp"]
    for i in range(400):
        tags = "|".join(rng.choice(["sport", "news", "cars", "food"], size=rng.integers(0, 4), replace=False))
        lines.append(f"u{rng.integers(30)},ad{rng.integers(12)},s{rng.integers(5)},{rng.integers(0, 500)},"
                     f"{rng.integers(18, 80)},{tags},{int(rng.random() < 0.3)},{1_700_000_000 + 7 * (400 - i)}")
    (tmp_path / "clicks.csv").write_text("\n".join(lines) + "\n")
    data = load_generic(tmp_path / "clicks.yaml", tmp_path / "clicks.csv", cache_dir=tmp_path / "cache")
    fm = data.feature_map
    assert fm.dataset == "clicks"
    assert fm.field_names == ["user_id", "ad_id", "site", "price", "age", "tags_1", "tags_2"]
    assert data.info["split"] == "time" and len(data.train) + len(data.val) + len(data.test) == 400
    assert len(load_vocab(data.info["cache_path"])["age"]) == 2 + 4   # quantile buckets: 4
    # the file lists the newest rows first: the time split's test rows are the first lines of the file
    res = preprocess_generic(tmp_path / "clicks.yaml", tmp_path / "clicks.csv", tmp_path / "cache")
    assert res.from_cache
    first = preprocess_generic(dict(load_spec(tmp_path / "clicks.yaml").raw, split={"by": "file"}),
                               tmp_path / "clicks.csv")
    np.testing.assert_array_equal(np.asarray(res.y)[::-1], first.y)


def test_train_and_search_commands_take_a_spec(tmp_path, capsys):
    """``--dataset csv --spec`` works for every command that loads data, not only ``preprocess``."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        user, ad = f"u{rng.integers(20)}", f"a{rng.integers(15)}"
        rows.append([user, ad, str(rng.integers(0, 200)), str(rng.integers(18, 70)), "x|y", str(rng.integers(1, 6)),
                     f"2024-01-{1 + i % 28:02d}", str(rng.integers(2)), str(rng.integers(2))])
    path = write_table(tmp_path / "big.csv", rows=rows)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    data = ["--dataset", "csv", "--spec", str(tmp_path / "spec.yaml"), "--data-dir", str(path),
            "--cache-dir", str(tmp_path / "cache")]
    argv = ["train", *data, "--model", "fm", "--embed-dim", "4", "--epochs", "1", "--batch-size", "64",
            "--no-progress", "--out", str(tmp_path / "train")]
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_auc"] <= 1.0
    # the spec's time split is kept unless --split is given; --spec without --dataset csv is refused
    with pytest.raises(SystemExit, match="--spec applies to --dataset csv only"):
        cli.main(["train", "--dataset", "movielens100k", "--spec", str(tmp_path / "spec.yaml"), "--out",
                  str(tmp_path / "x")])
    argv = ["search", *data, "--model", "fm", "--embed-dim", "4", "--supernet-epochs", "1", "--retrain-epochs", "1",
            "--generations", "1", "--batch-size", "64", "--out", str(tmp_path / "search")]
    assert cli.main(argv) == 0
    assert (tmp_path / "search" / "report.md").exists()
