"""Box-level localisation metrics: IoU and average precision at IoU thresholds.

The NOVA benchmark (Bercea et al., 2025, "NOVA: A Benchmark for Anomaly Localization and
Clinical Reasoning in Brain MRI", arXiv 2505.14064) scores predicted anomaly boxes against
the expert ("gold") boxes with mean average precision at IoU 0.3 (mAP@30), 0.5 (mAP@50) and
averaged over 0.50:0.05:0.95 (mAP@[50:95]). The paper body could not be read from this
machine; the metric names are those of the paper's tables as third-party NOVA evaluation
code reports them (``map_30``, ``map_50``, ``map_50_95``). We compute AP the way
pycocotools does for one category ("anomaly"), no crowd regions, one area range:

1. per image, predictions sorted by score (stable), at most ``max_detections`` kept; each
   is matched to the unmatched gold box of highest IoU, if that IoU is at least the
   threshold, otherwise it is a false positive;
2. all predictions of all images sorted by score (stable), cumulative TP / FP give
   precision and recall (recall over every gold box of every image);
3. precision is made monotone (the running maximum from the right) and read at the 101
   recall points 0, 0.01, ..., 1 (the first point whose recall reaches each one; 0 beyond
   the last recall); AP is their mean.

One category, so mAP equals AP. Predictions without scores (a VLM that only outputs boxes)
all get score 1 and keep their given order. Boxes are ``(x_min, y_min, x_max, y_max)`` in
pixels; `xywh_to_xyxy` converts the ``x, y, width, height`` boxes of the NOVA release.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["COCO_IOU_THRESHOLDS", "average_precision", "box_iou", "localisation_metrics", "xywh_to_xyxy"]

#: 0.50, 0.55, ..., 0.95: the thresholds averaged by mAP@[50:95]
COCO_IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _boxes(b, what: str) -> np.ndarray:
    arr = np.asarray(b, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what} must be boxes of shape (n, 4) as (x_min, y_min, x_max, y_max), "
                         f"got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN or infinite coordinates.")
    if (arr[:, 2] < arr[:, 0]).any() or (arr[:, 3] < arr[:, 1]).any():
        raise ValueError(f"{what}: x_max < x_min or y_max < y_min in some box; boxes are "
                         "(x_min, y_min, x_max, y_max) (use xywh_to_xyxy for x, y, width, height).")
    return arr


def xywh_to_xyxy(boxes) -> np.ndarray:
    """``(x, y, width, height)`` boxes -> ``(x_min, y_min, x_max, y_max)``."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if (arr[:, 2:] < 0).any():
        raise ValueError("Box width and height must be >= 0.")
    return np.concatenate([arr[:, :2], arr[:, :2] + arr[:, 2:]], axis=1)


def box_iou(a, b) -> np.ndarray:
    """Pairwise intersection over union, shape ``(len(a), len(b))`` (0 where a union is 0)."""
    a, b = _boxes(a, "boxes a"), _boxes(b, "boxes b")
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match(pred: np.ndarray, gold: np.ndarray, threshold: float) -> np.ndarray:
    """True where a prediction (in the given order) is matched to a gold box."""
    hit = np.zeros(len(pred), bool)
    if not len(pred) or not len(gold):
        return hit
    ious = box_iou(pred, gold)
    taken = np.zeros(len(gold), bool)
    for d in range(len(pred)):
        best, best_iou = -1, min(threshold, 1 - 1e-10)
        for g in range(len(gold)):
            if taken[g] or ious[d, g] < best_iou:
                continue
            best, best_iou = g, ious[d, g]
        if best >= 0:
            taken[best] = hit[d] = True
    return hit


def _per_image(predictions: Sequence, scores: Sequence | None, gold: Sequence, max_detections: int):
    if len(predictions) != len(gold):
        raise ValueError(f"predictions and gold must have one entry per image; got {len(predictions)} "
                         f"and {len(gold)}.")
    if scores is not None and len(scores) != len(predictions):
        raise ValueError(f"scores must have one entry per image like predictions; got {len(scores)} "
                         f"and {len(predictions)}.")
    out = []
    for i, (p, g) in enumerate(zip(predictions, gold)):
        p = _boxes(p, f"predicted boxes of image {i}")
        s = np.ones(len(p)) if scores is None or scores[i] is None else np.asarray(scores[i], np.float64)
        if s.shape != (len(p),) or not np.isfinite(s).all():
            raise ValueError(f"Image {i}: {len(p)} predicted boxes need {len(p)} finite scores, got {s.shape}.")
        order = np.argsort(-s, kind="mergesort")[:max_detections]
        out.append((p[order], s[order], _boxes(g, f"gold boxes of image {i}")))
    return out


def average_precision(predictions: Sequence, gold: Sequence, iou_threshold: float = 0.5,
                      scores: Sequence | None = None, max_detections: int = 100) -> float:
    """AP of predicted boxes at one IoU threshold, over a set of images (see the module doc).

    ``predictions[i]`` / ``gold[i]``: the boxes of image ``i`` (``(n, 4)``, may be empty);
    ``scores[i]``: one confidence per predicted box (None: all 1). A ValueError when no
    image has a gold box (AP is undefined then).
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}.")
    images = _per_image(predictions, scores, gold, max_detections)
    return _ap(images, float(iou_threshold))


def _ap(images, threshold: float) -> float:
    n_gold = sum(len(g) for _, _, g in images)
    if n_gold == 0:
        raise ValueError("No gold box in any image: average precision is undefined.")
    hits = [_match(p, g, threshold) for p, _, g in images]
    all_scores = np.concatenate([s for _, s, _ in images]) if images else np.zeros(0)
    all_hits = np.concatenate(hits) if hits else np.zeros(0, bool)
    if not all_scores.size:
        return 0.0
    order = np.argsort(-all_scores, kind="mergesort")
    tp = np.cumsum(all_hits[order])
    fp = np.cumsum(~all_hits[order])
    recall = tp / n_gold
    precision = np.maximum.accumulate((tp / (tp + fp))[::-1])[::-1]
    idx = np.searchsorted(recall, _RECALL_POINTS, side="left")
    q = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(q.mean())


def localisation_metrics(predictions: Sequence, gold: Sequence, scores: Sequence | None = None,
                         max_detections: int = 100) -> dict[str, float]:
    """NOVA's localisation metrics: ``map_30``, ``map_50`` and ``map_50_95`` (the mean AP over
    IoU 0.50:0.05:0.95), plus the counts ``n_images``, ``n_gold``, ``n_predicted``."""
    images = _per_image(predictions, scores, gold, max_detections)
    return {
        "map_30": _ap(images, 0.3),
        "map_50": _ap(images, 0.5),
        "map_50_95": float(np.mean([_ap(images, float(t)) for t in COCO_IOU_THRESHOLDS])),
        "n_images": len(images),
        "n_gold": int(sum(len(g) for _, _, g in images)),
        "n_predicted": int(sum(len(p) for p, _, _ in images)),
    }
