"""Ray backend: extraction and scoring on a local Ray cluster equal the local path."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

import oodscope as ood
from oodscope import Features, distributed

from detector_examples import fitted_example


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3)).eval()


@pytest.fixture(scope="module")
def cluster():
    with distributed.ray_session(num_cpus=2) as r:
        yield r


def test_scoring_on_workers_equals_local(cluster):
    det, _, x = fitted_example("knn")
    x = Features.concat([x] * 3)  # 240 rows, several batches per worker
    local = det.score(x)
    remote = distributed.score(det, x, num_workers=2, batch_size=50)
    np.testing.assert_allclose(remote, local, rtol=1e-6, atol=1e-6)


def test_guard_decisions_on_workers(cluster):
    det, train, x = fitted_example("vim")
    g = ood.Guard(det, n_boot=0).calibrate(x)
    out = distributed.score(g, x, num_workers=2, batch_size=16)
    local = g.decide(x)
    np.testing.assert_allclose(out["scores"], local["scores"], rtol=1e-6, atol=1e-6)
    assert np.array_equal(out["accept"], local["accept"])
    np.testing.assert_allclose(out["p_values"], local["p_values"])


def test_stateful_detectors_are_refused(cluster):
    det, _, x = fitted_example("adaneg")
    with pytest.raises(ValueError, match="stateful"):
        distributed.score(det, x)


def test_extraction_on_workers_equals_local(cluster, tmp_path):
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((130, 3, 4)).astype(np.float32)
    local = ood.extract(_tiny_net(), inputs, batch_size=64, progress=False)
    remote = distributed.extract(_tiny_net, inputs, labels=np.arange(130) % 3, num_workers=2,
                                 batch_size=25)
    np.testing.assert_allclose(remote.features, local.features, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(remote.logits, local.logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(remote.head_weight, local.head_weight)
    assert remote.labels.tolist() == (np.arange(130) % 3).tolist()
    # and the detector fitted on remote features scores like the local one
    a = ood.create("energy").fit().score(remote)
    np.testing.assert_allclose(a, ood.create("energy").fit().score(local), rtol=1e-6)
