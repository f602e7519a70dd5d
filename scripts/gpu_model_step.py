"""One OptEmbed supernet training step and one evaluation batch of DeepFM at Criteo shape on the GPU (samples/s).

Criteo shape: 39 fields, about 1e6 table rows (Zipf-distributed ids), D = 64, MLP (1024, 512, 256), training batch
2048, evaluation batch 8192. Timings are CUDA-event medians over a few repetitions after a warm-up.
"""
import argparse
import json
import statistics

import torch

from optembed_ext.data.types import FeatureMap
from optembed_ext.models import build_model
from optembed_ext.nn.optembed import OptEmbedEmbedding

FIELDS, ROWS, DIM = 39, 1_000_000, 64


def zipf_ids(fmap, batch, gen, device):
    cards = torch.tensor(fmap.cardinalities)
    offs = torch.tensor(fmap.offsets)
    u = torch.rand(batch, FIELDS, generator=gen, dtype=torch.float64)
    local = (cards.double().pow(u) - 1).floor().long().clamp_max(cards - 1)  # heavy head, long tail
    return (local + offs).to(device)


def timed(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--train-batch", type=int, default=2048)
    ap.add_argument("--eval-batch", type=int, default=8192)
    args = ap.parse_args()
    dev = torch.device("cuda")
    fmap = FeatureMap("criteo_shape", [f"C{i}" for i in range(FIELDS)], [ROWS // FIELDS] * FIELDS)
    torch.manual_seed(0)
    model = build_model("deepfm", fmap, OptEmbedEmbedding(fmap, DIM, sample_dims=True),
                        mlp_dims=(1024, 512, 256)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x_tr = zipf_ids(fmap, args.train_batch, gen, dev)
    y_tr = torch.randint(0, 2, (args.train_batch,), generator=gen).float().to(dev)
    x_ev = zipf_ids(fmap, args.eval_batch, gen, dev)

    def step():
        model.train()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x_tr), y_tr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def evaluate():
        model.eval()
        model(x_ev)

    train_ms = timed(step, 5)
    eval_ms = timed(evaluate, 5)
    out = {"device": torch.cuda.get_device_name(0), "train_batch": args.train_batch, "eval_batch": args.eval_batch,
           "train_ms": train_ms, "eval_ms": eval_ms,
           "train_samples_per_s": args.train_batch / (train_ms / 1e3),
           "eval_samples_per_s": args.eval_batch / (eval_ms / 1e3)}
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
