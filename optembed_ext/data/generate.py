"""Raw click logs in the exact original formats, with the shape of the real data and a planted label model.

``generate_raw("criteo", rows, out)`` writes a Kaggle/dac ``train.txt`` (tab separated, no header:
label, ``I1..I13`` integers with heavy tails and empty values, ``C1..C26`` as 8-hex-digit tokens);
``generate_raw("avazu", rows, out)`` the Avazu ``train`` CSV (its header, 24 columns). Both stream in
chunks of numpy-vectorised rows (memory bounded by one chunk, whatever the row count) and are seeded:
the same ``seed`` and ``chunk_rows`` give the same bytes.

Value model (per categorical field). The values of a field are a *head* of ``K`` values drawn with
Zipf-like (continuous power-law, exponent ``s``) frequencies plus, with probability ``p``, a *singleton*:
a value unique to its row (real click logs are full of ids seen once). Tokens are a bijective 32-bit
mix of (field, rank), so two ranks never share a token. ``K``, ``s`` and ``p`` are calibrated (with the
expected Poisson counts, at the reference size of the real file -- 45,840,617 Criteo rows, 40,428,967
Avazu rows) so that the field has its published raw vocabulary size and the whole table, with values
seen fewer than 2 times mapped to OOV, about the published number of features (Criteo 6.8e6, Avazu
4.4e6; the OptEmbed paper's Table 1). A smaller file keeps these frequencies, so its vocabularies are
smaller, as a prefix of the real file's would be.

Label model. ``logit = bias + sum_f w_f(value)``: only the *informative* fields carry weights, and in
them only the ``useful`` most frequent ranks (rarer values and singletons weigh 0); the other fields
are pure noise. :func:`planted_model` describes it (JSON-ready), so a pruning method can be checked
against the truth: useless fields and rare rows should be pruned.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CRITEO_VOCAB", "CRITEO_ROWS", "AVAZU_ROWS", "FieldModel", "field_models", "planted_model",
           "generate_raw", "expected_vocabulary"]

#: raw per-field vocabulary sizes of C1..C26 in the Kaggle Criteo ``train.txt``
CRITEO_VOCAB = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
CRITEO_ROWS = 45_840_617
CRITEO_PAPER_FEATURES = 6_800_000
AVAZU_ROWS = 40_428_967
AVAZU_PAPER_FEATURES = 4_400_000
# share of empty values per field, as in the Kaggle file (rounded)
_CRITEO_INT_EMPTY = [0.45, 0.0, 0.21, 0.22, 0.026, 0.22, 0.04, 0.0005, 0.04, 0.45, 0.04, 0.77, 0.22]
_CRITEO_CAT_EMPTY = [0.0, 0.0, 0.034, 0.034, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.034, 0.0, 0.0, 0.0, 0.034, 0.0,
                     0.0, 0.44, 0.44, 0.034, 0.76, 0.0, 0.034, 0.44, 0.44]
# log-normal parameters (mu, sigma) of the integer fields: heavy tails, many small counts
_CRITEO_INT_SHAPE = [(0.5, 1.5), (1.0, 2.0), (1.8, 1.6), (1.5, 1.2), (7.5, 2.5), (3.5, 2.2), (1.5, 1.6), (2.3, 1.2),
                     (3.5, 1.6), (0.3, 0.8), (1.0, 1.2), (0.2, 1.0), (1.5, 1.3)]
# planted signal: informative fields (0-based among C1..C26 / I1..I13) and how many head ranks carry weight
_CRITEO_INFORMATIVE_CAT = {0: 200, 1: 200, 3: 20000, 5: 24, 7: 300, 10: 2000, 12: 1500, 13: 27, 15: 20000,
                           16: 10, 18: 1000, 22: 15}
_CRITEO_INFORMATIVE_INT = (0, 2, 5, 6, 10, 12)


@dataclass
class FieldModel:
    """One categorical column: ``K`` head values with power-law exponent ``s``, singleton probability ``p``,
    empty probability ``empty``; ``useful`` head ranks carry label weight (0 for a noise field)."""

    name: str
    vocab: int
    K: int
    s: float
    p: float
    empty: float = 0.0
    useful: int = 0
    weight_scale: float = 0.0
    salt: int = 0
    kind: str = "hex"            # "hex": 8 hex digits; "int": the rank mapped to one of ``values``
    values: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# the power law: continuous density on [1, K + 1), rank = floor(x)


def _pow_cdf(x, K: int, s: float):
    if abs(s - 1.0) < 1e-9:
        return np.log(x) / math.log(K + 1)
    return (np.power(x, 1.0 - s) - 1.0) / ((K + 1.0) ** (1.0 - s) - 1.0)


def _head_probs(K: int, s: float) -> np.ndarray:
    k = np.arange(1, K + 2, dtype=np.float64)
    return np.diff(_pow_cdf(k, K, s))


def _sample_ranks(u: np.ndarray, K: int, s: float) -> np.ndarray:
    """Ranks 1..K from uniforms ``u`` (inverse CDF of the continuous power law)."""
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * math.log(K + 1))
    else:
        a = (K + 1.0) ** (1.0 - s) - 1.0
        x = np.power(1.0 + u * a, 1.0 / (1.0 - s))
    return np.minimum(np.floor(x).astype(np.int64), K)


def _expected(K: int, s: float, p: float, rows: int, probs: np.ndarray | None = None) -> tuple[float, float]:
    """Expected distinct values and values seen at least twice in ``rows`` non-empty draws."""
    q = _head_probs(K, s) if probs is None else probs
    lam = rows * (1.0 - p) * q
    e = np.exp(-lam)
    return float(p * rows + np.sum(1.0 - e)), float(np.sum(1.0 - e * (1.0 + lam)))


def _calibrate(vocab: int, target2: float, rows: int) -> tuple[int, float, float]:
    """``(K, s, p)`` with about ``vocab`` distinct values and ``target2`` values seen twice or more in ``rows``."""
    for s in (1.05, 0.95, 0.85, 0.75, 0.6, 0.4, 0.2):
        lo, hi = max(1, int(target2)), vocab
        best = None
        for _ in range(40):  # bisection on K; p makes the distinct count match
            K = (lo + hi) // 2
            q = _head_probs(K, s)
            p = 0.0
            for _ in range(4):
                d, _ = _expected(K, s, p, rows, q)
                p = min(0.9, max(0.0, p + (vocab - d) / rows))
            d, two = _expected(K, s, p, rows, q)
            best = (K, s, p)
            if two < target2:
                lo = K + 1
            else:
                hi = K
            if lo >= hi:
                break
        K, s, p = best
        d, two = _expected(K, s, p, rows)
        if abs(two - target2) <= 0.03 * target2 and abs(d - vocab) <= 0.03 * vocab:
            return K, s, p
    return best


def _small_field(name, vocab, rows, empty, salt, **kw) -> FieldModel:
    """A field whose values all recur: head only, the flattest exponent that still reads like a power law
    and keeps the rarest value expected at least ~3 times at the reference size."""
    for s in (1.1, 1.0, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0):
        q = _head_probs(vocab, s)
        if rows * (1 - empty) * q[-1] >= 3 or s == 0.0:
            return FieldModel(name, vocab, vocab, s, 0.0, empty, salt=salt, **kw)
    raise AssertionError  # pragma: no cover


def field_models(fmt: str) -> list[FieldModel]:
    """The categorical columns of ``fmt`` (``criteo``: C1..C26; ``avazu``: its 21 feature columns) calibrated
    at the reference row count (the large fields' parameters are precomputed in :data:`CALIBRATED`)."""
    if fmt not in _MODELS:
        _MODELS[fmt] = _build_models(fmt)
    return _MODELS[fmt]


_MODELS: dict[str, list[FieldModel]] = {}
_BIG = 200_000
#: ``(K, s, p)`` of the large fields as :func:`_calibrate` finds them at the reference size (minutes of
#: bisection; ``tests/test_generate.py`` checks the expected counts these give)
CALIBRATED = {
    "criteo": {"C3": (2803802, 0.95, 0.172284), "C4": (430556, 1.05, 0.040023), "C12": (1920606, 0.95, 0.147132),
               "C16": (1399793, 1.05, 0.094309), "C21": (2910354, 1.05, 0.110688), "C24": (55700, 1.05, 0.005205)},
    "avazu": {"device_id": (2073939, 1.05, 0.023853), "device_ip": (4127858, 0.85, 0.072526)},
}


def _build_models(fmt: str) -> list[FieldModel]:
    if fmt == "criteo":
        names = [f"C{i}" for i in range(1, 27)]
        vocabs, empties, rows, target = CRITEO_VOCAB, _CRITEO_CAT_EMPTY, CRITEO_ROWS, CRITEO_PAPER_FEATURES
        informative = _CRITEO_INFORMATIVE_CAT
        kinds = [("hex", [])] * 26
        target -= 600  # the integer fields' buckets
    elif fmt == "avazu":
        names, vocabs, empties, kinds, informative = zip(*_AVAZU_COLUMNS)
        rows, target = AVAZU_ROWS, AVAZU_PAPER_FEATURES - 24 - 7
        informative = {i: u for i, u in enumerate(informative) if u}
    else:
        raise ValueError(f"format must be 'criteo' or 'avazu', got {fmt!r}")
    big = [i for i, v in enumerate(vocabs) if v > _BIG]
    small = [i for i in range(len(vocabs)) if i not in big]
    small_total = sum(vocabs[i] for i in small)
    share = (target - small_total) / sum(vocabs[i] for i in big)
    models = []
    for i, (name, vocab, empty) in enumerate(zip(names, vocabs, empties)):
        kind, values = kinds[i]
        salt = (0x9E3779B1 * (i + 1) + (7 if fmt == "avazu" else 0)) & 0xFFFFFFFF
        kw = {"kind": kind, "values": list(values)}
        if i in big:
            K, s, p = CALIBRATED[fmt].get(name) or _calibrate(vocab, share * vocab, int(rows * (1 - empty)))
            m = FieldModel(name, vocab, K, s, p, empty, salt=salt, **kw)
        else:
            m = _small_field(name, vocab, rows, empty, salt, **kw)
        if i in informative:
            m.useful = min(informative[i], m.K)
            m.weight_scale = 0.6
        models.append(m)
    return models


def expected_vocabulary(fmt: str, rows: int, min_count: int = 2) -> dict[str, Any]:
    """Expected raw distinct values and values seen at least ``min_count`` (1 or 2) times per categorical
    field in a file of ``rows`` rows (Poisson approximation); ``total_raw``, ``total_min_count``."""
    if min_count not in (1, 2):
        raise ValueError("min_count must be 1 or 2")
    per = {}
    for m in field_models(fmt):
        d, two = _expected(m.K, m.s, m.p, int(rows * (1 - m.empty)))
        per[m.name] = {"raw": d, "min_count": d if min_count == 1 else two}
    return {"fields": per, "total_raw": sum(v["raw"] for v in per.values()),
            "total_min_count": sum(v["min_count"] for v in per.values())}


# ---------------------------------------------------------------------------------------------
# hashing and vectorised formatting


def _mix32(x: np.ndarray, salt: int) -> np.ndarray:
    """A bijection of uint32 (xor with ``salt``, then the murmur3 finaliser)."""
    h = (x.astype(np.uint64) ^ np.uint64(salt)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    return h


def _signed_unit(x: np.ndarray, salt: int) -> np.ndarray:
    """A deterministic value in [-1, 1) per integer of ``x``."""
    return _mix32(_mix32(x, salt), 0x27D4EB2F).astype(np.float64) / 2.0**31 - 1.0


_HEX2 = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), dtype=np.uint16)


