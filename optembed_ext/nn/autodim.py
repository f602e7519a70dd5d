"""AutoDim: field-aware embedding dimension search (Zhao et al., WWW 2021).

Search stage (:class:`AutoDimEmbedding`): every field ``f`` has ``K`` candidate dimensions ``d_1 < ... < d_K``
(default ``{2, 8, 16, 24, 32}``). With *weight sharing* one table of ``d_K`` columns is kept and candidate
``k`` reads its first ``d_k`` columns. Each candidate embedding is brought to the model's common dimension
``D`` either by a per-field, per-candidate linear transformation (``transform="linear"``,
``t_k = e[:d_k] W_{f,k} + b_{f,k}``, initialised to keep the row's scale, bias 0) or by zero padding
(``transform="zero_pad"``), optionally followed by a batch normalisation per candidate (no affine part; the
normalised values are multiplied by the table's initial std ``bn_scale`` so their magnitude matches a table row),
and the field embedding is their mixture

    out_f = sum_k p_{f,k} t_{f,k},     p_f = gumbel_softmax(alpha_f, tau)   (training)
                                       p_f = softmax(alpha_f / tau)         (evaluation)

The architecture weights ``alpha`` (F, K) are not trained by the trainer's optimizer: the search schedule
(:mod:`optembed_ext.search.autodim`) updates them on validation batches (first-order DARTS by default) and
anneals ``tau = max(0.01, 1 - 5e-5 * step)``. :meth:`AutoDimEmbedding.chosen_dims` is the argmax dimension
per field.

Retrain stage (:class:`MixedDimEmbedding`): field ``f`` gets its own ``(cardinality_f, d_f)`` table, brought to
``D`` by the same kind of transformation, so every backbone works unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import EmbeddingModule

DEFAULT_CANDIDATES = (2, 8, 16, 24, 32)
TRANSFORMS = ("linear", "zero_pad")


def _check_dims(name: str, dims, embed_dim: int, transform: str) -> list[int]:
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or len(dims) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {dims!r}")
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int,)) or d < 1:
            raise ValueError(f"{name} must contain positive ints, got {dims!r}")
        if transform == "zero_pad" and d > embed_dim:
            raise ValueError(f"{name} entries must be <= embed_dim={embed_dim} with transform='zero_pad', "
                             f"got {d}")
        out.append(int(d))
    return out


def _scale_preserving(fan_in: int, shape) -> torch.Tensor:
    """``U(-sqrt(3 / fan_in), sqrt(3 / fan_in))``: a ``fan_in -> D`` map that keeps the per-column variance of
    its input, so a transformed candidate has the magnitude of a table row whatever its dimension."""
    bound = math.sqrt(3.0 / fan_in)
    return torch.empty(*shape).uniform_(-bound, bound)


def _check_transform(transform: str) -> None:
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")


class AutoDimEmbedding(EmbeddingModule):
    """AutoDim supernet: a mixture over candidate dimensions, with one shared ``(N, max(candidates))`` table
    (``weight_sharing=True``, default) or one ``(N, d_k)`` table per candidate (``weight_sharing=False``, the
    paper's "separate embeddings" variant).

    Args:
        feature_map: the dataset's feature map.
        embed_dim: the models' common dimension ``D`` (output width).
        candidates: candidate dimensions (default ``(2, 8, 16, 24, 32)``), sorted and de-duplicated.
        transform: ``"linear"`` (per field and candidate ``d_k -> D`` linear map, default) or ``"zero_pad"``.
        batch_norm: batch-normalise every transformed candidate (per field and output column), as the paper
            does to make the candidates' magnitudes comparable (default True).
        temperature: initial Gumbel-softmax temperature ``tau`` (the search schedule anneals it).
        weight_sharing: candidate ``k`` reads the first ``d_k`` columns of one table (default); ``False``: every
            candidate has its own table (``weight`` is then the largest candidate's).
    """

    def __init__(self, feature_map, embed_dim: int, candidates: Sequence[int] = DEFAULT_CANDIDATES,
                 transform: str = "linear", batch_norm: bool = True, temperature: float = 1.0,
                 weight_sharing: bool = True):
        super().__init__(feature_map, embed_dim)
        _check_transform(transform)
        cands = sorted(set(_check_dims("candidates", list(candidates), embed_dim, transform)))
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.candidates = cands
        self.transform = transform
        self.batch_norm = bool(batch_norm)
        self.temperature = float(temperature)
        n, f, d = self.num_features, self.num_fields, embed_dim
        dmax = cands[-1]
        self.weight = nn.Parameter(torch.empty(n, dmax))
        nn.init.xavier_uniform_(self.weight)
        self.weight_sharing = bool(weight_sharing)
        #: separate embeddings: the tables of the candidates below the largest (whose table is ``weight``)
        self.small_tables = nn.ParameterList()
        if not self.weight_sharing:
            for dk in cands[:-1]:
                t = nn.Parameter(torch.empty(n, dk))
                nn.init.xavier_uniform_(t)
                self.small_tables.append(t)
        if transform == "linear":
            self.proj_weight = nn.ParameterList()
            self.proj_bias = nn.ParameterList()
            for dk in cands:
                self.proj_weight.append(nn.Parameter(_scale_preserving(dk, (f, dk, d))))
                self.proj_bias.append(nn.Parameter(torch.zeros(f, d)))
        self.bns = nn.ModuleList(
            [nn.BatchNorm1d(f * d, affine=False) for _ in cands]) if self.batch_norm else None
        #: normalised candidates are brought back to the table's initial scale (the xavier std of the table), so
        #: that backbones summing many pairwise products (FM, DeepFM) see embeddings of the usual magnitude
        self.bn_scale = math.sqrt(2.0 / (n + dmax))
        self.alpha = nn.Parameter(torch.zeros(f, len(cands)))

    # ------------------------------------------------------------ candidates
    def candidate_embeddings(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The ``K`` transformed candidate embeddings, each ``(B, F, D)``."""
        e = self.weight[ids]                                            # (B, F, dmax)
        b = ids.shape[0]
        out = []
        for k, dk in enumerate(self.candidates):
            if self.weight_sharing or k == len(self.candidates) - 1:
                c = e[..., :dk]
            else:
                c = self.small_tables[k][ids]
            if self.transform == "linear":
                t = torch.einsum("bfi,fio->bfo", c, self.proj_weight[k]) + self.proj_bias[k]
            else:
                t = F.pad(c, (0, self.embed_dim - dk))
            if self.bns is not None:
                t = self.bns[k](t.reshape(b, -1)).reshape(b, self.num_fields, self.embed_dim) * self.bn_scale
            out.append(t)
        return out

    def selection_weights(self) -> torch.Tensor:
        """``(F, K)`` mixture weights: Gumbel-softmax samples in training, ``softmax(alpha / tau)`` otherwise."""
        if self.training:
            return F.gumbel_softmax(self.alpha, tau=self.temperature, hard=False, dim=-1)
        return torch.softmax(self.alpha / self.temperature, dim=-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.global_ids(ids)
        cands = torch.stack(self.candidate_embeddings(ids), dim=2)     # (B, F, K, D)
        p = self.selection_weights()                                    # (F, K)
        return (cands * p[None, :, :, None]).sum(dim=2)

    # ----------------------------------------------------------------- search
    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture weights (updated on validation data by the search schedule)."""
        return [self.alpha]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Everything except ``alpha``."""
        params = [p for name, p in self.named_parameters() if name != "alpha" and p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def probabilities(self) -> torch.Tensor:
        """``softmax(alpha)`` per field, ``(F, K)``."""
        return torch.softmax(self.alpha.detach(), dim=-1)

    def chosen_dims(self) -> list[int]:
        """The argmax candidate dimension of every field."""
        idx = self.alpha.detach().argmax(dim=-1).tolist()
        return [self.candidates[i] for i in idx]

    # ------------------------------------------------------------------ sizes
    def num_params(self) -> int:
        """Entries of the supernet's table(s): ``N * max(candidates)`` shared, ``N * sum(candidates)`` separate
        (transforms not counted)."""
        if self.weight_sharing:
            return self.num_features * self.candidates[-1]
        return self.num_features * sum(self.candidates)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", candidates={self.candidates}, transform={self.transform!r}, "
                f"batch_norm={self.batch_norm}, weight_sharing={self.weight_sharing}")


class MixedDimEmbedding(EmbeddingModule):
    """One table per field with its own dimension ``d_f``, brought to ``D`` by a linear map or zero padding.

    Args:
        feature_map: the dataset's feature map.
        embed_dim: output dimension ``D``.
        dims: ``d_f`` for every field (e.g. :meth:`AutoDimEmbedding.chosen_dims`).
        transform: ``"linear"`` (per-field ``d_f -> D`` map with bias, default) or ``"zero_pad"`` (``d_f <= D``).
        batch_norm: batch-normalise each field's transformed embedding (no affine part; default False).
    """

    def __init__(self, feature_map, embed_dim: int, dims: Sequence[int], transform: str = "linear",
                 batch_norm: bool = False):
        super().__init__(feature_map, embed_dim)
        _check_transform(transform)
        dims = _check_dims("dims", list(dims), embed_dim, transform)
        if len(dims) != self.num_fields:
            raise ValueError(f"dims must have one entry per field ({self.num_fields}), got {len(dims)}")
        self.dims = dims
        self.transform = transform
        self.cardinalities = [int(c) for c in feature_map.cardinalities]
        self.register_buffer("offsets", torch.as_tensor(list(feature_map.offsets), dtype=torch.long),
                             persistent=False)
        self.tables = nn.ParameterList()
        # every row starts at the scale of a row of the uniform (N, D) xavier table
        bound = math.sqrt(6.0 / (self.num_features + embed_dim))
        for card, df in zip(self.cardinalities, dims):
            self.tables.append(nn.Parameter(torch.empty(card, df).uniform_(-bound, bound)))
        if transform == "linear":
            self.proj_weight = nn.ParameterList()
            self.proj_bias = nn.ParameterList()
            for df in dims:
                self.proj_weight.append(nn.Parameter(_scale_preserving(df, (df, embed_dim))))
                self.proj_bias.append(nn.Parameter(torch.zeros(embed_dim)))
        self.bn = nn.BatchNorm1d(self.num_fields * embed_dim, affine=False) if batch_norm else None
        self.bn_scale = math.sqrt(2.0 / (self.num_features + embed_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.global_ids(ids)
        local = ids - self.offsets
        cols = []
        for f, df in enumerate(self.dims):
            e = self.tables[f][local[:, f]]                              # (B, d_f)
            if self.transform == "linear":
                e = e @ self.proj_weight[f] + self.proj_bias[f]
            else:
                e = F.pad(e, (0, self.embed_dim - df))
            cols.append(e)
        out = torch.stack(cols, dim=1)                                   # (B, F, D)
        if self.bn is not None:
            b = ids.shape[0]
            out = self.bn(out.reshape(b, -1)).reshape(b, self.num_fields, self.embed_dim) * self.bn_scale
        return out

    def num_params(self) -> int:
        """Table entries ``sum_f cardinality_f * d_f`` (the transformations are not counted)."""
        return int(sum(c * d for c, d in zip(self.cardinalities, self.dims)))

    def memory_bytes(self) -> int:
        """Tables plus the per-field transformations, float32."""
        extra = 0
        if self.transform == "linear":
            extra = sum(d * self.embed_dim + self.embed_dim for d in self.dims)
        return int((self.num_params() + extra) * self.tables[0].element_size())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dims={self.dims}, transform={self.transform!r}"
