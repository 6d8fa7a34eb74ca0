"""The benchmark runner: cached Features in, a tidy results table out.

The network has already run once per split (the provider built a `FeatureSet`). For each
detector the runner then

1. checks that the benchmark provides every field the detector needs (otherwise the
   detector is skipped and the reason recorded, the run goes on);
2. fits it on the ID training Features and chooses hyperparameters on ID-val vs the
   validation OOD set (`oodscope.bench.tuning.tune`; test sets never take part);
3. scores the test ID set and every test OOD set once, and computes the metrics with
   bootstrap confidence intervals; near/far rows are the unweighted mean over datasets;
4. in full-spectrum mode also counts the covariate-shifted ID sets as ID.

Stateful, order-dependent detectors (class attribute ``stateful = True``, e.g. AdaNeg's
test-time memory) are evaluated as in their papers' protocol: each tuning candidate starts
from ``reset()`` and scores ID-val and val-OOD as one seeded interleaved stream, and each
test OOD set is scored with ``score_mixed(test_id, ood_set, seed=seed)``, a fresh memory
per OOD set. Their test ID scores therefore differ per OOD set; the metrics of each OOD set
use the ID scores of its own stream (``results.scores[det]["test_id"]`` keeps those of the
first OOD set).

Only detectors that declare ``requires={"model"}`` touch the network again, through the
model the provider passed in ``FeatureSet.detector_kwargs``.
"""

from __future__ import annotations

import inspect
import json
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..detectors.base import Detector, get_detector_class, list_detectors
from ..features import Features
from ..metrics import accuracy, auroc, evaluate, fpr_at_95_tpr
from .spec import BenchmarkDef, FeatureSet, get_benchmark
from .tuning import _public_params, is_stateful, score_pair, tune

__all__ = ["BenchResult", "run_benchmark", "run", "select_detectors", "METRIC_COLUMNS"]

METRIC_COLUMNS = ["auroc", "fpr_at_95_tpr", "aupr_in", "aupr_out", "detection_error"]
CI_METRICS = ["auroc", "fpr_at_95_tpr", "aupr_in", "aupr_out"]
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
    detectors: dict[str, Detector] = field(default_factory=dict, repr=False)
    feature_set: FeatureSet | None = field(default=None, repr=False)

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
            "rows": [_json_safe(r) for r in self.rows],
            "skipped": self.skipped,
            "tuning": _json_safe(self.tuning),
            "timings": _json_safe(self.timings),
            "info": _json_safe(self.info),
            "groups": self.groups,
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


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return None if not math.isfinite(v) else v
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist()) if x.size <= 64 else f"<array {x.shape}>"
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return repr(x)


# --------------------------------------------------------------------------- selection
DetectorSpec = "str | Detector"


def _name_of(det: Any) -> str:
    if isinstance(det, str):
        return det.lower()
    return (type(det).name or type(det).__name__).lower()


def select_detectors(
    detectors: Sequence[Any] | str | None,
    fs: FeatureSet,
    default: Sequence[str] | None = None,
) -> tuple[list[tuple[str, Detector]], dict[str, str]]:
    """Instantiate the detectors to run; return ``([(name, detector)], {name: skip reason})``.

    ``detectors`` is a list of names and/or Detector instances, ``"all"``, or ``None``
    (the benchmark default, else every registered detector the Features can feed).
    """
    avail = fs.fields()
    skipped: dict[str, str] = {}
    if detectors is None:
        if default:
            detectors = list(default)
        else:
            # Detectors that re-run the network (ODIN, i-ODIN, ...) are slow; they run when
            # named or with "all", never by default.
            detectors = list_detectors(requires=avail - {"model"})
    elif isinstance(detectors, str):
        detectors = list_detectors() if detectors.lower() == "all" else [
            d.strip() for d in detectors.split(",") if d.strip()]
    chosen: list[tuple[str, Detector]] = []
    seen = set()
    for spec in detectors:
        if isinstance(spec, str):
            cls = get_detector_class(spec)  # unknown name -> ValueError listing close names
            name = cls.name
        else:
            cls, name = type(spec), _name_of(spec)
        if name in seen:
            continue
        seen.add(name)
        missing = sorted(cls.all_requirements() - avail)
        if missing:
            skipped[name] = (
                f"needs {missing}, which this benchmark does not provide "
                f"(available: {sorted(avail)})"
            )
            continue
        # "*" holds arguments for every detector that takes them (e.g. the model);
        # a detector's own entry wins.
        kwargs = {**fs.detector_kwargs.get("*", {}), **fs.detector_kwargs.get(name, {})}
        try:
            if isinstance(spec, str):
                valid = set(cls._param_names())
                det = cls(**{k: v for k, v in kwargs.items() if k in valid})
            else:
                det = spec.clone(**{k: v for k, v in kwargs.items() if k in spec._param_names()
                                    and getattr(spec, k, None) is None})
        except Exception as exc:  # a detector that cannot even be built is skipped, not fatal
            skipped[name] = f"could not be created: {type(exc).__name__}: {exc}"
            continue
        chosen.append((name, det))
    return chosen, skipped


