"""DisCoPatch: patch cutting and PatchNorm by hand, an image's score independent of the
batch it is scored in, the sign on a covariate shift, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oodscope as ood
from oodscope import Features
from oodscope.detectors.discopatch import DisCoPatch, _build_nets, _cut, as_images, patch_positions


def test_cut_takes_the_pixels_at_the_corners():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    shared = _cut(x, np.array([[0, 0], [2, 3]]), 2)
    assert shared.shape == (4, 1, 2, 2)
    np.testing.assert_array_equal(shared[1, 0].numpy(), [[13, 14], [18, 19]])  # image 0 at (2, 3)
    np.testing.assert_array_equal(shared[2, 0].numpy(), [[25, 26], [30, 31]])  # image 1 at (0, 0)
    own = _cut(x, np.array([[[1, 1]], [[3, 0]]]), 2)  # each image its own corner
    np.testing.assert_array_equal(own[0, 0].numpy(), [[6, 7], [11, 12]])
    np.testing.assert_array_equal(own[1, 0].numpy(), [[40, 41], [45, 46]])


def test_patch_positions_stay_inside_and_refuse_big_patches():
    pos = patch_positions(6, 9, 4, 200, np.random.default_rng(0))
    assert pos[:, 0].max() == 2 and pos[:, 1].max() == 5 and pos.min() == 0
    with pytest.raises(ValueError, match="patch_size"):
        patch_positions(6, 9, 7, 1, np.random.default_rng(0))


def test_patchnorm_uses_each_images_own_patch_statistics():
    torch.manual_seed(0)
    disc, _ = _build_nets(1, 4, (2,), 3)
    norm = disc.norms[0]
    x = torch.randn(6, 2, 2, 2, dtype=torch.float32)  # 2 images x 3 patches, 2 channels
    out = norm(x, group=3)
    first = x[:3, 0]  # image 0, channel 0: statistics over its 3 patches x 2 x 2 pixels
    expected = (first - first.mean()) / torch.sqrt(first.var(unbiased=False) + 1e-5)
    np.testing.assert_allclose(out[:3, 0].detach().numpy(), expected.numpy(), atol=1e-6)
    whole = norm(x)  # training: one batch
    allc0 = x[:, 0]
    np.testing.assert_allclose(whole[:, 0].detach().numpy(),
                               ((allc0 - allc0.mean()) / torch.sqrt(allc0.var(unbiased=False) + 1e-5)).numpy(),
                               atol=1e-6)


def _smooth_images(n, rng, side=16):
    """ID: smooth random waves; the covariate shift adds strong pixel noise to them."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    f = rng.uniform(0.5, 2.0, (n, 2))
    ph = rng.uniform(0, 2 * np.pi, (n, 2))
    img = (np.sin(2 * np.pi * f[:, 0, None, None] * xx + ph[:, 0, None, None])
           + np.cos(2 * np.pi * f[:, 1, None, None] * yy + ph[:, 1, None, None]))
    return (img / 2).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    train = Features(extras={"inputs": _smooth_images(300, rng)})
    clean = _smooth_images(60, rng)
    noisy = clean + 0.6 * rng.standard_normal(clean.shape).astype(np.float32)
    det = ood.create("discopatch", patch_size=8, steps=40, batch_images=16, test_patches=8).fit(train)
    return det, clean, noisy


def test_sign_covariate_shift_scores_lower(trained):
    det, clean, noisy = trained
    s_id = det.score(Features(extras={"inputs": clean}))
    s_shift = det.score(Features(extras={"inputs": noisy}))
    assert s_id.dtype == np.float64 and np.all((s_id >= 0) & (s_id <= 1))
    assert ood.metrics.auroc(s_id, s_shift) > 0.9


def test_an_images_score_does_not_depend_on_its_batch(trained):
    det, clean, noisy = trained
    mixed = np.concatenate([clean[:5], noisy[:20]])
    batch = det.score(Features(extras={"inputs": mixed}))
    alone = np.array([det.score(Features(extras={"inputs": mixed[i:i + 1]}))[0] for i in range(len(mixed))])
    np.testing.assert_allclose(batch, alone, rtol=1e-5, atol=1e-6)
    det.batch_size = 3  # chunking does not matter either
    np.testing.assert_allclose(det.score(Features(extras={"inputs": mixed})), batch, rtol=1e-5, atol=1e-6)


def test_flat_and_channel_inputs_are_the_same_images():
    x = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(as_images(x.reshape(3, -1)), as_images(x[:, None]))
    with pytest.raises(ValueError, match="square"):
        as_images(np.zeros((2, 10)))
    with pytest.raises(ValueError, match="image inputs"):
        as_images(np.zeros((2, 1, 1, 4, 4)))


@pytest.mark.parametrize("params, match", [
    ({"patch_size": 0}, "patch_size"), ({"test_patches": 1}, "test_patches"), ({"hidden_dims": ()}, "hidden_dims"),
    ({"lr": 0.0}, "lr"), ({"steps": 2.5}, "steps"), ({"patch_size": 20}, "patch_size"),
])
def test_bad_parameters_raise(params, match):
    train = Features(extras={"inputs": np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)})
    with pytest.raises(ValueError, match=match):
        DisCoPatch(**{"steps": 1, **params}).fit(train)


def test_constant_images_and_other_sizes_raise(trained):
    with pytest.raises(ValueError, match="same value"):
        DisCoPatch(steps=1).fit(Features(extras={"inputs": np.ones((4, 16, 16), np.float32)}))
    det = trained[0]
    with pytest.raises(ValueError, match="width"):
        det.score(Features(extras={"inputs": np.zeros((2, 12, 12), np.float32)}))
