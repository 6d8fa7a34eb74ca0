"""The benchmark runner on synthetic FeatureSets: tuning, skipping, results tables, seeds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import _make_problem
from oodscope import Features
from oodscope.bench.runner import COLUMNS, run, run_benchmark
from oodscope.bench.spec import FeatureSet
from oodscope.bench.tuning import candidate_grid, tune
from oodscope.detectors.base import Detector


def _feature_set(seed: int = 0, n: int = 300) -> FeatureSet:
    p = _make_problem(seed=seed, n_train=400, n_test=n)
    rng = np.random.default_rng(seed + 10)
    # near OOD: ID-like features with the class signal halved (between ID and far OOD)
    f = p.test_id.features * 0.45 + 0.3 * np.abs(rng.standard_normal(p.test_id.features.shape))
    near = p.test_id.replace(features=f.astype(np.float32), logits=p.test_id.logits_from_features(f),
                             labels=-np.ones(len(f), int))
    val_ood = _make_problem(seed=seed + 100, n_train=50, n_test=200).test_ood
    cov = p.test_id.replace(features=(p.test_id.features * 0.8).astype(np.float32),
                            logits=p.test_id.logits_from_features(p.test_id.features * 0.8))
    return FeatureSet(
        train=p.train, val_id=p.val, val_ood=val_ood, test_id=p.test_id,
        near_ood={"near-blend": near}, far_ood={"far-noise": p.test_ood},
        covariate={"scaled": cov},
        info={"val_ood_description": "independent synthetic noise", "timings": {"train": 0.1}},
        detector_kwargs={"*": {"model": p.model}},
    )


@pytest.fixture(scope="module")
def fs() -> FeatureSet:
    return _feature_set()


# --------------------------------------------------------------------------- probes
class SignProbe(Detector):
    """score = sign · feature[0]; records every call so tests can see what tuning touched."""

    name = "signprobe"
    requires = frozenset({"features"})
    fit_fields = frozenset({"features"})
    search_space = {"sign": [-1.0, 1.0]}
    calls: list = []

    def __init__(self, sign: float = -1.0):
        self.sign = sign

    def _fit(self, train):
        SignProbe.calls.append(("fit", len(train), self.sign))

    def _score(self, x):
        SignProbe.calls.append(("score", len(x), self.sign))
        return self.sign * x.features[:, 0].astype(np.float64)


class Broken(Detector):
    name = "broken"
    requires = frozenset({"logits"})

    def _score(self, x):
        raise RuntimeError("this detector always fails")


class NeedsLayer(Detector):
    name = "needslayer"
    requires = frozenset({"layer:block3"})

    def _score(self, x):  # pragma: no cover - never reached
        return np.zeros(len(x))


def _probe_set() -> FeatureSet:
    """Validation OOD has *low* feature[0] (sign=+1 wins); test OOD has *high* (sign=-1 wins)."""
    rng = np.random.default_rng(0)

    def f(n, mu):
        return Features(features=rng.normal(mu, 1.0, (n, 3)).astype(np.float32))

    return FeatureSet(train=f(101, 0), val_id=f(102, 0), val_ood=f(103, -3), test_id=f(104, 0),
                      far_ood={"trap": f(105, 3)})


def test_tuning_never_uses_test_ood():
    SignProbe.calls = []
    fs = _probe_set()
    res = run(fs, [SignProbe()], progress=False, ci=False)
    assert res.tuning["signprobe"]["params"]["sign"] == 1.0  # the validation choice
    row = res.results.query("ood_set == 'trap'").iloc[0]
    assert row["auroc"] < 0.1  # and it is the wrong one for the test set: no leak
    # instrumentation: the rejected candidate only ever saw train/val sizes
    rejected = {n for kind, n, s in SignProbe.calls if s == -1.0}
    assert rejected <= {101, 102, 103}
    test_calls = [(n, s) for kind, n, s in SignProbe.calls if kind == "score" and n in (104, 105)]
    assert sorted(test_calls) == [(104, 1.0), (105, 1.0)]  # test sets scored once, chosen params


def test_tune_picks_best_and_breaks_ties_by_fpr(fs):
    from oodscope.detectors import create

    det = create("energy")
    tr = tune(det, fs.train, fs.val_id, fs.val_ood)
    key = lambda c: (c["val_auroc"], -c["val_fpr_at_95_tpr"])  # noqa: E731
    top = max(map(key, tr.candidates))
    best = [c["params"]["temperature"] for c in tr.candidates if key(c) == top]
    assert tr.best_params["temperature"] == (1.0 if 1.0 in best else best[0])
    assert sum(c["chosen"] for c in tr.candidates) == 1
    assert tr.detector.is_fitted
    assert candidate_grid({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert candidate_grid({}) == [{}]
    with pytest.raises(ValueError, match="non-empty"):
        candidate_grid({"a": []})


def test_tune_reuses_fit_for_score_only_params():
    class ScoreOnly(SignProbe):
        score_params = {"sign"}

    SignProbe.calls = []
    fs = _probe_set()
    tr = tune(ScoreOnly(), fs.train, fs.val_id, fs.val_ood)
    # one fit, made with the largest score-time value (candidates sharing a fit run largest first)
    assert tr.n_fits == 1 and [c for c in SignProbe.calls if c[0] == "fit"] == [("fit", 101, 1.0)]
    assert tr.best_params["sign"] == 1.0 and tr.detector.sign == 1.0


def test_end_to_end_synthetic(fs, tmp_path):
    res = run(fs, ["msp", "energy", "gradnorm"], benchmark="synthetic", n_boot=30, progress=False)
    df = res.results
    assert list(df.columns) == COLUMNS
    ok = df[df.status == "ok"]
    assert set(ok.detector) == {"msp", "energy", "gradnorm"}
    assert set(ok.ood_set) == {"near-blend", "far-noise", "near (mean)", "far (mean)"}
    far = ok[ok.ood_set == "far-noise"]
    assert (far.auroc > 0.95).all()
    # CIs bracket the point estimate
    assert ((ok.auroc_lo <= ok.auroc + 1e-12) & (ok.auroc <= ok.auroc_hi + 1e-12)).all()
    # the near mean over one dataset equals that dataset
    for det in ok.detector.unique():
        d = ok[ok.detector == det].set_index("ood_set")
        assert d.loc["near (mean)", "auroc"] == pytest.approx(d.loc["near-blend", "auroc"])
    assert res.info["id_accuracy"] > 0.9
    paths = res.write(tmp_path, report=False)
    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns) == COLUMNS and len(csv) == len(df)
    js = json.loads(paths["json"].read_text())
    assert js["columns"] == COLUMNS and len(js["rows"]) == len(df)
    assert set(js["tuning"]) == {"msp", "energy", "gradnorm"}
    assert {t["detector"] for t in js["timings"]} == {"msp", "energy", "gradnorm"}


def test_mean_rows_are_unweighted_means():
    fs = _feature_set()
    fs.far_ood["far-noise-small"] = fs.far_ood["far-noise"][:50]
    fs.far_ood["far-near"] = fs.near_ood.pop("near-blend")
    res = run(fs, ["msp"], ci=False, progress=False)
    d = res.results.set_index("ood_set")
    expect = np.mean([d.loc[k, "auroc"] for k in ("far-noise", "far-noise-small", "far-near")])
    assert d.loc["far (mean)", "auroc"] == pytest.approx(expect)
    assert "near (mean)" not in d.index


def test_skips_with_reason_and_keeps_running(fs):
    res = run(fs, ["msp", Broken(), NeedsLayer()], ci=False, progress=False)
    assert "always fails" in res.skipped["broken"]
    assert "layer:block3" in res.skipped["needslayer"]
    df = res.results
    skipped = df[df.status == "skipped"].set_index("detector")
    assert set(skipped.index) == {"broken", "needslayer"}
    assert skipped.loc["broken", "reason"]
    assert set(df[df.status == "ok"].detector) == {"msp"}


def test_default_selection_leaves_out_network_training_detectors(fs):
    from oodscope.bench.runner import select_detectors

    chosen, skipped = select_detectors(None, fs)
    names = {n for n, _ in chosen}
    assert "mol" not in names and "not run by default" in skipped["mol"]
    assert {"msp", "knn", "mahalanobis"} <= names
    chosen, _ = select_detectors("msp,mol", fs)  # named: it runs
    assert [n for n, _ in chosen] == ["msp", "mol"]


def test_unknown_ood_and_detector_names(fs):
    with pytest.raises(ValueError, match="far-noise"):
        run(fs, ["msp"], ood=["svhn"], progress=False)
    with pytest.raises(ValueError, match="Unknown detector"):
        run(fs, ["no-such-detector"], progress=False)
    res = run(fs, ["msp"], ood="far-noise", ci=False, progress=False)
    assert set(res.results.ood_set) == {"far-noise", "far (mean)"}


def test_full_spectrum_rows(fs):
    res = run(fs, ["msp"], full_spectrum=True, ci=False, progress=False)
    df = res.results
    assert set(df["mode"]) == {"standard", "full-spectrum"}
    fsr = df[(df["mode"] == "full-spectrum") & (df.ood_set == "far-noise")].iloc[0]
    std = df[(df["mode"] == "standard") & (df.ood_set == "far-noise")].iloc[0]
    assert fsr.n_id == 2 * std.n_id
    assert "scaled" in res.info["covariate_accuracy"]


def test_no_tune_uses_defaults(fs):
    res = run(fs, ["energy"], tune_params=False, ci=False, progress=False)
    assert res.tuning["energy"]["params"]["temperature"] == 1.0
    assert res.tuning["energy"]["candidates"] == []


def test_model_detectors_get_the_model_and_others_do_not(fs):
    res = run(fs, ["odin", "msp"], ci=False, progress=False, model_tune_samples=60)
    assert "odin" not in res.skipped, res.skipped
    t = {t["detector"]: t for t in res.timings}
    assert t["odin"]["uses_model"] and not t["msp"]["uses_model"]


def test_seeds_call_provider_per_seed():
    seen = []

    def provider(spec, options):
        seen.append(options.seed)
        return _feature_set(seed=options.seed, n=120)

    res = run_benchmark(provider, ["msp"], seeds=[0, 1], ci=False, progress=False)
    assert seen == [0, 1]
    assert set(res.results.seed) == {0, 1}
    lb = res.leaderboard()
    assert list(lb.detector) == ["msp"]


class Picky(SignProbe):
    """Candidates with |sign| > 1 fail; ties between the others are broken by the default."""

    search_space = {"sign": [5.0, 1.0, 2.0]}

    def __init__(self, sign: float = 2.0):
        self.sign = sign

    def _fit(self, train):
        if self.sign > 2:
            raise ValueError("sign too large for this data")


def test_tune_survives_failing_candidates_and_prefers_defaults_on_ties():
    fs = _probe_set()
    tr = tune(Picky(), fs.train, fs.val_id, fs.val_ood)
    assert tr.best_params["sign"] == 2.0  # 1.0 and 2.0 tie exactly; 2.0 is the default
    failed = [c for c in tr.candidates if c.get("error")]
    assert len(failed) == 1 and "too large" in failed[0]["error"]
    with pytest.raises(ValueError, match="too large"):
        tune(Picky(), fs.train, fs.val_id, fs.val_ood, search_space={"sign": [5.0, 6.0]})


def test_runner_intervals_are_the_metrics_bootstrap(fs):
    """The runner's intervals come from `oodscope.metrics.bootstrap_replicates`: for a group
    with one OOD set they equal `evaluate(ci=True)` with the run's seed and resamples."""
    from oodscope import metrics as M

    res = run(fs, ["energy"], tune_params=False, n_boot=40, seed=3, progress=False)
    row = res.results.query("ood_set == 'near-blend'").iloc[0]
    s = res.scores["energy"]
    ref = M.evaluate(s["test_id"], s["near-blend"], ci=True, n_boot=40, seed=3)
    for m in M.CI_METRICS:
        assert row[m] == ref[m]
        assert (row[f"{m}_lo"], row[f"{m}_hi"]) == (ref[f"{m}_lo"], ref[f"{m}_hi"])


