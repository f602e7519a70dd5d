"""Data-parallel reading of the cached arrays: memory-mapped splits and the per-rank shard of every global batch.

* ``MappedSplit`` (a view of rows of the cache's ``np.memmap`` arrays) yields exactly the batches of the in-memory
  split and never reads the whole split;
* ``shard_plan``: the ranks' shares of every global batch make the single process's batch, every row a rank reads
  lies in its contiguous block of the split, and every rank takes the same number of steps;
* a single process still gets in-memory splits (the same arrays as before); under a 2-rank process group the
  cache's arrays stay memory-mapped and the trainer reads, on each rank, only rows of its block of the training
  split and of the evaluated splits -- while training the model one process trains (within the tolerance of
  ``tests/test_distributed.py``).
"""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from optembed_ext.data import CTRDataset, make_splits, make_synthetic
from optembed_ext.data.batching import MappedSplit, batches, shard_plan, subsplit, take_rows
from optembed_ext.train.distributed import shard_bounds

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _memmapped(tmp_path, data):
    """``data``'s rows (all splits, int32 ids as the cache stores them) as .npy files opened memory-mapped."""
    X = np.concatenate([data.train.X, data.val.X, data.test.X]).astype(np.int32)
    y = np.concatenate([data.train.y, data.val.y, data.test.y]).astype(np.float32)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    return np.load(tmp_path / "X.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r")


class Recorder:
    """An array wrapper that records which rows were read."""

    def __init__(self, arr):
        self.arr, self.shape, self.ndim, self.dtype = arr, arr.shape, arr.ndim, arr.dtype
        self.read = []

    def __getitem__(self, rows):
        idx = np.arange(self.shape[0])[rows]
        self.read.append(np.atleast_1d(idx))
        return self.arr[rows]

    def rows(self) -> np.ndarray:
        return np.unique(np.concatenate(self.read)) if self.read else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------------------------- single process
def test_mapped_split_gives_the_in_memory_batches_without_reading_the_whole_split(tmp_path):
    data = make_synthetic(num_samples=500, num_fields=3, vocab_sizes=[5, 9, 4], seed=2)
    X, y = _memmapped(tmp_path, data)
    mem = make_splits(X, y, seed=7)
    lazy = make_splits(X, y, seed=7, lazy=True)
    assert all(type(s) is not MappedSplit for s in mem)  # one process: in-memory copies, as before
    for m, s in zip(mem, lazy):
        assert isinstance(s, MappedSplit) and isinstance(s.source_X, np.memmap) and len(s) == len(m)
        assert s.num_fields == 3
        for kwargs in ({}, {"shuffle": True, "seed": 3, "epoch": 1}, {"shuffle": True, "part": (1, 2)},
                       {"drop_last": True}):
            a, b = list(batches(m, 23, **kwargs)), list(batches(s, 23, **kwargs))
            assert len(a) == len(b)
            for (xa, ya), (xb, yb) in zip(a, b):
                assert xb.dtype == torch.int64 and yb.dtype == torch.float32
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not s.materialized
        lo, hi = 5, 17
        xs, ys = take_rows(subsplit(s, lo, hi), slice(0, hi - lo))
        assert np.array_equal(xs, m.X[lo:hi]) and np.array_equal(ys, m.y[lo:hi])
        assert not s.materialized
        assert np.array_equal(s.X, m.X) and s.materialized  # the whole split on request
    ds = CTRDataset(data.feature_map, *make_splits(X, y, seed=7, lazy=True))  # no read at construction
    assert not any(ds.split(n).materialized for n in ("train", "val", "test"))


def test_mapped_split_rejects_bad_input():
    X, y = np.zeros((4, 2), dtype=np.int32), np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match="source_X"):
        MappedSplit(source_X=np.zeros(4), source_y=y)
    with pytest.raises(ValueError, match="source_y"):
        MappedSplit(source_X=X, source_y=y[:3])
    with pytest.raises(ValueError, match="rows"):
        MappedSplit(source_X=X, source_y=y, rows=np.array([0, 4]))
    with pytest.raises(ValueError, match="rows"):
        MappedSplit(source_X=X, source_y=y, rows=slice(0, 4, 2))
    assert len(MappedSplit(X, y)) == 4  # the dataclass signature (dataclasses.replace) wraps in-memory arrays


