"""SDM on real data: OOD detection, the admit/abstain decision, and risk-coverage (AURC).

Fashion-MNIST: the reference CNN's penultimate features and logits (see
literature_features.py); ID = Fashion-MNIST test, OOD = MNIST test, covariate shift =
Fashion-MNIST-C severity 3. CLINC150: frozen packaged all-MiniLM-L6-v2 embeddings + the
benchmark's linear head (the `clinc150` benchmark's builder with `finetune="none"`);
ID = in-scope test, OOD = oos_test. As in the paper, SDM's support set is the training split
and it calibrates on held-out ID data (Fashion-MNIST: the 5,000 validation images the CNN
never trained on; CLINC150: the in-scope val split); ``--calibration split`` instead halves
the training split. MSP, energy and KNN are shown beside it for reference.

    OODSCOPE_DATA=../shared/data HF_HUB_OFFLINE=1 python benchmarks/sdm_selective.py [fmnist|clinc|both] \
        [--calibration val|split] [--cache-dir DIR] [--distance-mode min|predicted]
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

import oodscope as ood
from oodscope import selective
from oodscope.report.plots import risk_coverage_png


def _softmax_threshold(logits, labels, t=0.95):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    keep = p.max(1) >= t
    acc = float((p.argmax(1) == labels)[keep].mean()) if keep.any() else None
    return float(keep.mean()), acc


def _centroid(out):
    return out.calibrated[np.arange(len(out.prediction)), out.prediction]


def evaluate(name, train, calibration, test_id, ood_sets, baselines=("msp", "energy", "knn"), **sdm_params):
    rows = {"dataset": name, "n_train": len(train), "n_test": len(test_id),
            "calibration": "split of train" if calibration is None else f"held out ({len(calibration)})"}
    correct = selective.correct_predictions(test_id.logits, test_id.labels)
    rows["accuracy"] = float(correct.mean())
    t = time.perf_counter()
    rows["sdm_params"] = sdm_params
    det = ood.create("sdm", **sdm_params).fit(train, calibration=calibration)
    rows["sdm_fit_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    out_id = det.predict(test_id)
    rows["sdm_score_id_s"] = round(time.perf_counter() - t, 1)
    s_id = out_id.confidence
    rows["sdm_threshold_found"] = bool(det.threshold_found_)
    rows["sdm_min_qbin"] = float(det.min_qbin_)
    rows["sdm_admitted_id"] = float(out_id.admitted.mean())
    rows["sdm_admitted_accuracy"] = (float(correct[out_id.admitted].mean()) if out_id.admitted.any() else None)
    rows["softmax_0.95_coverage"], rows["softmax_0.95_accuracy"] = _softmax_threshold(
        test_id.logits, test_id.labels)
    scores = {"sdm": s_id, "sdm_centroid": _centroid(out_id)}  # p̂_lower (the paper's) and p̂
    dets = {b: ood.create(b).fit(train) for b in baselines}
    for b, d in dets.items():
        scores[b] = d.score(test_id)
    for k, s in scores.items():
        rows[f"aurc_{k}"] = selective.aurc(s, correct)
        rows[f"eaurc_{k}"] = selective.excess_aurc(s, correct)
    for oname, f in ood_sets.items():
        out_o = det.predict(f)
        rows[f"sdm_admitted_{oname}"] = float(out_o.admitted.mean())
        rows[f"softmax_0.95_coverage_{oname}"] = _softmax_threshold(f.logits, np.full(len(f), -1))[0]
        for k in scores:
            so = {"sdm": out_o.confidence, "sdm_centroid": _centroid(out_o)}.get(k)
            so = dets[k].score(f) if so is None else so
            rows[f"auroc_{k}_{oname}"] = ood.metrics.auroc(scores[k], so)
            rows[f"fpr95_{k}_{oname}"] = ood.metrics.fpr_at_95_tpr(scores[k], so)
    return rows, scores, correct, out_id


def fashion_mnist(held_out=True, **sdm_params):
    sys.path.insert(0, "benchmarks")
    from literature_features import splits

    s = splits()
    return evaluate("fashion-mnist", s["train"], s["val"] if held_out else None, s["test"],
                    {"mnist": s["mnist"], "fmnist_c3": s["fmnist_c3"]}, **sdm_params)


def clinc(held_out=True, cache_dir=None, **sdm_params):
    from oodscope.bench.catalog import get_benchmark
    from oodscope.bench.spec import ProviderOptions

    spec = get_benchmark("clinc150")
    fs = spec.builder()(spec, ProviderOptions(finetune="none", cache_dir=cache_dir))
    return evaluate("clinc150", fs.train, fs.val_id if held_out else None, fs.test_id,
                    {"oos_test": fs.near_ood["clinc150_oos"]}, **sdm_params)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", nargs="?", default="both", choices=["fmnist", "clinc", "both"])
    ap.add_argument("--calibration", default="val", choices=["val", "split"])
    ap.add_argument("--cache-dir", default=None, help="embedding cache for CLINC150 (reruns skip the encoder)")
    ap.add_argument("--distance-mode", default="min", choices=["min", "predicted"])
    args = ap.parse_args()
    runs = {"fmnist": [fashion_mnist], "clinc": [clinc], "both": [fashion_mnist, clinc]}[args.which]
    for run in runs:
        kw = {"cache_dir": args.cache_dir} if run is clinc else {}
        kw["distance_mode"] = args.distance_mode
        rows, scores, correct, out = run(held_out=args.calibration == "val", **kw)
        print(json.dumps(rows, indent=1))
        png = risk_coverage_png(
            {k: (v, correct) for k, v in scores.items()}, title=f"{rows['dataset']}: risk-coverage",
            points={"sdm admit": (rows["sdm_admitted_id"], 1 - (rows["sdm_admitted_accuracy"] or 1.0))})
        import base64

        path = f"/tmp/sdm_risk_coverage_{rows['dataset']}.png"
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(png))
        print("figure:", path)
