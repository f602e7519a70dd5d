"""Comparison harness: methods x backbones x datasets on the shared trainer, one table and a Pareto plot.

:func:`run_compare` loads every dataset once (the same split and seed for every method), runs every method on
every backbone, and writes one run folder per (dataset, model, method)::

    <out>/<dataset>/<model>/<method>/metrics.json   {"rows": [...], "search": {...}, ...}
    <out>/<dataset>/<model>/<method>/...            the trainer run folders of that method

then collects the rows from those run folders (:func:`collect_rows`) and writes ``table.md`` (paper-style:
AUC, log loss, embedding parameters, sparsity, training and inference time), ``results.csv``,
``results.json`` and ``pareto.png`` (test AUC against embedding parameters, with each panel's Pareto front).
A method folder whose ``metrics.json`` is complete is reused, so an interrupted comparison resumes.

Methods (:data:`METHODS`): ``uniform`` (plain table at several dimensions, the reference line), ``optembed``
(:func:`optembed_ext.search.optembed.run_optembed`), ``pep``, ``autodim``, ``qr`` and ``autofield``.

Times: ``train_seconds`` is the summed training-epoch time of every trainer run of the method (search and
retraining; validation passes excluded), ``search_seconds`` the part spent searching, ``infer_seconds`` one
pass over the test split at ``eval_batch_size``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..train.checkpoint import seed_everything as _seed_everything
from ..train.config import TrainConfig, load_yaml_config, save_json, save_yaml

log = logging.getLogger(__name__)

METHODS = ("uniform", "optembed", "pep", "autodim", "qr", "autofield")

#: columns of the result rows, in table order
RESULT_COLUMNS = ("dataset", "model", "method", "variant", "auc", "logloss", "num_params", "sparsity",
                  "memory_bytes", "train_seconds", "search_seconds", "infer_seconds", "seed")


# ================================================================== shared helpers of the methods
def dataclass_from_dict(cls, values: dict, what: str):
    """``cls(**values)`` for a config dataclass; keys that are not fields raise ValueError naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {what} option(s) {sorted(unknown)}; known: {sorted(names)}")
    return cls(**values)


def seed_everything(seed: int) -> None:
    """Seed every generator before a module is built, so every method starts from the same state."""
    _seed_everything(int(seed))


def method_train_config(base: TrainConfig, **overrides) -> TrainConfig:
    """``base`` with the given fields replaced; ``None`` values keep ``base``'s, except ``patience`` which is
    replaced (``patience=None`` disables early stopping)."""
    values = base.to_dict()
    for k, v in overrides.items():
        if k not in values:
            raise ValueError(f"unknown TrainConfig field {k!r}")
        if v is not None or k == "patience":
            values[k] = v
    return TrainConfig(**values)


def train_and_evaluate(data, model_name: str, embedding, train_config: TrainConfig, *, model_cfg: dict | None = None,
                       run_dir=None, callbacks=()):
    """Build ``model_name`` around ``embedding``, train it with the shared trainer, evaluate it on the test split.

    Returns ``(trainer, res)`` with ``res`` = ``{"auc", "logloss", "num_params", "sparsity", "memory_bytes",
    "train_seconds", "infer_seconds", "best_epoch", "epochs_run", "val_auc"}`` (the best-validation state is
    restored before the test evaluation).
    """
    from ..models import build_model
    from ..train.trainer import Trainer

    model = build_model(model_name, data.feature_map, embedding, **(model_cfg or {}))
    trainer = Trainer(model, data, train_config, run_dir=run_dir, callbacks=list(callbacks))
    result = trainer.fit(resume=True)
    res = {
        "auc": float(result["test_auc"]),
        "logloss": float(result["test_logloss"]),
        "num_params": int(embedding.num_params()),
        "sparsity": float(embedding.sparsity()),
        "memory_bytes": int(embedding.memory_bytes()),
        "train_seconds": float(sum(result.get("epoch_times", []))),
        "infer_seconds": float(result.get("test_eval_seconds", math.nan)),
        "best_epoch": result.get("best_epoch"),
        "epochs_run": result.get("epochs_run"),
        "val_auc": result.get("best_val_auc"),
    }
    return trainer, res


