"""Comparison harness: methods x backbones x datasets on the shared trainer, one table and a Pareto plot.

:func:`run_compare` loads every dataset once (the same split and seed for every method), runs every method on
every backbone, and writes one run folder per (dataset, model, method)::

    <out>/<dataset>/<model>/<method>/metrics.json   {"rows": [...], "search": {...}, ...}
    <out>/<dataset>/<model>/<method>/...            the trainer run folders of that method

then collects the rows from those run folders (:func:`collect_rows`) and writes ``table.md`` (paper-style:
AUC, log loss, embedding parameters, sparsity, training and inference time), ``results.csv``,
``results.json`` and ``pareto.png`` (test AUC against embedding parameters, with each panel's Pareto front).
A method folder whose ``metrics.json`` is complete is reused, so an interrupted comparison resumes.

Methods: every method of the registry (:mod:`optembed_ext.search.base`): the built-in ``uniform`` (plain table
at several dimensions, the reference line), ``optembed``, ``pep``, ``autodim``, ``qr`` and ``autofield``, and any
method registered with :func:`~optembed_ext.search.base.register_method`. The harness knows none of them by
name: it builds each with ``Method.from_options(<its mapping>, settings)`` and calls ``run``.

Times: ``train_seconds`` is the summed training-epoch time of every trainer run of the method (search and
retraining; validation passes excluded), ``search_seconds`` the part spent searching, ``infer_seconds`` one
pass over the test split at ``eval_batch_size``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..results import RESULT_COLUMNS, num_or_nan as _num, read_method_folder
from ..train.checkpoint import RunFolderError, check_fingerprint, fingerprint_diff
from ..train.config import TrainConfig, load_yaml_config, save_json, save_yaml
from .base import get_method, method_names
from .common import RunSettings
from .optembed.config import without_later_defaults
from .table import collect_rows, format_table, pareto_front, plot_pareto, write_results  # noqa: F401

log = logging.getLogger(__name__)

#: the built-in methods, in table order (the registry may hold more: :func:`~optembed_ext.search.base.method_names`)
METHODS = ("uniform", "optembed", "pep", "autodim", "qr", "autofield")

__all__ = ["CompareConfig", "METHODS", "RESULT_COLUMNS", "SYNTHETIC_PRESETS", "collect_rows", "format_table",
           "load_compare_dataset", "pareto_front", "plot_pareto", "run_compare", "run_method", "write_results"]


# ==================================================================================== harness
#: methods whose option mapping has a field of its own in :class:`CompareConfig` (others go to ``options``)
_NESTED = ("pep", "autodim", "autofield", "qr", "optembed", "uniform")


@dataclass
class CompareConfig:
    """Settings of a comparison (every key is also a long option of ``optembed compare``).

    Per-method settings are mappings of the method's configuration fields (``Method.config_class``): ``pep``,
    ``autodim``, ``autofield``, ``qr``, ``uniform`` and ``optembed`` (OptEmbedConfig overrides) have fields of
    their own, any other registered method's mapping goes into ``options`` (``{method: {...}}``); flat keys
    ``<method>_<option>`` (``pep_threshold_init``) fill the mappings too (see :meth:`from_dict`).
    ``uniform_dims`` is the uniform method's ``dims``.
    """

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    models: list[str] = field(default_factory=lambda: ["deepfm"])
    datasets: list[str] = field(default_factory=lambda: ["synthetic"])
    data_dir: str | None = None
    out: str | None = None
    # shared training settings (the same for every method)
    embed_dim: int = 16
    epochs: int = 10
    batch_size: int = 2048
    eval_batch_size: int = 8192
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    threshold_optimizer: str = "sgd"             # learned pruning thresholds (OptEmbed): "sgd" or "adam"
    patience: int | None = 2
    monitor: str = "auc"                         # validation metric of the best epoch: auc, logloss, auc-logloss
    max_steps_per_epoch: int | None = None
    seed: int = 2022
    device: str = "cpu"
    progress: bool = False
    mlp_dims: list[int] | None = None
    model_options: dict = field(default_factory=dict)
    # datasets
    max_rows: int | None = None
    min_count: int | None = None
    synthetic_samples: int | None = None
    # methods
    uniform_dims: list[int] | None = None        # None: embed_dim / 4, embed_dim / 2, embed_dim
    pep: dict = field(default_factory=dict)
    autodim: dict = field(default_factory=dict)
    autofield: dict = field(default_factory=dict)
    qr: dict = field(default_factory=dict)
    optembed: dict = field(default_factory=dict)
    uniform: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # {method: {...}} for registered methods without a field above
    force: bool = False                            # rerun every method from scratch (its folder is replaced)

    def __post_init__(self):
        from ..models import MODELS

        for name in ("methods", "models", "datasets"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = [s.strip() for s in v.split(",") if s.strip()]
                setattr(self, name, v)
            if not v:
                raise ValueError(f"{name} must name at least one entry")
        known = method_names()
        bad = [m for m in self.methods if m not in known]
        if bad:
            raise ValueError(f"methods: unknown method(s) {bad}; known: {list(known)}")
        bad = [m for m in self.models if m not in MODELS]
        if bad:
            raise ValueError(f"models: unknown model(s) {bad}; known: {sorted(MODELS)}")
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
        if not isinstance(self.options, dict) or any(not isinstance(v, dict) for v in self.options.values()):
            raise ValueError(f"options must be a mapping {{method: {{option: value}}}}, got {self.options!r}")
        bad = sorted(set(self.options) - set(known))
        if bad:
            raise ValueError(f"options: unknown method(s) {bad}; known: {list(known)}")
        # validate the per-method settings early
        self.train_config()
        self.build_methods()

    @classmethod
    def from_dict(cls, values: dict) -> "CompareConfig":
        """Build from a mapping; keys may use ``-``; ``<method>`` and ``<method>_<option>`` keys fill the method
        mappings (for any registered method)."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = set(method_names())
        out: dict = {}
        nested: dict[str, dict] = {}
        for k, v in values.items():
            key = str(k).replace("-", "_")
            if key in known and (key in _NESTED or key not in names):
                if v is None:
                    continue
                if not isinstance(v, dict):
                    raise ValueError(f"{key} must be a mapping, got {type(v).__name__}")
                nested.setdefault(key, {}).update(v)
                continue
            if key == "options" and isinstance(v, dict):
                for m, opts in v.items():
                    if not isinstance(opts, dict):
                        raise ValueError(f"options.{m} must be a mapping, got {type(opts).__name__}")
                    nested.setdefault(str(m), {}).update(opts)
                continue
            if key in names:
                out[key] = v
                continue
            prefix, _, rest = key.partition("_")
            if prefix in known and rest:
                nested.setdefault(prefix, {})[rest] = v
                continue
            raise ValueError(f"unknown compare option {k!r}; known: {sorted(names)} and <method>_<option>")
        options = {}
        for m, d in nested.items():
            if m in _NESTED:
                out[m] = d
            else:
                options[m] = d
        if options:
            out["options"] = options
        return cls(**out)

    @classmethod
    def from_yaml(cls, path) -> "CompareConfig":
        return cls.from_dict(load_yaml_config(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
                           lr=self.lr, weight_decay=self.weight_decay, optimizer=self.optimizer,
                           patience=self.patience, monitor=self.monitor, seed=self.seed, device=self.device,
                           progress=self.progress, max_steps_per_epoch=self.max_steps_per_epoch,
                           threshold_optimizer=self.threshold_optimizer)

    def model_cfg(self) -> dict:
        cfg = dict(self.model_options)
        if self.mlp_dims is not None:
            cfg["mlp_dims"] = list(self.mlp_dims)
        return cfg

    def settings(self) -> RunSettings:
        """What every method shares: embedding size, training settings, backbone options."""
        return RunSettings(embed_dim=self.embed_dim, train=self.train_config(), model_cfg=self.model_cfg())

    #: fields that do not change a method's results (a rerun with other values reuses finished method folders)
    NEUTRAL_FIELDS = ("methods", "models", "datasets", "out", "progress", "force", "device", "eval_batch_size",
                      "pep", "autodim", "autofield", "qr", "optembed", "uniform", "uniform_dims", "options")

    def fingerprint(self, dataset: str, method: str) -> dict:
        """What one method folder's results depend on: the dataset, the shared settings and the method's
        options (as given and as resolved)."""
        shared = without_later_defaults({k: v for k, v in self.to_dict().items() if k not in self.NEUTRAL_FIELDS})
        return json.loads(json.dumps({"dataset": dataset, "method": method, "shared": shared,
                                      "options": self.method_options(method),
                                      "config": without_later_defaults(
                                          dataclasses.asdict(self.build_method(method).config))},
                                     default=str))

    def method_options(self, method: str) -> dict:
        """The option mapping of ``method`` (its field, or its entry in ``options``)."""
        if method in _NESTED:
            opts = dict(getattr(self, method))
            if method == "uniform" and self.uniform_dims is not None and "dims" not in opts:
                opts["dims"] = list(self.uniform_dims)
            return opts
        return dict(self.options.get(method, {}))

    def build_method(self, method: str):
        """The registered ``method`` configured as this comparison says."""
        return get_method(method).from_options(self.method_options(method), self.settings())

    def build_methods(self) -> dict:
        """Every method of the registry that has options here or is run, configured (validates them)."""
        names = list(dict.fromkeys(list(self.methods) + [m for m in _NESTED if getattr(self, m)] +
                                   list(self.options)))
        return {m: self.build_method(m) for m in names if m in method_names()}

    def method_configs(self) -> dict:
        """The configuration dataclass of every configured method."""
        return {m: meth.config for m, meth in self.build_methods().items()}

    def dims_for_uniform(self) -> list[int]:
        return self.build_method("uniform").config.dims_for(self.embed_dim)


#: synthetic datasets the harness knows by name: keyword arguments of ``make_synthetic``
SYNTHETIC_PRESETS: dict[str, dict] = {
    "synthetic": {},
    # Criteo-shaped: 13 low-cardinality "numeric bucket" fields + 26 categorical fields of skewed sizes
    "synthetic-criteo": {
        "num_samples": 100000,
        "num_fields": 39,
        "vocab_sizes": [24] * 13 + [1000, 500, 2000, 50, 300, 20, 800, 100, 60, 1500, 400, 3000, 30,
                                    700, 200, 10, 1200, 40, 15, 900, 250, 80, 600, 5, 120, 350],
        "informative_fields": [0, 1, 2, 13, 14, 15, 19, 23, 25, 28, 31, 36],
    },
    "synthetic-tiny": {"num_samples": 3000, "num_fields": 6, "vocab_sizes": [20, 30, 10, 40, 15, 25],
                       "informative_fields": [0, 1, 3]},
}


def load_compare_dataset(name: str, config: CompareConfig):
    """Load dataset ``name`` for the harness: a :data:`SYNTHETIC_PRESETS` name or a ``load_dataset`` name."""
    from ..data import load_dataset, make_synthetic

    if name in SYNTHETIC_PRESETS:
        kwargs = dict(SYNTHETIC_PRESETS[name])
        if config.synthetic_samples is not None:
            kwargs["num_samples"] = int(config.synthetic_samples)
        kwargs.setdefault("seed", config.seed)
        data = make_synthetic(**kwargs)
        data.feature_map.dataset = name
        return data
    kwargs = {"seed": config.seed, "progress": False}
    if config.max_rows is not None:
        kwargs["max_rows"] = config.max_rows
    if config.min_count is not None:
        kwargs["min_count"] = config.min_count
    return load_dataset(name, config.data_dir, **kwargs)


def run_method(method: str, data, model_name: str, config: CompareConfig, run_dir=None) -> dict:
    """Run one registered method on one dataset and backbone; returns ``{"rows": [...], "search": ...}``."""
    known = method_names()
    if method not in known:
        raise ValueError(f"method must be one of {known}, got {method!r}")
    result = config.build_method(method).run(data, model_name, config.settings(), run_dir=run_dir)
    return result.to_dict() if hasattr(result, "to_dict") else dict(result)


def run_compare(config: CompareConfig, out=None) -> list[dict]:
    """Run every (dataset, model, method), then write the table and the plot from the run folders.

    Returns the collected rows.
    """
    out = Path(out if out is not None else (config.out or "runs/compare"))
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(out / "config.yaml", config.to_dict())
    for ds_name in config.datasets:
        data = None
        for model_name in config.models:
            for method in config.methods:
                mdir = out / ds_name / model_name / method
                fingerprint = config.fingerprint(ds_name, method)
                done = None if config.force else read_method_folder(mdir)
                if done is not None:
                    diff = fingerprint_diff(done.get("fingerprint") or {}, fingerprint)
                    if diff:
                        raise RunFolderError(f"{mdir} holds a {method} run made with other settings "
                                             f"({'; '.join(diff[:6])}); rerun with --force to replace it, or use "
                                             f"a new --out folder")
                    log.info("compare: %s/%s/%s already complete, reused", ds_name, model_name, method)
                    continue
                if data is None:
                    t0 = time.perf_counter()
                    data = load_compare_dataset(ds_name, config)
                    log.info("compare: loaded %s (%d fields, %d features, %d/%d/%d rows) in %.1fs", ds_name,
                             data.feature_map.num_fields, data.feature_map.num_features, len(data.train),
                             len(data.val), len(data.test), time.perf_counter() - t0)
                log.info("compare: running %s on %s/%s", method, ds_name, model_name)
                if config.force and mdir.is_dir():
                    shutil.rmtree(mdir)  # --force reruns the method from scratch
                mdir.mkdir(parents=True, exist_ok=True)
                check_fingerprint(mdir, fingerprint, what=f"{method} run")  # an interrupted one resumes only alike
                t0 = time.perf_counter()
                res = run_method(method, data, model_name, config, run_dir=mdir)
                rows = []
                for r in res["rows"]:
                    rows.append({"dataset": ds_name, "model": model_name, "seed": config.seed, **r})
                save_json(mdir / "metrics.json", {"complete": True, "dataset": ds_name, "model": model_name,
                                                  "method": method, "rows": rows, "search": res.get("search"),
                                                  "wall_seconds": time.perf_counter() - t0,
                                                  "fingerprint": fingerprint})
                for r in rows:
                    log.info("compare: %s %s %s %s auc %.4f logloss %.4f params %s", ds_name, model_name, method,
                             r["variant"], _num(r["auc"]), _num(r["logloss"]), r["num_params"])
    rows = collect_rows(out)
    write_results(rows, out)
    return rows