def _hex_column(h: np.ndarray, present: np.ndarray):
    """Arrow string column of the 8-hex-digit tokens of uint32 ``h`` (null where not ``present``)."""
    import pyarrow as pa

    n = len(h)
    text = _HEX2[h.astype(">u4").view(np.uint8)].tobytes()  # two ASCII digits per byte, most significant first
    offsets = np.arange(0, 8 * n + 1, 8, dtype=np.int32)
    valid = None if present.all() else pa.py_buffer(np.packbits(present, bitorder="little").tobytes())
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text), valid)


def _int_column(v: np.ndarray, present: np.ndarray | None = None):
    import pyarrow as pa

    return pa.array(v, mask=None if present is None or present.all() else ~present)


def _write(table, f, delimiter: str) -> None:
    import pyarrow.csv as pcsv

    pcsv.write_csv(table, f, pcsv.WriteOptions(include_header=False, delimiter=delimiter, quoting_style="none",
                                                batch_size=1 << 16))


# ---------------------------------------------------------------------------------------------
# Criteo


def _cat_values(m: FieldModel, rng: np.random.Generator, n: int, row0: int):
    """Ranks (1..K head, K+1.. singletons, 0 empty) of ``n`` rows starting at global row ``row0``."""
    u = rng.random(n)
    ranks = _sample_ranks(rng.random(n), m.K, m.s) if m.K > 0 else np.ones(n, dtype=np.int64)
    if m.p > 0:
        single = u < m.p
        ranks = np.where(single, m.K + 1 + row0 + np.arange(n, dtype=np.int64), ranks)
    if m.empty > 0:
        ranks = np.where(rng.random(n) < m.empty, 0, ranks)
    return ranks


