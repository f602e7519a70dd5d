"""Data-parallel runs (torch.distributed, gloo on 127.0.0.1) against the single-process run on the same tiny data.

* trainer: 2 ranks (row-sparse and dense gradients) give the single-process training (same global batches; no dropout,
  batch norm over the global batch, so the only difference is floating-point summation order) -- weights within 1e-4,
  losses and AUCs within 1e-5 -- and resume from the checkpoint rank 0 alone wrote;
* batch norm: ``CPUSyncBatchNorm`` on 2 ranks with uneven shares = ``BatchNorm1d`` over the whole batch (outputs,
  every gradient, running statistics); without synchronisation every rank still evaluates rank 0's statistics;
* evolution: 2 ranks return exactly the single-process search (every generation's AUCs, the best dims);
* ``torchrun -m optembed_ext search``: the chosen dims, kept rows and row mask equal the single-process run's.

Each multi-process run is bounded (``TIMEOUT`` seconds) and talks on the loopback interface only.
"""
import json
import os
import socket
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optembed_ext.data import batches, make_synthetic
from optembed_ext.train import distributed as dist_utils

TIMEOUT = 120
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(
        seconds=TIMEOUT))
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # every rank is done with its collectives before any tears the group down: a rank that destroys the group
        # while its peer's last operation is in flight can take the peer down at exit (std::terminate in gloo)
        dist.barrier()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, args, tmp_path, world: int = 2) -> list:
    """``fn(*args)`` on ``world`` gloo ranks (spawned processes); the list of their return values."""
    out = tmp_path / f"ranks-{fn.__name__}"
    out.mkdir(parents=True)
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, str(out)), nprocs=world, join=False,
                             start_method="spawn")
    try:
        import time

        deadline = time.monotonic() + TIMEOUT
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {TIMEOUT}s")
    except Exception:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        errors = "\n".join(f.read_text() for f in sorted(out.glob("*.err")))
        raise AssertionError(f"{fn.__name__} failed on {world} ranks:\n{errors}") from None
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def tiny_data():
    return make_synthetic(num_samples=1200, num_fields=4, vocab_sizes=[20, 7, 13, 30], seed=1)


# ------------------------------------------------------------------------------------------ batches(part=...)
@pytest.mark.parametrize("n,batch_size,parts", [(103, 16, 2), (50, 7, 3), (8, 8, 2)])
def test_parts_of_every_batch_make_the_batch(n, batch_size, parts):
    data = make_synthetic(num_samples=n * 2, num_fields=3, vocab_sizes=5, seed=0).train
    whole = list(batches(data, batch_size, shuffle=True, seed=3, epoch=1))
    pieces = [list(batches(data, batch_size, shuffle=True, seed=3, epoch=1, part=(i, parts)))
              for i in range(parts)]
    assert all(len(p) == len(whole) for p in pieces)
    for k, (ids, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[k][0] for p in pieces]), ids)
        assert torch.equal(torch.cat([p[k][1] for p in pieces]), y)
        sizes = [len(p[k][1]) for p in pieces]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="part"):
        next(batches(data, 4, part=(2, 2)))


