"""What a benchmark run produced: `BenchResult`, its tidy table (`COLUMNS`) and its files."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import CI_METRICS

__all__ = ["BenchResult", "COLUMNS", "METRIC_COLUMNS", "json_safe", "result_row"]

METRIC_COLUMNS = ["auroc", "fpr_at_95_tpr", "aupr_in", "aupr_out", "detection_error"]
#: Columns of ``results.csv`` in order.
COLUMNS = (
    ["benchmark", "mode", "seed", "detector", "ood_set", "group", "status", "reason"]
    + [c for m in METRIC_COLUMNS for c in ([m, f"{m}_lo", f"{m}_hi"] if m in CI_METRICS else [m])]
    + ["n_id", "n_ood", "params"]
)


@dataclass
class BenchResult:
    """Everything a run produced; `write` saves results.csv/json and report.html."""

    benchmark: str
    rows: list[dict[str, Any]]
    skipped: dict[str, str]
    tuning: dict[str, dict[str, Any]]
    timings: list[dict[str, Any]]
    info: dict[str, Any]
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # ood set -> near/far/covariate
    #: With ``keep_detectors=True``: the fitted detectors (chosen parameters) and the
    #: FeatureSet of the first seed, for `oodscope.bench.export` (not written to disk).
    detectors: dict[str, Any] = field(default_factory=dict, repr=False)
    feature_set: Any = field(default=None, repr=False)
    #: Whether the classifier's prediction (argmax of the cached logits) is right on each test
    #: ID sample (None without logits or labels): the selective-prediction section uses it.
    test_id_correct: np.ndarray | None = field(default=None, repr=False)

    def selective(self) -> dict[str, dict[str, float]]:
        """Per detector, `oodscope.selective.selective_metrics` of its test ID scores against
        the classifier's correctness (AURC, E-AURC, risk at fixed coverages); {} without
        correctness or kept scores. Detectors whose ID scores do not match are left out."""
        from ..selective import selective_metrics

        if self.test_id_correct is None:
            return {}
        return {det: selective_metrics(s["test_id"], self.test_id_correct) for det, s in self.scores.items()
                if "test_id" in s and np.size(s["test_id"]) == self.test_id_correct.size}

    @property
    def results(self):
        """One row per detector × OOD set (and near/far means), as a `pandas.DataFrame`."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=COLUMNS)

    def leaderboard(self, mode: str = "standard"):
        """Detectors sorted by mean AUROC over the near and far means (averaged over seeds)."""
        import pandas as pd

        df = self.results
        df = df[(df["status"] == "ok") & (df["mode"] == mode)]
        if df.empty:
            return pd.DataFrame(columns=["detector"])
        agg = df.groupby(["detector", "ood_set"], sort=False)[["auroc", "fpr_at_95_tpr"]].mean()
        table = {}
        for (det, ood), vals in agg.iterrows():
            table.setdefault(det, {})[f"{ood} AUROC"] = 100 * vals["auroc"]
            table.setdefault(det, {})[f"{ood} FPR95"] = 100 * vals["fpr_at_95_tpr"]
        lb = pd.DataFrame.from_dict(table, orient="index")
        means = [c for c in lb.columns if c.startswith(("near", "far")) and c.endswith("AUROC")
                 and "(mean)" in c]
        key = lb[means].mean(axis=1) if means else lb.filter(like="AUROC").mean(axis=1)
        mean_cols = [c for c in lb.columns if "(mean)" in c]
        lb = lb[mean_cols + [c for c in lb.columns if c not in mean_cols]]
        lb.insert(0, "score", key)
        lb = lb.sort_values("score", ascending=False)
        lb.index.name = "detector"
        return lb.drop(columns="score").reset_index()

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "columns": COLUMNS,
            "rows": [json_safe(r) for r in self.rows],
            "skipped": self.skipped,
            "tuning": json_safe(self.tuning),
            "timings": json_safe(self.timings),
            "info": json_safe(self.info),
            "groups": self.groups,
            "selective": json_safe(self.selective()),
        }

    def write(self, out_dir: str | Path, report: bool = True) -> dict[str, Path]:
        """Write ``results.csv``, ``results.json`` and (by default) ``report.html``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "results.csv", "json": out / "results.json"}
        self.results.to_csv(paths["csv"], index=False)
        paths["json"].write_text(json.dumps(self.to_json(), indent=1))
        if report:
            from ..report import write_report

            paths["html"] = write_report(self, out / "report.html")
        return paths


def json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return None if not math.isfinite(v) else v
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist()) if x.size <= 64 else f"<array {x.shape}>"
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return repr(x)


def result_row(benchmark, mode, seed, det, ood, group, metrics=None, status="ok", reason="",
               n_id=None, n_ood=None, params=None) -> dict[str, Any]:
    """One row of ``results.csv`` (every column, None where it does not apply)."""
    row = {c: None for c in COLUMNS}
    row.update(benchmark=benchmark, mode=mode, seed=seed, detector=det, ood_set=ood, group=group,
               status=status, reason=reason, n_id=n_id, n_ood=n_ood,
               params=json.dumps(json_safe(params)) if params is not None else "")
    if metrics:
        row.update({k: v for k, v in metrics.items() if k in row})
    return row
