"""Risk-coverage curve and AURC, checked against hand computations."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from oodscope import selective as S
from oodscope.report.plots import risk_coverage_png


def test_hand_computed_curve_and_aurc():
    scores = [4.0, 3.0, 2.0, 1.0]
    correct = [True, False, True, False]
    rc = S.risk_coverage_curve(scores, correct)
    np.testing.assert_allclose(rc.coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(rc.risk, [0.0, 0.5, 1 / 3, 0.5])
    np.testing.assert_allclose(rc.accuracy, [1.0, 0.5, 2 / 3, 0.5])
    assert S.aurc(scores, correct) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)


def test_ties_spread_errors_evenly_and_ignore_input_order():
    # all tied: every coverage has the overall error rate
    assert S.aurc(np.zeros(10), np.arange(10) < 7) == pytest.approx(0.3)
    # a tied block: (3, right) then tie {wrong, right} then (1, wrong)
    s, c = [3.0, 2.0, 2.0, 1.0], [True, False, True, False]
    expected = (0 / 1 + 0.5 / 2 + 1 / 3 + 2 / 4) / 4
    assert S.aurc(s, c) == pytest.approx(expected)
    assert S.aurc(s[::-1], c[::-1]) == pytest.approx(expected)
    rc = S.risk_coverage_curve(s, c)
    np.testing.assert_allclose(rc.coverage, [0.25, 0.75, 1.0])


def test_perfect_ordering_has_zero_excess_and_matches_closed_form():
    rng = np.random.default_rng(0)
    correct = rng.random(20000) < 0.8
    r = 1 - correct.mean()
    assert S.excess_aurc(correct.astype(float), correct) == pytest.approx(0.0, abs=1e-12)
    # Geifman et al.: AURC* = r + (1 - r) ln(1 - r) for large n
    assert S.optimal_aurc(correct) == pytest.approx(r + (1 - r) * np.log(1 - r), abs=1e-3)
    assert S.aurc(-correct.astype(float), correct) > S.aurc(rng.random(correct.size), correct)


def test_sign_a_better_score_has_lower_aurc():
    rng = np.random.default_rng(1)
    correct = rng.random(2000) < 0.7
    informative = correct + 0.8 * rng.standard_normal(correct.size)
    assert S.aurc(informative, correct) < S.aurc(-informative, correct)
    assert S.aurc(informative, correct) < 1 - correct.mean()  # beats answering at random


def test_risk_at_coverage_and_coverage_at_risk():
    scores = [4.0, 3.0, 2.0, 1.0]
    correct = [True, False, True, False]
    assert S.risk_at_coverage(scores, correct, 0.25) == 0.0
    assert S.risk_at_coverage(scores, correct, 0.5) == 0.5
    assert S.risk_at_coverage(scores, correct, 1.0) == 0.5
    assert S.coverage_at_risk(scores, correct, 0.4) == 0.75
    assert S.coverage_at_risk([1.0, 2.0], [True, False], 0.0) == 0.0


def test_correct_predictions():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    np.testing.assert_array_equal(S.correct_predictions(logits, [0, 0, 0]), [True, False, True])
    with pytest.raises(ValueError, match="negative"):
        S.correct_predictions(logits, [0, -1, 0])
    with pytest.raises(ValueError, match="labels"):
        S.correct_predictions(logits, [0, 1])


@pytest.mark.parametrize("scores, correct, match", [
    ([1.0, np.nan], [True, False], "NaN"),
    ([1.0, 2.0], [True], "length"),
    ([], [], "at least one"),
    ([1.0, 2.0], [0.5, 1.0], "booleans"),
    ([1.0, 2.0], [2, 1], "0 and 1"),
    (["a", "b"], [True, False], "numbers"),
])
def test_bad_inputs_raise(scores, correct, match):
    with pytest.raises(ValueError, match=match):
        S.aurc(scores, correct)


def test_bad_targets_raise():
    with pytest.raises(ValueError, match="coverage"):
        S.risk_at_coverage([1.0], [True], 0.0)
    with pytest.raises(ValueError, match="risk"):
        S.coverage_at_risk([1.0], [True], 1.5)


def test_plot_is_a_png():
    rng = np.random.default_rng(0)
    correct = rng.random(300) < 0.8
    png = risk_coverage_png({"good": (correct + rng.random(300), correct),
                             "random": (rng.random(300), correct)},
                            points={"sdm admit": (0.4, 0.01)})
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
