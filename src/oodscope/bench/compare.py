"""Compare training-time OOD methods: same network, same budget, same seeds, one table.

``oodscope bench fashion-mnist-split --compare-training ce,oe,mixoe,logitnorm,abet,palm,ascood``
trains one small CNN per method (and seed) on the benchmark's ID training images, extracts
Features once per model, and scores each model twice:

* with the detector of the method's paper (``Objective.default_detector``: MSP for CE, OE,
  MixOE and LogitNorm, energy for energy-OE, ``abet`` for AbeT, SSD+ for PALM, i-ODIN for
  ASCOOD);
* with the best post-hoc detector of ``POST_HOC``, chosen per model on ID-val vs the
  benchmark's validation OOD set (hyperparameters tuned on the same data). Test OOD sets
  never take part in any choice.

The table has ID accuracy and near/far AUROC and FPR@95 (means over the OOD sets of each
group) per method, averaged over seeds, and says whether a training-time method beats the
best post-hoc detector on the plain cross-entropy model in near-OOD AUROC while losing at
most one point of ID accuracy.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["POST_HOC", "TrainBudget", "compare_training", "run_comparison", "format_table", "summarize",
           "merge_comparisons",
           "DEFAULT_METHODS"]

DEFAULT_METHODS = ("ce", "oe", "mixoe", "logitnorm", "abet", "palm", "ascood")
#: post-hoc detectors the "best on validation" column chooses from (cheap, no network re-runs)
POST_HOC = ("msp", "maxlogit", "energy", "gen", "react", "scale", "knn", "mahalanobis", "rmds",
            "ssd", "vim", "she")
SUPPORTED = ("fashion-mnist-split", "fashion-mnist-split0", "fashion-mnist-split1",
             "fashion-mnist-split2", "fashion-mnist")


@dataclass
class TrainBudget:
    """What every method gets: the same network, optimiser, epochs, batch size and data.

    The defaults (3 epochs on 6000 ID images, the reference small-CNN recipe) keep a
    seven-method comparison within CPU reach. Measured on two cores shared with other jobs:
    0.5-3.5 minutes of training for CE, LogitNorm, AbeT and PALM, 4-7 for OE and MixOE (two
    forward passes per step), 4.5-8.5 for ASCOOD (three), plus about a minute of feature
    extraction and scoring per method.
    """

    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    train_size: int | None = 6000
    outlier_source: str = "photos"
    n_outliers: int = 6000
    model: str = "small_cnn"

    @classmethod
    def quick(cls) -> "TrainBudget":
        return cls(epochs=1, train_size=2000, n_outliers=2000)


# --------------------------------------------------------------------------- data
def _benchmark_data(benchmark: str, seed: int, subset: int | None, train_size: int | None):
    """``(split data, test OOD sources)`` for a supported benchmark."""
    from . import classsplit
    from .spec import ProviderOptions

    name = benchmark.lower()
    if name.startswith("fashion-mnist-split"):
        split = int(name[len("fashion-mnist-split"):] or 0)
        data = classsplit.split_datasets(split, ProviderOptions(seed=seed, subset=subset), train_size=train_size)
        return data, dict(classsplit.TEST_OOD_SOURCES)
    if name == "fashion-mnist":
        from .. import data as D
        from ..data.dataset import ImageDataset

        train_all = D.load("fashion-mnist", "train")
        rng = np.random.default_rng(seed)
        val_idx = np.sort(rng.permutation(len(train_all))[:5000])
        mask = np.ones(len(train_all), bool)
        mask[val_idx] = False
        fit_idx = np.nonzero(mask)[0]
        if train_size is not None and train_size < len(fit_idx):
            fit_idx = np.sort(rng.choice(fit_idx, size=train_size, replace=False))
        train = ImageDataset(train_all.images[fit_idx], train_all.labels[fit_idx], train_all.classes,
                             name="fashion-mnist/train-fit")
        data = {"train": train, "val_indices": val_idx, "num_classes": 10}
        sources = {k: k for k in ("mnist", "kmnist", "notmnist", "gaussian-noise", "uniform-noise")}
        return data, sources
    raise ValueError(f"--compare-training supports the benchmarks {list(SUPPORTED)}, got {benchmark!r}.")


def _feature_set(benchmark: str, data: Any, net, seed: int, subset: int | None, fields: set[str],
                 cache_dir, progress: bool):
    from .catalog import get_benchmark
    from .classsplit import class_split_features
    from .spec import ProviderOptions
    from .vision import FMNIST_MEAN, FMNIST_STD, build_fashion_mnist

    meta = {"normalization": {"mean": FMNIST_MEAN, "std": FMNIST_STD}, "mean": FMNIST_MEAN, "std": FMNIST_STD}
    if benchmark.lower() == "fashion-mnist":
        meta["val_indices"] = data["val_indices"]
    options = ProviderOptions(net=net, net_meta=meta, subset=subset, seed=seed, fields=fields,
                              cache_dir=cache_dir, progress=progress)
    if benchmark.lower() == "fashion-mnist":
        return build_fashion_mnist(get_benchmark("fashion-mnist"), options)
    return class_split_features(data, net, meta, "the given network", options)


# --------------------------------------------------------------------------- training
def _objective_for(method: str, budget: TrainBudget, params: dict[str, Any] | None = None):
    from ..train.base import create_objective

    params = dict(params or {})
    if method.lower() == "ascood":
        params.setdefault("decay_epochs", budget.epochs)  # alpha decays over the whole run
    return create_objective(method, **params)


def _label(method: str, params: dict[str, Any] | None) -> str:
    if not params:
        return method
    return f"{method}[{','.join(f'{k}={v}' for k, v in params.items())}]"


def train_method(method: str, data_train, budget: TrainBudget, seed: int, test_ood_sources: dict,
                 progress: bool = True, params: dict[str, Any] | None = None):
    """Train one network with ``method``; returns ``(net, objective, seconds, history)``."""
    import torch

    from .vision import FMNIST_MEAN, FMNIST_STD
    from ..models import create
    from ..train import fit
    from ..train.outliers import check_no_leak, get_outlier_source

    objective = _objective_for(method, budget, params)
    outliers = None
    if objective.needs_outliers:
        outliers = get_outlier_source(budget.outlier_source, id_data=data_train, n=budget.n_outliers, seed=seed)
        check_no_leak(outliers, test_ood_sources)
    num_classes = int(data_train.labels.max()) + 1
    torch.manual_seed(seed)
    net = create(budget.model, num_classes=num_classes, in_channels=1)
    t0 = time.perf_counter()
    net, history = fit(net, data_train, objective=objective, outliers=outliers, epochs=budget.epochs,
                       lr=budget.lr, optimizer=budget.optimizer, schedule=budget.schedule,
                       batch_size=budget.batch_size, weight_decay=budget.weight_decay, seed=seed,
                       mean=FMNIST_MEAN, std=FMNIST_STD, progress=progress)
    return net, objective, time.perf_counter() - t0, history


def _objective_params(objective) -> dict[str, Any]:
    """Constructor parameters of an objective (public attributes that are plain values)."""
    return {k: v for k, v in vars(objective).items()
            if not k.startswith("_") and not k.endswith("_") and isinstance(v, (int, float, str, bool))}


# --------------------------------------------------------------------------- scoring
def _paper_detector(objective) -> str:
    return objective.default_detector


def _evaluate_detector(det, fs, val_cap: int | None, seed: int) -> dict[str, Any]:
    """Tune/fit on train + validation only, then score the test sets."""
    from .tuning import public_params, tune
    from ..metrics import auroc, fpr_at_95_tpr

    vi, vo = fs.val_id, fs.val_ood
    uses_model = "model" in type(det).all_requirements()
    if uses_model and val_cap:
        rng = np.random.default_rng(seed)
        vi = vi[np.sort(rng.permutation(len(vi))[:val_cap])]
        vo = vo[np.sort(rng.permutation(len(vo))[:val_cap])]
    space = type(det).search_space
    if space:
        tr = tune(det, fs.train, vi, vo)
        fitted, params = tr.detector, tr.best_params
    else:
        fitted = det.fit(fs.train if type(det).fit_fields is not None else None)
        params = public_params(det.get_params())
    val_auroc = float(auroc(fitted.score(vi), fitted.score(vo)))
    s_id = fitted.score(fs.test_id)
    out: dict[str, Any] = {"val_auroc": val_auroc, "params": params}
    for group, sets in (("near", fs.near_ood), ("far", fs.far_ood)):
        if not sets:
            continue
        a, f = [], []
        for name, feats in sets.items():
            s = fitted.score(feats)
            a.append(float(auroc(s_id, s)))
            f.append(float(fpr_at_95_tpr(s_id, s)))
            out[f"{name}_auroc"], out[f"{name}_fpr95"] = a[-1], f[-1]
        out[f"{group}_auroc"], out[f"{group}_fpr95"] = float(np.mean(a)), float(np.mean(f))
    return out


def score_model(fs, paper_detector: str, post_hoc: Sequence[str] = POST_HOC, seed: int = 0,
                val_cap: int | None = 2000) -> dict[str, Any]:
    """Scores of the paper's detector and of every post-hoc detector; picks the best on val."""
    from .runner import select_detectors

    names = list(dict.fromkeys([paper_detector, *post_hoc]))
    chosen, skipped = select_detectors(names, fs)
    results: dict[str, dict[str, Any]] = {}
    for name, det in chosen:
        try:
            results[name] = _evaluate_detector(det, fs, val_cap, seed)
        except Exception as exc:  # one failing detector must not end the comparison
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
    from ..detectors.base import get_detector_class

    paper_key = get_detector_class(paper_detector).name
    candidates = {k: v for k, v in results.items() if k in {get_detector_class(p).name for p in post_hoc}}
    best = max(candidates, key=lambda k: candidates[k]["val_auroc"]) if candidates else None
    return {"paper": paper_key, "paper_result": results.get(paper_key), "best": best,
            "best_result": candidates.get(best) if best else None, "all": results, "skipped": skipped}