def _cat_weight(m: FieldModel, ranks: np.ndarray) -> np.ndarray:
    if not m.useful:
        return np.zeros(len(ranks))
    useful = (ranks >= 1) & (ranks <= m.useful)
    return np.where(useful, m.weight_scale * _signed_unit(ranks, m.salt), 0.0)


def _criteo_chunk(rng: np.random.Generator, n: int, row0: int, models: list[FieldModel], bias: float):
    import pyarrow as pa

    logit = np.full(n, bias)
    columns, names = [None], ["label"]
    for j, ((mu, sigma), empty) in enumerate(zip(_CRITEO_INT_SHAPE, _CRITEO_INT_EMPTY)):
        v = np.floor(np.exp(mu + sigma * rng.standard_normal(n)) - 1.0).astype(np.int64)
        if j == 1:  # I2 holds a few negative values (-1, -2, -3) as in the Kaggle file
            v = np.where(rng.random(n) < 0.1, -rng.integers(1, 4, n), v)
        v = np.minimum(v, 2_000_000_000)
        present = rng.random(n) >= empty if empty > 0 else np.ones(n, dtype=bool)
        if j in _CRITEO_INFORMATIVE_INT:
            bucket = np.where(v > 2, np.floor(np.log(np.maximum(v, 1)) ** 2), v + 10).astype(np.int64)
            logit += np.where(present, 0.4 * _signed_unit(bucket + 100, 977 * (j + 1)), 0.0)
        columns.append(_int_column(v, present))
        names.append(f"I{j + 1}")
    for m in models:
        ranks = _cat_values(m, rng, n, row0)
        logit += _cat_weight(m, ranks)
        columns.append(_hex_column(_mix32(ranks, m.salt), ranks > 0))
        names.append(m.name)
    columns[0] = _int_column((rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8))
    return pa.table(columns, names=names)


