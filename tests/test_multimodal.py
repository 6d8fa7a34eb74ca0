"""MultiOOD: Hellinger, A2D without the true class, NP-Mix queues and mixing by hand, a toy
two-modality training run, and score fusion across modalities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oodscope as ood
from oodscope.train.multimodal import (MULTIOOD_PROTOCOLS, ModalityScoreFusion, MultiModalNet, NPMix, a2d_loss,
                                       drop_true_class, hellinger, normalized_entropy, train_multimodal,
                                       two_view_images)


def test_hellinger_by_hand():
    p = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    q = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    pc, qc = np.clip(p.numpy(), 1e-6, None), np.clip(q.numpy(), 1e-6, None)
    rows = np.sqrt(((np.sqrt(pc) - np.sqrt(qc)) ** 2).sum(1)) / np.sqrt(2)
    assert float(hellinger(p, q)) == pytest.approx(rows.mean(), rel=1e-6)
    assert float(hellinger(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))) == pytest.approx(1.0, abs=1e-3)


def test_a2d_ignores_the_true_class():
    y = torch.tensor([1, 0])
    za = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    zb = torch.tensor([[2.0, 9.0, 0.0], [-1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(drop_true_class(za, y).numpy(), [[0.0, 1.0], [0.0, 0.0]])
    expected = -hellinger(F.softmax(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), 1),
                          F.softmax(torch.tensor([[2.0, 0.0], [1.0, 0.0]]), 1))
    assert float(a2d_loss([za, zb], y)) == pytest.approx(float(expected), rel=1e-6)
    zb2 = zb.clone()
    zb2[0, 1] = -30.0  # the true-class logit does not enter A2D
    assert float(a2d_loss([za, zb2], y)) == pytest.approx(float(expected), rel=1e-6)
    assert float(a2d_loss([za, za], y)) == pytest.approx(0.0, abs=1e-6)
    for d in ("l1", "l2"):
        assert float(a2d_loss([za, zb], y, d)) < 0
    with pytest.raises(ValueError, match="distance"):
        a2d_loss([za, zb], y, "cosine")


def test_normalized_entropy_bounds():
    assert float(normalized_entropy(torch.zeros(1, 5))) == pytest.approx(1.0)
    assert float(normalized_entropy(torch.tensor([[50.0, 0.0, 0.0]]))) < 1e-6


def test_npmix_queues_and_mixes_neighbouring_classes():
    mix = NPMix(3, 1, queue_size=2, nn_k=2, alpha=10.0)
    mix.update(torch.tensor([[0.0], [1.0], [10.0], [0.0], [1.0]]), torch.tensor([0, 1, 2, 0, 1]))
    assert not mix.ready
    with pytest.raises(ValueError, match="not full"):
        mix.sample()
    mix.update(torch.tensor([[10.0], [5.0]]), torch.tensor([2, 0]))  # class 0 is full: 5 pushes out the first 0
    assert mix.ready
    np.testing.assert_array_equal(mix.queue[0, :, 0].numpy(), [0.0, 5.0])
    mix.queue[0] = 0.0  # constant queues: class 0 at 0, class 1 at 1, class 2 at 10
    out = mix.sample()[:, 0].numpy()
    assert 0.0 < out[0] < 1.0  # class 0 mixes with its nearest prototype, class 1
    assert 0.0 < out[1] < 1.0  # class 1's nearest is class 0 (distance 1 < 9)
    assert 1.0 < out[2] < 10.0  # class 2 mixes with class 1


def _toy_views(rng, n, c=4, ood=False):
    d = 8
    means_a, means_b = np.eye(c, d) * 3, np.roll(np.eye(c, d), 2, axis=1) * 3
    if ood:  # no class signal in either view
        return rng.normal(0, 1.2, (n, d)), rng.normal(0, 1.2, (n, d)), -np.ones(n, int)
    y = rng.integers(0, c, n)
    return means_a[y] + rng.normal(0, 1.2, (n, d)), means_b[y] + rng.normal(0, 1.2, (n, d)), y


def _net(seed=0):
    torch.manual_seed(seed)
    return MultiModalNet([nn.Sequential(nn.Linear(8, 16), nn.ReLU()) for _ in range(2)], [16, 16], 4)


def test_toy_training_with_a2d_and_npmix():
    rng = np.random.default_rng(0)
    a, b, y = _toy_views(rng, 320)
    ta, tb, ty = _toy_views(rng, 200)
    oa, ob, _ = _toy_views(rng, 200, ood=True)
    base, a2d = _net(), _net()
    train_multimodal(base, [a, b], y, epochs=5, lr=3e-3, batch_size=32, a2d_weight=0.0, npmix=False)
    hist = train_multimodal(a2d, [a, b], y, epochs=5, lr=3e-3, batch_size=32, a2d_weight=1.0, npmix=True,
                            queue_size=16, start_epoch=2)
    assert {"ce", "a2d", "np_entropy", "np_a2d"} <= set(hist[-1]) and "np_entropy" not in hist[0]
    with torch.no_grad():
        ins = [torch.tensor(ta, dtype=torch.float32), torch.tensor(tb, dtype=torch.float32)]
        out_b, out_a = base(ins), a2d(ins)
        outs = a2d([torch.tensor(oa, dtype=torch.float32), torch.tensor(ob, dtype=torch.float32)])
    yt = torch.tensor(ty)
    assert (out_a["logits"].argmax(1) == yt).float().mean() > 0.8
    # A2D: the modality heads disagree more off the true class than without it
    assert -float(a2d_loss(out_a["modality_logits"], yt)) > -float(a2d_loss(out_b["modality_logits"], yt))
    msp = ood.create("msp").fit()
    s_id = msp.score(ood.Features(logits=out_a["logits"].numpy()))
    s_ood = msp.score(ood.Features(logits=outs["logits"].numpy()))
    assert ood.metrics.auroc(s_id, s_ood) > 0.8  # fused-logit MSP: ID above signal-free inputs


def test_training_rejects_bad_inputs():
    rng = np.random.default_rng(0)
    a, b, y = _toy_views(rng, 20)
    with pytest.raises(ValueError, match="one row per label"):
        train_multimodal(_net(), [a, b[:10]], y, epochs=1)
    with pytest.raises(ValueError, match="class indices"):
        train_multimodal(_net(), [a, b], y + 10, epochs=1)
    with pytest.raises(ValueError, match="modality inputs"):
        _net()([torch.zeros(2, 8)])
    with pytest.raises(ValueError, match=">= 2 modalities"):
        MultiModalNet([nn.Identity()], [8], 3)


def test_score_fusion_by_hand_and_per_sample():
    fus = ModalityScoreFusion("zscore").fit([[1.0, 3.0], [10.0, 30.0]])  # means 2, 20; stds 1, 10
    np.testing.assert_allclose(fus.score([[2.0, 4.0], [20.0, 0.0]]), [0.0, (2.0 - 2.0) / 2])
    rank = ModalityScoreFusion("rank", weights=[3, 1]).fit([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0]])
    # 2.5 sits above 2 of 4 -> 0.5; 3.0 ties one of 4, mid-rank -> (3 + 4) / 8
    np.testing.assert_allclose(rank.transform([[2.5], [3.0]]), [[0.5, 7 / 8]])
    np.testing.assert_allclose(rank.score([[2.5], [3.0]]), [0.75 * 0.5 + 0.25 * 7 / 8])
    batch = fus.score([[0.0, 1.0, 2.0], [5.0, 6.0, 7.0]])
    one = [fus.score([[v], [w]])[0] for v, w in zip([0.0, 1.0, 2.0], [5.0, 6.0, 7.0])]
    np.testing.assert_allclose(batch, one)
    with pytest.raises(ValueError, match="finite"):
        fus.score([[np.nan], [1.0]])
    with pytest.raises(ValueError, match="2 score vectors"):
        fus.score([[1.0]])
    with pytest.raises(ValueError, match="method"):
        ModalityScoreFusion("mean").fit([[1.0], [2.0]])
    with pytest.raises(ValueError, match="not fitted"):
        ModalityScoreFusion().score([[1.0], [2.0]])


def test_two_views_and_protocol_table():
    img = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    top, bottom = two_view_images(img)
    np.testing.assert_allclose(top[0], np.arange(6) / 255.0)
    np.testing.assert_allclose(bottom[1], np.arange(18, 24) / 255.0)
    with pytest.raises(ValueError, match="H, W"):
        two_view_images(np.zeros((3, 4)))
    assert MULTIOOD_PROTOCOLS["near/HMDB51"]["id_classes"] + MULTIOOD_PROTOCOLS["near/HMDB51"]["ood_classes"] == 51
