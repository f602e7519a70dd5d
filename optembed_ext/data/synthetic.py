"""Synthetic CTR data with a planted, known structure.

Ids of every field are Zipf distributed (probability of the rank-``r`` id proportional to
``(r + 1) ** -zipf_alpha``; ranks are mapped to local ids by a random permutation so the id value
says nothing). A subset of *informative* fields carries signal, the other fields are *noise*.
Within an informative field only the *useful rows* carry a weight ``w ~ N(0, signal_scale^2)``;
every other row weighs 0. The label of a sample is drawn from ``sigmoid(bias + sum_f w[x_f])``.

That first-order signal needs one number per useful row, so a dimension search has nothing to find. With
``interaction_strength > 0`` every useful row of informative field ``f`` also gets a planted vector
``v_r`` whose first ``r_f`` entries are ``N(0, 1)`` and the rest 0 (``r_f`` = the field's *interaction rank*), and
the logit gains the pairwise (FM-like) term ``interaction_strength / sqrt(P) * sum_{f<g} <v_{x_f}, v_{x_g}> /
sqrt(min(r_f, r_g))`` over the ``P`` pairs of informative fields: each pair adds unit-variance signal, field ``f``
needs about ``r_f`` embedding dimensions to express it, noise fields and non-useful rows need none.

Useful rows are drawn among each informative field's most frequent ids (its top
``2 * n_useful`` ranks), so they occur often enough to be learnable; ``info`` returns them as
global ids, with the planted weights and the true logit of every split, so a test can check that
a search method keeps informative fields / useful rows and prunes the rest.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .batching import make_splits
from .types import CTRDataset, FeatureMap

__all__ = ["make_synthetic", "CRITEO_LIKE_VOCAB", "PRESETS"]

# Criteo cardinalities after min_count=10 preprocessing, order I1..I13, C1..C26 (approximate).
CRITEO_LIKE_VOCAB = [
    48, 100, 99, 51, 221, 107, 82, 73, 96, 11, 33, 55, 76,
    1445, 555, 175781, 128509, 306, 19, 11932, 631, 4, 39976, 5160, 147434, 3175, 28, 11042, 135790, 11,
    4558, 2003, 5, 160130, 18, 16, 59896, 88, 43365,
]

# Informative fields of the Criteo-shaped presets: 4 integer and 8 categorical fields; the other 27 are noise.
CRITEO_INFORMATIVE = [0, 4, 7, 10, 13, 14, 17, 19, 22, 25, 29, 36]
# Interaction ranks of the informative fields in ``preset="criteo_interactions"`` (dims each field needs).
CRITEO_INTERACTION_RANKS = [2, 8, 4, 2, 12, 4, 8, 2, 12, 4, 8, 2]

#: named presets: ``criteo`` (39 Criteo-like fields, first-order signal) and ``criteo_interactions`` (the same
#: fields, vocabularies capped at 10,000, plus planted pairwise interactions of different ranks)
PRESETS = ("criteo", "criteo_interactions")


def _as_list(value, n: int, name: str, cast) -> list:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return [cast(value)] * n
    out = [cast(v) for v in value]
    if len(out) != n:
        raise ValueError(f"{name} must have num_fields={n} entries, got {len(out)}")
    return out


def make_synthetic(
    num_samples: int = 20000,
    num_fields: int = 8,
    vocab_sizes: int | Sequence[int] = 100,
    informative_fields: Sequence[int] | None = None,
    seed: int = 0,
    *,
    preset: str | None = None,
    max_vocab: int | None = None,
    zipf_alpha: float = 1.1,
    useful_fraction: float = 0.2,
    signal_scale: float = 1.5,
    bias: float = -1.0,
    split: str = "random",
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    interaction_strength: float | None = None,
    interaction_rank: int | Sequence[int] | None = None,
) -> CTRDataset:
    """Generate a planted-signal CTR dataset (numpy vectorised).

    ``vocab_sizes``: one int for all fields or one per field. ``informative_fields``: field
    indices carrying signal (default: the first ``ceil(num_fields / 2)``). ``preset="criteo"``:
    39 fields named ``I1..I13, C1..C26`` with Criteo-like cardinalities (:data:`CRITEO_LIKE_VOCAB`,
    capped at ``max_vocab`` when given; ``num_fields``/``vocab_sizes`` are then ignored) and,
    unless given, informative fields = 4 integer and 8 categorical fields.
    ``preset="criteo_interactions"``: the same 39 fields with vocabularies capped at
    ``max_vocab`` (default 10,000), ``interaction_strength`` 2 and interaction ranks
    2..12 (:data:`CRITEO_INTERACTION_RANKS`) unless given. ``useful_fraction``: share of an
    informative field's rows that carry a weight. ``seed`` drives the generator and the random
    split.

    ``interaction_strength`` (default 0 = first-order labels only, the data of earlier versions
    bit for bit): scale of the planted pairwise interactions among the informative fields (see the
    module docstring). ``interaction_rank``: one int for every informative field or one per
    informative field (default 4): the number of non-zero entries of its planted vectors.

    ``info``: ``informative_fields``, ``noise_fields`` (sorted field indices), ``useful_rows``
    (sorted int64 global ids), ``row_weights`` (float32 (N,) planted weight per global row),
    ``bias``, ``true_logit_train/val/test`` (float32 planted logits of each split's rows),
    ``zipf_alpha``, ``seed``, ``interaction_strength`` and ``interaction_ranks`` (per field, 0 for
    fields without interactions); with interactions also ``interaction_vectors`` (float32
    ``(N, max rank)`` planted vectors, zero rows outside the useful rows).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not 0.0 < useful_fraction <= 1.0:
        raise ValueError(f"useful_fraction must be in (0, 1], got {useful_fraction!r}")
    if not zipf_alpha > 0:
        raise ValueError(f"zipf_alpha must be > 0, got {zipf_alpha!r}")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be None or one of {PRESETS}, got {preset!r}")
        num_fields = 39
        sizes = list(CRITEO_LIKE_VOCAB)
        names = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
        if informative_fields is None:
            informative_fields = list(CRITEO_INFORMATIVE)
            if preset == "criteo_interactions" and interaction_rank is None:
                interaction_rank = list(CRITEO_INTERACTION_RANKS)
        if preset == "criteo_interactions":
            max_vocab = 10000 if max_vocab is None else max_vocab
            interaction_strength = 2.0 if interaction_strength is None else interaction_strength
    else:
        if isinstance(num_fields, bool) or not isinstance(num_fields, (int, np.integer)) or num_fields < 1:
            raise ValueError(f"num_fields must be a positive integer, got {num_fields!r}")
        num_fields = int(num_fields)
        sizes = _as_list(vocab_sizes, num_fields, "vocab_sizes", int)
        names = [f"f{i}" for i in range(num_fields)]
        if informative_fields is None:
            informative_fields = list(range((num_fields + 1) // 2))
    if max_vocab is not None:
        if int(max_vocab) < 2:
            raise ValueError(f"max_vocab must be >= 2, got {max_vocab!r}")
        sizes = [min(s, int(max_vocab)) for s in sizes]
    if any(s < 2 for s in sizes):
        raise ValueError(f"vocab_sizes must all be >= 2, got {sizes}")
    informative = sorted({int(f) for f in informative_fields})
    if any(f < 0 or f >= num_fields for f in informative):
        raise ValueError(f"informative_fields must be field indices in [0, {num_fields}), got {list(informative_fields)}")
    noise = [f for f in range(num_fields) if f not in informative]
    strength = 0.0 if interaction_strength is None else interaction_strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)) \
            or not np.isfinite(strength) or strength < 0:
        raise ValueError(f"interaction_strength must be a non-negative number, got {interaction_strength!r}")
    strength = float(strength)
    if interaction_rank is None:
        interaction_rank = 4
    if isinstance(interaction_rank, (int, np.integer)) and not isinstance(interaction_rank, bool):
        inter_ranks = [int(interaction_rank)] * len(informative)
    else:
        inter_ranks = [int(r) for r in interaction_rank]
        if len(inter_ranks) != len(informative):
            raise ValueError(f"interaction_rank must be one int or one per informative field "
                             f"({len(informative)}), got {len(inter_ranks)} values")
    if any(r < 1 for r in inter_ranks):
        raise ValueError(f"interaction_rank must be positive, got {inter_ranks}")

    rng = np.random.default_rng(seed)
    fmap = FeatureMap("synthetic" if preset is None else f"synthetic-{preset}", names, sizes)
    offsets = np.asarray(fmap.offsets, dtype=np.int64)
    X = np.empty((num_samples, num_fields), dtype=np.int64)
    weights = np.zeros(fmap.num_features, dtype=np.float32)
    useful = []
    for f, V in enumerate(sizes):
        p = (np.arange(1, V + 1, dtype=np.float64)) ** (-float(zipf_alpha))
        p /= p.sum()
        ranks = rng.choice(V, size=num_samples, p=p)
        rank_to_id = rng.permutation(V)
        X[:, f] = rank_to_id[ranks] + offsets[f]
        if f in informative:
            k = max(1, int(round(useful_fraction * V)))
            head = rank_to_id[: min(V, 2 * k)]
            rows = np.sort(rng.choice(head, size=k, replace=False)) + offsets[f]
            weights[rows] = rng.normal(0.0, signal_scale, size=k).astype(np.float32)
            useful.append(rows)
    logit = (bias + weights[X].sum(axis=1)).astype(np.float32)
    field_ranks = [0] * num_fields
    vectors = None
    if strength > 0 and len(informative) >= 2:
        # A generator of its own: the ids, first-order weights and labels' uniforms stay those of strength 0.
        irng = np.random.default_rng([int(seed), 1])
        R = max(inter_ranks)
        vectors = np.zeros((fmap.num_features, R), dtype=np.float32)
        for f, r in zip(informative, inter_ranks):
            field_ranks[f] = r
            rows = useful[informative.index(f)]
            vectors[rows, :r] = irng.normal(0.0, 1.0, size=(len(rows), r))
        pairs = [(a, b) for i, a in enumerate(informative) for b in informative[i + 1:]]
        inter = np.zeros(num_samples, dtype=np.float64)
        for a, b in pairs:
            dot = (vectors[X[:, a]].astype(np.float64) * vectors[X[:, b]]).sum(axis=1)
            inter += dot / np.sqrt(min(field_ranks[a], field_ranks[b]))
        logit = (logit + strength / np.sqrt(len(pairs)) * inter).astype(np.float32)
    y = (rng.random(num_samples) < 1.0 / (1.0 + np.exp(-logit.astype(np.float64)))).astype(np.float32)

    train, val, test = make_splits(X, y, split=split, seed=seed, ratios=ratios)
    # the true logit of each split, in the split's row order
    from .batching import split_indices

    parts = split_indices(num_samples, split=split, seed=seed, ratios=ratios)
    info = {
        "informative_fields": informative,
        "noise_fields": noise,
        "useful_rows": np.sort(np.concatenate(useful)) if useful else np.zeros(0, dtype=np.int64),
        "row_weights": weights,
        "bias": float(bias),
        "true_logit_train": logit[parts[0]],
        "true_logit_val": logit[parts[1]],
        "true_logit_test": logit[parts[2]],
        "zipf_alpha": float(zipf_alpha),
        "seed": seed,
        "interaction_strength": strength,
        "interaction_ranks": field_ranks,
    }
    if vectors is not None:
        info["interaction_vectors"] = vectors
    return CTRDataset(fmap, train, val, test, info)
