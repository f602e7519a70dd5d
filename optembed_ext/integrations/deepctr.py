"""DeepCTR-Torch adapter: one compression table in place of a model's ``embedding_dict``.

DeepCTR-Torch keeps one ``nn.Embedding`` per sparse feature in ``model.embedding_dict``, looks each feature up
with its own (local, from 0) ids, adds an L2 penalty over ``model.regularization_weight`` and sums the loss over
the batch. :func:`replace_embeddings` makes, in place:

* ``model.embedding_dict`` a :class:`DeepCTREmbeddingDict` holding one table over the sparse features (per-field
  local ids, ``local_ids=True``), looked up once per batch by the model's ``input_from_feature_columns``;
* the L2 list point at the new table's weights (never at the thresholds);
* ``model.get_regularization_loss()`` include the table's regulariser scaled for the summed loss
  (:func:`optembed_ext.nn.regularization` with ``loss_reduction="sum"`` and the batch size);
* ``model.compile("adam")`` (a named optimizer) build :func:`optembed_ext.nn.make_optimizer` at DeepCTR's default
  learning rate, so the thresholds get their own optimizer there too.

Then::

    from optembed_ext.integrations import deepctr as dc
    table = dc.replace_embeddings(model, "optembed")           # model = deepctr_torch.models.DeepFM(...)
    model.compile(optembed_ext.nn.make_optimizer(model, torch.optim.Adam, lr=1e-3), "binary_crossentropy",
                  metrics=["auc"])
    model.fit(x, y, validation_data=(vx, vy), callbacks=[dc.SupernetCallback(model)])

Only ``SparseFeat`` columns with distinct embedding names go into the table (``DenseFeat`` columns pass through;
``VarLenSparseFeat`` and shared embeddings are refused). The linear part keeps its own tables.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..nn.plugin import SupernetHook, _copy_table, make_optimizer, make_table, regularization

#: learning rates of DeepCTR-Torch's named optimizers (``BaseModel._get_optim``)
DEEPCTR_LRS = {"sgd": 0.01, "adam": 1e-3, "adagrad": 1e-2, "rmsprop": 1e-2}

__all__ = ["is_deepctr_model", "DeepCTREmbeddingDict", "replace_embeddings", "SupernetCallback", "table_of",
           "model_input"]


def is_deepctr_model(model) -> bool:
    """True for a DeepCTR-Torch ``BaseModel`` (``embedding_dict``, ``feature_index``, ...)."""
    return all(hasattr(model, a) for a in ("embedding_dict", "feature_index", "input_from_feature_columns",
                                           "regularization_weight"))


def _kind(column) -> str:
    return type(column).__name__


class _FieldView(nn.Module):
    """``embedding_dict[name]``: the field of the shared table (lookups go through the model's joint lookup)."""

    def __init__(self, field: int, name: str):
        super().__init__()
        self.field, self.name = field, name

    def forward(self, ids):  # pragma: no cover - only reached by code that bypasses input_from_feature_columns
        raise NotImplementedError(f"the field {self.name!r} is served by the shared table: look it up through "
                                  "model.input_from_feature_columns (one lookup of every field per batch)")


class DeepCTREmbeddingDict(nn.Module):
    """Stands in for DeepCTR-Torch's ``embedding_dict``: one table ``table`` over the sparse features.

    ``names`` are the embedding names in field order, ``columns`` each field's column in DeepCTR's input ``X``.
    Indexing by name gives a placeholder (the lookups happen jointly in ``lookup``).
    """

    def __init__(self, table: nn.Module, names: list[str], columns: list[int]):
        super().__init__()
        self.table = table
        self.names = list(names)
        self.columns = list(columns)
        self._index = {n: i for i, n in enumerate(self.names)}
        self._views = {n: _FieldView(i, n) for i, n in enumerate(self.names)}
        self.last_batch_size = 0

    def __getitem__(self, name: str):
        return self._views[name]

    def __contains__(self, name) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self.names)

    def keys(self):
        return list(self.names)

    def field(self, name: str) -> int:
        return self._index[name]

    def lookup(self, X: torch.Tensor) -> torch.Tensor:
        """DeepCTR's float input ``X`` -> ``(B, F, D)`` embeddings of every field (one table lookup)."""
        ids = X[:, self.columns].long()
        self.last_batch_size = int(X.shape[0])
        return self.table(ids)


def model_input(model, x) -> torch.Tensor:
    """DeepCTR-Torch's input: a dict of feature arrays (or a list in ``feature_index`` order) -> the float
    ``(B, columns)`` tensor that ``model.forward`` takes (what ``model.predict`` builds), e.g. for
    :func:`optembed_ext.integrations.search_dims`."""
    import numpy as np

    if isinstance(x, dict):
        x = [x[name] for name in model.feature_index]
    cols = []
    for v in x:
        v = np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v)
        cols.append(v[:, None] if v.ndim == 1 else v)
    return torch.from_numpy(np.concatenate(cols, axis=-1).astype(np.float32))


def table_of(model) -> nn.Module:
    """The compression table that :func:`replace_embeddings` put into ``model``."""
    d = getattr(model, "embedding_dict", None)
    if not isinstance(d, DeepCTREmbeddingDict):
        raise ValueError("model's embedding_dict was not replaced (call replace_embeddings first)")
    return d.table


