"""Reference networks, checkpoints and adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import oodscope
from oodscope import models


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # on a shared, oversubscribed machine multi-threaded torch is many times slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_small_cnn_shapes_and_extract():
    torch.manual_seed(0)
    net = models.create("small_cnn", num_classes=7)
    assert isinstance(net.fc, nn.Linear)
    x = torch.randn(5, 1, 28, 28)
    assert tuple(net(x).shape) == (5, 7)
    feats = oodscope.extract(net, x, progress=False)
    assert feats.features.shape == (5, 128) and feats.logits.shape == (5, 7)
    np.testing.assert_allclose(feats.features @ feats.head_weight.T + feats.head_bias, feats.logits, atol=1e-4)


def test_resnet18_cifar_shapes():
    torch.manual_seed(0)
    net = models.create("resnet18_cifar", num_classes=10, in_channels=3).eval()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert tuple(net(x).shape) == (2, 10)
        assert tuple(net.forward_features(x).shape) == (2, 512)
    assert sum(p.numel() for p in net.parameters()) > 11_000_000


def test_create_validation():
    with pytest.raises(ValueError, match="Unknown model"):
        models.create("vgg99", 10)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("small_cnn", 0)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = models.create("small_cnn", num_classes=4, width=8, feature_dim=16)
    net.train()
    net(torch.randn(8, 1, 28, 28))  # move the BatchNorm running stats away from defaults
    net.eval()
    path = models.save_checkpoint(net, tmp_path / "m.safetensors", {"note": "hi", "acc": np.float32(0.5)})
    meta_file = tmp_path / "m.json"
    meta = json.loads(meta_file.read_text())
    assert meta["arch"]["name"] == "small_cnn" and meta["note"] == "hi"
    assert not path.read_bytes().startswith(b"\x80")  # not a pickle
    loaded, meta2 = models.load_checkpoint(path)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert meta2["acc"] == pytest.approx(0.5)


def test_checkpoint_mismatch_names_keys(tmp_path):
    net = models.create("small_cnn", num_classes=4, width=8)
    path = models.save_checkpoint(net, tmp_path / "m.safetensors")
    other = models.create("small_cnn", num_classes=5, width=8)
    with pytest.raises(ValueError, match=r"shape mismatch.*fc\.weight"):
        models.load_checkpoint(path, model=other)
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        models.load_checkpoint(path, model=models.create("resnet18_cifar", 4))
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["arch"]["kwargs"]["width"] = 16
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match the architecture"):
        models.load_checkpoint(path)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        models.load_checkpoint(tmp_path / "bad.safetensors", model=net)


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.classifier = nn.Sequential(nn.Linear(6, 3))

    def forward(self, x):
        return {"logits": self.classifier(self.drop(self.body(x)))}


def test_adapt_user_model():
    torch.manual_seed(0)
    user = UserNet()
    x = torch.randn(4, 3, 2, 2)
    wrapped = models.adapt(user, penultimate="body", head="classifier.0")
    assert wrapped.fc is user.classifier[0]
    feats = oodscope.extract(wrapped, x, progress=False)
    assert feats.features.shape == (4, 6)
    np.testing.assert_allclose(feats.features @ feats.head_weight.T + feats.head_bias, feats.logits, atol=1e-5)
    auto = models.adapt(user)  # the last linear layer is found automatically
    assert auto.fc is user.classifier[0]
    with pytest.raises(ValueError, match="No module named"):
        models.adapt(user, penultimate="nope")
    bad = models.adapt(user, penultimate="body.0", head="classifier.0")  # 12 values, not 6
    with pytest.raises(ValueError, match="takes 6"):
        bad.eval()(x)


def test_reference_model_missing_without_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_if_missing"):
        models.reference_model("fashion-mnist", cache_dir=tmp_path, train_if_missing=False)
    with pytest.raises(ValueError, match="No reference recipe"):
        models.reference_model("imagenet", cache_dir=tmp_path, train_if_missing=False)


@pytest.mark.slow
def test_reference_model_reaches_91_percent():
    """Trains the Fashion-MNIST reference network if it is not cached (minutes on CPU)."""
    from oodscope import data
    from oodscope.train.loop import evaluate

    net, meta = models.reference_model("fashion-mnist", progress=False)
    test = data.load("fashion-mnist", "test")
    norm = meta["normalization"]
    acc = evaluate(net, data.loader(test, 1000, mean=norm["mean"], std=norm["std"]))["accuracy"]
    assert acc == pytest.approx(meta["test_accuracy"], abs=1e-6)
    assert acc >= 0.91