# --------------------------------------------------------------------------- stateful detectors
class StreamProbe(Detector):
    """Stateful probe: a running count of scored samples shifts every score, so the result
    depends on the stream; records resets and mixed streams."""

    name = "streamprobe"
    requires = frozenset({"features"})
    fit_fields = None
    search_space = {"scale": [1.0, 2.0]}
    stateful = True
    log: list = []

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def _fit(self, train):
        self.seen_ = 0

    def reset(self):
        StreamProbe.log.append(("reset", self.scale))
        self.seen_ = 0
        return self

    def _score(self, x):
        out = -self.scale * np.abs(x.features[:, 0].astype(np.float64)) + 1e-3 * self.seen_
        self.seen_ += len(x)
        return out

    def score_mixed(self, id_features, ood_features, seed=0, order="shuffle"):
        StreamProbe.log.append(("mixed", len(id_features), len(ood_features), seed))
        self.reset()
        both = Features.concat([id_features, ood_features])
        perm = np.random.default_rng(seed).permutation(len(both))
        s = np.empty(len(both))
        s[perm] = self.score(both[perm])
        # the ID scores of this stream carry a mark of which OOD set it was paired with
        return s[: len(id_features)] + 1e-6 * len(ood_features), s[len(id_features):]


def test_stateful_detectors_are_reset_and_scored_as_mixed_streams():
    from oodscope.metrics import evaluate

    rng = np.random.default_rng(0)

    def f(n, mu):
        return Features(features=rng.normal(mu, 1.0, (n, 2)).astype(np.float32))

    fs = FeatureSet(train=f(50, 0), val_id=f(60, 0), val_ood=f(70, 3), test_id=f(80, 0),
                    near_ood={"a": f(90, 2)}, far_ood={"b": f(40, 4)})
    StreamProbe.log.clear()
    res = run(fs, [StreamProbe()], ci=False, seed=5, progress=False)
    log = StreamProbe.log
    mixed = [e for e in log if e[0] == "mixed"]
    # tuning: one mixed stream of ID-val + val-OOD per candidate, each after a reset
    assert mixed[:2] == [("mixed", 60, 70, 5), ("mixed", 60, 70, 5)]
    assert log[0][0] == "reset"
    # test: one fresh stream per OOD set, with the test ID set and the run's seed
    assert sorted(mixed[2:]) == [("mixed", 80, 40, 5), ("mixed", 80, 90, 5)]
    # each OOD set is evaluated against the ID scores of its own stream
    det = StreamProbe(scale=res.tuning["streamprobe"]["params"]["scale"]).fit()
    for name, ood_f in (("a", fs.near_ood["a"]), ("b", fs.far_ood["b"])):
        s_id, s_ood = det.score_mixed(fs.test_id, ood_f, seed=5)
        row = res.results.query("ood_set == @name").iloc[0]
        assert row["auroc"] == pytest.approx(evaluate(s_id, s_ood)["auroc"], abs=1e-12)
        np.testing.assert_array_equal(res.scores["streamprobe"][name], s_ood)


