"""The fast encoder (``engine="arrow"``): same arrays, vocabularies and row statistics as the line-by-line path,
resumable after a kill, memory bounded by the distinct values (not by the rows)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import require_file
from optembed_ext.data import MalformedRowError, load_vocab, preprocess
from optembed_ext.data._fast import _hash_values, _key_values, _value_keys, encode_table_fast
from optembed_ext.data.formats import PLANNERS
from optembed_ext.data.generate import generate_raw

pytest.importorskip("pyarrow")

_VOLATILE = ("chunks", "chunk_rows", "engine", "python_blocks", "block_bytes", "seconds", "cpu_seconds")


def same_result(a, b):
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.X.dtype == b.X.dtype
    assert a.feature_map.cardinalities == b.feature_map.cardinalities
    assert {k: v for k, v in a.stats.items() if k not in _VOLATILE} == \
        {k: v for k, v in b.stats.items() if k not in _VOLATILE}


@pytest.mark.parametrize("name,rel", [("criteo", "samples/criteo_train_head.txt"),
                                      ("criteo", "samples/criteo_sample.txt"), ("avazu", "samples/avazu_sample.txt")])
@pytest.mark.parametrize("preset", ["default", "paper"])
def test_same_as_python_path_on_real_samples(shared_data, tmp_path, name, rel, preset):
    path = require_file(shared_data, rel)
    a = preprocess(name, path, tmp_path / "py", preset=preset, engine="python", progress=False)
    b = preprocess(name, path, tmp_path / "arrow", preset=preset, engine="arrow", progress=False)
    same_result(a, b)
    assert b.stats["engine"] == "arrow" and load_vocab(a.cache_path) == load_vocab(b.cache_path)
    assert not list((tmp_path / "arrow").glob(".*.work"))  # the work folder is gone once the cache is written


def _messy_criteo(tmp_path, rows=3000):
    path = tmp_path / "train.txt"
    generate_raw("criteo", rows, path, seed=11)
    lines = path.read_bytes().split(b"\n")[:-1]
    lines[100] = b""                                        # blank line
    lines[700] = b"x" + lines[700]                          # bad label
    lines[1500] = b"\t".join(lines[1500].split(b"\t")[:20])  # short row: padded
    lines[2200] = lines[2200] + b"\t1\t2"                   # too many columns
    lines[2500] = lines[2500].replace(b"\t", b"\tabc", 1)   # I1 not a number
    path.write_bytes(b"\r\n".join(lines[:400]) + b"\r\n" + b"\n".join(lines[400:]))  # CRLF at the start, no final EOL
    return path


@pytest.mark.filterwarnings("ignore:.*malformed rows")
def test_same_as_python_path_with_malformed_rows_and_small_blocks(tmp_path):
    path = _messy_criteo(tmp_path)
    with pytest.warns(UserWarning, match="malformed"):
        a = preprocess("criteo", path, min_count=2, engine="python", progress=False)
    plan = PLANNERS["criteo"](path)
    with pytest.warns(UserWarning, match="malformed"):
        b = encode_table_fast(plan.schema, plan.source, min_count=2, block_bytes=64 << 10, progress=False)
    same_result(a, b)
    assert b.stats["malformed"] == 3 and b.stats["padded_rows"] == 1 and b.stats["blank_lines"] == 1
    assert 0 < b.stats["python_blocks"] < b.stats["chunks"]  # most blocks took the pyarrow path
    with pytest.raises(MalformedRowError, match="line 701"):
        encode_table_fast(plan.schema, plan.source, min_count=2, strict=True, block_bytes=64 << 10, progress=False)
    for max_rows in (1, 999, 2501):
        c = preprocess("criteo", path, min_count=2, engine="python", progress=False, max_rows=max_rows)
        d = encode_table_fast(plan.schema, plan.source, min_count=2, max_rows=max_rows, block_bytes=64 << 10,
                              progress=False)
        same_result(c, d)


def test_resumes_after_a_kill(tmp_path):
    path = tmp_path / "train.csv"
    generate_raw("avazu", 6000, path, seed=12)
    plan = PLANNERS["avazu"](path, is_weekend=True)
    want = encode_table_fast(plan.schema, plan.source, min_count=2, block_bytes=32 << 10, progress=False)
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    nblocks = want.stats["chunks"]
    assert nblocks >= 20
    for stop in (3, nblocks, 4):  # killed in pass 1, then early in pass 2, then later in pass 2
        with pytest.raises(KeyboardInterrupt):
            encode_table_fast(plan.schema, plan.source, min_count=2, block_bytes=32 << 10, progress=False,
                              out_dir=out, work_dir=work, checkpoint_blocks=2, stop_after_blocks=stop)
        assert json.loads((work / "state.json").read_text())["params"]["min_count"] == 2
    got = encode_table_fast(plan.schema, plan.source, min_count=2, block_bytes=32 << 10, progress=False,
                            out_dir=out, work_dir=work, checkpoint_blocks=2)
    np.testing.assert_array_equal(want.X, got.X)
    np.testing.assert_array_equal(want.y, got.y)
    assert want.vocab == got.vocab and not work.exists()


def test_hash_values_distinct_and_empty():
    import pyarrow as pa

    vals = [b"", b"a", b"b", b"ab", b"ba", b"\x00", b"\x00\x00", b"abc" * 50]
    h = _hash_values(pa.array(vals, type=pa.binary()))
    assert h[0] == 0 and len(set(h.tolist())) == len(vals) and (h[1:] != 0).all()
    sliced = pa.array(vals, type=pa.binary()).slice(2, 3)
    np.testing.assert_array_equal(_hash_values(sliced), h[2:5])


def test_value_keys_are_one_to_one_and_give_back_the_values():
    import pyarrow as pa

    from optembed_ext.data._fast import _FieldCounts

    vals = [b"", b"0", b"-1", b"a", b"ab", b"1234567", b"\x00", b"\x00\x00", b"a\x00",  # packed (1..7 bytes)
            b"0123abcd", b"ffffffff", b"00000000", b"68fd1e64",                          # 8 lowercase hex digits
            b"0123ABCD", b"0123abcg", b"12345678 ", b"abcdefgh", b"x" * 40, "\u00e9t\u00e9".encode() * 3]  # hashed
    arr = pa.array(vals, type=pa.binary())
    keys = _value_keys(arr)
    assert keys[0] == 0 and (keys[1:] != 0).all() and len(set(keys.tolist())) == len(vals)
    tags = (keys >> np.uint64(62)).tolist()
    assert tags == [0] + [1] * 8 + [2] * 4 + [3] * 6
    np.testing.assert_array_equal(_value_keys(arr.slice(3, 9)), keys[3:12])  # any slice of an array
    fc = _FieldCounts()
    long = tags.index(3)
    fc.long.add(keys[long:], arr.slice(long))
    back = _key_values(keys, fc.long)
    assert back.to_pylist() == vals
    # every byte at every position of an 8-byte value: a packed hex number exactly for lowercase hex digits
    eights = [bytes(b"01234567"[:p]) + bytes([c]) + b"01234567"[p + 1:] for p in range(8) for c in range(256)]
    ek = _value_keys(pa.array(eights, type=pa.binary()))
    want = [2 if c in b"0123456789abcdef" else 3 for p in range(8) for c in range(256)]
    assert (ek >> np.uint64(62)).tolist() == want
    fc.long.add(ek[np.asarray(want) == 3], pa.array([v for v, t in zip(eights, want) if t == 3], type=pa.binary()))
    assert _key_values(ek, fc.long).to_pylist() == eights
    assert len(set(ek.tolist())) == len(set(eights))
    # the same value gets the same key in every block, whatever else the block holds
    other = pa.array([b"zz" * 9, b"68fd1e64", b"1234567"], type=pa.binary())
    assert _value_keys(other)[1:].tolist() == [keys[12], keys[5]]


_MEASURE = textwrap.dedent("""
    import sys, tracemalloc
    import pyarrow as pa
    from optembed_ext.data._fast import encode_table_fast
    from optembed_ext.data.formats import PLANNERS
    plan = PLANNERS["criteo"](sys.argv[1])
    tracemalloc.start()
    encode_table_fast(plan.schema, plan.source, min_count=2, block_bytes=256 << 10, progress=False,
                      out_dir=sys.argv[2], work_dir=sys.argv[3])
    print(tracemalloc.get_traced_memory()[1] + pa.default_memory_pool().max_memory())
