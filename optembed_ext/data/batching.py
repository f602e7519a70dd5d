"""Mini-batch iteration and train/val/test splitting over encoded arrays.

Splits are either in memory (:class:`~optembed_ext.data.types.CTRSplit`, int64 copies) or, for data-parallel runs
over the cache, :class:`MappedSplit`: a view of rows of the cache's memory-mapped arrays that reads only the rows
asked for (:func:`take_rows`, :func:`subsplit`, :func:`batches`, :func:`shard_plan`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .types import CTRSplit

logger = logging.getLogger("optembed_ext.data")

__all__ = ["batches", "split_indices", "make_splits", "MappedSplit", "take_rows", "subsplit", "shard_plan",
           "ShardPlan", "RankBatch"]


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) so neighbouring epochs get unrelated permutations.
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(1)[0])


class MappedSplit(CTRSplit):
    """A split that stays in the arrays it was cut from: rows ``rows`` (a ``slice`` or int64 positions, sorted
    ones keep memory-mapped reads sequential) of ``source_X`` (n, F) integer ids and ``source_y`` (n,) labels --
    typically the cache's memory-mapped ``X.npy`` / ``y.npy``.

    Nothing is read at construction. :func:`take_rows`, :func:`subsplit`, :func:`batches` and the trainer read only
    the rows they use (as int64 / float32 copies). The ``X`` / ``y`` attributes of a :class:`CTRSplit` are still
    there for code that wants the whole split: the first access reads the whole split into memory (and keeps it;
    ``materialized`` tells whether that happened).

    ``MappedSplit(X, y)`` (the dataclass signature, e.g. from ``dataclasses.replace``) wraps in-memory arrays.
    """

    def __init__(self, X=None, y=None, *, source_X=None, source_y=None, rows=None):
        if X is not None or y is not None:
            if source_X is not None or source_y is not None:
                raise ValueError("give either X and y or source_X and source_y, not both")
            source_X, source_y = np.asarray(X, dtype=np.int64), np.asarray(y, dtype=np.float32)
        if source_X is None or source_y is None:
            raise ValueError("source_X and source_y are required")
        if getattr(source_X, "ndim", None) != 2 or not np.issubdtype(source_X.dtype, np.integer):
            raise ValueError(f"source_X must be a 2-D integer array, got {getattr(source_X, 'shape', None)} "
                             f"{getattr(source_X, 'dtype', None)}")
        n = int(source_X.shape[0])
        if getattr(source_y, "ndim", None) != 1 or int(source_y.shape[0]) != n:
            raise ValueError(f"source_y must have shape ({n},), got {getattr(source_y, 'shape', None)}")
        if rows is None:
            rows = slice(0, n)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step != 1:
                raise ValueError(f"rows must be a slice with step 1 or an index array, got {rows!r}")
            rows = slice(start, max(start, stop))
        else:
            rows = np.asarray(rows)
            if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
                raise ValueError(f"rows must be a slice or a 1-D integer array, got shape {rows.shape} {rows.dtype}")
            rows = rows.astype(np.int64, copy=False)
            if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= n):
                raise ValueError(f"rows must lie in [0, {n})")
        self.source_X, self.source_y, self.rows = source_X, source_y, rows
        self._X = self._y = None

    def __len__(self) -> int:
        r = self.rows
        return r.stop - r.start if isinstance(r, slice) else int(r.shape[0])

    @property
    def num_fields(self) -> int:
        return int(self.source_X.shape[1])

    @property
    def materialized(self) -> bool:
        """True once ``X`` has been read in full."""
        return self._X is not None

    @property
    def X(self) -> np.ndarray:
        if self._X is None:
            logger.debug("reading a whole mapped split of %d rows into memory", len(self))
            self._X = np.array(self.source_X[self.rows], dtype=np.int64)
        return self._X

    @property
    def y(self) -> np.ndarray:
        if self._y is None:
            self._y = np.array(self.source_y[self.rows], dtype=np.float32)
        return self._y

    def source_rows(self, index) -> slice | np.ndarray:
        """Rows of the source arrays holding the split's rows ``index`` (a slice with step 1 or int positions)."""
        r = self.rows
        if isinstance(index, slice):
            a, b, step = index.indices(len(self))
            if step != 1:
                raise ValueError(f"index must be a slice with step 1 or positions, got {index!r}")
            b = max(a, b)
            return slice(r.start + a, r.start + b) if isinstance(r, slice) else r[a:b]
        index = np.asarray(index, dtype=np.int64)
        return r.start + index if isinstance(r, slice) else r[index]

    def take(self, index) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` of the split's rows ``index`` (a slice or int positions): int64 / float32 copies; only those
        rows are read."""
        src = self.source_rows(index)
        return np.array(self.source_X[src], dtype=np.int64), np.array(self.source_y[src], dtype=np.float32)

    def __repr__(self) -> str:
        kind = "memmap" if isinstance(self.source_X, np.memmap) else type(self.source_X).__name__
        return f"MappedSplit({len(self)} rows of a {kind} {tuple(self.source_X.shape)})"

    __eq__ = object.__eq__
    __hash__ = object.__hash__


def take_rows(split: CTRSplit, index) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` (int64, float32) of the rows ``index`` (a slice or int positions) of ``split``; a
    :class:`MappedSplit` reads only those rows."""
    if isinstance(split, MappedSplit):
        return split.take(index)
    if not isinstance(index, slice):
        index = np.asarray(index, dtype=np.int64)
    return np.asarray(split.X[index], dtype=np.int64), np.asarray(split.y[index], dtype=np.float32)


def subsplit(split: CTRSplit, lo: int, hi: int) -> CTRSplit:
    """Rows ``[lo, hi)`` of ``split`` as a split, without reading them (a view, or a :class:`MappedSplit`)."""
    if isinstance(split, MappedSplit):
        return MappedSplit(source_X=split.source_X, source_y=split.source_y, rows=split.source_rows(slice(lo, hi)))
    return CTRSplit(split.X[lo:hi], split.y[lo:hi])


def batches(
    split: CTRSplit,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    part: tuple[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(ids, labels)``: LongTensor (B, F) global ids and FloatTensor (B,) labels.

    The arrays are wrapped with ``torch.from_numpy`` once and sliced (contiguous slices without
    ``shuffle``; gathers of a permutation with it). The order is a pure function of
    ``(seed, epoch)``: the same pair always gives the same batches. A :class:`MappedSplit` gives the same batches,
    read batch by batch from its source arrays (only the rows of each batch).

    ``part=(index, parts)`` (data-parallel training): every batch is cut into ``parts`` contiguous pieces (the
    first ``B % parts`` one row longer) and only piece ``index`` is read and yielded, so ``parts`` processes with
    the same arguments together see exactly the batches of one process.
    """
    if not isinstance(split, CTRSplit):
        raise TypeError(f"split must be a CTRSplit, got {type(split).__name__}")
    batch_size = _check_batch_size(batch_size)
    index, parts = (0, 1) if part is None else (int(part[0]), int(part[1]))
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"part must be (index, parts) with 0 <= index < parts, got {part!r}")
    n = len(split)
    stop = (n // batch_size) * batch_size if drop_last else n
    if isinstance(split, MappedSplit):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch))) \
            if shuffle else None
        for start in range(0, stop, batch_size):
            lo, hi = _piece(min(batch_size, stop - start), index, parts)
            idx = slice(start + lo, start + hi) if perm is None else perm[start + lo:start + hi].numpy()
            X, y = split.take(idx)
            yield torch.from_numpy(X), torch.from_numpy(y)
        return
    X = torch.from_numpy(np.ascontiguousarray(split.X, dtype=np.int64))
    y = torch.from_numpy(np.ascontiguousarray(split.y, dtype=np.float32))
    if shuffle:
        gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        perm = torch.randperm(n, generator=gen)
        for start in range(0, stop, batch_size):
            lo, hi = _piece(min(batch_size, stop - start), index, parts)
            idx = perm[start + lo:start + hi]
            yield X.index_select(0, idx), y.index_select(0, idx)
    else:
        for start in range(0, stop, batch_size):
            lo, hi = _piece(min(batch_size, stop - start), index, parts)
            yield X[start + lo:start + hi], y[start + lo:start + hi]


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


