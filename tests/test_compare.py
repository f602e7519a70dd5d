"""Comparison harness and the baseline subcommands: tiny end-to-end runs that write the table and the plot."""
import json
import math

import pytest
import yaml

from optembed_ext.cli import main
from optembed_ext.search.compare import (CompareConfig, collect_rows, format_table, pareto_front, run_compare,
                                         run_method)

TINY = {"datasets": ["synthetic-tiny"], "models": ["deepfm"], "embed_dim": 4, "epochs": 1, "batch_size": 256,
        "mlp_dims": [8], "uniform_dims": [2, 4], "synthetic_samples": 1500,
        "pep": {"threshold_init": -4.0, "threshold_lr": 0.05, "target_sparsities": [0.3]},
        "autodim": {"candidates": [2, 4]}, "qr": {"collisions": [2]}, "autofield": {"keep": 3},
        "optembed": {"generations": 1, "mutation_num": 2, "crossover_num": 2, "keep_num": 2,
                     "measure_speedup": False}}


def test_pareto_front():
    pts = [(100, 0.70), (50, 0.72), (200, 0.71), (400, 0.75), (50, 0.60), (float("nan"), 0.9)]
    assert pareto_front(pts) == [1, 3]
    assert pareto_front([]) == []


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="methods"):
        CompareConfig(methods=["uniform", "magic"])
    with pytest.raises(ValueError, match="models"):
        CompareConfig(models=["xgboost"])
    with pytest.raises(ValueError, match="unknown PEP option"):
        CompareConfig.from_dict({"pep": {"thresh": 1}})
    assert CompareConfig.from_dict({"pep_threshold_init": -3.0}).pep == {"threshold_init": -3.0}


def test_monitor_reaches_every_method_and_old_folders_still_match():
    config = CompareConfig.from_dict({**TINY, "monitor": "logloss"})
    assert config.train_config().monitor == "logloss"
    assert config.build_method("optembed").config.monitor == "logloss"
    assert config.fingerprint("synthetic-tiny", "optembed")["shared"]["monitor"] == "logloss"
    # at the default the new setting stays out of the fingerprints: folders written before it keep matching
    default = CompareConfig.from_dict(TINY)
    for method in ("optembed", "pep", "uniform"):
        fp = default.fingerprint("synthetic-tiny", method)
        assert "monitor" not in fp["shared"] and "monitor" not in fp["config"], method
    with pytest.raises(ValueError, match="monitor must be one of"):
        CompareConfig.from_dict({**TINY, "monitor": "acc"})


def test_harness_writes_table_and_plot(tmp_path):
    methods = ["uniform", "pep", "autodim", "qr", "autofield", "optembed"]
    config = CompareConfig.from_dict({**TINY, "methods": methods})
    rows = run_compare(config, out=tmp_path)
    for name in ("table.md", "results.csv", "results.json", "pareto.png", "config.yaml"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["method"] for r in rows} == set(methods)
    assert all(r["dataset"] == "synthetic-tiny" and r["seed"] == config.seed for r in rows)
    uniform = {r["variant"]: r for r in rows if r["method"] == "uniform"}
    n = sum(r["num_params"] for r in uniform.values()) // (2 + 4)  # num_features
    assert uniform["D2"]["num_params"] == 2 * n and uniform["D4"]["num_params"] == 4 * n
    for r in rows:
        assert 0.0 <= r["auc"] <= 1.0 and math.isfinite(r["logloss"]), r
        assert r["num_params"] > 0 and r["train_seconds"] >= 0
    table = (tmp_path / "table.md").read_text()
    assert table.count("| synthetic-tiny | deepfm |") == len(rows)
    for m in methods:
        assert f"| {m} |" in table
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))
    # the table is rebuilt from the run folders; a rerun reuses the complete method folders
    assert collect_rows(tmp_path) == rows
    mtime = (tmp_path / "synthetic-tiny" / "deepfm" / "qr" / "metrics.json").stat().st_mtime_ns
    assert run_compare(config, out=tmp_path) == rows
    assert (tmp_path / "synthetic-tiny" / "deepfm" / "qr" / "metrics.json").stat().st_mtime_ns == mtime
    assert format_table(rows).splitlines()[0].startswith("| Dataset | Model | Method")


