"""MOL: the adaptation step and the energy score by hand, reset / score_stream semantics,
few-shot adaptation to a shifted domain, the outlier term, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

import oodscope as ood
from oodscope import Features
from oodscope.detectors.mol import MOL


def _domains(seed=0, n_per=120, c=3, d=6, n_domains=4, shift=2.5):
    """Class clusters under a per-domain offset (a covariate shift of the features)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 2.0, (c, d))
    offsets = rng.normal(0, shift, (n_domains + 1, d))

    def domain(k, n):
        y = rng.integers(0, c, n)
        return Features(features=means[y] + offsets[k] + 0.7 * rng.standard_normal((n, d)), labels=y,
                        extras={"domain": np.full(n, k)})

    train = Features.concat([domain(k, n_per) for k in range(n_domains)])
    return train, domain, n_domains


def test_adapt_is_sgd_from_the_init_and_score_is_the_energy():
    train, domain, _ = _domains(n_per=40)
    det = MOL(meta_iters=3, adapt_steps=1, inner_lr=0.5).fit(train)
    sup = domain(1, 10)
    det.adapt(sup)
    p0 = det.init_params_
    z = (sup.features - det.mean_) / det.scale_
    logits = z @ p0["w2"].T + p0["b2"]
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    err = (prob - np.eye(det.num_classes_)[sup.labels]) / len(z)
    np.testing.assert_allclose(det.params_["w2"], p0["w2"] - 0.5 * err.T @ z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(det.params_["b2"], p0["b2"] - 0.5 * err.sum(0), rtol=1e-4, atol=1e-5)
    x = domain(1, 5)
    lz = ((x.features - det.mean_) / det.scale_) @ det.params_["w2"].T + det.params_["b2"]
    np.testing.assert_allclose(det.score(x), np.log(np.exp(lz).sum(1)), rtol=1e-10)
    det.reset()
    np.testing.assert_array_equal(det.params_["w2"], p0["w2"])


def test_score_stream_resets_and_adapts_per_stage():
    train, domain, _ = _domains(n_per=40)
    det = MOL(meta_iters=3, hidden=4).fit(train)
    s1, t1, s2, t2 = domain(1, 10), domain(1, 8), domain(2, 10), domain(2, 8)
    streamed = det.score_stream([(s1, t1), (s2, t2), (None, t1)])
    np.testing.assert_allclose(streamed[0], det.reset().adapt(s1).score(t1))
    np.testing.assert_allclose(streamed[1], det.reset().adapt(s2).score(t2))
    np.testing.assert_allclose(streamed[2], det.reset().score(t1))


def test_few_shot_adaptation_recovers_accuracy_on_a_new_domain():
    train, domain, n = _domains(seed=1, shift=4.0)
    det = MOL(meta_iters=150, support_size=12, adapt_steps=5, inner_lr=0.3, inner_steps=2).fit(train)
    new_support, new_test = domain(n, 12), domain(n, 300)  # a domain never seen in training
    before = (det.reset().logits(new_test).argmax(1) == new_test.labels).mean()
    after = (det.adapt(new_support).logits(new_test).argmax(1) == new_test.labels).mean()
    assert after > before + 0.08 and after > 0.8


def test_outlier_energy_term_separates_outliers():
    train, domain, _ = _domains(seed=2)
    rng = np.random.default_rng(0)
    near_origin = lambda n: Features(features=rng.normal(0, 0.5, (n, 6)))  # noqa: E731
    test_id, test_ood, support = domain(1, 200), near_origin(200), domain(1, 12)
    aurocs = []
    for weight in (0.0, 1.0):
        det = MOL(meta_iters=80, energy_weight=weight, hidden=16).fit(train, outliers=near_origin(200))
        det.adapt(support)
        aurocs.append(ood.metrics.auroc(det.score(test_id), det.score(test_ood)))
    assert aurocs[1] > 0.9 and aurocs[1] > aurocs[0] + 0.2
    with pytest.raises(ValueError, match="width"):
        MOL(meta_iters=1).fit(train, outliers=Features(features=np.zeros((5, 3))))


def test_bad_inputs_raise():
    train, domain, _ = _domains(n_per=20)
    det = MOL(meta_iters=1).fit(train)
    with pytest.raises(ValueError, match="labels"):
        det.adapt(Features(features=np.zeros((3, 6))))
    with pytest.raises(ValueError, match="ID labels"):
        det.adapt(Features(features=np.zeros((3, 6)), labels=np.array([0, 1, 7])))
    with pytest.raises(ValueError, match="width"):
        det.adapt(Features(features=np.zeros((3, 4)), labels=np.zeros(3, int)))
    with pytest.raises(ValueError, match="before fit"):
        MOL().adapt(domain(1, 3))
    with pytest.raises(ValueError, match="domain id"):
        MOL(meta_iters=1).fit(train.replace(extras={"domain": np.zeros((len(train), 2))}))
    for params in ({"hidden": -1}, {"inner_lr": 0.0}, {"meta_iters": 0}, {"energy_weight": -1.0}):
        with pytest.raises(ValueError):
            MOL(**params).fit(train)
