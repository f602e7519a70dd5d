"""Inference model of a searched CTR model whose network reads only the kept embedding dimensions.

The compact export (:mod:`optembed_ext.export.compact`) stores only the kept rows and dims but still hands the
backbone a zero-padded ``(B, F, D)`` tensor, so the network costs what the uniform model costs. Here the network
itself shrinks to the searched widths: with ``d_f`` the kept dimensions of field ``f``,

- fields are grouped by ``d_f`` (one table and one gather per distinct width, no padding); fields with
  ``d_f = 0`` (or with every row pruned and no OOV vector) are dropped entirely;
- the first layer of every MLP (DeepFM, FNN, IPNN, Wide&Deep, DCN's deep part, AutoInt+) keeps only the input
  columns of the kept dims (the padded columns only ever multiplied zeros);
- FM's second-order term and IPNN's inner products are computed on the dims both fields keep (a field pair with a
  dropped field is left out, with its MLP columns);
- DCN's cross layers run on the kept coordinates: a padded coordinate of ``x_l`` does not depend on the input
  (it is the sum of the biases ``b_0 .. b_{l-1}`` there), so its share of each ``x_l . w_l`` and of the final
  combination is a constant folded into the reduced layers;
- AutoInt's first attention projections read each field's kept dims (a dropped field is a zero token, as in the
  masked model); its later layers are unchanged.

The logits equal the masked model's (up to float summation order). Latency against the uniform model:
:func:`compare_inference`.

>>> fast = export_inference(masked_model)              # or a run folder / search result, as export_compact
>>> compare_inference(fast, uniform_model, ids)        # ms per batch and samples/s of both
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .compact import _table_of, load_run, masked_model_from_result, measure_latency

__all__ = ["InferenceCTRModel", "export_inference", "inference_from_model", "compare_inference"]

SUPPORTED = ("fm", "deepfm", "dcn", "fnn", "ipnn", "wd", "autoint")


def _sliced_linear(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    """``linear`` restricted to the input columns ``cols`` (same bias)."""
    out = nn.Linear(int(cols.numel()), linear.out_features, bias=linear.bias is not None)
    out = out.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[:, cols])
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out


def _sliced_mlp(mlp: nn.Module, cols: torch.Tensor) -> nn.Module:
    """A copy of an :class:`~optembed_ext.models.layers.MLP` whose first Linear reads only ``cols``."""
    new = copy.deepcopy(mlp)
    layers = new.mlp
    if len(layers) and isinstance(layers[0], nn.Linear):
        layers[0] = _sliced_linear(layers[0], cols)
    return new


class InferenceCTRModel(nn.Module):
    """A searched CTR model reduced to its kept rows, fields and dims (see the module docstring).

    ``forward(ids (B, F) global ids) -> logits (B,)``, inference only (build it from a model in eval mode).

    Attributes:
        field_dims: kept dims of each field (0 = dropped).
        groups: per distinct width ``d``: the fields (original order) served by one ``(rows, d)`` table.
    """

    def __init__(self, model: nn.Module, model_name: str, weight: torch.Tensor, oov: torch.Tensor | None,
                 row_mask: torch.Tensor | None, field_dims: Sequence[int]):
        super().__init__()
        if model_name not in SUPPORTED:
            raise ValueError(f"inference export supports the backbones {SUPPORTED}, got {model_name!r}")
        fmap = model.feature_map
        nf, D = int(fmap.num_fields), int(weight.shape[1])
        dims = [max(0, min(D, int(d))) for d in field_dims]
        if len(dims) != nf:
            raise ValueError(f"field_dims has {len(dims)} entries, the model has {nf} fields")
        offsets = [int(o) for o in fmap.offsets]
        cards = [int(c) for c in fmap.cardinalities]
        dev, dtype = weight.device, weight.dtype
        mask = None if row_mask is None else torch.as_tensor(row_mask, device=dev).bool()
        for f in range(nf):  # a field that serves only zeros is dropped as well
            if dims[f] and oov is None and mask is not None and not bool(mask[offsets[f]:offsets[f] + cards[f]].any()):
                dims[f] = 0
        self.model_name = model_name
        self.num_fields, self.embed_dim = nf, D
        self.field_dims = dims
        widths = sorted({d for d in dims if d > 0})
        # remap: global id -> row of its group's table; pruned rows -> the field's OOV row (oov[f, :d] or zeros)
        remap = torch.zeros(int(fmap.num_features), dtype=torch.long, device=dev)
        self.tables = nn.ParameterList()
        group_fields: list[list[int]] = []
        for d in widths:
            fields = [f for f in range(nf) if dims[f] == d]
            chunks, base = [], 0
            for f in fields:
                lo, hi = offsets[f], offsets[f] + cards[f]
                kept = torch.ones(cards[f], dtype=torch.bool, device=dev) if mask is None else mask[lo:hi]
                rows = weight[lo:hi][kept, :d]
                local = torch.full((cards[f],), base + int(rows.shape[0]), dtype=torch.long, device=dev)
                local[kept] = base + torch.arange(int(rows.shape[0]), device=dev)
                remap[lo:hi] = local
                fill = oov[f, :d].reshape(1, d) if oov is not None else torch.zeros(1, d, dtype=dtype, device=dev)
                chunks += [rows, fill.to(dtype)]
                base += int(rows.shape[0]) + 1
            self.tables.append(nn.Parameter(torch.cat(chunks).detach().clone(), requires_grad=False))
            group_fields.append(fields)
        self.groups = [(d, fields) for d, fields in zip(widths, group_fields)]
        self.register_buffer("remap", remap.to(torch.int32 if remap.numel() < 2 ** 31 else torch.long))
        for i, (_, fields) in enumerate(self.groups):
            self.register_buffer(f"group_cols_{i}", torch.tensor(fields, dtype=torch.long, device=dev),
                                 persistent=False)
        # columns of the flattened (F * D) embedding that the concatenated groups hold, in their order
        flat_cols = [f * D + j for d, fields in self.groups for f in fields for j in range(d)]
        self.kept_width = len(flat_cols)
        cols = torch.tensor(flat_cols, dtype=torch.long, device=dev)
        self.linear = copy.deepcopy(model.linear) if getattr(model, "has_linear", False) else None
        self._build_head(model, cols)
        self.eval()

    # ----------------------------------------------------------------------------------------------- heads
    def _build_head(self, model: nn.Module, cols: torch.Tensor) -> None:
        name, nf, D = self.model_name, self.num_fields, self.embed_dim
        dev = cols.device
        self.mlp = None
        if name in ("deepfm", "fnn", "wd"):
            self.mlp = _sliced_mlp(model.mlp, cols)
        elif name == "ipnn":
            rows, cols_ = torch.triu_indices(nf, nf, offset=1).tolist()
            pair_of = {(i, j): k for k, (i, j) in enumerate(zip(rows, cols_))}
            order = self._pair_order()
            pair_cols = [nf * D + pair_of[(min(i, j), max(i, j))] for i, j in order]
            self.mlp = _sliced_mlp(model.mlp, torch.cat([cols, torch.tensor(pair_cols, dtype=torch.long,
                                                                              device=dev)]))
        elif name == "dcn":
            self._build_dcn(model, cols)
        elif name == "autoint":
            self._build_autoint(model)

    def _pair_order(self) -> list[tuple[int, int]]:
        """The (field, field) pairs :meth:`_inner_products` returns, in its column order (kept fields only)."""
        order = []
        for a, (_, fa) in enumerate(self.groups):
            for b in range(a, len(self.groups)):
                fb = self.groups[b][1]
                if a == b:
                    order += [(fa[i], fa[j]) for i in range(len(fa)) for j in range(i + 1, len(fa))]
                else:
                    order += [(i, j) for i in fa for j in fb]
        return order

    def _build_dcn(self, model: nn.Module, cols: torch.Tensor) -> None:
        nfD = self.num_fields * self.embed_dim
        kept = torch.zeros(nfD, dtype=torch.bool, device=cols.device)
        kept[cols] = True
        pad = ~kept
        # padded coordinates: x_l[pad] = b_0 + ... + b_{l-1} (input-independent); c_l = w_l[pad] . x_l[pad]
        z = torch.zeros(int(pad.sum()), dtype=torch.float64, device=cols.device)
        ws, bs, consts = [], [], []
        for w, b in zip(model.cross.w, model.cross.b):
            wv = w.weight.detach().reshape(-1)
            consts.append(float((wv[pad].double() * z).sum()))
            ws.append(wv[cols].clone())
            bs.append(b.detach()[cols].clone())
            z = z + b.detach()[pad].double()
        self.cross_w = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in ws])
        self.cross_b = nn.ParameterList([nn.Parameter(b, requires_grad=False) for b in bs])
        self.register_buffer("cross_c", torch.tensor(consts, dtype=model.combine.weight.dtype, device=cols.device))
        self.deep = copy.deepcopy(model.mlp) if len(model.mlp.mlp) else None
        if self.deep is not None and len(self.deep.mlp) and isinstance(self.deep.mlp[0], nn.Linear):
            self.deep.mlp[0] = _sliced_linear(self.deep.mlp[0], cols)
        deep_dim = model.combine.in_features - nfD
        comb_cols = torch.cat([cols, nfD + torch.arange(deep_dim, device=cols.device)])
        self.combine = _sliced_linear(model.combine, comb_cols)
        with torch.no_grad():
            self.combine.bias += (model.combine.weight.detach()[0, :nfD][pad].double() * z).sum().to(
                self.combine.bias.dtype)

    def _build_autoint(self, model: nn.Module) -> None:
        self.attention = copy.deepcopy(model.attention)
        first = self.attention[0]
        dim = first.output_dim
        for layer in self.attention:
            dim = layer.output_dim
        # the tokens come in group order (dropped fields last, as zero tokens): permute the output columns
        perm = [f for _, fields in self.groups for f in fields]
        perm += [f for f in range(self.num_fields) if self.field_dims[f] == 0]
        self.token_order = perm
        out_cols = torch.tensor([f * dim + j for f in perm for j in range(dim)], dtype=torch.long)
        self.output = _sliced_linear(model.output, out_cols.to(model.output.weight.device))
        flat_cols = [f * self.embed_dim + j for d, fields in self.groups for f in fields for j in range(d)]
        self.mlp = None if model.mlp is None else _sliced_mlp(
            model.mlp, torch.tensor(flat_cols, dtype=torch.long, device=model.output.weight.device))

    # --------------------------------------------------------------------------------------------- forward
    def _lookup(self, ids: torch.Tensor) -> list[torch.Tensor]:
        rows = self.remap[ids]
        return [F.embedding(rows.index_select(1, getattr(self, f"group_cols_{i}")), table)
                for i, table in enumerate(self.tables)]

    @staticmethod
    def _flat(parts: list[torch.Tensor], batch: int, like: torch.Tensor) -> torch.Tensor:
        if not parts:
            return like.new_zeros(batch, 0)
        return torch.cat([p.reshape(batch, -1) for p in parts], dim=1)

    def _fm(self, parts: list[torch.Tensor], batch: int, like: torch.Tensor) -> torch.Tensor:
        if not parts:
            return like.new_zeros(batch)
        s = parts[-1].sum(dim=1)  # widest group first: the narrower ones add into its leading dims
        if len(parts) > 1:
            s = s.clone()
            for (d, _), p in zip(self.groups[:-1], parts[:-1]):
                s[:, :d] += p.sum(dim=1)
        sq = sum(p.pow(2).sum(dim=(1, 2)) for p in parts)
        return 0.5 * (s.pow(2).sum(dim=1) - sq)

    def _inner_products(self, parts: list[torch.Tensor], batch: int, like: torch.Tensor) -> torch.Tensor:
        out = []
        for a, ea in enumerate(parts):
            da = self.groups[a][0]
            for b in range(a, len(parts)):
                g = torch.bmm(ea, parts[b][..., :da].transpose(1, 2))  # (B, F_a, F_b) on the dims both keep
                if a == b:
                    n = ea.shape[1]
                    iu = torch.triu_indices(n, n, offset=1, device=g.device)
                    out.append(g[:, iu[0], iu[1]])
                else:
                    out.append(g.reshape(batch, -1))
        return torch.cat(out, dim=1) if out else like.new_zeros(batch, 0)

    def _autoint_tokens(self, parts: list[torch.Tensor], batch: int, like: torch.Tensor) -> torch.Tensor:
        first = self.attention[0]
        n_drop = self.num_fields - sum(len(f) for _, f in self.groups)

        def project(lin: nn.Linear | None):
            if lin is None:
                return None
            ys = [p @ lin.weight[:, :d].t() for (d, _), p in zip(self.groups, parts)]
            if n_drop:
                ys.append(like.new_zeros(batch, n_drop, lin.out_features))
            return torch.cat(ys, dim=1)

        q, k, v, res = (project(first.w_q), project(first.w_k), project(first.w_v), project(first.w_res))
        h, d = first.num_heads, first.attention_dim
        f = self.num_fields

        def split(t):
            return t.view(batch, f, h, d).transpose(1, 2)

        scores = split(q) @ split(k).transpose(-1, -2)
        if first.use_scale:
            scores = scores / d ** 0.5
        out = (scores.softmax(dim=-1) @ split(v)).transpose(1, 2).reshape(batch, f, h * d)
        if res is not None:
            out = out + res
        x = torch.relu(out)
        for layer in list(self.attention)[1:]:
            x = layer(x)
        return x

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (B, F) global ids -> logits (B,)."""
        if ids.dim() != 2 or ids.shape[1] != self.num_fields:
            raise ValueError(f"ids must have shape (B, {self.num_fields}), got {tuple(ids.shape)}")
        batch = ids.shape[0]
        like = self.remap.new_zeros((), dtype=self._dtype())
        parts = self._lookup(ids)
        name = self.model_name
        out = self.linear(ids) if self.linear is not None else None
        if name in ("fm", "deepfm"):
            fm = self._fm(parts, batch, like)
            out = out + fm
        if name in ("deepfm", "fnn", "wd"):
            deep = self.mlp(self._flat(parts, batch, like)).squeeze(1)
            out = deep if out is None else out + deep
        elif name == "ipnn":
            x = torch.cat([self._flat(parts, batch, like), self._inner_products(parts, batch, like)], dim=1)
            out = self.mlp(x).squeeze(1)
        elif name == "dcn":
            x0 = self._flat(parts, batch, like)
            x = x0
            for w, b, c in zip(self.cross_w, self.cross_b, self.cross_c):
                x = x0 * (x @ w + c).unsqueeze(1) + b + x
            pieces = [x]
            if self.deep is not None:
                pieces.append(self.deep(x0))
            out = self.combine(torch.cat(pieces, dim=1)).squeeze(1)
        elif name == "autoint":
            tokens = self._autoint_tokens(parts, batch, like)
            out = self.output(tokens.flatten(1)).squeeze(1)
            if self.mlp is not None:
                out = out + self.mlp(self._flat(parts, batch, like)).squeeze(1)
        return out

    def _dtype(self) -> torch.dtype:
        for t in self.tables:
            return t.dtype
        return torch.float32

    def extra_repr(self) -> str:
        return (f"model={self.model_name!r}, fields={self.num_fields} ({sum(d > 0 for d in self.field_dims)} kept), "
                f"input width {self.kept_width} of {self.num_fields * self.embed_dim}, "
                f"widths={[d for d, _ in self.groups]}")