def test_shard_bounds_cover_and_single_process_helpers_are_identities():
    for n in (0, 1, 5, 17):
        bounds = [dist_utils.shard_bounds(n, 3, i) for i in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert not dist_utils.is_distributed() and dist_utils.is_main() and dist_utils.world_size() == 1
    assert dist_utils.broadcast_object({"a": 1}) == {"a": 1}
    assert dist_utils.all_gather_objects(3) == [3]
    x = np.arange(4.0)
    assert dist_utils.gather_rows(x) is not None and np.array_equal(dist_utils.gather_rows(x), x)


# ------------------------------------------------------------------------------------------------- trainer
class Interrupted(Exception):
    pass


def _train(run_dir, epochs: int, optimizer: str, stop_at: int | None = None, batch_norm: bool = False,
           sync_batch_norm: bool = True):
    from optembed_ext.models import build_model
    from optembed_ext.nn.optembed import OptEmbedEmbedding
    from optembed_ext.train.callbacks import LambdaCallback
    from optembed_ext.train.config import TrainConfig
    from optembed_ext.train.trainer import Trainer

    def interrupt(trainer, loss):
        if trainer.global_step == stop_at:
            raise Interrupted

    data = tiny_data()
    torch.manual_seed(0)
    emb = OptEmbedEmbedding(data.feature_map, 4, threshold_lr=1e-2, sparse=optimizer == "sparse_adam")
    model = build_model("deepfm", data.feature_map, emb, mlp_dims=[8], batch_norm=batch_norm, dropout=0.0)
    cfg = TrainConfig(epochs=epochs, batch_size=101, lr=1e-2, optimizer=optimizer, patience=None, seed=5,
                      eval_batch_size=97, progress=False, checkpoint_every=1, sync_batch_norm=sync_batch_norm)
    trainer = Trainer(model, data, cfg, run_dir=run_dir, callbacks=[LambdaCallback(on_batch_end=interrupt)])
    try:
        result = trainer.fit(resume=True)
    except Interrupted:
        return {"stopped_at": trainer.global_step, "files": sorted(os.listdir(run_dir))}
    return {"result": {k: result[k] for k in ("best_val_auc", "test_auc", "test_logloss", "best_epoch")},
            "history": [(h["train_loss"], h["val_auc"], h["val_logloss"]) for h in result["history"]],
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "row_mask": emb.row_mask().cpu(), "threshold": emb.threshold.detach().clone(),
            "files": sorted(os.listdir(run_dir))}


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("optimizer", ["sparse_adam"])  # dense Adam: the resume test below
def test_two_ranks_train_as_one_process(tmp_path, optimizer):
    single = _train(str(tmp_path / "single"), 2, optimizer)
    ranks = run_ranks(_train, (str(tmp_path / "ddp"), 2, optimizer), tmp_path)
    for r in ranks:  # every rank holds the same model and metrics ...
        for k, v in r["state"].items():
            assert torch.equal(v, ranks[0]["state"][k]), k
        assert r["result"] == ranks[0]["result"] and torch.equal(r["row_mask"], ranks[0]["row_mask"])
    ddp = ranks[0]  # ... and that of one process (summation order aside)
    assert torch.equal(ddp["row_mask"], single["row_mask"])
    _close(ddp["threshold"], single["threshold"])
    for k, v in single["state"].items():
        _close(ddp["state"][k], v, 1e-4)
    _close(ddp["history"], single["history"])
    _close([ddp["result"][k] for k in ("best_val_auc", "test_auc", "test_logloss")],
           [single["result"][k] for k in ("best_val_auc", "test_auc", "test_logloss")])
    assert ddp["files"] == single["files"]


def _train_both_batch_norms(run_dir):
    return {"sync": _train(os.path.join(run_dir, "sync"), 2, "sgd", batch_norm=True),
            "local": _train(os.path.join(run_dir, "local"), 2, "sgd", batch_norm=True, sync_batch_norm=False)}


def test_two_ranks_with_batch_norm_train_as_one_process(tmp_path):
    """Batch norm in the MLP: synchronised (the default) the 2 ranks train the single-process model; per rank
    (``sync_batch_norm=False``) every rank still ends with the same model (rank 0's running statistics).

    SGD: the bias of the linear layer in front of a batch norm has a zero gradient (the norm removes it), which
    Adam would turn into full-size steps driven by rounding noise -- the noise of one process is not that of two."""
    single = _train(str(tmp_path / "single"), 2, "sgd", batch_norm=True)
    assert any("running_mean" in k for k in single["state"])
    ranks = run_ranks(_train_both_batch_norms, (str(tmp_path / "ddp"),), tmp_path)
    for r in ranks:
        for k, v in r["local"]["state"].items():
            assert torch.equal(v, ranks[0]["local"]["state"][k]), k
        ddp = r["sync"]
        assert torch.equal(ddp["row_mask"], single["row_mask"])
        _close(ddp["threshold"], single["threshold"])
        for k, v in single["state"].items():
            _close(ddp["state"][k], v, 1e-4)
        _close(ddp["history"], single["history"])
        _close([ddp["result"][k] for k in ("best_val_auc", "test_auc", "test_logloss")],
               [single["result"][k] for k in ("best_val_auc", "test_auc", "test_logloss")])


BN_CASES = [((5, 8), (3,)), ((1, 6), (2, 4))]  # (rows of rank 0, rows of rank 1), (C, ...): 2-D and 3-D inputs


def _sync_bn_cases():
    return [_sync_bn_pieces(sizes, dims) for sizes, dims in BN_CASES]


def _sync_bn_pieces(sizes, dims):
    from optembed_ext.train.distributed import CPUSyncBatchNorm, rank, sync_batch_norm

    torch.manual_seed(0)
    n = sum(sizes)
    x = torch.randn(n, *dims, dtype=torch.float64) * 3 + 1
    w = torch.randn(n, *dims, dtype=torch.float64)
    lo = sum(sizes[:rank()])
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(dims[0], momentum=0.3).double())
    converted = sync_batch_norm(net)
    assert converted == 1 and isinstance(net[0], CPUSyncBatchNorm)
    with torch.no_grad():
        net[0].weight.uniform_(0.5, 1.5)
        net[0].bias.uniform_(-1, 1)
    xl = x[lo:lo + sizes[rank()]].clone().requires_grad_(True)
    outs = []
    for _ in range(2):  # two steps: the running statistics follow the global batch
        out = net(xl)
        (out * w[lo:lo + sizes[rank()]]).sum().backward()
        outs.append(out.detach())
    net.eval()
    return {"out": outs, "grad_x": xl.grad, "grad_w": net[0].weight.grad, "grad_b": net[0].bias.grad,
            "eval": net(x).detach(), "stats": (net[0].running_mean, net[0].running_var,
                                              net[0].num_batches_tracked)}


