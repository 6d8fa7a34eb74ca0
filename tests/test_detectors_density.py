"""Hand-checked values for the density detectors (class-chunk GMM / HVCM and Gram)."""

from __future__ import annotations

import numpy as np
import pytest

import oodscope as ood
from oodscope import Features
from oodscope._numeric import shrunk_covariance_inverse
from oodscope.detectors.density import gram_rowsums


def _tiny(seed=0, n=120, d=7, c=3):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (c, d)) + 5
    y = np.arange(n) % c
    x = means[y] + rng.normal(0, 1, (n, d)) * rng.uniform(0.5, 2, (c, d))[y]
    xt = means[rng.integers(0, c, 30)] + rng.normal(0, 1.5, (30, d))
    return Features(features=x, labels=y, meta={"num_classes": c}), Features(features=xt)


def _brute_gmm(train, test, bounds, shrinkage, weights=None):
    x, y = train.features.astype(np.float64), train.labels
    classes = np.unique(y)
    q = test.features.astype(np.float64)
    total = np.zeros((len(q), len(classes)))
    for ci, c in enumerate(classes):
        xc = x[y == c]
        for k, (a, b) in enumerate(bounds):
            mu = xc[:, a:b].mean(0)
            cov = np.cov(xc[:, a:b], rowvar=False, ddof=1).reshape(b - a, b - a)
            prec = shrunk_covariance_inverse(cov, shrinkage)
            diff = q[:, a:b] - mu
            pi = 1.0 / len(bounds) if weights is None else weights[ci, k]
            total[:, ci] += pi * 0.5 * np.einsum("ni,ij,nj->n", diff, prec, diff)
    return -total.min(1)


@pytest.mark.parametrize(
    "n_chunks,bounds", [(1, [(0, 7)]), (2, [(0, 4), (4, 7)]), (7, [(i, i + 1) for i in range(7)])]
)
def test_gmm_matches_brute_force(n_chunks, bounds):
    train, test = _tiny()
    det = ood.create("gmm", n_chunks=n_chunks, shrinkage=0.05).fit(train)
    assert det.bounds_ == bounds
    np.testing.assert_allclose(det.score(test), _brute_gmm(train, test, bounds, 0.05), rtol=1e-9)


def test_gmm_uses_mixture_weights_from_features():
    train, test = _tiny(seed=1)
    rng = np.random.default_rng(1)
    raw = rng.random((len(train), 2))
    train = train.replace(extras={"mixture_weights": raw / raw.sum(1, keepdims=True)})
    pi = np.stack([train.extras["mixture_weights"][train.labels == c].mean(0) for c in range(3)])
    pi /= pi.sum(1, keepdims=True)
    det = ood.create("gmm", n_chunks=2, shrinkage=0.05).fit(train)
    np.testing.assert_allclose(det.mixture_weights_, pi, rtol=1e-12)
    expected = _brute_gmm(train, test, [(0, 4), (4, 7)], 0.05, weights=pi)
    np.testing.assert_allclose(det.score(test), expected, rtol=1e-9)
    with pytest.raises(ValueError, match="mixture_weights"):
        ood.create("gmm", n_chunks=3).fit(train)


def test_gmm_chunked_equals_unchunked_and_validation():
    train, test = _tiny(seed=2, n=301)
    whole = ood.create("gmm", n_chunks=2).fit(train)
    chunked = ood.create("gmm", n_chunks=2, chunk_size=13).fit(train)
    np.testing.assert_allclose(chunked.means_, whole.means_, rtol=1e-10)
    for a, b in zip(chunked.whitening_, whole.whitening_):
        np.testing.assert_allclose(a @ np.swapaxes(a, 1, 2), b @ np.swapaxes(b, 1, 2), rtol=1e-8)
    np.testing.assert_allclose(chunked.score(test), whole.score(test), rtol=1e-8)
    with pytest.raises(ValueError, match="n_chunks"):
        ood.create("gmm", n_chunks=8).fit(train)
    with pytest.raises(ValueError):
        ood.create("gmm", n_chunks=0).fit(train)


# -------------------------------------------------------------------------- Gram
def test_gram_rowsums_match_explicit_gram_matrix():
    rng = np.random.default_rng(3)
    layer = rng.normal(size=(4, 5, 3, 2))
    for p in (1, 2, 3):
        got = gram_rowsums(layer, p)
        for i in range(4):
            f = layer[i].reshape(5, -1) ** p
            rows = (f @ f.T).sum(1)
            np.testing.assert_allclose(got[i], np.sign(rows) * np.abs(rows) ** (1 / p), rtol=1e-10)


def _gram_problem(seed=4, n=400):
    rng = np.random.default_rng(seed)
    c, ch = 3, 6
    proto = rng.uniform(0.5, 1.5, (c, ch, 4, 4))

    def make(n, ood_data=False):
        y = rng.integers(0, c, n)
        maps = proto[y] * rng.uniform(0.8, 1.2, (n, 1, 1, 1)) + 0.05 * rng.normal(
            size=(n, ch, 4, 4)
        )
        if ood_data:
            maps = rng.uniform(0, 3, (n, ch, 4, 4)) ** 2
        feats = maps.mean((2, 3))
        logits = feats @ proto.mean((2, 3)).T
        return Features(
            logits=logits,
            features=feats,
            labels=y if not ood_data else None,
            extras={"layer:block": maps.astype(np.float32)},
        )

    return make(n), make(150), make(150, ood_data=True)


def test_gram_uses_cached_layers_and_separates():
    train, test_id, test_ood = _gram_problem()
    det = ood.create("gram", max_power=3).fit(train)
    assert det.layer_names_ == ["layer:block"]
    auc = ood.metrics.auroc(det.score(test_id), det.score(test_ood))
    assert auc > 0.95
    with pytest.raises(ValueError, match="layer:block"):
        det.score(test_id.replace(extras={}))
    only_features = ood.create("gram", max_power=3, layers=[]).fit(train)
    assert only_features.layer_names_ == []


def test_gram_deviation_by_hand():
    """One layer of width 1, power 1: deviation is the relative distance outside [min, max]."""
    train = Features(logits=np.zeros((11, 2)) + [1, 0], features=np.arange(1.0, 12.0)[:, None])
    det = ood.create("gram", max_power=1, validation_fraction=0.5, seed=0).fit(train)
    lo, hi = det.mins_[0][0, 0], det.maxs_[0][0, 0]
    # rowsum for a 1-channel vector f is f·f, rooted by p=1 -> f² ; scaled by train max |f| = 11
    x = np.array([[0.5], [6.0], [20.0]])
    g = (x[:, 0] / 11.0) ** 2
    dev = np.maximum(lo - g, 0) / (abs(lo) + det.eps_[0]) + np.maximum(g - hi, 0) / (
        abs(hi) + det.eps_[0]
    )
    got = det.score(Features(logits=np.zeros((3, 2)) + [1, 0], features=x))
    np.testing.assert_allclose(got, -dev / det.layer_norms_[0], rtol=1e-10)
    assert got[1] >= got[0] and got[1] > got[2]