def _check_run_folder(path):
    for name in ("config.yaml", "metrics.json", "log.txt"):
        assert (path / name).stat().st_size > 0, name


def test_compare_subcommand_with_config_file(tmp_path, capsys):
    cfg = tmp_path / "compare.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "methods": ["uniform", "qr"]}))
    out = tmp_path / "run"
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--epochs", "1"]) == 0
    _check_run_folder(out)
    assert (out / "table.md").exists() and (out / "pareto.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert {r["method"] for r in metrics["rows"]} == {"uniform", "qr"}
    assert "| qr |" in capsys.readouterr().out


@pytest.mark.parametrize("command,options", [
    ("pep", ["--threshold-init", "-4", "--threshold-lr", "0.05", "--target-sparsities", "0.2"]),
    ("autodim", ["--candidates", "2,4", "--autodim-batch-norm", "false"]),
    ("qr", ["--collisions", "2,3", "--operation", "concat"]),
    ("autofield", ["--keep", "2"]),
])
def test_method_subcommands_write_run_folders(tmp_path, command, options):
    out = tmp_path / command
    common = ["--dataset", "synthetic-tiny", "--num-samples", "1200", "--model", "fm", "--embed-dim", "4",
              "--epochs", "1", "--batch-size", "256", "--no-progress", "--out", str(out)]
    assert main([command] + common + options) == 0
    _check_run_folder(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == command and metrics["rows"], metrics
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["command"] == command and saved["embed-dim"] == 4
    # the saved config.yaml reruns the same command (a finished run folder resumes)
    assert main([command, "--config", str(out / "config.yaml")]) == 0


def test_optembed_rows_include_the_ablations(monkeypatch, tmp_path):
    """With ``ablations`` the OptEmbed method reports OptEmbed-E and OptEmbed-D rows, each with its own search
    time (its supernet and evolution) and the phase-summed training time."""
    from optembed_ext.data import make_synthetic
    from optembed_ext.search.optembed import method as oe_method

    def variant(auc, phases):
        return {"test_auc": auc, "test_logloss": 0.5, "params": 10, "bytes": 40, "sparsity": 0.5,
                "phases": phases, "seconds": 1.0 * len(phases)}

    fake = {"variants": {"no_retrain": variant(0.7, ["supernet", "evolution"]),
                         "optembed_e": variant(0.71, ["supernet_e", "retrain_e"]),
                         "optembed_d": variant(0.72, ["supernet_d", "evolution_d", "retrain_d"])},
            "phase_seconds": {"supernet": 1.0, "evolution": 2.0, "supernet_e": 4.0, "retrain_e": 8.0,
                              "supernet_d": 16.0, "evolution_d": 32.0, "retrain_d": 64.0},
            "field_dims": [2, 3]}
    monkeypatch.setattr(oe_method, "run_optembed", lambda *a, **k: fake)
    cfg = CompareConfig(methods=["optembed"], optembed={"ablations": True, "retrain": False})
    data = make_synthetic(num_samples=100, num_fields=2, seed=0)
    rows = run_method("optembed", data, "fm", cfg, run_dir=tmp_path)["rows"]
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"no-retrain", "E (rows only)", "D (dims only)"}
    assert by["E (rows only)"]["auc"] == 0.71 and by["D (dims only)"]["auc"] == 0.72
    assert by["no-retrain"]["search_seconds"] == 3.0
    assert by["E (rows only)"]["search_seconds"] == 4.0
    assert by["D (dims only)"]["search_seconds"] == 48.0
    assert by["D (dims only)"]["train_seconds"] == 3.0
    assert by["no-retrain"]["field_dims"] == [2, 3] and by["E (rows only)"]["field_dims"] is None
