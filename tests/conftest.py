"""Shared fixtures: synthetic Gaussian classes with far-away OOD, and a tiny torch model.

ID samples live in the positive orthant (like post-ReLU CNN features), one cluster per
class, far from the origin; OOD samples are small-norm noise near the origin. The tiny model
maps inputs through ReLU to features and a linear head whose rows point at the class means,
so logit-, feature- and model-based detectors all see a clean, separable problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from oodscope import Features

# Tests use small tensors; one torch thread avoids oversubscription on small CI machines.
try:  # pragma: no cover - torch is a core dependency
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "OODSCOPE_DATA" not in os.environ and SHARED_DATA.exists():
    os.environ["OODSCOPE_DATA"] = str(SHARED_DATA)

#: Fields the synthetic problem provides; detectors needing anything else have their own tests.
SYNTHETIC_FIELDS = {"logits", "features", "labels", "head", "model", "inputs"}


@dataclass
class Problem:
    train: Features
    val: Features
    test_id: Features
    test_ood: Features
    model: object
    num_classes: int
    dim: int


def _make_problem(seed: int = 0, n_train: int = 600, n_test: int = 300, dim: int = 64,
                  num_classes: int = 5) -> Problem:
    import torch

    rng = np.random.default_rng(seed)
    means = np.zeros((num_classes, dim))
    block = dim // num_classes
    for c in range(num_classes):
        means[c, c * block:(c + 1) * block] = 4.0 + rng.random(block)
    noise = 0.7

    def id_inputs(n):
        y = rng.integers(0, num_classes, n)
        return means[y] + noise * rng.standard_normal((n, dim)), y

    def ood_inputs(n):
        return 0.8 * np.abs(rng.standard_normal((n, dim))) * (rng.random((n, dim)) < 0.5), -np.ones(n, int)

    class TinyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Identity(), torch.nn.ReLU())
            self.fc = torch.nn.Linear(dim, num_classes)
            with torch.no_grad():
                w = means / np.linalg.norm(means, axis=1, keepdims=True)
                self.fc.weight.copy_(torch.tensor(2.0 * w, dtype=torch.float32))
                self.fc.bias.zero_()

        def forward(self, x):
            return self.fc(self.body(x))

    model = TinyNet().eval()

    def feats(x, y):
        xt = torch.tensor(x, dtype=torch.float32)
        with torch.no_grad():
            f = model.body(xt)
            logits = model.fc(f)
        return Features(
            logits=logits.numpy(), features=f.numpy(), labels=y,
            head_weight=model.fc.weight.detach().numpy(), head_bias=model.fc.bias.detach().numpy(),
            extras={"inputs": x.astype(np.float32)},
        )

    return Problem(
        train=feats(*id_inputs(n_train)),
        val=feats(*id_inputs(n_test)),
        test_id=feats(*id_inputs(n_test)),
        test_ood=feats(*ood_inputs(n_test)),
        model=model,
        num_classes=num_classes,
        dim=dim,
    )


@pytest.fixture(scope="session")
def problem() -> Problem:
    return _make_problem()


def synthetic_detector_names() -> list[str]:
    """Registered detectors whose needs the synthetic problem can satisfy."""
    import oodscope as ood
    from oodscope.detectors import get_detector_class

    return [n for n in ood.list_detectors()
            if get_detector_class(n).all_requirements() <= SYNTHETIC_FIELDS]


def make_detector(name: str, problem: Problem, **params):
    """Create ``name`` with the extra constructor arguments some detectors need."""
    import oodscope as ood
    from oodscope.detectors import get_detector_class

    cls = get_detector_class(name)
    if "model" in cls.all_requirements() and "model" not in params:
        params["model"] = problem.model
    for key, value in getattr(cls, "test_params", {}).items():
        params.setdefault(key, value)
    return ood.create(name, **params)
