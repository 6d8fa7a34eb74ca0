"""Shared fixtures: synthetic Gaussian classes with far-away OOD, and a tiny torch model.

ID samples live in the positive orthant (like post-ReLU CNN features), one cluster per
class, far from the origin; OOD samples are small-norm noise near the origin. The tiny model
maps inputs through ReLU to features and a linear head whose rows point at the class means,
so logit-, feature- and model-based detectors all see a clean, separable problem.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import pytest

from oodscope import Features
from oodscope.data.registry import cache_root

# Tests use small tensors; one torch thread avoids oversubscription on small CI machines.
try:  # pragma: no cover - torch is a core dependency
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

# ------------------------------------------------------------------ real data
# A test that reads a real dataset says so: ``@pytest.mark.requires_data("fashion-mnist",
# "mnist:test")`` (``name`` = every split of a registered set, ``name:split`` = one split;
# text sets by their folder name, e.g. ``clinc150``). The data is looked up the way the
# library looks it up (``$OODSCOPE_DATA``, then the user cache, then /usr/share/datasets,
# where Debian's dataset-fashion-mnist installs). Missing data skips the test with one line
# saying how to get it -- except in CI (``CI=true``), where it fails the run.
# The suite never downloads (OODSCOPE_OFFLINE=1) and never writes to the user cache: the
# cache moves to a temporary folder, and the user's cache stays readable as a data folder.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_USER_CACHE = cache_root()
os.environ["OODSCOPE_OFFLINE"] = "1"
os.environ["OODSCOPE_DATA"] = os.pathsep.join(
    p for p in (os.environ.get("OODSCOPE_DATA"), str(_USER_CACHE)) if p)
_TEST_CACHE = tempfile.mkdtemp(prefix="oodscope-test-cache-")
os.environ["OODSCOPE_CACHE"] = _TEST_CACHE
atexit.register(shutil.rmtree, _TEST_CACHE, ignore_errors=True)

#: Files a text data set needs (image sets are checked against their registry entries).
TEXT_DATA_FILES = {"clinc150": tuple(f"data_{v}.json" for v in ("full", "small", "imbalanced", "oos_plus"))}


@functools.lru_cache(maxsize=None)
def _data_available(spec: str, search: str) -> bool:
    from oodscope.data import registry

    name, _, split = spec.partition(":")
    if name in TEXT_DATA_FILES:
        return registry.find_dataset_dir(name, TEXT_DATA_FILES[name]) is not None
    ds = registry.get_spec(name)
    if ds is None:
        raise ValueError(f"requires_data({spec!r}): unknown dataset; known: {registry.registered_names()}")
    for s in [split] if split else list(ds.splits):
        try:
            registry.find(name, s, download=False)
        except FileNotFoundError:
            return False
    return True


def missing_data(*specs: str) -> list[str]:
    """The datasets among ``specs`` that cannot be found locally."""
    return [s for s in specs if not _data_available(s, os.environ.get("OODSCOPE_DATA", ""))]


_FETCH = {"clinc150": "oodscope.text.load_clinc150()"}


def _how_to_get(missing: list[str]) -> str:
    names = sorted({m.partition(":")[0] for m in missing})
    fetch = " / ".join(_FETCH.get(n, f"oodscope.data.load({n!r})") for n in names)
    hint = (f"needs {', '.join(missing)}: point OODSCOPE_DATA at a folder holding {'/, '.join(names)}/ "
            f"(our CI: ../shared/data), or download into {_USER_CACHE} with {fetch}")
    if "fashion-mnist" in names:
        hint += ", or apt install dataset-fashion-mnist"
    return hint


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_data(*names): reads real datasets; skipped when they are missing "
        "(fails instead under CI=true)")


@pytest.hookimpl(tryfirst=True)  # before any fixture loads the data
def pytest_runtest_setup(item):
    missing = missing_data(*(n for m in item.iter_markers("requires_data") for n in m.args))
    if missing:
        if IN_CI:
            pytest.fail(f"CI=true, but the data is missing: {_how_to_get(missing)}", pytrace=False)
        pytest.skip(_how_to_get(missing))


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


#: constructor arguments that keep a detector fast on the synthetic problem (test-only knowledge)
TEST_PARAMS: dict[str, dict] = {
    "ensemble": {"members": ["energy", ("knn", {"k": 5}), "mahalanobis"], "method": "zscore"},
    # the class weights a VOS-trained network would learn (the tiny model has none)
    "webo": {"energy_weights": [1.0, 0.5, 2.0, 1.0, 1.5]},
    # ~120 training samples per class: a tail of 20 would be a sixth of each class
    "openmax": {"tail_size": 10},
    "discopatch": {"patch_size": 4, "steps": 8, "batch_images": 8},
    "mol": {"meta_iters": 15, "tasks_per_iter": 2},
}


def make_detector(name: str, problem: Problem, **params):
    """Create ``name`` with the extra constructor arguments some detectors need."""
    import oodscope as ood
    from oodscope.detectors import get_detector_class

    cls = get_detector_class(name)
    if "model" in cls.all_requirements() and "model" not in params:
        params["model"] = problem.model
    for key, value in TEST_PARAMS.get(cls.name, {}).items():
        params.setdefault(key, value)
    return ood.create(name, **params)
