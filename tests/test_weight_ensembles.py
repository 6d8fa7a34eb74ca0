"""Weight-space ensembles (WiSE-FT, uniform soups, BANG) and accuracy under covariate shift."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

import oodscope as ood
from oodscope import Features

torch = pytest.importorskip("torch")

from oodscope import generalization as G  # noqa: E402
from oodscope.train import weight_ensembles as W  # noqa: E402


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _problem(n=96, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (np.eye(3, 4)[y] * 2 + 0.5 * rng.normal(size=(n, 4))).astype(np.float32)
    return torch.as_tensor(x), torch.as_tensor(y)


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_wise_ft_endpoints_midpoint_and_integer_buffers():
    a, b = _net(0), _net(1)
    b[2].num_batches_tracked += 7
    for k, want in ((0.0, a), (1.0, b)):
        got = _params(W.wise_ft(a, b, k))
        for name, v in _params(want).items():
            if v.is_floating_point():
                torch.testing.assert_close(got[name], v, rtol=0, atol=1e-7)
    mid = _params(W.wise_ft(a, b, 0.25))
    pa, pb = _params(a), _params(b)
    torch.testing.assert_close(mid["1.weight"], 0.75 * pa["1.weight"] + 0.25 * pb["1.weight"])
    assert int(mid["2.num_batches_tracked"]) == int(pb["2.num_batches_tracked"])  # from the fine-tuned model
    assert W.wise_ft(a, b, 0.5) is not b and torch.equal(_params(a)["1.weight"], pa["1.weight"])  # inputs untouched
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        W.wise_ft(a, b, 1.5)
    with pytest.raises(ValueError, match="different parameters"):
        W.wise_ft(a, torch.nn.Sequential(torch.nn.Linear(4, 3)), 0.5)
    soup = _params(W.average_weights([a, b], [0.25, 0.75]))
    torch.testing.assert_close(soup["4.bias"], 0.25 * pa["4.bias"] + 0.75 * pb["4.bias"])
    with pytest.raises(ValueError, match="sum to 1"):
        W.average_weights([a, b], [0.5, 0.6])


def test_recompute_batchnorm_estimates_the_interpolated_networks_statistics():
    x, y = _problem()
    m = W.wise_ft(_net(0), _net(1), 0.5)
    W.recompute_batchnorm(m, (x, y), batch_size=len(x))
    with torch.no_grad():
        h = m[1](m[0](x))
    torch.testing.assert_close(m[2].running_mean, h.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m[2].running_var, h.var(0, unbiased=True), rtol=1e-4, atol=1e-6)
    assert not m.training and m[2].momentum == 0.1


def test_mixup_smoothing_loss_matches_its_definition():
    x, y = _problem(16)
    model = _net(0).eval()
    obj = W.MixupSmoothing(mixup_alpha=0.0, smoothing=0.2)
    obj.setup(model, 3)
    loss, _ = obj.loss(model, x, y)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.2))
    obj = W.MixupSmoothing(mixup_alpha=0.4, smoothing=0.1, seed=3)
    obj.setup(model, 3)
    loss, logs = obj.loss(model, x, y)
    rng = np.random.default_rng(3)
    lam = rng.beta(0.4, 0.4)
    perm = torch.as_tensor(rng.permutation(16))
    t = torch.full((16, 3), 0.1 / 3).scatter(1, y[:, None], 0.9 + 0.1 / 3)
    t = lam * t + (1 - lam) * t[perm]
    want = -(t * torch.log_softmax(model(lam * x + (1 - lam) * x[perm]), 1)).sum(1).mean()
    assert logs["lambda"] == pytest.approx(lam)
    torch.testing.assert_close(loss, want)
    assert type(ood.train.create_objective("mixup_ls")) is W.MixupSmoothing


def test_finetune_and_ensemble_returns_the_line_between_pretrained_and_finetuned():
    x, y = _problem()
    pre = _net(0)
    before = _params(pre)
    models, ft, history = W.finetune_and_ensemble(pre, (x, y), "wise-ft", (0.0, 0.5, 1.0), epochs=2, lr=1e-2,
                                                  batch_size=32, progress=False, bn_data=(x, y))
    assert all(torch.equal(v, before[k]) for k, v in _params(pre).items())
    torch.testing.assert_close(_params(models[1.0])["1.weight"], _params(ft)["1.weight"])
    torch.testing.assert_close(_params(models[0.0])["4.weight"], before["4.weight"])
    assert history["train_loss"][-1] < history["train_loss"][0]
    bang, _, _ = W.finetune_and_ensemble(pre, (x, y), "bang", (0.5,), epochs=1, batch_size=32, progress=False)
    assert set(bang) == {0.5}
    with pytest.raises(ValueError, match="wise-ft"):
        W.finetune_and_ensemble(pre, (x, y), "swa")
    with pytest.raises(ValueError, match="objective"):
        W.finetune_and_ensemble(pre, (x, y), "bang", objective=W.MixupSmoothing())


@pytest.mark.requires_data("fashion-mnist")
def test_train_cli_writes_wise_ft_interpolations(tmp_path, capsys):
    from oodscope.cli import main
    from oodscope.models.checkpoint import load_checkpoint

    quick = ["--train-subset", "256", "--test-subset", "200", "--epochs", "1", "--max-steps", "3", "--quiet"]
    assert main(["train", "fashion-mnist", *quick, "--out", str(tmp_path / "pre")]) == 0
    init = tmp_path / "pre" / "model.safetensors"
    assert main(["train", "fashion-mnist", *quick, "--init", str(init), "--weight-ensemble", "wise-ft",
                 "--alpha", "0", "1", "--out", str(tmp_path / "ft")]) == 0
    out = capsys.readouterr().out
    assert "wise-ft alpha=0: test accuracy" in out and "wise-ft alpha=1: test accuracy" in out
    pre, _ = load_checkpoint(init)
    ft, meta = load_checkpoint(tmp_path / "ft" / "model.safetensors")
    a0, m0 = load_checkpoint(tmp_path / "ft" / "model-wise-ft-a0.safetensors")
    a1, _ = load_checkpoint(tmp_path / "ft" / "model-wise-ft-a1.safetensors")
    for k, v in pre.state_dict().items():
        if v.is_floating_point():  # integer buffers (BatchNorm's step count) come from the fine-tuned model
            torch.testing.assert_close(a0.state_dict()[k], v)
            torch.testing.assert_close(a1.state_dict()[k], ft.state_dict()[k])
    assert m0["weight_ensemble"]["alpha"] == 0.0 and meta["init"] == str(init)
    assert meta["normalization"] == load_checkpoint(init)[1]["normalization"]  # the init's normalisation kept
    assert main(["train", "fashion-mnist", *quick, "--weight-ensemble", "bang", "--method", "oe",
                 "--init", str(init)]) == 2


# ----------------------------------------------------------------------------- generalization
def test_shift_accuracies_summary_and_table_from_cached_features():
    y = np.array([0, 1, 2, 1])
    clean = Features(logits=np.eye(3)[y] * 2.0, labels=y)
    s1 = Features(logits=np.eye(3)[[0, 1, 0, 0]], labels=y)
    acc = G.shift_accuracies(clean, {"synthetic-mixed/s1": s1, "fmnist-c": s1})
    assert acc == {"clean": 1.0, "synthetic-mixed/s1": 0.5, "fmnist-c": 0.5}
    assert G.shift_summary(acc) == {"clean_accuracy": 1.0, "mean_shift_accuracy": 0.5, "relative_robustness": 0.5}
    table = G.shift_table(acc)
    assert table.loc[1, "kind"] == "synthetic-mixed" and table.loc[1, "severity"] == 1
    assert np.isnan(table.loc[2, "severity"]) and table["relative"].tolist() == [1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="labels"):
        G.shift_accuracies(clean, {"x": Features(logits=np.eye(3))})
    with pytest.raises(ValueError, match="shifted set"):
        G.shift_summary({"clean": 1.0})


def _write_idx(path, arr, gz):
    arr = np.asarray(arr, np.uint8)
    header = np.array([0x0801 if arr.ndim == 1 else 0x0803, len(arr), *arr.shape[1:]], dtype=">i4").tobytes()
    raw = header + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("layout", ["ubyte-uncompressed", "ubyte-gzip", "npy"])
def test_load_fmnist_c_reads_the_published_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)
    root = tmp_path / "fmnist-c"
    if layout == "npy":  # generated/npy holds (N, 28, 28, 1) uint8 arrays
        (root / "generated/npy").mkdir(parents=True)
        np.save(root / "generated/npy/fmnist-c-test.npy", images.astype(np.uint8)[..., None])
        np.save(root / "generated/npy/fmnist-c-test-labels.npy", labels.astype(np.uint8))
    else:  # the release writes raw IDX bytes under a .gz name; accept real gzip too
        gz = layout == "ubyte-gzip"
        _write_idx(root / "generated/ubyte/fmnist-c-test-ubyte.gz", images, gz)
        _write_idx(root / "generated/ubyte/fmnist-c-test-labels-ubyte.gz", labels, gz)
    ds = G.load_fmnist_c("test", root=tmp_path)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.classes[0] == "T-shirt/top" and ds.name == "fmnist-c/test"


def test_covariate_shift_sets_name_their_source_and_list_missing_files(tmp_path):
    rng = np.random.default_rng(0)
    clean = ood.data.ImageDataset(rng.integers(0, 256, (8, 28, 28)).astype(np.uint8), rng.integers(0, 10, 8),
                                  list(G.FASHION_MNIST_CLASSES), name="fashion-mnist/test")
    with pytest.raises(FileNotFoundError, match="fmnist-c-test-ubyte.gz"):
        G.covariate_shift_sets(clean, "published", root=tmp_path)
    sets = G.covariate_shift_sets(clean, "auto", severities=(1, 5), root=tmp_path)
    assert sorted(sets) == ["synthetic-mixed/s1", "synthetic-mixed/s5"]
    assert all(np.array_equal(s.labels, clean.labels) for s in sets.values())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    acc = G.accuracy_under_shift(model, clean, sets, mean=[0.5], std=[0.5])
    assert sorted(acc) == ["clean", "synthetic-mixed/s1", "synthetic-mixed/s5"] and all(0 <= v <= 1 for v in acc.values())