# ---------------------------------------------------------------------------------------------
# Avazu: (name, raw vocabulary, empty share, (kind, values), useful head ranks)

_AVAZU_C1 = [1005, 1002, 1010, 1012, 1007, 1001, 1008]
_AVAZU_COLUMNS = [
    ("C1", 7, 0.0, ("int", _AVAZU_C1), 7), ("banner_pos", 7, 0.0, ("int", [0, 1, 7, 2, 4, 5, 3]), 7),
    ("site_id", 4737, 0.0, ("hex", []), 500), ("site_domain", 7745, 0.0, ("hex", []), 0),
    ("site_category", 26, 0.0, ("hex", []), 26), ("app_id", 8552, 0.0, ("hex", []), 500),
    ("app_domain", 559, 0.0, ("hex", []), 0), ("app_category", 36, 0.0, ("hex", []), 36),
    ("device_id", 2686408, 0.0, ("hex", []), 0), ("device_ip", 6729486, 0.0, ("hex", []), 0),
    ("device_model", 8251, 0.0, ("hex", []), 1000), ("device_type", 5, 0.0, ("int", [1, 0, 4, 5, 2]), 5),
    ("device_conn_type", 4, 0.0, ("int", [0, 2, 3, 5]), 4), ("C14", 2626, 0.0, ("int", []), 800),
    ("C15", 8, 0.0, ("int", [320, 300, 216, 728, 120, 1024, 480, 768]), 0),
    ("C16", 9, 0.0, ("int", [50, 250, 36, 480, 90, 20, 768, 320, 1024]), 9),
    ("C17", 435, 0.0, ("int", []), 0), ("C18", 4, 0.0, ("int", [0, 3, 2, 1]), 4),
    ("C19", 68, 0.0, ("int", []), 0), ("C20", 172, 0.0, ("int", []), 100), ("C21", 60, 0.0, ("int", []), 0),
]
AVAZU_HEADER = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
                "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
                "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]


