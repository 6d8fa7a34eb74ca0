"""`extract`: one pass of a tiny torch model over every supported kind of data source."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodscope import Features, extract

D_IN, D_HID, C = 8, 6, 3


class Tiny(torch.nn.Module):
    """Linear → ReLU → Linear head ``fc``; counts forward calls."""

    def __init__(self, out: str = "tensor"):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.ReLU())
        self.fc = torch.nn.Linear(D_HID, C)
        self.out = out
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        logits = self.fc(self.body(x))
        if self.out == "dict":
            return {"logits": logits, "temperature": torch.sigmoid(logits[:, 0]), "scalar": logits.sum()}
        if self.out == "tuple":
            return logits, None
        return logits


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((37, D_IN)).astype(np.float32)
    y = rng.integers(0, C, 37)
    return X, y


def _reference(model, X):
    with torch.no_grad():
        h = model.body(torch.as_tensor(X))
        return h.numpy(), model.fc(h).numpy()


def _check(f: Features, model, X, y=None):
    h, logits = _reference(model, X)
    np.testing.assert_allclose(f.features, h, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f.logits, logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(f.head_weight, model.fc.weight.detach().numpy())
    np.testing.assert_array_equal(f.head_bias, model.fc.bias.detach().numpy())
    if y is None:
        assert f.labels is None
    else:
        np.testing.assert_array_equal(f.labels, y)


def test_array_input(data):
    X, _ = data
    model = Tiny()
    f = extract(model, X, batch_size=10, progress=False)
    _check(f, model, X)
    assert model.calls == 4  # ceil(37 / 10) batches, one pass
    assert f.meta["head"] == "fc"
    np.testing.assert_allclose(f.logits_from_features(), f.logits, rtol=1e-5, atol=1e-6)


def test_tensor_and_tuple_inputs(data):
    X, y = data
    model = Tiny()
    _check(extract(model, torch.as_tensor(X), batch_size=16, progress=False), model, X)
    _check(extract(model, (X, y), batch_size=16, progress=False), model, X, y)
    with pytest.raises(ValueError, match="differ in length"):
        extract(model, (X, y[:-1]), progress=False)


def test_dataloader(data):
    X, y = data
    model = Tiny()
    ds = torch.utils.data.TensorDataset(torch.as_tensor(X), torch.as_tensor(y))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
    _check(extract(model, loader, progress=False), model, X, y)


def test_dict_yielding_iterable(data):
    X, y = data
    model = Tiny()
    batches = [{"x": torch.as_tensor(X[i:i + 5]), "label": torch.as_tensor(y[i:i + 5])}
               for i in range(0, len(X), 5)]
    _check(extract(model, batches, progress=False), model, X, y)
    images = [{"image": X[i:i + 9], "labels": y[i:i + 9]} for i in range(0, len(X), 9)]
    _check(extract(model, images, progress=False), model, X, y)
    # a one-shot generator works without a cache
    _check(extract(model, ((X[i:i + 4], y[i:i + 4]) for i in range(0, len(X), 4)), progress=False),
           model, X, y)


def test_model_is_put_in_eval_mode_and_restored(data):
    X, _ = data

    class WithDropout(Tiny):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.ReLU(), torch.nn.Dropout(0.9))

    model = WithDropout().train()
    a = extract(model, X, progress=False)
    b = extract(model, X, progress=False)
    np.testing.assert_array_equal(a.logits, b.logits)  # dropout off during extraction
    assert model.training


def test_penultimate_by_name_and_extra_layers(data):
    X, _ = data
    model = Tiny()
    f = extract(model, X, penultimate="body", layers=["body.0"], progress=False)
    _check(f, model, X)  # body's output is the head's input: the head still travels
    with torch.no_grad():
        pre = model.body[0](torch.as_tensor(X)).numpy()
    np.testing.assert_allclose(f.extras["layer:body.0"], pre, rtol=1e-6, atol=1e-6)

    g = extract(model, X, penultimate="body.0", progress=False)
    np.testing.assert_allclose(g.features, pre, rtol=1e-6, atol=1e-6)
    # pre-activation features are not the head's input (same width, other values): the head
    # must not travel, or ReAct & co would compute wrong logits from them
    assert g.head_weight is None and g.head_bias is None
    _check(g.replace(features=f.features, head_weight=f.head_weight, head_bias=f.head_bias), model, X)
    deep = torch.nn.Sequential(torch.nn.Linear(D_IN, 11), torch.nn.ReLU(), torch.nn.Linear(11, 5),
                               torch.nn.ReLU(), torch.nn.Linear(5, C))
    h = extract(deep, X, penultimate="1", progress=False)
    assert h.features.shape == (len(X), 11) and h.head_weight is None
    k = extract(deep, X, penultimate="3", progress=False)
    assert k.head_weight.shape == (C, 5) and k.meta["head"] == "4"


def test_keep_inputs(data):
    X, y = data
    f = extract(Tiny(), (X, y), keep_inputs=True, progress=False)
    np.testing.assert_array_equal(f.extras["inputs"], X)
    assert "inputs" not in extract(Tiny(), X, progress=False).extras


@pytest.mark.parametrize("out", ["dict", "tuple"])
def test_structured_outputs(data, out):
    X, _ = data
    model = Tiny(out=out)
    f = extract(model, X, batch_size=10, progress=False)
    _check(f, model, X)
    if out == "dict":
        with torch.no_grad():
            logits = _reference(model, X)[1]
        np.testing.assert_allclose(f.extras["temperature"], 1 / (1 + np.exp(-logits[:, 0])), rtol=1e-5)
        assert "scalar" not in f.extras  # 0-d outputs are not per-sample


def test_float64_inputs_and_double_models(data):
    X, _ = data
    model = Tiny()
    _check(extract(model, X.astype(np.float64), progress=False), model, X)
    double = Tiny().double()
    f = extract(double, X.astype(np.float64), progress=False)
    assert f.logits.shape == (len(X), C)


def test_cache_dir_skips_the_model(tmp_path, data):
    X, y = data
    model = Tiny()
    first = extract(model, (X, y), cache_dir=tmp_path, keep_inputs=True, progress=False)
    calls = model.calls
    assert calls > 0 and len(list(tmp_path.glob("features-*.npz"))) == 1
    second = extract(model, (X, y), cache_dir=tmp_path, keep_inputs=True, progress=False)
    assert model.calls == calls, "a cache hit must not run the model"
    for name in ("logits", "features", "labels", "head_weight", "head_bias"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    np.testing.assert_array_equal(first.extras["inputs"], second.extras["inputs"])

    # other data, other options or other weights miss the cache
    extract(model, (X[:-1], y[:-1]), cache_dir=tmp_path, keep_inputs=True, progress=False)
    extract(model, (X, y), cache_dir=tmp_path, progress=False)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    third = extract(model, (X, y), cache_dir=tmp_path, keep_inputs=True, progress=False)
    assert model.calls > calls
    np.testing.assert_allclose(third.logits, first.logits + 1.0, rtol=1e-5, atol=1e-5)
    assert len(list(tmp_path.glob("features-*.npz"))) == 4


def test_cache_with_explicit_key_and_one_shot_iterables(tmp_path, data):
    X, y = data
    model = Tiny()
    gen = lambda: ((X[i:i + 8], y[i:i + 8]) for i in range(0, len(X), 8))  # noqa: E731
    a = extract(model, gen(), cache_dir=tmp_path, cache_key="train-v1", progress=False)
    calls = model.calls
    b = extract(model, gen(), cache_dir=tmp_path, cache_key="train-v1", progress=False)
    assert model.calls == calls
    np.testing.assert_array_equal(a.logits, b.logits)
    # hashing a generator would consume it before the model sees it
    with pytest.raises(ValueError, match="cache_key"):
        extract(model, gen(), cache_dir=tmp_path, progress=False)


def test_out_dir_streams_in_chunks(tmp_path, data):
    X, y = data
    model = Tiny(out="dict")
    in_ram = extract(model, (X, y), batch_size=4, keep_inputs=True, layers=["body.0"], progress=False)
    streamed = extract(model, (X, y), batch_size=4, keep_inputs=True, layers=["body.0"],
                       out_dir=tmp_path / "bank", chunk_size=10, progress=False)
    for name in ("logits", "features", "labels", "head_weight", "head_bias"):
        np.testing.assert_array_equal(getattr(in_ram, name), getattr(streamed, name))
    assert sorted(in_ram.extras) == sorted(streamed.extras) == ["inputs", "layer:body.0", "temperature"]
    for k in in_ram.extras:
        np.testing.assert_array_equal(in_ram.extras[k], streamed.extras[k])

    def mapped(arr):
        while arr is not None:
            if isinstance(arr, np.memmap):
                return True
            arr = getattr(arr, "base", None)
        return False

    assert mapped(streamed.features) and mapped(streamed.logits) and mapped(streamed.extras["inputs"])
    assert not (tmp_path / "bank" / "_chunks").exists()
    again = Features.load(tmp_path / "bank", mmap=True)
    np.testing.assert_array_equal(again.features, in_ram.features)


def test_float16_features(data):
    X, _ = data
    f = extract(Tiny(), X, feature_dtype="float16", progress=False)
    assert f.features.dtype == np.float16 and f.logits.dtype == np.float32


def test_clear_errors(data):
    X, _ = data
    model = Tiny()
    with pytest.raises(ValueError, match="No module named 'bodyy'"):
        extract(model, X, penultimate="bodyy", progress=False)
    with pytest.raises(ValueError, match="No module named 'nope'"):
        extract(model, X, layers=["body.0", "nope"], progress=False)
    with pytest.raises(ValueError, match="No module named 'head2'"):
        extract(model, X, head="head2", progress=False)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        extract(model, X, head="body", progress=False)
    with pytest.raises(ValueError, match="no data"):
        extract(model, X[:0], progress=False)
    with pytest.raises(ValueError, match="no data"):
        extract(model, [], progress=False)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        extract(lambda x: x, X, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        extract(model, X, batch_size=0, progress=False)
    assert model.calls == 0
