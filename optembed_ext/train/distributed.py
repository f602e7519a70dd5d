"""Data-parallel training over ``torch.distributed`` (torchrun + DistributedDataParallel): the few collectives the
trainer, the pipeline and the evolutionary search need, and nothing when no process group is running.

Every function here is a no-op (or the identity) in a single process, so library code calls them
unconditionally and a run without torchrun behaves exactly as before.

Launch: ``torchrun --nproc_per_node N -m optembed_ext <command> ...`` -- the command line calls
:func:`init_from_env` (gloo on the CPU, NCCL when the run's device is CUDA) and :func:`destroy` at exit.

Conventions (the trainer's):

* ``batch_size`` is the *global* batch: every rank walks the same sequence of global batches (the shuffle is a
  function of ``(seed, epoch)``), so the optimizer sees the same batches as in one process; rank ``r`` owns the
  contiguous block :func:`shard_bounds` of the training split and holds, of every global batch, the rows that lie in
  its block (:func:`optembed_ext.data.batching.shard_plan`), so over a memory-mapped cache it reads only its block.
* Batch norm: :func:`sync_batch_norm` makes its statistics those of the global batch (``torch.nn.SyncBatchNorm`` on
  CUDA; :class:`CPUSyncBatchNorm`, the same reductions over gloo, on the CPU, where torch's has no kernels); without
  it every rank normalises with its own rows and :func:`broadcast_batch_norm_stats` gives every rank rank 0's
  running statistics before an evaluation or a checkpoint.
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

__all__ = ["is_distributed", "rank", "world_size", "is_main", "barrier", "shard_bounds", "init_from_env",
           "destroy", "broadcast_object", "all_gather_objects", "all_reduce_sum", "gather_rows",
           "launched_by_torchrun", "SparseAwareDDP", "hold_other_ranks", "release_other_ranks", "wait_for_rank0",
           "CPUSyncBatchNorm", "sync_batch_norm", "broadcast_batch_norm_stats"]


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


# ------------------------------------------------------------------------------------------------- batch norm
class _GlobalBatchNorm(torch.autograd.Function):
    """Batch norm over the rows of every rank: one all-reduce of (sum, sum of squares, count) forward, one of
    (sum of grad, sum of grad * x_hat) backward -- the reductions ``torch.nn.SyncBatchNorm`` performs with its CUDA
    kernels. Parameter gradients stay local (DDP averages them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        x = x.contiguous()
        C = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, C] + [1] * (x.dim() - 2)
        xd = x.double()
        stats = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_tensor([x.numel() // max(C, 1)])])
        dist.all_reduce(stats, group=group)
        n = float(stats[-1])
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)} over all ranks")
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0.0)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            running_var.mul_(1 - momentum).add_((var * (n / (n - 1))).to(running_var.dtype), alpha=momentum)
        invstd = (var + eps).rsqrt().to(x.dtype)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.view(shape)
        out = xhat if weight is None else xhat * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.n, ctx.group, ctx.dims, ctx.shape, ctx.has_bias = n, group, dims, shape, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        xhat, weight, invstd = ctx.saved_tensors
        dims, shape, C = ctx.dims, ctx.shape, xhat.shape[1]
        grad = grad.contiguous()
        sum_g = grad.sum(dims)
        sum_gx = (grad * xhat).sum(dims)
        total = torch.cat([sum_g, sum_gx]).double()
        dist.all_reduce(total, group=ctx.group)
        mean_g = (total[:C] / ctx.n).to(grad.dtype).view(shape)
        mean_gx = (total[C:] / ctx.n).to(grad.dtype).view(shape)
        scale = invstd if weight is None else invstd * weight
        grad_x = (grad - mean_g - xhat * mean_gx) * scale.view(shape)
        return (grad_x, None if weight is None else sum_gx, sum_g if ctx.has_bias else None,
                None, None, None, None, None)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the rows of every rank for CPU modules (gloo), what ``torch.nn.SyncBatchNorm`` does on CUDA:
    in training mode under a process group of more than one rank the statistics are those of all ranks' rows
    together (:class:`_GlobalBatchNorm`); otherwise (evaluation, one process) it is plain batch norm over any input
    of shape ``(N, C, ...)``. Torch's own ``SyncBatchNorm`` cannot serve here: its kernels are CUDA-only in torch
    2.14 and DistributedDataParallel refuses it in a CPU module."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}D input")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not is_distributed():
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return _GlobalBatchNorm.apply(input, self.weight, self.bias, running_mean, running_var, self.eps, factor,
                                      group)


_SYNCED = (nn.SyncBatchNorm, CPUSyncBatchNorm)


def _convert_batch_norm(module: nn.Module, cls, group) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _SYNCED):
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_batch_norm(child, cls, group))
    return out


def sync_batch_norm(module: nn.Module, device=None) -> int:
    """Make every ``BatchNorm*d`` inside ``module`` (in place, the same parameters and buffers) a synchronised one
    (``torch.nn.SyncBatchNorm`` when ``device`` is CUDA, :class:`CPUSyncBatchNorm` on the CPU); returns how many it
    converted. The statistics then travel over their own process group (created here, a collective: every rank
    calls this at the same point). A no-op (0) in one process or without batch norm."""
    if not is_distributed():
        return 0
    found = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, _SYNCED)]
    release_other_ranks()
    if not found:
        return 0
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise TypeError("sync_batch_norm converts the batch norms inside a model, not a batch-norm module itself")
    cuda = torch.device(device).type == "cuda" if device is not None else False
    group = dist.new_group(backend=None if cuda else "gloo")
    for name, child in module.named_children():
        module.add_module(name, _convert_batch_norm(child, nn.SyncBatchNorm if cuda else CPUSyncBatchNorm, group))
    return len(found)


def broadcast_batch_norm_stats(module: nn.Module, src: int = 0) -> None:
    """Rank ``src``'s running statistics in every batch norm of ``module`` on every rank (no-op in one process)."""
    if not is_distributed():
        return
    release_other_ranks()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                if buf is not None:
                    if buf.device.type == "cpu" or dist.get_backend() == "nccl":
                        dist.broadcast(buf, src=src)
                    else:
                        tmp = buf.cpu()
                        dist.broadcast(tmp, src=src)
                        buf.copy_(tmp)
