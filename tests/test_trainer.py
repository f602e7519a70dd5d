"""The trainer: global metrics, early stopping, best-state restore, checkpoints, exact resume, determinism."""
import math

import numpy as np
import pytest
import torch

from optembed_ext.data import make_synthetic
from optembed_ext.models import build_model
from optembed_ext.nn import UniformEmbedding
from optembed_ext.train import Callback, LambdaCallback, TrainConfig, Trainer, load_checkpoint, log_loss, roc_auc


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_samples=3000, num_fields=5, vocab_sizes=[20, 15, 30, 8, 12], seed=3)


def make_model(data, name="deepfm", seed=0, **cfg):
    torch.manual_seed(seed)
    fm = data.feature_map
    cfg = {"mlp_dims": (16, 8), **cfg}
    return build_model(name, fm, UniformEmbedding(fm, 8), **cfg)


def config(**kw):
    base = {"epochs": 3, "batch_size": 256, "eval_batch_size": 128, "lr": 3e-3, "patience": None, "progress": False,
            "seed": 7}
    return TrainConfig(**{**base, **kw})


def pairwise_auc(y, s):
    """AUC from its definition: P(score of a positive > score of a negative), ties counting one half."""
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg)))


def test_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(np.float32)
    s = np.round(rng.random(200), 2)  # rounded: ties occur
    assert roc_auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)
    p = np.clip(s, 1e-7, 1 - 1e-7)
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert log_loss(y, s) == pytest.approx(expected, rel=1e-9)
    assert math.isfinite(log_loss([1, 0], [0.0, 1.0]))  # clipped, not infinite
    with pytest.raises(ValueError, match="single class"):
        roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="same length"):
        roc_auc([1, 0], [0.2])
    with pytest.raises(ValueError, match="only 0 and 1"):
        log_loss([2, 0], [0.5, 0.5])


def test_evaluate_is_global_over_the_split(data):
    model = make_model(data)
    trainer = Trainer(model, data, config(eval_batch_size=64))
    model.train()
    res = trainer.evaluate("test")
    assert model.training  # evaluate restores the previous mode
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(data.test.X))).double().numpy()
    assert res["num_batches"] == math.ceil(len(data.test) / 64) and res["num_samples"] == len(data.test)
    assert res["auc"] == pytest.approx(pairwise_auc(data.test.y, p), abs=1e-9)
    y = data.test.y
    assert res["logloss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)), rel=1e-6)
    assert trainer.evaluate(data.val)["num_samples"] == len(data.val)
    with pytest.raises(ValueError, match="split"):
        trainer.evaluate("dev")


def test_training_learns_and_writes_run_folder(data, tmp_path):
    trainer = Trainer(make_model(data), data, config(epochs=4), run_dir=tmp_path)
    before = trainer.evaluate("test")["auc"]
    res = trainer.fit()
    truth = pairwise_auc(data.test.y, data.info["true_logit_test"])
    assert res["test_auc"] > 0.6 and res["test_auc"] > before + 0.05, (before, res["test_auc"], truth)
    assert res["epochs_run"] == 4 and len(res["history"]) == 4 and len(res["epoch_times"]) == 4
    assert res["global_step"] == 4 * math.ceil(len(data.train) / 256)
    for name in ("checkpoint.pt", "metrics.json", "log.txt"):
        assert (tmp_path / name).is_file()
    assert "finished" in (tmp_path / "log.txt").read_text()
    # a finished run is not trained again: fit(resume=True) returns the stored result
    again = Trainer(make_model(data, seed=9), data, config(epochs=4), run_dir=tmp_path).fit(resume=True)
    assert again["test_auc"] == res["test_auc"] and again["global_step"] == res["global_step"]


class ScriptedVal(Trainer):
    """A trainer whose validation AUC follows a script, to test early stopping exactly."""

    script = ()

    def evaluate(self, split="val"):
        out = super().evaluate(split)
        if split == "val":
            out["auc"] = self.script[self.epoch]
        return out


def test_early_stopping_and_best_state_restore(data, tmp_path):
    snapshots = {}

    def snap(trainer, epoch, val):
        snapshots[epoch] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    seen_ckpt = []

    def check_ckpt(trainer, ids, labels):
        if trainer.step_in_epoch == 0 and trainer.epoch > 0:
            seen_ckpt.append(load_checkpoint(trainer.checkpoint_path)["epoch"])

    ScriptedVal.script = (0.60, 0.70, 0.65, 0.69, 0.99, 0.99)
    trainer = ScriptedVal(make_model(data), data, config(epochs=6, patience=2), run_dir=tmp_path,
                          callbacks=[LambdaCallback(on_epoch_end=snap, on_batch_begin=check_ckpt)])
    res = trainer.fit()
    # epochs 2 and 3 do not beat 0.70: stop after epoch 3, best epoch 1
    assert res["epochs_run"] == 4 and res["stopped_early"] and res["best_epoch"] == 1
    assert res["best_val_auc"] == 0.70 and [h["val_auc"] for h in res["history"]] == [0.60, 0.70, 0.65, 0.69]
    assert seen_ckpt == [1, 2, 3]  # a checkpoint after every epoch
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), f"{k} is not the best epoch's"
    model = trainer.model.eval()
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(data.test.X))).double().numpy()
    assert res["test_auc"] == pytest.approx(pairwise_auc(data.test.y, p), abs=1e-9)
    ScriptedVal.script = (0.6, 0.5, 0.5, 0.5)
    res = ScriptedVal(make_model(data), data, config(epochs=4, patience=None)).fit()
    assert res["epochs_run"] == 4 and not res["stopped_early"] and res["best_epoch"] == 0


