"""Population-batched evaluation of the OptEmbed evolutionary search vs one candidate at a time.

One generation of ``--candidates`` random field-dim candidates is evaluated on a validation split of a synthetic
Criteo-shaped dataset (39 fields by default) through a frozen OptEmbed supernet:

* batched: one embedding lookup per batch shared by all candidates, per-candidate prefix masks, the backbone run
  on the stacked ``(C * B, F, D)`` tensor (``evaluate_population``);
* one at a time: a full forward (lookup + backbone) per candidate (``evaluate_one_at_a_time``).

Both are checked to give the same AUCs before timing (which also warms up); the repeats of all variants are
interleaved, and the median of ``--repeats`` timed runs and the speedup are printed (and written with ``--json``).

    python benchmarks/bench_evolution.py --models fm deepfm dcn --samples 20000 --candidates 20
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def build(model_name: str, data, embed_dim: int, mlp_dims, seed: int = 0):
    from optembed_ext.models import build_model
    from optembed_ext.nn.optembed import OptEmbedEmbedding

    torch.manual_seed(seed)
    emb = OptEmbedEmbedding(data.feature_map, embed_dim)
    with torch.no_grad():
        emb.weight.normal_(0, 0.05)
        emb.threshold.fill_(0.03 * embed_dim)  # prunes part of the rows, as a trained supernet does
    model = build_model(model_name, data.feature_map, emb, mlp_dims=tuple(mlp_dims))
    emb.freeze(emb.row_mask())
    return model.eval()


def time_it(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    from optembed_ext.data import make_synthetic
    from optembed_ext.search.evolution import evaluate_one_at_a_time, evaluate_population, random_candidates

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["fm", "deepfm", "dcn"])
    p.add_argument("--samples", type=int, default=20000, help="validation samples per generation")
    p.add_argument("--candidates", type=int, default=20, help="population size (10 mutations + 10 crossovers)")
    p.add_argument("--embed-dim", type=int, default=16)
    p.add_argument("--mlp-dims", type=int, nargs="+", default=[1024, 512, 256])
    p.add_argument("--max-vocab", type=int, default=20000, help="cap of the Criteo-like field cardinalities")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--max-stack-rows", nargs="+", default=["auto", "65536"],
                   help="stacked rows per backbone call to time ('auto': the device default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    # the validation split is all we evaluate on: make it the requested size
    data = make_synthetic(num_samples=args.samples * 10, preset="criteo", max_vocab=args.max_vocab, seed=0)
    split = data.val
    cands = random_candidates(args.candidates, data.feature_map.num_fields, args.embed_dim,
                              np.random.default_rng(0))
    rows = []
    print(f"{data.feature_map.num_fields} fields, {data.feature_map.num_features} rows, D={args.embed_dim}, "
          f"{len(split)} validation samples, {args.candidates} candidates, {torch.get_num_threads()} threads")
    stacks = [None if s == "auto" else int(s) for s in args.max_stack_rows]
    print(f"{'model':8s} {'stack rows':>10s} {'batched s':>10s} {'one-at-a-time s':>16s} {'speedup':>8s} "
          f"{'max |dAUC|':>11s}")
    for name in args.models:
        model = build(name, data, args.embed_dim, args.mlp_dims)
        kw = dict(batch_size=args.batch_size)
        ro = evaluate_one_at_a_time(model, split, cands, **kw)  # warm-up + reference AUCs
        diffs = {}
        for stack in stacks:
            # correctness first (and warm-up)
            rb = evaluate_population(model, split, cands, max_stack_rows=stack, **kw)
            diff = diffs[stack] = float(np.max(np.abs(np.asarray(rb["auc"]) - np.asarray(ro["auc"]))))
            if diff > 1e-6:
                raise AssertionError(f"{name}: batched and one-at-a-time AUCs differ by {diff}")
        # interleaved repeats, so that a changing machine load hits every variant alike
        times: dict = {"single": []}
        times.update({s: [] for s in stacks})
        for _ in range(args.repeats):
            times["single"] += time_it(lambda: evaluate_one_at_a_time(model, split, cands, **kw), 1)
            for stack in stacks:
                times[stack] += time_it(lambda: evaluate_population(model, split, cands, max_stack_rows=stack,
                                                                    **kw), 1)
        o = statistics.median(times["single"])
        for stack in stacks:
            b, diff = statistics.median(times[stack]), diffs[stack]
            label = "auto" if stack is None else str(stack)
            rows.append({"model": name, "max_stack_rows": label, "batched_seconds": b, "one_at_a_time_seconds": o,
                         "speedup": o / b, "max_auc_diff": diff, "candidates": args.candidates,
                         "samples": len(split), "batch_size": args.batch_size, "embed_dim": args.embed_dim,
                         "threads": torch.get_num_threads()})
            print(f"{name:8s} {label:>10s} {b:10.3f} {o:16.3f} {o / b:8.2f} {diff:11.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
