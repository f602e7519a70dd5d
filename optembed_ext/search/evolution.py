"""Evolutionary search of OptEmbed's field-wise embedding dimensions on a trained supernet.

A candidate is an int64 vector ``(F,)`` of kept dimensions in ``1..D`` (a prefix mask per field). Each generation
the population is evaluated on validation data with the supernet's row mask fixed (fitness = AUC), sorted, and
the next population is ``keep_num`` elites + ``mutation_num`` mutants of the best candidates (each field redrawn
with probability ``m_prob``) + ``crossover_num`` one-point crossovers of distinct pairs of the best candidates -- the
operators and defaults of the OptEmbed reference code. Parents come from the ``top_k`` best candidates (default:
as the reference code, the ``i``-th mutant mutates the ``i``-th best and crossover pairs are drawn from the best
``crossover_num + 1``). Candidates are ranked by AUC, ties broken by fewer embedding parameters, then by a smaller
sum of dims (a field whose rows are all pruned changes neither the AUC nor the parameters, so its dimension then
goes to the smallest value seen). The most accurate candidate seen is the result.

Population evaluation is batched: one embedding lookup per validation batch is shared by all candidates, each
candidate's dimension mask is applied to it, and the interaction network runs once on the stacked
``(C * B, F, D)`` candidates (``model.predict_from_embeddings``).

Data parallel (``torchrun``): each generation's new candidates are dealt to the ranks in blocks of one stacked
forward, each rank evaluates its blocks on the whole validation split exactly as one process would, and the
fitness values are gathered; every rank then ranks, breeds and caches the same values with the same generator, so
the search returns the architecture a single process returns for the same supernet. Rank 0 writes the files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..train import distributed as dist_utils
from ..train.checkpoint import RESUME_HINT, RunFolderError, load_run_file


@dataclass
class EvolutionConfig:
    """Hyper-parameters of the search (defaults of the OptEmbed reference code, except ``generations``)."""

    generations: int = 30          # T: number of generations evaluated
    mutation_num: int = 10         # mutants per generation
    crossover_num: int = 10        # crossovers per generation
    keep_num: int = 0              # elites copied unchanged into the next generation
    m_prob: float = 0.1            # per-field mutation probability
    top_k: int | None = None       # parents drawn from the best top_k (None: the reference code's selection)
    top_k_memory: bool = False     # with top_k: the best top_k of every generation so far (the paper's Algorithm 1)
    seed: int = 0
    eval_batch_size: int = 4096    # validation ids per shared embedding lookup
    max_stack_rows: int | None = None  # (candidate, sample) rows per stacked forward; None: by device (below)
    cache: bool = True             # evaluate a candidate seen before only once

    def __post_init__(self):
        for name in ("generations", "mutation_num", "crossover_num", "keep_num", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be positive")
        if self.max_stack_rows is not None and (isinstance(self.max_stack_rows, bool) or
                                                not isinstance(self.max_stack_rows, int) or self.max_stack_rows < 1):
            raise ValueError(f"max_stack_rows must be a positive int or None, got {self.max_stack_rows!r}")
        if self.mutation_num + self.crossover_num + self.keep_num < 1:
            raise ValueError("the population is empty: mutation_num + crossover_num + keep_num must be >= 1")
        if not (0.0 < float(self.m_prob) <= 1.0):
            raise ValueError(f"m_prob must lie in (0, 1], got {self.m_prob!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_k_memory and self.top_k is None:
            raise ValueError("top_k_memory needs top_k (the size of the memory)")

    @property
    def population_size(self) -> int:
        return self.keep_num + self.mutation_num + self.crossover_num

    @classmethod
    def from_dict(cls, d: dict) -> "EvolutionConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown evolution config keys: {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------- operators
def random_candidates(num: int, num_fields: int, embed_dim: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` candidates with every field's dimension uniform in ``1..embed_dim``."""
    return rng.integers(1, embed_dim + 1, size=(num, num_fields), dtype=np.int64)


def mutate(parent: np.ndarray, m_prob: float, embed_dim: int, rng: np.random.Generator) -> np.ndarray:
    """Copy of ``parent`` with each field redrawn uniformly in ``1..embed_dim`` with probability ``m_prob``."""
    parent = np.asarray(parent, dtype=np.int64)
    child = parent.copy()
    hit = rng.random(parent.shape[0]) < m_prob
    child[hit] = rng.integers(1, embed_dim + 1, size=int(hit.sum()), dtype=np.int64)
    return child


def crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One-point crossover: ``a[:point] ++ b[point:]`` with ``point`` uniform in ``1..F-1`` (``a`` if F == 1)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if a.shape != b.shape:
        raise ValueError(f"crossover parents must have the same shape, got {a.shape} and {b.shape}")
    if a.shape[0] < 2:
        return a.copy()
    point = int(rng.integers(1, a.shape[0]))
    return np.concatenate([a[:point], b[point:]])


def next_generation(sorted_cands: np.ndarray, config: EvolutionConfig, embed_dim: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Elites + mutants + crossovers of distinct pairs among the best (``sorted_cands`` best first).

    Without ``top_k`` (the reference code): the ``i``-th mutant mutates the ``i``-th best candidate and crossover
    pairs are drawn among the best ``crossover_num + 1``. With ``top_k``: mutation parents are drawn uniformly from
    the best ``top_k`` and crossover pairs among them.
    """
    n = sorted_cands.shape[0]
    if n == 0:
        raise ValueError("sorted_cands is empty")
    top = None if config.top_k is None else min(n, config.top_k)
    out = [sorted_cands[i].copy() for i in range(min(config.keep_num, n))]
    for i in range(config.mutation_num):
        parent = i % n if top is None else int(rng.integers(top))
        out.append(mutate(sorted_cands[parent], config.m_prob, embed_dim, rng))
    pool = min(n, config.crossover_num + 1) if top is None else top
    seen: set[tuple[int, int]] = set()
    max_pairs = pool * pool
    for _ in range(config.crossover_num):
        x, y = int(rng.integers(pool)), int(rng.integers(pool))
        while (x, y) in seen and len(seen) < max_pairs:
            x, y = int(rng.integers(pool)), int(rng.integers(pool))
        seen.add((x, y))
        out.append(crossover(sorted_cands[x], sorted_cands[y], rng))
    return np.stack(out).astype(np.int64)


def rank(aucs, params, dim_sums=None) -> np.ndarray:
    """Order of candidates, best first: higher AUC, ties broken by fewer parameters, then (``dim_sums``) by a
    smaller sum of dims (a field without kept rows costs nothing whatever its dim), then by position."""
    aucs = np.asarray(aucs, dtype=np.float64)
    params = np.asarray(params, dtype=np.int64)
    keys = [np.arange(len(aucs))]
    if dim_sums is not None:
        keys.append(np.asarray(dim_sums, dtype=np.int64))
    return np.lexsort((*keys, params, -aucs))


def prefix_masks(cands: torch.Tensor, embed_dim: int, dtype=torch.float32) -> torch.Tensor:
    """``(C, F)`` dims -> ``(C, F, D)`` masks with ones on the first ``dims`` columns."""
    cols = torch.arange(embed_dim, device=cands.device)
    return (cols < cands.unsqueeze(-1)).to(dtype)


# --------------------------------------------------------------------------- evaluation
def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from ..train.metrics import roc_auc

    return float(roc_auc(y, p))


#: rows per stacked forward when ``max_stack_rows`` is None: on a GPU large stacks fill the device; on a CPU the
#: backbone's cost per row does not fall with the batch size while stacks that leave the cache make it rise, so
#: one batch of candidates' rows at a time is fastest there (the lookup is still shared by the whole population).
DEFAULT_STACK_ROWS = {"cuda": 65536}


def default_stack_rows(device, batch_size: int) -> int:
    """``max_stack_rows`` used when None: 65536 on CUDA, else ``batch_size``."""
    return DEFAULT_STACK_ROWS.get(torch.device(device).type, int(batch_size))


@torch.no_grad()
def evaluate_population(model, split, cands, *, batch_size: int = 4096, max_stack_rows: int | None = None,
                        device="cpu") -> dict:
    """Validation AUC (and predictions) of every candidate, the population batched.

    For each batch of ids the embedding is looked up once (full dimension, the model's row mask applied); the
    candidates' prefix masks are applied to it and ``model.predict_from_embeddings`` runs on the stacked
    ``(C' * B, F, D)`` tensor, ``C'`` candidates at a time so that at most ``max_stack_rows`` rows are stacked
    (at least one candidate; None: :func:`default_stack_rows`).

    Returns ``{"auc": list[float] (C,), "probs": float64 (C, n)}``.
    """
    cands = torch.as_tensor(np.asarray(cands), dtype=torch.long, device=device)
    emb_module = model.embedding
    if cands.dim() != 2 or cands.shape[1] != emb_module.num_fields:
        raise ValueError(f"cands must have shape (C, {emb_module.num_fields}), got {tuple(cands.shape)}")
    if cands.numel() and (int(cands.min()) < 1 or int(cands.max()) > emb_module.embed_dim):
        raise ValueError(f"cands must hold dims in [1, {emb_module.embed_dim}]")
    if max_stack_rows is None:
        max_stack_rows = default_stack_rows(device, batch_size)
    model.eval()
    emb_module.set_dims(None)
    num_c = cands.shape[0]
    D = emb_module.embed_dim
    masks = prefix_masks(cands, D)
    X = torch.as_tensor(split.X)
    y = np.asarray(split.y, dtype=np.float64)
    probs = np.empty((num_c, len(y)), dtype=np.float64)
    saved_dims = emb_module.fixed_field_dims if hasattr(emb_module, "fixed_field_dims") else None
    if saved_dims is not None:
        emb_module.fixed_field_dims = None
    try:
        for start in range(0, len(y), batch_size):
            ids = X[start:start + batch_size].to(device)
            B = ids.shape[0]
            emb = emb_module(ids)                                  # (B, F, D), one lookup for all candidates
            chunk = max(1, min(num_c, max_stack_rows // max(B, 1)))
            for c0 in range(0, num_c, chunk):
                m = masks[c0:c0 + chunk]                           # (C', F, D)
                c = m.shape[0]
                stacked = (emb.unsqueeze(0) * m.unsqueeze(1).to(emb.dtype)).reshape(c * B, *emb.shape[1:])
                logits = model.predict_from_embeddings(stacked, ids.repeat(c, 1))
                probs[c0:c0 + c, start:start + B] = torch.sigmoid(logits.float()).view(c, B).cpu().numpy()
    finally:
        if saved_dims is not None:
            emb_module.fixed_field_dims = saved_dims
    return {"auc": [_auc(y, probs[i]) for i in range(num_c)], "probs": probs}


@torch.no_grad()
def evaluate_one_at_a_time(model, split, cands, *, batch_size: int = 4096, device="cpu") -> dict:
    """The plain path: one full forward (lookup + network) per candidate, the candidate's dims set as the
    embedding's field dims. Same outputs as :func:`evaluate_population`."""
    cands = torch.as_tensor(np.asarray(cands), dtype=torch.long, device=device)
    model.eval()
    emb_module = model.embedding
    X = torch.as_tensor(split.X)
    y = np.asarray(split.y, dtype=np.float64)
    probs = np.empty((cands.shape[0], len(y)), dtype=np.float64)
    for i in range(cands.shape[0]):
        emb_module.set_dims(cands[i])
        try:
            for start in range(0, len(y), batch_size):
                ids = X[start:start + batch_size].to(device)
                probs[i, start:start + ids.shape[0]] = torch.sigmoid(model(ids).float()).cpu().numpy()
        finally:
            emb_module.set_dims(None)
    return {"auc": [_auc(y, probs[i]) for i in range(cands.shape[0])], "probs": probs}


def num_params_of(cand, kept_rows_per_field) -> int:
    """Embedding parameters of a candidate: sum over fields of kept rows x dims."""
    return int(np.dot(np.asarray(kept_rows_per_field, dtype=np.int64), np.asarray(cand, dtype=np.int64)))


# --------------------------------------------------------------------------- search
class EvolutionSearch:
    """Evolutionary search of the field dims on a trained supernet; checkpoints after every generation.

    Args:
        model: the supernet (a CTR model whose embedding is an :class:`~optembed_ext.nn.OptEmbedEmbedding`,
            row mask frozen by the caller).
        split: validation split (fitness).
        config: :class:`EvolutionConfig`.
        run_dir: where ``evolution_state.pt`` (after each generation) and ``evolution.json`` go; with
            ``resume`` a rerun continues after the last finished generation.
        device: device of the evaluation.
        on_generation_end: optional ``fn(generation, record)`` called after each checkpoint.
        log: ``fn(line)`` for progress lines (None: silent).
    """

    STATE = "evolution_state.pt"

    def __init__(self, model, split, config: EvolutionConfig | None = None, run_dir=None, device="cpu",
                 on_generation_end=None, log=logging.getLogger(__name__).info):
        self.model = model
        self.split = split
        self.config = config if config is not None else EvolutionConfig()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = device
        self.on_generation_end = on_generation_end
        self.log = log if log is not None else (lambda msg: None)
        emb = model.embedding
        self.num_fields = emb.num_fields
        self.embed_dim = emb.embed_dim
        self.kept_rows = emb.kept_rows_per_field() if hasattr(emb, "kept_rows_per_field") else \
            list(emb.feature_map.cardinalities)

    def _evaluate(self, cands: np.ndarray, cache: dict) -> tuple[list[float], int]:
        keys = [tuple(int(v) for v in c) for c in cands]
        todo = []
        for k in keys:
            if not (self.config.cache and k in cache) and k not in todo:
                todo.append(k)
        if todo:
            world = dist_utils.world_size()
            if world > 1:
                # deal blocks of one stacked forward round-robin, so each candidate is stacked as in one process
                stack = self.config.max_stack_rows or default_stack_rows(self.device, self.config.eval_batch_size)
                block = max(1, min(len(todo), stack // self.config.eval_batch_size))
                blocks = [todo[i:i + block] for i in range(0, len(todo), block)]
                mine = [k for b in blocks[dist_utils.rank()::world] for k in b]
            else:
                mine = todo
            aucs = []
            if mine:
                aucs = evaluate_population(self.model, self.split, np.array(mine, dtype=np.int64),
                                           batch_size=self.config.eval_batch_size,
                                           max_stack_rows=self.config.max_stack_rows, device=self.device)["auc"]
            for part in dist_utils.all_gather_objects(list(zip(mine, [float(a) for a in aucs]))):
                for k, a in part:
                    cache[tuple(k)] = a
        return [cache[k] for k in keys], len(todo)

    def _save(self, state: dict) -> None:
        if self.run_dir is None or not dist_utils.is_main():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / (self.STATE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.run_dir / self.STATE)

    def _load(self) -> dict | None:
        if self.run_dir is None or not (self.run_dir / self.STATE).exists():
            return None
        state = load_run_file(self.run_dir / self.STATE, "evolution state")
        if not isinstance(state, dict):
            raise RunFolderError(f"evolution state {self.run_dir / self.STATE} is not a mapping; {RESUME_HINT}")
        keys = ("mutation_num", "crossover_num", "keep_num", "m_prob", "top_k", "top_k_memory", "seed")
        old, new = {"top_k_memory": False, **state.get("config", {})}, asdict(self.config)
        if any(old.get(k) != new[k] for k in keys):
            # Only settings that do not change the search trajectory (generations, batch sizes) may change.
            raise RunFolderError(f"{self.run_dir / self.STATE} was written with a different evolution config: "
                                 f"{ {k: old.get(k) for k in keys} } vs { {k: new[k] for k in keys} }; {RESUME_HINT}")
        return state

    def run(self, resume: bool = True) -> dict:
        cfg = self.config
        # rank 0 reads the state and hands it to every rank, so that all continue from the same generation
        state = dist_utils.broadcast_object(self._load() if resume and dist_utils.is_main() else None)
        if state is None:
            rng = np.random.default_rng(cfg.seed)
            population = random_candidates(cfg.population_size, self.num_fields, self.embed_dim, rng)
            state = {"generation": 0, "population": population, "rng": rng.bit_generator.state, "cache": {},
                     "best": None, "history": [], "seconds": 0.0, "evaluated": 0, "config": asdict(cfg)}
        else:
            self.log(f"[evolution] resuming after generation {state['generation']}")
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        cache = state["cache"]
        while state["generation"] < cfg.generations:
            t0 = time.perf_counter()
            population = state["population"]
            aucs, n_eval = self._evaluate(population, cache)
            params = [num_params_of(c, self.kept_rows) for c in population]
            order = rank(aucs, params, population.sum(axis=1))
            population = population[order]
            aucs = [aucs[i] for i in order]
            params = [params[i] for i in order]
            best = state["best"]
            if best is None or (aucs[0], -params[0], -int(population[0].sum())) > \
                    (best["val_auc"], -best["num_params"], -int(sum(best["dims"]))):
                state["best"] = {"dims": [int(v) for v in population[0]], "val_auc": float(aucs[0]),
                                 "num_params": int(params[0]), "generation": int(state["generation"])}
            seconds = time.perf_counter() - t0
            record = {"generation": int(state["generation"]), "best_auc": float(aucs[0]),
                      "worst_auc": float(aucs[-1]), "mean_auc": float(np.mean(aucs)),
                      "best_so_far": float(state["best"]["val_auc"]), "min_params": int(min(params)),
                      "evaluated": int(n_eval), "seconds": seconds}
            state["history"].append(record)
            state["evaluated"] += n_eval
            parents = population
            if cfg.top_k_memory:
                # Algorithm 1 of the paper: parents come from the best top_k candidates of all generations so far
                memory = state.get("memory") or []
                pool = {tuple(int(v) for v in c): (a, p) for c, a, p in memory}
                for c, a, p in zip(population, aucs, params):
                    pool.setdefault(tuple(int(v) for v in c), (float(a), int(p)))
                cands = np.array(list(pool), dtype=np.int64)
                pa = [pool[tuple(c)][0] for c in cands.tolist()]
                pp = [pool[tuple(c)][1] for c in cands.tolist()]
                keep = rank(pa, pp, cands.sum(axis=1))[:cfg.top_k]
                state["memory"] = [(cands[i].tolist(), float(pa[i]), int(pp[i])) for i in keep]
                parents = cands[keep]
            state["population"] = next_generation(parents, cfg, self.embed_dim, rng)
            state["rng"] = rng.bit_generator.state
            state["generation"] += 1
            state["seconds"] += time.perf_counter() - t0
            self._save(state)
            self.log(f"[evolution] generation {record['generation']}: best {record['best_auc']:.5f} "
                     f"worst {record['worst_auc']:.5f} ({n_eval} evaluated, {seconds:.2f}s)")
            if self.on_generation_end is not None:
                self.on_generation_end(record["generation"], record)
        result = {"best_dims": state["best"]["dims"] if state["best"] else [self.embed_dim] * self.num_fields,
                  "best_val_auc": state["best"]["val_auc"] if state["best"] else float("nan"),
                  "best_generation": state["best"]["generation"] if state["best"] else -1,
                  "num_params": state["best"]["num_params"] if state["best"] else None,
                  "generations": int(state["generation"]), "history": state["history"],
                  "candidates_evaluated": int(state["evaluated"]), "seconds": float(state["seconds"])}
        if self.run_dir is not None and dist_utils.is_main():
            with open(self.run_dir / "evolution.json", "w") as f:
                json.dump(result, f, indent=1)
        return result


def measure_speedup(model, split, num_candidates: int, *, batch_size: int = 4096, max_stack_rows: int | None = None,
                    seed: int = 0, device="cpu", repeats: int = 1) -> dict:
    """Time one generation of ``num_candidates`` random candidates batched vs one at a time (after a warm-up).

    Also checks that both give the same AUC per candidate. Returns seconds (median of ``repeats``), speedup and
    the largest AUC / probability difference.
    """
    emb = model.embedding
    rng = np.random.default_rng(seed)
    cands = random_candidates(num_candidates, emb.num_fields, emb.embed_dim, rng)
    warm = cands[:1]
    evaluate_population(model, split, warm, batch_size=batch_size, max_stack_rows=max_stack_rows, device=device)
    evaluate_one_at_a_time(model, split, warm, batch_size=batch_size, device=device)
    tb, to = [], []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        rb = evaluate_population(model, split, cands, batch_size=batch_size, max_stack_rows=max_stack_rows,
                                 device=device)
        tb.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ro = evaluate_one_at_a_time(model, split, cands, batch_size=batch_size, device=device)
        to.append(time.perf_counter() - t0)
    batched, single = float(np.median(tb)), float(np.median(to))
    stack = max_stack_rows if max_stack_rows is not None else default_stack_rows(device, batch_size)
    return {"candidates": int(num_candidates), "samples": int(len(split.y)), "batch_size": int(batch_size),
            "max_stack_rows": int(stack), "batched_seconds": batched,
            "one_at_a_time_seconds": single, "speedup": single / batched if batched > 0 else math.inf,
            "max_auc_diff": float(np.max(np.abs(np.asarray(rb["auc"]) - np.asarray(ro["auc"])))),
            "max_prob_diff": float(np.max(np.abs(rb["probs"] - ro["probs"])))}
