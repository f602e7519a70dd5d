"""Evolutionary search of field dims: operators, population-batched evaluation, checkpoint/resume."""
import numpy as np
import pytest
import torch

from optembed_ext.data import make_synthetic
from optembed_ext.models import build_model
from optembed_ext.nn.optembed import OptEmbedEmbedding
from optembed_ext.search.evolution import (
    EvolutionConfig,
    EvolutionSearch,
    crossover,
    evaluate_one_at_a_time,
    evaluate_population,
    measure_speedup,
    mutate,
    next_generation,
    num_params_of,
    prefix_masks,
    rank,
)
from optembed_ext.train.metrics import roc_auc

D = 6


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_samples=3000, num_fields=5, vocab_sizes=[20, 9, 31, 4, 15], seed=3)


def _model(data, name="deepfm", seed=0):
    torch.manual_seed(seed)
    emb = OptEmbedEmbedding(data.feature_map, D)
    with torch.no_grad():
        emb.weight.normal_(0, 0.5)
        emb.threshold.fill_(1.2)  # prunes some rows: the row mask matters
    model = build_model(name, data.feature_map, emb, mlp_dims=(16, 8), cross_layers=2)
    emb.freeze(emb.row_mask())
    return model.eval()


# ----------------------------------------------------------------------------------------------- operators
def test_mutate_redraws_each_field_with_probability_m_prob():
    rng = np.random.default_rng(0)
    parent = np.full(20000, 3, dtype=np.int64)
    child = mutate(parent, 0.1, D, rng)
    assert parent.tolist() == [3] * 20000  # the parent is not modified
    assert child.min() >= 1 and child.max() <= D
    changed = (child != parent).mean()
    # a redrawn field keeps its value with probability 1/D
    assert abs(changed - 0.1 * (1 - 1 / D)) < 0.01
    assert (mutate(parent[:50], 1.0, D, rng) != 3).any()


def test_crossover_is_a_prefix_of_one_parent_and_a_suffix_of_the_other():
    rng = np.random.default_rng(1)
    a, b = np.arange(1, 8), np.arange(11, 18)
    points = set()
    for _ in range(200):
        c = crossover(a, b, rng)
        point = int(np.argmax(c > 10))
        assert 1 <= point <= 6
        np.testing.assert_array_equal(c, np.concatenate([a[:point], b[point:]]))
        points.add(point)
    assert points == set(range(1, 7))
    np.testing.assert_array_equal(crossover(a[:1], b[:1], rng), a[:1])
    with pytest.raises(ValueError, match="same shape"):
        crossover(a, b[:3], rng)


def test_next_generation_sizes_elites_and_top_k():
    rng = np.random.default_rng(2)
    pop = rng.integers(1, D + 1, size=(12, 5))
    cfg = EvolutionConfig(mutation_num=4, crossover_num=5, keep_num=2, m_prob=0.3)
    nxt = next_generation(pop, cfg, D, rng)
    assert nxt.shape == (11, 5) and nxt.dtype == np.int64
    np.testing.assert_array_equal(nxt[:2], pop[:2])
    assert nxt.min() >= 1 and nxt.max() <= D
    # top_k = 1: every crossover of the best with itself is the best; mutants differ from it only where redrawn
    cfg1 = EvolutionConfig(mutation_num=6, crossover_num=3, keep_num=0, m_prob=0.2, top_k=1)
    nxt1 = next_generation(pop, cfg1, D, rng)
    for row in nxt1[6:]:
        np.testing.assert_array_equal(row, pop[0])
    # without top_k (reference selection) the i-th mutant comes from the i-th best: with a tiny m_prob most are
    # unchanged copies of their parent
    cfg2 = EvolutionConfig(mutation_num=4, crossover_num=1, m_prob=1e-9)
    np.testing.assert_array_equal(next_generation(pop, cfg2, D, rng)[:4], pop[:4])


def test_rank_prefers_auc_then_fewer_params():
    order = rank([0.7, 0.8, 0.8, 0.6], [10, 30, 20, 1])
    assert order.tolist() == [2, 1, 0, 3]
    assert rank([0.8, 0.8, 0.8], [5, 5, 5], [9, 4, 7]).tolist() == [1, 2, 0]
    assert num_params_of([2, 3], [10, 100]) == 320


