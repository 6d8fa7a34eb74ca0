"""A single self-contained HTML file: no scripts, no external assets, plots inlined as PNG.

Sections: summary (model, ID accuracy, splits), leaderboard, validation OOD set (what and
why), chosen hyperparameters, ROC curves and score histograms per OOD set, selective
prediction (risk-coverage curve, AURC / E-AURC of every detector's score on the test ID set),
timing breakdown (extraction vs fit vs tuning vs scoring), skipped detectors.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import auroc
from .plots import histograms_png, risk_coverage_png, roc_curve_png

__all__ = ["render_report", "write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#fafafa}
.note{background:#f6f8fa;border-left:4px solid #888;padding:.5em 1em;font-size:.9em}
.fig{display:inline-block;margin:.4em;vertical-align:top}
.small{font-size:.8em;color:#555}
.best{font-weight:bold}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any, pct: bool = True, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{100 * v:.{nd}f}" if pct else f"{v:.{nd}f}"


def _table(header: list[str], rows: list[list[Any]], left: int = 1, raw: bool = False) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = []
    for r in rows:
        tds = "".join(
            f'<td class="{"l" if i < left else ""}">{c if raw else _e(c)}</td>' for i, c in enumerate(r))
        body.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _with_ci(row: Any, metric: str) -> str:
    v = row.get(metric)
    lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    s = _fmt(v)
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        s += f' <span class="small">[{_fmt(lo)}, {_fmt(hi)}]</span>'
    return s


def _leaderboard_html(result, mode: str) -> str:
    df = result.results
    ok = df[(df["status"] == "ok") & (df["mode"] == mode)]
    if ok.empty:
        return "<p>No detector produced results.</p>"
    lb = result.leaderboard(mode)
    seeds = sorted(ok["seed"].dropna().unique())
    first = ok[ok["seed"] == seeds[0]]
    ood_names = [o for o in dict.fromkeys(first["ood_set"]) if "(mean)" not in o]
    mean_names = [o for o in ("near (mean)", "far (mean)", "stream (mean)") if o in set(first["ood_set"])]
    header = ["detector"] + [f"{m} AUROC" for m in mean_names] + [f"{m} FPR@95" for m in mean_names]
    header += [f"{o} AUROC / FPR@95" for o in ood_names] + ["hyperparameters"]
    rows = []
    for det in lb["detector"]:
        sub = first[first["detector"] == det].set_index("ood_set")
        r = [f"<b>{_e(det)}</b>"]
        for m in mean_names:
            r.append(_with_ci(sub.loc[m], "auroc") if m in sub.index else "–")
        for m in mean_names:
            r.append(_with_ci(sub.loc[m], "fpr_at_95_tpr") if m in sub.index else "–")
        for o in ood_names:
            if o in sub.index:
                r.append(f"{_fmt(sub.loc[o]['auroc'])} / {_fmt(sub.loc[o]['fpr_at_95_tpr'])}")
            else:
                r.append("–")
        params = result.tuning.get(det, {}).get("params", {})
        r.append(_e(", ".join(f"{k}={v}" for k, v in params.items())))
        rows.append(r)
    note = ""
    if len(seeds) > 1:
        note = (f'<p class="small">Confidence intervals from seed {int(seeds[0])}; ordering by the '
                f"mean over seeds {', '.join(str(int(s)) for s in seeds)} (see results.csv).</p>")
        means = lb.set_index("detector")
        rows_seed = [[_e(d)] + [_fmt(means.loc[d].get(f"{m} AUROC"), pct=False) for m in mean_names]
                     for d in lb["detector"]]
        note += _table(["detector"] + [f"{m} AUROC, mean over seeds" for m in mean_names], rows_seed, raw=True)
    return (
        '<p class="small">AUROC and FPR@95 (fraction of OOD accepted at 95% ID recall) in %, with '
        "95% bootstrap intervals; near/far rows are the unweighted mean over their datasets. "
        "Sorted by the mean of the near and far AUROC.</p>"
        + _table(header, rows, raw=True) + note
    )


def _tuning_html(result) -> str:
    rows = []
    for det, t in result.tuning.items():
        cands = t.get("candidates", [])
        chosen = next((c for c in cands if c.get("chosen")), None)
        params = ", ".join(f"{k}={v}" for k, v in t.get("params", {}).items())
        if chosen is not None:
            varied = ", ".join(f"{k}={v}" for k, v in chosen["params"].items()) or "(no search space)"
            how = (f"{len(cands)} candidate(s), {t.get('n_fits', '?')} fit(s); chosen {varied}: "
                   f"val AUROC {_fmt(chosen['val_auroc'])}, val FPR@95 {_fmt(chosen['val_fpr_at_95_tpr'])}")
            spread = [c["val_auroc"] for c in cands if c.get("val_auroc") is not None]
            failed = [c for c in cands if c.get("error")]
            if failed:
                how += f"; {len(failed)} candidate(s) could not run (e.g. {failed[0]['params']}: {failed[0]['error'][:120]})"
            how += f" (candidates' val AUROC {_fmt(min(spread))}–{_fmt(max(spread))})" if len(cands) > 1 else ""
        else:
            how = t.get("note", "defaults")
        rows.append([det, params, how])
    return (
        "<p>Hyperparameters are chosen on ID-val vs the validation OOD set only, over each "
        "detector's search grid, by AUROC (ties: lower FPR@95). Test OOD sets never take part.</p>"
        + _table(["detector", "parameters used", "selection"], rows, left=3)
    )


def _timing_html(result) -> str:
    info = result.info
    ext = info.get("timings", {}) or {}
    parts = []
    if ext:
        total = sum(float(v) for v in ext.values() if isinstance(v, (int, float)))
        cached = set(info.get("timings_from_cache") or [])
        rows = [[k + (" (loaded from the feature cache)" if k in cached else ""), f"{float(v):.2f}"]
                for k, v in ext.items() if isinstance(v, (int, float))]
        rows.append(["total (one pass per split)", f"{total:.2f}"])
        note = ("<p class=\"small\">Splits marked as loaded from the cache did not run the network in "
                "this run; delete the cache (--cache-dir) to time the extraction.</p>" if cached else "")
        parts.append("<h3>Extraction (network runs once per split)</h3>" + note
                     + _table(["split", "seconds"], rows))
    rows = []
    for t in result.timings:
        rows.append([t["detector"] + (" (re-runs the network)" if t.get("uses_model") else ""),
                     f"{t.get('fit_s', 0):.3f}", f"{t.get('tune_s', 0):.3f}", f"{t.get('score_s', 0):.3f}",
                     t.get("status", "")])
    parts.append("<h3>Detectors (cached features only)</h3>" + _table(
        ["detector", "fit (one, s)", "tuning (all candidates, s)", "score test sets (s)", "status"], rows))
    if result.timings:
        tot = sum(t.get("tune_s", 0) + t.get("score_s", 0) + (0 if t.get("tune_s") else t.get("fit_s", 0))
                  for t in result.timings)
        parts.append(f"<p>All detectors together (fit + tuning + scoring): {tot:.2f} s.</p>")
    return "".join(parts)


def _figures_html(result) -> tuple[str, str]:
    roc_parts, hist_parts = [], []
    if not result.scores:
        return "<p>No scores kept.</p>", "<p>No scores kept.</p>"
    df = result.results
    first_seed = df["seed"].dropna().min() if not df.empty else 0
    ok = df[(df["status"] == "ok") & (df["mode"] == "standard") & (df["seed"] == first_seed)]
    any_scores = next(iter(result.scores.values()))
    for ood in [k for k in any_scores if k != "test_id" and not k.endswith("(as ID)")]:
        id_by = {d: s["test_id"] for d, s in result.scores.items() if ood in s}
        ood_by = {d: s[ood] for d, s in result.scores.items() if ood in s}
        sub = ok[ok["ood_set"] == ood]
        au = dict(zip(sub["detector"], sub["auroc"]))
        group = result.groups.get(ood, "")
        title = f"{result.benchmark}: test ID vs {ood} ({group} OOD)"
        roc_parts.append(f'<div class="fig"><img alt="ROC {_e(ood)}" src="data:image/png;base64,'
                         f'{roc_curve_png(id_by, ood_by, title, au)}"></div>')
        order = sorted(id_by, key=lambda d: -au.get(d, 0))
        hist_parts.append(
            f'<div><h3>{_e(ood)}</h3><img alt="histograms {_e(ood)}" src="data:image/png;base64,'
            f'{histograms_png({d: id_by[d] for d in order}, {d: ood_by[d] for d in order}, title)}"></div>')
    return "".join(roc_parts), "".join(hist_parts)


def _generalization_html(result) -> str:
    """Accuracy under covariate shift beside detection: how much accuracy the shift costs, and
    how strongly each detector flags the shifted (still in-distribution) inputs."""
    gen = result.info.get("generalization")
    if not gen:
        return ""
    clean = gen["clean_accuracy"]
    rows = [[name, _fmt(acc, nd=2), _fmt(acc / clean if clean else float("nan"), nd=1)]
            for name, acc in gen["accuracy"].items()]
    parts = [f"<p>Mean accuracy over the shifted sets {_fmt(gen['mean_shift_accuracy'], nd=2)} % vs "
             f"{_fmt(clean, nd=2)} % clean: relative robustness {_fmt(gen['relative_robustness'], nd=1)} %.</p>",
             _table(["test set", "accuracy %", "relative to clean %"], rows)]
    shifted = [k for k in gen["accuracy"] if k != "clean"]
    det_rows = []
    for det, sc in result.scores.items():
        aucs = [auroc(sc["test_id"], sc[f"{k} (as ID)"]) for k in shifted if f"{k} (as ID)" in sc]
        if aucs:
            det_rows.append([det, *[_fmt(a) for a in aucs]])
    if det_rows:
        parts.append("<p>Detection of the shift itself: AUROC of clean test ID vs each shifted set "
                     "(50 = the detector ignores the shift, as a semantic-OOD detector should; a "
                     "covariate-shift detector such as DisCoPatch aims high).</p>")
        parts.append(_table(["detector", *shifted], sorted(det_rows, key=lambda r: r[0])))
    else:
        parts.append('<p class="small">Run with --full-spectrum to also see how strongly each '
                     "detector flags the shifted inputs.</p>")
    return '<h2 id="generalization">Generalisation under covariate shift</h2>' + "".join(parts)


def _selective_html(result) -> str:
    """Every detector's test ID score used to accept or abstain on the classifier's answers:
    the risk-coverage curves and AURC / E-AURC (`oodscope.selective`)."""
    table = result.selective()
    if not table:
        return ("<p>Not available: the test ID set has no logits and labels (the classifier's "
                "correctness is unknown), or no scores were kept.</p>")
    order = sorted(table, key=lambda d: table[d]["aurc"])
    covs = [k for k in next(iter(table.values())) if k.startswith("risk_at_")]
    header = ["detector", "AURC ×100", "E-AURC ×100"] + [f"risk @ {k[8:]}% coverage" for k in covs]
    rows = [[d, _fmt(table[d]["aurc"], nd=2), _fmt(table[d]["e_aurc"], nd=2),
             *[_fmt(table[d][k], nd=2) for k in covs]] for d in order]
    curves = {d: (result.scores[d]["test_id"], result.test_id_correct) for d in order}
    png = risk_coverage_png(curves, f"{result.benchmark}: risk-coverage on test ID")
    return (
        "<p>Each detector's test ID score decides which of the classifier's answers to accept "
        "(highest scores first). Selective risk = error rate among the accepted; AURC = the area "
        "under the risk-coverage curve (lower is better); E-AURC = AURC minus that of a perfect "
        "ordering of right and wrong answers. In %, sorted by AURC.</p>"
        + _table(header, rows)
        + f'<div class="fig"><img alt="risk-coverage" src="data:image/png;base64,{png}"></div>'
    )


def render_report(result) -> str:
    """The report of a `oodscope.bench.runner.BenchResult` as an HTML string."""
    info = result.info
    acc = info.get("id_accuracy")
    summary_rows = [
        ["benchmark", result.benchmark],
        ["model", info.get("model", "–")],
        ["ID test accuracy", f"{_fmt(acc, nd=2)} %" if acc is not None else "–"],
    ]
    for k, v in (info.get("covariate_accuracy") or {}).items():
        if v is not None:
            summary_rows.append([f"accuracy on {k} (covariate shift)", f"{_fmt(v, nd=2)} %"])
    summary_rows.append(["samples per split", ", ".join(f"{k}: {v}" for k, v in info.get("splits", {}).items())])
    summary_rows.append(["seeds", ", ".join(str(s) for s in info.get("seeds", [info.get("seed", 0)]))])
    summary_rows.append(["tuning", "on validation data" if info.get("tuned", True) else "off (defaults)"])
    for note in info.get("notes", []) or []:
        summary_rows.append(["note", note])

    val_desc = info.get("val_ood_description") or "not described by the benchmark provider"
    val_why = info.get("val_ood_reason", "")
    skipped = (_table(["detector", "reason"], [[k, v] for k, v in result.skipped.items()], left=2)
               if result.skipped else "<p>None: every requested detector ran.</p>")
    roc_html, hist_html = _figures_html(result)
    fs_html = ""
    if any(r["mode"] == "full-spectrum" for r in result.rows):
        fs_html = ('<h2 id="full-spectrum">Leaderboard, full-spectrum (covariate-shifted ID counts as ID)</h2>'
                   + _leaderboard_html(result, "full-spectrum"))
    if any(r["mode"] == "stream" for r in result.rows):
        fs_html += ('<h2 id="stream">Streaming protocol (one column per stage)</h2><p class="small">Every '
                    "stage starts from the detector's reset state; adaptive detectors (MOL) adapt on the "
                    "stage's labelled support set first.</p>" + _leaderboard_html(result, "stream"))
    extra = {k: v for k, v in info.items() if k in ("ood_descriptions", "sources")}
    extra_html = ""
    if extra.get("ood_descriptions"):
        extra_html = "<h3>Test OOD sets</h3>" + _table(
            ["set", "group", "what"],
            [[k, result.groups.get(k, ""), v] for k, v in extra["ood_descriptions"].items()], left=3)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>oodscope report: {_e(result.benchmark)}</title><style>{_CSS}</style></head>
<body>
<h1>oodscope benchmark report: {_e(result.benchmark)}</h1>
<h2 id="summary">Summary</h2>
{_table(["", ""], summary_rows, left=2)}
{extra_html}
<h2 id="leaderboard">Leaderboard</h2>
{_leaderboard_html(result, "standard")}
{fs_html}
{_generalization_html(result)}
<h2 id="validation-ood">Validation OOD set</h2>
<div class="note"><p><b>What:</b> {_e(val_desc)}</p><p><b>Why:</b> {_e(val_why or "It is disjoint from every test OOD set, so choosing hyperparameters on it cannot leak test information.")}</p></div>
<h2 id="hyperparameters">Chosen hyperparameters</h2>
{_tuning_html(result)}
<h2 id="roc">ROC curves per OOD set</h2>
{roc_html}
<h2 id="histograms">Score histograms per OOD set</h2>
<p class="small">Higher score = more in-distribution for every detector; blue ID, red OOD.</p>
{hist_html}
<h2 id="selective">Selective prediction (risk–coverage)</h2>
{_selective_html(result)}
<h2 id="timing">Timing breakdown</h2>
{_timing_html(result)}
<h2 id="skipped">Skipped detectors</h2>
{skipped}
<p class="small">Generated by oodscope. Raw numbers: results.csv / results.json.</p>
</body></html>
"""


def write_report(result, path: str | Path) -> Path:
    """Write the report of ``result`` to ``path`` (a self-contained HTML file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(result), encoding="utf-8")
    return path
