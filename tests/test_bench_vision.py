"""Vision benchmark definitions on real (small) Fashion-MNIST data, and the OpenOOD protocols."""

from __future__ import annotations

import numpy as np
import pytest

from oodscope.bench import ProviderOptions, get_benchmark
from oodscope.bench.openood import OPENOOD_PROTOCOLS
from oodscope.bench.runner import resolve, run, run_benchmark
from oodscope.bench.vision import build_fashion_mnist, build_openood
from oodscope.data import box_blur, patch_shuffle


def fashion_mnist(val_size=5000, **options):
    return build_fashion_mnist(get_benchmark("fashion-mnist").with_params(val_size=val_size),
                               ProviderOptions(**options))


def openood(name, **options):
    return build_openood(get_benchmark(name), ProviderOptions(**options))


def test_patch_shuffle_and_blur_keep_pixels_but_destroy_shape():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    sh = patch_shuffle(imgs, grid=4, seed=1)
    assert sh.shape == imgs.shape and sh.dtype == np.uint8
    assert (np.sort(sh.reshape(5, -1), 1) == np.sort(imgs.reshape(5, -1), 1)).all()  # same pixels
    assert (sh != imgs).any()
    bl = box_blur(imgs, 2, 3)
    assert bl.shape == imgs.shape and bl.dtype == np.uint8
    assert bl.std() < imgs.std() / 2  # heavily smoothed
    const = np.full((1, 28, 28), 77, np.uint8)
    assert (box_blur(const) == 77).all()


