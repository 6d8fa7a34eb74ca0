"""Linear probing of a frozen backbone: the tuning the PT-OOD study evaluates.

Miyai et al., "Can Pre-trained Networks Detect Familiar Out-of-Distribution Data?"
(arXiv 2310.00847) train only a linear classifier on the frozen features of a pre-trained
backbone (supervised or self-supervised) and show that logit-based scores (MSP, energy, ...)
of that probe miss OOD data the backbone saw in pre-training, while a score in the frozen
feature space (kNN) does not depend on the probe's decision boundary. Their code is not
released; the probe here is multinomial logistic regression with an L2 penalty
(scikit-learn's L-BFGS solver) on the backbone's features, which is what "linear probing" means
in the self-supervised literature they follow.

`fit_linear_probe` learns ``(weight, bias)`` from ID training features and labels;
`apply_linear_probe` gives every split the probe's logits and the probe as its head, so the
head-based detectors (ReAct, ViM, ...) see the classifier the logits come from.
"""

from __future__ import annotations

import numpy as np

from ..features import Features

__all__ = ["apply_linear_probe", "fit_linear_probe"]


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, C: float = 1.0, max_iter: int = 1000,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(weight (k, d), bias (k,))`` of an L2-regularised multinomial logistic regression
    (inverse penalty ``C``) on float64 ``features`` with integer ``labels`` ``0 .. k-1``."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be (n, d) with one label each; got {x.shape} and {y.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values; the backbone output is broken.")
    if y.size == 0 or y.min() < 0:
        raise ValueError("labels must be class indices >= 0 (ID training labels).")
    classes = np.unique(y)
    if len(classes) < 2 or not np.array_equal(classes, np.arange(classes.max() + 1)):
        raise ValueError(f"the probe needs every class 0..k-1 (k >= 2) in the training labels; got {classes.tolist()}.")
    if not C > 0:
        raise ValueError(f"C (inverse L2 penalty) must be > 0, got {C}.")
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(x, y)
    if len(classes) == 2:  # scikit-learn keeps one row for two classes: expand to two logits
        w, b = clf.coef_[0], clf.intercept_[0]
        return np.stack([-w / 2, w / 2]), np.array([-b / 2, b / 2])
    return clf.coef_.astype(np.float64), clf.intercept_.astype(np.float64)


def apply_linear_probe(f: Features, weight: np.ndarray, bias: np.ndarray) -> Features:
    """``f`` with logits ``features @ weight.T + bias`` and the probe as its head."""
    if f.features is None:
        raise ValueError("apply_linear_probe needs features (the backbone's output).")
    logits = np.asarray(f.features, dtype=np.float64) @ np.asarray(weight).T + np.asarray(bias)
    return f.replace(logits=logits, head_weight=weight, head_bias=bias)
