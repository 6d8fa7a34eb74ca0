"""Guard: calibrated thresholds, conformal p-values, drift monitoring, save/load, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

import oodscope as ood
from oodscope import Features
from oodscope.cli import main
from oodscope.guard import Guard
from oodscope.monitor import RejectionMonitor

from detector_examples import fitted_example


def _gauss(n, d=16, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return Features(features=(rng.standard_normal((n, d)) + shift).astype(np.float32),
                    labels=np.zeros(n, dtype=np.int64))


@pytest.fixture(scope="module")
def data():
    return dict(train=_gauss(2000, seed=1), val=_gauss(2000, seed=2), test=_gauss(4000, seed=3),
                far=_gauss(500, shift=4.0, seed=4), ood_val=_gauss(999, shift=0.6, seed=5),
                ood_test=_gauss(4000, shift=0.6, seed=6))


@pytest.fixture(scope="module")
def guard(data):
    return Guard("mahalanobis", tpr=0.95, detector_params={"shrinkage": 0.0}).fit(
        data["train"], val=data["val"])


def test_threshold_hits_its_tpr_on_held_out_id(guard, data):
    accepted = guard.predict(data["test"])
    n = len(accepted)
    # conformal: P(reject ID) = m/(n_cal+1) <= 0.05; binomial 99.9% tolerance around it
    p0 = guard.expected_reject_rate_
    assert p0 <= 0.05 + 1e-12 and p0 > 0.045
    lo, hi = stats.binom.interval(0.999, n, p0)
    assert lo <= n - accepted.sum() <= hi
    assert guard.calibration_tpr_ == pytest.approx(0.95, abs=0.001)


def test_threshold_rule_by_hand():
    g = Guard("msp", tpr=0.9, n_boot=0)
    g.detector.fit()
    scores = np.arange(1.0, 20.0)  # n = 19: m = floor(0.1 * 20) = 2 -> the 2nd smallest
    g._set_calibration(scores, None)
    assert g.threshold_ == 2.0
    assert g.expected_reject_rate_ == pytest.approx(2 / 20)
    np.testing.assert_allclose(g.p_values_of([0.5, 1.0, 2.0, 19.0, 100.0]),
                               np.array([1, 2, 3, 20, 20]) / 20)
    assert g.accept_of([1.9, 2.0]).tolist() == [False, True]
    with pytest.raises(ValueError, match="at least 9 calibration samples"):
        g._set_calibration(np.arange(8.0), None)


def test_predict_equals_p_value_rule(guard, data):
    p = guard.p_values(data["test"])
    assert np.array_equal(guard.predict(data["test"]), p > 1 - guard.tpr)


def test_p_values_are_uniform_on_id_and_small_on_far_ood(guard, data):
    p = guard.p_values(data["test"])
    assert stats.kstest(p, "uniform").pvalue > 0.01
    p_far = guard.p_values(data["far"])
    assert np.median(p_far) < 0.01 and p_far.max() < 0.2


def test_fpr_mode_bounds_ood_acceptance(data):
    g = Guard("mahalanobis", fpr=0.05).fit(data["train"], val=data["val"], ood_val=data["ood_val"])
    acc = g.predict(data["ood_test"])
    lo, hi = stats.binom.interval(0.999, len(acc), 0.05)
    assert acc.sum() <= hi
    assert g.info()["mode"] == "fpr" and g.ood_calibration_acceptance_ <= 0.05
    with pytest.raises(ValueError, match="ood_val"):
        Guard("knn", fpr=0.05).fit(data["train"], val=data["val"])
    with pytest.raises(ValueError, match="at least 19 OOD"):
        Guard("mahalanobis", fpr=0.05).fit(data["train"], val=data["val"], ood_val=data["far"][:10])


def test_threshold_interval_contains_threshold_and_shrinks_with_n(data):
    small = Guard("mahalanobis", n_boot=300).fit(data["train"], val=data["val"][:200])
    big = Guard("mahalanobis", n_boot=300).fit(data["train"], val=data["val"])
    for g in (small, big):
        lo, hi = g.threshold_ci_
        assert lo <= g.threshold_ <= hi
    assert np.diff(big.threshold_ci_)[0] < np.diff(small.threshold_ci_)[0]


def test_fit_without_val_holds_out_calibration_data(data):
    g = Guard("knn", detector_params={"k": 5}).fit(data["train"])
    assert g.detector.bank_size_ == 1600 and len(g.calibration_scores_) == 400
    assert "held-out 400" in g.info()["calibration"]["source"]


def test_bad_arguments():
    for kw in ({"tpr": 1.0}, {"tpr": 0}, {"fpr": 1.5}, {"calibration_split": 1.0}, {"n_boot": -1}):
        with pytest.raises(ValueError):
            Guard("knn", **kw)
    with pytest.raises(ValueError, match="not calibrated"):
        Guard("knn").predict(_gauss(3))
    with pytest.raises(TypeError):
        Guard(42)
    with pytest.raises(ValueError, match="held-out"):
        Guard("msp").fit(None)


@pytest.mark.parametrize("name", ["ensemble", "adaneg", "odin", "energy", "vim"])
def test_guard_works_with_any_detector_and_round_trips(name, tmp_path):
    det, train, x = fitted_example(name)
    g = Guard(det, tpr=0.8, n_boot=50).calibrate(x)
    before = g.decide(x)
    g.save(tmp_path / "g")
    runtime = {"model": det.model} if "model" in det.requires else {}
    g2 = ood.load(tmp_path / "g", **runtime)
    assert isinstance(g2, Guard) and g2.threshold_ == g.threshold_
    assert g2.threshold_ci_ == g.threshold_ci_
    after = g2.decide(x)
    if det.stateful:  # the memory kept scoring after calibration: compare from the same state
        g.detector.reset(), g2.detector.reset()
        before, after = g.decide(x), g2.decide(x)
    np.testing.assert_allclose(after["scores"], before["scores"], rtol=1e-6, atol=1e-6)
    assert np.array_equal(after["accept"], before["accept"])


def test_guard_document_is_checked(guard, tmp_path):
    guard.save(tmp_path / "g")
    from safetensors.numpy import load_file

    from oodscope import persistence

    doc = json.loads((tmp_path / "g" / "oodscope.json").read_text())
    doc["guard"]["state"]["threshold_"] = "high"
    persistence.write_bundle(tmp_path / "g", doc, load_file(str(tmp_path / "g" / "arrays.safetensors")))
    with pytest.raises(ValueError, match="threshold_"):
        ood.load(tmp_path / "g")
    with pytest.raises(ValueError, match="not a Guard"):
        ood.save(ood.create("msp").fit(), tmp_path / "d")
        Guard.load(tmp_path / "d")


# ----------------------------------------------------------------------- monitoring
def test_monitor_quiet_on_id_alerts_on_drift(guard, data):
    mon = guard.monitor(window=500)
    for chunk in np.array_split(np.arange(len(data["test"])), 8):
        status = mon.update(guard.predict(data["test"][chunk]))
        assert not status.alert
    assert status.n == 500 and status.low < status.rate < status.high
    status = mon.update(guard.predict(data["ood_test"][:500]))
    assert status.alert and status.direction == "too many rejections"
    assert status.total_seen == 4500


def test_monitor_window_and_two_sided_test():
    seen = []
    m = RejectionMonitor(0.05, window=200, min_samples=50, on_alert=seen.append)
    s = m.update(np.ones(1000, bool))  # nothing rejected in 200: far below 5%
    assert s.n == 200 and s.rejected == 0 and s.alert and s.direction == "too few rejections"
    assert seen and seen[0].alerts == 1
    m.reset()
    s = m.update(np.r_[np.zeros(10, bool), np.ones(30, bool)])
    assert s.n == 40 and s.rejected == 10 and not s.alert  # below min_samples
    with pytest.raises(ValueError):
        RejectionMonitor(0.0)
    with pytest.raises(ValueError):
        RejectionMonitor(0.05, window=10, min_samples=20)


# ----------------------------------------------------------------------- command line
def _subspace(n, dims, seed):
    """Rows living (up to small noise) in the coordinates ``dims``: cosine k-NN separates
    two such groups."""
    rng = np.random.default_rng(seed)
    x = 0.05 * rng.standard_normal((n, 16))
    x[:, dims] += rng.standard_normal((n, len(dims)))
    return x.astype(np.float32)


def test_cli_fit_and_score(tmp_path, capsys):
    Features(features=_subspace(1000, range(8), 0)).save(tmp_path / "train.npz")
    np.savez(tmp_path / "val.npz", features=_subspace(500, range(8), 1))  # plain npz works too
    np.save(tmp_path / "new.npy", np.concatenate([_subspace(50, range(8), 2),
                                                  _subspace(50, range(8, 16), 3)]))
    assert main(["fit", "--features", str(tmp_path / "train.npz"), "--val", str(tmp_path / "val.npz"),
                 "--detector", "knn", "--param", "k=5", "--out", str(tmp_path / "g")]) == 0
    assert "threshold" in capsys.readouterr().out
    assert main(["score", str(tmp_path / "g"), "--features", str(tmp_path / "new.npy"),
                 "--out", str(tmp_path / "s.csv")]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "s.csv")
    assert list(table.columns) == ["index", "score", "accept", "p_value"]
    assert table["accept"][:50].mean() > 0.8 and table["accept"][50:].mean() == 0.0
    g = ood.load(tmp_path / "g")
    assert g.detector.k == 5
    np.testing.assert_allclose(table["score"], g.score(Features(features=np.load(tmp_path / "new.npy"))))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["score", str(tmp_path / "missing"), "--features", "x.npy"]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["fit", "--features", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "g")]) == 2
    np.save(tmp_path / "f.npy", np.ones((40, 3)))
    assert main(["fit", "--features", str(tmp_path / "f.npy"), "--param", "k", "--out",
                 str(tmp_path / "g")]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