class ScriptedValMetrics(Trainer):
    """A trainer whose validation AUC and log loss follow a script of (auc, logloss) pairs."""

    script = ()

    def evaluate(self, split="val"):
        out = super().evaluate(split)
        if split == "val":
            out["auc"], out["logloss"] = self.script[self.epoch]
        return out


# per epoch (auc, logloss): the best AUC is epoch 2, the best log loss epoch 3, the best AUC - log loss epoch 1
MONITOR_SCRIPT = ((0.70, 0.60), (0.80, 0.52), (0.82, 0.58), (0.74, 0.50))


@pytest.mark.parametrize("monitor, best", [("auc", 2), ("logloss", 3), ("auc-logloss", 1)])
def test_monitor_picks_the_best_epoch_and_its_state(data, tmp_path, monitor, best):
    snapshots = {}

    def snap(trainer, epoch, val):
        snapshots[epoch] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    ScriptedValMetrics.script = MONITOR_SCRIPT
    trainer = ScriptedValMetrics(make_model(data), data, config(epochs=4, monitor=monitor), run_dir=tmp_path,
                                 callbacks=[LambdaCallback(on_epoch_end=snap)])
    res = trainer.fit()
    assert res["monitor"] == monitor and res["best_epoch"] == best and res["epochs_run"] == 4
    assert (res["best_val_auc"], res["best_val_logloss"]) == MONITOR_SCRIPT[best]
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, snapshots[best][k]), f"{k} is not the state of epoch {best}"
    # a finished run read back from its checkpoint keeps the choice
    again = ScriptedValMetrics(make_model(data), data, config(epochs=4, monitor=monitor), run_dir=tmp_path,
                               callbacks=[LambdaCallback(on_epoch_end=snap)]).fit()
    assert again["best_epoch"] == best


def test_monitor_drives_early_stopping_and_resume(data, tmp_path):
    # by log loss, epoch 2 (0.58) does not beat epoch 1 (0.52): patience 1 stops there; by AUC it would go on
    ScriptedValMetrics.script = MONITOR_SCRIPT
    res = ScriptedValMetrics(make_model(data), data, config(epochs=4, patience=1, monitor="logloss")).fit()
    assert res["stopped_early"] and res["epochs_run"] == 3 and res["best_epoch"] == 1
    res = ScriptedValMetrics(make_model(data), data, config(epochs=4, patience=1, monitor="auc")).fit()
    assert not res["stopped_early"] and res["epochs_run"] == 4 and res["best_epoch"] == 2
    # killed in epoch 2 and resumed: the stored best epoch (1) is scored under the run's monitor, so epoch 2 is no
    # improvement and the resumed run stops where the uninterrupted one did
    cfg = config(epochs=4, patience=1, monitor="logloss")
    with pytest.raises(KeyboardInterrupt):
        ScriptedValMetrics(make_model(data), data, cfg, run_dir=tmp_path,
                           callbacks=[Kill(at_step=2 * math.ceil(len(data.train) / 256) + 1)]).fit()
    res = ScriptedValMetrics(make_model(data), data, cfg, run_dir=tmp_path, callbacks=[Kill()]).fit()
    assert res["stopped_early"] and res["epochs_run"] == 3 and res["best_epoch"] == 1
    with pytest.raises(ValueError, match="monitor: checkpoint 'logloss' vs config 'auc'"):
        Trainer(make_model(data), data, config(epochs=5, monitor="auc"), run_dir=tmp_path).fit(resume=True)
    with pytest.raises(ValueError, match="monitor must be one of"):
        TrainConfig(monitor="acc")


