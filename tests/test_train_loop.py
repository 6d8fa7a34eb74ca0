"""The training loop: loss goes down, NaN stops it, seeds reproduce, outliers flow."""

from __future__ import annotations

import math

import pytest
import torch

from oodscope import data, models
from oodscope.train.base import CrossEntropy, Objective
from oodscope.train.loop import NonFiniteLossError, evaluate, fit


@pytest.fixture(scope="module")
def subset():
    return data.load("fashion-mnist", "train").sample(256, seed=0)


def tiny(seed=0):
    torch.manual_seed(seed)
    return models.create("small_cnn", 10, width=4, feature_dim=16)


@pytest.mark.requires_data("fashion-mnist")
def test_fit_decreases_loss(subset):
    net = tiny()
    mean, std = data.channel_stats(subset)
    before = evaluate(net, subset, mean=mean, std=std)["loss"]
    net, hist = fit(net, subset, epochs=4, batch_size=32, lr=3e-3, progress=False, val_data=subset)
    after = evaluate(net, subset, mean=mean, std=std)["loss"]
    assert after < 0.8 * before, (before, after)
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert hist["steps"] == 4 * (256 // 32) and len(hist["val_accuracy"]) == 4
    assert hist["normalization"]["mean"] == pytest.approx(mean)
    assert not net.training


@pytest.mark.requires_data("fashion-mnist")
def test_same_seed_same_weights_other_seed_differs(subset):
    def run(seed):
        net, _ = fit(tiny(0), subset, epochs=1, batch_size=64, seed=seed, progress=False,
                     augment=data.RandomShiftFlip(1, True))
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


class ExplodeAt(Objective):
    def __init__(self, step):
        self.step = step
        self.calls = 0

    def loss(self, model, x, y, x_out=None):
        self.calls += 1
        loss, logs = CrossEntropy().loss(model, x, y)
        return (loss * math.nan if self.calls >= self.step else loss), logs


@pytest.mark.requires_data("fashion-mnist")
def test_nan_loss_stops_with_step_and_causes(subset):
    with pytest.raises(NonFiniteLossError, match=r"(?s)step 3 .*learning rate") as err:
        fit(tiny(), subset, epochs=2, batch_size=32, objective=ExplodeAt(3), progress=False)
    assert isinstance(err.value, ValueError)
    assert "normalise" in str(err.value)


class Recorder(Objective):
    needs_outliers = True

    def __init__(self):
        self.out_shapes, self.epochs = [], []
        self.scale = torch.nn.Parameter(torch.ones(()))

    def setup(self, model, num_classes):
        self.num_classes = num_classes

    def parameters(self):
        return [self.scale]

    def loss(self, model, x, y, x_out=None):
        self.out_shapes.append(tuple(x_out.shape))
        logits = model(x) * self.scale
        out_logits = model(x_out) * self.scale
        loss = torch.nn.functional.cross_entropy(logits, y) + 0.5 * (
            -torch.log_softmax(out_logits, 1).mean(1)).mean()
        return loss, {"n_out": float(len(x_out))}

    def on_epoch_end(self, epoch):
        self.epochs.append(epoch)


@pytest.mark.requires_data("fashion-mnist")
def test_outliers_cycle_objective_params_and_hooks(subset):
    obj = Recorder()
    outliers = data.uniform_noise(40, (28, 28), seed=0)
    _, hist = fit(tiny(), subset, objective=obj, outliers=outliers, epochs=2, batch_size=32,
                  outlier_batch_size=16, progress=False)
    assert obj.num_classes == 10 and obj.epochs == [0, 1]
    assert len(obj.out_shapes) == 16 and all(s == (16, 1, 28, 28) or s == (8, 1, 28, 28) for s in obj.out_shapes)
    assert float(obj.scale.detach()) != 1.0  # the objective's own parameter was optimised
    assert hist["logs"][0]["n_out"] > 0


@pytest.mark.requires_data("fashion-mnist")
def test_outlier_errors(subset):
    with pytest.raises(ValueError, match="needs auxiliary outliers"):
        fit(tiny(), subset, objective=Recorder(), progress=False)
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 1, 28, 28)), batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        fit(tiny(), subset, objective=Recorder(), outliers=empty, progress=False, max_steps=2)


@pytest.mark.requires_data("fashion-mnist")
def test_tensor_input_max_steps_sgd_and_checkpoint(tmp_path, subset):
    X = data.to_tensor(subset.images, 0.286, 0.353)
    y = torch.as_tensor(subset.labels)
    ckpt = tmp_path / "run" / "model.safetensors"
    net, hist = fit(tiny(), (X, y), epochs=3, batch_size=32, optimizer="sgd", lr=0.05, max_steps=5,
                    checkpoint=ckpt, progress=False)
    assert hist["steps"] == 5 and len(hist["epoch"]) == 1
    assert hist["lr"][-1] == pytest.approx(0.0, abs=1e-9)  # cosine reaches zero at max_steps
    loaded, meta = models.load_checkpoint(ckpt)
    assert meta["history"]["steps"] == 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(X[:4]), net(X[:4]))
    with pytest.raises(ValueError, match="optimizer"):
        fit(tiny(), (X, y), optimizer="lbfgs", progress=False)


@pytest.mark.requires_data("fashion-mnist")
def test_cli_train_writes_checkpoint(tmp_path, capsys):
    from oodscope.cli import main

    out = tmp_path / "out"
    rc = main(["train", "fashion-mnist", "--train-subset", "128", "--max-steps", "2", "--epochs", "1",
               "--batch-size", "32", "--seed", "3", "--test-subset", "500", "--out", str(out), "--quiet"])
    assert rc == 0
    _, meta = models.load_checkpoint(out / "model.safetensors")
    assert meta["method"] == "ce" and meta["seed"] == 3 and 0.0 <= meta["test_accuracy"] <= 1.0
    assert meta["history"]["steps"] == 2 and "normalization" in meta and meta["test_n"] == 500
    assert "test accuracy" in capsys.readouterr().out
    assert main(["train", "fashion-mnist", "--method", "no-such-method", "--out", str(out)]) == 2


def test_cli_help_explains_every_option(capsys):
    from oodscope.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for opt in ("--method", "--outliers", "--epochs", "--seed", "--out", "--param", "--model", "--lr",
                "--max-steps", "--device"):
        assert opt in text


@pytest.mark.requires_data("fashion-mnist")
def test_cli_outlier_method(tmp_path):
    from oodscope.cli import main
    from oodscope.train import list_objectives

    if "oe" not in list_objectives():
        pytest.skip("outlier exposure objective not available")
    out = tmp_path / "oe"
    assert main(["train", "fashion-mnist", "--method", "oe", "--out", str(out)]) == 2  # no --outliers
    rc = main(["train", "fashion-mnist", "--method", "oe", "--outliers", "noise", "--n-outliers", "64",
               "--train-subset", "64", "--max-steps", "2", "--batch-size", "32", "--test-subset", "100",
               "--out", str(out), "--quiet"])
    assert rc == 0
    _, meta = models.load_checkpoint(out / "model.safetensors")
    assert meta["outliers"] == "noise" and meta["objective"]["name"] == "oe"
    assert meta["history"]["steps"] == 2


@pytest.mark.requires_data("fashion-mnist")
def test_uint8_tuple_input_is_scaled(subset):
    _, hist = fit(tiny(), (subset.images, subset.labels), epochs=1, batch_size=64, max_steps=2, progress=False)
    assert math.isfinite(hist["train_loss"][0])
