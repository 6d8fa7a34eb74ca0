"""Reference networks, checkpoints and adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import oodscope
from oodscope import models, train


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
        train.reference_model("fashion-mnist", cache_dir=tmp_path, train_if_missing=False)
    with pytest.raises(ValueError, match="No reference recipe"):
        train.reference_model("imagenet", cache_dir=tmp_path, train_if_missing=False)


@pytest.mark.slow
def test_reference_model_reaches_93_percent():
    """Trains the Fashion-MNIST reference network if it is not cached (minutes on CPU)."""
    from oodscope import data
    from oodscope.train.loop import evaluate

    net, meta = train.reference_model("fashion-mnist", progress=False)
    test = data.load("fashion-mnist", "test")
    norm = meta["normalization"]
    acc = evaluate(net, data.loader(test, 1000, mean=norm["mean"], std=norm["std"]))["accuracy"]
    assert acc == pytest.approx(meta["test_accuracy"], abs=1e-6)
    assert acc >= 0.93
    # trained on 55,000 images; the other 5,000 (500 per class) are the benchmark's ID-val
    val = np.asarray(meta["val_indices"])
    assert meta["train_size"] == 55_000 and len(val) == 5000 and len(np.unique(val)) == 5000
    train_split = data.load("fashion-mnist", "train")
    assert np.all(np.bincount(train_split.labels[val], minlength=10) == 500)


# ---------------------------------------------------------------- held-out validation images
def test_holdout_split_disjoint_stratified_deterministic():
    from oodscope.train.reference import holdout_split

    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    np.random.default_rng(1).shuffle(labels)
    train_idx, val_idx = holdout_split(labels, 20, seed=3)
    assert len(val_idx) == 20 and len(train_idx) == 80
    assert np.intersect1d(train_idx, val_idx).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(100))
    assert np.all(np.diff(val_idx) > 0) and val_idx.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels[val_idx], minlength=4), [10, 6, 3, 1])
    again = holdout_split(labels, 20, seed=3)
    np.testing.assert_array_equal(again[1], val_idx)
    other = holdout_split(labels, 20, seed=4)[1]
    assert not np.array_equal(other, val_idx)
    # remainders: 7 of 3 equal classes of 10 -> 3, 2, 2 (ties to the smaller class id)
    _, v = holdout_split(np.repeat(np.arange(3), 10), 7, seed=0)
    np.testing.assert_array_equal(np.bincount(np.repeat(np.arange(3), 10)[v]), [3, 2, 2])
    for bad in (0, 100, 2.5, -1):
        with pytest.raises(ValueError, match="n_val"):
            holdout_split(labels, bad)


def test_fashion_mnist_recipe_holds_out_5000():
    from oodscope.train.reference import RECIPES, _recipe_hash

    assert RECIPES["fashion-mnist"]["val_holdout"] == 5000
    assert _recipe_hash(RECIPES["fashion-mnist"]) != _recipe_hash(
        {k: v for k, v in RECIPES["fashion-mnist"].items() if k != "val_holdout"})


def test_reference_model_trains_without_held_out_images(tmp_path, monkeypatch):
    """A tiny recipe on synthetic images: the images `fit` sees are exactly the ones not in
    ``meta["val_indices"]``, and the indices survive the JSON checkpoint."""
    from oodscope import data as odata
    from oodscope.data import ImageDataset
    from oodscope.train import reference
    from oodscope.train import loop

    n = 120
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n)  # each image carries its own position
    labels = np.arange(n) % 3
    split = {"train": ImageDataset(images, labels, ["a", "b", "c"], name="toy/train"),
             "test": ImageDataset(images[:30], labels[:30], ["a", "b", "c"], name="toy/test")}
    monkeypatch.setattr(odata, "load", lambda name, s, **kw: split[s])
    seen = {}
    real_fit = loop.fit

    def spy_fit(model, train, **kw):
        seen["positions"] = np.asarray(train.images[:, 0, 0], dtype=np.int64)
        return real_fit(model, train, **kw)

    monkeypatch.setattr(loop, "fit", spy_fit)
    recipe = dict(reference.RECIPES["fashion-mnist"], epochs=1, batch_size=32, val_holdout=30,
                  model_kwargs={"width": 4, "feature_dim": 8})
    monkeypatch.setitem(reference.RECIPES, "toy", recipe)
    net, meta = reference.reference_model("toy", cache_dir=tmp_path, progress=False, seed=5)
    val = meta["val_indices"]
    assert isinstance(val, list) and all(isinstance(i, int) for i in val) and len(val) == 30
    assert meta["train_size"] == 90 and meta["val_holdout"]["size"] == 30
    np.testing.assert_array_equal(np.sort(seen["positions"]), np.setdiff1d(np.arange(n), val))
    np.testing.assert_array_equal(np.bincount(labels[val]), [10, 10, 10])
    expected = reference.holdout_split(labels, 30, seed=5)[1]
    np.testing.assert_array_equal(val, expected)
    _, cached = reference.reference_model("toy", cache_dir=tmp_path, train_if_missing=False, seed=5)
    assert cached["val_indices"] == val
