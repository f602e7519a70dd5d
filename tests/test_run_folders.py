"""Run folders: a rerun resumes only with the settings and data that made the folder, --no-resume starts over,
and unreadable files in a run folder give one line that names the file and what to do."""
import json

import pytest
import yaml

from optembed_ext import cli
from optembed_ext.data import make_synthetic
from optembed_ext.models import build_model
from optembed_ext.nn import UniformEmbedding
from optembed_ext.search import optembed as oe
from optembed_ext.search.compare import CompareConfig, run_compare
from optembed_ext.train import TrainConfig, Trainer
from optembed_ext.train.checkpoint import RunFolderError

TRAIN = ["train", "--dataset", "synthetic", "--num-samples", "900", "--embed-dim", "4", "--mlp-dims", "8",
         "--epochs", "1", "--batch-size", "256", "--no-progress"]
SEARCH = dict(embed_dim=4, model_cfg={"mlp_dims": [8]}, epochs=1, patience=None, generations=1, mutation_num=2,
              crossover_num=2, keep_num=1, batch_size=256, eval_batch_size=1024, evo_batch_size=256,
              baseline=False, export=False, measure_speedup=False)


def _search_cli(tmp_path, out, **overrides):
    cfg = dict(SEARCH, dataset="synthetic", model="fm",
               dataset_kwargs={"num_samples": 900, "num_fields": 3, "vocab_sizes": 9}, **overrides)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["search", "--config", str(path), "--out", str(out)]


def test_train_rerun_with_another_split_seed_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(TRAIN + ["--data-seed", "1", "--out", str(out)]) == 0
    before = (out / "config.yaml").read_text()
    assert cli.main(TRAIN + ["--data-seed", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data-seed: 1 in the run folder, 2 now" in err and "--no-resume" in err
    assert (out / "config.yaml").read_text() == before  # nothing of the refused run was written
    assert cli.main(TRAIN + ["--data-seed", "2", "--out", str(out), "--no-resume"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["data-seed"] == 2
    # a finished run is not silently reported as a longer one
    assert cli.main(TRAIN + ["--epochs", "2", "--data-seed", "2", "--out", str(out)]) == 2
    assert "epochs: 1 in the run folder, 2 now" in capsys.readouterr().err


def test_trainer_refuses_a_checkpoint_of_other_data(tmp_path):
    a = make_synthetic(num_samples=800, num_fields=3, vocab_sizes=9, seed=1)
    b = make_synthetic(num_samples=800, num_fields=3, vocab_sizes=9, seed=2)  # same shape, other rows
    cfg = TrainConfig(epochs=1, batch_size=256)

    def trainer(data):
        model = build_model("fm", data.feature_map, UniformEmbedding(data.feature_map, 4))
        return Trainer(model, data, cfg, run_dir=tmp_path)

    trainer(a).fit()
    with pytest.raises(RunFolderError, match="data differ"):
        trainer(b).fit()
    assert trainer(a).fit()["epochs_run"] == 1  # the same data resumes (here: the finished result)
    trainer(b).fit(resume=False)


def test_search_rerun_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_search_cli(tmp_path, out)) == 0
    metrics = (out / "metrics.json").read_text()
    assert cli.main(_search_cli(tmp_path, out) + ["--embed-dim", "8", "--generations", "2"]) == 2
    err = capsys.readouterr().err
    assert "embed-dim: 4 in the run folder, 8 now" in err and "generations" in err and "--no-resume" in err
    assert (out / "metrics.json").read_text() == metrics
    # a setting that changes no result may differ
    assert cli.main(_search_cli(tmp_path, out) + ["--eval-batch-size", "512"]) == 0
    assert cli.main(_search_cli(tmp_path, out) + ["--embed-dim", "8", "--no-resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["embed_dim"] == 8


def test_run_optembed_refuses_other_settings_or_data(tmp_path):
    data = make_synthetic(num_samples=900, num_fields=3, vocab_sizes=9, seed=0)
    oe.run_optembed(data, "fm", dict(SEARCH), out_dir=tmp_path, log=None)
    with pytest.raises(RunFolderError, match="alpha"):
        oe.run_optembed(data, "fm", dict(SEARCH, alpha=1e-2), out_dir=tmp_path, log=None)
    other = make_synthetic(num_samples=900, num_fields=3, vocab_sizes=9, seed=5)
    with pytest.raises(RunFolderError, match="data"):
        oe.run_optembed(other, "fm", dict(SEARCH), out_dir=tmp_path, log=None)
    res = oe.run_optembed(other, "fm", dict(SEARCH, alpha=1e-2), out_dir=tmp_path, log=None, resume=False)
    assert res["config"]["alpha"] == 1e-2


@pytest.mark.parametrize("victim", ["phases/supernet/done.json", "phases/supernet/supernet.pt",
                                    "phases/evolution/evolution_state.pt", "phases/retrain/checkpoint.pt"])
def test_unreadable_files_in_a_search_folder_name_themselves(tmp_path, capsys, victim):
    out = tmp_path / "run"
    assert cli.main(_search_cli(tmp_path, out)) == 0
    path = out / victim
    assert path.exists(), victim
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])  # truncated
    if victim.endswith("checkpoint.pt"):  # the retrain phase is re-entered only when it is not done
        (out / "phases" / "retrain" / "done.json").unlink()
    elif victim.endswith("evolution_state.pt"):
        (out / "phases" / "evolution" / "done.json").unlink()
    elif victim.endswith("supernet.pt"):
        (out / "phases" / "evolution" / "done.json").unlink()
    assert cli.main(_search_cli(tmp_path, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "--no-resume" in err[0], err
    assert "Traceback" not in "\n".join(err)


def test_empty_train_checkpoint_names_itself(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(TRAIN + ["--out", str(out)]) == 0
    (out / "checkpoint.pt").write_bytes(b"")
    assert cli.main(TRAIN + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and str(out / "checkpoint.pt") in err and "--no-resume" in err


def test_no_resume_refuses_to_empty_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(TRAIN + ["--out", str(tmp_path), "--no-resume"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_compare_refuses_to_reuse_a_method_folder_of_other_settings(tmp_path):
    base = {"datasets": ["synthetic-tiny"], "methods": ["uniform"], "embed_dim": 4, "epochs": 1,
            "batch_size": 256, "mlp_dims": [8], "uniform_dims": [4], "synthetic_samples": 800}
    rows = run_compare(CompareConfig.from_dict(base), out=tmp_path)
    assert run_compare(CompareConfig.from_dict(dict(base, progress=True)), out=tmp_path) == rows
    with pytest.raises(RunFolderError, match="lr"):
        run_compare(CompareConfig.from_dict(dict(base, lr=0.1)), out=tmp_path)
    with pytest.raises(RunFolderError, match="dims"):
        run_compare(CompareConfig.from_dict(dict(base, uniform_dims=[2])), out=tmp_path)
    new = run_compare(CompareConfig.from_dict(dict(base, lr=0.1, force=True)), out=tmp_path)
    assert len(new) == len(rows)