@pytest.mark.parametrize("n,batch_size,parts", [(800, 37, 2), (801, 64, 3), (100, 100, 2), (0, 8, 2), (5, 8, 4)])
def test_shard_plan_deals_the_single_process_batches_by_row_ownership(n, batch_size, parts):
    rng = np.random.default_rng(0)
    split = MappedSplit(source_X=rng.integers(0, 1000, size=(n + 9, 2)), source_y=np.ones(n + 9, np.float32),
                        rows=np.sort(rng.choice(n + 9, size=n, replace=False)))
    whole = list(batches(split, batch_size, shuffle=True, seed=4, epoch=3))
    plans = [shard_plan(n, batch_size, seed=4, epoch=3, index=r, parts=parts, chunk_rows=50) for r in range(parts)]
    assert len({len(p) for p in plans}) == 1 and len({p.dropped for p in plans}) == 1  # equal step counts
    assert [(p.lo, p.hi) for p in plans] == [(int(a[0]), int(a[-1]) + 1) if len(a) else (p.lo, p.lo)
                                             for a, p in zip(np.array_split(np.arange(n), parts), plans)]
    assert len(plans[0]) + plans[0].dropped == len(whole)
    for k in range(len(plans[0])):
        number = plans[0].batches[k].number
        ids = torch.full_like(whole[number][0], -1)
        for p in plans:
            b = p.batches[k]
            assert b.number == number and b.size == len(whole[number][0]) and len(b.rows) >= 2
            assert len(b.rows) == 0 or (b.rows.min() >= p.lo and b.rows.max() < p.hi)  # only its block
            ids[b.index] = torch.from_numpy(take_rows(split, b.rows)[0])
        assert torch.equal(ids, whole[number][0])  # together: the single process's batch
    # the batches left out are exactly those where some rank would hold fewer than two rows
    owner = np.searchsorted([p.hi for p in plans], np.arange(n), side="right")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(
        __import__("optembed_ext.data.batching", fromlist=["x"])._epoch_seed(4, 3))).numpy()
    short = [k for k in range(len(whole)) if np.bincount(owner[perm[k * batch_size:(k + 1) * batch_size]],
                                                         minlength=parts).min() < 2]
    assert plans[0].dropped == len(short)
    with pytest.raises(ValueError, match="index"):
        shard_plan(10, 2, index=2, parts=2)
    with pytest.raises(ValueError, match="batch_size"):
        shard_plan(10, 0)


# --------------------------------------------------------------------------------------------------- 2 ranks
def _data():
    return make_synthetic(num_samples=1200, num_fields=4, vocab_sizes=[20, 7, 13, 30], seed=1)


