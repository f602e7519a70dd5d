"""The OptEmbed pipeline (Lyu et al., CIKM 2022): supernet -> evolutionary search -> retraining.

:func:`run_optembed` runs, in one run folder, every phase needed to compare OptEmbed with the uniform table:

================  =====================================================================================
phase             what it does
================  =====================================================================================
``uniform``       the original model: a uniform ``(N, D)`` table, trained at the same settings
``supernet``      OptEmbed supernet: learned per-field thresholds prune rows, random per-sample prefix dims;
                  keeps the row mask ``m_e`` of the best validation epoch
``evolution``     evolutionary search of the field dims ``m_d`` on the supernet with ``m_e`` fixed
                  (population-batched evaluation); also "without retraining" = supernet + (m_e, m_d) on test
``retrain``       retrain with ``m_e`` and ``m_d`` fixed from the saved initial weights (or fresh)
``supernet_e`` /  ablations (``ablations=True``): OptEmbed-E (row mask only: supernet without dim sampling,
``retrain_e``     retrain with D dims)
``supernet_d`` /  OptEmbed-D (dims only: supernet without thresholds, evolution, retrain with all rows)
``evolution_d`` /
``retrain_d``
``export``        compact export of the retrained model (``compact_model.pt`` + size/latency ``.json``)
================  =====================================================================================

Every variant's embedding size is reported twice: ``bytes`` (kept rows x field dims x element size) and
``compact_bytes`` (the table as the compact export serves it, id remap included).

Each phase works in ``out_dir/phases/<name>/`` and writes ``done.json`` (its metrics and wall time) when finished;
a rerun with the same ``out_dir`` skips finished phases, resumes a training phase from its trainer checkpoint and
the evolution from its last finished generation. The initial weights of all OptEmbed models (and of the uniform model's shared
parameters) are saved once in ``out_dir/init_state.pt`` before the first phase.

Under ``torchrun`` every rank runs every phase (training data-parallel, the search's candidates split across
ranks); rank 0 alone writes the run folder, and every rank reads back what it wrote after a barrier.
"""
from __future__ import annotations

import datetime as _dt
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ...nn.optembed import OptEmbedEmbedding
from ...results import RESULT_FILE, build_optembed_model as _build_optembed_model
from ...results import build_retrained_model, load_search_result  # noqa: F401  (re-exported)
from ...results import read_json, save_search_result, write_json
from ...train import distributed as dist_utils
from ...train.checkpoint import (RESUME_HINT, RunFolderError, check_fingerprint, dataset_fingerprint,
                                 load_run_file, read_run_json)
from ..evolution import EvolutionSearch, measure_speedup
from .callbacks import OptEmbedSupernetCallback, WallTimeCallback
from .config import OptEmbedConfig, without_later_defaults

logger = logging.getLogger(__name__)

# =========================================================================== helpers
def build_optembed_model(model_name: str, feature_map, config: OptEmbedConfig, *, prune_rows: bool = True):
    """A backbone around an :class:`OptEmbedEmbedding` with the run's settings."""
    if config.threshold_mode == "field" or not prune_rows:
        return _build_optembed_model(model_name, feature_map, config.embed_dim, model_cfg=config.model_cfg,
                                     norm=config.norm, alpha=config.alpha, threshold_lr=config.threshold_lr,
                                     threshold_init=config.threshold_init, prune_rows=prune_rows, oov=config.oov)
    from ...models import build_model
    from ...nn.optembed import OptEmbedEmbedding

    emb = OptEmbedEmbedding(feature_map, config.embed_dim, norm=config.norm, alpha=config.alpha,
                            threshold_lr=config.threshold_lr, threshold_init=config.threshold_init,
                            threshold_mode=config.threshold_mode, prune_rows=True, oov=config.oov)
    return build_model(model_name, feature_map, emb, **dict(config.model_cfg))


def build_uniform_model(model_name: str, feature_map, config: OptEmbedConfig):
    from ...models import build_model
    from ...nn.uniform import UniformEmbedding

    return build_model(model_name, feature_map, UniformEmbedding(feature_map, config.embed_dim),
                       **config.model_cfg)


@torch.no_grad()
def evaluate_model(model, split, batch_size: int = 8192, device="cpu") -> dict:
    """AUC and log loss of ``model`` (eval mode) on ``split``."""
    from ...train.metrics import log_loss, roc_auc

    model.eval()
    X = torch.as_tensor(split.X)
    probs = []
    for start in range(0, len(split.y), batch_size):
        probs.append(torch.sigmoid(model(X[start:start + batch_size].to(device)).float()).cpu())
    p = torch.cat(probs).numpy().astype(np.float64)
    y = np.asarray(split.y, dtype=np.float64)
    return {"auc": float(roc_auc(y, p)), "logloss": float(log_loss(y, p))}


