"""Class-split benchmark, one short training run per method, and the comparison driver."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from oodscope.bench import ProviderOptions
from oodscope.bench.classsplit import FMNIST_CLASSES, NEAR_NAME, SPLITS, class_split_features
from oodscope.bench.classsplit import split_datasets as _split_datasets
from oodscope.train import create_objective, fit
from oodscope.bench.compare import TrainBudget, compare_training, run_comparison
from oodscope.train.outliers import check_no_leak, get_outlier_source

MEAN, STD = 0.286, 0.353


def split_datasets(split, seed=0, subset=None, **kw):
    return _split_datasets(split, ProviderOptions(seed=seed, subset=subset), **kw)


def fashion_mnist_split(data, net, **options):
    return class_split_features(data, net, {}, "the test network", ProviderOptions(**options))


@pytest.fixture(scope="module")
def split_data():
    return split_datasets(0, seed=0, val_size=200, subset=80, train_size=96)


@pytest.mark.requires_data("fashion-mnist", "mnist:test")
def test_splits_hold_out_four_classes_and_stay_disjoint(split_data):
    assert len(SPLITS) >= 3 and all(len(s) == 4 for s in SPLITS)
    assert len({tuple(sorted(s)) for s in SPLITS}) == len(SPLITS)
    d = split_data
    assert sorted(d.id_classes + d.held_out) == list(range(10))
    assert set(np.unique(d.train.labels)) <= set(range(6)) and d.train.classes == [FMNIST_CLASSES[c] for c in d.id_classes]
    assert len(d.train) == 96 and len(d.near_ood) == 80 and len(d.test_id) == 80
    assert np.all(d.near_ood.labels == -1)
    assert d.near_ood.meta["classes"] == [FMNIST_CLASSES[c] for c in SPLITS[0]]
    with pytest.raises(ValueError, match="split must be"):
        split_datasets(len(SPLITS))


@pytest.mark.requires_data("fashion-mnist", "mnist:test")
def test_near_ood_images_are_the_held_out_classes_only():
    from oodscope import data as D

    d = split_datasets(1, seed=0, val_size=100, subset=50, train_size=50)
    test = D.load("fashion-mnist", "test")
    lookup = {img.tobytes(): lab for img, lab in zip(test.images, test.labels)}
    assert {int(lookup[img.tobytes()]) for img in d.near_ood.images} <= set(SPLITS[1])
    assert not {int(lookup.get(img.tobytes(), -1)) for img in d.test_id.images} & set(SPLITS[1])
    # training and validation images never come from a held-out class: their labels are remapped ID labels
    assert d.val.labels.min() >= 0 and d.val_ood.name.endswith("val-ood-generated")


@pytest.mark.parametrize("method", ["ce", "oe", "mixoe", "logitnorm", "abet", "palm", "ascood"])
@pytest.mark.requires_data("fashion-mnist", "mnist:test")
def test_short_end_to_end_run_per_method(method, split_data):
    from oodscope import create as create_detector
    from oodscope.extraction import extract
    from oodscope.models import create

    d = split_data
    obj = create_objective(method, **({"decay_epochs": 1} if method == "ascood" else {}))
    outliers = None
    if obj.needs_outliers:
        outliers = get_outlier_source("photos", id_data=d.train, n=64)
        check_no_leak(outliers, {NEAR_NAME: "fashion-mnist", "mnist": "mnist"})
    torch.manual_seed(0)
    net = create("small_cnn", num_classes=6, in_channels=1, width=8, feature_dim=32)
    net, hist = fit(net, d.train, objective=obj, outliers=outliers, epochs=1, batch_size=32, lr=2e-3,
                    mean=MEAN, std=STD, progress=False)
    assert hist["steps"] == 3 and all(np.isfinite(hist["train_loss"]))
    from oodscope.data import loader

    keep = obj.default_detector == "iodin"
    feats = extract(net, loader(d.test_id.head(24), 24, mean=MEAN, std=STD), keep_inputs=keep, progress=False)
    ood = extract(net, loader(d.near_ood.head(24), 24, mean=MEAN, std=STD), keep_inputs=keep, progress=False)
    if method == "abet":
        t = feats.extras["temperature"]
        assert t.shape == (24,) and np.all((t > 0) & (t <= 1))
    kwargs = {"model": net, "input_std": STD} if keep else {}
    det = create_detector(obj.default_detector, **kwargs).fit(feats)
    scores = np.concatenate([det.score(feats), det.score(ood)])
    assert np.all(np.isfinite(scores))


@pytest.mark.requires_data("fashion-mnist", "mnist:test")
def test_provider_returns_near_and_far_sets(split_data, tmp_path):
    from oodscope.models import create

    torch.manual_seed(0)
    net = create("small_cnn", num_classes=6, in_channels=1, width=8, feature_dim=16)
    fs = fashion_mnist_split(split_data, net, fields={"logits", "features"}, progress=False, cache_dir=tmp_path)
    assert set(fs.near_ood) == {NEAR_NAME} and set(fs.far_ood) == {"mnist"}
    assert len(fs.val_ood) == len(fs.val_id) == 80
    assert fs.info["test_ood_sources"][NEAR_NAME] == "fashion-mnist"
    assert fs.info["held_out_classes"] == [FMNIST_CLASSES[c] for c in SPLITS[0]]
    with pytest.raises(ValueError, match="classes"):
        fashion_mnist_split(split_data, create("small_cnn", num_classes=10, width=8, feature_dim=16),
                            progress=False)


@pytest.mark.requires_data("fashion-mnist", "mnist:test")
def test_comparison_table_and_files(tmp_path, monkeypatch):
    budget = TrainBudget(epochs=1, train_size=64, n_outliers=64, batch_size=32)
    res = compare_training("fashion-mnist-split", "ce,oe", seeds=(0,), budget=budget, subset=60,
                           post_hoc=("msp", "energy", "knn"), out=tmp_path / "out", cache_dir=tmp_path,
                           progress=False)
    table = res["table"]
    assert list(table["method"]) == ["ce", "oe"]
    assert list(table["paper_detector"]) == ["msp", "msp"]
    for col in ("id_accuracy", "paper_near_auroc", "paper_far_fpr95", "best_near_auroc", "best_far_auroc"):
        assert table[col].between(0, 1).all(), col
    assert set(table["best_posthoc"]) <= {"msp", "energy", "knn"}
    # the best post-hoc detector is the one with the highest validation AUROC, never a test-set choice
    for key, det in res["details"].items():
        chosen = res["rows"][list(res["details"]).index(key)]["best_posthoc"]
        assert det["scores"][chosen]["val_auroc"] == max(s["val_auroc"] for s in det["scores"].values())
    assert "CE model" in res["verdict"]
    from oodscope.models import load_checkpoint

    _, meta = load_checkpoint(tmp_path / "out" / "models" / "oe-seed0.safetensors")
    assert meta["objective"]["name"] == "oe" and meta["default_detector"] == "msp"
    assert (tmp_path / "out" / "comparison.csv").exists() and (tmp_path / "out" / "comparison.md").read_text().count("|") > 20


def test_comparison_rejects_bad_requests(tmp_path):
    args = argparse.Namespace(benchmark="fashion-mnist-split", compare_training="ce,nonsense", out=str(tmp_path),
                              seeds="0", subset=10, quick=True)
    with pytest.raises(ValueError, match="nonsense"):
        run_comparison(args)
    with pytest.raises(ValueError, match="supports the benchmarks"):
        compare_training("cifar10", "ce", budget=TrainBudget(epochs=1, train_size=32))


@pytest.mark.requires_data("fashion-mnist", "mnist:test")
def test_fit_rejects_outliers_of_the_wrong_shape_before_the_first_step(split_data):
    from oodscope.data.dataset import ImageDataset

    obj = create_objective("oe")
    steps = []
    real = obj.loss
    obj.loss = lambda *a, **k: steps.append(1) or real(*a, **k)
    wrong = ImageDataset(np.zeros((20, 32, 32, 3), np.uint8), None, [], name="rgb-outliers")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 6))
    with pytest.raises(ValueError, match="shape"):
        fit(net, split_data.train, objective=obj, outliers=wrong, epochs=1, batch_size=16,
            progress=False, mean=MEAN, std=STD)
    assert not steps


@pytest.mark.requires_data("fashion-mnist", "mnist:test")
def test_split_datasets_uses_held_out_indices_as_id_val():
    d = split_datasets(0, seed=0, val_indices=np.arange(0, 600, 2), subset=None, train_size=None)
    from oodscope import data as D

    train_all = D.load("fashion-mnist", "train")
    held = np.arange(0, 600, 2)
    id_held = held[np.isin(train_all.labels[held], d.id_classes)]
    np.testing.assert_array_equal(d.val.images, train_all.images[id_held])
    n_id = int(np.isin(train_all.labels, d.id_classes).sum())
    assert len(d.train) == n_id - len(id_held)
    with pytest.raises(ValueError, match="ID-val would be empty"):
        split_datasets(0, val_indices=np.flatnonzero(~np.isin(train_all.labels, d.id_classes))[:5])