@pytest.fixture(scope="module")
def tiny_net():
    """A small CNN trained for a few dozen steps on 2000 Fashion-MNIST images."""
    import torch

    from oodscope import data
    from oodscope.models.nets import SmallCNN

    train = data.load("fashion-mnist", "train").sample(2000, seed=0)
    torch.manual_seed(0)
    net = SmallCNN(width=8, feature_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(1):
        for x, y in data.loader(train, batch_size=64, shuffle=True, mean=0.286, std=0.353):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    return net.eval()


@pytest.mark.requires_data("fashion-mnist", "mnist:test")
def test_fashion_mnist_end_to_end(tiny_net, tmp_path):
    fs = fashion_mnist(net=tiny_net, net_meta={"normalization": {"mean": 0.286, "std": 0.353}},
                       subset=400, cache_dir=tmp_path, fields={"logits", "features", "labels", "head"},
                       progress=False, val_size=1000)
    assert "mnist" in fs.far_ood and "gaussian-noise" in fs.far_ood and "uniform-noise" in fs.far_ood
    assert "fashion-mnist-c" in fs.covariate
    assert len(fs.train) == 400 and len(fs.val_id) == 400 and len(fs.val_ood) == 400
    assert "inputs" not in fs.fields()  # not asked for, not stored
    assert set(fs.info["timings"]) >= {"train", "test_id", "mnist"}
    # kmnist / notmnist are not in the shared data: skipped with a note, not an error
    assert any("kmnist" in n for n in fs.info["notes"])
    res = run(fs, ["msp", "energy", "gradnorm"], benchmark="fashion-mnist", n_boot=10,
              full_spectrum=True, progress=False)
    df = res.results
    ok = df[(df.status == "ok") & (df["mode"] == "standard")]
    assert set(ok.detector) == {"msp", "energy", "gradnorm"}
    assert res.info["id_accuracy"] > 0.6
    assert ok[ok.ood_set == "far (mean)"].auroc.between(0, 1).all()
    assert (df["mode"] == "full-spectrum").any()
    paths = res.write(tmp_path / "out")
    assert paths["html"].stat().st_size > 10_000
    # second call: features come from the cache (no new extraction files)
    n_cached = len(list((tmp_path / "features").glob("*.npz")))
    fashion_mnist(net=tiny_net, subset=400, cache_dir=tmp_path, progress=False, val_size=1000,
                  fields={"logits"})
    assert len(list((tmp_path / "features").glob("*.npz"))) == n_cached


@pytest.mark.requires_data("fashion-mnist")
def test_fashion_mnist_errors(tiny_net, tmp_path):
    import torch

    from oodscope.models.nets import SmallCNN

    with pytest.raises(ValueError, match="Unknown OOD set.*mnist"):
        run_benchmark("fashion-mnist", ["msp"], ood="svhn")
    wrong = SmallCNN(num_classes=7, width=4, feature_dim=8)
    with pytest.raises(ValueError, match="7.*10 classes|does not match"):
        fashion_mnist(net=wrong, subset=50, cache_dir=tmp_path, progress=False)
    rgb = SmallCNN(in_channels=3, width=4, feature_dim=8)
    with pytest.raises(ValueError, match="cannot process"):
        fashion_mnist(net=rgb, subset=50, cache_dir=tmp_path, progress=False)
    del torch


@pytest.mark.parametrize("name", sorted(OPENOOD_PROTOCOLS))
def test_openood_protocols_fail_clearly_without_data(name, tmp_path):
    with pytest.raises(ValueError, match="--model"):
        openood(name, data_root=tmp_path)
    with pytest.raises(FileNotFoundError) as exc:
        openood(name, model="m.safetensors", data_root=tmp_path)
    msg = str(exc.value)
    proto = OPENOOD_PROTOCOLS[name]
    assert str(tmp_path / proto.lists["val_ood"]) in msg
    for ood_name in (*proto.near, *proto.far):
        assert f"test_{ood_name}" in msg


def test_openood_protocol_definitions_match_anchors():
    c10 = OPENOOD_PROTOCOLS["cifar10"]
    assert set(c10.near) == {"cifar100", "tin"} and set(c10.far) == {"mnist", "svhn", "texture", "places365"}
    assert "tin" in c10.lists["val_ood"]
    inet = OPENOOD_PROTOCOLS["imagenet"]
    assert set(inet.near) == {"ssb_hard", "ninco"}
    assert set(inet.far) == {"inaturalist", "textures", "openimage_o"}
    assert "openimage_o" in inet.lists["val_ood"] and len(inet.covariate) == 3


def test_model_normalization_reads_reference_meta_and_plain_keys():
    from oodscope.bench.extract import model_normalization

    assert model_normalization({"normalization": {"mean": [0.1], "std": [0.2]}}, 0.5, 0.6) == ([0.1], [0.2])
    assert model_normalization({"mean": 0.3, "std": 0.4}, 0.5, 0.6) == (0.3, 0.4)
    assert model_normalization({}, 0.5, 0.6) == (0.5, 0.6)
    assert model_normalization(None, 0.5, 0.6) == (0.5, 0.6)


def test_openood_with_vlm_runs_its_clip_twin():
    spec = resolve("imagenet", ProviderOptions(vlm="hf:some/clip", class_names=["a", "b"]))
    assert spec.name == "imagenet-vlm" and spec.params["protocol"] == "imagenet"
    assert spec.near == get_benchmark("imagenet").near and spec.far == get_benchmark("imagenet").far
    assert resolve("imagenet", ProviderOptions(model="m.pt")).name == "imagenet"
    with pytest.raises(ValueError, match="not both"):
        resolve("imagenet", ProviderOptions(vlm="hf:x", model="m.pt"))
    with pytest.raises(ValueError, match="--vlm"):
        resolve("imagenet", ProviderOptions(model="m.pt", class_names=["a"]))
    with pytest.raises(ValueError, match="--encoder"):
        resolve("imagenet", ProviderOptions(encoder="x"))


def test_bench_imagenet_with_vlm_fails_on_missing_data_before_loading_the_model(tmp_path, capsys):
    from oodscope.bench.catalog import VLM_DETECTORS
    from oodscope.cli import main

    assert get_benchmark("imagenet-vlm").default_detectors == VLM_DETECTORS
    # the model spec does not exist: reaching the loader would give a different error
    rc = main(["bench", "imagenet", "--vlm", "hf:/no/such/clip", "--data-root", str(tmp_path),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "OpenOOD v1.5 image lists" in err and str(tmp_path / "benchmark_imglist") in err


@pytest.mark.requires_data("fashion-mnist")
def test_fashion_mnist_uses_the_checkpoints_held_out_indices_as_id_val():
    from oodscope import data as D
    from oodscope.bench.vision import fashion_mnist_splits

    held = np.arange(3, 303, 3)
    sp = fashion_mnist_splits(ProviderOptions(ood=["gaussian-noise"]), {"val_indices": held.tolist()},
                              noise_size=10)
    train_all = D.load("fashion-mnist", "train")
    np.testing.assert_array_equal(sp["val_id"].images, train_all.images[held])
    assert len(sp["train"]) == len(train_all) - len(held)
    assert not any("random held-out" in n for n in sp["notes"])