class ScriptedValCalls(Trainer):
    """A trainer whose validation (auc, logloss) follow a script call by call (the initial state's evaluation
    included), to test keep_initial exactly."""

    script = ()

    def evaluate(self, split="val"):
        out = super().evaluate(split)
        if split == "val":
            self.val_calls = getattr(self, "val_calls", 0) + 1
            out["auc"], out["logloss"] = self.script[self.val_calls - 1]
        return out


@pytest.mark.parametrize("monitor", ["auc", "logloss"])
def test_keep_initial_returns_the_starting_state_when_no_epoch_beats_it(data, tmp_path, monitor):
    start = {}

    def snap_start(trainer):
        start.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    # the initial state (first call) beats both epochs by AUC and by log loss
    ScriptedValCalls.script = ((0.80, 0.40), (0.78, 0.45), (0.79, 0.42))
    trainer = ScriptedValCalls(make_model(data), data, config(epochs=2, monitor=monitor, keep_initial=True),
                               run_dir=tmp_path, callbacks=[LambdaCallback(on_train_begin=snap_start)])
    res = trainer.fit()
    assert res["kept_initial"] and res["best_epoch"] == -1 and res["epochs_run"] == 2
    assert (res["best_val_auc"], res["best_val_logloss"]) == (0.80, 0.40)
    assert (res["initial_val_auc"], res["initial_val_logloss"]) == (0.80, 0.40)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, start[k]), f"{k} is not the starting state"
    model = trainer.model.eval()
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(data.test.X))).double().numpy()
    assert res["test_auc"] == pytest.approx(pairwise_auc(data.test.y, p), abs=1e-9)
    # an epoch that beats it wins; patience counts from the initial state
    ScriptedValCalls.script = ((0.80, 0.40), (0.78, 0.45), (0.85, 0.35))
    res = ScriptedValCalls(make_model(data), data, config(epochs=2, monitor=monitor, keep_initial=True)).fit()
    assert not res["kept_initial"] and res["best_epoch"] == 1
    ScriptedValCalls.script = ((0.80, 0.40), (0.78, 0.45), (0.85, 0.35))
    res = ScriptedValCalls(make_model(data), data, config(epochs=2, monitor=monitor, keep_initial=True,
                                                          patience=1)).fit()
    assert res["kept_initial"] and res["stopped_early"] and res["epochs_run"] == 1
    # without keep_initial the same script picks the better epoch
    ScriptedValCalls.script = ((0.78, 0.45), (0.79, 0.42))
    res = ScriptedValCalls(make_model(data), data, config(epochs=2, monitor=monitor)).fit()
    assert not res["kept_initial"] and res["best_epoch"] == 1 and res["initial_val_auc"] is None


def test_keep_initial_survives_a_resume(data, tmp_path):
    ScriptedValCalls.script = ((0.80, 0.40), (0.78, 0.45), (0.79, 0.42))
    cfg = config(epochs=2, keep_initial=True, monitor="logloss")
    with pytest.raises(KeyboardInterrupt):  # killed in epoch 1, after epoch 0's checkpoint
        ScriptedValCalls(make_model(data), data, cfg, run_dir=tmp_path,
                         callbacks=[Kill(at_step=math.ceil(len(data.train) / 256) + 1)]).fit()
    ScriptedValCalls.script = ((0.79, 0.42),)  # the resumed run evaluates epoch 1 only
    res = ScriptedValCalls(make_model(data), data, cfg, run_dir=tmp_path, callbacks=[Kill()]).fit()
    assert res["kept_initial"] and res["best_epoch"] == -1 and res["best_val_logloss"] == 0.40
    with pytest.raises(ValueError, match="keep_initial"):
        TrainConfig(keep_initial="yes")


class Kill(Callback):
    """Raises at a given global step, standing in for a killed process; counts its calls (checkpointed)."""

    def __init__(self, at_step=None):
        self.at_step = at_step
        self.batches = 0

    def on_batch_begin(self, trainer, ids, labels):
        if self.at_step is not None and trainer.global_step == self.at_step:
            raise KeyboardInterrupt("killed")
        self.batches += 1

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]


