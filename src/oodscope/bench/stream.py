"""The streaming protocol: a benchmark whose ID and OOD distributions shift stage by stage.

A `FeatureSet` may carry ``stream``: a list of `StreamStage` (e.g. Fashion-MNIST-C severities
1 → 5; each stage = test ID images under that shift, OOD images under the same shift, and
optionally a few labelled ID samples of the new distribution, the support set). After the
runner has fitted and tuned a detector on the ordinary splits, `score_stream` scores it
stage by stage and `stream_rows` adds one row per stage (``mode="stream"``,
``group="stream"``) and their unweighted mean (``"stream (mean)"``) to the results table.

How a detector sees a stage follows what it declares:

* adaptive (it has ``adapt(support)`` and ``reset()``, e.g. MOL): reset to its fitted state,
  adapt on the stage's support set (when there is one), then score the stage's ID and OOD;
* ``stateful`` (a test-time memory, e.g. AdaNeg): ``score_mixed`` — reset, then the stage's
  ID and OOD as one seeded interleaved stream;
* otherwise: plain ``score`` of each set.

Every stage starts from ``reset()``, so a stage's numbers do not depend on the stages before
it, and the detector is reset again after the stream.

`build_fashion_mnist_stream` builds the registered ``fashion-mnist-c-stream`` benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..features import Features
from ..metrics import evaluate
from .results import result_row
from .spec import BenchmarkSpec, FeatureSet, ProviderOptions

__all__ = ["STREAM_MEAN", "StreamStage", "build_fashion_mnist_stream", "is_adaptive", "score_stream",
           "stream_rows"]

#: the ``ood_set`` name of the mean row over the stages
STREAM_MEAN = "stream (mean)"


@dataclass
class StreamStage:
    """One stage of a shifting stream: ``test_id`` and ``ood`` under the stage's shift, and an
    optional labelled ``support`` set of the stage's ID distribution (for adaptive detectors)."""

    name: str
    test_id: Features
    ood: Features
    support: Features | None = None


def is_adaptive(det: Any) -> bool:
    """Whether ``det`` adapts to a new distribution from a few labelled samples (``adapt``)."""
    return callable(getattr(det, "adapt", None))


