"""The streaming protocol (`oodscope.bench.stream`) and the fashion-mnist-c-stream benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from oodscope import metrics
from oodscope.bench import ProviderOptions, get_benchmark
from oodscope.bench.runner import run
from oodscope.bench.stream import STREAM_MEAN, StreamStage, build_fashion_mnist_stream, score_stream
from oodscope.detectors.base import Detector

from test_bench_runner import _feature_set


class AdaptProbe(Detector):
    """score = feature[0] + offset; ``adapt`` sets the offset to the support's label mean and
    logs every call, so the test sees the order reset -> adapt -> score per stage."""

    name = "adaptprobe"
    requires = frozenset({"features"})
    fit_fields = frozenset({"features"})
    sign_test_exempt = "test probe"

    def __init__(self):
        pass

    def _fit(self, train):
        self.offset_, self.calls_ = 0.0, []

    def reset(self):
        self.offset_ = 0.0
        self.calls_.append("reset")
        return self

    def adapt(self, support):
        self.offset_ = float(np.mean(support.labels))
        self.calls_.append(f"adapt{len(support)}")
        return self

    def _score(self, x):
        self.calls_.append("score")
        return np.asarray(x.features[:, 0], dtype=np.float64) + self.offset_


def _stage(fs, name, shift, support=True):
    """A stage from the FeatureSet's test ID and far-OOD Features, features shifted by ``shift``."""
    def shifted(f):
        return f.replace(features=(f.features + shift).astype(np.float32))

    sup = fs.train[:4].replace(labels=np.array([0, 1, 1, 2])) if support else None
    return StreamStage(name, shifted(fs.test_id[:80]), shifted(fs.far_ood["far-noise"][:60]), sup)


def test_stream_rows_per_stage_and_mean_reset_and_adapt_order():
    fs = _feature_set(n=100)
    stages = [_stage(fs, "s1", 0.0), _stage(fs, "s2", 1.0, support=False), _stage(fs, "s3", -0.5)]
    fs.stream = stages
    probe = AdaptProbe()
    res = run(fs, [probe, "msp"], ci=False, tune_params=False, progress=False)
    df = res.results
    st = df[(df["mode"] == "stream") & (df.detector == "adaptprobe")].set_index("ood_set")
    assert list(st.index) == ["s1", "s2", "s3", STREAM_MEAN]
    # the adaptive probe adds the support's label mean (1.0) on stages with support only
    for s in stages:
        off = 1.0 if s.support is not None else 0.0
        want = metrics.evaluate(s.test_id.features[:, 0] + off, s.ood.features[:, 0] + off)
        assert st.loc[s.name, "auroc"] == pytest.approx(want["auroc"])
        assert st.loc[s.name, "fpr_at_95_tpr"] == pytest.approx(want["fpr_at_95_tpr"])
    assert st.loc[STREAM_MEAN, "auroc"] == pytest.approx(st.loc[["s1", "s2", "s3"], "auroc"].mean())
    assert set(df[df["mode"] == "stream"].detector) == {"adaptprobe", "msp"}  # stateless ones too
    # the leaderboard and report have a stream table
    assert "stream (mean) AUROC" in res.leaderboard("stream").columns
    from oodscope.report import render_report

    assert 'id="stream"' in render_report(res)


def test_score_stream_resets_before_every_stage_and_after():
    fs = _feature_set(n=100)
    probe = AdaptProbe().fit(fs.train)
    score_stream(probe, [_stage(fs, "a", 0.0), _stage(fs, "b", 1.0, support=False)])
    assert probe.calls_ == ["reset", "adapt4", "score", "score", "reset", "score", "score", "reset"]
    with pytest.raises(ValueError, match="at least one"):
        score_stream(probe, [])


def test_stream_benchmark_is_registered():
    spec = get_benchmark("fashion-mnist-c-stream")
    assert spec.far == ("mnist",) and "mol" in spec.default_detectors
    assert set(spec.params["stream_kinds"]).isdisjoint(spec.params["train_kinds"])  # stages are unseen shifts


@pytest.mark.requires_data("fashion-mnist", "mnist:test")
def test_fashion_mnist_c_stream_end_to_end(tmp_path):
    import torch

    from oodscope.models.nets import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN(width=4, feature_dim=16).eval()  # random weights: the plumbing, not a result
    spec = get_benchmark("fashion-mnist-c-stream").with_params(
        train_kinds=("blur",), stream_kinds=("jpeg",), severities=(1, 5), shots=2, val_size=200)
    fs = build_fashion_mnist_stream(spec, ProviderOptions(net=net, subset=60, cache_dir=tmp_path, progress=False,
                                                          fields={"logits", "features", "labels", "head"}))
    assert [s.name for s in fs.stream] == ["jpeg s1", "jpeg s5"]
    assert len(fs.stream[0].test_id) == 60 and len(fs.stream[0].ood) == 60 and len(fs.stream[0].support) == 20
    assert set(np.unique(fs.train.extras["domain"])) == {0, 1, 2}  # clean + blur s1, s5
    from oodscope.detectors.mol import MOL

    mol = MOL(meta_iters=5, tasks_per_iter=2, support_size=8, query_size=16)
    res = run(fs, ["energy", mol], benchmark=spec.name, ci=False, tune_params=False, progress=False)
    st = res.results[res.results["mode"] == "stream"]
    assert set(st.detector) == {"energy", "mol"}
    assert st.auroc.between(0, 1).all() and len(st) == 2 * 3
    assert res.info["stream"]["stages"] == ["jpeg s1", "jpeg s5"]


class BrokenAdapt(AdaptProbe):
    name = "brokenadapt"

    def adapt(self, support):
        raise ValueError("cannot adapt")


def test_a_detector_that_fails_on_the_stream_keeps_its_ordinary_rows():
    fs = _feature_set(n=100)
    fs.stream = [_stage(fs, "s1", 0.0)]
    res = run(fs, [BrokenAdapt()], ci=False, tune_params=False, progress=False)
    df = res.results
    assert (df[(df.detector == "brokenadapt") & (df["mode"] == "standard")].status == "ok").any()
    assert not (df["mode"] == "stream").any()
    assert "cannot adapt" in res.skipped["brokenadapt (stream)"]