@pytest.mark.parametrize("checkpoint_every", [None, 5])
def test_resume_after_kill_equals_uninterrupted_run(data, tmp_path, checkpoint_every):
    # dropout draws from the global RNG, so the RNG states must be restored too
    cfg = config(epochs=3, checkpoint_every=checkpoint_every)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    full_cb = Kill()
    full = Trainer(make_model(data, dropout=0.3), data, cfg, run_dir=tmp_path / "full", callbacks=[full_cb])
    expected = full.fit()
    kill_at = steps_per_epoch + 7  # in the middle of epoch 1
    cut = Trainer(make_model(data, dropout=0.3), data, cfg, run_dir=tmp_path / "cut", callbacks=[Kill(kill_at)])
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["global_step"] == \
        (steps_per_epoch if checkpoint_every is None else kill_at // 5 * 5)
    # a new process: different initial weights, which the checkpoint replaces
    resumed_cb = Kill()
    resumed = Trainer(make_model(data, seed=123, dropout=0.3), data, cfg, run_dir=tmp_path / "cut",
                      callbacks=[resumed_cb])
    got = resumed.fit(resume=True)
    assert "resumed" in (tmp_path / "cut" / "log.txt").read_text()
    for key in ("test_auc", "test_logloss", "best_val_auc", "best_epoch", "global_step"):
        assert got[key] == expected[key], key
    assert [h["val_auc"] for h in got["history"]] == [h["val_auc"] for h in expected["history"]]
    assert [h["train_loss"] for h in got["history"]] == [h["train_loss"] for h in expected["history"]]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed_cb.batches == full_cb.batches == 3 * steps_per_epoch
    # resume=False starts over and reproduces the same run
    fresh = Trainer(make_model(data, dropout=0.3), data, cfg, run_dir=tmp_path / "cut", callbacks=[Kill()])
    assert fresh.fit(resume=False)["test_auc"] == expected["test_auc"]


def test_same_seed_same_result_and_deterministic_mode(data):
    seen = []
    cb = LambdaCallback(on_after_backward=lambda tr: seen.append(torch.are_deterministic_algorithms_enabled()))
    before = torch.are_deterministic_algorithms_enabled()
    a = Trainer(make_model(data, "dcn", cross_layers=2), data, config(epochs=2, deterministic=True),
                callbacks=[cb]).fit()
    assert seen and all(seen) and torch.are_deterministic_algorithms_enabled() == before
    b = Trainer(make_model(data, "dcn", cross_layers=2), data, config(epochs=2, deterministic=True)).fit()
    assert a["test_auc"] == b["test_auc"] and a["test_logloss"] == b["test_logloss"]
    c = Trainer(make_model(data, "dcn", cross_layers=2), data, config(epochs=2, seed=8)).fit()
    assert c["test_logloss"] != a["test_logloss"]  # the seed drives the shuffling


@pytest.mark.parametrize("optimizer,sparse", [("adam", True), ("sparse_adam", True), ("adagrad", True),
                                              ("sgd", False), ("adagrad", False)])
def test_optimizers_and_sparse_tables(data, optimizer, sparse):
    torch.manual_seed(0)
    fm = data.feature_map
    model = build_model("fm", fm, UniformEmbedding(fm, 8, sparse=sparse))
    lr = 0.05 if optimizer in ("sgd", "adagrad") else 3e-3
    trainer = Trainer(model, data, config(epochs=1, optimizer=optimizer, lr=lr, max_steps_per_epoch=4))
    w0 = model.embedding.weight.detach().clone()
    res = trainer.fit()
    assert res["global_step"] == 4 and math.isfinite(res["test_logloss"])
    assert not torch.equal(w0, model.embedding.weight)


def test_next_val_batch_cycles(data):
    trainer = Trainer(make_model(data), data, config(batch_size=128))
    n = math.ceil(len(data.val) / 128)
    first = [trainer.next_val_batch()[0] for _ in range(n)]
    assert sorted(torch.cat(first)[:, 0].tolist()) == sorted(data.val.X[:, 0].tolist())
    ids, labels = trainer.next_val_batch()  # a new cycle starts
    assert ids.shape[1] == data.feature_map.num_fields and labels.shape == (ids.shape[0],)


def test_bad_configuration_is_named(data):
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="unknown TrainConfig key"):
        TrainConfig.from_dict({"epochz": 3})
    assert TrainConfig.from_dict({"batch-size": 7}).batch_size == 7
    with pytest.raises(ValueError, match="optimizer"):
        Trainer(make_model(data), data, config(optimizer="lamb"))
    with pytest.raises(TypeError, match="config"):
        Trainer(make_model(data), data, {"epochs": 1})
    with pytest.raises(TypeError, match="callbacks"):
        Trainer(make_model(data), data, config(), callbacks=[lambda t: None])
    model = make_model(data)
    head = list(model.mlp.parameters())
    trainer = Trainer(model, data, config(), extra_param_groups=[{"params": head, "lr": 0.5}])
    lrs = [g["lr"] for g in trainer.optimizer.param_groups if any(p is head[0] for p in g["params"])]
    assert lrs == [0.5]
    with pytest.raises(ValueError, match="more than one"):
        Trainer(model, data, config(), extra_param_groups=[{"params": [model.embedding.weight]}])