def _train_on(data, batch_norm: bool, epochs: int = 2):
    from optembed_ext.models import build_model
    from optembed_ext.nn.optembed import OptEmbedEmbedding
    from optembed_ext.train.config import TrainConfig
    from optembed_ext.train.trainer import Trainer

    torch.manual_seed(0)
    emb = OptEmbedEmbedding(data.feature_map, 4, threshold_lr=1e-2)
    model = build_model("deepfm", data.feature_map, emb, mlp_dims=[8], batch_norm=batch_norm, dropout=0.0)
    cfg = TrainConfig(epochs=epochs, batch_size=101, lr=1e-2, optimizer="adam", patience=None, seed=5,
                      eval_batch_size=97, progress=False)
    trainer = Trainer(model, data, cfg)
    result = trainer.fit(resume=False)
    return trainer, {"history": [(h["train_loss"], h["val_auc"], h["val_logloss"]) for h in result["history"]],
                     "test": (result["test_auc"], result["test_logloss"]), "row_mask": emb.row_mask().cpu(),
                     "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _ranked_run(folder):
    """On each rank: the cache-like arrays memory-mapped, split lazily (automatic under the process group), the
    rows every split's source was asked for recorded during a 2-epoch training."""
    X = np.load(os.path.join(folder, "X.npy"), mmap_mode="r")
    y = np.load(os.path.join(folder, "y.npy"), mmap_mode="r")
    splits = make_splits(X, y, seed=9)
    assert all(isinstance(s, MappedSplit) and isinstance(s.source_X, np.memmap) for s in splits)
    recorders = []
    for s in splits:
        s.source_X = Recorder(s.source_X)
        recorders.append(s.source_X)
    data = CTRDataset(_data().feature_map, *splits)
    trainer, out = _train_on(data, batch_norm=False)
    out["data_shard"] = trainer.data_shard
    out["read"] = [r.rows() for r in recorders]
    out["split_rows"] = [np.asarray(s.rows) for s in splits]
    out["materialized"] = [s.materialized for s in splits]
    return out


def test_two_ranks_read_only_their_block_of_the_memory_mapped_cache_and_train_as_one_process(tmp_path):
    from test_distributed import _close, run_ranks

    data = _data()
    X, y = _memmapped(tmp_path, data)
    del X, y
    single_data = CTRDataset(data.feature_map, *make_splits(np.load(tmp_path / "X.npy"), np.load(tmp_path / "y.npy"),
                                                            seed=9))
    _, single = _train_on(single_data, batch_norm=False)
    ranks = run_ranks(_ranked_run, (str(tmp_path),), tmp_path)
    n_train = len(single_data.train)
    blocks = [r["data_shard"] for r in ranks]
    assert blocks == [(0, n_train // 2), (n_train // 2, n_train)]
    for rank, (r, (lo, hi)) in enumerate(zip(ranks, blocks)):
        assert r["materialized"] == [False, False, False]  # no split was read whole
        # training: only rows of its block of the training split (file rows rows[lo:hi]), and all of them
        assert np.array_equal(r["read"][0], np.sort(r["split_rows"][0][lo:hi]))
        # evaluation: only its contiguous block of the validation and test splits
        for rows, got in zip(r["split_rows"][1:], r["read"][1:]):
            a, b = shard_bounds(len(rows), 2, rank)
            assert np.array_equal(got, np.sort(rows[a:b]))
    for r in ranks:
        assert torch.equal(r["row_mask"], single["row_mask"])
        _close(r["history"], single["history"])
        _close(r["test"], single["test"])
        for k, v in single["state"].items():
            _close(r["state"][k], v, 1e-4)


def test_one_process_trains_bit_identically_on_a_memory_mapped_split(tmp_path):
    """The trainer over ``MappedSplit`` views (opt-in in one process) = over the in-memory copies, bit for bit."""
    data = _data()
    X, y = _memmapped(tmp_path, data)
    mem = CTRDataset(data.feature_map, *make_splits(X, y, seed=9))
    lazy = CTRDataset(data.feature_map, *make_splits(X, y, seed=9, lazy=True))
    _, a = _train_on(mem, batch_norm=True, epochs=1)
    trainer, b = _train_on(lazy, batch_norm=True, epochs=1)
    assert trainer.data_shard is None and trainer.batch_shard is None and trainer.synced_batch_norms == 0
    assert a["history"] == b["history"] and a["test"] == b["test"]
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k
    assert not any(lazy.split(n).materialized for n in ("train", "val", "test"))


def test_sync_batch_norm_option():
    from optembed_ext.cli import build_parser
    from optembed_ext.cli.common import train_config_from_args
    from optembed_ext.train.config import TrainConfig

    assert TrainConfig().sync_batch_norm is True
    with pytest.raises(ValueError, match="sync_batch_norm"):
        TrainConfig(sync_batch_norm="yes")
    args = build_parser().parse_args(["train", "--dataset", "synthetic", "--no-sync-batch-norm"])
    assert train_config_from_args(args).sync_batch_norm is False
