"""Matplotlib figures for the report, returned as base64-encoded PNG strings."""

from __future__ import annotations

import base64
import io
from typing import Mapping

import numpy as np

__all__ = ["roc_curve_png", "histograms_png", "risk_coverage_png", "to_png_base64"]

_MAX_CURVE_POINTS = 400


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def to_png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def roc_points(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) with ID positive, thinned to a few hundred points for plotting."""
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(id_scores.size), np.zeros(ood_scores.size)]
    fpr, tpr, _ = roc_curve(y, np.r_[id_scores, ood_scores], drop_intermediate=True)
    if fpr.size > _MAX_CURVE_POINTS:
        keep = np.unique(np.r_[np.linspace(0, fpr.size - 1, _MAX_CURVE_POINTS).astype(int)])
        fpr, tpr = fpr[keep], tpr[keep]
    return fpr, tpr


def roc_curve_png(id_by_det: Mapping[str, np.ndarray], ood_by_det: Mapping[str, np.ndarray],
                  title: str, aurocs: Mapping[str, float] | None = None, max_lines: int = 12) -> str:
    """One ROC figure: a line per detector (the ``max_lines`` best by AUROC)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    names = list(id_by_det)
    if aurocs:
        names.sort(key=lambda n: -aurocs.get(n, 0.0))
    colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 lines
    for i, n in enumerate(names[:max_lines]):
        fpr, tpr = roc_points(id_by_det[n], ood_by_det[n])
        label = f"{n} ({100 * aurocs[n]:.1f})" if aurocs and n in aurocs else n
        ax.plot(fpr, tpr, lw=1.3, label=label, color=colors[(2 * i) % 20 + (2 * i) // 20])
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.axhline(0.95, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("OOD accepted (FPR)")
    ax.set_ylabel("ID accepted (TPR)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right", title="detector (AUROC)", title_fontsize=7)
    return to_png_base64(fig)


def histograms_png(id_by_det: Mapping[str, np.ndarray], ood_by_det: Mapping[str, np.ndarray],
                   title: str, ncols: int = 4, max_panels: int = 16) -> str:
    """Small multiples: ID vs OOD score histograms, one panel per detector."""
    plt = _plt()
    names = list(id_by_det)[:max_panels]
    nrows = max(1, int(np.ceil(len(names) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.2 * nrows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, n in zip(axes.ravel(), names):
        a, b = np.asarray(id_by_det[n], float), np.asarray(ood_by_det[n], float)
        lo, hi = np.quantile(np.r_[a, b], [0.005, 0.995])
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 50)
        ax.hist(np.clip(a, lo, hi), bins=bins, alpha=0.55, density=True, label="ID", color="tab:blue")
        ax.hist(np.clip(b, lo, hi), bins=bins, alpha=0.55, density=True, label="OOD", color="tab:red")
        ax.set_title(n, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    axes.ravel()[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return to_png_base64(fig)


def risk_coverage_png(curves: Mapping[str, tuple], title: str = "Risk-coverage",
                      points: Mapping[str, tuple] | None = None, max_lines: int = 12) -> str:
    """A risk-coverage figure (`oodscope.selective`): a step line per score, best AURC first.

    ``curves`` maps a name to ``(scores, correct)``; the legend shows each AURC (x100).
    ``points`` maps a name to one ``(coverage, risk)`` operating point (e.g. an SDM detector's
    accept/abstain decision), drawn as a marker.
    """
    from ..selective import aurc, risk_coverage_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    scored = {n: aurc(*sc) for n, sc in curves.items()}
    names = sorted(scored, key=scored.get)[:max_lines]
    colors = plt.get_cmap("tab20").colors
    for i, n in enumerate(names):
        rc = risk_coverage_curve(*curves[n])
        ax.step(np.r_[0.0, rc.coverage], np.r_[rc.risk[0], rc.risk], where="post", lw=1.3,
                label=f"{n} ({100 * scored[n]:.2f})", color=colors[(2 * i) % 20 + (2 * i) // 20])
    for n, (cov, rsk) in (points or {}).items():
        ax.plot([cov], [rsk], marker="o", ls="", color="black")
        ax.annotate(n, (cov, rsk), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("coverage (fraction answered)")
    ax.set_ylabel("selective risk (error rate among answered)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", title="score (AURC x100)", title_fontsize=7)
    return to_png_base64(fig)