def make_row(method: str, variant: str, res: dict, **extra) -> dict:
    """A result row from a :func:`train_and_evaluate` result (plus method-specific extras)."""
    row = {"method": method, "variant": str(variant)}
    for k in ("auc", "logloss", "num_params", "sparsity", "memory_bytes", "train_seconds", "infer_seconds",
              "best_epoch", "epochs_run", "val_auc"):
        row[k] = res.get(k)
    row["search_seconds"] = float(extra.pop("search_seconds", 0.0))
    row.update(extra)
    return row


# ========================================================================== simple methods
def run_uniform(data, model_name: str, train_config: TrainConfig, dims, *, model_cfg: dict | None = None,
                run_dir=None) -> dict:
    """The plain table at every dimension in ``dims`` (the reference line)."""
    from ..nn.uniform import UniformEmbedding

    rows = []
    for d in dims:
        seed_everything(train_config.seed)
        emb = UniformEmbedding(data.feature_map, int(d))
        sub = Path(run_dir) / f"dim{int(d)}" if run_dir is not None else None
        _, res = train_and_evaluate(data, model_name, emb, train_config, model_cfg=model_cfg, run_dir=sub)
        rows.append(make_row("uniform", f"D{int(d)}", res, embed_dim=int(d)))
    return {"rows": rows}


@dataclass
class QRConfig:
    """Settings of the QR runs: one trained model per entry of ``collisions`` (every field hashed alike) plus,
    when ``field_collisions`` is given (``{field_name: c}``, fields not named keep a full table), one model with
    those per-field collisions."""

    collisions: list[int] = field(default_factory=lambda: [2, 4, 8])
    operation: str = "mult"
    min_cardinality: int = 0
    field_collisions: dict | None = None

    def __post_init__(self):
        from ..nn.qr import OPERATIONS

        if isinstance(self.collisions, int):
            self.collisions = [self.collisions]
        if not self.collisions or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                      for c in self.collisions):
            raise ValueError(f"collisions must be positive ints, got {self.collisions!r}")
        if self.operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}, got {self.operation!r}")
        if self.field_collisions is not None and not isinstance(self.field_collisions, dict):
            raise ValueError(f"field_collisions must be a mapping {{field_name: collisions}}, "
                             f"got {self.field_collisions!r}")


def run_qr(data, model_name: str, embed_dim: int, train_config: TrainConfig, config: QRConfig | None = None, *,
           model_cfg: dict | None = None, run_dir=None) -> dict:
    """Quotient-remainder embeddings: one model per collision count (every field hashed alike) and one with the
    per-field ``field_collisions`` when given."""
    from ..nn.qr import QREmbedding

    config = config or QRConfig()
    runs = [(f"c{int(c)}", int(c)) for c in config.collisions]
    if config.field_collisions:
        runs.append(("per-field", dict(config.field_collisions)))
    rows = []
    for name, c in runs:
        seed_everything(train_config.seed)
        emb = QREmbedding(data.feature_map, embed_dim, collisions=c, operation=config.operation,
                          min_cardinality=config.min_cardinality)
        sub = Path(run_dir) / name if run_dir is not None else None
        _, res = train_and_evaluate(data, model_name, emb, train_config, model_cfg=model_cfg, run_dir=sub)
        rows.append(make_row("qr", f"{config.operation}-{name}", res, collisions=emb.collisions,
                             operation=config.operation))
    return {"rows": rows}