def check_ood_names(requested: Iterable[str] | None, fs_or_names: FeatureSet | Iterable[str]) -> list[str] | None:
    """Validate ``--ood`` names; raise ``ValueError`` listing the valid ones."""
    if requested is None:
        return None
    if isinstance(requested, str):
        requested = [s.strip() for s in requested.split(",") if s.strip()]
    if isinstance(fs_or_names, FeatureSet):
        valid = list(fs_or_names.ood_sets()) + list(fs_or_names.covariate)
    else:
        valid = list(fs_or_names)
    lower = {v.lower(): v for v in valid}
    bad = [r for r in requested if r.lower() not in lower]
    if bad:
        raise ValueError(
            f"Unknown OOD set(s) {bad}; valid names for this benchmark: {sorted(valid)}."
        )
    return [lower[r.lower()] for r in requested]


# --------------------------------------------------------------------------- running
def _weighted_curves(order_is_id: np.ndarray, group_end: np.ndarray, w: np.ndarray):
    """Cumulative (ID, OOD) weights at each tie-group end, scores sorted descending."""
    w_id = np.where(order_is_id, w, 0.0)
    w_ood = np.where(order_is_id, 0.0, w)
    return np.cumsum(w_id)[group_end], np.cumsum(w_ood)[group_end]


