"""`oodscope bench ... --export DIR`: the validation winner becomes a calibrated, saved guard."""

from __future__ import annotations

import json

import numpy as np
import pytest

import oodscope as ood
from oodscope import Features
from oodscope.bench.export import choose_winner, export_best
from oodscope.bench.runner import run
from oodscope.bench.spec import FeatureSet
from oodscope.cli import main

import test_bench_cli  # noqa: F401  (registers the "synthetic-test" benchmark)


def _logits(rng, n, top, second=0.0, rest=0.0, c=6):
    z = rng.normal(0.0, 0.3, (n, c))
    z[:, 0] += top
    z[:, 1] += second
    z[:, 2:] += rest
    return Features(logits=z.astype(np.float32))


def _trap_set() -> FeatureSet:
    """msp wins on validation, maxlogit on the test OOD set."""
    rng = np.random.default_rng(0)
    id_ = lambda n: _logits(rng, n, 5.0)  # noqa: E731 - confident, max logit about 5
    return FeatureSet(
        train=id_(200), val_id=id_(400),
        val_ood=_logits(rng, 400, 10.0, second=10.0),  # two large logits: high max, low MSP
        test_id=id_(2000),
        far_ood={"trap": _logits(rng, 400, 4.0, second=-100.0, rest=-100.0)},  # MSP 1, max logit 4
    )


def test_export_takes_the_validation_winner_not_the_test_winner(tmp_path):
    res = run(_trap_set(), ["msp", "maxlogit"], ci=False, progress=False, keep_detectors=True)
    test_auroc = {r["detector"]: r["auroc"] for r in res.rows if r["ood_set"] == "trap"}
    assert test_auroc["maxlogit"] > 0.9 > 0.1 > test_auroc["msp"]
    assert res.tuning["msp"]["val_auroc"] > 0.9 > 0.1 > res.tuning["maxlogit"]["val_auroc"]
    summary = export_best(res, tmp_path / "guard", tpr=0.95)
    assert summary["detector"] == "msp"
    guard = ood.load(tmp_path / "guard")
    assert type(guard.detector).name == "msp" and guard.threshold_ == summary["threshold"]
    # calibrated on 1,000 test-ID samples, checked on the other 1,000: TPR 0.95 within the
    # binomial tolerance (4 standard deviations)
    tol = 4 * np.sqrt(0.95 * 0.05 / 1000)
    assert abs(summary["held_out_id_acceptance"] - 0.95) < tol
    assert summary["calibration_samples"] == 1000


def test_choose_winner_breaks_ties_by_validation_fpr():
    tuning = {"a": {"val_auroc": 0.9, "val_fpr_at_95_tpr": 0.3},
              "b": {"val_auroc": 0.9, "val_fpr_at_95_tpr": 0.2},
              "c": {"val_auroc": None}}
    assert choose_winner(tuning, ["a", "b", "c"]) == "b"
    with pytest.raises(ValueError, match="nothing to export"):
        choose_winner(tuning, ["c"])


def test_export_needs_kept_detectors():
    res = run(_trap_set(), ["msp"], ci=False, progress=False)
    with pytest.raises(ValueError, match="keep_detectors"):
        export_best(res, "unused")


def test_bench_cli_export_then_score(tmp_path, capsys):
    out, guard_dir = tmp_path / "run", tmp_path / "best"
    rc = main(["bench", "synthetic-test", "--detectors", "msp,energy,knn", "--out", str(out),
               "--n-boot", "0", "--export", str(guard_dir), "--export-tpr", "0.9"])
    assert rc == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "export.json").read_text())
    tuning = json.loads((out / "results.json").read_text())["tuning"]
    best = max(tuning, key=lambda n: (tuning[n]["val_auroc"], -tuning[n]["val_fpr_at_95_tpr"]))
    assert summary["detector"] == best and f"exported {best}" in text
    assert summary["target_tpr"] == 0.9 and f"oodscope serve {guard_dir}" in text
    guard = ood.load(guard_dir)
    assert guard.tpr == 0.9 and type(guard.detector).name == best
    # the saved guard scores a feature file through `oodscope score`
    feats = test_bench_cli._feature_set(n=50).test_id
    feats.save(tmp_path / "new.npz")
    assert main(["score", str(guard_dir), "--features", str(tmp_path / "new.npz"),
                 "--out", str(tmp_path / "scores.csv")]) == 0
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 51


def test_export_refuses_training_comparisons(tmp_path, capsys):
    rc = main(["bench", "--compare-training", "ce,oe", "--export", str(tmp_path / "g")])
    assert rc == 2 and "--export" in capsys.readouterr().err
