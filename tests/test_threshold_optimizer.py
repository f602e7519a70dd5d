"""OptEmbed's thresholds get an optimizer of their own (plain SGD by default, as the authors train them)."""
import pytest
import torch

from optembed_ext.data import make_synthetic
from optembed_ext.models import build_model
from optembed_ext.nn.optembed import OptEmbedEmbedding
from optembed_ext.search.compare import CompareConfig
from optembed_ext.search.optembed import OptEmbedConfig
from optembed_ext.train import TrainConfig, Trainer
from optembed_ext.train.optimizers import build_optimizer, threshold_parameters


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_samples=600, num_fields=3, vocab_sizes=11, seed=0)


def _model(data, **kw):
    torch.manual_seed(0)
    emb = OptEmbedEmbedding(data.feature_map, 4, threshold_init=0.05, **kw)
    return build_model("fm", data.feature_map, emb)


@pytest.mark.parametrize("wd", [0.0, 1e-3])
def test_an_sgd_step_moves_the_thresholds_by_exactly_lr_times_grad(data, wd):
    model = _model(data, threshold_lr=0.3)
    opt = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=wd))
    kinds = [type(o).__name__ for o in opt.optimizers]
    assert kinds == ["Adam", "SGD"]
    t = model.embedding.threshold
    ids, y = torch.as_tensor(data.train.X[:64]), torch.as_tensor(data.train.y[:64])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids), y) + model.embedding.regularization()
    opt.zero_grad()
    loss.backward()
    before, grad = t.detach().clone(), t.grad.detach().clone()
    assert grad.abs().sum() > 0
    opt.step()
    torch.testing.assert_close(t.detach(), before - 0.3 * grad, rtol=0, atol=1e-7)  # no decay, no momentum


def test_threshold_lr_and_adam_option(data):
    model = _model(data, threshold_lr=0.3)
    opt = build_optimizer(model, TrainConfig(threshold_optimizer="adam", threshold_lr=0.05))
    thr = opt.optimizers[-1]
    assert isinstance(thr, torch.optim.Adam) and thr.param_groups[0]["lr"] == 0.05
    assert thr.param_groups[0]["weight_decay"] == 0.0
    assert [p for g in thr.param_groups for p in g["params"]] == [model.embedding.threshold]
    # the thresholds are in no other group
    others = {id(p) for o in opt.optimizers[:-1] for g in o.param_groups for p in g["params"]}
    assert id(model.embedding.threshold) not in others
    with pytest.raises(ValueError, match="threshold_optimizer"):
        TrainConfig(threshold_optimizer="rmsprop")
    with pytest.raises(ValueError, match="threshold_lr"):
        TrainConfig(threshold_lr=-1.0)


def test_frozen_or_threshold_free_tables_have_no_threshold_optimizer(data):
    model = _model(data)
    model.embedding.freeze(model.embedding.row_mask())
    assert threshold_parameters(model.embedding) == []
    assert len(build_optimizer(model, TrainConfig()).optimizers) == 1
    plain = build_model("fm", data.feature_map, OptEmbedEmbedding(data.feature_map, 4, prune_rows=False))
    assert threshold_parameters(plain.embedding) == []


def test_trainer_checkpoints_the_threshold_optimizer(data, tmp_path):
    model = _model(data)
    t0 = model.embedding.threshold.detach().clone()
    Trainer(model, data, TrainConfig(epochs=1, batch_size=128, threshold_lr=0.5), run_dir=tmp_path).fit()
    assert not torch.equal(model.embedding.threshold.detach(), t0)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    groups = state["optimizer"]["optimizers"][-1]["param_groups"]
    assert len(state["optimizer"]["optimizers"]) == 2 and groups[0]["lr"] == 0.5 and groups[0]["momentum"] == 0


def test_the_option_reaches_every_entry_point():
    assert OptEmbedConfig().train_config(1).threshold_optimizer == "sgd"
    assert OptEmbedConfig(threshold_optimizer="adam").train_config(1).threshold_optimizer == "adam"
    cmp = CompareConfig(methods=["optembed"], threshold_optimizer="adam")
    assert cmp.build_method("optembed").config.threshold_optimizer == "adam"
    from optembed_ext import cli

    parser = cli.build_parser()
    args = parser.parse_args(["search", "--threshold-optimizer", "adam"])
    assert args.threshold_optimizer == "adam"
    args = parser.parse_args(["train", "--threshold-optimizer", "adam", "--threshold-lr", "0.1"])
    assert args.threshold_optimizer == "adam" and args.threshold_lr == 0.1


@pytest.mark.parametrize("name", ["fused_bwd_sgd", "fused_bwd_adagrad", "fused_bwd_adam"])
def test_the_trainer_runs_the_update_inside_the_backward(data, name):
    """The optimizers that update the table inside the lookup's backward train an OptEmbed supernet end to end,
    thresholds included (their own SGD)."""
    from optembed_ext.optim import FusedBackwardOptimizer

    model = _model(data, threshold_lr=0.5)
    w0 = model.embedding.weight.detach().clone()
    t0 = model.embedding.threshold.detach().clone()
    trainer = Trainer(model, data, TrainConfig(epochs=1, batch_size=128, optimizer=name, embedding_lr=0.05))
    assert any(isinstance(o, FusedBackwardOptimizer) for o in trainer.optimizer.optimizers)
    res = trainer.fit()
    assert not torch.equal(model.embedding.weight.detach(), w0)
    assert not torch.equal(model.embedding.threshold.detach(), t0)
    assert 0.0 <= res["test_auc"] <= 1.0
