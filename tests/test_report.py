"""The HTML report: self-contained, with every section the issue asks for."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from oodscope.bench.runner import run
from oodscope.report import render_report

from test_bench_runner import Broken, _feature_set


@pytest.fixture(scope="module")
def result():
    fs = _feature_set(n=150)
    fs.info["id_accuracy"] = 0.9123
    return run(fs, ["msp", "energy", Broken()], benchmark="synthetic", n_boot=20,
               full_spectrum=True, progress=False)


def test_report_sections_and_content(result, tmp_path):
    html = render_report(result)
    for section in ("summary", "leaderboard", "full-spectrum", "validation-ood", "hyperparameters",
                    "roc", "histograms", "selective", "timing", "skipped"):
        assert f'id="{section}"' in html, section
    assert "independent synthetic noise" in html  # what the validation OOD set is
    assert "91.23" in html  # ID accuracy
    assert "always fails" in html  # skip reason
    assert "temperature=" in html  # chosen hyperparameters
    assert "Extraction" in html and "fit (one, s)" in html
    # one ROC figure and one histogram figure per OOD set, and the risk-coverage figure, as PNG
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) == 5
    for b in imgs:
        assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_has_no_external_assets(result, tmp_path):
    path = result.write(tmp_path)["html"]
    html = path.read_text()
    assert "<script" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<link" not in html


def test_report_shows_accuracy_under_covariate_shift_beside_detection():
    from oodscope.generalization import shift_accuracies
    from oodscope.metrics import accuracy, auroc

    fs = _feature_set()
    res = run(fs, ["msp", "knn"], ci=False, full_spectrum=True, progress=False)
    gen = res.info["generalization"]
    assert gen["accuracy"] == shift_accuracies(fs.test_id, fs.covariate)
    assert gen["accuracy"]["scaled"] == pytest.approx(accuracy(fs.covariate["scaled"].logits,
                                                               fs.covariate["scaled"].labels))
    html = render_report(res)
    assert 'id="generalization"' in html and "relative robustness" in html
    shift_auc = auroc(res.scores["knn"]["test_id"], res.scores["knn"]["scaled (as ID)"])
    assert f"{100 * shift_auc:.1f}" in html.split('id="generalization"')[1].split("<h2")[0]
    # without --full-spectrum there are no shifted-set scores: the section says how to get them
    assert "--full-spectrum" in render_report(run(fs, ["msp"], ci=False, progress=False))


def test_selective_section_equals_oodscope_selective():
    """The report's AURC / E-AURC / risk table is oodscope.selective on the test ID scores and
    the correctness of the cached logits' predictions."""
    from oodscope import selective

    fs = _feature_set(n=150)
    labels = fs.test_id.labels.copy()
    flip = np.random.default_rng(0).random(labels.size) < 0.2  # the classifier is wrong on these
    labels[flip] = (labels[flip] + 1) % (labels.max() + 1)
    fs.test_id = fs.test_id.replace(labels=labels)
    result = run(fs, ["msp", "energy"], ci=False, progress=False)
    correct = fs.test_id.logits.argmax(1) == labels
    assert 0 < correct.sum() < correct.size
    np.testing.assert_array_equal(result.test_id_correct, correct)
    section = render_report(result).split('id="selective"')[1].split("<h2")[0]
    rows = dict(re.findall(r'<tr><td class="l">(\w+)</td>(.*?)</tr>', section))
    assert set(rows) == {"msp", "energy"}
    for det in ("msp", "energy"):
        s = result.scores[det]["test_id"]
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", rows[det])
        expect = [selective.aurc(s, correct), selective.excess_aurc(s, correct),
                  *(selective.risk_at_coverage(s, correct, c) for c in selective.SELECTIVE_COVERAGES),
                  1 - correct.mean()]
        assert cells == [f"{100 * v:.2f}" for v in expect], det
    msp_aurc = selective.aurc(result.scores["msp"]["test_id"], correct)
    assert result.to_json()["selective"]["msp"]["aurc"] == pytest.approx(msp_aurc)  # results.json too
    assert "risk-coverage" in section and "data:image/png;base64," in section


def test_selective_section_says_why_when_correctness_is_unknown(result):
    from dataclasses import replace

    html = render_report(replace(result, test_id_correct=None))
    assert "Not available" in html.split('id="selective"')[1].split("<h2")[0]
