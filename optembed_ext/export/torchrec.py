"""Export a searched OptEmbed table as a TorchRec model, to serve (or fine-tune) it sharded with
``DistributedModelParallel`` when it outgrows one device.

The TorchRec model is three modules in a row:

* :class:`TorchRecRemap` (preprocessing): global ids ``(B, F)`` -> a ``KeyedJaggedTensor`` with one key per field
  whose values are the field's *local kept rows*; a pruned id becomes an empty bag (its pooled embedding is zeros,
  as in the masked model) or, with OOV vectors, the field's OOV row appended after its kept rows.
* ``sparse``: a TorchRec ``EmbeddingBagCollection`` with one ``EmbeddingBagConfig`` per field holding exactly that
  field's kept rows at its searched dimension (sum pooling of a one-id bag = the row itself). FBGEMM's fused
  kernels, which serve every sharded table, need widths divisible by 4: a table's width is its dimension rounded up
  to ``pad_to`` (default 4) with zero columns, which the over-arch drops.
* :class:`TorchRecOverArch` (dense): each field's pooled vector zero-padded to ``D`` and stacked to ``(B, F, D)``,
  then the backbone's interaction network (``predict_from_embeddings``, first-order terms read the global ids).

Its logits equal the compact model's (:func:`optembed_ext.export.compact.export_compact`) for the same weights.
:func:`shard_torchrec_model` wraps it in ``DistributedModelParallel`` with TorchRec's planner choosing the sharding
(optionally restricted, e.g. ``sharding_types=["row_wise"]``) and copies the weights into the shards.

TorchRec is optional: ``pip install torchrec fbgemm-gpu-cpu`` (versions that match the installed torch; see
``scripts/setup.sh``). This module imports it only inside its functions.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.base import EmbeddingModule
from .compact import CompactCTRModel, export_compact

__all__ = ["TorchRecRemap", "TorchRecOverArch", "TorchRecCTRModel", "torchrec_from_compact", "export_torchrec",
           "shard_torchrec_model", "torchrec_available"]


def torchrec_available() -> bool:
    """True when ``import torchrec`` works (with a loadable FBGEMM)."""
    try:
        import torchrec  # noqa: F401
    except Exception:  # ImportError, or OSError from FBGEMM's shared library
        return False
    return True


def _require_torchrec():
    try:
        import torchrec
    except Exception as err:
        raise ImportError(f"TorchRec export needs torchrec and fbgemm-gpu-cpu (or fbgemm-gpu) matching torch "
                          f"{torch.__version__}: see scripts/setup.sh ({type(err).__name__}: {err})") from err
    return torchrec


def table_name(field: str) -> str:
    return f"t_{field}"


class TorchRecRemap(nn.Module):
    """Global ids ``(B, F)`` -> ``KeyedJaggedTensor`` of per-field local rows (keys = field names).

    ``remap (N,)``: global id -> row in its field's table, ``-1`` for a pruned id (an empty bag).
    """

    def __init__(self, feature_names: Sequence[str], remap: torch.Tensor):
        super().__init__()
        self.feature_names = [str(n) for n in feature_names]
        self.register_buffer("remap", torch.as_tensor(remap, dtype=torch.long).clone())

    def forward(self, ids: torch.Tensor):
        from torchrec import KeyedJaggedTensor

        if ids.dim() != 2 or ids.shape[1] != len(self.feature_names):
            raise ValueError(f"ids must have shape (B, {len(self.feature_names)}), got {tuple(ids.shape)}")
        local = self.remap[ids.long()].t()                     # (F, B): key-major, as a KJT stores values
        keep = local >= 0
        return KeyedJaggedTensor(keys=self.feature_names, values=local[keep],
                                 lengths=keep.reshape(-1).to(torch.int32))


class _ServedOutside(EmbeddingModule):
    """Stands in for the table inside the backbone: the lookup is TorchRec's, the backbone only runs
    ``predict_from_embeddings``."""

    def forward(self, ids):  # pragma: no cover - never called
        raise RuntimeError("the embedding of a TorchRec model is its EmbeddingBagCollection")


class TorchRecOverArch(nn.Module):
    """Pooled per-field vectors (a ``KeyedTensor``) -> ``(B, F, D)`` (each field's ``D_f`` columns, zero-padded)
    -> the backbone's logits."""

    def __init__(self, backbone: nn.Module, feature_names: Sequence[str], field_dims: Sequence[int], embed_dim: int):
        super().__init__()
        self.backbone = backbone
        self.feature_names = [str(n) for n in feature_names]
        self.field_dims = [int(d) for d in field_dims]
        self.embed_dim = int(embed_dim)

    def forward(self, pooled, ids: torch.Tensor) -> torch.Tensor:
        per_field = pooled.to_dict()
        cols = []
        for name, d in zip(self.feature_names, self.field_dims):
            v = per_field[name][:, :d]
            cols.append(F.pad(v, (0, self.embed_dim - d)))
        emb = torch.stack(cols, dim=1)
        return self.backbone.predict_from_embeddings(emb, ids)


class TorchRecCTRModel(nn.Module):
    """``ids (B, F) -> logits (B,)``: :class:`TorchRecRemap` -> ``EmbeddingBagCollection`` (``self.sparse``) ->
    :class:`TorchRecOverArch` (``self.over``)."""

    def __init__(self, remap: TorchRecRemap, sparse: nn.Module, over: TorchRecOverArch):
        super().__init__()
        self.remap = remap
        self.sparse = sparse
        self.over = over

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.over(self.sparse(self.remap(ids)), ids)


@torch.no_grad()
def torchrec_from_compact(compact: CompactCTRModel, device: torch.device | str = "cpu",
                          pad_to: int = 4) -> TorchRecCTRModel:
    """The TorchRec model serving ``compact``'s tables and backbone (same weights, same logits); each table's
    width is rounded up to a multiple of ``pad_to`` with zero columns (1: the searched dims exactly)."""
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be a positive int, got {pad_to!r}")
    _require_torchrec()
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

    from ..models import build_model

    device = torch.device(device)
    emb = compact.embedding
    fmap = compact.feature_map
    names = [str(n) for n in fmap.field_names]
    D = int(emb.embed_dim)
    dims = [int(d) for d in emb.field_dims.tolist()]
    starts = [int(o) for o in fmap.offsets] + [int(fmap.num_features)]
    remap = emb.remap.long().cpu().clone()
    oov = emb.oov_weight
    tables, weights = [], []
    for f, name in enumerate(names):
        rows = emb.field_rows[f]
        table = emb.table(f).detach().cpu() if dims[f] > 0 else torch.zeros(0, 0)
        if dims[f] == 0:
            remap[starts[f]:starts[f + 1]] = -1  # a zero-width field serves zeros: every bag empty
        elif oov is not None:  # pruned ids of this field read its OOV vector, stored as one more row
            block = remap[starts[f]:starts[f + 1]]
            block[block < 0] = rows
            table = torch.cat([table, oov[f, :dims[f]].detach().cpu().unsqueeze(0)])
        # TorchRec tables need at least one row and one column: a field with none is never looked up
        width = -(-max(dims[f], 1) // pad_to) * pad_to
        if table.shape[0] == 0:
            table = torch.zeros(1, width)
        table = F.pad(table, (0, width - table.shape[1]))
        tables.append(EmbeddingBagConfig(name=table_name(name), embedding_dim=width, num_embeddings=table.shape[0],
                                         feature_names=[name], pooling=PoolingType.SUM))
        weights.append(table.to(emb.packed.dtype))
    ebc = EmbeddingBagCollection(tables=tables, device=device)
    for name, w in zip(names, weights):
        ebc.embedding_bags[table_name(name)].weight.copy_(w)
    placeholder = _ServedOutside(fmap, D)
    backbone = build_model(compact.model_name, fmap, placeholder, **compact.model_cfg)
    state = {k: v for k, v in compact.model.state_dict().items() if not k.startswith("embedding.")}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("embedding.")]:
        raise ValueError(f"backbone mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = TorchRecCTRModel(TorchRecRemap(names, remap), ebc, TorchRecOverArch(backbone, names, dims, D))
    return model.to(device).eval()


def export_torchrec(source, *, device: torch.device | str = "cpu", pad_to: int = 4, **kwargs) -> TorchRecCTRModel:
    """TorchRec model of a finished OptEmbed run folder, its ``optembed_result.pt``, the dict of
    :func:`optembed_ext.results.load_search_result`, a live masked model or a :class:`CompactCTRModel`
    (``kwargs`` go to :func:`export_compact`)."""
    compact = source if isinstance(source, CompactCTRModel) else export_compact(source, **kwargs)
    return torchrec_from_compact(compact.cpu().eval(), device=device, pad_to=pad_to)


@torch.no_grad()
def shard_torchrec_model(model: TorchRecCTRModel, *, process_group=None, device: torch.device | str | None = None,
                         sharding_types: Sequence[str] | None = None, compute_kernels: Sequence[str] | None = None):
    """``DistributedModelParallel`` of ``model`` over ``process_group`` (default: the world), TorchRec's
    planner choosing each table's sharding among ``sharding_types`` (None: all it supports, e.g.
    ``data_parallel``, ``table_wise``, ``row_wise``, ``column_wise``) and ``compute_kernels``; the weights of
    ``model`` are copied into the shards. Every rank passes the same ``model`` (built from the same source).

    Returns ``(dmp, plan)``. Call ``dmp(ids)`` with each rank's own batch of global ids.
    """
    _require_torchrec()
    import torch.distributed as dist
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv

    from ..train.distributed import release_other_ranks

    release_other_ranks()
    pg = process_group if process_group is not None else dist.group.WORLD
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(pg) == "nccl" else \
            torch.device("cpu")
    device = torch.device(device)
    full = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    constraints = None
    if sharding_types is not None or compute_kernels is not None:
        constraints = {name: ParameterConstraints(sharding_types=list(sharding_types) if sharding_types else None,
                                                  compute_kernels=list(compute_kernels) if compute_kernels else None)
                       for name in model.sparse.embedding_bags}
    sharders = [EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=dist.get_world_size(pg),
                                                         compute_device=device.type), constraints=constraints)
    plan = planner.collective_plan(model, sharders, pg)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), device=device, plan=plan,
                                   sharders=sharders)
    _copy_into_shards(dmp, full)
    dmp.eval()
    return dmp, plan


def _copy_into_shards(dmp: nn.Module, full: dict) -> None:
    """Write the unsharded tensors ``full`` into ``dmp``'s parameters and buffers (each rank its own shards)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        DTensor = ()
    state = dmp.state_dict()
    missing = []
    for key, value in state.items():
        src = full.get(key[len("module."):] if key.startswith("module.") and key not in full else key)
        if src is None:
            missing.append(key)
            continue
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                region = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                                 shard.metadata.shard_sizes))
                shard.tensor.copy_(src[region].to(shard.tensor.dtype))
        elif DTensor and isinstance(value, DTensor):
            raise TypeError(f"{key}: DTensor shards are not supported by this copy; use ShardedTensor sharding")
        else:
            value.copy_(src.to(value.device, value.dtype))
    if missing:
        raise KeyError(f"sharded model has tensors the source model lacks: {missing[:5]}")