def test_config_validation():
    with pytest.raises(ValueError, match="m_prob"):
        EvolutionConfig(m_prob=0.0)
    with pytest.raises(ValueError, match="population is empty"):
        EvolutionConfig(mutation_num=0, crossover_num=0, keep_num=0)
    with pytest.raises(ValueError, match="top_k"):
        EvolutionConfig(top_k=0)
    with pytest.raises(ValueError, match="generations"):
        EvolutionConfig(generations=-1)


# ---------------------------------------------------------------------------------------------- evaluation
def _direct_probs(model, split, cand):
    """Independent expression: table rows x frozen row mask x prefix mask, then the backbone."""
    emb = model.embedding
    ids = torch.as_tensor(split.X)
    w = emb.weight.detach()[ids] * emb.fixed_row_mask[ids].unsqueeze(-1).float()
    w = w * (torch.arange(D) < torch.as_tensor(cand).unsqueeze(-1)).float()
    with torch.no_grad():
        return torch.sigmoid(model.predict_from_embeddings(w, ids)).double().numpy()


@pytest.mark.parametrize("name", ["deepfm", "fm", "dcn"])
def test_population_batched_equals_one_at_a_time(data, name):
    model = _model(data, name)
    rng = np.random.default_rng(4)
    cands = rng.integers(1, D + 1, size=(7, 5))
    cands[0] = D
    # odd batch sizes and a stack limit that splits the population into uneven chunks
    batched = evaluate_population(model, data.val, cands, batch_size=97, max_stack_rows=97 * 3)
    single = evaluate_one_at_a_time(model, data.val, cands, batch_size=130)
    np.testing.assert_allclose(batched["probs"], single["probs"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched["auc"], single["auc"], rtol=0, atol=1e-6)
    y = np.asarray(data.val.y, dtype=np.float64)
    for i in (0, 3, 6):
        direct = _direct_probs(model, data.val, cands[i])
        np.testing.assert_allclose(batched["probs"][i], direct, rtol=1e-5, atol=1e-6)
        assert batched["auc"][i] == pytest.approx(roc_auc(y, direct), abs=1e-6)
    # the candidates differ: not every AUC is the same
    assert np.ptp(batched["auc"]) > 0
    # the embedding's own state is untouched
    assert model.embedding.dims is None and model.embedding.fixed_field_dims is None


def test_population_evaluation_keeps_frozen_field_dims(data):
    model = _model(data)
    model.embedding.freeze(model.embedding.fixed_row_mask, [1, 2, 3, 4, 5])
    cands = np.array([[D] * 5, [2] * 5])
    batched = evaluate_population(model, data.val, cands, batch_size=500)
    np.testing.assert_allclose(batched["probs"][1], _direct_probs(model, data.val, cands[1]), rtol=1e-5, atol=1e-6)
    assert model.embedding.field_dims() == [1, 2, 3, 4, 5]


def test_prefix_masks():
    m = prefix_masks(torch.tensor([[1, 3]]), 4)
    assert m.tolist() == [[[1, 0, 0, 0], [1, 1, 1, 0]]]


def test_measure_speedup_reports_equal_results(data):
    sp = measure_speedup(_model(data), data.val, 6, batch_size=256)
    assert sp["candidates"] == 6 and sp["samples"] == len(data.val)
    assert sp["batched_seconds"] > 0 and sp["one_at_a_time_seconds"] > 0
    assert sp["max_auc_diff"] < 1e-6 and sp["max_prob_diff"] < 1e-5


# ------------------------------------------------------------------------------------------------- search
class _Killed(Exception):
    pass


def test_search_resumes_after_kill_exactly(data, tmp_path, monkeypatch):
    cfg = EvolutionConfig(generations=5, mutation_num=4, crossover_num=4, keep_num=1, seed=7, eval_batch_size=400)
    ref = EvolutionSearch(_model(data), data.val, cfg, run_dir=tmp_path / "ref", log=None).run()
    assert ref["generations"] == 5 and len(ref["history"]) == 5
    # the best is the best of everything evaluated
    assert ref["best_val_auc"] == max(h["best_auc"] for h in ref["history"])
    hist = [h["best_so_far"] for h in ref["history"]]
    assert hist == sorted(hist)

    calls = {"n": 0}
    original = EvolutionSearch._save

    def killing_save(self, state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Killed  # killed before the checkpoint of generation 1 is written
        original(self, state)
        if calls["n"] == 4:
            raise _Killed  # killed right after a checkpoint

    monkeypatch.setattr(EvolutionSearch, "_save", killing_save)
    out = tmp_path / "killed"
    for _ in range(2):
        with pytest.raises(_Killed):
            EvolutionSearch(_model(data), data.val, cfg, run_dir=out, log=None).run()
    monkeypatch.setattr(EvolutionSearch, "_save", original)
    res = EvolutionSearch(_model(data), data.val, cfg, run_dir=out, log=None).run()
    assert res["best_dims"] == ref["best_dims"]
    assert res["best_val_auc"] == ref["best_val_auc"]
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(res["history"]) == strip(ref["history"])
    assert res["candidates_evaluated"] == ref["candidates_evaluated"]
    # a changed search setting cannot silently continue an old state
    with pytest.raises(ValueError, match="different evolution config"):
        EvolutionSearch(_model(data), data.val, EvolutionConfig(generations=5, mutation_num=3, crossover_num=4,
                                                                keep_num=1, seed=7), run_dir=out, log=None).run()


def test_search_finds_the_best_dim_of_the_only_field_that_matters(data, tmp_path):
    """With every row of fields 1..4 pruned only field 0's dim changes the predictions: the search must reach the
    exhaustive optimum over field 0's D choices, the smallest such dim on ties (fewest parameters), and give the
    rowless fields the smallest dims among the tied candidates it saw."""
    model = _model(data, "fm")
    emb = model.embedding
    mask = emb.field_of_row == 0
    emb.freeze(mask)
    grid = np.array([[d, 1, 1, 1, 1] for d in range(1, D + 1)])
    aucs = evaluate_population(model, data.val, grid)["auc"]
    best_d = int(rank(aucs, grid[:, 0])[0]) + 1
    cfg = EvolutionConfig(generations=6, mutation_num=6, crossover_num=6, keep_num=2, m_prob=0.3, seed=0)
    res = EvolutionSearch(model, data.val, cfg, run_dir=tmp_path, log=None).run(resume=False)
    assert res["best_val_auc"] == pytest.approx(max(aucs), abs=1e-12)
    assert res["best_dims"][0] == best_d
    assert res["num_params"] == best_d * int(mask.sum())
    seen = torch.load(tmp_path / EvolutionSearch.STATE, weights_only=False)["cache"]
    tied = [sum(c) for c, a in seen.items() if a == res["best_val_auc"] and c[0] == best_d]
    assert sum(res["best_dims"]) == min(tied)
    assert len(set(tied)) > 1  # the tie-break had something to choose from


def test_top_k_memory_draws_parents_from_the_best_of_all_generations(data, tmp_path):
    """Algorithm 1 of the paper: with top_k_memory the parents of every generation are the best top_k candidates
    evaluated so far, so the memory never gets worse and always holds the best candidate seen."""
    with pytest.raises(ValueError, match="top_k_memory needs top_k"):
        EvolutionConfig(top_k_memory=True)
    cfg = EvolutionConfig(generations=5, mutation_num=4, crossover_num=4, keep_num=1, m_prob=0.3, top_k=3,
                          top_k_memory=True, seed=3, eval_batch_size=400)
    search = EvolutionSearch(_model(data), data.val, cfg, run_dir=tmp_path, log=None)
    seen = []
    search.on_generation_end = lambda g, rec: seen.append(
        [a for _, a, _ in torch.load(tmp_path / EvolutionSearch.STATE, weights_only=False)["memory"]])
    res = search.run(resume=False)
    assert [len(m) for m in seen] == [3] * 5
    for prev, cur in zip(seen, seen[1:]):
        assert all(c >= p for c, p in zip(cur, prev))  # the k-th best so far can only improve
    assert seen[-1][0] == res["best_val_auc"]
    # without the memory the run differs (the parents are the current generation's best only)
    plain = EvolutionSearch(_model(data), data.val, EvolutionConfig(**{**cfg.__dict__, "top_k_memory": False}),
                            run_dir=tmp_path / "plain", log=None).run(resume=False)
    assert plain["history"][0]["best_auc"] == res["history"][0]["best_auc"]  # same first generation
    # the memory is part of the resumable state: a different setting cannot continue it
    with pytest.raises(ValueError, match="different evolution config"):
        EvolutionSearch(_model(data), data.val, EvolutionConfig(**{**cfg.__dict__, "top_k_memory": False}),
                        run_dir=tmp_path, log=None).run()