def _curve_metrics(tp: np.ndarray, fp: np.ndarray, n_id: float, n_ood: float) -> dict[str, float]:
    """AUROC, FPR@95, AUPR-In, AUPR-Out from cumulative counts at descending thresholds.

    Same definitions as `oodscope.metrics` (ties count one half for AUROC, grouped for AP,
    FPR@95 accepts OOD tied with the threshold); with unit weights the values are identical.
    """
    tpr = np.r_[0.0, tp / n_id]
    fpr = np.r_[0.0, fp / n_ood]
    out = {"auroc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))}
    k = np.ceil(0.95 * n_id - 1e-12)
    out["fpr_at_95_tpr"] = float(fp[np.searchsorted(tp, max(k, 1.0) - 1e-9)] / n_ood)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
    out["aupr_in"] = float(np.sum(np.diff(np.r_[0.0, tp]) / n_id * prec))
    # OOD positive, thresholds ascending: cumulative counts from the other end
    tp_o = n_ood - np.r_[0.0, fp[:-1]][::-1]
    fp_o = n_id - np.r_[0.0, tp[:-1]][::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        prec_o = np.where(tp_o + fp_o > 0, tp_o / (tp_o + fp_o), 1.0)
    out["aupr_out"] = float(np.sum(np.diff(np.r_[0.0, tp_o]) / n_ood * prec_o))
    return out


def bootstrap_replicates(id_s: np.ndarray | list[np.ndarray], oods: list[np.ndarray], n_boot: int, seed: int
                         ) -> dict[str, np.ndarray]:
    """Percentile-bootstrap replicates ``metric -> (n_boot, len(oods))``.

    ``id_s`` is one array of ID scores, or one per OOD set (stateful detectors score the
    same ID samples differently in each ID/OOD stream); the ID resampling is shared anyway.

    Each replicate resamples the ID set once (shared by every OOD set, so means over OOD
    sets get a joint interval) and each OOD set independently. Resampling is expressed as
    multinomial counts over the samples sorted once, so a replicate costs O(n), not a sort.
    """
    rng = np.random.default_rng(seed)
    id_list = list(id_s) if isinstance(id_s, (list, tuple)) else [id_s] * len(oods)
    n_a = id_list[0].size if id_list else 0
    if any(a.size != n_a for a in id_list):
        raise ValueError("Per-OOD-set ID scores must all score the same ID samples.")
    prepared = []
    for a, b in zip(id_list, oods):
        scores = np.concatenate([a, b])
        order = np.argsort(-scores, kind="mergesort")
        sorted_scores = scores[order]
        group_end = np.r_[np.nonzero(np.diff(sorted_scores))[0], scores.size - 1]
        prepared.append((order, order < n_a, group_end, b.size))
    out = {m: np.empty((n_boot, len(oods))) for m in CI_METRICS}
    for i in range(n_boot):
        c_id = np.bincount(rng.integers(0, n_a, n_a), minlength=n_a).astype(np.float64)
        for j, (order, is_id, group_end, n_b) in enumerate(prepared):
            c_ood = np.bincount(rng.integers(0, n_b, n_b), minlength=n_b).astype(np.float64)
            w = np.concatenate([c_id, c_ood])[order]
            tp, fp = _weighted_curves(is_id, group_end, w)
            for m, v in _curve_metrics(tp, fp, float(n_a), float(n_b)).items():
                out[m][i, j] = v
    return out


def _metrics_for(id_s: np.ndarray | list[np.ndarray], oods: dict[str, np.ndarray], ci: bool, n_boot: int, seed: int,
                 alpha: float = 0.05) -> tuple[dict[str, dict[str, float]], dict[str, float] | None]:
    """Per-OOD-set metrics (with CIs) and the unweighted mean over the sets (with a CI)."""
    names = list(oods)
    id_of = dict(zip(names, id_s)) if isinstance(id_s, (list, tuple)) else {k: id_s for k in names}
    per = {k: evaluate(id_of[k], oods[k]) for k in names}
    mean = {m: float(np.mean([per[k][m] for k in names])) for m in METRIC_COLUMNS} if names else None
    if ci and names:
        reps = bootstrap_replicates(id_s, [oods[k] for k in names], n_boot, seed)
        q = [alpha / 2, 1 - alpha / 2]
        for m, r in reps.items():
            for j, k in enumerate(names):
                per[k][f"{m}_lo"], per[k][f"{m}_hi"] = (float(v) for v in np.quantile(r[:, j], q))
            mean[f"{m}_lo"], mean[f"{m}_hi"] = (float(v) for v in np.quantile(r.mean(axis=1), q))
    return per, mean


def _row(benchmark, mode, seed, det, ood, group, metrics=None, status="ok", reason="",
         n_id=None, n_ood=None, params=None) -> dict[str, Any]:
    row = {c: None for c in COLUMNS}
    row.update(benchmark=benchmark, mode=mode, seed=seed, detector=det, ood_set=ood, group=group,
               status=status, reason=reason, n_id=n_id, n_ood=n_ood,
               params=json.dumps(_json_safe(params)) if params is not None else "")
    if metrics:
        row.update({k: v for k, v in metrics.items() if k in row})
    return row


def _seeded(det: Detector, seed: int) -> Detector:
    for p in ("seed", "random_state"):
        if p in det._param_names():
            return det.clone(**{p: seed})
    return det


def run(
    fs: FeatureSet,
    detectors: Sequence[Any] | str | None = None,
    *,
    benchmark: str = "custom",
    ood: Iterable[str] | str | None = None,
    tune_params: bool = True,
    full_spectrum: bool = False,
    ci: bool = True,
    n_boot: int = 200,
    seed: int = 0,
    default_detectors: Sequence[str] | None = None,
    model_tune_samples: int | None = 1000,
    keep_scores: bool = True,
    keep_detectors: bool = False,
    progress: bool = True,
) -> BenchResult:
    """Fit, tune and score detectors on one `FeatureSet`; return a `BenchResult`.

    ``ood`` restricts the test OOD (and covariate) sets; ``tune_params=False`` uses each
    detector's defaults; ``full_spectrum=True`` adds rows (``mode="full-spectrum"``) where
    the covariate-shifted sets count as ID. ``model_tune_samples`` caps the validation
    samples used when tuning detectors that re-run the network (they are the slow ones).
    Every detector's validation AUROC / FPR@95 (ID-val vs the validation OOD set, with the
    chosen parameters) is recorded in ``tuning``; ``keep_detectors=True`` also keeps the
    fitted detectors and the FeatureSet on the result (for `oodscope.bench.export`).
    """
    from tqdm.auto import tqdm

    wanted = check_ood_names(ood, fs)
    ood_sets = fs.ood_sets()
    covariate = dict(fs.covariate)
    if wanted is not None:
        ood_sets = {k: v for k, v in ood_sets.items() if k in wanted}
        covariate = {k: v for k, v in covariate.items() if k in wanted} or (
            covariate if not any(k in fs.covariate for k in wanted) else {})
    if not ood_sets:
        raise ValueError("The benchmark has no test OOD set to evaluate (check --ood).")

    chosen, skipped = select_detectors(detectors, fs, default_detectors)
    rows: list[dict[str, Any]] = []
    tuning: dict[str, dict[str, Any]] = {}
    timings: list[dict[str, Any]] = []
    scores: dict[str, dict[str, np.ndarray]] = {}
    kept: dict[str, Detector] = {}
    groups = {k: g for k, (g, _) in ood_sets.items()}
    groups.update({k: "covariate" for k in covariate})

    bar = tqdm(chosen, desc=f"{benchmark}: detectors", unit="det", disable=not progress, leave=False)
    for name, det in bar:
        bar.set_postfix_str(name)
        det = _seeded(det, seed)
        uses_model = "model" in type(det).all_requirements()
        t_fit = t_tune = t_score = 0.0
        try:
            space = type(det).search_space if tune_params else {}
            vi, vo = fs.val_id, fs.val_ood
            if uses_model and model_tune_samples and space:
                rng = np.random.default_rng(seed)
                vi = vi[np.sort(rng.permutation(len(vi))[: model_tune_samples])]
                vo = vo[np.sort(rng.permutation(len(vo))[: model_tune_samples])]
            if space:
                tr = tune(det, fs.train, vi, vo, search_space=space, seed=seed)
                t_tune = tr.fit_seconds + tr.score_seconds
                t_fit = tr.fit_seconds / max(tr.n_fits, 1)  # one fit, for the breakdown
                fitted, params = tr.detector, tr.best_params
                best = next(c for c in tr.candidates if c.get("chosen"))
                tuning[name] = {"params": params, "candidates": tr.candidates,
                                "n_fits": tr.n_fits, "seconds": t_tune,
                                "val_auroc": best["val_auroc"],
                                "val_fpr_at_95_tpr": best["val_fpr_at_95_tpr"]}
            else:
                t0 = time.perf_counter()
                fitted = det.fit(fs.train if type(det).fit_fields is not None else None)
                t_fit = time.perf_counter() - t0
                params = _public_params(det.get_params())
                v_id, v_ood = score_pair(fitted, vi, vo, seed)
                tuning[name] = {"params": params, "candidates": [], "n_fits": 1,
                                "seconds": 0.0, "note": "defaults (no search space)"
                                if tune_params else "defaults (--no-tune)",
                                "val_auroc": float(auroc(v_id, v_ood)),
                                "val_fpr_at_95_tpr": float(fpr_at_95_tpr(v_id, v_ood))}
            t0 = time.perf_counter()
            pair_id: dict[str, dict[str, np.ndarray]] = {}
            if is_stateful(fitted):
                # Order-dependent (test-time memory): every test OOD set is scored as one
                # seeded interleaved stream with the test ID set, from an empty memory, so
                # each OOD set has its own ID scores (full-spectrum: ID + covariate sets).
                pair_id["standard"] = {}
                s_ood = {}
                for k, (_, f) in ood_sets.items():
                    pair_id["standard"][k], s_ood[k] = score_pair(fitted, fs.test_id, f, seed)
                s_id = pair_id["standard"][next(iter(ood_sets))]
                s_cov = {}
                if full_spectrum and covariate:
                    fs_id = Features.concat([fs.test_id, *covariate.values()])
                    pair_id["full-spectrum"] = {}
                    for k, (_, f) in ood_sets.items():
                        pair_id["full-spectrum"][k], _ = score_pair(fitted, fs_id, f, seed)
                    first = pair_id["full-spectrum"][next(iter(ood_sets))]
                    ends = np.cumsum([len(fs.test_id)] + [len(f) for f in covariate.values()])
                    s_cov = dict(zip(covariate, np.split(first, ends[:-1])[1:]))
            else:
                s_id = fitted.score(fs.test_id)
                s_ood = {k: fitted.score(f) for k, (_, f) in ood_sets.items()}
                s_cov = {k: fitted.score(f) for k, f in covariate.items()} if full_spectrum else {}
            t_score = time.perf_counter() - t0
        except Exception as exc:  # never let one detector crash the run
            msg = f"{type(exc).__name__}: {exc}".strip()
            skipped[name] = f"failed: {msg.splitlines()[0][:400]}"
            tuning.pop(name, None)
            timings.append({"detector": name, "seed": seed, "fit_s": t_fit, "tune_s": t_tune, "score_s": t_score,
                            "status": "failed", "traceback": traceback.format_exc(limit=3)})
            continue

        timings.append({"detector": name, "seed": seed, "fit_s": t_fit, "tune_s": t_tune,
                        "score_s": t_score, "status": "ok", "uses_model": uses_model})
        if keep_detectors:
            kept[name] = fitted
        if keep_scores:
            scores[name] = {"test_id": s_id, **s_ood, **{f"{k} (as ID)": v for k, v in s_cov.items()}}
        modes = [("standard", s_id)]
        if full_spectrum and s_cov:
            modes.append(("full-spectrum", np.concatenate([s_id, *s_cov.values()])))
        for mode, id_scores in modes:
            for group in ("near", "far"):
                names = [k for k, (g, _) in ood_sets.items() if g == group]
                if not names:
                    continue
                ids = ([pair_id[mode][k] for k in names] if mode in pair_id else id_scores)
                per, mean = _metrics_for(ids, {k: s_ood[k] for k in names}, ci, n_boot, seed)
                for k in names:
                    rows.append(_row(benchmark, mode, seed, name, k, group, per[k], n_id=id_scores.size,
                                     n_ood=s_ood[k].size, params=params))
                rows.append(_row(benchmark, mode, seed, name, f"{group} (mean)", f"{group}_mean", mean,
                                 n_id=id_scores.size, n_ood=int(sum(s_ood[k].size for k in names)),
                                 params=params))
    bar.close()
    for name, reason in skipped.items():
        rows.append(_row(benchmark, "standard", seed, name, "", "", status="skipped", reason=reason))

    info = dict(fs.info)
    info.setdefault("id_accuracy", _accuracy(fs.test_id))
    cov_acc = {k: _accuracy(f) for k, f in fs.covariate.items()}
    if any(v is not None for v in cov_acc.values()):
        info.setdefault("covariate_accuracy", cov_acc)
    info["splits"] = {
        "train": len(fs.train), "val_id": len(fs.val_id), "val_ood": len(fs.val_ood),
        "test_id": len(fs.test_id), **{k: len(f) for k, (_, f) in ood_sets.items()},
        **{k: len(f) for k, f in covariate.items()},
    }
    info.update(full_spectrum=full_spectrum, tuned=tune_params, seed=seed, ci=ci, n_boot=n_boot)
    return BenchResult(benchmark, rows, skipped, tuning, timings, info, scores, groups,
                       detectors=kept, feature_set=fs if keep_detectors else None)


def _accuracy(f: Features) -> float | None:
    if f.logits is None or f.labels is None or not len(f) or (f.labels < 0).any():
        return None
    return accuracy(f.logits, f.labels)


def _call_provider(bd: BenchmarkDef, options: dict[str, Any]) -> FeatureSet:
    """Call the provider with the options it accepts; an unsupported user option is an error."""
    sig = inspect.signature(bd.provider)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    opts = {k: v for k, v in options.items() if v is not None}
    if not takes_any:
        unused = sorted(set(opts) - set(sig.parameters))
        # Internal hints (fields, seed, ...) are dropped silently; user options are not.
        user_unused = [u for u in unused if u in _USER_OPTIONS]
        if user_unused:
            raise ValueError(
                f"Benchmark {bd.name!r} does not use option(s) "
                f"{', '.join('--' + u.replace('_', '-') for u in user_unused)}."
            )
        opts = {k: v for k, v in opts.items() if k in sig.parameters}
    fs = bd.provider(**opts)
    if not isinstance(fs, FeatureSet):
        raise TypeError(f"Provider of {bd.name!r} returned {type(fs).__name__}, not a FeatureSet.")
    return fs


_USER_OPTIONS = {"model", "encoder", "finetune", "vlm", "subset", "class_names", "data_root"}


def run_benchmark(
    benchmark: str | FeatureSet | Callable[..., FeatureSet],
    detectors: Sequence[Any] | str | None = None,
    *,
    seeds: Sequence[int] = (0,),
    ood: Iterable[str] | str | None = None,
    tune_params: bool = True,
    full_spectrum: bool = False,
    ci: bool = True,
    n_boot: int = 200,
    out_dir: str | Path | None = None,
    progress: bool = True,
    provider_options: dict[str, Any] | None = None,
    **run_kwargs: Any,
) -> BenchResult:
    """Run a registered benchmark (by name), a provider or a ready `FeatureSet`.

    With several ``seeds`` the provider is called once per seed (with ``seed=``, when it
    accepts it) and the rows of every seed are kept; the leaderboard averages over seeds.
    With ``out_dir`` the results and the HTML report are written there.
    """
    options = dict(provider_options or {})
    name = "custom"
    bd = None
    default = None
    if isinstance(benchmark, str):
        bd = get_benchmark(benchmark)
        name, default = bd.name, bd.default_detectors
        if options.get("vlm") is not None and bd.options.get("vlm_default_detectors"):
            default = list(bd.options["vlm_default_detectors"])  # e.g. imagenet --vlm
        known = bd.options.get("ood_names")
        if known is not None:
            check_ood_names(ood, known)  # fail before the expensive extraction
    elif callable(benchmark) and not isinstance(benchmark, FeatureSet):
        bd = BenchmarkDef("custom", benchmark)
    if detectors is not None and not isinstance(detectors, str):
        names = [d for d in detectors if isinstance(d, str)]
    elif isinstance(detectors, str) and detectors.lower() != "all":
        names = [d.strip() for d in detectors.split(",") if d.strip()]
    else:
        names = None
    if names is not None:
        for n in names:
            get_detector_class(n)  # unknown detector name: fail before extraction
    results: list[BenchResult] = []
    for s in seeds:
        if isinstance(benchmark, FeatureSet):
            fs = benchmark
        else:
            fields = _needed_fields(detectors, default)
            fs = _call_provider(bd, {**options, "seed": s, "ood": _as_list(ood), "fields": fields})
        results.append(run(fs, detectors, benchmark=name, ood=ood, tune_params=tune_params,
                           full_spectrum=full_spectrum, ci=ci, n_boot=n_boot, seed=s,
                           default_detectors=default, progress=progress,
                           keep_scores=(s == seeds[0]),
                           **{**run_kwargs, "keep_detectors": run_kwargs.get("keep_detectors", False)
                              and s == seeds[0]}))
    res = results[0]
    for extra in results[1:]:
        res.rows += extra.rows
        res.skipped.update(extra.skipped)
        res.timings += extra.timings
    res.info["seeds"] = list(seeds)
    if out_dir is not None:
        res.info["outputs"] = {k: str(v) for k, v in res.write(out_dir).items()}
    return res


def _as_list(x: Iterable[str] | str | None) -> list[str] | None:
    if x is None:
        return None
    if isinstance(x, str):
        return [s.strip() for s in x.split(",") if s.strip()]
    return list(x)


def _needed_fields(detectors: Any, default: Sequence[str] | None) -> set[str] | None:
    """Fields the requested detectors read (lets providers skip e.g. storing inputs)."""
    if detectors is None:
        detectors = default
    if detectors is None:
        return {"logits", "features", "labels", "head"}  # the default excludes model detectors
    if isinstance(detectors, str) and detectors.lower() == "all":
        return None  # everything
    if isinstance(detectors, str):
        detectors = [d.strip() for d in detectors.split(",") if d.strip()]
    need: set[str] = set()
    for d in detectors:
        cls = get_detector_class(d) if isinstance(d, str) else type(d)
        need |= set(cls.all_requirements())
    return need