class RankBatch:
    """This rank's share of one global batch (see :func:`shard_plan`)."""

    __slots__ = ("rows", "index", "size", "number")

    def __init__(self, rows: np.ndarray, index: torch.Tensor, size: int, number: int):
        #: positions in the split of this rank's rows of the batch, in the batch's (shuffled) order
        self.rows = rows
        #: their positions inside the global batch (LongTensor)
        self.index = index
        #: rows of the global batch
        self.size = size
        #: the batch's number in the epoch's sequence of global batches
        self.number = number


class ShardPlan:
    """One epoch of global batches as one rank of ``parts`` sees them (:func:`shard_plan`).

    ``lo``, ``hi``: the rank's block ``[lo, hi)`` of the split -- every row it reads lies there; ``batches``: a
    :class:`RankBatch` per global batch kept; ``dropped``: global batches left out because a rank would have held
    fewer than ``min_rows`` of their rows (the same on every rank).
    """

    def __init__(self, lo: int, hi: int, batches: list[RankBatch], dropped: int):
        self.lo, self.hi, self.batches, self.dropped = lo, hi, batches, dropped

    def __len__(self) -> int:
        return len(self.batches)

    def read(self, split: CTRSplit, skip: int = 0, stop: int | None = None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor, RankBatch]]:
        """``(ids, labels, batch)`` of the kept batches ``[skip, stop)``, reading only this rank's rows."""
        for b in self.batches[skip:stop]:
            X, y = take_rows(split, b.rows)
            yield torch.from_numpy(X), torch.from_numpy(y), b