def run_optembed_method(data, model_name: str, embed_dim: int, train_config: TrainConfig,
                        options: dict | None = None, *, model_cfg: dict | None = None, run_dir=None) -> dict:
    """OptEmbed through :func:`optembed_ext.search.optembed.run_optembed`, with the shared training settings
    (``options`` overrides any :class:`~optembed_ext.search.optembed.OptEmbedConfig` field)."""
    from ..train.trainer import Trainer
    from .optembed import OptEmbedConfig, build_retrained_model, load_search_result, run_optembed

    tc = train_config
    values = {"embed_dim": embed_dim, "model_cfg": dict(model_cfg or {}), "lr": tc.lr,
              "weight_decay": tc.weight_decay, "batch_size": tc.batch_size, "eval_batch_size": tc.eval_batch_size,
              "optimizer": tc.optimizer, "epochs": tc.epochs, "patience": tc.patience,
              "max_steps_per_epoch": tc.max_steps_per_epoch, "seed": tc.seed, "device": tc.device,
              "progress": False, "baseline": False}
    values.update(options or {})
    config = OptEmbedConfig.from_dict(values)
    out = Path(run_dir) if run_dir is not None else Path("runs") / "optembed"
    result = run_optembed(data, model_name, config, out_dir=out / "optembed", log=log.info)
    variants = result.get("variants", {})
    phase_s = result.get("phase_seconds", {})
    search_s = float(sum(v for k, v in phase_s.items() if k in ("supernet", "evolution")))
    rows = []
    infer = math.nan
    if config.retrain and "optembed" in variants:
        # inference time of the retrained model, measured exactly as for the other methods
        loaded = load_search_result(out / "optembed")
        model = build_retrained_model(loaded)
        trainer = Trainer(model, data, tc)
        infer = float(trainer.evaluate("test")["seconds"])
    for name in ("optembed", "no_retrain"):
        v = variants.get(name)
        if not v:
            continue
        n = v.get("params")
        rows.append({
            "method": "optembed", "variant": "retrain" if name == "optembed" else "no-retrain",
            "auc": v.get("test_auc"), "logloss": v.get("test_logloss"), "num_params": n,
            "sparsity": v.get("sparsity"), "memory_bytes": v.get("bytes"),
            "train_seconds": float(v.get("seconds", math.nan)), "search_seconds": search_s,
            "infer_seconds": infer if name == "optembed" else math.nan,
            "field_dims": result.get("field_dims"),
        })
    return {"rows": rows, "search": {k: result.get(k) for k in ("field_dims", "kept_rows_per_field",
                                                                  "phase_seconds", "evolution")}}


# ==================================================================================== harness
@dataclass
class CompareConfig:
    """Settings of a comparison (every key is also a long option of ``optembed compare``).

    Per-method settings are the fields of :class:`~optembed_ext.search.pep.PEPConfig`,
    :class:`~optembed_ext.search.autodim.AutoDimConfig`, :class:`~optembed_ext.search.autofield.AutoFieldConfig`
    and :class:`QRConfig`, given in the mappings ``pep``, ``autodim``, ``autofield``, ``qr`` (or flat, as
    ``pep_threshold_init`` etc., see :meth:`from_dict`); ``optembed`` holds
    :class:`~optembed_ext.search.optembed.OptEmbedConfig` overrides.
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
    patience: int | None = 2
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
    force: bool = False                            # rerun methods whose run folder is complete

    def __post_init__(self):
        from ..models import MODELS

        for name in ("methods", "models", "datasets"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = [s.strip() for s in v.split(",") if s.strip()]
                setattr(self, name, v)
            if not v:
                raise ValueError(f"{name} must name at least one entry")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods: unknown method(s) {bad}; known: {list(METHODS)}")
        bad = [m for m in self.models if m not in MODELS]
        if bad:
            raise ValueError(f"models: unknown model(s) {bad}; known: {sorted(MODELS)}")
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
        # validate the per-method settings early
        self.method_configs()
        self.train_config()

    @classmethod
    def from_dict(cls, values: dict) -> "CompareConfig":
        """Build from a mapping; keys may use ``-``; ``<method>_<option>`` keys fill the method mappings."""
        names = {f.name for f in dataclasses.fields(cls)}
        out: dict = {}
        nested: dict[str, dict] = {m: {} for m in ("pep", "autodim", "autofield", "qr", "optembed")}
        for k, v in values.items():
            key = str(k).replace("-", "_")
            if key in names:
                if key in nested:
                    if v is None:
                        continue
                    if not isinstance(v, dict):
                        raise ValueError(f"{key} must be a mapping, got {type(v).__name__}")
                    nested[key].update(v)
                else:
                    out[key] = v
                continue
            prefix, _, rest = key.partition("_")
            if prefix in nested and rest:
                nested[prefix][rest] = v
                continue
            raise ValueError(f"unknown compare option {k!r}; known: {sorted(names)} and <method>_<option>")
        out.update({m: d for m, d in nested.items()})
        return cls(**out)

    @classmethod
    def from_yaml(cls, path) -> "CompareConfig":
        return cls.from_dict(load_yaml_config(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
                           lr=self.lr, weight_decay=self.weight_decay, optimizer=self.optimizer,
                           patience=self.patience, seed=self.seed, device=self.device, progress=self.progress,
                           max_steps_per_epoch=self.max_steps_per_epoch)

    def model_cfg(self) -> dict:
        cfg = dict(self.model_options)
        if self.mlp_dims is not None:
            cfg["mlp_dims"] = list(self.mlp_dims)
        return cfg

    def method_configs(self) -> dict:
        from .autodim import autodim_config_from_dict
        from .autofield import autofield_config_from_dict
        from .pep import pep_config_from_dict

        return {"pep": pep_config_from_dict(dict(self.pep)), "autodim": autodim_config_from_dict(dict(self.autodim)),
                "autofield": autofield_config_from_dict(dict(self.autofield)),
                "qr": dataclass_from_dict(QRConfig, dict(self.qr), "QR")}

    def dims_for_uniform(self) -> list[int]:
        if self.uniform_dims:
            return [int(d) for d in self.uniform_dims]
        d = self.embed_dim
        return sorted({max(1, d // 4), max(1, d // 2), d})


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
    """Run one method on one dataset and backbone; returns ``{"rows": [...], ...}``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    tc = config.train_config()
    mc = config.model_cfg()
    cfgs = config.method_configs()
    d = config.embed_dim
    if method == "uniform":
        return run_uniform(data, model_name, tc, config.dims_for_uniform(), model_cfg=mc, run_dir=run_dir)
    if method == "qr":
        return run_qr(data, model_name, d, tc, cfgs["qr"], model_cfg=mc, run_dir=run_dir)
    if method == "pep":
        from .pep import run_pep

        return run_pep(data, model_name, d, tc, cfgs["pep"], model_cfg=mc, run_dir=run_dir)
    if method == "autodim":
        from .autodim import run_autodim

        return run_autodim(data, model_name, d, tc, cfgs["autodim"], model_cfg=mc, run_dir=run_dir)
    if method == "autofield":
        from .autofield import run_autofield

        return run_autofield(data, model_name, d, tc, cfgs["autofield"], model_cfg=mc, run_dir=run_dir)
    return run_optembed_method(data, model_name, d, tc, dict(config.optembed), model_cfg=mc, run_dir=run_dir)


