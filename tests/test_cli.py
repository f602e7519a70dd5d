"""The ``optembed`` command line, run in-process through ``optembed_ext.cli.main`` on tiny data."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from optembed_ext import cli
from optembed_ext.models import MODELS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--dataset", "synthetic", "--num-samples", "1500", "--embed-dim", "4", "--mlp-dims", "8",
        "--cross-layers", "1", "--attention-layers", "1", "--epochs", "2", "--batch-size", "256", "--no-progress"]


def read_run(out: Path):
    for name in ("config.yaml", "metrics.json", "log.txt"):
        assert (out / name).is_file(), f"{name} missing from the run folder"
    return yaml.safe_load((out / "config.yaml").read_text()), json.loads((out / "metrics.json").read_text())


def criteo_file(path: Path, n=120, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            ints = [rng.choice(["", "0", "5", "70"]) for _ in range(13)]
            cats = [rng.choice(["", f"{c}a", f"{c}b", f"{c}x{i}"]) for c in range(26)]
            f.write("\t".join([str(int(rng.random() < 0.3))] + ints + cats) + "\n")
    return path


def test_subcommands_are_registered():
    parser = cli.build_parser()
    names = set(cli._subparsers_action(parser).choices)
    assert {"preprocess", "train"} <= names
    with pytest.raises(SystemExit) as err:
        cli.main(["--version"])
    assert err.value.code == 0


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "optembed_ext", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--embed-dim" in done.stdout and "--config" in done.stdout


def test_a_listed_module_that_fails_to_import_is_an_error(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("optembed_ext.cli.train", "optembed_ext.cli.no_such_module"))
    with pytest.raises(ImportError, match="no_such_module"):
        cli.build_parser()


def test_preprocess_writes_cache_and_run_folder(tmp_path, capsys):
    raw = criteo_file(tmp_path / "train.txt")
    with open(raw, "a") as f:
        f.write("1\tnot-a-number" + "\t" * 38 + "\n")  # one malformed row (I1), skipped and reported
    cache = tmp_path / "cache"
    argv = ["preprocess", "--dataset", "criteo", "--data-dir", str(raw), "--cache-dir", str(cache), "--min-count",
            "2", "--no-progress"]
    # a user mistake is one line naming the file, line and column, not a traceback
    assert cli.main(argv + ["--strict", "--out", str(tmp_path / "p0")]) == 2
    assert "line 121, column 2 (I1)" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="skipped 1 malformed rows of 121"):
        assert cli.main(argv + ["--out", str(tmp_path / "p1")]) == 0
    config, metrics = read_run(tmp_path / "p1")
    assert config["command"] == "preprocess" and config["min-count"] == 2 and config["dataset"] == "criteo"
    assert metrics["num_fields"] == 39 and metrics["train_size"] + metrics["val_size"] + metrics["test_size"] == 120
    assert (metrics["train_size"], metrics["val_size"]) == (96, 12)
    pre = metrics["preprocessing"]
    assert pre["rows_read"] == 121 and pre["malformed"] == 1 and pre["malformed_examples"][0]["line"] == 121
    assert metrics["from_cache"] is False
    assert len([p for p in cache.iterdir()]) == 1
    assert "optembed preprocess --dataset criteo" in (tmp_path / "p1" / "log.txt").read_text()
    # the second run reuses the cache
    assert cli.main(argv + ["--out", str(tmp_path / "p2")]) == 0
    assert len([p for p in cache.iterdir()]) == 1
    assert read_run(tmp_path / "p2")[1]["from_cache"] is True
    out = capsys.readouterr().out
    assert "39 fields" in out and "1 malformed rows skipped" in out


def test_train_flags_then_rerun_from_written_config(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--model", "deepfm", "--out", str(out)]) == 0
    config, metrics = read_run(out)
    assert config["model"] == "deepfm" and config["embed-dim"] == 4 and config["mlp-dims"] == [8]
    assert metrics["model"] == "deepfm" and metrics["epochs_run"] == 2 and 0.5 < metrics["test_auc"] <= 1.0
    assert metrics["num_params"] == metrics["num_features"] * 4
    assert "finished" in (out / "log.txt").read_text() and (out / "checkpoint.pt").is_file()
    # the written config.yaml reproduces the run (same seeds -> same metrics)
    again = tmp_path / "again"
    assert cli.main(["train", "--config", str(out / "config.yaml"), "--out", str(again), "--no-resume"]) == 0
    _, metrics2 = read_run(again)
    assert metrics2["test_auc"] == metrics["test_auc"] and metrics2["test_logloss"] == metrics["test_logloss"]


def test_yaml_config_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    # "1e-3" and "8,4" stay strings in YAML; they are converted like command-line values
    cfg.write_text("dataset: synthetic\nnum-samples: 1200\nmodel: fnn\nembed_dim: 4\nmlp-dims: '8,4'\n"
                   "lr: 1e-3\nepochs: 3\nbatch-size: 256\nprogress: false\n")
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(cfg), "--epochs", "1", "--out", str(out)]) == 0
    config, metrics = read_run(out)
    assert config["epochs"] == 1 and metrics["epochs_run"] == 1  # the command line wins
    assert config["lr"] == 1e-3 and config["mlp-dims"] == [8, 4] and config["model"] == "fnn"
    assert config["embed-dim"] == 4


def test_bad_usage_is_reported(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("dataset: synthetic\nembed-dimension: 4\n")
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / "x")])
    assert err.value.code == 2 and "embed-dimension" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--dataset"):
        cli.main(["train", "--out", str(tmp_path / "y"), "--no-progress"])
    with pytest.raises(SystemExit, match="--model"):
        cli.main(["train", *TINY, "--model", "lr", "--out", str(tmp_path / "z")])
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(tmp_path / "missing.yaml")])
    assert cli.main([]) == 2  # no subcommand: help and a usage error status


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_trains_end_to_end(tmp_path, model):
    out = tmp_path / model
    assert cli.main(["train", *TINY, "--epochs", "1", "--model", model, "--out", str(out)]) == 0
    _, metrics = read_run(out)
    assert metrics["model"] == model and metrics["epochs_run"] == 1


def test_example_configs_parse():
    files = sorted(CONFIGS.glob("train_*.yaml")) + sorted(CONFIGS.glob("preprocess_*.yaml"))
    assert any(f.name == "train_synthetic_tiny.yaml" for f in files)
    for path in files:
        command = path.name.split("_")[0]
        argv = [command, "--config", str(path)]
        parser = cli.build_parser()
        cli._apply_config_file(parser, argv)
        args = parser.parse_args(argv)
        values = yaml.safe_load(path.read_text())
        assert args.dataset == values["dataset"], path.name
        if command == "train":
            assert args.model in MODELS and args.epochs == values["epochs"], path.name


def test_tiny_example_config_runs(tmp_path):
    out = tmp_path / "tiny"
    assert cli.main(["train", "--config", str(CONFIGS / "train_synthetic_tiny.yaml"), "--out", str(out)]) == 0
    _, metrics = read_run(out)
    assert metrics["test_auc"] > 0.55


def test_search_and_compare_example_configs_parse():
    from optembed_ext.search.compare import CompareConfig

    compare_files = sorted(CONFIGS.glob("compare_*.yaml"))
    assert compare_files
    for path in compare_files:
        config = CompareConfig.from_yaml(path)
        values = yaml.safe_load(path.read_text())
        assert list(config.methods) == values["methods"], path.name
        argv = ["compare", "--config", str(path)]
        parser = cli.build_parser()
        cli._apply_config_file(parser, argv)
        parser.parse_args(argv)
    search_files = sorted(CONFIGS.glob("optembed_*.yaml"))
    assert search_files
    for path in search_files:
        argv = ["search", "--config", str(path)]
        parser = cli.build_parser()
        cli._apply_config_file(parser, argv)
        args = parser.parse_args(argv)
        assert args.model in MODELS, path.name


def test_paper_configs_resolve():
    """configs/paper/: one command per cell of the papers' tables; every file parses into its command's settings."""
    from optembed_ext.cli import search as search_cli
    from optembed_ext.search.optembed import OptEmbedConfig

    files = sorted((CONFIGS / "paper").glob("*.yaml"))
    assert len([f for f in files if f.name.startswith("optembed_")]) == 12
    for path in files:
        command = path.name.split("_")[0]
        argv = [{"optembed": "search"}.get(command, command), "--config", str(path)]
        parser = cli.build_parser()
        cli._apply_config_file(parser, argv)
        args = parser.parse_args(argv)
        values = yaml.safe_load(path.read_text())
        if command == "optembed":
            opts, config = search_cli.resolve_options(args)
            assert isinstance(config, OptEmbedConfig) and opts["min_count"] == 2
            assert config.threshold_optimizer == "sgd" and config.top_k == 15 and config.top_k_memory
            assert config.generations == 30 and config.batch_size == 2048 and config.embed_dim == 64
            assert isinstance(config.lr, float) and config.lr == values["lr"]
            config.evolution_config()
        else:
            assert args.dataset == values["dataset"] and args.batch_size == values["batch-size"]
            if command == "pep":
                assert args.grad_clip == 100.0 and args.exact_budget is False


def test_cache_list_and_clean(tmp_path, capsys):
    raw = criteo_file(tmp_path / "train.txt")
    cache = tmp_path / "cache"
    argv = ["preprocess", "--dataset", "criteo", "--data-dir", str(raw), "--cache-dir", str(cache), "--min-count",
            "2", "--no-progress"]
    assert cli.main(argv + ["--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert cli.main(["cache", "list", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("valid") and "criteo" in out[0] and "120 rows" in out[0]
    assert cli.main(["cache", "list", "--cache-dir", str(cache), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert entries[0]["status"] == "valid" and entries[0]["rows"] == 120
    # an in-range edit of the cached ids is found, listed as corrupt and cleaned
    import numpy as np

    folder = next(p for p in cache.iterdir() if p.is_dir())
    X = np.load(folder / "X.npy")
    X[0, 0] = X[1, 0] if X[1, 0] != X[0, 0] else X[0, 0] + 1
    np.save(folder / "X.npy", X)
    assert cli.main(["cache", "list", "--cache-dir", str(cache), "--full"]) == 0
    assert capsys.readouterr().out.startswith("corrupt")
    assert cli.main(["cache", "clean", "--cache-dir", str(cache), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("would remove 1 cache folders") and folder.exists()
    assert cli.main(["cache", "clean", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.startswith("removed 1 cache folders") and not folder.exists()