def test_cpu_sync_batch_norm_is_batch_norm_over_every_rank(tmp_path):
    cases = run_ranks(_sync_bn_cases, (), tmp_path)
    for case, (sizes, dims) in enumerate(BN_CASES):
        _check_sync_bn([r[case] for r in cases], sizes, dims)


def _check_sync_bn(ranks, sizes, dims):
    torch.manual_seed(0)
    n = sum(sizes)
    x = (torch.randn(n, *dims, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    w = torch.randn(n, *dims, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(dims[0], momentum=0.3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    outs = []
    for _ in range(2):
        out = ref(x)
        (out * w).sum().backward()
        outs.append(out.detach())
    ref.eval()
    cut = [0, sizes[0], n]
    for r, got in enumerate(ranks):
        for a, b in zip(got["out"], outs):
            torch.testing.assert_close(a, b[cut[r]:cut[r + 1]])
        torch.testing.assert_close(got["grad_x"], x.grad[cut[r]:cut[r + 1]])
        torch.testing.assert_close(got["eval"], ref(x).detach())
        for a, b in zip(got["stats"], (ref.running_mean, ref.running_var, ref.num_batches_tracked)):
            torch.testing.assert_close(a, b)
    # parameter gradients stay per rank (DDP averages them): their sum is the whole batch's
    torch.testing.assert_close(ranks[0]["grad_w"] + ranks[1]["grad_w"], ref.weight.grad)
    torch.testing.assert_close(ranks[0]["grad_b"] + ranks[1]["grad_b"], ref.bias.grad)


def test_sync_batch_norm_is_a_no_op_in_one_process():
    from optembed_ext.train.distributed import CPUSyncBatchNorm, sync_batch_norm

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    assert sync_batch_norm(net) == 0 and type(net[1]) is torch.nn.BatchNorm1d
    torch.manual_seed(1)
    bn, ref = CPUSyncBatchNorm(4), torch.nn.BatchNorm1d(4)
    x = torch.randn(6, 4)
    torch.testing.assert_close(bn(x), ref(x))  # no process group: plain batch norm
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_two_ranks_resume_from_rank0_checkpoint(tmp_path):
    """Dense gradients (Adam): 2 ranks killed in epoch 2 and resumed = one process trained straight through."""
    first = run_ranks(_train, (str(tmp_path / "ddp"), 2, "adam", 13), tmp_path)  # killed in the second epoch
    assert first[0]["stopped_at"] == first[1]["stopped_at"] == 13 and "checkpoint.pt" in first[0]["files"]
    resumed = run_ranks(_train, (str(tmp_path / "ddp"), 2, "adam"), tmp_path / "again")
    straight = _train(str(tmp_path / "single"), 2, "adam")
    assert len(resumed[0]["history"]) == 2
    _close(resumed[0]["history"], straight["history"])
    for k, v in straight["state"].items():
        _close(resumed[1]["state"][k], v, 1e-4)


# ----------------------------------------------------------------------------------------------- evolution
def _search(run_dir):
    from optembed_ext.models import build_model
    from optembed_ext.nn.optembed import OptEmbedEmbedding
    from optembed_ext.search.evolution import EvolutionConfig, EvolutionSearch

    data = tiny_data()
    torch.manual_seed(3)
    emb = OptEmbedEmbedding(data.feature_map, 6)
    model = build_model("deepfm", data.feature_map, emb, mlp_dims=[8])
    with torch.no_grad():
        emb.threshold.fill_(0.02)
    emb.freeze(emb.row_mask())
    cfg = EvolutionConfig(generations=3, mutation_num=3, crossover_num=3, keep_num=1, seed=1, eval_batch_size=64)
    result = EvolutionSearch(model, data.val, cfg, run_dir=run_dir, log=None).run()
    result.pop("seconds")
    for rec in result["history"]:
        rec.pop("seconds")
    return {"result": result, "row_mask": emb.row_mask(), "files": sorted(os.listdir(run_dir))}


def test_two_ranks_search_returns_the_single_process_architecture(tmp_path):
    single = _search(str(tmp_path / "single"))
    ranks = run_ranks(_search, (str(tmp_path / "ddp"),), tmp_path)
    for r in ranks:
        assert r["result"] == single["result"]  # every AUC of every generation, bit for bit
        assert torch.equal(r["row_mask"], single["row_mask"])
    assert ranks[0]["files"] == single["files"]


# -------------------------------------------------------------------------------------------- torchrun CLI
SEARCH_ARGS = ["search", "--dataset", "synthetic", "--dataset-kwargs",
               "{num_samples: 1200, num_fields: 4, vocab_sizes: [20, 7, 13, 30]}", "--data-seed", "1",
               "--model", "deepfm", "--model-cfg", "{mlp_dims: [8], batch_norm: true, dropout: 0.0}",
               "--embed-dim", "4", "--epochs", "2", "--batch-size", "100", "--lr", "0.01",
               "--threshold-lr", "0.01", "--threshold-init", "0.4", "--generations", "2", "--mutation-num", "3", "--crossover-num", "3",
               "--keep-num", "1", "--evo-batch-size", "128", "--eval-batch-size", "256", "--baseline", "false",
               "--export", "false", "--measure-speedup", "false", "--progress", "false"]


def _cli_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return env


def test_torchrun_search_chooses_what_one_process_chooses(tmp_path):
    from optembed_ext import cli

    one = tmp_path / "one"
    assert cli.main([*SEARCH_ARGS, "--out", str(one)]) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "optembed_ext", *SEARCH_ARGS, "--out", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_cli_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("field_dims.json", "kept_rows.json"):
        assert json.loads((two / name).read_text()) == json.loads((one / name).read_text()), name
    m1, m2 = torch.load(one / "masks.pt"), torch.load(two / "masks.pt")
    assert torch.equal(m1["row_mask"], m2["row_mask"]) and m1["field_dims"] == m2["field_dims"]
    assert 0 < int(m1["row_mask"].sum()) < len(m1["row_mask"])  # the supernet pruned some rows, not all
    s1, s2 = (json.loads((d / "phases" / "supernet" / "done.json").read_text()) for d in (one, two))
    np.testing.assert_allclose(s2["thresholds"], s1["thresholds"], atol=1e-6)
    r1, r2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for v in ("optembed", "no_retrain"):
        assert r2["variants"][v]["params"] == r1["variants"][v]["params"]
        # 120 test samples: 1e-3 is about four of the ~3,600 positive/negative pairs ordered otherwise
        assert r2["variants"][v]["test_auc"] == pytest.approx(r1["variants"][v]["test_auc"], abs=1e-3)
    assert proc.stdout.count("run folder:") == 1  # rank 0 prints
