"""A tiny image problem with a trained convolutional network, for detectors that need feature
maps (RankFeat, multi-layer aggregation, SEM, MDSEns' stages) — the MLP of conftest.py has none.

8×8 grey images of three classes (a bright horizontal bar, vertical bar or diagonal, at a
random position, plus noise); far OOD is low-contrast noise. The network (two conv blocks,
global pooling, an embedding and a linear head) trains for 150 Adam steps in well under a
second, seeded, so every run gets the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from oodscope import Features

LAYERS = ("block1", "block2")


def _images(rng, n: int, ood: bool):
    x = 0.3 * rng.standard_normal((n, 1, 8, 8))
    if ood:
        return x.astype(np.float32), -np.ones(n, dtype=np.int64)
    y = rng.integers(0, 3, n)
    pos = rng.integers(1, 7, n)
    for i, (c, p) in enumerate(zip(y, pos)):
        if c == 0:
            x[i, 0, p, 1:7] += 2.0
        elif c == 1:
            x[i, 0, 1:7, p] += 2.0
        else:
            x[i, 0, np.arange(1, 7), np.arange(1, 7)] += 2.0
    return x.astype(np.float32), y


def make_net():
    import torch
    from torch import nn

    class TinyCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.block1 = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
            self.pool = nn.MaxPool2d(2)
            self.block2 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
            self.embed = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU())
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.embed(self.block2(self.pool(self.block1(x)))))

    torch.manual_seed(0)
    return TinyCNN()


@dataclass
class ImageProblem:
    model: object
    train: Features
    test_id: Features
    test_ood: Features


@lru_cache(maxsize=None)
def image_problem() -> ImageProblem:
    import torch

    from oodscope import extract

    rng = np.random.default_rng(0)
    x_train, y_train = _images(rng, 300, ood=False)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    xt, yt = torch.as_tensor(x_train), torch.as_tensor(y_train)
    for _ in range(150):
        rows = torch.as_tensor(rng.integers(0, len(xt), 64))
        loss = torch.nn.functional.cross_entropy(net(xt[rows]), yt[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()

    def feats(x, y):
        return extract(net, (x, y), layers=LAYERS, keep_inputs=True, progress=False)

    return ImageProblem(net, feats(x_train, y_train), feats(*_images(rng, 120, ood=False)),
                        feats(*_images(rng, 120, ood=True)))
