"""Preprocessing presets: ``default`` (the loaders' long-standing rules) and ``paper`` (the OptEmbed paper's).

Field counts are checked exactly; feature counts are recomputed here from the raw sample with the
min-count rule (every field: its kept tokens + the OOV and empty slots), independently of the loaders.
"""
from __future__ import annotations

import csv
import datetime
import math
import random
from collections import Counter

import pytest

from conftest import require_file
from optembed_ext.cli import main
from optembed_ext.data import DataUsageError, load_dataset, preprocess
from optembed_ext.data.formats import PRESETS

CRITEO_NAMES = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
AVAZU_FEATURES = ["C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
                  "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
                  "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
KDD12_NAMES = ["Click", "Impression", "DisplayURL", "AdID", "AdvertiserID", "Depth", "Position", "QueryID",
               "KeywordID", "TitleID", "DescriptionID", "UserID"]


def field_size(values, min_count: int | None) -> int:
    """Rows of one field's table: kept distinct non-empty tokens + OOV + empty (``min_count=None``: all kept)."""
    counts = Counter(v for v in values if v != "")
    return 2 + sum(1 for c in counts.values() if min_count is None or c >= min_count)


def int_bucket(s: str) -> str:
    x = float(s)
    return f"b{math.floor(math.log(x) ** 2)}" if x > 2 else str(int(x))


def criteo_expected(rows: list[list[str]], min_count: int) -> list[int]:
    sizes = [field_size([int_bucket(r[c]) if r[c] else "" for r in rows], None) for c in range(1, 14)]
    return sizes + [field_size([r[c] for r in rows], min_count) for c in range(14, 40)]


def test_preset_table_and_unknown_names():
    for name in ("criteo", "avazu", "kdd12"):
        assert PRESETS[name]["paper"]["min_count"] == 2 and PRESETS[name]["default"]["min_count"] == 10
    with pytest.raises(DataUsageError, match="unknown preprocessing preset 'papr'.*'paper'"):
        preprocess("criteo", "/nonexistent", preset="papr")
    with pytest.raises(DataUsageError, match="movielens100k"):
        preprocess("movielens100k", "/nonexistent", preset="paper")


@pytest.mark.parametrize("preset,min_count", [("default", 10), ("paper", 2), (None, 10)])
def test_criteo_presets_on_the_raw_head(shared_data, preset, min_count):
    path = require_file(shared_data, "samples/criteo_train_head.txt")
    with open(path, newline="") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    rows = [r + [""] * (40 - len(r)) for r in rows]
    res = preprocess("criteo", path, preset=preset, progress=False)
    assert res.feature_map.num_fields == 39 and res.params["min_count"] == min_count
    want = criteo_expected(rows, min_count)
    assert res.feature_map.cardinalities == want
    assert res.feature_map.num_features == sum(want)


def test_criteo_paper_preset_on_the_csv_sample(shared_data, tmp_path):
    path = require_file(shared_data, "samples/criteo_sample.txt")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    assert header == CRITEO_NAMES
    data = load_dataset("criteo", path, cache_dir=tmp_path / "cache", preset="paper", progress=False)
    assert data.feature_map.num_fields == 39 and data.info["preset"] == "paper" and data.info["min_count"] == 2
    assert data.feature_map.num_features == sum(criteo_expected(rows, 2))
    # an explicit min_count wins over the preset's, and equal rules share the cache folder
    same = preprocess("criteo", path, tmp_path / "cache", preset="default", min_count=2, progress=False)
    assert same.from_cache and str(same.cache_path) == data.info["cache_path"]


def avazu_expected(rows: list[dict], min_count: int, weekend: bool) -> list[int]:
    days = [datetime.date(2000 + int(r["hour"][:2]), int(r["hour"][2:4]), int(r["hour"][4:6])) for r in rows]
    sizes = [field_size([r["hour"][6:8] for r in rows], None), field_size([str(d.weekday()) for d in days], None)]
    if weekend:
        sizes.append(field_size(["1" if d.weekday() >= 5 else "0" for d in days], None))
    return sizes + [field_size([r[c] for r in rows], min_count) for c in AVAZU_FEATURES]


@pytest.mark.parametrize("preset,fields,min_count", [("default", 23, 10), ("paper", 24, 2)])
def test_avazu_presets_on_the_sample(shared_data, preset, fields, min_count):
    path = require_file(shared_data, "samples/avazu_sample.txt")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    res = preprocess("avazu", path, preset=preset, progress=False)
    fm = res.feature_map
    assert fm.num_fields == fields and res.X.shape == (len(rows), fields)
    head = ["hour_of_day", "weekday"] + (["is_weekend"] if preset == "paper" else [])
    assert fm.field_names == head + AVAZU_FEATURES
    want = avazu_expected(rows, min_count, preset == "paper")
    assert fm.cardinalities == want and fm.num_features == sum(want)


def test_avazu_is_weekend_field(tmp_path):
    header = ["id", "click", "hour"] + AVAZU_FEATURES
    hours = ["14102500", "14102600", "14102700"]  # Saturday, Sunday, Monday
    lines = [",".join(header)] + [",".join([str(i), str(i % 2), hours[i % 3]] + ["x"] * 21) for i in range(9)]
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines) + "\n")
    res = preprocess("avazu", path, preset="paper", progress=False)
    fm = res.feature_map
    j = fm.field_names.index("is_weekend")
    local = res.X[:, j] - fm.offsets[j]
    from optembed_ext.data.formats import avazu_is_weekend
    assert [avazu_is_weekend(h) for h in hours] == ["1", "1", "0"]
    # local ids by decreasing count: "1" (6 rows) first, "0" (3 rows) next
    assert local.tolist() == [2, 2, 3] * 3


def test_kdd12_presets(tmp_path):
    rng = random.Random(7)
    rows = []
    for _ in range(300):
        rows.append([str(rng.choice([0, 0, 0, 1, 2])), str(rng.choice([1, 1, 2, 3, 9, 40]))]
                    + [str(int(rng.paretovariate(1.2)) % 50 + k * 1000) for k in range(10)])
    path = tmp_path / "training.txt"
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    for preset, min_count in (("default", 10), ("paper", 2)):
        res = preprocess("kdd12", path, preset=preset, progress=False)
        want = [field_size([int_bucket(r[1]) for r in rows], None)]
        want += [field_size([r[c] for r in rows], min_count) for c in range(2, 12)]
        assert res.feature_map.num_fields == 11 and res.feature_map.field_names == KDD12_NAMES[1:]
        assert res.feature_map.cardinalities == want


def test_cli_preprocess_preset(shared_data, tmp_path, capsys):
    path = require_file(shared_data, "samples/avazu_sample.txt")
    rc = main(["preprocess", "--dataset", "avazu", "--data-dir", str(path), "--preset", "paper",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0
    assert "avazu: 24 fields" in capsys.readouterr().out
