"""``oodscope bench ... --export DIR``: ship the detector that won on validation.

The winner is the detector with the highest validation AUROC (ID-val vs the validation OOD
set; ties: lower validation FPR@95), with the hyperparameters the tuner chose on that same
validation data. Test OOD sets never take part in the choice.

Its threshold is calibrated on one seeded half of the test ID split, which took part in
neither fitting nor selection; the other half and every test OOD set then show what the
threshold does (ID acceptance close to the target TPR, OOD acceptance per set). The guard
is saved with `oodscope.Guard.save` (arrays + JSON + SHA-256 manifest, no pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..guard import Guard

__all__ = ["choose_winner", "export_best"]


def choose_winner(tuning: dict[str, dict[str, Any]], candidates: list[str]) -> str:
    """Name of the detector with the best validation AUROC (then lowest validation FPR@95)."""
    scored = [n for n in candidates if tuning.get(n, {}).get("val_auroc") is not None]
    if not scored:
        raise ValueError("No detector has a validation score to choose from; nothing to export.")
    return max(scored, key=lambda n: (tuning[n]["val_auroc"], -tuning[n]["val_fpr_at_95_tpr"]))


def export_best(res, out_dir: str | Path, *, tpr: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Save the validation winner of a `BenchResult` run with ``keep_detectors=True`` as a
    calibrated `Guard` in ``out_dir``; return a JSON-able summary of the choice and of the
    threshold's behaviour on held-out test data."""
    fs = res.feature_set
    if fs is None or not res.detectors:
        raise ValueError("The run kept no fitted detectors: run the benchmark with "
                         "keep_detectors=True (the CLI does this for --export).")
    name = choose_winner(res.tuning, list(res.detectors))
    detector = res.detectors[name]
    n = len(fs.test_id)
    perm = np.random.default_rng(seed).permutation(n)
    cal, held = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
    guard = Guard(detector, tpr=tpr, seed=seed).calibrate(fs.test_id[cal])
    guard.calibration_source_ = f"{len(cal)} of the {n} test ID samples (seeded half)"
    path = guard.save(out_dir)

    def accepted(x) -> float:
        detector.reset()
        return float(np.mean(guard.predict(x)))

    return {
        "detector": name,
        "params": res.tuning[name]["params"],
        "val_auroc": res.tuning[name]["val_auroc"],
        "val_fpr_at_95_tpr": res.tuning[name]["val_fpr_at_95_tpr"],
        "ranking": sorted(((n_, res.tuning[n_]["val_auroc"]) for n_ in res.detectors
                           if res.tuning.get(n_, {}).get("val_auroc") is not None),
                          key=lambda t: -t[1]),
        "threshold": guard.threshold_,
        "threshold_ci": list(guard.threshold_ci_),
        "target_tpr": tpr,
        "calibration_samples": int(len(cal)),
        "held_out_id_acceptance": accepted(fs.test_id[held]) if len(held) else None,
        "ood_acceptance": {k: accepted(f) for k, (_, f) in fs.ood_sets().items()},
        "path": str(path),
    }
