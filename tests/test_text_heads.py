"""Classifier heads on embeddings: logits consistent with the stored head, validation
tuning, and every core detector running on the resulting text Features."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import oodscope as ood
from oodscope import Features
from oodscope.metrics import auroc
from oodscope.text import ClassifierHead, fit_head



def _blobs(n_per: int, classes: int = 6, dim: int = 24, seed: int = 0, spread: float = 0.35):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).standard_normal((classes, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    y = np.repeat(np.arange(classes), n_per)
    x = centers[y] + spread * rng.standard_normal((len(y), dim)) / np.sqrt(dim)
    return x.astype(np.float32), y


def _ood(n: int, dim: int = 24, seed: int = 9):
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True) * 0.3).astype(np.float32)


@pytest.mark.parametrize("hidden", [None, 32])
def test_head_logits_match_stored_head(hidden):
    x, y = _blobs(40)
    xv, yv = _blobs(15, seed=1)
    head = ClassifierHead(hidden=hidden, weight_decay=[1e-4, 1e-2], epochs=30).fit(x, y, xv, yv)
    assert head.val_accuracy_ > 0.95
    assert len(head.search_results_) == 2
    f = head.apply(Features(features=xv, labels=yv))
    np.testing.assert_allclose(f.logits, f.logits_from_features(), rtol=1e-4, atol=1e-4)
    assert np.mean(np.argmax(f.logits, 1) == yv) > 0.95
    if hidden is not None:
        assert f.features.shape[1] == 32 and f.extras["embedding"].shape[1] == 24
        assert (f.features >= 0).all()  # post-ReLU penultimate activations
    else:
        np.testing.assert_array_equal(f.features, xv)


def test_tuning_prefers_the_better_weight_decay():
    x, y = _blobs(40, spread=1.0)
    keep = (y == 0) | (np.arange(len(y)) % 8 == 0)  # class 0 dominates training
    x, y = x[keep], y[keep]
    xv, yv = _blobs(15, seed=1, spread=1.0)
    # A huge penalty shrinks the weights to nothing and the (unpenalised) bias then predicts
    # the majority class; balanced validation accuracy must reject it.
    head = ClassifierHead(weight_decay=[100.0, 1e-4]).fit(x, y, xv, yv)
    assert head.best_params_["weight_decay"] == 1e-4
    accs = {r["weight_decay"]: r["val_accuracy"] for r in head.search_results_}
    assert accs[1e-4] > accs[100.0]
    # Without validation data, a held-out slice of train does the choosing.
    head2 = ClassifierHead(weight_decay=[100.0, 1e-4]).fit(x, y)
    assert head2.best_params_["weight_decay"] == 1e-4


def test_core_detectors_run_on_text_features():
    x, y = _blobs(50)
    xv, yv = _blobs(20, seed=1)
    train_raw, val_raw = Features(features=x, labels=y), Features(features=xv, labels=yv)
    head = fit_head(train_raw, val_raw, weight_decay=1e-3)
    train, test_id = head.apply(train_raw), head.apply(val_raw)
    test_ood = head.apply(Features(features=_ood(100)))
    for name in ["msp", "energy", "maxlogit", "react", "knn", "mahalanobis", "vim"]:
        if name not in ood.list_detectors():
            continue
        det = ood.create(name)
        det.fit(train)
        a = auroc(det.score(test_id), det.score(test_ood))
        assert a > 0.9, (name, a)


def test_head_bad_input_and_roundtrip(tmp_path):
    x, y = _blobs(20)
    with pytest.raises(ValueError, match="out-of-scope"):
        ClassifierHead().fit(x, np.where(y == 0, -1, y))
    with pytest.raises(ValueError, match="labels"):
        ClassifierHead().fit(x, y[:-1])
    with pytest.raises(ValueError, match="every validation class"):
        ClassifierHead().fit(x[y < 3], y[y < 3], x, y)
    with pytest.raises(ValueError, match="two classes"):
        ClassifierHead().fit(x[y == 0], y[y == 0])
    with pytest.raises(ValueError, match="not fitted"):
        ClassifierHead().logits(x)
    head = ClassifierHead(hidden=16, weight_decay=1e-3, epochs=5).fit(x, y)
    with pytest.raises(ValueError, match="shape"):
        head.logits(x[:, :5])
    head.save(tmp_path / "head.npz")
    back = ClassifierHead.load(tmp_path / "head.npz")
    np.testing.assert_allclose(back.logits(x), head.logits(x), rtol=1e-6)
