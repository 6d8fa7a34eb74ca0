"""HVCM representation learning: the heads, the loss terms by hand, gradient routing, the
mixture-weight EMA, and a tiny end-to-end run whose Features feed the gmm detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import oodscope as ood
from oodscope.train import create_objective, list_objectives
from oodscope.train.hvcm import HVCM, HVCMHead, attach_hvcm_head, extract_hvcm, hvcm_terms


class _Net(nn.Module):
    def __init__(self, d_in=6, width=16, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def _log_softmax(a):
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


def test_registered_with_gmm_as_its_detector():
    assert "hvcm" in list_objectives()
    obj = create_objective("hvcm")
    assert obj.default_detector == "gmm" and obj.detector_params == {"n_chunks": 32}
    assert (obj.num_components, obj.attribute_dim, obj.bottleneck_dim) == (32, 1024, 256)


def test_head_outputs_unit_cosine_attributes_and_mixture_weights():
    torch.manual_seed(0)
    net = attach_hvcm_head(_Net(), 3, attribute_dim=12, num_components=4, bottleneck_dim=5)
    assert isinstance(net.fc, HVCMHead) and attach_hvcm_head(net, 3) is net  # idempotent
    from oodscope.extraction import find_head

    assert find_head(net)[1] is net.fc.linear  # the classifier is still the network's head
    x = torch.randn(7, 6)
    out = net(x)
    head = net.fc
    h = net.body(x)
    u = torch.nn.functional.normalize(head.bottleneck(h), dim=1)
    v = torch.nn.functional.normalize(head.attribute.weight, dim=1)
    torch.testing.assert_close(out["attributes"], u @ v.T)
    torch.testing.assert_close(out["logits"], head.linear(h))
    torch.testing.assert_close(out["mixture_weights"].sum(1), torch.ones(7))
    assert out["attributes"].abs().max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="multiple"):
        attach_hvcm_head(_Net(), 3, attribute_dim=10, num_components=4)


def test_loss_terms_match_a_hand_computation():
    rng = np.random.default_rng(0)
    b, k, per, c = 5, 3, 4, 2
    q = rng.standard_normal((b, k * per))
    w = rng.standard_normal((b, k))
    centres = rng.standard_normal((c, k, per))
    y = np.array([0, 1, 1, 0, 1])
    t = hvcm_terms(torch.tensor(q), torch.tensor(w), torch.tensor(centres), torch.tensor(y), 0.5, 0.25)
    lq = _log_softmax(q.reshape(b, k, per))
    lc = _log_softmax(centres[y])
    kl_x = 0.5 * (np.exp(lc) * (lc - lq)).sum(-1)   # KL(centre || q)
    kl_c = 0.25 * (np.exp(lq) * (lq - lc)).sum(-1)  # KL(q || centre)
    pi = np.exp(_log_softmax(w))
    np.testing.assert_allclose(t["kl_x"].numpy(), kl_x, rtol=1e-10)
    np.testing.assert_allclose(t["kl_c"].numpy(), kl_c, rtol=1e-10)
    assert t["centre"].item() == pytest.approx(np.clip(kl_x + kl_c, 1e-5, 1e5).mean(), rel=1e-10)
    assert t["weights"].item() == pytest.approx((kl_x * pi).mean(), rel=1e-10)


def test_each_kl_moves_only_its_own_side():
    q = torch.randn(4, 6, requires_grad=True)
    centres = torch.randn(2, 3, 2, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1])
    t = hvcm_terms(q, w, centres, y, 1.0, 1.0)
    gq, gc = torch.autograd.grad(t["kl_x"].sum(), [q, centres], allow_unused=True)
    assert gq is not None and gq.abs().sum() > 0 and (gc is None or gc.abs().sum() == 0)
    gq, gc = torch.autograd.grad(t["kl_c"].sum(), [q, centres], allow_unused=True)
    assert (gq is None or gq.abs().sum() == 0) and gc.abs().sum() > 0
    gq, gw = torch.autograd.grad(t["weights"], [q, w], allow_unused=True)
    assert (gq is None or gq.abs().sum() == 0) and gw.abs().sum() > 0  # only the weight head learns


def test_mixture_weight_ema_by_hand():
    torch.manual_seed(0)
    net = _Net()
    obj = HVCM(num_components=2, attribute_dim=4, bottleneck_dim=3, gamma=0.5)
    obj.setup(net, 3)
    before = obj.mixture_ema_.clone()
    x, y = torch.randn(6, 6), torch.tensor([0, 0, 1, 1, 1, 0])
    obj.loss(net, x, y)
    probs = net(x)["mixture_weights"].detach()
    for c in (0, 1):
        torch.testing.assert_close(obj.mixture_ema_[c], 0.5 * probs[y == c].mean(0) + 0.5 * before[c])
    torch.testing.assert_close(obj.mixture_ema_[2], before[2])  # class 2 was not in the batch


def test_bad_hyperparameters_and_missing_setup_raise():
    with pytest.raises(ValueError, match="alpha"):
        HVCM(alpha=-1.0).setup(_Net(), 3)
    with pytest.raises(ValueError, match="gamma"):
        HVCM(gamma=2.0).setup(_Net(), 3)
    with pytest.raises(ValueError, match="num_components"):
        HVCM(num_components=0).setup(_Net(), 3)
    with pytest.raises(ValueError, match="setup"):
        HVCM().loss(_Net(), torch.randn(2, 6), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="classes"):
        HVCM().setup(_Net(classes=3), 5)
    with pytest.raises(ValueError, match="HVCM objective"):
        extract_hvcm(_Net(), torch.randn(3, 6))


def _blobs(n, rng, means, ood=False):
    if ood:
        return torch.tensor(rng.standard_normal((n, 6)) * 0.3 + 6.0, dtype=torch.float32), None
    y = rng.integers(0, 3, n)
    return torch.tensor(means[y] + 0.5 * rng.standard_normal((n, 6)), dtype=torch.float32), torch.tensor(y)


def test_trained_features_feed_gmm_and_far_ood_scores_lower():
    from oodscope.train import fit

    rng = np.random.default_rng(0)
    means = rng.standard_normal((3, 6)) * 3
    x, y = _blobs(600, rng, means)
    torch.manual_seed(0)
    net = _Net()
    obj = HVCM(num_components=4, attribute_dim=16, bottleneck_dim=8, alpha=1.0, beta=0.1)
    net, history = fit(net, (x, y), objective=obj, epochs=5, lr=1e-2, batch_size=64, progress=False)
    train = extract_hvcm(net, (x, y), progress=False)
    assert train.features.shape == (600, 16) and train.extras["mixture_weights"].shape == (600, 4)
    assert train.head_weight is None  # the features are not the classifier's input
    det = ood.create(obj.default_detector, **obj.detector_params).fit(train)
    xt, yt = _blobs(200, rng, means)
    xo, _ = _blobs(200, rng, means, ood=True)
    s_id = det.score(extract_hvcm(net, (xt, yt), progress=False))
    s_ood = det.score(extract_hvcm(net, xo, progress=False))
    assert ood.metrics.auroc(s_id, s_ood) > 0.95
    acc = (extract_hvcm(net, (xt, yt), progress=False).logits.argmax(1) == yt.numpy()).mean()
    assert acc > 0.9