def replace_embeddings(model, method="optembed", *, embed_dim: int | None = None, copy_weights: bool = False,
                       **kwargs) -> nn.Module:
    """Put one compression table in place of ``model.embedding_dict`` (in place); returns the table.

    ``method``: ``"optembed"`` (default), ``"pep"``, ``"autodim"``, ``"uniform"`` or an ``EmbeddingModule`` class;
    ``kwargs`` go to its constructor. Every sparse feature must have the same ``embedding_dim`` (``embed_dim``
    must match it). The table keeps its own initialisation unless ``copy_weights`` (DeepCTR starts its tables at
    ``N(0, 1e-4)``, whose rows an OptEmbed threshold would prune at once).
    """
    if not is_deepctr_model(model):
        raise TypeError("model is not a DeepCTR-Torch model (no embedding_dict / feature_index)")
    old = model.embedding_dict
    if isinstance(old, DeepCTREmbeddingDict):
        raise ValueError("model's embedding_dict is already a compression table")
    columns = list(getattr(model, "dnn_feature_columns", []))
    if any(_kind(c) == "VarLenSparseFeat" for c in columns):
        raise NotImplementedError("VarLenSparseFeat columns are not supported by the DeepCTR-Torch adapter")
    sparse = [c for c in columns if _kind(c) == "SparseFeat"]
    if not sparse:
        raise ValueError("model has no SparseFeat column in dnn_feature_columns")
    names = [c.embedding_name for c in sparse]
    if len(set(names)) != len(names):
        raise NotImplementedError("features sharing an embedding_name are not supported by the adapter")
    dims = {int(c.embedding_dim) for c in sparse}
    if len(dims) != 1:
        raise ValueError(f"every sparse feature needs the same embedding_dim for one table, got {sorted(dims)}")
    dim = dims.pop()
    if embed_dim is not None and int(embed_dim) != dim:
        raise ValueError(f"the model's features have embedding_dim {dim}, got embed_dim={embed_dim}")
    cards = [int(c.vocabulary_size) for c in sparse]
    device = next(old.parameters()).device
    table = make_table(method, cards, dim, local_ids=True, field_names=names, **kwargs).to(device)
    if copy_weights and hasattr(table, "weight"):
        _copy_table(torch.cat([old[n].weight.detach() for n in names]), table, True)
    cols = [int(model.feature_index[c.name][0]) for c in sparse]
    new = DeepCTREmbeddingDict(table, names, cols)

    # the L2 list: the old per-feature tables -> the new table's weights (the thresholds are never decayed)
    old_ids = {id(p) for p in old.parameters()}
    table_weights = [p for n, p in table.named_parameters() if n in ("weight", "packed")]
    fixed = []
    for weight_list, l1, l2 in model.regularization_weight:
        items = list(weight_list)
        hit = any(id(w[1] if isinstance(w, tuple) else w) in old_ids for w in items)
        if hit:
            items = [w for w in items if id(w[1] if isinstance(w, tuple) else w) not in old_ids] + table_weights
        fixed.append((items, l1, l2))
    model.regularization_weight[:] = fixed
    model.embedding_dict = new

    orig_lookup = model.input_from_feature_columns
    orig_reg = model.get_regularization_loss

    def input_from_feature_columns(X, feature_columns, embedding_dict, support_dense=True):
        if embedding_dict is not new:
            return orig_lookup(X, feature_columns, embedding_dict, support_dense)
        kinds = [_kind(c) for c in feature_columns]
        if "VarLenSparseFeat" in kinds:
            raise NotImplementedError("VarLenSparseFeat columns are not supported by the DeepCTR-Torch adapter")
        dense = [c for c in feature_columns if _kind(c) == "DenseFeat"]
        if not support_dense and dense:
            raise ValueError("DenseFeat is not supported in dnn_feature_columns")
        emb = new.lookup(X)                                            # (B, F, D), one lookup
        sparse_list = [emb[:, new.field(c.embedding_name)].unsqueeze(1) for c in feature_columns
                       if _kind(c) == "SparseFeat"]
        dense_list = [X[:, model.feature_index[c.name][0]:model.feature_index[c.name][1]] for c in dense]
        return sparse_list, dense_list

    def get_regularization_loss():
        total = orig_reg()
        if model.training and new.last_batch_size:
            total = total + regularization(new.table, loss_reduction="sum", batch_size=new.last_batch_size)
        return total

    orig_compile = model.compile

    def compile(optimizer, loss=None, metrics=None):
        # DeepCTR builds a named optimizer over model.parameters(): the thresholds would get no optimizer of their
        # own; build it with the right groups instead (DeepCTR's default learning rates)
        if isinstance(optimizer, str):
            name = optimizer.lower()
            if name not in DEEPCTR_LRS:
                raise NotImplementedError(f"DeepCTR-Torch has no optimizer {optimizer!r}")
            optimizer = make_optimizer(model, name, lr=DEEPCTR_LRS[name])
        return orig_compile(optimizer, loss, metrics)

    model.input_from_feature_columns = input_from_feature_columns
    model.get_regularization_loss = get_regularization_loss
    model.compile = compile
    return table


class SupernetCallback:
    """DeepCTR-Torch callback (``model.fit(..., callbacks=[SupernetCallback(model)])``) running the OptEmbed
    supernet schedule: dims sampled inside the table's ``forward`` while training, and after every epoch the row
    mask of the best ``monitor`` (default ``val_auc``; ``metrics=["auc"]`` and ``validation_data`` needed) kept in
    :attr:`hook` (:class:`optembed_ext.nn.SupernetHook`)."""

    def __init__(self, model, monitor: str = "val_auc", sample_dims: bool = True):
        self.hook = SupernetHook(model, sample_dims=sample_dims)
        self.monitor = monitor
        self.model = None
        self.params = {}

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params or {}

    def on_train_begin(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"SupernetCallback monitors {self.monitor!r}, which the epoch logs lack "
                           f"(have {sorted(logs or {})}): compile with metrics=['auc'] and pass validation_data")
        self.hook.update(float(value) if math.isfinite(float(value)) else -math.inf, step=epoch)

    def on_train_end(self, logs=None):
        pass
