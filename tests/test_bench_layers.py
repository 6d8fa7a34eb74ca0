"""Extra layers of the image benchmarks: declared in ``requires``, extracted once, pooled in the
pass (`oodscope.bench.layers`), and ``--detectors all`` on Fashion-MNIST skipping only detectors
whose inputs an image classifier cannot supply."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TEST_PARAMS
from oodscope.bench.layers import image_layer_defaults, layer_plan
from oodscope.detectors import create, get_detector_class, list_detectors
from oodscope.detectors._network import pool_layer

torch = pytest.importorskip("torch")


def _small_cnn(width: int = 8):
    from oodscope.models import SmallCNN

    torch.manual_seed(0)
    return SmallCNN(width=width).eval()


def test_defaults_name_the_stages_and_alias_the_features_container():
    kw = image_layer_defaults(_small_cnn(), (1, 28, 28))
    # SmallCNN's stages end at features.0 (28x28), .2 (14x14), .4 (7x7) and the container
    # `features` (3x3), which is named by its last child: "features" means penultimate here
    assert kw["sem"] == {"layers": ["features.0"]}
    assert kw["multilayer"] == {"layers": ["features.2", "features.4", "features.5", "features"]}
    assert kw["gram"] == {"layers": []}


def test_plan_is_the_union_once_with_each_readers_pooling():
    kwargs = {"multilayer": {"layers": ["a", "b", "features"]}, "sem": {"layers": ["c"]}}
    plan = layer_plan(["multilayer", "sem", "knn", "rankfeat"], kwargs)
    assert plan == {"a": "mean", "b": "mean", "c": "stat"}
    # two readers that pool one layer differently: the whole map is kept
    clash = layer_plan(["multilayer", "sem"], {"multilayer": {"layers": ["a"]}, "sem": {"layers": ["a"]}})
    assert clash == {"a": None}
    # a reader whose layers are not named reads nothing (the runner skips it with a reason)
    assert layer_plan(["multilayer"], {}) == {}


def test_extract_pools_layers_in_the_pass():
    from oodscope.extraction import extract

    net = _small_cnn()
    x = torch.randn(12, 1, 28, 28)
    whole = extract(net, x, layers=["features.0", "features.2"], progress=False)
    pooled = extract(net, x, layers=["features.0", "features.2"],
                     layer_pooling={"features.0": "stat", "features.2": "mean"}, progress=False)
    assert pooled.extras["layer:features.0"].shape == (12, 16)
    np.testing.assert_allclose(pooled.extras["layer:features.0"],
                               pool_layer(whole.extras["layer:features.0"], "stat"), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pooled.extras["layer:features.2"],
                               pool_layer(whole.extras["layer:features.2"], "mean"), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not in layers"):
        extract(net, x, layers=["features.0"], layer_pooling={"features.2": "mean"}, progress=False)
    with pytest.raises(ValueError, match="'mean', 'stat' or None"):
        extract(net, x, layers=["features.0"], layer_pooling={"features.0": "max"}, progress=False)


#: Fields an image classifier benchmark cannot supply, and the words of the skip reason.
_NOT_FROM_A_CLASSIFIER = {"image_embeds": "CLIP", "local_embeds": "CLIP", "text": "text",
                          "temperature": "temperature", "tag_tokens": "tag"}


def _trained_cnn(steps: int = 40):
    """A width-8 SmallCNN fitted briefly on 2,000 Fashion-MNIST images (accuracy well above chance)."""
    from oodscope import data as D
    from oodscope.bench.vision import FMNIST_MEAN, FMNIST_STD

    ds = D.load("fashion-mnist", "train")
    x = torch.as_tensor((ds.images[:2000].astype(np.float32) / 255 - FMNIST_MEAN) / FMNIST_STD)[:, None]
    y = torch.as_tensor(ds.labels[:2000]).long()
    net = _small_cnn().train()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.mark.requires_data("fashion-mnist", "mnist:test")
def test_fashion_mnist_all_extracts_each_layer_once_and_skips_only_with_reasons(tmp_path, monkeypatch):
    import oodscope.extraction as extraction
    from oodscope.bench import run_benchmark

    calls = []
    real = extraction.extract

    def spy(model, data, **kw):
        calls.append((kw["desc"], list(kw.get("layers", ())), dict(kw.get("layer_pooling") or {})))
        return real(model, data, **kw)

    monkeypatch.setattr(extraction, "extract", spy)
    # every registered detector; the two that train networks of their own get few steps
    dets = [create(n, **TEST_PARAMS[n]) if n in ("discopatch", "mol") else n for n in list_detectors()]
    res = run_benchmark("fashion-mnist", dets, tune_params=False, ci=False, progress=False,
                        provider_options={"net": _trained_cnn(), "net_meta": {}, "subset": 120,
                                          "cache_dir": tmp_path})

    # one pass per split, each layer once, pooled as its readers declare
    descs = [c[0] for c in calls]
    assert len(descs) == len(set(descs)) == len(res.info["splits"])  # train, val, val-OOD, test, OOD, covariate
    expected = {"features.0": "stat", "features.2": "mean", "features.4": "mean", "features.5": "mean"}
    for _, layers, pooling in calls:
        assert sorted(layers) == sorted(set(layers)) == sorted(expected)
        assert pooling == expected
    assert res.info["extra_layers"] == expected

    # skipped: exactly the detectors that need what a classifier cannot give, each with its reason
    want = {}
    for name in list_detectors():
        lacking = [k for k in get_detector_class(name).all_requirements() if k in _NOT_FROM_A_CLASSIFIER]
        if lacking:
            want[name] = _NOT_FROM_A_CLASSIFIER[sorted(lacking)[0]]
    want["webo"] = "VOS"  # needs the class weights a VOS-trained network learns
    assert {"mcm", "neglabel", "mlkd", "lm_ratio", "abet", "tagood"} <= set(want)
    assert set(res.skipped) == set(want), {k: v[:120] for k, v in res.skipped.items()}
    for name, word in want.items():
        assert word in res.skipped[name], (name, res.skipped[name])
    ran = {r["detector"] for r in res.rows if r["status"] == "ok"}
    assert ran == set(list_detectors()) - set(want)
    assert {"multilayer", "sem", "rankfeat", "rankweight", "mdsens", "odin", "mc_dropout"} <= ran
    assert {r["detector"] for r in res.rows if r["status"] == "skipped"} == set(want)
