"""Agreement of `oodscope.localisation` (NOVA's mAP@30 / mAP@50 / mAP@[50:95]) with pycocotools.

Not a test: pycocotools is not a dependency. Install it anywhere on the path, e.g.
``pip install --target /tmp/pycoco pycocotools`` and ``PYTHONPATH=src:/tmp/pycoco``, then run
``python benchmarks/localisation_vs_pycocotools.py [--trials N]``. Random images with 0-3 gold
boxes each, jittered hits and random false positives with random scores; pycocotools runs one
category, one area range, maxDets 100, IoU thresholds 0.3 and 0.50:0.05:0.95. Prints the
largest absolute difference per metric.
"""

from __future__ import annotations

import argparse
import contextlib
import io

import numpy as np


def _random_case(rng):
    gold, pred, scores = [], [], []
    for _ in range(rng.integers(1, 8)):
        g = []
        for _ in range(rng.integers(0, 4)):
            x, y = rng.uniform(0, 80, 2)
            w, h = rng.uniform(5, 30, 2)
            g.append([x, y, x + w, y + h])
        p = [list(np.array(b) + rng.normal(0, 4, 4)) for b in g if rng.random() < 0.7]
        for _ in range(rng.integers(0, 3)):
            x, y = rng.uniform(0, 80, 2)
            w, h = rng.uniform(5, 30, 2)
            p.append([x, y, x + w, y + h])
        p = [[min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])] for b in p]
        gold.append(g)
        pred.append(p)
        scores.append(list(rng.random(len(p))))
    return gold, pred, scores


def _coco(gold, pred, scores):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    anns = [{"id": k + 1, "image_id": i + 1, "category_id": 1, "bbox": xywh(b), "iscrowd": 0,
             "area": (b[2] - b[0]) * (b[3] - b[1])}
            for k, (i, b) in enumerate((i, b) for i, g in enumerate(gold) for b in g)]
    gt = COCO()
    gt.dataset = {"images": [{"id": i + 1} for i in range(len(gold))], "annotations": anns,
                  "categories": [{"id": 1, "name": "anomaly"}]}
    dets = [{"image_id": i + 1, "category_id": 1, "bbox": xywh(b), "score": float(s)}
            for i, (p, sc) in enumerate(zip(pred, scores)) for b, s in zip(p, sc)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.iouThrs = np.array([0.3, *np.linspace(0.5, 0.95, 10)])
        ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0, 1e10]], ["all"], [100]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, 0, 0, 0]
    ap = [float(np.mean(row[row > -1])) for row in prec]
    return {"map_30": ap[0], "map_50": ap[1], "map_50_95": float(np.mean(ap[1:]))}


def main() -> None:
    from oodscope.localisation import localisation_metrics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    worst = {"map_30": 0.0, "map_50": 0.0, "map_50_95": 0.0}
    done = 0
    while done < args.trials:
        gold, pred, scores = _random_case(rng)
        if not any(gold) or not any(pred):
            continue
        ours, ref = localisation_metrics(pred, gold, scores), _coco(gold, pred, scores)
        for k in worst:
            worst[k] = max(worst[k], abs(ours[k] - ref[k]))
        done += 1
    print(f"{'metric':10s} max |oodscope - pycocotools| over {done} random cases")
    for k, v in worst.items():
        print(f"{k:10s} {v:.3g}")


if __name__ == "__main__":
    main()