def _read_method_folder(path: Path) -> dict | None:
    f = path / "metrics.json"
    if not f.is_file():
        return None
    try:
        with open(f, encoding="utf-8") as fh:
            m = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) and m.get("complete") and isinstance(m.get("rows"), list) else None


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
                if not config.force and _read_method_folder(mdir) is not None:
                    log.info("compare: %s/%s/%s already complete, reused", ds_name, model_name, method)
                    continue
                if data is None:
                    t0 = time.perf_counter()
                    data = load_compare_dataset(ds_name, config)
                    log.info("compare: loaded %s (%d fields, %d features, %d/%d/%d rows) in %.1fs", ds_name,
                             data.feature_map.num_fields, data.feature_map.num_features, len(data.train),
                             len(data.val), len(data.test), time.perf_counter() - t0)
                log.info("compare: running %s on %s/%s", method, ds_name, model_name)
                mdir.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                res = run_method(method, data, model_name, config, run_dir=mdir)
                rows = []
                for r in res["rows"]:
                    rows.append({"dataset": ds_name, "model": model_name, "seed": config.seed, **r})
                save_json(mdir / "metrics.json", {"complete": True, "dataset": ds_name, "model": model_name,
                                                  "method": method, "rows": rows, "search": res.get("search"),
                                                  "wall_seconds": time.perf_counter() - t0})
                for r in rows:
                    log.info("compare: %s %s %s %s auc %.4f logloss %.4f params %s", ds_name, model_name, method,
                             r["variant"], _num(r["auc"]), _num(r["logloss"]), r["num_params"])
    rows = collect_rows(out)
    write_results(rows, out)
    return rows


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# ============================================================================= table and plot
def collect_rows(out) -> list[dict]:
    """Every result row of the complete method folders under ``out`` (sorted by dataset, model, method)."""
    out = Path(out)
    rows = []
    for f in sorted(out.glob("*/*/*/metrics.json")):
        m = _read_method_folder(f.parent)
        if m is not None:
            rows.extend(m["rows"])
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r.get("dataset", ""), r.get("model", ""), order.get(r.get("method"), 99),
                             _num(r.get("num_params"))))
    return rows