def _stage_scores(det: Any, stage: StreamStage, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if is_adaptive(det):
        det.reset()
        if stage.support is not None:
            det.adapt(stage.support)
        return det.score(stage.test_id), det.score(stage.ood)
    return det.score_mixed(stage.test_id, stage.ood, seed=seed)


def score_stream(det: Any, stages: Sequence[StreamStage], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(id_scores, ood_scores)]`` per stage (see the module docstring for how a detector
    sees a stage); the detector is reset afterwards."""
    if not stages:
        raise ValueError("score_stream needs at least one StreamStage.")
    try:
        return [_stage_scores(det, st, seed) for st in stages]
    finally:
        det.reset()


def stream_rows(benchmark: str, seed: int, name: str, det: Any, stages: Sequence[StreamStage],
                params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Result rows (``mode="stream"``): the metrics of every stage, then their mean."""
    scores = score_stream(det, stages, seed)
    rows, per = [], []
    for st, (s_id, s_ood) in zip(stages, scores):
        m = evaluate(s_id, s_ood)
        per.append(m)
        rows.append(result_row(benchmark, "stream", seed, name, st.name, "stream", m, n_id=s_id.size,
                               n_ood=s_ood.size, params=params))
    mean = {k: float(np.mean([m[k] for m in per])) for k in per[0]}
    rows.append(result_row(benchmark, "stream", seed, name, STREAM_MEAN, "stream_mean", mean,
                           n_id=int(sum(s.size for s, _ in scores)), n_ood=int(sum(o.size for _, o in scores)),
                           params=params))
    return rows


# --------------------------------------------------------------------------- fashion-mnist-c-stream
def _domain_features(ex: Any, base: Any, kinds: Sequence[str], severities: Sequence[int], per_domain: int,
                     seed: int) -> Features:
    """Clean training images (domain 0) and corrupted copies of ``per_domain`` of them per
    kind × severity (domains 1..), with ``extras["domain"]``: what MOL meta-learns over."""
    from .. import data as D

    f = ex("train", base)
    parts = [f.replace(extras={**f.extras, "domain": np.zeros(len(f), np.int64)})]
    for i, (kind, sev) in enumerate(((k, s) for k in kinds for s in severities), start=1):
        ds = D.corrupted_dataset(base.sample(min(per_domain, len(base)), seed=seed + i), kind, sev, seed=seed + i)
        f = ex(f"train-{kind}-s{sev}", ds)
        parts.append(f.replace(extras={**f.extras, "domain": np.full(len(f), i, np.int64)}))
    return Features.concat(parts)


def build_fashion_mnist_stream(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """Fashion-MNIST with a shifting Fashion-MNIST-C stream; see `fashion-mnist-c-stream` in
    `oodscope.bench.catalog` and the module docstring."""
    from dataclasses import replace

    from .. import data as D
    from .extract import ImageExtractor, check_model, load_network, model_normalization
    from .vision import FMNIST_MEAN, FMNIST_STD, fashion_mnist_splits

    p = dict(spec.params)
    seed = options.seed

    def reference():
        from ..train import reference_model

        net, meta = reference_model("fashion-mnist", cache_dir=options.cache_dir, train_if_missing=True,
                                    seed=seed)
        return net, dict(meta or {}), "the reference CNN (oodscope.train.reference_model)"

    net, meta, source = load_network(options, reference, spec.name)
    check_model(net, 10, (1, 28, 28), source)
    mean, std = model_normalization(meta, FMNIST_MEAN, FMNIST_STD)
    sp = fashion_mnist_splits(replace(options, ood=("mnist",)), meta, val_size=p.get("val_size", 5000))
    ex = ImageExtractor(net, mean, std, options)
    per_domain = int(p["per_domain"]) if options.subset is None else min(int(p["per_domain"]), options.subset // 5)
    train = _domain_features(ex, sp["train"], p["train_kinds"], p["severities"], max(per_domain, 10), seed)

    # stage images: a seeded part of the test splits; support shots from the rest of the test split
    test = D.load("fashion-mnist", "test", root=options.data_root)
    mnist = D.load("mnist", "test")
    n_stage = int(p["stage_size"]) if options.subset is None else min(int(p["stage_size"]), options.subset)
    perm = np.random.default_rng(seed).permutation(len(test))
    stage_id, pool = test.subset(np.sort(perm[:n_stage])), perm[n_stage:]
    stage_ood = mnist.sample(min(n_stage, len(mnist)), seed=seed)
    shots = int(p["shots"])
    support = None
    if shots:
        pick = np.concatenate([pool[test.labels[pool] == c][:shots] for c in range(10)])
        support = test.subset(np.sort(pick))
    stages = []
    for j, (kind, sev) in enumerate(((k, s) for k in p["stream_kinds"] for s in p["severities"])):
        name = f"{kind} s{sev}"
        s = seed + 1000 + j
        stages.append(StreamStage(
            name, ex(f"stream-id-{name}", D.corrupted_dataset(stage_id, kind, sev, seed=s)),
            ex(f"stream-ood-{name}", D.corrupted_dataset(stage_ood, kind, sev, seed=s + 500)),
            ex(f"stream-support-{name}", D.corrupted_dataset(support, kind, sev, seed=s + 900))
            if support is not None else None))
    fs = FeatureSet(train=train, val_id=ex("val_id", sp["val_id"]), val_ood=ex("val_ood", sp["val_ood"]),
                    test_id=ex("test_id", sp["test_id"]), far_ood={"mnist": ex("mnist", sp["far"]["mnist"])})
    fs.stream = stages
    fs.info.update(
        model=source, normalization={"mean": mean, "std": std}, notes=sp["notes"],
        ood_descriptions={"mnist": "MNIST test split, clean (the stream's stages are in the stream table)"},
        stream={"stages": [st.name for st in stages], "stage_id": n_stage, "stage_ood": len(stage_ood),
                "support_per_class": shots, "train_domains": 1 + len(p["train_kinds"]) * len(p["severities"]),
                "per_domain": max(per_domain, 10)},
        **ex.info(),
    )
    fs.detector_kwargs["*"] = {"model": net, "input_std": std}
    if options.subset is not None:  # --quick / --subset: a shorter meta-training for MOL
        fs.detector_kwargs["mol"] = {"meta_iters": int(p.get("quick_meta_iters", 60))}
        fs.info["notes"] = [*sp["notes"], f"subset run: MOL meta-trains for {p.get('quick_meta_iters', 60)} "
                                          "iterations (default 300)"]
    return fs