def _avazu_int_value(m: FieldModel, ranks: np.ndarray) -> np.ndarray:
    if m.values:
        return np.asarray(m.values, dtype=np.int64)[np.clip(ranks, 1, len(m.values)) - 1]
    if m.name == "C20":  # -1 is C20's most frequent value, the others 100000..
        return np.where(ranks == 1, -1, 100000 + (_mix32(ranks, m.salt) % np.uint64(200000)).astype(np.int64))
    return (_mix32(ranks, m.salt) % np.uint64(30000)).astype(np.int64)


def _avazu_chunk(rng: np.random.Generator, n: int, row0: int, models: list[FieldModel], bias: float):
    import pyarrow as pa

    logit = np.full(n, bias)
    ids = rng.integers(1, 2**63 - 1, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)  # up to 20 digits
    # hour: 10 days 2014-10-21..30, busier in the day; the hour of day carries some signal
    day = rng.integers(21, 31, n)
    hod = np.minimum(np.floor(24 * rng.beta(2.2, 1.8, n)), 23).astype(np.int64)
    logit += 0.3 * np.sin(hod / 24.0 * 2 * np.pi)
    columns = [_int_column(ids), None, _int_column(14100000 + day * 100 + hod)]
    for m in models:
        ranks = _cat_values(m, rng, n, row0)
        logit += _cat_weight(m, ranks)
        if m.kind == "hex":
            columns.append(_hex_column(_mix32(ranks, m.salt), ranks > 0))
        else:
            columns.append(_int_column(_avazu_int_value(m, ranks)))
    columns[1] = _int_column((rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8))
    return pa.table(columns, names=AVAZU_HEADER)


# ---------------------------------------------------------------------------------------------


_BIAS = {"criteo": -1.1, "avazu": -2.2}  # about 25.6% (Criteo) and 17% (Avazu) clicks


def planted_model(fmt: str) -> dict[str, Any]:
    """JSON-ready description of the label model and the value model of ``fmt``: informative and noise
    fields, useful head ranks (their tokens are the field's most frequent), calibrated ``K``, ``s``, ``p``."""
    models = field_models(fmt)
    cat = [{"name": m.name, "raw_vocab": m.vocab, "K": m.K, "s": m.s, "p_singleton": m.p, "empty": m.empty,
            "useful_ranks": m.useful} for m in models]
    if fmt == "criteo":
        ints = [f"I{j + 1}" for j in range(13)]
        informative = [ints[j] for j in _CRITEO_INFORMATIVE_INT] + [m.name for m in models if m.useful]
        fields = ints + [m.name for m in models]
    else:
        informative = ["hour"] + [m.name for m in models if m.useful]
        fields = ["hour"] + [m.name for m in models]
    return {"format": fmt, "bias": _BIAS[fmt], "informative_fields": informative,
            "noise_fields": [f for f in fields if f not in informative], "categorical": cat}


def generate_raw(fmt: str, rows: int, out, *, seed: int = 0, chunk_rows: int = 250_000,
                 on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``rows`` rows of ``fmt`` (``"criteo"`` or ``"avazu"``) to ``out``; returns ``{"rows", "bytes",
    "planted"}``. ``on_progress(rows_written)`` is called after every chunk."""
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
        raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    models = field_models(fmt)
    out = Path(out)
    with open(out, "wb", buffering=16 << 20) as f:
        if fmt == "avazu":
            f.write((",".join(AVAZU_HEADER) + "\n").encode())
        for c, row0 in enumerate(range(0, int(rows), chunk_rows)):
            n = min(chunk_rows, int(rows) - row0)
            rng = np.random.default_rng([seed, c])
            if fmt == "criteo":
                _write(_criteo_chunk(rng, n, row0, models, _BIAS[fmt]), f, "\t")
            else:
                _write(_avazu_chunk(rng, n, row0, models, _BIAS[fmt]), f, ",")
            if on_progress is not None:
                on_progress(n)
    return {"rows": int(rows), "bytes": out.stat().st_size, "planted": planted_model(fmt)}