# --------------------------------------------------------------------------- driver
def compare_training(
    benchmark: str = "fashion-mnist-split",
    methods: Sequence[str] | str = DEFAULT_METHODS,
    seeds: Sequence[int] = (0,),
    budget: TrainBudget | None = None,
    subset: int | None = None,
    post_hoc: Sequence[str] = POST_HOC,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    method_params: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train every method under ``budget`` for every seed and score it; see the module docs.

    ``method_params`` maps a method name to constructor arguments of its objective (the
    table then labels it ``method[k=v,...]``).

    Returns ``{"rows": per (method, seed) dicts, "table": pandas.DataFrame (mean over seeds),
    "verdict": str, "budget": dict}``; with ``out``, writes ``comparison.csv``,
    ``comparison.json`` and ``comparison.md`` there.
    """
    from .runner import id_accuracy
    from .vision import FMNIST_MEAN, FMNIST_STD
    from ..detectors.base import get_detector_class
    from ..models import save_checkpoint
    from ..train.base import list_objectives

    if isinstance(methods, str):
        methods = [m.strip().lower() for m in methods.split(",") if m.strip()]
    methods = list(dict.fromkeys(m.lower() for m in methods))
    unknown = [m for m in methods if m not in list_objectives()]
    if unknown:
        raise ValueError(f"Unknown training method(s) {unknown}; available: {list_objectives()}.")
    if not methods:
        raise ValueError("--compare-training needs at least one method, e.g. ce,oe,logitnorm.")
    budget = budget or TrainBudget()
    if out is not None:  # rows.jsonl collects this run's rows as they come; start it afresh
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "rows.jsonl").write_text("")
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    for seed in seeds:
        data, sources = _benchmark_data(benchmark, seed, subset, budget.train_size)
        train = data["train"] if isinstance(data, dict) else data.train
        for method in methods:
            if progress:
                print(f"[compare] seed {seed}: training {method} ({budget.epochs} epochs, {len(train)} images)",
                      flush=True)
            params = (method_params or {}).get(method)
            net, objective, seconds, history = train_method(method, train, budget, seed, sources, progress, params)
            label = _label(method, params)
            if out is not None:  # the trained networks, loadable with oodscope.train.load_checkpoint
                save_checkpoint(net, Path(out) / "models" / f"{label}-seed{seed}.safetensors", {
                    "objective": {"name": method, "params": _objective_params(objective)},
                    "default_detector": objective.default_detector, "benchmark": benchmark,
                    "normalization": {"mean": FMNIST_MEAN, "std": FMNIST_STD}, "budget": asdict(budget)})
            paper = _paper_detector(objective)
            fields = set().union(*(get_detector_class(d).all_requirements() for d in [paper, *post_hoc]))
            fs = _feature_set(benchmark, data, net, seed, subset, fields, cache_dir, progress)
            acc = id_accuracy(fs.test_id)
            sc = score_model(fs, paper, post_hoc, seed)
            row: dict[str, Any] = {"method": label, "seed": seed, "id_accuracy": acc, "train_s": seconds,
                                   "paper_detector": sc["paper"], "best_posthoc": sc["best"]}
            for tag, res in (("paper", sc["paper_result"]), ("best", sc["best_result"])):
                for metric in ("near_auroc", "near_fpr95", "far_auroc", "far_fpr95", "val_auroc"):
                    row[f"{tag}_{metric}"] = None if res is None else res.get(metric)
            rows.append(row)
            if out is not None:  # keep partial results of a long comparison
                with open(Path(out) / "rows.jsonl", "a") as fh:
                    fh.write(json.dumps(row, default=_json_default) + "\n")
            details[f"{label}/seed{seed}"] = {
                "scores": sc["all"], "skipped": sc["skipped"], "objective": repr(objective),
                "train_logs": (history.get("logs") or [None])[-1] if isinstance(history, dict) else None}
            if progress:
                print(f"[compare]   {label}: acc {_pct(acc)}  paper {sc['paper']} near AUROC "
                      f"{_pct(row['paper_near_auroc'])}  best post-hoc {sc['best']} near AUROC "
                      f"{_pct(row['best_near_auroc'])}  ({seconds:.0f}s training)", flush=True)
    table, verdict = summarize(rows)
    result = {"rows": rows, "table": table, "verdict": verdict, "budget": asdict(budget),
              "benchmark": benchmark, "seeds": list(seeds), "details": details}
    if out is not None:
        write_comparison(result, out)
    return result


def summarize(rows: Sequence[dict[str, Any]]):
    """``(table, verdict)`` from per (method, seed) rows: means over seeds, one row per method."""
    import pandas as pd

    df = pd.DataFrame(list(rows))
    num = [c for c in df.columns if c not in ("method", "seed", "paper_detector", "best_posthoc")]
    table = df.groupby("method", sort=False)[num].mean(numeric_only=True)
    table.insert(0, "paper_detector", df.groupby("method", sort=False)["paper_detector"].first())
    table.insert(1, "best_posthoc", df.groupby("method", sort=False)["best_posthoc"].agg(
        lambda s: "/".join(dict.fromkeys(str(v) for v in s))))
    table.insert(2, "n_seeds", df.groupby("method", sort=False)["seed"].nunique())
    if df["seed"].nunique() > 1:
        for col in ("paper_near_auroc", "best_near_auroc", "id_accuracy"):
            table[f"{col}_std"] = df.groupby("method", sort=False)[col].std(ddof=0)
    table = table.reset_index()
    return table, _verdict(table)


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def _verdict(table) -> str:
    if "ce" not in set(table["method"]):
        return "No 'ce' row: add ce to the methods to compare against the plain cross-entropy model."
    ce = table[table["method"] == "ce"].iloc[0]
    ref, acc0 = ce["best_near_auroc"], ce["id_accuracy"]
    if ref is None or np.isnan(ref):
        return "The benchmark has no near-OOD set; no near-OOD verdict."
    lines = [f"Reference: best post-hoc detector on the CE model ({ce['best_posthoc']}, chosen on validation) "
             f"near-OOD AUROC {_pct(ref)}, ID accuracy {_pct(acc0)}."]
    winners = []
    for _, r in table.iterrows():
        if r["method"] == "ce":
            continue
        for tag in ("paper", "best"):
            a = r[f"{tag}_near_auroc"]
            if a is None or np.isnan(a):
                continue
            ok_acc = r["id_accuracy"] >= acc0 - 0.01
            if a > ref and ok_acc:
                det = r["paper_detector"] if tag == "paper" else r["best_posthoc"]
                winners.append(f"{r['method']} + {det} ({_pct(a)}, {100 * (a - ref):+.1f} points; "
                               f"acc {_pct(r['id_accuracy'])})")
    if winners:
        lines.append("Beat it with at most 1 point of ID accuracy lost: " + "; ".join(winners) + ".")
        if "best_near_auroc_std" in table:
            sd = ce.get("best_near_auroc_std")
            lines.append(f"(Standard deviation over seeds of the reference: {100 * sd:.1f} points; "
                         "see the ± columns for each method.)")
        else:
            lines.append("(One seed: differences of a point or less may be seed noise; run --seeds 0,1,2.)")
    else:
        lines.append("No training-time method beat it without losing more than 1 point of ID accuracy.")
    return "\n".join(lines)


def format_table(table) -> str:
    """The comparison as a markdown table (percentages)."""
    cols = [("method", "method"), ("id_accuracy", "ID acc"),
            ("paper_detector", "paper det."), ("paper_near_auroc", "near AUROC"),
            ("paper_near_fpr95", "near FPR95"), ("paper_far_auroc", "far AUROC"), ("paper_far_fpr95", "far FPR95"),
            ("best_posthoc", "best post-hoc (val)"), ("best_near_auroc", "near AUROC"),
            ("best_near_fpr95", "near FPR95"), ("best_far_auroc", "far AUROC"), ("best_far_fpr95", "far FPR95"),
            ("train_s", "train s")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if key in ("method", "paper_detector", "best_posthoc"):
                cells.append(str(v))
            elif key == "train_s":
                cells.append(f"{v:.0f}")
            else:
                sd = r.get(f"{key}_std")
                cells.append(_pct(v) + (f" ± {100 * sd:.1f}" if sd is not None and not np.isnan(sd) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "comparison.csv", "json": out / "comparison.json", "md": out / "comparison.md"}
    result["table"].to_csv(paths["csv"], index=False)
    payload = {k: v for k, v in result.items() if k != "table"}
    payload["table"] = result["table"].to_dict(orient="records")
    paths["json"].write_text(json.dumps(payload, indent=2, default=_json_default))
    b = result["budget"]
    md = [f"# Training-time OOD methods on {result['benchmark']}", "",
          f"Budget per method: {b['model']}, {b['epochs']} epochs, batch {b['batch_size']}, {b['optimizer']} "
          f"lr {b['lr']} ({b['schedule']}), {b['train_size'] or 'all'} training images, outliers "
          f"'{b['outlier_source']}' ({b['n_outliers']}); seeds {result['seeds']}. Numbers in %.", "",
          format_table(result["table"]), "", result["verdict"], ""]
    paths["md"].write_text("\n".join(md))
    return paths


def merge_comparisons(dirs: Sequence[str | Path], out: str | Path, benchmark: str = "fashion-mnist-split",
                      budget: TrainBudget | None = None) -> dict[str, Any]:
    """Merge the ``rows.jsonl`` of comparisons run in parallel (e.g. one process per method)
    into one table, verdict and set of files. All parts must have used the same budget."""
    rows = []
    for d in dirs:
        path = Path(d) / "rows.jsonl"
        if not path.exists():
            raise ValueError(f"{path} does not exist: not the output folder of a comparison.")
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError("No comparison rows to merge.")
    table, verdict = summarize(rows)
    result = {"rows": rows, "table": table, "verdict": verdict, "budget": asdict(budget or TrainBudget()),
              "benchmark": benchmark, "seeds": sorted({r["seed"] for r in rows}), "details": {},
              "merged_from": [str(d) for d in dirs]}
    write_comparison(result, out)
    return result


def _json_default(o: Any):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def run_comparison(args) -> int:
    """Entry point of ``oodscope bench BENCHMARK --compare-training METHODS``."""
    quick = bool(getattr(args, "quick", False))
    budget = TrainBudget.quick() if quick else TrainBudget()
    for key in ("epochs", "train_size", "batch_size", "lr"):
        val = getattr(args, key, None)
        if val is not None:
            setattr(budget, key, val)
    subset = getattr(args, "subset", None) or (1000 if quick else None)
    seeds_text = str(getattr(args, "seeds", "0") or "0")
    seeds = [int(s) for s in seeds_text.split(",") if s.strip()]
    benchmark = args.benchmark or "fashion-mnist-split"
    out = Path(args.out) if getattr(args, "out", None) else Path("runs") / "compare" / benchmark
    res = compare_training(benchmark, args.compare_training, seeds=seeds, budget=budget, subset=subset,
                           out=out, cache_dir=getattr(args, "cache_dir", None))
    print(format_table(res["table"]))
    print(res["verdict"])
    print(f"written to {out}")
    return 0
