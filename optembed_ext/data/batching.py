"""Mini-batch iteration and train/val/test splitting over encoded arrays."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .types import CTRSplit

__all__ = ["batches", "split_indices", "make_splits"]


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) so neighbouring epochs get unrelated permutations.
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(1)[0])


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
    ``(seed, epoch)``: the same pair always gives the same batches.

    ``part=(index, parts)`` (data-parallel training): every batch is cut into ``parts`` contiguous pieces (the
    first ``B % parts`` one row longer) and only piece ``index`` is read and yielded, so ``parts`` processes with
    the same arguments together see exactly the batches of one process.
    """
    if not isinstance(split, CTRSplit):
        raise TypeError(f"split must be a CTRSplit, got {type(split).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    index, parts = (0, 1) if part is None else (int(part[0]), int(part[1]))
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"part must be (index, parts) with 0 <= index < parts, got {part!r}")
    X = torch.from_numpy(np.ascontiguousarray(split.X, dtype=np.int64))
    y = torch.from_numpy(np.ascontiguousarray(split.y, dtype=np.float32))
    n = X.shape[0]
    stop = (n // batch_size) * batch_size if drop_last else n
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
                ratios: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[CTRSplit, CTRSplit, CTRSplit]:
    """Cut encoded arrays (possibly memory-mapped, any integer dtype) into three int64 CTRSplits."""
    parts = split_indices(int(X.shape[0]), split=split, seed=seed, ratios=ratios)
    return tuple(CTRSplit(_owned(X[p], np.int64), _owned(y[p], np.float32)) for p in parts)


def _owned(a: np.ndarray, dtype) -> np.ndarray:
    """A writable in-memory array of ``dtype`` (copies memory-mapped or read-only views, casts otherwise)."""
    if isinstance(a, np.memmap) or not a.flags.writeable:
        return np.array(a, dtype=dtype)
    return a.astype(dtype, copy=False)