def pareto_front(points) -> list[int]:
    """Indices of the points ``(params, auc)`` not dominated by another (fewer or equal parameters and a
    higher or equal AUC, one of them strictly), ordered by parameters."""
    pts = [(i, _num(p), _num(a)) for i, (p, a) in enumerate(points)]
    pts = [t for t in pts if math.isfinite(t[1]) and math.isfinite(t[2])]
    pts.sort(key=lambda t: (t[1], -t[2]))
    front, best = [], -math.inf
    for i, _, a in pts:
        if a > best:
            front.append(i)
            best = a
    return front


def _fmt_params(n) -> str:
    n = _num(n)
    if not math.isfinite(n):
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{int(n)}"


def format_table(rows: list[dict]) -> str:
    """Markdown table (one line per row, Pareto-optimal rows of each dataset/model marked with ``*``)."""
    pareto = set()
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.get("dataset"), r.get("model")), []).append(i)
    for idx in groups.values():
        front = pareto_front([(rows[i].get("num_params"), rows[i].get("auc")) for i in idx])
        pareto.update(idx[j] for j in front)
    head = ("| Dataset | Model | Method | Variant | AUC | Logloss | Emb. params | Sparsity | Train (s) | "
            "Search (s) | Infer (s) |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for i, r in enumerate(rows):
        auc = _num(r.get("auc"))
        ll = _num(r.get("logloss"))
        sp = _num(r.get("sparsity"))
        lines.append("| " + " | ".join([
            str(r.get("dataset")), str(r.get("model")), str(r.get("method")), str(r.get("variant")),
            (f"{auc:.4f}" if math.isfinite(auc) else "-") + ("*" if i in pareto else ""),
            f"{ll:.4f}" if math.isfinite(ll) else "-", _fmt_params(r.get("num_params")),
            f"{sp:.3f}" if math.isfinite(sp) else "-", _fmt_s(r.get("train_seconds")),
            _fmt_s(r.get("search_seconds")), _fmt_s(r.get("infer_seconds"), 3)]) + " |")
    lines.append("")
    lines.append("`*`: on the AUC-vs-embedding-parameters Pareto front of its dataset and model. Train time: "
                 "summed training epochs of every run of the method (search included); inference: one pass over "
                 "the test split.")
    return "\n".join(lines) + "\n"


def _fmt_s(v, digits: int = 1) -> str:
    v = _num(v)
    return f"{v:.{digits}f}" if math.isfinite(v) else "-"


def plot_pareto(rows: list[dict], path) -> Path:
    """AUC against embedding parameters (log scale), one panel per (dataset, model), Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("dataset"), r.get("model")), []).append(r)
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    markers = dict(zip(METHODS, "osD^vP"))
    colors = dict(zip(METHODS, ["0.4", "C3", "C0", "C2", "C1", "C4"]))
    for ax, ((ds, model), rs) in zip(axes[0], sorted(groups.items(), key=lambda kv: str(kv[0]))):
        for method in METHODS:
            pts = [(r["num_params"], r["auc"]) for r in rs if r.get("method") == method
                   and math.isfinite(_num(r.get("auc"))) and _num(r.get("num_params")) > 0]
            if not pts:
                continue
            pts.sort()
            ax.plot([p for p, _ in pts], [a for _, a in pts], marker=markers[method], color=colors[method],
                    linestyle="-" if method == "uniform" else "none", label=method)
        valid = [r for r in rs if _num(r.get("num_params")) > 0]
        front = pareto_front([(r.get("num_params"), r.get("auc")) for r in valid])
        if front:
            ax.plot([valid[i]["num_params"] for i in front], [valid[i]["auc"] for i in front], "k--", lw=0.8,
                    drawstyle="steps-post", label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("embedding parameters")
        ax.set_ylabel("test AUC")
        ax.set_title(f"{ds} / {model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not groups:
        axes[0][0].text(0.5, 0.5, "no results", ha="center")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(rows: list[dict], out) -> dict:
    """Write ``table.md``, ``results.csv``, ``results.json`` and ``pareto.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(format_table(rows), encoding="utf-8")
    extra = sorted({k for r in rows for k in r} - set(RESULT_COLUMNS))
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(RESULT_COLUMNS) + extra)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    save_json(out / "results.json", {"rows": rows})
    plot_pareto(rows, out / "pareto.png")
    return {"table": out / "table.md", "csv": out / "results.csv", "json": out / "results.json",
            "plot": out / "pareto.png"}