# --------------------------------------------------------------------------------------------------- export
@torch.no_grad()
def inference_from_model(model: nn.Module, *, model_name: str | None = None, row_mask: torch.Tensor | None = None,
                         field_dims: Sequence[int] | None = None) -> InferenceCTRModel:
    """Inference model of a CTR model whose embedding is a (masked) ``(N, D)`` table (OptEmbed or uniform);
    ``row_mask`` / ``field_dims`` override the embedding's own, as in
    :func:`~optembed_ext.export.compact.compact_from_model`. The source should be in eval mode (batch norm)."""
    emb = getattr(model, "embedding", None)
    if emb is None:
        raise TypeError(f"model must be a CTR model with an `embedding` attribute, got {type(model).__name__}")
    weight, oov, own_mask, own_dims = _table_of(emb)
    mask = own_mask if row_mask is None else torch.as_tensor(row_mask, device=weight.device)
    dims = own_dims if field_dims is None else [int(d) for d in field_dims]
    if dims is None:
        dims = [int(weight.shape[1])] * int(model.feature_map.num_fields)
    name = model_name or getattr(model, "name", "")
    return InferenceCTRModel(model, name, weight, oov, mask, dims)


def export_inference(source, *, model_name: str | None = None, row_mask: torch.Tensor | None = None,
                     field_dims: Sequence[int] | None = None) -> InferenceCTRModel:
    """Inference model of ``source``: a finished OptEmbed run folder (or its ``optembed_result.pt``), the dict of
    :func:`optembed_ext.results.load_search_result`, or a live CTR model (:func:`inference_from_model`)."""
    if isinstance(source, nn.Module):
        return inference_from_model(source, model_name=model_name, row_mask=row_mask, field_dims=field_dims)
    result = source if isinstance(source, dict) else load_run(source)
    model = masked_model_from_result(result)
    return inference_from_model(model, model_name=result["model_name"], row_mask=row_mask, field_dims=field_dims)


# -------------------------------------------------------------------------------------------------- latency
def _latency(model: nn.Module, ids: torch.Tensor, repeats: int, warmup: int) -> dict:
    """:func:`~optembed_ext.export.compact.measure_latency` plus the samples per second at its median."""
    lat = measure_latency(model, ids, repeats=repeats, warmup=warmup)
    return {**lat, "samples_per_s": ids.shape[0] / (lat["median_ms"] / 1e3)}


def compare_inference(model: InferenceCTRModel, others: dict[str, nn.Module], ids: torch.Tensor, *,
                      repeats: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Latency per batch and samples/s of ``model`` and of each of ``others`` (e.g. ``{"uniform": ...,
    "masked": ...}``) on ``ids``, measured in the same run, with the input width each network reads."""
    out: dict[str, Any] = {"batch_size": int(ids.shape[0]),
                           "input_width": {"inference": model.kept_width,
                                           "full": model.num_fields * model.embed_dim}}
    out["inference"] = _latency(model, ids, repeats, warmup)
    for name, other in others.items():
        out[name] = _latency(other, ids, repeats, warmup)
        out[f"speedup_vs_{name}"] = out[name]["median_ms"] / max(out["inference"]["median_ms"], 1e-12)
    return out
