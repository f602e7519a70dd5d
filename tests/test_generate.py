"""The raw-data generator: exact original formats (the real loaders read its output the way they read the
shipped real samples), seeded and chunk-bounded output, calibrated vocabularies and the planted label model."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import require_file
from optembed_ext.cli import main
from optembed_ext.data import preprocess
from optembed_ext.data.formats import AVAZU_COLUMNS
from optembed_ext.data.generate import (AVAZU_ROWS, CRITEO_ROWS, CRITEO_VOCAB, expected_vocabulary, field_models,
                                        generate_raw, planted_model)

HEX = set("0123456789abcdef")


def _criteo_row_ok(parts: list[str]) -> None:
    assert len(parts) == 40 and parts[0] in ("0", "1")
    for v in parts[1:14]:
        assert v == "" or v.lstrip("-").isdigit()
    for v in parts[14:]:
        assert v == "" or (len(v) == 8 and set(v) <= HEX)


def test_criteo_format_matches_the_real_file(tmp_path, shared_data):
    out = tmp_path / "train.txt"
    info = generate_raw("criteo", 3000, out, seed=1, chunk_rows=700)
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3001
    for line in lines[:-1]:
        _criteo_row_ok(line.decode("ascii").split("\t"))
    real = require_file(shared_data, "samples/criteo_train_head.txt")
    for line in real.read_text().splitlines()[:50]:  # the real rows pass the same format check
        _criteo_row_ok(line.split("\t") + [""] * (40 - len(line.split("\t"))))
    res = preprocess("criteo", out, preset="paper", progress=False)
    gen = preprocess("criteo", real, preset="paper", progress=False)
    assert res.malformed_rows == gen.malformed_rows == 0 and res.num_rows == 3000
    assert res.feature_map.field_names == gen.feature_map.field_names
    assert res.X.dtype == gen.X.dtype and 0.1 < res.y.mean() < 0.45
    assert info["planted"]["noise_fields"] and info["planted"]["informative_fields"]


def test_avazu_format_matches_the_real_file(tmp_path, shared_data):
    out = tmp_path / "train.csv"
    generate_raw("avazu", 2000, out, seed=2, chunk_rows=900)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == AVAZU_COLUMNS and all(len(r) == 24 for r in rows)
    real = require_file(shared_data, "samples/avazu_sample.txt")
    with open(real, newline="") as f:
        real_rows = list(csv.reader(f))
    assert real_rows[0] == rows[0]
    for gen_row, real_row in zip(rows[1:60], real_rows[1:60]):  # same kind of value in every column
        for g, r in zip(gen_row, real_row):
            assert g.lstrip("-").isdigit() == r.lstrip("-").isdigit() or (set(g) <= HEX and set(r) <= HEX)
        assert len(gen_row[2]) == 8 and gen_row[2].startswith("141")
    for preset, fields in (("default", 23), ("paper", 24)):
        res = preprocess("avazu", out, preset=preset, progress=False)
        assert res.malformed_rows == 0 and res.X.shape == (2000, fields)


def test_seeded_and_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_raw("criteo", 500, a, seed=3, chunk_rows=200)
    generate_raw("criteo", 500, b, seed=3, chunk_rows=200)
    generate_raw("criteo", 500, c, seed=4, chunk_rows=200)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    with pytest.raises(ValueError, match="rows"):
        generate_raw("criteo", 0, a)
    with pytest.raises(ValueError, match="format"):
        generate_raw("kdd", 10, a)


def test_a_shorter_file_is_the_prefix_of_a_longer_one(tmp_path):
    """The first n rows of a long file are a file of n rows (chunk-aligned n), as benchmarks/e2e_criteo.py uses."""
    short, long = tmp_path / "short", tmp_path / "long"
    generate_raw("criteo", 400, short, seed=5, chunk_rows=200)
    generate_raw("criteo", 1000, long, seed=5, chunk_rows=200)
    lines = long.read_bytes().splitlines(keepends=True)
    assert len(lines) == 1000
    assert b"".join(lines[:400]) == short.read_bytes()


def test_calibration_gives_the_published_sizes():
    models = field_models("criteo")
    assert [m.vocab for m in models] == CRITEO_VOCAB
    full = expected_vocabulary("criteo", CRITEO_ROWS)
    assert abs(full["total_min_count"] - 6.8e6) < 0.05 * 6.8e6
    assert abs(full["total_raw"] - sum(CRITEO_VOCAB)) < 0.05 * sum(CRITEO_VOCAB)
    for m in models:  # every field has about its raw vocabulary at the full size
        assert abs(full["fields"][m.name]["raw"] - m.vocab) <= 0.1 * m.vocab + 2, m.name
    av = expected_vocabulary("avazu", AVAZU_ROWS)
    assert abs(av["total_min_count"] - 4.4e6) < 0.05 * 4.4e6


def test_vocabulary_at_small_size_matches_the_model(tmp_path):
    out = tmp_path / "train.txt"
    rows = 20000
    generate_raw("criteo", rows, out, seed=5)
    res = preprocess("criteo", out, preset="paper", progress=False)
    want = expected_vocabulary("criteo", rows)
    got = sum(f["cardinality"] - 2 for f in res.stats["fields"][13:])
    assert abs(got - want["total_min_count"]) < 0.05 * want["total_min_count"]


def test_planted_label_model_is_learnable(tmp_path):
    """Informative fields separate the labels; noise fields do not (a univariate check, field by field)."""
    out = tmp_path / "train.txt"
    generate_raw("criteo", 30000, out, seed=6)
    res = preprocess("criteo", out, min_count=20, progress=False)
    planted = planted_model("criteo")
    names = res.feature_map.field_names
    from sklearn.metrics import roc_auc_score

    def field_auc(j):  # target encoding on half, AUC on the other half
        ids, y = res.X[:, j], res.y
        half = len(y) // 2
        s = np.bincount(ids[:half], weights=y[:half], minlength=ids.max() + 1)
        c = np.bincount(ids[:half], minlength=ids.max() + 1)
        rate = (s + y[:half].mean() * 20) / (c + 20)
        return roc_auc_score(y[half:], rate[ids[half:]])

    inf = [field_auc(names.index(f)) for f in planted["informative_fields"] if f.startswith("C")]
    noise = [field_auc(names.index(f)) for f in planted["noise_fields"]]
    assert np.mean(inf) > 0.53 and max(noise) < 0.53


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "train.csv"
    assert main(["generate", "--format", "avazu", "--rows", "300", "--out", str(out), "--no-progress"]) == 0
    assert "avazu: wrote 300 rows" in capsys.readouterr().out
    planted = json.loads((tmp_path / "train.csv.planted.json").read_text())
    assert planted["rows"] == 300 and planted["planted"]["format"] == "avazu"
    assert len(out.read_text().splitlines()) == 301