def test_bootstrap_accepts_per_ood_id_scores():
    from oodscope.metrics import bootstrap_replicates

    rng = np.random.default_rng(1)
    a, b = rng.normal(1, 1, 50), rng.normal(0, 1, 40)
    shared = bootstrap_replicates(a, [b, b], 5, 0)
    per = bootstrap_replicates([a, a], [b, b], 5, 0)
    for m in shared:
        np.testing.assert_array_equal(shared[m], per[m])
    other = bootstrap_replicates([a, a + 5], [b, b], 5, 0)
    assert np.all(other["auroc"][:, 1] >= other["auroc"][:, 0])


# --------------------------------------------------------------------------- relation cache
def _relation_problem():
    p = _make_problem(seed=3, n_train=300, n_test=120)
    return p.train, p.val, p.test_ood


def test_relation_tuning_scores_every_pow_in_one_pass_and_matches_refits(monkeypatch):
    from oodscope.detectors.distance import Relation

    train, vi, vo = _relation_problem()
    passes = []
    real = Relation._relation_sums

    def counting(self, x, pows):
        passes.append(tuple(pows))
        return real(self, x, pows)

    monkeypatch.setattr(Relation, "_relation_sums", counting)
    space = {"pow": [1, 2, 2.5, 8, 16]}
    tr = tune(Relation(), train, vi, vo, search_space=space)
    assert tr.n_fits == 1 and len(passes) == 2  # one pass per validation split
    assert sorted(passes[0]) == sorted(float(p) for p in space["pow"])
    for row in tr.candidates:
        fresh = Relation(**row["params"]).fit(train)  # no plan, no cache: the plain computation
        from oodscope.metrics import auroc
        assert row["val_auroc"] == auroc(fresh.score(vi), fresh.score(vo))
    best = tr.detector
    ref = Relation(pow=best.pow).fit(train)
    np.testing.assert_array_equal(best.score(vo), ref.score(vo))


