"""Data-parallel training over ``torch.distributed`` (torchrun + DistributedDataParallel): the few collectives the
trainer, the pipeline and the evolutionary search need, and nothing when no process group is running.

Every function here is a no-op (or the identity) in a single process, so library code calls them
unconditionally and a run without torchrun behaves exactly as before.

Launch: ``torchrun --nproc_per_node N -m optembed_ext <command> ...`` -- the command line calls
:func:`init_from_env` (gloo on the CPU, NCCL when the run's device is CUDA) and :func:`destroy` at exit.

Conventions (the trainer's):

* ``batch_size`` is the *global* batch: every rank walks the same sequence of global batches (the shuffle is a
  function of ``(seed, epoch)``) and reads only its contiguous part of each (:func:`shard_bounds`), so the optimizer
  sees the same batches as in one process.
* Evaluation splits a split into contiguous per-rank blocks, gathers the predictions and labels, and computes the
  AUC / log loss of the whole split on every rank (never an average of per-rank AUCs).
* Files are written by rank 0 (:func:`is_main`); every rank reads them back after a :func:`barrier`.
* Under torchrun the command line lets rank 0 go first (:func:`hold_other_ranks`): the other ranks start the command
  only when rank 0 reaches its first collective (every helper here, the trainer's DDP, the TorchRec planner), so
  the command's own run-folder bookkeeping and data preparation never run on two ranks at the same time.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

__all__ = ["is_distributed", "rank", "world_size", "is_main", "barrier", "shard_bounds", "init_from_env",
           "destroy", "broadcast_object", "all_gather_objects", "all_reduce_sum", "gather_rows",
           "launched_by_torchrun", "SparseAwareDDP", "hold_other_ranks", "release_other_ranks", "wait_for_rank0"]


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return rank() == 0


_held = False


def hold_other_ranks() -> None:
    """Rank 0 (called by the command line before the command): the other ranks, waiting in
    :func:`wait_for_rank0`, start once rank 0 reaches its first collective (:func:`release_other_ranks`)."""
    global _held
    _held = is_distributed() and rank() == 0


def release_other_ranks() -> None:
    """Let the ranks held by :func:`hold_other_ranks` start (no-op elsewhere and after the first call); every
    collective of this package calls it first."""
    global _held
    if _held:
        _held = False
        dist.barrier()


def wait_for_rank0() -> None:
    """Ranks other than 0 (called by the command line): wait until rank 0 releases them."""
    if is_distributed() and rank() != 0:
        dist.barrier()


def barrier() -> None:
    if is_distributed():
        release_other_ranks()
        dist.barrier()


def shard_bounds(n: int, parts: int | None = None, index: int | None = None) -> tuple[int, int]:
    """``[lo, hi)`` of part ``index`` when ``n`` rows are cut into ``parts`` contiguous parts (the first
    ``n % parts`` parts one row longer, as ``torch.tensor_split``). Defaults: this process's rank and world size."""
    parts = world_size() if parts is None else int(parts)
    index = rank() if index is None else int(index)
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"index must lie in [0, {parts}), got {index}")
    base, extra = divmod(int(n), parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def launched_by_torchrun() -> bool:
    """True when the environment of torchrun (``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``) is present."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def init_from_env(device: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Start the default process group from torchrun's environment; returns True when it started one.

    The backend is NCCL when ``device`` (default: CUDA if available) is a CUDA device, gloo otherwise; on CUDA the
    process's current device becomes ``cuda:LOCAL_RANK`` so that ``torch.device("cuda")`` means this rank's GPU.
    A no-op (False) without torchrun's environment or when a group is already running.
    """
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("process group started: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def destroy() -> None:
    """Tear the default process group down (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    release_other_ranks()
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    release_other_ranks()
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values) -> np.ndarray:
    """Element-wise sum over ranks of a small float64 vector (the values themselves in one process)."""
    arr = np.asarray(values, dtype=np.float64)
    if not is_distributed():
        return arr
    release_other_ranks()
    t = torch.as_tensor(arr, device=_comm_device())
    dist.all_reduce(t)
    return t.cpu().numpy()


def gather_rows(local: np.ndarray, counts: list[int] | None = None) -> np.ndarray:
    """Concatenation in rank order of every rank's ``local`` array (same dtype and trailing shape on every rank;
    ``counts`` = rows per rank when known, else exchanged). The array itself in one process."""
    local = np.ascontiguousarray(local)
    if not is_distributed():
        return local
    if counts is None:
        counts = [int(c) for c in all_gather_objects(int(local.shape[0]))]
    if local.dtype == object:
        raise TypeError("gather_rows needs a numeric array")
    pad = max(counts)
    device = _comm_device()
    t = torch.zeros((pad, *local.shape[1:]), dtype=torch.from_numpy(local[:0].copy()).dtype, device=device)
    if local.shape[0]:
        t[:local.shape[0]] = torch.from_numpy(local).to(device)
    outs = [torch.empty_like(t) for _ in counts]
    dist.all_gather(outs, t)
    return np.concatenate([o[:c].cpu().numpy() for o, c in zip(outs, counts)], axis=0)


def same_on_every_rank(obj) -> bool:
    """True when ``obj`` pickles to the same bytes on every rank (a check for tests and assertions)."""
    if not is_distributed():
        return True
    blobs = all_gather_objects(pickle.dumps(obj))
    return all(b == blobs[0] for b in blobs)


class SparseAwareDDP(DistributedDataParallel):
    """``DistributedDataParallel`` that also knows our tables' row-sparse gradients.

    DDP expects a sparse gradient only from ``nn.Embedding(sparse=True)`` / ``nn.EmbeddingBag``; an embedding
    module of this package with ``sparse_grad`` set names its sparse parameters in ``sparse_parameters()``, and
    those are reduced as sparse tensors (gloo) here.
    """

    def __init__(self, module, *args, **kwargs):
        release_other_ranks()  # construction is a collective (the parameters are broadcast from rank 0)
        super().__init__(module, *args, **kwargs)

    def _build_params_for_reducer(self):
        parameters, expect_sparse = super()._build_params_for_reducer()
        sparse = {id(p) for m in self.module.modules() if getattr(m, "sparse_grad", False)
                  and callable(getattr(m, "sparse_parameters", None)) for p in m.sparse_parameters()}
        return parameters, [e or id(p) in sparse for p, e in zip(parameters, expect_sparse)]