def embedding_stats(embedding) -> dict:
    """Parameters, bytes, sparsity of an embedding module (plus per-field dims / kept rows when it has them)."""
    out = {"params": int(embedding.num_params()), "bytes": int(embedding.memory_bytes()),
           "sparsity": float(embedding.sparsity())}
    if isinstance(embedding, OptEmbedEmbedding):
        out["field_dims"] = embedding.field_dims()
        out["kept_rows_per_field"] = embedding.kept_rows_per_field()
    return out


def _fit_summary(result: dict) -> dict:
    keep = ("best_epoch", "best_val_auc", "test_auc", "test_logloss", "epochs_run", "epoch_times", "kept_initial")
    return {k: result[k] for k in keep if k in result}


# =========================================================================== the pipeline
class OptEmbedRun:
    """Stateful runner behind :func:`run_optembed`; every phase is a method that skips itself when done."""

    #: config fields that do not change any phase's result (or only add phases): a rerun may change them
    NEUTRAL_FIELDS = ("progress", "measure_speedup", "export", "ablations", "baseline", "eval_batch_size",
                      "evo_batch_size", "max_stack_rows", "device")
    #: what the pipeline writes into its run folder (removed by ``resume=False``)
    ARTEFACTS = ("phases", "init_state.pt", "masks.pt", RESULT_FILE, "metrics.json", "field_dims.json",
                 "kept_rows.json", "compact_model.pt", "compact_model.pt.json", "report.md", "report.png")

    def __init__(self, dataset, model_name: str, config: OptEmbedConfig, out_dir, log=None, resume: bool = True):
        from ...models import MODELS

        if model_name not in MODELS:
            raise ValueError(f"model_name must be one of {sorted(MODELS)}, got {model_name!r}")
        if not isinstance(config, OptEmbedConfig):
            raise TypeError(f"config must be an OptEmbedConfig, got {type(config).__name__}")
        self.data = dataset
        self.fmap = dataset.feature_map
        self.model_name = model_name
        self.config = config
        self.out = Path(out_dir)
        self.main = dist_utils.is_main()  # data parallel: only rank 0 writes the run folder
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not resume:
                self.clear()
            (self.out / "phases").mkdir(exist_ok=True)
            check_fingerprint(self.out / "phases", self.fingerprint(), what="OptEmbed run")
        dist_utils.barrier()
        self._log_file = open(self.out / "log.txt", "a") if self.main else None
        self._user_log = log
        self.device = torch.device(config.device)

    # ------------------------------------------------------------------ utilities
    def fingerprint(self) -> dict:
        """What the phases' results depend on: backbone, every result-affecting setting, the data's splits."""
        config = without_later_defaults({k: v for k, v in self.config.to_dict().items()
                                         if k not in self.NEUTRAL_FIELDS})
        return {"model": self.model_name, "config": config, "data": dataset_fingerprint(self.data)}

    def clear(self) -> None:
        """Remove every artefact of an earlier run in this folder (``resume=False``)."""
        import shutil

        for name in self.ARTEFACTS:
            p = self.out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def log(self, msg: str) -> None:
        if not self.main:
            return
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")
        line = f"[{stamp}] {msg}"
        self._log_file.write(line + "\n")
        self._log_file.flush()
        if self._user_log is not None:
            self._user_log(line)

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()

    def phase_dir(self, name: str) -> Path:
        d = self.out / "phases" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def done(self, name: str) -> dict | None:
        path = self.out / "phases" / name / "done.json"
        # rank 0 reads and tells the others, so that every rank skips (or runs) the phase together
        info = dist_utils.broadcast_object(read_run_json(path, f"phase record of '{name}'") if self.main and
                                           path.exists() else None)
        if info is not None and not isinstance(info, dict):
            raise RunFolderError(f"phase record of '{name}' {path} is not a mapping; {RESUME_HINT}")
        return info

    def finish(self, name: str, info: dict) -> dict:
        info = dict(info, phase=name)
        if self.main:
            write_json(self.phase_dir(name) / "done.json", info)
        dist_utils.barrier()  # what rank 0 wrote during the phase is readable by every rank from here on
        self.log(f"[{name}] done in {info.get('seconds', float('nan')):.1f}s")
        return info

    def epochs(self, kind: str) -> int:
        c = self.config
        override = {"supernet": c.supernet_epochs, "retrain": c.retrain_epochs}.get(kind)
        return override if override is not None else c.epochs

    def init_state(self) -> dict:
        """Initial weights of the OptEmbed model, saved once before the first phase (lottery-ticket retraining)."""
        path = self.out / "init_state.pt"
        if self.main and not path.exists():
            torch.manual_seed(self.config.seed)
            model = build_optembed_model(self.model_name, self.fmap, self.config)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(model.state_dict(), tmp)
            tmp.replace(path)
        dist_utils.barrier()
        return load_run_file(path, "initial weights", weights_only=True)

    def _load_init(self, model, fresh_seed: int | None = None) -> None:
        if fresh_seed is not None:
            return  # the model was built under torch.manual_seed(fresh_seed): fresh random weights
        missing, unexpected = model.load_state_dict(self.init_state(), strict=False)
        bad = [k for k in missing if not k.startswith("embedding.")] + \
              [k for k in unexpected if not k.startswith("embedding.")]
        if bad:
            raise RuntimeError(f"initial weights do not match the model: {bad}")

    def compact_bytes(self, model) -> int:
        """Embedding bytes of ``model`` as served by the compact export (kept rows at their field dims + id
        remap + per-field offsets/dims, :class:`~optembed_ext.nn.compact.CompactEmbedding`); for a uniform table
        the plain ``N x D`` table."""
        from ...export import compact_from_model, uniform_memory_bytes

        emb = model.embedding
        if not isinstance(emb, OptEmbedEmbedding):
            return int(uniform_memory_bytes(self.fmap, emb.embed_dim, emb.weight.dtype))
        was_training = model.training
        compact = compact_from_model(model.eval(), model_name=self.model_name, model_cfg=dict(self.config.model_cfg))
        model.train(was_training)
        return int(compact.embedding.memory_bytes())

    def _fit(self, name: str, model, epochs: int, callbacks=(), retrain: bool = False) -> tuple[dict, float]:
        from ...train.trainer import Trainer

        timer = WallTimeCallback()
        trainer = Trainer(model.to(self.device), self.data, self.config.train_config(epochs, retrain=retrain),
                          run_dir=self.phase_dir(name), callbacks=[timer, *callbacks])
        result = trainer.fit(resume=True)
        return result, timer.total()

    # ------------------------------------------------------------------ phases
    def phase_uniform(self) -> dict:
        name = "uniform"
        info = self.done(name)
        if info is not None:
            return info
        self.log(f"[{name}] training the uniform-embedding model")
        torch.manual_seed(self.config.seed)
        model = build_uniform_model(self.model_name, self.fmap, self.config)
        self._load_init(model)
        result, seconds = self._fit(name, model, self.epochs("train"))
        stats = embedding_stats(model.embedding)
        return self.finish(name, {"fit": _fit_summary(result), "test_auc": result["test_auc"],
                                  "test_logloss": result["test_logloss"], "val_auc": result.get("best_val_auc"),
                                  "seconds": seconds, "compact_bytes": self.compact_bytes(model), **stats})

    def phase_supernet(self, name: str = "supernet", prune_rows: bool = True, sample_dims: bool = True) -> dict:
        info = self.done(name)
        if info is not None:
            return info
        self.log(f"[{name}] training the supernet (prune_rows={prune_rows}, sample_dims={sample_dims})")
        torch.manual_seed(self.config.seed)
        model = build_optembed_model(self.model_name, self.fmap, self.config, prune_rows=prune_rows)
        self._load_init(model)
        cb = OptEmbedSupernetCallback(model.embedding, sample_dims=sample_dims, seed=self.config.seed)
        result, seconds = self._fit(name, model, self.epochs("supernet"), callbacks=[cb])
        emb = model.embedding
        row_mask = cb.best_row_mask if cb.best_row_mask is not None else emb.row_mask().cpu()
        current = emb.row_mask().cpu()
        if not torch.equal(current, row_mask):
            self.log(f"[{name}] note: the restored best state's row mask differs from the best epoch's in "
                     f"{int((current != row_mask).sum())} rows; using the best epoch's")
        if self.main:
            torch.save({"state_dict": model.state_dict(), "row_mask": row_mask, "history": cb.history},
                       self.phase_dir(name) / "supernet.pt")
        counts = torch.zeros(self.fmap.num_fields, dtype=torch.long)
        counts.index_add_(0, emb.field_of_row.cpu(), row_mask.long())
        thresholds = emb.field_thresholds()  # per field (per-row thresholds: their mean per field)
        return self.finish(name, {"fit": _fit_summary(result), "test_auc": result["test_auc"],
                                  "test_logloss": result["test_logloss"], "val_auc": result.get("best_val_auc"),
                                  "best_epoch": cb.best_epoch, "kept_rows": int(row_mask.sum()),
                                  "kept_rows_per_field": [int(c) for c in counts.tolist()],
                                  "thresholds": thresholds, "history": cb.history, "seconds": seconds})

    def _load_supernet(self, name: str, prune_rows: bool):
        ckpt = load_run_file(self.phase_dir(name) / "supernet.pt", "supernet")
        model = build_optembed_model(self.model_name, self.fmap, self.config, prune_rows=prune_rows)
        model.load_state_dict(ckpt["state_dict"])
        return model.to(self.device), ckpt["row_mask"]

    def phase_evolution(self, name: str = "evolution", supernet: str = "supernet", prune_rows: bool = True,
                        use_row_mask: bool = True) -> dict:
        info = self.done(name)
        if info is not None:
            return info
        self.log(f"[{name}] evolutionary search on {supernet} (row mask {'fixed' if use_row_mask else 'off'})")
        model, row_mask = self._load_supernet(supernet, prune_rows)
        emb = model.embedding
        emb.freeze(row_mask if use_row_mask else None)
        cfg = self.config.evolution_config()
        search = EvolutionSearch(model, self.data.val, cfg, run_dir=self.phase_dir(name), device=self.device,
                                 log=self.log)
        result = search.run(resume=True)
        t_after_search = time.perf_counter()
        out = {"best_dims": result["best_dims"], "best_val_auc": result["best_val_auc"],
               "best_generation": result["best_generation"], "generations": result["generations"],
               "candidates_evaluated": result["candidates_evaluated"], "search_seconds": result["seconds"],
               "history": result["history"]}
        speedup_seconds = 0.0
        if self.config.measure_speedup:
            t_sp = time.perf_counter()
            sp = measure_speedup(model, self.data.val, cfg.population_size, batch_size=cfg.eval_batch_size,
                                 max_stack_rows=cfg.max_stack_rows, seed=cfg.seed, device=self.device)
            out["speedup"] = sp
            self.log(f"[{name}] one generation ({sp['candidates']} candidates): batched {sp['batched_seconds']:.2f}s"
                     f" vs one at a time {sp['one_at_a_time_seconds']:.2f}s -> {sp['speedup']:.2f}x")
            speedup_seconds = time.perf_counter() - t_sp
            out["speedup_seconds"] = speedup_seconds
        # "Without retraining": the supernet's weights with (m_e, m_d*) applied, evaluated on test.
        emb.freeze(row_mask if use_row_mask else None, result["best_dims"])
        test = evaluate_model(model, self.data.test, self.config.eval_batch_size, self.device)
        val = evaluate_model(model, self.data.val, self.config.eval_batch_size, self.device)
        out["no_retrain"] = {"test_auc": test["auc"], "test_logloss": test["logloss"], "val_auc": val["auc"],
                             "compact_bytes": self.compact_bytes(model), **embedding_stats(emb)}
        # Phase time = search time (accumulated over resumptions) + the final evaluation; the speedup measurement
        # (a diagnostic, not part of the method) is reported apart as speedup_seconds.
        out["seconds"] = result["seconds"] + (time.perf_counter() - t_after_search) - speedup_seconds
        return self.finish(name, out)

    def phase_retrain(self, name: str, row_mask, field_dims, supernet: str = "supernet") -> dict:
        info = self.done(name)
        if info is not None:
            return info
        c = self.config
        self.log(f"[{name}] retraining with fixed masks (init: {c.retrain_init})")
        fresh_seed = c.seed + 1 if c.retrain_init == "fresh" else None
        torch.manual_seed(fresh_seed if fresh_seed is not None else c.seed)
        if c.retrain_init == "supernet":  # warm start: fine-tune the supernet's trained weights with the masks fixed
            state = load_run_file(self.phase_dir(supernet) / "supernet.pt", "supernet")["state_dict"]
            # the OptEmbed-D supernet has no thresholds: its model is built without them
            model = build_optembed_model(self.model_name, self.fmap, c,
                                         prune_rows="embedding.threshold" in state)
            model.load_state_dict(state)
        else:
            model = build_optembed_model(self.model_name, self.fmap, c)
            self._load_init(model, fresh_seed)
        model.embedding.freeze(row_mask, field_dims)
        result, seconds = self._fit(name, model, self.epochs("retrain"), retrain=True)
        if self.main:
            torch.save(model.state_dict(), self.phase_dir(name) / "model.pt")
        return self.finish(name, {"fit": _fit_summary(result), "test_auc": result["test_auc"],
                                  "test_logloss": result["test_logloss"], "val_auc": result.get("best_val_auc"),
                                  "seconds": seconds, "compact_bytes": self.compact_bytes(model),
                                  **embedding_stats(model.embedding)})

    def phase_export(self) -> dict:
        """Compact export of the retrained model (``compact_model.pt``) and its size / latency next to the uniform
        model's (``compact_model.pt.json``)."""
        name = "export"
        info = self.done(name)
        if info is not None:
            return info
        if not self.main:
            dist_utils.barrier()  # the one in rank 0's finish()
            return read_json(self.phase_dir(name) / "done.json")
        from ...export import export_run

        t0 = time.perf_counter()
        path = export_run(self.out, batch_size=min(4096, self.config.eval_batch_size), repeats=5,
                          device=str(self.device), log=None)
        report = read_json(path.with_name(path.name + ".json"))
        mem = report.get("memory", {})
        info = {"model": str(path), "file_bytes": report.get("file_bytes"),
                "compact_bytes": mem.get("compact_bytes"), "uniform_bytes": mem.get("uniform_bytes"),
                "compression_ratio": mem.get("compression_ratio"),
                "max_abs_logit_diff_vs_masked": report.get("max_abs_logit_diff_vs_masked"),
                "latency_ms": {k: v["median_ms"] for k, v in (report.get("latency") or {}).items()
                               if isinstance(v, dict)},
                "seconds": time.perf_counter() - t0}
        self.log(f"[{name}] compact model {path}: {info['compact_bytes']} B embedding vs uniform "
                 f"{info['uniform_bytes']} B")
        return self.finish(name, info)

    def _row_mask_of(self, supernet: str) -> torch.Tensor:
        return load_run_file(self.phase_dir(supernet) / "supernet.pt", "supernet")["row_mask"]

    # ------------------------------------------------------------------ orchestration
    def run(self) -> dict:
        c = self.config
        t_start = time.perf_counter()
        self.init_state()
        phases: dict[str, dict] = {}
        variants: dict[str, dict] = {}
        N, D = self.fmap.num_features, c.embed_dim

        if c.baseline:
            phases["uniform"] = u = self.phase_uniform()
            variants["uniform"] = self._variant(u, ["uniform"], phases)

        phases["supernet"] = self.phase_supernet("supernet", prune_rows=True, sample_dims=True)
        phases["evolution"] = evo = self.phase_evolution("evolution", "supernet", prune_rows=True)
        m_e = self._row_mask_of("supernet")
        m_d = evo["best_dims"]
        variants["no_retrain"] = self._variant(evo["no_retrain"], ["supernet", "evolution"], phases)
        if c.retrain:
            phases["retrain"] = r = self.phase_retrain("retrain", m_e, m_d)
            variants["optembed"] = self._variant(r, ["supernet", "evolution", "retrain"], phases)

        if c.ablations:
            if c.ablation_supernets == "separate":
                phases["supernet_e"] = self.phase_supernet("supernet_e", prune_rows=True, sample_dims=False)
                sup_e, sup_d = "supernet_e", "supernet_d"
                phases["supernet_d"] = self.phase_supernet("supernet_d", prune_rows=False, sample_dims=True)
                phases["evolution_d"] = evo_d = self.phase_evolution("evolution_d", "supernet_d", prune_rows=False,
                                                                     use_row_mask=False)
            else:
                sup_e = sup_d = "supernet"
                phases["evolution_d"] = evo_d = self.phase_evolution("evolution_d", "supernet", prune_rows=True,
                                                                     use_row_mask=False)
            phases["retrain_e"] = re_ = self.phase_retrain("retrain_e", self._row_mask_of(sup_e), None, sup_e)
            variants["optembed_e"] = self._variant(re_, [sup_e, "retrain_e"], phases)
            phases["retrain_d"] = rd = self.phase_retrain("retrain_d", None, evo_d["best_dims"], sup_d)
            variants["optembed_d"] = self._variant(rd, [sup_d, "evolution_d", "retrain_d"], phases)

        sup = phases["supernet"]
        result = {
            "dataset": self.fmap.dataset, "model": self.model_name, "num_features": N, "embed_dim": D,
            "field_names": list(self.fmap.field_names), "cardinalities": [int(x) for x in self.fmap.cardinalities],
            "field_dims": [int(d) for d in m_d], "kept_rows_per_field": sup["kept_rows_per_field"],
            "thresholds": sup.get("thresholds"), "variants": variants,
            "phase_seconds": {k: float(v.get("seconds", 0.0)) for k, v in phases.items()},
            "evolution": {k: evo[k] for k in ("best_val_auc", "best_generation", "generations",
                                              "candidates_evaluated", "search_seconds") if k in evo},
            "speedup": evo.get("speedup"), "config": c.to_dict(),
            "wall_seconds_this_run": time.perf_counter() - t_start,
        }
        masks = {"row_mask": m_e, "field_dims": [int(d) for d in m_d]}
        if c.ablations:  # the masks of OptEmbed-E (rows only) and OptEmbed-D (dims only)
            masks["row_mask_e"] = self._row_mask_of(sup_e)
            masks["field_dims_d"] = [int(d) for d in evo_d["best_dims"]]
        if self.main:
            write_json(self.out / "field_dims.json", {n: int(d) for n, d in zip(self.fmap.field_names, m_d)})
            write_json(self.out / "kept_rows.json", {n: {"kept": int(k), "total": int(t)} for n, k, t in
                                                      zip(self.fmap.field_names, sup["kept_rows_per_field"],
                                                          self.fmap.cardinalities)})
            torch.save(masks, self.out / "masks.pt")
        if c.retrain:
            if self.main:
                self._save_result(m_e, m_d, variants.get("optembed", {}))
            dist_utils.barrier()
            if c.export:
                phases["export"] = result["export"] = self.phase_export()
                result["phase_seconds"]["export"] = float(phases["export"].get("seconds", 0.0))
        from ..report import write_report

        if self.main:
            result["report"] = str(write_report(self.out, result))
            write_json(self.out / "metrics.json", result)
        result["report"] = dist_utils.broadcast_object(result.get("report"))
        return result

    def _variant(self, info: dict, phase_names: list[str], phases: dict) -> dict:
        keys = ("test_auc", "test_logloss", "val_auc", "params", "bytes", "compact_bytes", "sparsity")
        out = {k: info.get(k) for k in keys}
        out["phases"] = list(phase_names)
        out["seconds"] = float(sum(phases[p].get("seconds", 0.0) for p in phase_names if p in phases))
        if (info.get("fit") or {}).get("kept_initial"):  # retrain-keep-initial: no retraining epoch beat the start
            out["kept_initial"] = True
        return out

    def _save_result(self, row_mask, field_dims, metrics: dict) -> None:
        c = self.config
        state = load_run_file(self.phase_dir("retrain") / "model.pt", "retrained model", weights_only=True)
        save_search_result(self.out / RESULT_FILE, row_mask=row_mask, field_dims=field_dims, feature_map=self.fmap,
                           model_name=self.model_name, model_cfg=dict(c.model_cfg), embed_dim=c.embed_dim,
                           norm=c.norm, oov=c.oov, state_dict=state, metrics=metrics)


def run_optembed(dataset, model_name: str, config: OptEmbedConfig | dict | None = None, out_dir="runs/optembed",
                 log=None, resume: bool = True) -> dict:
    """Run the OptEmbed pipeline on ``dataset`` (a :class:`~optembed_ext.data.CTRDataset`) with backbone
    ``model_name``; resumable in ``out_dir``. Returns the metrics of every variant, the chosen dims per field,
    the kept rows per field, per-phase wall times and the search speedup (also written to ``metrics.json``,
    ``report.md`` and ``report.png`` in ``out_dir``). ``log`` receives each progress line (default: the
    ``logging`` logger of this module). A rerun in the same ``out_dir`` continues it when its settings and data
    are those it was made with and raises :class:`~optembed_ext.train.checkpoint.RunFolderError` naming the
    differences otherwise; ``resume=False`` starts it over."""
    if config is None:
        config = OptEmbedConfig()
    elif isinstance(config, dict):
        config = OptEmbedConfig.from_dict(config)
    runner = OptEmbedRun(dataset, model_name, config, out_dir, log=logger.info if log is None else log, resume=resume)
    try:
        return runner.run()
    finally:
        runner.close()