def test_relation_cache_is_keyed_by_queries_and_cleared_by_refit():
    from oodscope.detectors.distance import Relation

    train, vi, vo = _relation_problem()
    det = Relation(pow=2).fit(train)
    a = det.score(vi)
    np.testing.assert_array_equal(det.score(vi), a)
    assert not np.array_equal(det.score(vo)[: len(a)], a[: len(vo)])
    det.fit(train[: len(train) // 2])
    np.testing.assert_array_equal(det.score(vi), Relation(pow=2).fit(train[: len(train) // 2]).score(vi))
    for _ in range(6):  # bounded: old query sets are evicted
        det.score(vi[: 10 + _])
    assert len(det._score_cache_) <= Relation._CACHE_ENTRIES


def test_a_network_that_gets_nothing_right_still_gets_a_report(fs, tmp_path):
    """Relative robustness is undefined at 0% clean accuracy: reported as missing, no crash."""
    wrong = lambda f: f.replace(labels=(np.argmax(f.logits, 1) + 1) % f.logits.shape[1])  # noqa: E731
    bad = FeatureSet(train=fs.train, val_id=fs.val_id, val_ood=fs.val_ood, test_id=wrong(fs.test_id),
                     far_ood=fs.far_ood, covariate={k: wrong(v) for k, v in fs.covariate.items()},
                     info=dict(fs.info))
    res = run(bad, ["msp"], ci=False, progress=False)
    gen = res.info["generalization"]
    assert gen["clean_accuracy"] == 0.0 and np.isnan(gen["relative_robustness"])
    paths = res.write(tmp_path)  # the HTML report included
    assert json.loads(paths["json"].read_text())["info"]["generalization"]["relative_robustness"] is None
