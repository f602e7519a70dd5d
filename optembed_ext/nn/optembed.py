"""OptEmbed embedding table (Lyu et al., CIKM 2022): learned row pruning + field-wise embedding dimensions.

One ``(N, D)`` table serves all three OptEmbed phases:

* **supernet** -- rows are pruned by a learnable per-field threshold ``t`` (``mask = ||w_r||_p > t_f``, trained
  through the straight-through estimator of :func:`optembed_ext.ops.masked_embedding`), or, with
  ``threshold_mode="feature"`` (the authors' alternative), by one threshold per row (``mask = ||w_r||_p > t_r``);
  the loss gets ``alpha * sum(exp(-t))`` over all thresholds and, while training, every sample keeps a random prefix ``k in 1..D`` of each field's
  embedding (``set_dims((B, F))``, done by :class:`optembed_ext.search.optembed.OptEmbedSupernetCallback`);
* **evolutionary search** -- the table is evaluated with the row mask frozen and candidate field dims;
* **retraining** -- the row mask ``m_e`` and the field dims ``m_d`` are frozen (:meth:`freeze`), pruned rows
  output zeros (or the field's OOV vector) and get no gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import EmbeddingModule

NORMS = (1, 2)
#: granularity of the learned pruning threshold: one per field (the paper's default) or one per row (feature value)
THRESHOLD_MODES = ("field", "feature")


def _ops():
    from .. import ops  # imported lazily: the op module loads the compiled extension

    return ops


def feature_masked_embedding(weight: torch.Tensor, ids: torch.Tensor, threshold: torch.Tensor,
                             dims: torch.Tensor | None = None, p: int = 1, oov_weight: torch.Tensor | None = None,
                             sparse: bool = False) -> torch.Tensor:
    """Masked lookup with one threshold per row: ``out[b, f, :k] = m * w[r, :k] + (1 - m) * oov[f, :k]``, zeros
    beyond ``k = dims[b, f]``, with ``r = ids[b, f]`` and ``m = step(||w[r]||_p - threshold[r])``.

    The step's derivative is the long-tail straight-through estimator of the fused op
    (:func:`optembed_ext.reference.step_ste_grad`), so ``threshold[r]`` gets ``-H(x) * <g, w[r, :k] - oov[f, :k]>``
    summed over the lookups of ``r`` and the row gets ``m * g`` on its kept prefix plus the STE term through its
    norm (over all ``D`` entries), exactly as :func:`optembed_ext.ops.masked_embedding` does with a per-field
    threshold. Ids must be valid global ids (checked by the module). ``sparse``: the table's gradient is a sparse
    COO tensor (the thresholds' stays dense). Plain autograd of PyTorch ops: compiles with ``fullgraph=True``.
    """
    from ..reference import acc_dtype, step_ste_grad

    D = weight.shape[1]
    acc = acc_dtype(weight.dtype)
    rows = F.embedding(ids, weight, sparse=sparse)                       # (B, F, D): every table gradient
    t = threshold[ids].to(acc)                                          # (B, F): the looked-up rows' thresholds
    rows_d = rows.detach()
    x_d = torch.linalg.vector_norm(rows_d, ord=p, dim=-1, dtype=acc) - t.detach()
    h = step_ste_grad(x_d)                                               # 0 for |x| > 1: no STE term there
    active = h != 0
    rows_n = torch.where(active.unsqueeze(-1), rows, rows_d)             # the norm's gradient only where H != 0
    x = torch.linalg.vector_norm(rows_n, ord=p, dim=-1, dtype=acc) - t
    hard = torch.where(torch.isnan(x_d), x_d, (x_d > 0).to(acc))
    ste = torch.where(active, h * (x - x.detach()), torch.zeros_like(x))  # value 0, slope H
    m = (hard + ste).to(weight.dtype).unsqueeze(-1)
    keep_cols = None
    if dims is not None:
        k = dims if dims.dim() == 2 else dims.unsqueeze(0)
        keep_cols = torch.arange(D, device=weight.device) < k.unsqueeze(-1)   # (1 or B, F, D)

    def prefix(v: torch.Tensor) -> torch.Tensor:  # exact zeros beyond k, no gradient there (no 0 * inf)
        return v if keep_cols is None else torch.where(keep_cols, v, torch.zeros((), dtype=v.dtype, device=v.device))

    out = m * prefix(rows)
    if oov_weight is not None:
        out = out + (1 - m) * prefix(oov_weight.unsqueeze(0))
    return prefix(out)


class OptEmbedEmbedding(EmbeddingModule):
    """OptEmbed table with per-field pruning thresholds and per-field (or per-sample) kept dimensions.

    Args:
        feature_map: the dataset's feature map.
        embed_dim: maximum embedding dimension ``D``.
        norm: ``p`` of the row norm compared with the threshold, 1 (default, as the paper) or 2.
        alpha: weight of the threshold regulariser ``alpha * sum_f exp(-t_f)`` (default 3e-4).
        threshold_lr: learning rate of the thresholds (default 1e-2, the value of the shipped configs); they get no
            weight decay (see :func:`optembed_ext.nn.make_optimizer`).
        threshold_init: initial value of every threshold (default 0).
        threshold_mode: ``"field"`` (default, the paper): one threshold per field, ``(F,)``, through the fused op;
            ``"feature"`` (the authors' code's alternative): one threshold per row (feature value), ``(N,)``,
            computed by :func:`feature_masked_embedding` (PyTorch ops; the table gradient is not fused into a
            ``fused_bwd_*`` backward but reaches ``weight.grad``, which those optimizers apply in ``step()``).
        prune_rows: learn thresholds (False: no row pruning, the OptEmbed-D supernet).
        oov: pruned rows output a learned per-field OOV vector instead of zeros.
        check_indices: validate ids in ``forward``.
        sparse: if True the gradient of the table ``weight`` is a sparse COO tensor with one row per looked-up id
            (like ``nn.Embedding(sparse=True)``), for the row-sparse optimizers (``sparse_adam``, ``fused_adam``,
            ...); the thresholds and OOV vectors keep dense gradients.
        sample_dims: the supernet's per-batch dimension sampling inside ``forward``: in training mode, while no
            dims are set and the mask is not frozen, every sample keeps a random prefix ``k in 1..D`` of each
            field (what ``set_dims((B, F))`` before every batch did; compiles and exports).

    :meth:`from_cardinalities` builds it from a list of field cardinalities and, by default, takes per-field local
    ids (``local_ids=True``).
    """

    def __init__(self, feature_map, embed_dim: int = 64, *, norm: int = 1, alpha: float = 3e-4,
                 threshold_lr: float = 1e-2, threshold_init: float = 0.0, threshold_mode: str = "field",
                 prune_rows: bool = True, oov: bool = False, check_indices: bool = True, sparse: bool = False,
                 sample_dims: bool = False):
        super().__init__(feature_map, embed_dim)
        if norm not in NORMS:
            raise ValueError(f"norm must be 1 or 2, got {norm!r}")
        for name, value in (("alpha", alpha), ("threshold_lr", threshold_lr)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not (isinstance(threshold_init, (int, float)) and math.isfinite(threshold_init)):
            raise ValueError(f"threshold_init must be a finite number, got {threshold_init!r}")
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
        self.threshold_mode = threshold_mode
        self.norm = int(norm)
        self.alpha = float(alpha)
        self.threshold_lr = float(threshold_lr)
        self.threshold_init = float(threshold_init)
        self.prune_rows = bool(prune_rows)
        self.check_indices = bool(check_indices)
        self.sparse_grad = bool(sparse)
        self.sample_dims = bool(sample_dims)
        self.weight = nn.Parameter(torch.empty(self.num_features, embed_dim))
        if self.prune_rows:
            size = self.num_fields if threshold_mode == "field" else self.num_features
            self.threshold = nn.Parameter(torch.full((size,), self.threshold_init))
        else:
            self.register_parameter("threshold", None)
        if oov:
            self.oov_weight = nn.Parameter(torch.empty(self.num_fields, embed_dim))
        else:
            self.register_parameter("oov_weight", None)
        self.register_buffer("field_of_row", feature_map.field_of_row().long(), persistent=False)
        # Frozen masks of the retraining phase (None while searching).
        self.register_buffer("fixed_row_mask", None)
        self.register_buffer("fixed_field_dims", None)
        self._dims: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.oov_weight is not None:
            nn.init.xavier_uniform_(self.oov_weight)
        if self.threshold is not None:
            with torch.no_grad():
                self.threshold.fill_(self.threshold_init)

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The frozen masks are None-valued buffers until freeze(); adopt their shape from the state dict.
        # A state dict's threshold says its mode: (F,) per field, (N,) per row (a rebuilt model need not know it).
        t = state_dict.get(prefix + "threshold")
        if (t is not None and self.threshold is not None and tuple(t.shape) != tuple(self.threshold.shape)
                and t.dim() == 1 and t.shape[0] in (self.num_fields, self.num_features)):
            self.threshold_mode = "field" if t.shape[0] == self.num_fields else "feature"
            self.threshold = nn.Parameter(torch.empty_like(t, device=self.weight.device),
                                          requires_grad=self.threshold.requires_grad)
        absent = []
        for name in ("fixed_row_mask", "fixed_field_dims"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.weight.device))
            elif key not in state_dict:
                absent.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # Pre-freeze weights (no frozen masks in the state dict) load into a frozen module and keep its masks:
        # the lottery-ticket retraining loads the supernet's initial weights this way.
        for key in absent:
            if key in missing_keys:
                missing_keys.remove(key)

    @property
    def frozen(self) -> bool:
        """True once :meth:`freeze` fixed the row mask (retraining phase)."""
        return self.fixed_row_mask is not None

    def freeze(self, row_mask: torch.Tensor | None = None, field_dims=None) -> None:
        """Fix the row mask ``m_e`` (bool (N,), None = keep all rows) and the field dims ``m_d`` ((F,), None = D).

        After freezing, the thresholds are no longer used or trained and the regulariser is 0.
        """
        device = self.weight.device
        if row_mask is None:
            row_mask = torch.ones(self.num_features, dtype=torch.bool, device=device)
        row_mask = torch.as_tensor(row_mask, device=device)
        if row_mask.dtype != torch.bool or tuple(row_mask.shape) != (self.num_features,):
            raise ValueError(f"row_mask must be a bool tensor of shape ({self.num_features},), "
                             f"got {row_mask.dtype} {tuple(row_mask.shape)}")
        self.fixed_row_mask = row_mask.clone()
        self.fixed_field_dims = None if field_dims is None else self._check_field_dims(field_dims)
        if self.threshold is not None:
            self.threshold.requires_grad_(False)

    def unfreeze(self) -> None:
        """Undo :meth:`freeze`: the thresholds decide the row mask again (and are trained), all ``D`` dims kept."""
        self.fixed_row_mask = None
        self.fixed_field_dims = None
        if self.threshold is not None:
            self.threshold.requires_grad_(True)

    def _check_field_dims(self, field_dims) -> torch.Tensor:
        dims = torch.as_tensor(field_dims, dtype=torch.long, device=self.weight.device)
        if tuple(dims.shape) != (self.num_fields,):
            raise ValueError(f"field_dims must have shape ({self.num_fields},), got {tuple(dims.shape)}")
        if dims.numel() and (int(dims.min()) < 1 or int(dims.max()) > self.embed_dim):
            raise ValueError(f"field_dims must lie in [1, {self.embed_dim}], got {dims.tolist()}")
        return dims.clone()

    # ------------------------------------------------------------------- dims
    @property
    def dims(self) -> torch.Tensor | None:
        """Kept dimensions set by :meth:`set_dims`: None (all D), (F,) or (B, F) int64."""
        return self._dims

    def set_dims(self, dims) -> None:
        """Set the kept dimensions of the next forward passes: None, (F,) or (B, F) ints in ``1..D``.

        Per-sample ``(B, F)`` dims apply only in training mode (the supernet's random prefix masks); in
        evaluation mode the full dimension (or the frozen field dims) is used.
        """
        if dims is None:
            self._dims = None
            return
        dims = torch.as_tensor(dims, dtype=torch.long, device=self.weight.device)
        if dims.dim() not in (1, 2) or dims.shape[-1] != self.num_fields:
            raise ValueError(f"dims must have shape ({self.num_fields},) or (B, {self.num_fields}), "
                             f"got {tuple(dims.shape)}")
        if dims.numel() and (int(dims.min()) < 1 or int(dims.max()) > self.embed_dim):
            raise ValueError(f"dims must lie in [1, {self.embed_dim}]")
        self._dims = dims

    def _forward_dims(self, batch: int) -> torch.Tensor | None:
        dims = self._dims
        if dims is not None and dims.dim() == 2:
            if not self.training:
                dims = None
            elif dims.shape[0] != batch:
                raise ValueError(f"per-sample dims have batch {dims.shape[0]} but ids have batch {batch}")
        if dims is None and self.sample_dims and self.training and not self.frozen:
            # the supernet's random prefix per sample and field, drawn in the graph (no host sync)
            dims = torch.randint(1, self.embed_dim + 1, (batch, self.num_fields), device=self.weight.device)
        if dims is None:
            dims = self.fixed_field_dims
        return dims

    # ---------------------------------------------------------------- forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.global_ids(ids, check_range=self.check_indices)
        ops = _ops()
        dims = self._forward_dims(ids.shape[0])
        if not self.frozen:
            if self.threshold is not None and self.threshold_mode == "feature":
                return feature_masked_embedding(self.weight, ids, self.threshold, dims, self.norm, self.oov_weight,
                                                sparse=self.sparse_grad)
            return ops.masked_embedding(self.weight, ids, self.threshold, dims, self.norm, self.oov_weight,
                                        check_indices=False, sparse=self.sparse_grad)
        # Retraining: the frozen row mask replaces the threshold; pruned rows give zeros (or OOV), no gradient.
        out = ops.masked_embedding(self.weight, ids, None, dims, self.norm, None, check_indices=False,
                                   sparse=self.sparse_grad)
        keep = self.fixed_row_mask[ids]
        out = out * keep.unsqueeze(-1).to(out.dtype)
        if self.oov_weight is not None:
            oov = self.oov_weight.unsqueeze(0).expand(ids.shape[0], -1, -1)
            if dims is not None:
                cols = torch.arange(self.embed_dim, device=ids.device)
                oov = oov * (cols < dims.unsqueeze(-1)).to(oov.dtype)
            out = out + (~keep).unsqueeze(-1).to(out.dtype) * oov
        return out

    # --------------------------------------------------------------- training
    def regularization(self) -> torch.Tensor:
        """``alpha * sum exp(-t)`` over every threshold (per field or per row) while they are learned, else 0."""
        if self.threshold is None or self.frozen or self.alpha == 0:
            return torch.zeros((), device=self.weight.device)
        return self.alpha * torch.exp(-self.threshold).sum()

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """The table (and OOV vectors) at the model's lr/wd; the thresholds at ``threshold_lr`` without decay."""
        table = [self.weight] + ([self.oov_weight] if self.oov_weight is not None else [])
        groups = [{"params": table, "lr": lr, "weight_decay": weight_decay}]
        if self.threshold is not None and not self.frozen:
            groups.append({"params": [self.threshold], "lr": self.threshold_lr, "weight_decay": 0.0})
        return groups

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def row_mask(self) -> torch.Tensor:
        """bool (N,): rows kept -- the frozen mask, else ``||w_r||_p > t_f`` (``> t_r`` per row with
        ``threshold_mode="feature"``; all True without thresholds)."""
        if self.frozen:
            return self.fixed_row_mask.clone()
        if self.threshold is None:
            return torch.ones(self.num_features, dtype=torch.bool, device=self.weight.device)
        if self.threshold_mode == "feature":
            if bool(torch.isnan(self.threshold).any()):
                raise ValueError(f"threshold[{int(torch.isnan(self.threshold).nonzero()[0, 0])}] is NaN")
            norm = torch.linalg.vector_norm(self.weight.detach(), ord=self.norm, dim=1,
                                            dtype=torch.float64 if self.weight.dtype == torch.float64 else torch.float32)
            return (norm - self.threshold.detach().to(norm.dtype)) > 0
        return _ops().row_mask(self.weight.detach(), self.field_of_row, self.threshold.detach(), self.norm)

    @torch.no_grad()
    def to_compact(self, field_dims=None, **kwargs):
        """The served table: a :class:`~optembed_ext.nn.CompactEmbedding` of the kept rows at their field dims.

        Same input contract (the same ids, local or global, go in) and, in evaluation mode, the same outputs as
        this module: kept rows at their field dims, pruned rows zeros (or the OOV vector). ``field_dims`` (F,)
        defaults to the frozen field dims, else ``D``; ``kwargs`` go to :meth:`CompactEmbedding.from_table`
        (``remap_dtype``, ``sparse``, ...).
        """
        from .compact import CompactEmbedding

        dims = self.field_dims() if field_dims is None else [int(d) for d in self._check_field_dims(field_dims)]
        kwargs.setdefault("check_indices", self.check_indices)
        oov = None if self.oov_weight is None else self.oov_weight.detach()
        compact = CompactEmbedding.from_table(self.feature_map, self.weight.detach(), self.row_mask(), dims, oov,
                                              **kwargs)
        compact.local_ids = self.local_ids
        return compact

    @torch.no_grad()
    def field_thresholds(self) -> list[float] | None:
        """One threshold per field, for reports: the thresholds themselves (``threshold_mode="field"``) or the mean
        of each field's row thresholds (``"feature"``; NaN for a field without rows); None without thresholds."""
        if self.threshold is None:
            return None
        t = self.threshold.detach().double()
        if self.threshold_mode == "field":
            return [float(v) for v in t.cpu().tolist()]
        fr = self.field_of_row.to(t.device)
        sums = torch.zeros(self.num_fields, dtype=torch.float64, device=t.device).index_add_(0, fr, t)
        counts = torch.zeros(self.num_fields, dtype=torch.float64, device=t.device).index_add_(
            0, fr, torch.ones_like(t))
        return [float(v) for v in (sums / counts).cpu().tolist()]

    def field_dims(self) -> list[int]:
        """Dimension of each field as served: the frozen field dims, else ``D`` for every field."""
        if self.fixed_field_dims is not None:
            return [int(d) for d in self.fixed_field_dims.tolist()]
        return [self.embed_dim] * self.num_fields

    def kept_rows_per_field(self) -> list[int]:
        mask = self.row_mask()
        counts = torch.zeros(self.num_fields, dtype=torch.long, device=mask.device)
        counts.index_add_(0, self.field_of_row, mask.long())
        return [int(c) for c in counts.tolist()]

    # ------------------------------------------------------------------ sizes
    def num_params(self) -> int:
        """Kept rows times their field's dimension."""
        kept = torch.tensor(self.kept_rows_per_field(), dtype=torch.long)
        dims = torch.tensor(self.field_dims(), dtype=torch.long)
        return int((kept * dims).sum())

    def memory_bytes(self) -> int:
        """Values of the kept rows at their field dims (plus the OOV vectors), at the table's element size."""
        values = self.num_params()
        if self.oov_weight is not None:
            values += int(sum(self.field_dims()))
        return int(values * self.weight.element_size())

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", norm={self.norm}, alpha={self.alpha}, prune_rows={self.prune_rows}, "
                f"threshold_mode={self.threshold_mode!r}, "
                f"oov={self.oov_weight is not None}, frozen={self.frozen}, sparse={self.sparse_grad}")