""")


def test_memory_does_not_grow_with_the_rows(tmp_path):
    """The same 4000 distinct rows repeated 2x and 16x: peak heap (numpy + pyarrow) stays about the same."""
    base = tmp_path / "base.txt"
    generate_raw("criteo", 4000, base, seed=13)
    data = base.read_bytes()
    peaks = []
    for reps in (2, 16):
        path = tmp_path / f"train{reps}.txt"
        path.write_bytes(data * reps)
        out = tmp_path / f"out{reps}"
        out.mkdir()
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(out), str(tmp_path / f"w{reps}")],
                           capture_output=True, text=True, check=True)
        peaks.append(int(r.stdout.strip().splitlines()[-1]))
    assert peaks[1] < 1.25 * peaks[0] + (2 << 20), peaks  # 8x the rows, not 8x the memory


def test_preprocess_command_reports_rate_and_peak_memory(tmp_path, capsys):
    from optembed_ext import cli

    raw = tmp_path / "train.txt"
    generate_raw("criteo", 3000, raw, seed=14)
    argv = ["preprocess", "--dataset", "criteo", "--data-dir", str(raw), "--cache-dir", str(tmp_path / "cache"),
            "--preset", "paper", "--no-progress"]
    assert cli.main(argv + ["--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["rows_per_second"] > 0 and 0 < metrics["peak_rss_gib"] < 64
    assert f"{metrics['rows_per_second']:,.0f} rows/s" in out and "peak RSS" in out
    assert metrics["train_size"] + metrics["val_size"] + metrics["test_size"] == 3000
    # a second run reads the cache: no rate to report
    assert cli.main(argv + ["--out", str(tmp_path / "run2")]) == 0
    assert "rows/s" not in capsys.readouterr().out


def test_lazy_splits_are_views_of_the_cache(tmp_path):
    from optembed_ext.data import load_dataset
    from optembed_ext.data.batching import MappedSplit

    raw = tmp_path / "train.txt"
    generate_raw("criteo", 2000, raw, seed=15)
    eager = load_dataset("criteo", raw, cache_dir=tmp_path / "cache", preset="paper", progress=False)
    lazy = load_dataset("criteo", raw, cache_dir=tmp_path / "cache", preset="paper", progress=False, lazy=True)
    for a, b in ((eager.train, lazy.train), (eager.val, lazy.val), (eager.test, lazy.test)):
        assert isinstance(b, MappedSplit) and not b.materialized and len(a) == len(b)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.X, b.X)
