"""PALM's prototype update on a hand-made batch: the per-prototype weighted mean of the
authors' code (jeff024/PALM, util/loss_functions.py), independent of the batch size."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from oodscope.train.objectives import PALM


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


class _Fixed(nn.Module):
    """A 'projection' that returns the given embeddings, so z is known exactly."""

    def __init__(self, z):
        super().__init__()
        self.z = nn.Parameter(torch.tensor(z, dtype=torch.float64))

    def forward(self, h):
        return self.z


def _palm(z):
    obj = PALM(num_prototypes=2, top_k=1, proj_dim=2, momentum=0.9)
    net = _Net().double()
    obj.setup(net, 2)
    obj.projection_ = _Fixed(z)
    # class 0: prototypes +x, +y; class 1: -x, -y
    obj.prototypes_ = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    return obj, net


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


Z = [[0.8, 0.6], [1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]
Y = [0, 0, 0, 1]


def test_update_is_the_per_prototype_weighted_mean():
    obj, net = _palm(Z)
    w = obj.assignment(torch.tensor(Z, dtype=torch.float64), torch.tensor(Y))
    np.testing.assert_array_equal(w.argmax(1).numpy(), [0, 0, 1, 2])  # top-1 within the class
    obj.loss(net, torch.zeros(4, 3, dtype=torch.float64), torch.tensor(Y))
    expected = np.array([
        _unit(0.9 * np.array([1, 0]) + 0.1 * np.mean([[0.8, 0.6], [1.0, 0.0]], axis=0)),  # [0.99, 0.03]
        _unit(0.9 * np.array([0, 1]) + 0.1 * np.array([0.6, 0.8])),
        _unit(0.9 * np.array([-1, 0]) + 0.1 * np.array([-1.0, 0.0])),
        [0.0, -1.0],  # no sample assigned: unchanged
    ])
    np.testing.assert_allclose(obj.prototypes_.numpy(), expected, atol=1e-12)
    # the old rule, normalize(m p + (1 - m) sum_i w_i z_i), would have given prototype 0 this:
    old = _unit(0.9 * np.array([1, 0]) + 0.1 * np.array([1.8, 0.6]))
    assert not np.allclose(obj.prototypes_.numpy()[0], old)


def test_update_does_not_speed_up_with_more_samples():
    one, net = _palm(Z)
    one.loss(net, torch.zeros(4, 3, dtype=torch.float64), torch.tensor(Y))
    many, net = _palm(Z * 8)
    many.loss(net, torch.zeros(32, 3, dtype=torch.float64), torch.tensor(Y * 8))
    np.testing.assert_allclose(many.prototypes_.numpy(), one.prototypes_.numpy(), atol=1e-12)


def test_mle_uses_the_updated_prototypes():
    obj, net = _palm(Z)
    _, logs = obj.loss(net, torch.zeros(4, 3, dtype=torch.float64), torch.tensor(Y))
    z = np.array(Z)
    logits = z @ obj.prototypes_.numpy().T / 0.1
    own = np.array([0, 0, 1, 2])  # top-1 assignment on the updated prototypes is unchanged here
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    assert np.isclose(logs["mle"], np.mean(lse - logits[np.arange(4), own]), rtol=1e-10)


def test_mle_keeps_the_prototypes_chosen_before_the_update():
    """The authors' loss mask: top-k prototypes from the pre-update assignment, Sinkhorn
    weights from the updated prototypes. Here one sample's top-1 changes with the update."""
    import torch.nn.functional as F

    from oodscope.train.objectives import sinkhorn

    zs = [[0.34, -0.94], [-0.167, -0.986], [0.844, 0.537], [-0.388, 0.922], [0.453, -0.892], [0.953, -0.303]]
    ys = [0, 0, 0, 1, 1, 1]
    obj, net = _palm(zs)
    obj.momentum = 0.5
    z, y = F.normalize(torch.tensor(zs, dtype=torch.float64), dim=1), torch.tensor(ys)
    before = obj.assignment(z, y)
    protos = obj.prototypes_.clone()
    _, logs = obj.loss(net, torch.zeros(6, 3, dtype=torch.float64), y)
    updated = obj.prototypes_
    mask = (y[:, None] == obj.prototype_labels_[None]).double()
    q = sinkhorn(z @ updated.T, 0.05, 3) * mask
    own = q * (before > 0)
    own = own / own.sum(1, keepdim=True)
    recomputed = obj.assignment(z, y, updated)
    assert not torch.equal(recomputed > 0, before > 0)  # the case this test is about
    logits = z @ updated.T / 0.1
    expected = (torch.logsumexp(logits, 1) - (own * logits).sum(1)).mean()
    assert np.isclose(logs["mle"], float(expected), rtol=1e-10)
    assert not torch.equal(protos, updated)
