"""The benchmark runner: a `BenchmarkSpec` (or a ready `FeatureSet`) in, a tidy results table out.

`run_benchmark` resolves the spec (``--vlm`` switches to its CLIP twin), checks the options and
OOD names before anything expensive, and calls the spec's builder once per seed. The network
has then run once per split; for each detector `run`

1. checks that the benchmark provides every field the detector needs (otherwise the
   detector is skipped and the reason recorded, the run goes on);
2. fits it on the ID training Features and chooses hyperparameters on ID-val vs the
   validation OOD set (`oodscope.bench.tuning.tune`; test sets never take part);
3. scores the test ID set and every test OOD set once, and computes the metrics with
   bootstrap confidence intervals (`oodscope.metrics.bootstrap_replicates`); near/far rows
   are the unweighted mean over datasets;
4. in full-spectrum mode also counts the covariate-shifted ID sets as ID.

Stateful, order-dependent detectors (class attribute ``stateful = True``, e.g. AdaNeg's
test-time memory) are evaluated as in their papers' protocol: each tuning candidate starts
from ``reset()`` and scores ID-val and val-OOD as one seeded interleaved stream, and each
test OOD set is scored with ``score_mixed(test_id, ood_set, seed=seed)``, a fresh memory
per OOD set. Their test ID scores therefore differ per OOD set; the metrics of each OOD set
use the ID scores of its own stream (``results.scores[det]["test_id"]`` keeps those of the
first OOD set).

A FeatureSet with a ``stream`` (`oodscope.bench.stream`) also has every detector scored stage by
stage after the ordinary test sets (adaptive ones adapt on each stage's support set); those
rows have ``mode="stream"``.

Only detectors that declare ``requires={"model"}`` touch the network again, through the
model the builder passed in ``FeatureSet.detector_kwargs``.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..detectors._network import ANY_LAYER
from ..detectors.base import Detector, get_detector_class, list_detectors
from ..features import Features
from ..generalization import shift_accuracies, shift_summary
from ..metrics import accuracy, auroc, bootstrap_replicates, evaluate, fpr_at_95_tpr
from ..selective import correct_predictions
from .catalog import get_benchmark
from .results import COLUMNS, METRIC_COLUMNS, BenchResult, result_row
from .spec import BenchmarkSpec, Builder, FeatureSet, ProviderOptions, check_names
from .stream import stream_rows
from .tuning import public_params, score_pair, tune

__all__ = ["BenchResult", "COLUMNS", "METRIC_COLUMNS", "id_accuracy", "id_correct", "resolve", "run", "run_benchmark",
           "select_detectors"]


# --------------------------------------------------------------------------- selection
def _name_of(det: Any) -> str:
    if isinstance(det, str):
        return det.lower()
    return (type(det).name or type(det).__name__).lower()


def _build(cls: type[Detector], spec: Any, kwargs: dict[str, Any]) -> Detector:
    """A detector from a name (with the benchmark's arguments it takes) or a clone of an
    instance (arguments filled in only where the instance left them None)."""
    if isinstance(spec, str):
        valid = set(cls._param_names())
        return cls(**{k: v for k, v in kwargs.items() if k in valid})
    return spec.clone(**{k: v for k, v in kwargs.items() if k in spec._param_names()
                         and getattr(spec, k, None) is None})


def select_detectors(
    detectors: Sequence[Any] | str | None,
    fs: FeatureSet,
    default: Sequence[str] | None = None,
) -> tuple[list[tuple[str, Detector]], dict[str, str]]:
    """Instantiate the detectors to run; return ``([(name, detector)], {name: skip reason})``.

    ``detectors`` is a list of names and/or Detector instances, ``"all"``, or ``None``
    (the benchmark default, else every registered detector the Features can feed, except
    those whose `Detector.not_by_default` gives a reason, which is reported as their skip).
    """
    avail = fs.fields()
    skipped: dict[str, str] = {}
    if detectors is None:
        # Detectors that re-run the network (ODIN, i-ODIN, ...) or train one (MOL, DisCoPatch)
        # are slow; they run when named or with "all", never by default.
        if default:
            detectors = list(default)
        else:
            detectors = list_detectors(requires=avail - {"model"})
            skipped.update({n: f"not run by default: {get_detector_class(n).not_by_default}"
                            for n in detectors if get_detector_class(n).not_by_default})
            detectors = [n for n in detectors if n not in skipped]
    elif isinstance(detectors, str):
        detectors = list_detectors() if detectors.lower() == "all" else [
            d.strip() for d in detectors.split(",") if d.strip()]
    chosen: list[tuple[str, Detector]] = []
    seen = set()
    for spec in detectors:
        cls = get_detector_class(spec) if isinstance(spec, str) else type(spec)  # unknown name: ValueError
        name = cls.name if isinstance(spec, str) else _name_of(spec)
        if name in seen:
            continue
        seen.add(name)
        missing = sorted(cls.all_requirements() - avail - {ANY_LAYER})
        if missing:
            skipped[name] = missing_reason(missing, avail)
            continue
        # "*" holds arguments for every detector that takes them (e.g. the model); a detector's own entry wins
        kwargs = {**fs.detector_kwargs.get("*", {}), **fs.detector_kwargs.get(name, {})}
        try:
            det = _build(cls, spec, kwargs)
        except Exception as exc:  # a detector that cannot even be built is skipped, not fatal
            skipped[name] = f"could not be created: {type(exc).__name__}: {exc}"
            continue
        missing = sorted(det.all_requirements() - avail)  # an instance names its layers
        if missing:
            skipped[name] = missing_reason(missing, avail)
            continue
        chosen.append((name, det))
    return chosen, skipped


#: Where a field a benchmark lacks comes from, for the skip reasons.
FIELD_SOURCES = {
    "image_embeds": "CLIP image embeddings (the benchmark's CLIP twin, --vlm)",
    "local_embeds": "CLIP patch embeddings (the benchmark's CLIP twin, --vlm)",
    "text": "text inputs (a text benchmark, e.g. clinc150)",
    "temperature": "a learned temperature output (a network trained with AbeT's head, oodscope.train)",
    "tag_tokens": "image tags of a tagging model (oodscope.vlm.tagood)",
    "model": "the network itself (the benchmark passes none)",
    "inputs": "the network inputs",
    ANY_LAYER: "layers named per instance (layers=[...]) that the benchmark extracted",
}


def missing_reason(missing: Sequence[str], avail: set[str]) -> str:
    """The skip reason of a detector that needs fields the benchmark does not provide."""
    sources = [FIELD_SOURCES[k] for k in missing if k in FIELD_SOURCES]
    why = f" ({'; '.join(sources)})" if sources else ""
    return f"needs {list(missing)}{why}, which this benchmark does not provide (available: {sorted(avail)})"


def check_ood_names(requested: Iterable[str] | str | None, fs: FeatureSet) -> list[str] | None:
    """Validate ``--ood`` names against a FeatureSet; raise ``ValueError`` listing the valid ones."""
    return check_names(requested, [*fs.ood_sets(), *fs.covariate])


# --------------------------------------------------------------------------- one detector
@dataclass
class _Fitted:
    """A detector fitted (and tuned) on the training and validation splits only."""

    detector: Detector
    params: dict[str, Any]
    tuning: dict[str, Any]
    fit_s: float = 0.0
    tune_s: float = 0.0


@dataclass
class _Scores:
    """Test scores of one detector. ``pair_id[mode][ood]``: the ID scores of each OOD set's
    own stream (stateful detectors only)."""

    id: np.ndarray
    ood: dict[str, np.ndarray]
    covariate: dict[str, np.ndarray] = field(default_factory=dict)
    pair_id: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    seconds: float = 0.0


def _seeded(det: Detector, seed: int) -> Detector:
    for p in ("seed", "random_state"):
        if p in det._param_names():
            return det.clone(**{p: seed})
    return det


def _fit(det: Detector, fs: FeatureSet, tune_params: bool, model_tune_samples: int | None,
         seed: int) -> _Fitted:
    """Tune on (ID-val, val-OOD) when the detector has a search space, else fit its defaults.
    Detectors that re-run the network tune on at most ``model_tune_samples`` of each."""
    space = type(det).search_space if tune_params else {}
    if not space:
        t0 = time.perf_counter()
        fitted = det.fit(fs.train if type(det).fit_fields is not None else None)
        t_fit = time.perf_counter() - t0
        note = "defaults (no search space)" if tune_params else "defaults (--no-tune)"
        params = public_params(det.get_params())
        v_id, v_ood = score_pair(fitted, fs.val_id, fs.val_ood, seed)
        return _Fitted(fitted, params, {"params": params, "candidates": [], "n_fits": 1, "seconds": 0.0,
                                        "note": note, "val_auroc": float(auroc(v_id, v_ood)),
                                        "val_fpr_at_95_tpr": float(fpr_at_95_tpr(v_id, v_ood))}, fit_s=t_fit)
    vi, vo = fs.val_id, fs.val_ood
    if "model" in type(det).all_requirements() and model_tune_samples:
        rng = np.random.default_rng(seed)
        vi = vi[np.sort(rng.permutation(len(vi))[:model_tune_samples])]
        vo = vo[np.sort(rng.permutation(len(vo))[:model_tune_samples])]
    tr = tune(det, fs.train, vi, vo, search_space=space, seed=seed)
    t_tune = tr.fit_seconds + tr.score_seconds
    best = next(c for c in tr.candidates if c.get("chosen"))
    return _Fitted(tr.detector, tr.best_params,
                   {"params": tr.best_params, "candidates": tr.candidates, "n_fits": tr.n_fits, "seconds": t_tune,
                    "val_auroc": best["val_auroc"], "val_fpr_at_95_tpr": best["val_fpr_at_95_tpr"]},
                   fit_s=tr.fit_seconds / max(tr.n_fits, 1), tune_s=t_tune)


def _ray_session(ray_workers: int | None):
    """The running Ray session (or a local one for the call) when scoring on Ray."""
    if not ray_workers:
        return contextlib.nullcontext()
    from ..distributed import ray_session

    return ray_session(num_cpus=int(ray_workers))


def _scorer(det: Detector, ray_workers: int | None) -> Callable[[Features], np.ndarray]:
    """``det.score``, or with ``ray_workers`` scoring on that many Ray workers of the running
    Ray session (`oodscope.distributed.score`); detectors that re-run the network score locally."""
    if not ray_workers or "model" in type(det).all_requirements():
        return det.score
    from ..distributed import score as ray_score

    return lambda f: ray_score(det, f, num_workers=ray_workers)


def _score(det: Detector, fs: FeatureSet, ood_sets: dict[str, Features], covariate: dict[str, Features],
           full_spectrum: bool, seed: int, ray_workers: int | None = None) -> _Scores:
    """Score the test ID set and every test OOD set (and covariate set in full-spectrum mode).

    A stateful detector (test-time memory) scores every OOD set as one seeded interleaved
    stream with the test ID set, from an empty memory, so each OOD set has its own ID
    scores (full-spectrum: ID + covariate sets); it always runs locally."""
    t0 = time.perf_counter()
    if not type(det).stateful:
        score = _scorer(det, ray_workers)
        out = _Scores(score(fs.test_id), {k: score(f) for k, f in ood_sets.items()},
                      {k: score(f) for k, f in covariate.items()} if full_spectrum else {})
    else:
        first = next(iter(ood_sets))
        pair_id: dict[str, dict[str, np.ndarray]] = {"standard": {}}
        s_ood = {}
        for k, f in ood_sets.items():
            pair_id["standard"][k], s_ood[k] = score_pair(det, fs.test_id, f, seed)
        out = _Scores(pair_id["standard"][first], s_ood, pair_id=pair_id)
        if full_spectrum and covariate:
            fs_id = Features.concat([fs.test_id, *covariate.values()])
            pair_id["full-spectrum"] = {k: score_pair(det, fs_id, f, seed)[0] for k, f in ood_sets.items()}
            ends = np.cumsum([len(fs.test_id)] + [len(f) for f in covariate.values()])
            out.covariate = dict(zip(covariate, np.split(pair_id["full-spectrum"][first], ends[:-1])[1:]))
    out.seconds = time.perf_counter() - t0
    return out


def _metrics_for(id_s: np.ndarray | list[np.ndarray], oods: dict[str, np.ndarray], ci: bool, n_boot: int,
                 seed: int, alpha: float = 0.05) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-OOD-set metrics (with CIs) and the unweighted mean over the sets (with a joint CI)."""
    names = list(oods)
    id_of = dict(zip(names, id_s)) if isinstance(id_s, list) else {k: id_s for k in names}
    per = {k: evaluate(id_of[k], oods[k]) for k in names}
    mean = {m: float(np.mean([per[k][m] for k in names])) for m in METRIC_COLUMNS}
    if ci:
        reps = bootstrap_replicates(id_s, [oods[k] for k in names], n_boot, seed)
        q = [alpha / 2, 1 - alpha / 2]
        for m, r in reps.items():
            for j, k in enumerate(names):
                per[k][f"{m}_lo"], per[k][f"{m}_hi"] = (float(v) for v in np.quantile(r[:, j], q))
            mean[f"{m}_lo"], mean[f"{m}_hi"] = (float(v) for v in np.quantile(r.mean(axis=1), q))
    return per, mean


def _rows(benchmark: str, seed: int, name: str, scores: _Scores, groups: dict[str, str], full_spectrum: bool,
          ci: bool, n_boot: int, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of every OOD set and of each group's mean, per mode (standard, full-spectrum)."""
    modes = [("standard", scores.id)]
    if full_spectrum and scores.covariate:
        modes.append(("full-spectrum", np.concatenate([scores.id, *scores.covariate.values()])))
    rows = []
    for mode, id_scores in modes:
        for group in ("near", "far"):
            names = [k for k, g in groups.items() if g == group]
            if not names:
                continue
            ids = [scores.pair_id[mode][k] for k in names] if mode in scores.pair_id else id_scores
            per, mean = _metrics_for(ids, {k: scores.ood[k] for k in names}, ci, n_boot, seed)
            for k in names:
                rows.append(result_row(benchmark, mode, seed, name, k, group, per[k], n_id=id_scores.size,
                                       n_ood=scores.ood[k].size, params=params))
            rows.append(result_row(benchmark, mode, seed, name, f"{group} (mean)", f"{group}_mean", mean,
                                   n_id=id_scores.size, n_ood=int(sum(scores.ood[k].size for k in names)),
                                   params=params))
    return rows


def id_accuracy(f: Features) -> float | None:
    """Top-1 accuracy of the logits on labelled Features (None without logits or labels)."""
    correct = id_correct(f)
    return None if correct is None else accuracy(f.logits, f.labels)


def id_correct(f: Features) -> np.ndarray | None:
    """Whether argmax(logits) is the label, per sample (None without logits or ID labels)."""
    if f.logits is None or f.labels is None or not len(f) or (f.labels < 0).any():
        return None
    return correct_predictions(f.logits, f.labels)


def _run_info(fs: FeatureSet, ood_sets: dict[str, Features], covariate: dict[str, Features],
              **facts: Any) -> dict[str, Any]:
    info = dict(fs.info)
    info.setdefault("id_accuracy", id_accuracy(fs.test_id))
    cov_acc = {k: id_accuracy(f) for k, f in fs.covariate.items()}
    if any(v is not None for v in cov_acc.values()):
        info.setdefault("covariate_accuracy", cov_acc)
        if info["id_accuracy"] is not None:
            acc = shift_accuracies(fs.test_id, {k: fs.covariate[k] for k, v in cov_acc.items()
                                                if v is not None})
            # relative robustness is undefined for a network that gets nothing right
            summary = shift_summary(acc) if acc.get("clean", 0) > 0 else {
                "clean_accuracy": acc.get("clean", 0.0),
                "mean_shift_accuracy": float(np.mean([v for k, v in acc.items() if k != "clean"])),
                "relative_robustness": float("nan")}
            info.setdefault("generalization", {"accuracy": acc, **summary})
    info["splits"] = {
        "train": len(fs.train), "val_id": len(fs.val_id), "val_ood": len(fs.val_ood),
        "test_id": len(fs.test_id), **{k: len(f) for k, f in ood_sets.items()},
        **{k: len(f) for k, f in covariate.items()},
    }
    info.update(facts)
    return info


def _test_sets(fs: FeatureSet, ood: Iterable[str] | str | None
               ) -> tuple[dict[str, Features], dict[str, str], dict[str, Features]]:
    """``(OOD sets by name, their groups, covariate sets)`` that ``ood`` selects."""
    wanted = check_ood_names(ood, fs)
    groups = {k: g for k, (g, _) in fs.ood_sets().items() if wanted is None or k in wanted}
    if not groups:
        raise ValueError("The benchmark has no test OOD set to evaluate (check --ood).")
    covariate = dict(fs.covariate)
    if wanted is not None:
        covariate = {k: v for k, v in covariate.items() if k in wanted} or (
            covariate if not any(k in fs.covariate for k in wanted) else {})
    ood_sets = {k: f for k, (_, f) in fs.ood_sets().items() if k in groups}
    return ood_sets, groups, covariate


# --------------------------------------------------------------------------- one FeatureSet
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
    ray_workers: int | None = None,
) -> BenchResult:
    """Fit, tune and score detectors on one `FeatureSet`; return a `BenchResult`.

    ``ood`` restricts the test OOD (and covariate) sets; ``tune_params=False`` uses each
    detector's defaults; ``full_spectrum=True`` adds rows (``mode="full-spectrum"``) where
    the covariate-shifted sets count as ID. ``model_tune_samples`` caps the validation
    samples used when tuning detectors that re-run the network (they are the slow ones).
    Every detector's validation AUROC / FPR@95 (ID-val vs the validation OOD set, with the
    chosen parameters) is recorded in ``tuning``; ``keep_detectors=True`` also keeps the
    fitted detectors and the FeatureSet on the result (for `oodscope.bench.export`).
    ``ray_workers=N`` scores the test sets of every non-stateful feature-level detector on N
    workers of the Ray session opened around the call (`oodscope.distributed.ray_session`);
    fitting and tuning stay local.
    """
    from tqdm.auto import tqdm

    ood_sets, groups, covariate = _test_sets(fs, ood)
    chosen, skipped = select_detectors(detectors, fs, default_detectors)
    rows: list[dict[str, Any]] = []
    tuning: dict[str, dict[str, Any]] = {}
    timings: list[dict[str, Any]] = []
    scores: dict[str, dict[str, np.ndarray]] = {}
    kept: dict[str, Detector] = {}
    with _ray_session(ray_workers):
        bar = tqdm(chosen, desc=f"{benchmark}: detectors", unit="det", disable=not progress, leave=False)
        for name, det in bar:
            bar.set_postfix_str(name)
            det = _seeded(det, seed)
            timing = {"detector": name, "seed": seed, "fit_s": 0.0, "tune_s": 0.0, "score_s": 0.0}
            try:
                fitted = _fit(det, fs, tune_params, model_tune_samples, seed)
                timing.update(fit_s=fitted.fit_s, tune_s=fitted.tune_s)
                s = _score(fitted.detector, fs, ood_sets, covariate, full_spectrum, seed, ray_workers)
                t0 = time.perf_counter()
                try:  # a detector that cannot score the stream keeps its ordinary rows
                    stream = stream_rows(benchmark, seed, name, fitted.detector, fs.stream, fitted.params) if fs.stream else []
                except Exception as exc:
                    stream = []
                    skipped[f"{name} (stream)"] = f"stream failed: {type(exc).__name__}: {str(exc)[:300]}"
                s.seconds += time.perf_counter() - t0
            except Exception as exc:  # never let one detector crash the run
                msg = f"{type(exc).__name__}: {exc}".strip()
                skipped[name] = f"failed: {msg.splitlines()[0][:400]}"
                timings.append({**timing, "status": "failed", "traceback": traceback.format_exc(limit=3)})
                continue
            tuning[name] = fitted.tuning
            timings.append({**timing, "score_s": s.seconds, "status": "ok",
                            "uses_model": "model" in type(det).all_requirements()})
            if keep_detectors:
                kept[name] = fitted.detector
            if keep_scores:
                scores[name] = {"test_id": s.id, **s.ood, **{f"{k} (as ID)": v for k, v in s.covariate.items()}}
            rows += _rows(benchmark, seed, name, s, groups, full_spectrum, ci, n_boot, fitted.params)
            rows += stream
        bar.close()
    rows += [result_row(benchmark, "standard", seed, name, "", "", status="skipped", reason=reason)
             for name, reason in skipped.items()]
    info = _run_info(fs, ood_sets, covariate, full_spectrum=full_spectrum, tuned=tune_params, seed=seed,
                     ci=ci, n_boot=n_boot)
    groups.update({k: "covariate" for k in covariate})
    return BenchResult(benchmark, rows, skipped, tuning, timings, info, scores, groups,
                       detectors=kept, feature_set=fs if keep_detectors else None,
                       test_id_correct=id_correct(fs.test_id))


# --------------------------------------------------------------------------- a benchmark
def resolve(benchmark: str | BenchmarkSpec | Builder, options: ProviderOptions) -> BenchmarkSpec:
    """The spec to run: by name, as given, or a bare builder function; ``--vlm`` switches an
    image benchmark to its CLIP twin. Options the benchmark does not use are errors."""
    if isinstance(benchmark, str):
        spec = get_benchmark(benchmark)
    elif isinstance(benchmark, BenchmarkSpec):
        spec = benchmark
    elif callable(benchmark):
        spec = BenchmarkSpec("custom", "", benchmark, options=frozenset(options.given()))
    else:
        raise TypeError(f"benchmark must be a name, a BenchmarkSpec, a builder or a FeatureSet, "
                        f"got {type(benchmark).__name__}.")
    if spec.vlm_twin is not None:
        if options.vlm is not None and (options.model is not None or options.net is not None):
            raise ValueError(f"Benchmark {spec.name!r}: pass either --model (a classifier) or --vlm "
                             "(a CLIP-like model), not both.")
        if options.vlm is not None:
            spec = get_benchmark(spec.vlm_twin)
        elif options.class_names is not None:
            raise ValueError(f"Benchmark {spec.name!r}: class names are only used with --vlm.")
    spec.check_options(options)
    return spec


def _needed_fields(detectors: Any, default: Sequence[str] | None) -> frozenset[str] | None:
    """Fields the requested detectors read (lets builders skip e.g. storing inputs)."""
    if detectors is None:
        detectors = default
    if detectors is None:
        return frozenset({"logits", "features", "labels", "head"})  # the default excludes model detectors
    if isinstance(detectors, str) and detectors.lower() == "all":
        return None  # everything
    if isinstance(detectors, str):
        detectors = [d.strip() for d in detectors.split(",") if d.strip()]
    return frozenset().union(*((get_detector_class(d) if isinstance(d, str) else type(d)).all_requirements()
                               for d in detectors))


def _requested(detectors: Any, default: Sequence[str] | None) -> tuple[Any, ...] | None:
    """The detectors a run asks for, for the builder (None: every registered one)."""
    if detectors is None:
        return tuple(default or ())  # no default list: only detectors that read no extra layers
    if isinstance(detectors, str):
        if detectors.lower() == "all":
            return None
        return tuple(d.strip() for d in detectors.split(",") if d.strip())
    return tuple(detectors)


def _check_detector_names(detectors: Any) -> None:
    """An unknown detector name fails before any extraction."""
    if isinstance(detectors, str):
        names = [] if detectors.lower() == "all" else [d.strip() for d in detectors.split(",") if d.strip()]
    else:
        names = [d for d in detectors or () if isinstance(d, str)]
    for n in names:
        get_detector_class(n)


def run_benchmark(
    benchmark: str | BenchmarkSpec | Builder | FeatureSet,
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
    provider_options: ProviderOptions | Mapping[str, Any] | None = None,
    **run_kwargs: Any,
) -> BenchResult:
    """Run a benchmark (a registered name, a `BenchmarkSpec`, a builder ``(spec, options) ->
    FeatureSet``) or a ready `FeatureSet`.

    With several ``seeds`` the builder runs once per seed (``options.seed``) and the rows of
    every seed are kept; the leaderboard averages over seeds. With ``out_dir`` the results
    and the HTML report are written there.
    """
    options = ProviderOptions.of(provider_options, progress=progress)
    spec = None if isinstance(benchmark, FeatureSet) else resolve(benchmark, options)
    default = None
    if spec is not None:
        spec.check_ood(ood)  # fail before the expensive extraction
        if spec.default_detectors is not None:
            known = set(list_detectors())
            default = [d for d in spec.default_detectors if d in known]
    _check_detector_names(detectors)
    results: list[BenchResult] = []
    for s in seeds:
        if spec is None:
            fs = benchmark
        else:
            opts = replace(options.for_spec(spec), seed=s, ood=ood, fields=_needed_fields(detectors, default),
                           detectors=_requested(detectors, default))
            fs = spec.builder()(spec, opts)
            if not isinstance(fs, FeatureSet):
                raise TypeError(f"The builder of {spec.name!r} returned {type(fs).__name__}, not a FeatureSet.")
            fs.info.setdefault("val_ood_description", spec.val_ood)
            fs.info.setdefault("val_ood_reason", spec.val_ood_reason)
        results.append(run(fs, detectors, benchmark=spec.name if spec else "custom", ood=ood,
                           tune_params=tune_params, full_spectrum=full_spectrum, ci=ci, n_boot=n_boot, seed=s,
                           default_detectors=default, progress=progress, keep_scores=(s == seeds[0]),
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