def shard_plan(n: int, batch_size: int, *, seed: int = 0, epoch: int = 0, index: int = 0, parts: int = 1,
               min_rows: int = 2, chunk_rows: int = 1 << 20) -> ShardPlan:
    """The shuffled global batches of ``batches(split, batch_size, shuffle=True, seed, epoch)`` (the same
    permutation, so the same batches as one process), dealt to ``parts`` ranks by ownership: rank ``index`` owns
    the contiguous block ``[lo, hi)`` of the ``n`` rows (as ``torch.tensor_split``) and holds, of every global batch,
    the rows that lie in its block. So a rank reads only its block of the split, every epoch, while the ranks
    together still train on the global batches of one process.

    A rank's share of a batch is ``B / parts`` rows on average (binomial spread). Every rank computes the whole
    permutation (8 bytes per row, in chunks of ``chunk_rows``) and thus every rank's share of every batch; a global
    batch in which some rank would hold fewer than ``min_rows`` rows (batch norm needs two per rank) is left out on
    every rank -- in practice only a short last batch -- so all ranks take the same number of steps.
    """
    batch_size = _check_batch_size(batch_size)
    n, index, parts, min_rows = int(n), int(index), int(parts), int(min_rows)
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"index must lie in [0, parts), got index {index}, parts {parts}")
    if n < 0 or min_rows < 0:
        raise ValueError(f"n and min_rows must be >= 0, got {n}, {min_rows}")
    lo, hi = _piece(n, index, parts)
    num = -(-n // batch_size)
    if num == 0:
        return ShardPlan(lo, hi, [], 0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
    his = torch.tensor([_piece(n, r, parts)[1] for r in range(parts)], dtype=torch.long)
    chunk = batch_size * max(1, int(chunk_rows) // batch_size)
    counts = torch.zeros((num, parts), dtype=torch.long)
    own_pos, own_rows = [], []
    for c0 in range(0, n, chunk):
        p = perm[c0:c0 + chunk]
        owner = torch.bucketize(p, his, right=True)
        b0, nb = c0 // batch_size, -(-p.shape[0] // batch_size)
        local = torch.arange(p.shape[0]) // batch_size
        counts[b0:b0 + nb] = torch.bincount(local * parts + owner, minlength=nb * parts).view(nb, parts)
        mine = owner == index
        own_pos.append(torch.nonzero(mine).flatten() + c0)
        own_rows.append(p[mine])
    del perm
    pos, rows = torch.cat(own_pos), torch.cat(own_rows).numpy()
    edges = torch.searchsorted(pos, torch.arange(num + 1, dtype=torch.long) * batch_size).tolist()
    keep = (counts.min(dim=1).values >= min_rows).tolist()
    out = [RankBatch(rows[edges[k]:edges[k + 1]], pos[edges[k]:edges[k + 1]] - k * batch_size,
                     min(batch_size, n - k * batch_size), k) for k in range(num) if keep[k]]
    return ShardPlan(lo, hi, out, num - len(out))


def _piece(b: int, index: int, parts: int) -> tuple[int, int]:
    """``[lo, hi)`` of piece ``index`` of ``b`` rows cut into ``parts`` contiguous pieces."""
    base, extra = divmod(b, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    try:
        r = tuple(float(v) for v in ratios)
    except TypeError:
        raise ValueError(f"ratios must be three numbers (train, val, test), got {ratios!r}") from None
    if len(r) != 3 or any(not np.isfinite(v) or v < 0 for v in r) or abs(sum(r) - 1.0) > 1e-6:
        raise ValueError(f"ratios must be three non-negative numbers summing to 1, got {ratios!r}")
    return r


def split_indices(n: int, *, split: str = "random", seed: int = 2022, ratios: Sequence[float] = (0.8, 0.1, 0.1)):
    """Row indices of the train/val/test parts of ``n`` rows.

    Sizes: ``n_train = floor(n * r0)``, ``n_val = floor(n * r1)``, test takes the rest.
    ``split="random"``: a seeded permutation (each part sorted, so reads from a memory map stay
    sequential); ``split="sequential"``: consecutive blocks in file order (time-ordered data).
    Returns three int64 arrays, or for ``"sequential"`` three ``slice`` objects.
    """
    r = _check_ratios(ratios)
    n_train = int(np.floor(n * r[0] + 1e-9))
    n_val = int(np.floor(n * r[1] + 1e-9))
    n_val = min(n_val, n - n_train)
    if split == "sequential":
        return slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, n)
    if split == "random":
        perm = np.random.default_rng(seed).permutation(n)
        parts = (perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:])
        return tuple(np.sort(p).astype(np.int64) for p in parts)
    raise ValueError(f"split must be 'random' or 'sequential', got {split!r}")


def make_splits(X: np.ndarray, y: np.ndarray, *, split: str = "random", seed: int = 2022,
                ratios: Sequence[float] = (0.8, 0.1, 0.1), lazy: bool | None = None
                ) -> tuple[CTRSplit, CTRSplit, CTRSplit]:
    """Cut encoded arrays (possibly memory-mapped, any integer dtype) into three int64 CTRSplits.

    ``lazy=True``: three :class:`MappedSplit` views of ``X`` / ``y`` instead of in-memory copies (nothing is
    read). ``None`` (default): lazy when ``X`` is memory-mapped (``np.memmap``, as the cache's arrays) and a
    ``torch.distributed`` process group of more than one rank is running -- each rank of a data-parallel run then
    reads only the rows it uses; a single process gets the in-memory copies, as always.
    """
    parts = split_indices(int(X.shape[0]), split=split, seed=seed, ratios=ratios)
    if lazy is None:
        lazy = isinstance(X, np.memmap) and _multi_rank()
    if lazy:
        return tuple(MappedSplit(source_X=X, source_y=y, rows=p) for p in parts)
    return tuple(CTRSplit(_owned(X[p], np.int64), _owned(y[p], np.float32)) for p in parts)


def _multi_rank() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _owned(a: np.ndarray, dtype) -> np.ndarray:
    """A writable in-memory array of ``dtype`` (copies memory-mapped or read-only views, casts otherwise)."""
    if isinstance(a, np.memmap) or not a.flags.writeable:
        return np.array(a, dtype=dtype)
    return a.astype(dtype, copy=False)
