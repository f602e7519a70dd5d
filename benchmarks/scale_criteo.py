"""Criteo at full table size on one machine: every OptEmbed phase on the full (N x D) table, samples/s and memory.

The table is the one ``optembed preprocess --preset paper`` builds from a full-size generated Criteo file
(about 6.8e6 rows; ``--cache`` points at that cache folder), at ``D = 64`` (1.7 GB float32). The phases run
on a row subset of the data for time:

* ``supernet``   OptEmbed supernet steps (per-sample random dims, learned thresholds, DeepFM 1024-512-256);
* ``evolution``  the evolution's candidate evaluation: ``eval()`` forward with per-field dims, no grad;
* ``retrain``    steps with the searched masks frozen (row mask + field dims).

Each training phase runs with the dense-Adam path (``optimizer: adam``: dense table gradient, dense Adam
state) and the fused sparse path (``optimizer: fused_adam``: row-sparse gradient of the table and of the
first-order term, :class:`optembed_ext.optim.LazyAdam`), with the step time split into the embedding side
(lookup forward, its backward, the table update) and the network (forward + backward + update of the dense
network). Batches come from the memory-mapped ``X.npy``/``y.npy`` (contiguous slices of a shuffled block
order: no per-row Python); the loader alone is timed too. Peak RSS is read after every phase.

    python benchmarks/scale_criteo.py --cache /tmp/criteo/cache/criteo-<key> --rows 2000000 --steps 30
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from optembed_ext import ops, optim
from optembed_ext.data import FeatureMap
from optembed_ext.models import build_model
from optembed_ext.nn.optembed import OptEmbedEmbedding


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MemmapBatches:
    """Batches of a memory-mapped (n, F) id array: shuffled order of contiguous batch-sized slices."""

    def __init__(self, X, y, rows: int, batch: int, seed: int = 0):
        self.X, self.y, self.batch = X, y, batch
        self.starts = np.arange(0, rows - batch + 1, batch)
        np.random.default_rng(seed).shuffle(self.starts)
        self.i = 0

    def __next__(self):
        s = int(self.starts[self.i % len(self.starts)])
        self.i += 1
        ids = torch.from_numpy(np.asarray(self.X[s:s + self.batch], dtype=np.int64))
        lab = torch.from_numpy(np.array(self.y[s:s + self.batch], dtype=np.float32))
        return ids, lab


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def build(fmap, dim, mlp):
    torch.manual_seed(0)
    emb = OptEmbedEmbedding(fmap, dim, norm=1)
    with torch.no_grad():
        emb.threshold.fill_(float(emb.weight[:100000].abs().sum(dim=1).mean()) * 0.9)
    model = build_model("deepfm", fmap, emb, mlp_dims=mlp)
    return model, emb


def train_phase(model, emb, loader, steps, warmup, path, frozen_dims=None, lr=1e-3):
    """Steps of one training phase with ``path`` in (adam, fused_adam): seconds per part, samples/s."""
    table, lin = emb.weight, model.linear.weight
    sparse = path == "fused_adam"
    if sparse:
        w, b = model.linear.weight, model.linear.bias
        model.linear.forward = lambda ids: F.embedding(ids, w, sparse=True).sum(dim=(1, 2)) + b
        emb_opt = optim.LazyAdam([table, lin], lr=lr)
        net_params = [p for p in model.parameters() if p is not table and p is not lin and p.requires_grad]
    else:
        model.linear.forward = type(model.linear).forward.__get__(model.linear)
        emb_opt = torch.optim.Adam([table], lr=lr)
        net_params = [p for p in model.parameters() if p is not table and p.requires_grad]
    net_opt = torch.optim.Adam(net_params, lr=lr)
    parts = {"load": 0.0, "emb_forward": 0.0, "emb_backward": 0.0, "emb_update": 0.0, "network": 0.0}
    model.train()
    for i in range(warmup + steps):
        (ids, lab), t_load = timed(lambda: next(loader))
        emb_opt.zero_grad(set_to_none=True)
        net_opt.zero_grad(set_to_none=True)
        dims = frozen_dims
        if dims is None:
            dims = torch.randint(1, emb.embed_dim + 1, (ids.shape[0], emb.num_fields))
        thr = emb.threshold if emb.fixed_row_mask is None else None

        def fwd():
            if emb.fixed_row_mask is not None:  # retrain: the frozen masks, as OptEmbedEmbedding.forward
                out = ops.masked_embedding(table, ids, None, dims, emb.norm, None, sparse=sparse)
                keep = emb.fixed_row_mask[ids].unsqueeze(-1).to(out.dtype)
                return out * keep  # pruned rows: zeros, no gradient
            return ops.masked_embedding(table, ids, thr, dims, emb.norm, emb.oov_weight, sparse=sparse)

        out, t_ef = timed(fwd)
        leaf = out.detach().requires_grad_(True)

        def net():
            logits = model.predict_from_embeddings(leaf, ids)
            loss = F.binary_cross_entropy_with_logits(logits, lab)
            if thr is not None:
                loss = loss + emb.regularization()
            loss.backward()
            return loss

        loss, t_net = timed(net)
        _, t_eb = timed(lambda: out.backward(leaf.grad))
        _, t_eu = timed(emb_opt.step)
        _, t_nu = timed(net_opt.step)  # after the table's backward: it steps the thresholds too
        t_net += t_nu
        if i >= warmup:
            for k, v in zip(parts, (t_load, t_ef, t_eb, t_eu, t_net)):
                parts[k] += v
    batch = loader.batch
    step = sum(v for k, v in parts.items() if k != "load") / steps
    emb_side = (parts["emb_forward"] + parts["emb_backward"] + parts["emb_update"]) / steps
    return {"samples_per_s": batch / step, "step_ms": 1e3 * step, "embedding_share": emb_side / step,
            "parts_ms": {k: 1e3 * v / steps for k, v in parts.items()}, "peak_rss_gb": rss_gb(),
            "loss": float(loss.detach())}


def eval_phase(model, emb, loader, steps, cand):
    model.eval()
    emb.set_dims(cand)
    t = 0.0
    with torch.no_grad():
        for i in range(steps + 1):
            ids, _ = next(loader)
            _, dt = timed(lambda: model(ids))
            if i:
                t += dt
    emb.set_dims(None)
    return {"samples_per_s": loader.batch * steps / t, "peak_rss_gb": rss_gb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="preprocessing cache folder (X.npy, y.npy, feature_map.json)")
    ap.add_argument("--rows", type=int, default=2_000_000, help="row subset used by the phases")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--eval-batch", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--paths", default="fused_adam,adam")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    fmap = FeatureMap.from_json(cache / "feature_map.json")
    X = np.load(cache / "X.npy", mmap_mode="r")
    y = np.load(cache / "y.npy", mmap_mode="r")
    rows = min(args.rows, X.shape[0])
    res = {"num_features": fmap.num_features, "fields": fmap.num_fields, "dim": args.dim, "rows_used": rows,
           "table_gb": fmap.num_features * args.dim * 4 / 1e9, "threads": torch.get_num_threads()}
    print(f"table {fmap.num_features:,} x {args.dim} ({res['table_gb']:.2f} GB float32), {rows:,} of "
          f"{X.shape[0]:,} rows, {torch.get_num_threads()} threads", flush=True)

    loader = MemmapBatches(X, y, rows, args.batch)
    t = time.perf_counter()
    for _ in range(200):
        next(loader)
    res["loader_samples_per_s"] = 200 * args.batch / (time.perf_counter() - t)
    print(f"loader: {res['loader_samples_per_s']:,.0f} samples/s", flush=True)

    model, emb = build(fmap, args.dim, (1024, 512, 256))
    res["after_build_rss_gb"] = rss_gb()
    rng = np.random.default_rng(0)
    for path in args.paths.split(","):
        emb.unfreeze()
        r = train_phase(model, emb, MemmapBatches(X, y, rows, args.batch, seed=1), args.steps, args.warmup, path)
        res[f"supernet/{path}"] = r
        print(f"supernet  {path:10s} {r['samples_per_s']:>9,.0f} samples/s  step {r['step_ms']:.0f} ms  embedding "
              f"{100 * r['embedding_share']:.0f}%  parts {json.dumps({k: round(v, 1) for k, v in r['parts_ms'].items()})}"
              f"  peak RSS {r['peak_rss_gb']:.2f} GiB", flush=True)
    cand = torch.as_tensor(rng.integers(1, args.dim + 1, fmap.num_fields))
    r = eval_phase(model, emb, MemmapBatches(X, y, rows, args.eval_batch, seed=2), max(5, args.steps // 2), cand)
    res["evolution_eval"] = r
    print(f"evolution eval        {r['samples_per_s']:>9,.0f} samples/s  peak RSS {r['peak_rss_gb']:.2f} GiB",
          flush=True)
    with torch.no_grad():
        row_mask = emb.row_mask().clone()
    res["kept_rows"] = int(row_mask.sum())
    for path in args.paths.split(","):
        emb.freeze(row_mask, cand)
        r = train_phase(model, emb, MemmapBatches(X, y, rows, args.batch, seed=3), args.steps, args.warmup, path,
                        frozen_dims=cand)
        res[f"retrain/{path}"] = r
        print(f"retrain   {path:10s} {r['samples_per_s']:>9,.0f} samples/s  step {r['step_ms']:.0f} ms  embedding "
              f"{100 * r['embedding_share']:.0f}%  parts {json.dumps({k: round(v, 1) for k, v in r['parts_ms'].items()})}"
              f"  peak RSS {r['peak_rss_gb']:.2f} GiB", flush=True)
    model_rate = max(v["samples_per_s"] for k, v in res.items() if isinstance(v, dict) and "samples_per_s" in v)
    res["loader_over_model"] = res["loader_samples_per_s"] / model_rate
    print(f"loader / fastest phase: {res['loader_over_model']:.1f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
