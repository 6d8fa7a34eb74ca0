"""Ray backend: extraction and scoring on a local Ray cluster equal the local path.

One local Ray (``ray.init(num_cpus=2)``) is shared by the whole test session; every test
runs on it and compares with the local path to 1e-6.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray backend needs the 'ray' extra")
pytest.importorskip("ray.data", reason="the Ray backend needs ray[data] (pyarrow)")
torch = pytest.importorskip("torch")

import oodscope as ood
from oodscope import Features, distributed
from oodscope.cli import main as cli_main

from detector_examples import fitted_example

# the model builders below travel to the workers by value (tests/ is not on their path)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3)).eval()


@pytest.fixture(scope="session")
def cluster():
    with distributed.ray_session(num_cpus=2) as r:
        yield r


@pytest.mark.parametrize("name", ["knn", "glmcm"])  # glmcm reads a 3-D extra (local_embeds)
def test_scoring_on_workers_equals_local(cluster, name):
    det, _, x = fitted_example(name)
    x = Features.concat([x] * 3)  # several blocks and batches per worker
    local = det.score(x)
    remote = distributed.score(det, x, num_workers=2, batch_size=37)
    assert remote.dtype == np.float64 and remote.shape == local.shape
    np.testing.assert_allclose(remote, local, rtol=1e-6, atol=1e-6)
    ds = distributed.to_dataset(x, block_rows=64)  # the same rows as a Ray Dataset
    assert ds.count() == len(x) and distributed.ROW in ds.columns()
    assert set(ds.columns()) == {distributed.ROW, *distributed._per_sample_columns(x)}


def test_guard_decisions_on_workers_and_cli(cluster, tmp_path):
    det, _, x = fitted_example("vim")
    g = ood.Guard(det, n_boot=0).calibrate(x)
    local = g.decide(x)
    out = distributed.score(g, x, num_workers=2, batch_size=16)
    np.testing.assert_allclose(out["scores"], local["scores"], rtol=1e-6, atol=1e-6)
    assert np.array_equal(out["accept"], local["accept"])
    np.testing.assert_allclose(out["p_values"], local["p_values"], rtol=1e-6, atol=1e-6)

    g.save(tmp_path / "guard")
    x.save(tmp_path / "x.npz")
    assert cli_main(["score", str(tmp_path / "guard"), "--features", str(tmp_path / "x.npz"),
                     "--out", str(tmp_path / "s.csv"), "--ray", "--ray-workers", "2"]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "s.csv")
    np.testing.assert_allclose(table["score"], local["scores"], rtol=1e-6, atol=1e-6)
    assert table["accept"].tolist() == local["accept"].tolist()


def test_refusals(cluster):
    det, _, x = fitted_example("adaneg")
    with pytest.raises(ValueError, match="stateful"):
        distributed.score(det, x)
    with pytest.raises(ValueError, match="fitted|fit"):
        distributed.score(ood.create("knn"), x)
    with pytest.raises(ValueError, match="num_workers"):
        distributed.score(fitted_example("msp")[0], x, num_workers=0)
    with pytest.raises(ValueError, match="local"):
        distributed.extract(_tiny_net, np.zeros((4, 3, 4), np.float32), out_dir="/tmp/x")


def test_extraction_on_workers_equals_local(cluster):
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((130, 3, 4)).astype(np.float32)
    labels = np.arange(130) % 3
    local = ood.extract(_tiny_net(), (inputs, labels), batch_size=64, layers=["1"], progress=False)
    remote = distributed.extract(_tiny_net, inputs, labels=labels, num_workers=2, batch_size=25,
                                 block_rows=40, layers=["1"])
    for name in ("features", "logits"):
        np.testing.assert_allclose(getattr(remote, name), getattr(local, name), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(remote.extras["layer:1"], local.extras["layer:1"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(remote.head_weight, local.head_weight)
    np.testing.assert_array_equal(remote.head_bias, local.head_bias)
    assert remote.labels.tolist() == labels.tolist()
    assert remote.meta == local.meta
    # a detector fitted on the remote features scores like the one fitted on the local ones
    a = ood.create("vim", dim=4).fit(remote).score(remote)
    np.testing.assert_allclose(a, ood.create("vim", dim=4).fit(local).score(local), rtol=1e-6)


def test_extraction_from_a_ray_dataset_keeps_its_order(cluster):
    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((90, 12)).astype(np.float32)
    ds = ray.data.from_numpy(inputs).repartition(5)  # column "data"
    local = ood.extract(_tiny_net(), inputs, batch_size=90, progress=False)
    remote = distributed.extract(_tiny_net, ds, input_column="data", batch_size=16)
    np.testing.assert_allclose(remote.features, local.features, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(remote.logits, local.logits, rtol=1e-6, atol=1e-6)
    assert remote.labels is None


def test_bench_scores_on_workers_equal_local(cluster, tmp_path, monkeypatch):
    import pandas as pd
    from test_bench_cli import _feature_set  # also registers the 'synthetic-test' benchmark

    from oodscope.bench.runner import run

    calls = []
    real = distributed.score
    monkeypatch.setattr(distributed, "score", lambda *a, **k: calls.append(k) or real(*a, **k))
    fs = _feature_set(n=120)
    local = run(fs, "knn,vim", ci=False, progress=False)
    remote = run(fs, "knn,vim", ci=False, progress=False, ray_workers=2)
    assert not remote.skipped and set(remote.scores) == {"knn", "vim"}
    # test ID and the 2 test OOD sets of each detector
    assert len(calls) == 6 and {k["num_workers"] for k in calls} == {2}
    for det, sets in local.scores.items():
        for name, s in sets.items():
            np.testing.assert_allclose(remote.scores[det][name], s, rtol=1e-6, atol=1e-6)

    tables = []
    for extra in ([], ["--ray", "--ray-workers", "2"]):
        out = tmp_path / ("ray" if extra else "local")
        assert cli_main(["bench", "synthetic-test", "--detectors", "knn", "--n-boot", "0", "--no-report",
                         "--subset", "100", "--out", str(out), *extra]) == 0
        tables.append(pd.read_csv(out / "results.csv"))
    assert len(calls) == 9
    np.testing.assert_allclose(tables[1]["auroc"], tables[0]["auroc"], rtol=1e-6, atol=1e-6)
