"""The OptEmbed pipeline end to end on synthetic data with planted useless fields and rows: every phase runs and
writes its artefacts, the supernet prunes useless rows, the search shrinks useless fields, the retraining starts
from the saved initial weights, and a run killed in any phase resumes to exactly the uninterrupted result."""
import json

import numpy as np
import pytest
import torch
import yaml

from optembed_ext import cli
from optembed_ext.data import make_synthetic
from optembed_ext.nn.optembed import OptEmbedEmbedding
from optembed_ext.search import optembed as oe
from optembed_ext.search.evolution import EvolutionSearch
from optembed_ext.train.trainer import Trainer

PHASES = ("uniform", "supernet", "evolution", "retrain", "supernet_e", "supernet_d", "evolution_d", "retrain_e",
          "retrain_d", "export")
VARIANTS = ("uniform", "optembed", "optembed_e", "optembed_d", "no_retrain")


def interaction_data(num_samples: int, seed: int = 0, k: int = 4):
    """make_synthetic ids (Zipf, 6 fields, fields 0-2 informative with planted useful rows, 3-5 noise) with labels
    from pairwise interactions of planted k-dim vectors of the useful rows: informative fields need several
    embedding dims, noise fields and the other rows none."""
    data = make_synthetic(num_samples=num_samples, num_fields=6, vocab_sizes=40, informative_fields=[0, 1, 2],
                          seed=seed)
    rng = np.random.default_rng(seed + 100)
    U = np.zeros((data.feature_map.num_features, k))
    useful = data.info["useful_rows"]
    U[useful] = rng.normal(0.0, 1.0, size=(len(useful), k))
    for split in (data.train, data.val, data.test):
        u = U[split.X[:, [0, 1, 2]]]  # (n, 3, k)
        logit = 0.5 * ((u.sum(1) ** 2).sum(-1) - (u ** 2).sum((1, 2))) - 0.5
        split.y[:] = (rng.random(len(split.y)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return data


TINY = dict(embed_dim=4, model_cfg={"mlp_dims": [8]}, epochs=2, patience=None, generations=3, mutation_num=4,
            crossover_num=4, keep_num=1, lr=1e-2, threshold_lr=1e-2, alpha=1e-3, batch_size=256,
            eval_batch_size=1024, evo_batch_size=256, ablations=True)


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic(num_samples=3000, num_fields=4, vocab_sizes=[20, 7, 13, 30], seed=1)


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    result = oe.run_optembed(tiny_data, "deepfm", dict(TINY), out_dir=out, log=None)
    return out, result


# ------------------------------------------------------------------------------------------------ artefacts
def test_every_phase_runs_and_writes_its_artefacts(tiny_data, tiny_run):
    out, res = tiny_run
    fmap = tiny_data.feature_map
    N, F, D = fmap.num_features, fmap.num_fields, TINY["embed_dim"]
    for phase in PHASES:
        done = json.loads((out / "phases" / phase / "done.json").read_text())
        assert done["phase"] == phase and done["seconds"] > 0
        assert res["phase_seconds"][phase] == pytest.approx(done["seconds"])
    for v in VARIANTS:
        assert 0.5 < res["variants"][v]["test_auc"] < 1.0, v
    masks = torch.load(out / "masks.pt", weights_only=True)
    m_e, m_d = masks["row_mask"], masks["field_dims"]
    assert m_e.dtype == torch.bool and m_e.shape == (N,)
    assert len(m_d) == F and all(1 <= d <= D for d in m_d)
    kept = [int(m_e[o:o + c].sum()) for o, c in zip(fmap.offsets, fmap.cardinalities)]
    assert res["kept_rows_per_field"] == kept
    assert json.loads((out / "field_dims.json").read_text()) == dict(zip(fmap.field_names, m_d))
    assert [v["kept"] for v in json.loads((out / "kept_rows.json").read_text()).values()] == kept
    # sizes counted by hand
    params = sum(k * d for k, d in zip(kept, m_d))
    for v in ("optembed", "no_retrain"):
        assert res["variants"][v]["params"] == params
        assert res["variants"][v]["sparsity"] == pytest.approx(1 - params / (N * D))
    assert res["variants"]["uniform"]["params"] == N * D
    assert res["variants"]["uniform"]["compact_bytes"] == N * D * 4
    kept_e = masks["row_mask_e"].sum().item()
    assert res["variants"]["optembed_e"]["params"] == kept_e * D
    assert res["variants"]["optembed_d"]["params"] == sum(c * d for c, d in zip(fmap.cardinalities,
                                                                                 masks["field_dims_d"]))
    # the retrained model carries both masks; the compact export predicts what it predicts
    result = oe.load_search_result(out)
    assert torch.equal(result["row_mask"], m_e) and result["field_dims"] == m_d
    model = oe.build_retrained_model(result).eval()
    assert torch.equal(model.embedding.fixed_row_mask, m_e)
    assert res["export"]["max_abs_logit_diff_vs_masked"] < 1e-5
    assert (out / "compact_model.pt").exists()
    from optembed_ext.export import load_compact

    compact = load_compact(out / "compact_model.pt")
    ids = torch.as_tensor(tiny_data.test.X[:200])
    with torch.no_grad():
        torch.testing.assert_close(compact(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert compact.embedding.memory_bytes() == res["variants"]["optembed"]["compact_bytes"]
    # search time and the population-batching measurement (same AUCs both ways)
    assert res["evolution"]["search_seconds"] > 0 and res["evolution"]["generations"] == TINY["generations"]
    assert res["speedup"]["max_auc_diff"] < 1e-6 and res["speedup"]["speedup"] > 0
    report = (out / "report.md").read_text()
    for label in ("Original (uniform)", "OptEmbed-E", "OptEmbed-D", "w/o retraining", "speedup"):
        assert label in report
    assert (out / "report.png").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["field_dims"] == m_d and set(metrics["variants"]) == set(VARIANTS)


def test_without_retraining_uses_the_supernet_weights_with_both_masks(tiny_data, tiny_run):
    out, res = tiny_run
    sup = torch.load(out / "phases" / "supernet" / "supernet.pt", weights_only=False)
    masks = torch.load(out / "masks.pt", weights_only=True)
    cfg = oe.OptEmbedConfig.from_dict(dict(TINY))
    model = oe.build_optembed_model("deepfm", tiny_data.feature_map, cfg)
    model.load_state_dict(sup["state_dict"])
    model.eval()
    # independent expression: table x row mask x prefix mask of the field dims, then the backbone
    ids = torch.as_tensor(tiny_data.test.X)
    w = model.embedding.weight.detach()[ids] * masks["row_mask"][ids].unsqueeze(-1).float()
    w = w * (torch.arange(cfg.embed_dim) < torch.tensor(masks["field_dims"]).unsqueeze(-1)).float()
    with torch.no_grad():
        p = torch.sigmoid(model.predict_from_embeddings(w, ids)).double().numpy()
    from optembed_ext.train.metrics import roc_auc

    assert res["variants"]["no_retrain"]["test_auc"] == pytest.approx(roc_auc(tiny_data.test.y, p), abs=1e-6)
    # the row mask is the best validation epoch's
    best = max(sup["history"], key=lambda h: h["val_auc"])
    assert int(masks["row_mask"].sum()) == best["kept_rows"]


# ---------------------------------------------------------------------------------------------- behaviour
def test_supernet_prunes_useless_rows_and_search_shrinks_useless_fields(tmp_path):
    data = interaction_data(20000)
    cfg = dict(embed_dim=8, model_cfg={"mlp_dims": [16]}, epochs=6, patience=None, generations=8, lr=1e-2,
               threshold_lr=10.0, alpha=1e-3, batch_size=256, baseline=False, retrain=False,
               measure_speedup=False)
    res = oe.run_optembed(data, "fm", cfg, out_dir=tmp_path, log=None)
    m_e = torch.load(tmp_path / "masks.pt", weights_only=True)["row_mask"].numpy()
    useful = np.zeros(m_e.shape, dtype=bool)
    useful[data.info["useful_rows"]] = True
    pruned_useful, pruned_useless = (~m_e[useful]).mean(), (~m_e[~useful]).mean()
    assert pruned_useless > pruned_useful + 0.25, (pruned_useful, pruned_useless)
    dims = np.asarray(res["field_dims"])
    assert dims[[3, 4, 5]].mean() < dims[[0, 1, 2]].mean() - 1.5, dims


def test_supernet_callback_samples_dims_per_sample_and_field(tiny_data):
    fmap = tiny_data.feature_map
    emb = OptEmbedEmbedding(fmap, 5)
    cb = oe.OptEmbedSupernetCallback(emb, seed=3)
    ids = torch.as_tensor(tiny_data.train.X[:2000])
    cb.on_batch_begin(None, ids, None)
    dims = emb.dims
    assert dims.shape == (2000, fmap.num_fields) and dims.min() == 1 and dims.max() == 5
    freq = torch.bincount(dims.flatten(), minlength=6)[1:].double() / dims.numel()
    assert (freq - 0.2).abs().max() < 0.03
    # training uses them, evaluation the full dimension
    emb.train()
    out = emb(ids)
    cols = torch.arange(5)
    assert (out * (cols >= dims.unsqueeze(-1)).float()).abs().sum() == 0
    emb.eval()
    full = emb(ids)
    assert (full * (cols >= dims.unsqueeze(-1)).float()).abs().sum() > 0
    # the generator state round-trips: a restored callback draws the same next dims
    state = cb.state_dict()
    cb.on_batch_begin(None, ids, None)
    nxt = emb.dims.clone()
    cb2 = oe.OptEmbedSupernetCallback(emb, seed=99)
    cb2.load_state_dict(state)
    cb2.on_batch_begin(None, ids, None)
    assert torch.equal(emb.dims, nxt)
    assert not oe.OptEmbedSupernetCallback(emb, sample_dims=False).sample_dims


def test_retraining_starts_from_the_saved_initial_weights(tiny_data, tmp_path, monkeypatch):
    starts = {}
    original = oe.OptEmbedRun._fit

    def recording_fit(self, name, model, epochs, callbacks=(), **kw):
        starts[(self.config.retrain_init, name)] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return original(self, name, model, epochs, callbacks, **kw)

    monkeypatch.setattr(oe.OptEmbedRun, "_fit", recording_fit)
    cfg = dict(TINY, ablations=False, baseline=False, export=False, generations=1, measure_speedup=False, epochs=1)
    for init in ("lottery", "fresh", "supernet"):
        oe.run_optembed(tiny_data, "deepfm", dict(cfg, retrain_init=init), out_dir=tmp_path / init, log=None)
    init_state = torch.load(tmp_path / "lottery" / "init_state.pt", weights_only=True)
    lottery, fresh = starts[("lottery", "retrain")], starts[("fresh", "retrain")]
    sup = starts[("lottery", "supernet")]
    for k, v in init_state.items():
        if k.startswith("embedding.fixed"):
            continue
        assert torch.equal(lottery[k], v), k
        assert torch.equal(sup[k], v), k
    assert not torch.equal(fresh["embedding.weight"], init_state["embedding.weight"])
    assert torch.equal(fresh["embedding.fixed_row_mask"], lottery["embedding.fixed_row_mask"])
    # warm start: the retraining starts from the supernet's trained weights
    trained = torch.load(tmp_path / "supernet" / "phases" / "supernet" / "supernet.pt", weights_only=False)
    warm = starts[("supernet", "retrain")]
    for k, v in trained["state_dict"].items():
        if not k.startswith("embedding.fixed"):
            assert torch.equal(warm[k], v), k
    assert not torch.equal(warm["embedding.weight"], init_state["embedding.weight"])


def test_retrain_monitor_applies_to_the_retraining_phases_only(tiny_data, tmp_path):
    cfg = dict(TINY, ablations=True, baseline=True, export=False, generations=1, measure_speedup=False, epochs=2,
               retrain_monitor="logloss")
    oe.run_optembed(tiny_data, "deepfm", cfg, out_dir=tmp_path, log=None)
    monitors = {p.parent.name: json.loads(p.read_text())["monitor"]
                for p in (tmp_path / "phases").glob("*/metrics.json")}
    assert monitors == {"uniform": "auc", "supernet": "auc", "supernet_e": "auc", "supernet_d": "auc",
                        "retrain": "logloss", "retrain_e": "logloss", "retrain_d": "logloss"}
    config = oe.OptEmbedConfig(monitor="auc-logloss")
    assert config.train_config(3).monitor == config.train_config(3, retrain=True).monitor == "auc-logloss"
    with pytest.raises(ValueError, match="retrain_monitor must be one of"):
        oe.OptEmbedConfig(retrain_monitor="acc")
    with pytest.raises(ValueError, match="monitor must be one of"):
        oe.OptEmbedConfig(monitor="acc")


def test_retrain_keep_initial_starts_from_the_model_without_retraining(tiny_data, tmp_path):
    config = oe.OptEmbedConfig(retrain_keep_initial=True)
    assert config.train_config(3, retrain=True).keep_initial and not config.train_config(3).keep_initial
    with pytest.raises(ValueError, match="retrain_keep_initial"):
        oe.OptEmbedConfig(retrain_keep_initial="yes")
    cfg = dict(TINY, ablations=False, baseline=False, export=False, generations=1, measure_speedup=False, epochs=2,
               retrain_init="supernet", retrain_keep_initial=True)
    result = oe.run_optembed(tiny_data, "deepfm", cfg, out_dir=tmp_path, log=None)
    fit = json.loads((tmp_path / "phases" / "retrain" / "metrics.json").read_text())
    no_retrain, retrained = result["variants"]["no_retrain"], result["variants"]["optembed"]
    # the retraining's starting state is the model without retraining: the same validation AUC
    assert fit["initial_val_auc"] == pytest.approx(no_retrain["val_auc"], abs=1e-9)
    assert fit["best_val_auc"] >= fit["initial_val_auc"]
    assert bool(retrained.get("kept_initial")) == fit["kept_initial"]
    if fit["kept_initial"]:
        assert retrained["test_auc"] == pytest.approx(no_retrain["test_auc"], abs=1e-9)
        assert "kept its starting state" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("monitor, best", [("auc", 2), ("logloss", 3), ("auc-logloss", 1)])
def test_supernet_callback_keeps_the_row_mask_of_the_monitored_best_epoch(tiny_data, monitor, best):
    from types import SimpleNamespace

    from optembed_ext.train import TrainConfig

    emb = OptEmbedEmbedding(tiny_data.feature_map, 4)
    cb = oe.OptEmbedSupernetCallback(emb, seed=0)
    trainer = SimpleNamespace(config=TrainConfig(monitor=monitor))
    masks = []
    for epoch, (auc, logloss) in enumerate(((0.70, 0.60), (0.80, 0.52), (0.82, 0.58), (0.74, 0.50))):
        with torch.no_grad():
            emb.threshold.fill_(0.05 * epoch)  # a different row mask every epoch
        masks.append(emb.row_mask().cpu())
        cb.on_epoch_end(trainer, epoch, {"auc": auc, "logloss": logloss})
    assert cb.best_epoch == best and torch.equal(cb.best_row_mask, masks[best])
    restored = oe.OptEmbedSupernetCallback(emb, seed=0)
    restored.load_state_dict(cb.state_dict())
    assert restored.best_score == cb.best_score


def test_run_fingerprint_leaves_later_settings_out_at_their_defaults(tiny_data, tmp_path):
    def fingerprint(config, out):
        run = oe.OptEmbedRun(tiny_data, "deepfm", config, out)
        try:
            return run.fingerprint()["config"]
        finally:
            run.close()

    default = fingerprint(oe.OptEmbedConfig(), tmp_path / "a")
    # folders made before these settings still resume
    assert not {"monitor", "retrain_monitor", "retrain_keep_initial"} & set(default)
    assert fingerprint(oe.OptEmbedConfig(retrain_monitor="logloss"), tmp_path / "b")["retrain_monitor"] == "logloss"


# ------------------------------------------------------------------------------------------------- resume
class _Killed(Exception):
    pass


def test_resume_after_a_kill_in_every_phase_equals_the_uninterrupted_run(tiny_data, tiny_run, tmp_path,
                                                                          monkeypatch):
    ref_out, ref = tiny_run
    killed: set[tuple[str, str]] = set()
    orig_ckpt, orig_evo, orig_finish = Trainer.save_checkpoint, EvolutionSearch._save, oe.OptEmbedRun.finish

    def maybe_kill(phase, where):
        if (phase, where) not in killed:
            killed.add((phase, where))
            raise _Killed

    def ckpt(self):
        phase = self.run_dir.name
        # first checkpoint of a phase: killed before it is written (the epoch is redone); alternate phases are
        # killed right after it instead
        before = PHASES.index(phase) % 2 == 0
        if before:
            maybe_kill(phase, "checkpoint")
        orig_ckpt(self)
        if not before:
            maybe_kill(phase, "checkpoint")

    def evo_save(self, state):
        orig_evo(self, state)
        if state["generation"] == 2:
            maybe_kill(self.run_dir.name, "checkpoint")

    def finish(self, name, info):
        if name in ("supernet", "evolution_d", "export"):
            maybe_kill(name, "finish")  # the work is done but done.json not yet written
        return orig_finish(self, name, info)

    monkeypatch.setattr(Trainer, "save_checkpoint", ckpt)
    monkeypatch.setattr(EvolutionSearch, "_save", evo_save)
    monkeypatch.setattr(oe.OptEmbedRun, "finish", finish)
    out = tmp_path / "killed"
    res = None
    for _ in range(30):
        try:
            res = oe.run_optembed(tiny_data, "deepfm", dict(TINY), out_dir=out, log=None)
            break
        except _Killed:
            continue
    assert res is not None
    assert {p for p, _ in killed} == set(PHASES)
    for v in VARIANTS:
        for key in ("test_auc", "test_logloss", "val_auc", "params", "compact_bytes"):
            assert res["variants"][v][key] == ref["variants"][v][key], (v, key)
    assert res["field_dims"] == ref["field_dims"] and res["kept_rows_per_field"] == ref["kept_rows_per_field"]
    a, b = torch.load(out / "masks.pt", weights_only=True), torch.load(ref_out / "masks.pt", weights_only=True)
    for k in a:
        assert (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]), k
    for phase in ("evolution", "evolution_d"):
        ha = json.loads((out / "phases" / phase / "done.json").read_text())["history"]
        hb = json.loads((ref_out / "phases" / phase / "done.json").read_text())["history"]
        strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
        assert strip(ha) == strip(hb)
    sa = json.loads((out / "phases" / "supernet" / "done.json").read_text())
    sb = json.loads((ref_out / "phases" / "supernet" / "done.json").read_text())
    assert sa["history"] == sb["history"] and sa["thresholds"] == sb["thresholds"]


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_search_and_export(tmp_path, capsys):
    config = dict(TINY, ablations=False, baseline=True, generations=2, dataset="synthetic", model="fm",
                  dataset_kwargs={"num_samples": 2000, "num_fields": 3, "vocab_sizes": 9})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert cli.main(["search", "--config", str(path), "--out", str(out), "--generations", "1"]) == 0
    assert "# OptEmbed on synthetic with fm" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evolution"]["generations"] == 1  # the command line wins over the YAML file
    assert metrics["config"]["lr"] == TINY["lr"]
    assert yaml.safe_load((out / "config.yaml").read_text())["dataset"] == "synthetic"
    assert cli.main(["export", "--run", str(out), "--out", str(tmp_path / "m.pt"), "--no-benchmark"]) == 0
    assert (tmp_path / "m.pt").exists()


def test_bad_configuration_raises_clear_errors():
    with pytest.raises(ValueError, match="bogus"):
        oe.OptEmbedConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="retrain_init"):
        oe.OptEmbedConfig(retrain_init="warm")
    with pytest.raises(ValueError, match="norm"):
        oe.OptEmbedConfig(norm=3)
    with pytest.raises(ValueError, match="m_prob"):
        oe.OptEmbedConfig(m_prob=2.0)
    with pytest.raises(ValueError, match="model_name"):
        oe.OptEmbedRun(make_synthetic(num_samples=100, num_fields=2), "nope", oe.OptEmbedConfig(), "/nonexistent")


def test_search_with_a_fused_sparse_optimizer_runs_end_to_end(tiny_data, tmp_path, monkeypatch):
    from optembed_ext import ops

    calls = []
    real = ops.masked_embedding

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(bool(kwargs.get("sparse", False)))
        return out

    monkeypatch.setattr(ops, "masked_embedding", spy)
    config = dict(TINY, optimizer="fused_adam", ablations=False, generations=1, export=False)
    res = oe.run_optembed(tiny_data, "deepfm", config, out_dir=tmp_path, log=None)
    assert res["config"]["optimizer"] == "fused_adam"
    # the supernet and the retrained table were trained through row-sparse gradients
    assert calls and all(calls)
    for name in ("uniform", "optembed", "no_retrain"):
        assert res["variants"][name]["test_auc"] > 0.55, name
    assert 0 < res["variants"]["optembed"]["sparsity"] < 1


@pytest.mark.parametrize("name", ["optembed_ml100k_deepfm.yaml", "optembed_synthetic.yaml"])
def test_example_search_configs_resolve(name):
    from pathlib import Path

    from optembed_ext.cli import search as optembed_cli

    path = Path(__file__).resolve().parents[1] / "configs" / name
    parser = cli.build_parser()
    args = parser.parse_args(["search", "--config", str(path)])
    opts, config = optembed_cli.resolve_options(args)
    assert isinstance(config, oe.OptEmbedConfig) and opts["model"] == "deepfm"
    assert config.patience >= 2 and config.retrain and config.generations >= 1
    if opts["dataset"] == "synthetic":  # the Criteo-shaped preset with planted interactions, scaled down here
        opts["dataset_kwargs"] = dict(opts["dataset_kwargs"], num_samples=300)
        data = optembed_cli.load_data(opts)
        assert data.feature_map.num_fields == 39 and data.info["interaction_strength"] > 0


def test_per_feature_thresholds_run_end_to_end_and_reach_every_entry_point(tiny_data, tmp_path):
    from optembed_ext.results import build_retrained_model, load_search_result
    from optembed_ext.search.compare import CompareConfig

    config = dict(TINY, threshold_mode="feature", ablations=False, generations=1, export=True)
    res = oe.run_optembed(tiny_data, "deepfm", config, out_dir=tmp_path, log=None)
    fmap = tiny_data.feature_map
    assert res["config"]["threshold_mode"] == "feature"
    assert len(res["thresholds"]) == fmap.num_fields  # reported per field: the mean of its rows' thresholds
    sup = torch.load(tmp_path / "phases" / "supernet" / "supernet.pt", weights_only=False)
    t = sup["state_dict"]["embedding.threshold"]
    assert t.shape == (fmap.num_features,)
    torch.testing.assert_close(torch.tensor(res["thresholds"][0], dtype=torch.float64),
                               t[:fmap.cardinalities[0]].double().mean())
    # the retrained model rebuilds from the result file (its per-row thresholds set the mode) and matches
    model = build_retrained_model(load_search_result(tmp_path))
    assert model.embedding.threshold_mode == "feature"
    assert res["variants"]["optembed"]["test_auc"] > 0.55
    # the option in the CLI and the comparison
    args = cli.build_parser().parse_args(["search", "--threshold-mode", "feature"])
    assert args.threshold_mode == "feature"
    cmp = CompareConfig(methods=["optembed"], optembed={"threshold_mode": "feature"})
    method = cmp.build_method("optembed")
    assert method.config.threshold_mode == "feature"
    assert method.build_embedding(fmap).threshold.shape == (fmap.num_features,)
    with pytest.raises(ValueError, match="threshold_mode"):
        CompareConfig(methods=["optembed"], optembed={"threshold_mode": "rows"})


def test_warm_start_retraining_of_every_ablation(tiny_data, tmp_path):
    """retrain_init: supernet loads each variant's own supernet: OptEmbed-D's has no thresholds."""
    config = dict(TINY, retrain_init="supernet", generations=1, export=False, measure_speedup=False)
    res = oe.run_optembed(tiny_data, "deepfm", config, out_dir=tmp_path, log=None)
    for name in ("optembed", "optembed_e", "optembed_d"):
        assert res["variants"][name]["test_auc"] > 0.5, name
    d = torch.load(tmp_path / "phases" / "retrain_d" / "model.pt", weights_only=True)
    sup_d = torch.load(tmp_path / "phases" / "supernet_d" / "supernet.pt", weights_only=False)["state_dict"]
    assert "embedding.threshold" not in d and "embedding.threshold" not in sup_d
    assert res["variants"]["optembed_d"]["sparsity"] < 1