def test_resume_refuses_a_different_training_configuration(data, tmp_path):
    cfg = config(epochs=1)
    Trainer(make_model(data), data, cfg, run_dir=tmp_path).fit()
    with pytest.raises(ValueError, match="batch_size: checkpoint 256 vs config 128"):
        Trainer(make_model(data), data, config(epochs=2, batch_size=128), run_dir=tmp_path).fit(resume=True)
    # options outside RESUME_KEYS (patience here) may change: the finished run is returned, not trained again
    res = Trainer(make_model(data), data, config(epochs=1, patience=3), run_dir=tmp_path).fit(resume=True)
    assert res["epochs_run"] == 1
    res = Trainer(make_model(data), data, config(epochs=1, batch_size=128), run_dir=tmp_path).fit(resume=False)
    assert res["global_step"] == math.ceil(len(data.train) / 128)


@pytest.mark.parametrize("optimizer", ["adam", "fused_adagrad"])
def test_embedding_lr_applies_to_the_embedding_groups_only(data, optimizer):
    model = make_model(data)
    trainer = Trainer(model, data, config(optimizer=optimizer, embedding_lr=0.05))
    emb_ids = {id(p) for p in model.embedding.parameters()}
    seen_emb = seen_rest = 0
    for g in trainer.optimizer.param_groups:
        for p in g["params"]:
            if id(p) in emb_ids:
                assert g["lr"] == 0.05
                seen_emb += 1
            else:
                assert g["lr"] == 3e-3
                seen_rest += 1
    assert seen_emb == len(emb_ids) and seen_rest > 0
    with pytest.raises(ValueError, match="embedding_lr"):
        config(embedding_lr=0.0)


@pytest.mark.parametrize("optimizer", ["fused_sgd_lazywd", "fused_adam_lazywd"])
def test_lazy_weight_decay_is_caught_up_before_evaluation_and_checkpoints(data, optimizer, tmp_path):
    """The trainer evaluates and saves a table with no pending decay: every row carries every step's decay."""
    torch.manual_seed(0)
    fm = data.feature_map
    model = build_model("fm", fm, UniformEmbedding(fm, 8, sparse=True))
    seen = []

    class Peek(Callback):
        def on_epoch_end(self, trainer, *args, **kwargs):
            opt = next(o for o in trainer.optimizer.optimizers if hasattr(o, "catch_up"))
            seen.append(min(int(s["last_step"].min()) for s in opt.state.values() if "last_step" in s))

    cfg = config(epochs=2, optimizer=optimizer, lr=0.05, weight_decay=1e-2, max_steps_per_epoch=5)
    trainer = Trainer(model, data, cfg, run_dir=tmp_path, callbacks=[Peek()])
    trainer.fit()
    opt = next(o for o in trainer.optimizer.optimizers if hasattr(o, "catch_up"))
    last = [s["last_step"] for s in opt.state.values() if "last_step" in s]
    assert last, "the lazy optimizer keeps a last_step per row"
    steps = max(int(s["step"]) for s in opt.state.values() if "step" in s)
    assert steps == 10 and all(bool((t == steps).all()) for t in last)  # caught up by the final evaluation
    assert seen == [5, 10]  # and at every epoch's validation (before the callbacks see the epoch end)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["optimizers"]
    saved_last = [s["last_step"] for o in saved for s in o["state"].values() if "last_step" in s]
    assert saved_last and all(bool((t == steps).all()) for t in saved_last)
