"""Training-time OOD objectives: hand-computed losses, gradient steps, invariants, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from oodscope.train import create_objective, list_objectives
from oodscope.train.heads import AbeTHead, ZScoreHead
from oodscope.train.objectives import (ASCOOD, AbeT, LogitNorm, MixOE, OutlierExposure, PALM,
                                       cutmix_box, mix_batch, sinkhorn)

C = 3


class TinyNet(nn.Module):
    """Flatten -> Linear -> ReLU -> fc, on 1x6x6 images; forward returns fc(features)."""

    def __init__(self, num_classes=C, width=8):
        super().__init__()
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(36, width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return self.embed(x)

    def forward(self, x):
        return self.fc(self.forward_features(x))


def _batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.arange(n) % C
    x_out = torch.rand(n, 1, 6, 6, generator=g, dtype=torch.float64)
    return x, y, x_out


def _net(seed=0):
    torch.manual_seed(seed)
    return TinyNet().double()


def _np_logits(net, x):
    """Logits by hand (numpy, float64) for the plain TinyNet."""
    w1 = net.embed[1].weight.detach().numpy()
    b1 = net.embed[1].bias.detach().numpy()
    h = np.maximum(x.reshape(len(x), -1).numpy() @ w1.T + b1, 0)
    return h @ net.fc.weight.detach().numpy().T + net.fc.bias.detach().numpy(), h


def _lse(a):
    m = a.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]


def _ce(logits, y):
    return float(np.mean(_lse(logits) - logits[np.arange(len(y)), y]))


def _step_decreases(objective, net, x, y, x_out=None, lr=0.05, seed=0, reset=None):
    params = list(net.parameters()) + list(objective.parameters())
    torch.manual_seed(seed)
    loss, _ = objective.loss(net, x, y, x_out)
    for p in params:
        p.grad = None
    loss.backward()
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * p.grad
    if reset is not None:
        reset()
    torch.manual_seed(seed)
    after, _ = objective.loss(net, x, y, x_out)
    assert after.item() < loss.item(), (loss.item(), after.item())


def test_registry_lists_every_method():
    assert {"ce", "oe", "mixoe", "logitnorm", "abet", "palm", "ascood"} <= set(list_objectives())
    assert isinstance(create_objective("MixOE", alpha=2.0), MixOE)


# ------------------------------------------------------------------ Outlier Exposure
def test_oe_matches_hand_computation_and_descends():
    net, (x, y, xo) = _net(), _batch()
    oe = OutlierExposure(lam=0.5)
    oe.setup(net, C)
    loss, logs = oe.loss(net, x, y, xo)
    li, _ = _np_logits(net, x)
    lo, _ = _np_logits(net, xo)
    uniform_ce = float(np.mean(_lse(lo) - lo.mean(axis=1)))
    assert loss.item() == pytest.approx(_ce(li, y) + 0.5 * uniform_ce, rel=1e-9)
    assert logs["outlier"] == pytest.approx(uniform_ce, rel=1e-9)
    _step_decreases(oe, net, x, y, xo)


def test_energy_oe_matches_hand_computation():
    net, (x, y, xo) = _net(1), _batch(seed=1)
    oe = OutlierExposure(regularizer="energy", lam_energy=0.1, m_in=-1.0, m_out=0.5)
    oe.setup(net, C)
    loss, _ = oe.loss(net, x, y, xo)
    li, _ = _np_logits(net, x)
    lo, _ = _np_logits(net, xo)
    e_in, e_out = -_lse(li), -_lse(lo)
    reg = np.mean(np.maximum(e_in + 1.0, 0) ** 2) + np.mean(np.maximum(0.5 - e_out, 0) ** 2)
    assert reg > 0
    assert loss.item() == pytest.approx(_ce(li, y) + 0.1 * reg, rel=1e-9)
    _step_decreases(oe, net, x, y, xo)


def test_outlier_objectives_reject_missing_or_misshapen_outliers():
    net, (x, y, xo) = _net(), _batch()
    for obj in (OutlierExposure(), MixOE()):
        obj.setup(net, C)
        with pytest.raises(ValueError, match="needs auxiliary outliers"):
            obj.loss(net, x, y, None)
        with pytest.raises(ValueError, match="needs auxiliary outliers"):
            obj.loss(net, x, y, xo[:0])
        with pytest.raises(ValueError, match="image_shape"):
            obj.loss(net, x, y, torch.rand(4, 3, 6, 6, dtype=x.dtype))


def test_nan_loss_names_the_step_and_cause():
    net, (x, y, xo) = _net(), _batch()
    oe = OutlierExposure()
    oe.setup(net, C)
    oe.loss(net, x, y, xo)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="step 2"):
        oe.loss(net, bad, y, xo)


# ------------------------------------------------------------------ MixOE
def test_mixup_targets_sum_to_one_and_move_to_uniform():
    x, y, xo = _batch()
    mixed, target, _ = mix_batch(x, y, xo, 0.3, C, "mixup")
    assert torch.allclose(target.sum(1), torch.ones(len(x), dtype=target.dtype))
    assert torch.allclose(mixed, 0.3 * x + 0.7 * xo)
    assert float(target[0, y[0]]) == pytest.approx(0.3 + 0.7 / C)
    _, t_uniform, _ = mix_batch(x, y, xo, 0.0, C, "mixup")
    assert torch.allclose(t_uniform, torch.full_like(t_uniform, 1 / C))


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_cutmix_lambda_equals_area_ratio(lam):
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(4, 1, 10, 10, dtype=torch.float64)
    xo = torch.ones(4, 1, 10, 10, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    mixed, target, real = mix_batch(x, y, xo, lam, C, "cutmix", generator=g)
    outlier_share = float(mixed[0].mean())  # pixels taken from the outlier are ones
    assert real == pytest.approx(1 - outlier_share)
    assert torch.allclose(target.sum(1), torch.ones(4, dtype=target.dtype))
    assert float(target[1, 1]) == pytest.approx(real + (1 - real) / C)
    top, bottom, left, right = cutmix_box(10, 10, lam, torch.Generator().manual_seed(3))
    assert (bottom - top) * (right - left) <= math.ceil((1 - lam) * 100) + 1e-9


def test_mixoe_matches_hand_computation_and_descends():
    net, (x, y, xo) = _net(2), _batch(seed=2)
    obj = MixOE(alpha=1.0, beta=5.0)
    obj.setup(net, C)
    torch.manual_seed(5)
    loss, logs = obj.loss(net, x, y, xo)
    lam = logs["lam"]
    li, _ = _np_logits(net, x)
    lm, _ = _np_logits(net, lam * x + (1 - lam) * xo)
    target = lam * np.eye(C)[y.numpy()] + (1 - lam) / C
    soft = float(np.mean(-(target * (lm - _lse(lm)[:, None])).sum(1)))
    assert loss.item() == pytest.approx(_ce(li, y) + 5.0 * soft, rel=1e-9)
    _step_decreases(obj, net, x, y, xo, lr=0.02, seed=5)


# ------------------------------------------------------------------ LogitNorm
def test_logitnorm_matches_hand_computation_and_descends():
    net, (x, y, _) = _net(3), _batch(seed=3)
    obj = LogitNorm(tau=0.5)
    obj.setup(net, C)
    loss, _ = obj.loss(net, x, y)
    li, _ = _np_logits(net, x)
    scaled = li / (0.5 * (np.linalg.norm(li, axis=1, keepdims=True) + 1e-7))
    assert loss.item() == pytest.approx(_ce(scaled, y), rel=1e-9)
    _step_decreases(obj, net, x, y)
    with pytest.raises(ValueError, match="tau"):
        LogitNorm(tau=0).setup(net, C)


# ------------------------------------------------------------------ AbeT
def test_abet_head_loss_matches_hand_computation():
    net, (x, y, _) = _net(4), _batch(seed=4)
    obj = AbeT()
    obj.setup(net, C)
    assert isinstance(net.fc, AbeTHead)
    net.double()
    out = net(x)
    assert set(out) == {"logits", "temperature"}
    loss, _ = obj.loss(net, x, y)
    _, h = _np_logits(_net(4), x)  # same embedding weights (same seed), by hand
    head = net.fc
    w = head.cosine.weight.detach().numpy()
    f = (h / np.linalg.norm(h, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    lin = h @ head.temperature[0].weight.detach().numpy().T + head.temperature[0].bias.detach().numpy()
    bn = head.temperature[1]
    v = (lin - lin.mean()) / np.sqrt(lin.var() + bn.eps) * bn.weight.item() + bn.bias.item()
    t = 1 / (1 + np.exp(-v))
    assert loss.item() == pytest.approx(_ce(f / t, y), rel=1e-7)
    np.testing.assert_allclose(out["logits"].detach().numpy(), f, rtol=1e-9, atol=1e-12)
    _step_decreases(obj, net, x, y)


def test_abet_temperature_in_unit_interval_even_at_extremes():
    torch.manual_seed(0)
    head = AbeTHead(8, C)
    head.train()
    h = torch.randn(64, 8) * torch.logspace(-3, 3, 64).unsqueeze(1)
    with torch.no_grad():
        head.temperature[1].weight.fill_(1e4)
        t = head(h)["temperature"]
    assert torch.all(t > 0) and torch.all(t <= 1)
    assert t.shape == (64,)


def test_abet_rejects_incompatible_head():
    class NoFc(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="'fc'"):
        AbeT().setup(NoFc(), C)
    net = _net()
    net.fc = nn.Sequential(nn.Linear(8, C))
    with pytest.raises(ValueError, match="AbeTHead"):
        AbeT().setup(net, C)


# ------------------------------------------------------------------ PALM
def _np_sinkhorn(scores, eps, iters):
    q = np.exp(scores / eps).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def test_sinkhorn_is_doubly_stochastic():
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(32, 8, generator=g, dtype=torch.float64), dim=1)
    scores = scores @ torch.nn.functional.normalize(torch.randn(16, 8, generator=g, dtype=torch.float64), dim=1).T
    q = sinkhorn(scores, epsilon=0.5, iterations=200)
    assert torch.allclose(q.sum(1), torch.ones(32, dtype=q.dtype), atol=1e-9)      # each sample: mass 1
    assert torch.allclose(q.sum(0), torch.full((16,), 32 / 16, dtype=q.dtype), atol=1e-6)  # each prototype: B/K
    assert torch.all(q >= 0)
    np.testing.assert_allclose(sinkhorn(scores, 0.05, 3).numpy(), _np_sinkhorn(scores.numpy(), 0.05, 3),
                               rtol=1e-6, atol=1e-12)


def test_palm_loss_matches_hand_computation_and_keeps_unit_prototypes():
    net, (x, y, _) = _net(5), _batch(n=18, seed=5)
    obj = PALM(num_prototypes=3, top_k=2, proj_dim=4, tau=0.1, proto_tau=0.5, lam=1.0,
               momentum=0.9, probe_weight=1.0)
    obj.setup(net, C)
    obj.projection_.double()
    obj.prototypes_ = obj.prototypes_.double()
    protos = obj.prototypes_.numpy().copy()
    loss, logs = obj.loss(net, x, y)

    li, h = _np_logits(net, x)
    p1, p2 = obj.projection_[0], obj.projection_[2]
    z = np.maximum(h @ p1.weight.detach().numpy().T + p1.bias.detach().numpy(), 0)
    z = z @ p2.weight.detach().numpy().T + p2.bias.detach().numpy()
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    labels = np.repeat(np.arange(C), 3)

    def weights(p):
        q = _np_sinkhorn(z @ p.T - (z @ p.T).max(), 0.05, 3)
        q = q * (y.numpy()[:, None] == labels[None])
        w = np.zeros_like(q)
        for i in range(len(q)):
            top = np.argsort(-q[i])[:2]
            w[i, top] = q[i, top]
        return w / w.sum(1, keepdims=True)

    w = weights(protos)
    mean_of_assigned = (w / np.maximum(w.sum(0, keepdims=True), 1e-12)).T @ z  # per-prototype weighted mean
    upd = 0.9 * protos + 0.1 * mean_of_assigned
    upd /= np.linalg.norm(upd, axis=1, keepdims=True)
    w = weights(upd)  # the assignment is recomputed on the updated prototypes
    logits = z @ upd.T / 0.1
    mle = np.mean(-(w * logits).sum(1) + _lse(logits))
    sim = upd @ upd.T / 0.5
    np.fill_diagonal(sim, -np.inf)
    logp = sim - _lse(sim)[:, None]
    same = (labels[:, None] == labels[None]) & ~np.eye(len(labels), dtype=bool)
    pcon = -np.mean([logp[j, same[j]].mean() for j in range(len(labels))])
    assert logs["mle"] == pytest.approx(mle, rel=1e-6)
    assert logs["pcon"] == pytest.approx(pcon, rel=1e-6)
    assert loss.item() == pytest.approx(mle + pcon + _ce(li, y), rel=1e-6)
    np.testing.assert_allclose(obj.prototypes_.numpy(), upd, rtol=1e-6, atol=1e-9)
    assert torch.allclose(obj.prototypes_.norm(dim=1), torch.ones(9, dtype=torch.float64))

    saved = obj.prototypes_.clone()

    def reset():
        obj.prototypes_ = saved.clone()

    reset()
    _step_decreases(obj, net, x, y, lr=0.05, reset=reset)
    for _ in range(20):
        obj.loss(net, x, y)
    assert torch.allclose(obj.prototypes_.norm(dim=1), torch.ones(9, dtype=torch.float64), atol=1e-9)


def test_palm_weights_only_on_own_class_prototypes():
    net, (_, y, _) = _net(6), _batch(n=9, seed=6)
    obj = PALM(num_prototypes=4, top_k=3, proj_dim=5)
    obj.setup(net, C)
    z = torch.nn.functional.normalize(torch.randn(9, 5), dim=1)
    w = obj.assignment(z, y)
    assert torch.allclose(w.sum(1), torch.ones(9))
    own = obj.prototype_labels_.unsqueeze(0) == y.unsqueeze(1)
    assert torch.all(w[~own] == 0)
    assert torch.all((w > 0).sum(1) <= 3)


# ------------------------------------------------------------------ ASCOOD
@pytest.mark.parametrize("mode", ["gradient", "shuffle", "gaussian"])
def test_ascood_outlier_differs_only_inside_mask(mode):
    net, (x, y, _) = _net(7), _batch(seed=7)
    obj = ASCOOD(mode=mode, p_inv=0.1)
    obj.setup(net, C)
    g = obj.saliency(net, x, y)
    x_ood, mask = obj.synthesize(x, g, alpha=50.0, generator=torch.Generator().manual_seed(0))
    assert mask.shape == x.shape
    assert torch.all(mask.flatten(1).sum(1) == round(0.1 * 36))
    assert torch.equal(x_ood[~mask], x[~mask])
    assert (x_ood != x).any()
    if mode == "shuffle":  # a permutation of the masked values
        for i in range(len(x)):
            assert torch.allclose(x_ood[i][mask[i]].sort().values, x[i][mask[i]].sort().values)


def test_ascood_saliency_matches_finite_differences():
    net, (x, y, _) = _net(8), _batch(n=2, seed=8)
    obj = ASCOOD()
    obj.setup(net, C)
    net.eval()
    g = obj.saliency(net, x, y)
    e = 1e-6
    for idx in [(0, 0, 1, 2), (1, 0, 4, 4)]:
        xp, xm = x.clone(), x.clone()
        xp[idx] += e
        xm[idx] -= e
        i = idx[0]
        with torch.no_grad():
            num = (net(xp)[i, y[i]] - net(xm)[i, y[i]]) / (2 * e)
        assert float(g[idx]) == pytest.approx(float(num), rel=1e-5, abs=1e-9)


def test_ascood_loss_matches_hand_computation_and_descends():
    net, (x, y, _) = _net(9), _batch(seed=9)
    obj = ASCOOD(weight=1.0, sigma=0.5, mode="gradient", alpha_max=20.0, alpha_min=20.0)
    obj.setup(net, C)
    assert isinstance(net.fc, ZScoreHead)
    x_ood, _ = obj.synthesize(x, obj.saliency(net, x, y), alpha=20.0)
    loss, _ = obj.loss(net, x, y)

    def logits(inp):
        _, h = _np_logits(_net(9), inp)  # same embedding (seed 9)
        hz = 0.5 * (h - h.mean(1, keepdims=True)) / (h.std(1, ddof=1, keepdims=True) + 1e-6)
        return hz @ net.fc.linear.weight.detach().numpy().T + net.fc.linear.bias.detach().numpy()

    lo = logits(x_ood)
    p = lo - _lse(lo)[:, None]
    kl = np.mean(np.mean(np.log(1 / C) - p, axis=1))  # KL(uniform || p)
    assert loss.item() == pytest.approx(_ce(logits(x), y) + kl, rel=1e-7)
    _step_decreases(obj, net, x, y, lr=0.05)


def test_ascood_alpha_decays_linearly():
    obj = ASCOOD(alpha_max=300, alpha_min=30, decay_epochs=4)
    obj.setup(_net(), C)
    alphas = []
    for epoch in range(5):
        alphas.append(obj.alpha)
        obj.on_epoch_end(epoch)
    assert alphas == pytest.approx([300, 210, 120, 30, 30])


def test_energy_oe_is_scored_with_energy_and_heads_expose_their_sizes():
    assert OutlierExposure().default_detector == "msp"
    assert OutlierExposure(regularizer="energy").default_detector == "energy"
    net = _net()
    AbeT().setup(net, C)
    assert (net.fc.in_features, net.fc.out_features) == (8, C)
    net = _net()
    ASCOOD().setup(net, C)
    assert (net.fc.in_features, net.fc.out_features) == (8, C)
    with pytest.raises(ValueError, match="regularizer"):
        OutlierExposure(regularizer="nope").setup(net, C)


def test_heads_survive_a_checkpoint_round_trip(tmp_path):
    from oodscope import models
    from oodscope.models import create, save_checkpoint
    from oodscope.train import load_checkpoint

    for method in ("abet", "ascood"):
        net = create("small_cnn", num_classes=C, width=8, feature_dim=16)
        create_objective(method).setup(net, C)
        path = save_checkpoint(net, tmp_path / f"{method}.safetensors",
                               {"objective": {"name": method, "params": {}}})
        loaded, _ = load_checkpoint(path)
        x = torch.rand(2, 1, 28, 28)
        net.eval()
        a, b = net(x), loaded(x)
        a = a["logits"] if isinstance(a, dict) else a
        b = b["logits"] if isinstance(b, dict) else b
        assert torch.allclose(a, b)
        # without the objective's replay the extended network cannot be rebuilt: a clear error
        with pytest.raises(ValueError, match="oodscope.train.load_checkpoint"):
            models.load_checkpoint(path)


def test_ascood_shuffle_moves_whole_pixels_of_colour_images():
    torch.manual_seed(0)

    class ColourNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
            self.fc = nn.Linear(4 * 4 * 4, C)

        def forward(self, x):
            return self.fc(self.body(x))

    net = ColourNet().double()
    x = torch.rand(5, 3, 6, 6, dtype=torch.float64)
    y = torch.arange(5) % C
    obj = ASCOOD(mode="shuffle", p_inv=0.25)
    g = obj.saliency(net, x, y)
    x_ood, mask = obj.synthesize(x, g, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask[:, 0], mask[:, 1]) and torch.equal(mask[:, 0], mask[:, 2])
    assert torch.all(mask[:, 0].flatten(1).sum(1) == 9)  # 25% of 36 pixels
    top = g.exp().sum(1).flatten(1).topk(9, dim=1).indices
    assert torch.equal(mask[:, 0].flatten(1).gather(1, top), torch.ones(5, 9, dtype=torch.bool))
    assert torch.equal(x_ood[~mask], x[~mask])
    for i in range(5):  # the set of RGB triples under the mask is preserved
        a = x[i].flatten(1)[:, mask[i, 0].flatten()].T.tolist()
        b = x_ood[i].flatten(1)[:, mask[i, 0].flatten()].T.tolist()
        assert sorted(map(tuple, a)) == sorted(map(tuple, b))
