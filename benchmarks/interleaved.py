"""Interleaved A/B timing for a shared, loaded machine: the implementations of a case run in turn, round after
round, and each is reported by its minimum (and median) over the rounds. Load from other processes only ever adds
time, so the minimum of interleaved rounds compares implementations under the same conditions better than
back-to-back medians. Correctness is checked by the pytest suites (bench_fbgemm.py, bench_inference_export.py),
whose setup this reuses.

    python benchmarks/interleaved.py step --threads 1 --rounds 15        # FBGEMM vs ours, fwd+bwd+step, criteo zipf
    python benchmarks/interleaved.py inference --threads 2 --rounds 10   # uniform / masked / compact / inference

Prints a Markdown table (ratio = baseline min / impl min, > 1 means faster than the baseline).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def interleave(fns: dict, rounds: int, warmup: int = 2) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"min": min(v), "median": statistics.median(v)} for k, v in times.items()}


def table(title: str, res: dict, baseline: str, items: int | None = None) -> str:
    lines = [f"#### {title}", "", "| impl | min ms | median ms | ratio vs " + baseline + " (min) |"
             + (" samples/s (min) |" if items else ""), "|---|---|---|---|" + ("---|" if items else "")]
    for k, v in res.items():
        ratio = res[baseline]["min"] / v["min"]
        extra = f" {items / (v['min'] / 1e3):,.0f} |" if items else ""
        lines.append(f"| {k} | {v['min']:.2f} | {v['median']:.2f} | x{ratio:.2f} |{extra}")
    return "\n".join(lines)


def step_cases(rounds: int) -> str:
    import bench_fbgemm as bf
    from conftest import SHAPES, make_ids, make_table

    shape = SHAPES["criteo"]
    ids = make_ids(shape, "zipf", "cpu")
    weight = make_table(shape, "cpu")
    grad_out = torch.randn(shape.batch, shape.fields, shape.dim, generator=torch.Generator().manual_seed(1)) * 1e-2
    out = []
    for optimizer in ("sgd", "adagrad"):
        tbe = bf.make_tbe(shape, optimizer, "cpu", weight)
        indices, offsets = bf.tbe_inputs(shape, ids)
        flat = grad_out.reshape(shape.batch, -1)
        impls = {"fbgemm": lambda: tbe(indices, offsets).backward(flat)}
        ours = {}
        for name, masked, in_bwd in (("fused_masked", True, False), ("bwd_plain", False, True),
                                     ("bwd_masked", True, True)):
            ours[name] = bf.Ours(shape, optimizer, "cpu", weight.clone(), masked=masked, ids=ids, in_backward=in_bwd)
            impls[name] = (lambda o: lambda: o.step(grad_out))(ours[name])
        res = interleave(impls, rounds)
        for o in ours.values():
            o.close()
        out.append(table(f"fwd+bwd+{optimizer} step, criteo zipf (B 2048, F 39, D 64, N 1e6), "
                         f"{torch.get_num_threads()} thread(s)", res, "fbgemm"))
    return "\n\n".join(out)


def inference_cases(rounds: int) -> str:
    import bench_inference_export as bi
    from conftest import SHAPES, Shape, make_ids

    shape = SHAPES["criteo"]
    out = []
    for model_name in ("deepfm", "dcn"):
        models, width = bi.build(shape, model_name, "cpu")
        batch = bi.eval_batch(shape)
        ids = make_ids(Shape(shape.name, batch, shape.fields, shape.dim, shape.rows), "zipf", "cpu")

        def call(m):
            def fn():
                with torch.no_grad():
                    m(ids)
            return fn

        res = interleave({k: call(m) for k, m in models.items()}, rounds)
        out.append(table(f"eval {model_name}, criteo shape, batch {batch}, input width {width} of "
                         f"{shape.fields * shape.dim}, {torch.get_num_threads()} thread(s)", res, "uniform",
                         items=batch))
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", choices=["step", "inference"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(step_cases(args.rounds) if args.suite == "step" else inference_cases(args.rounds))


if __name__ == "__main__":
    main()
