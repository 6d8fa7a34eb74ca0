"""Detectors that run the network again (RankFeat, RankWeight, AdaSCALE-A/-L, MDSEns):
signs on a trained CNN, and small cases computed by hand or with numpy/autograd directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oodscope as ood
from oodscope import Features
from oodscope._numeric import logsumexp
from oodscope.detectors._network import stage_outputs
from oodscope.detectors.adascale import adaptive_scale
from oodscope.detectors.mdsens import PENULTIMATE
from oodscope.detectors.rank import remove_rank1

from image_problem import image_problem


def _auroc(det, p):
    return ood.metrics.auroc(det.score(p.test_id), det.score(p.test_ood))


@pytest.mark.parametrize("name,floor", [("rankfeat", 0.85), ("rankweight", 0.9), ("adascale_a", 0.85),
                                        ("adascale_l", 0.8), ("mdsens", 0.95)])
def test_sign_on_a_trained_cnn(name, floor):
    """Far OOD (low-contrast noise) scores lower than ID; a flipped sign gives AUROC < 0.2."""
    p = image_problem()
    det = ood.create(name, model=p.model)
    det.fit(p.train if det.fit_requirements() else None)
    assert _auroc(det, p) >= floor


# ------------------------------------------------------------------ RankFeat
def _np_remove_rank1(m):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return m - s[0] * np.outer(u[:, 0], vt[0])


class _TokenNet(torch.nn.Module):
    """x (N, 6) -> tokens (N, 2, 3) -> flatten -> fc: RankFeat's matrix is the token map."""

    def __init__(self):
        super().__init__()
        self.tokens = torch.nn.Unflatten(1, (2, 3))
        self.flat = torch.nn.Flatten()
        self.fc = torch.nn.Linear(6, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.5, -1.0, 0.0, 2.0, 1.0], [0.0, -1.0, 1.0, 1.5, 0.5, -0.5]]))
            self.fc.bias.copy_(torch.tensor([0.1, -0.2]))

    def forward(self, x):
        return self.fc(self.flat(self.tokens(x)))


def test_rankfeat_by_hand():
    net = _TokenNet().eval()
    x = np.array([[1.0, 2.0, 0.5, -1.0, 3.0, 0.0], [0.2, 0.1, 0.4, 2.0, -0.5, 1.0]], dtype=np.float32)
    det = ood.create("rankfeat", model=net, layers="tokens", temperature=2.0).fit()
    w, b = net.fc.weight.detach().numpy().astype(np.float64), net.fc.bias.detach().numpy().astype(np.float64)
    want = []
    for row in x.astype(np.float64):
        logits = w @ _np_remove_rank1(row.reshape(2, 3)).reshape(-1) + b
        want.append(2.0 * np.log(np.exp(logits / 2.0).sum()))
    np.testing.assert_allclose(det.score(Features(extras={"inputs": x})), want, rtol=1e-5)
    # what is left of a 2x3 matrix of rank 2 is its second singular component alone
    m = x.reshape(2, 2, 3).astype(np.float64)
    left = remove_rank1(torch.tensor(m)).numpy()
    s_left, s_m = np.linalg.svd(left, compute_uv=False), np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(s_left[:, 0], s_m[:, 1], rtol=1e-12)
    assert np.all(s_left[:, 1] < 1e-12 * s_m[:, 0])


def test_rankfeat_default_fuses_the_last_two_stages():
    p = image_problem()
    example = torch.as_tensor(p.train.extras["inputs"][:1])
    assert stage_outputs(p.model, example) == ["block1", "block2"]  # the 1x1 pooled map is no stage
    x = p.test_id[:10]
    got = ood.create("rankfeat", model=p.model).fit().score(x)

    def logits_with(name):
        module = dict(p.model.named_modules())[name]
        hook = module.register_forward_hook(lambda m, i, o: torch.as_tensor(
            np.stack([_np_remove_rank1(a.reshape(a.shape[0], -1)).reshape(a.shape)
                      for a in o.double().numpy()]), dtype=o.dtype))
        try:
            with torch.no_grad():
                return p.model(torch.as_tensor(x.extras["inputs"])).double().numpy()
        finally:
            hook.remove()

    fused = (logits_with("block1") + logits_with("block2")) / 2
    np.testing.assert_allclose(got, logsumexp(fused, axis=1), rtol=1e-5)


def test_rankfeat_needs_maps_or_tokens(problem):
    with pytest.raises(ValueError, match="no layer with"):
        ood.create("rankfeat", model=problem.model).fit().score(problem.test_id[:5])
    with pytest.raises(ValueError, match="maps"):
        ood.create("rankfeat", model=problem.model, layers=["body"]).fit().score(problem.test_id[:5])
    with pytest.raises(ValueError, match="no module named"):
        ood.create("rankfeat", model=problem.model, layers=["nope"]).fit().score(problem.test_id[:5])


# ------------------------------------------------------------------ RankWeight
def test_rankweight_by_hand_and_leaves_the_model_alone():
    torch.manual_seed(1)
    net = torch.nn.Sequential()
    net.add_module("lin", torch.nn.Linear(3, 4))
    net.add_module("act", torch.nn.ReLU())
    net.add_module("fc", torch.nn.Linear(4, 2))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = np.array([[1.0, -2.0, 0.5], [0.3, 0.3, 3.0], [-1.0, 0.0, 1.0]], dtype=np.float32)
    det = ood.create("rankweight", model=net).fit()
    assert det.layer_names() == ["lin"]  # the last linear layer before the head
    sd = {k: v.double().numpy() for k, v in net.state_dict().items()}
    hidden = np.maximum(x.astype(np.float64) @ _np_remove_rank1(sd["lin.weight"]).T + sd["lin.bias"], 0)
    logits = hidden @ sd["fc.weight"].T + sd["fc.bias"]
    np.testing.assert_allclose(det.score(Features(extras={"inputs": x})), logsumexp(logits, axis=1), rtol=1e-5)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_rankweight_rejects_a_layer_without_weight_matrix(problem):
    with pytest.raises(ValueError, match="no weight matrix"):
        ood.create("rankweight", model=problem.model, layers="body").fit().score(problem.test_id[:3])


# ------------------------------------------------------------------ AdaSCALE
def test_adaptive_scale_by_hand():
    h = np.array([[3.0, 1.0, 0.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    # p=50: keep the top 2 of 4; relu -> [3,1,0,0]: 4/4 = 1.  p=75: keep 1: 4/1 = 4.
    np.testing.assert_allclose(adaptive_scale(h, np.array([50.0, 75.0])), [1.0, 4.0])
    assert adaptive_scale(np.array([[-1.0, -2.0]]), np.array([50.0]))[0] == 0.0  # nothing positive


class _ReluHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.ReLU()
        self.fc = torch.nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.1, -0.8, 0.6], [0.2, 0.3, 0.1, 0.1], [-0.5, 0.2, 0.4, -0.3]]))

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.mark.parametrize("name", ["adascale_a", "adascale_l"])
def test_adascale_by_hand(name):
    """x1 = [1, 2, .3, .5]: predicted class 0, the least sensitive input (|w| = 0.1) is #1 and
    moves by +0.5: h~ = [1, 2.5, .3, .5]; Q = (2.5 + 1) + 10·|2 − 2.5| = 8.5.
    x2 = [.4, .5, .6, .7]: #1 moves to 1.0; Q = (.7 + .6) + 10·|.7 − .7| = 1.3."""
    net = _ReluHead().eval()
    x = np.array([[1.0, 2.0, 0.3, 0.5], [0.4, 0.5, 0.6, 0.7]], dtype=np.float32)
    f = Features(extras={"inputs": x})
    det = ood.create(name, model=net, percentile=(50, 90), k1=50, k2=25, lmbda=10.0, o=0.25,
                     n_samples=None).fit(f)
    h, q = det.features_and_shift(x)
    np.testing.assert_allclose(h, x, rtol=1e-6)
    np.testing.assert_allclose(q, [8.5, 1.3], rtol=1e-6)
    np.testing.assert_allclose(det.fit_shifts_, [1.3, 8.5], rtol=1e-6)
    # ECDF(8.5) = 1 -> p = 50 (keep 2 of 4); ECDF(1.3) = 1/2 -> p = 70 (keep 1 of 4)
    r = np.array([3.8 / 3.0, 2.2 / 0.7])
    wh = x.astype(np.float64) @ net.fc.weight.detach().double().numpy().T
    logits = wh * np.exp(r)[:, None] if name == "adascale_a" else wh * (r**2)[:, None]
    np.testing.assert_allclose(det.score(f), logsumexp(logits, axis=1), rtol=1e-5)


def test_adascale_search_space_is_the_authors_sweep():
    space = ood.detectors.get_detector_class("adascale_a").search_space["percentile"]
    assert len(space) == 36 and (60, 65) in space and (95, 99) in space and all(lo < hi for lo, hi in space)


def test_adascale_rejects_bad_parameters(problem):
    for bad in ({"percentile": (90, 80)}, {"percentile": 85}, {"o": 0.0}, {"k1": 0}, {"k2": 150}, {"lmbda": -1.0}):
        with pytest.raises(ValueError):
            ood.create("adascale_a", model=problem.model, **bad).fit(problem.train)


# ------------------------------------------------------------------ MDSEns
def _shared_gaussian(h, y, shrinkage):
    classes = np.unique(y)
    means = np.stack([h[y == c].mean(0) for c in classes])
    centred = h - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / len(h)
    d = cov.shape[0]
    return means, np.linalg.inv((1 - shrinkage) * cov + shrinkage * np.trace(cov) / d * np.eye(d))


def _max_gauss(h, means, prec):
    diff = h[:, None, :] - means[None]
    return (-0.5 * np.einsum("ncd,de,nce->nc", diff, prec, diff)).max(1)


def test_mdsens_by_hand(problem):
    """One layer (the head input), layer weight 1: at epsilon 0 the score is Lee et al.'s
    max_c −½ d²; with epsilon the input moves by −ε·sign(∇ₓ ½ d²_ĉ), and for the ReLU body of
    the tiny model (positive inputs) ∇ₓ ½ d² = P (h − μ_ĉ)."""
    train, x = problem.train, problem.test_id[:30]
    kw = dict(model=problem.model, layers=[PENULTIMATE], layer_weights=[1.0], shrinkage=0.01)
    h_train = np.maximum(train.extras["inputs"].astype(np.float64), 0)
    means, prec = _shared_gaussian(h_train, train.labels, 0.01)
    xi = x.extras["inputs"].astype(np.float64)
    det0 = ood.create("mdsens", epsilon=0.0, **kw).fit(train)
    np.testing.assert_allclose(det0.score(x), _max_gauss(np.maximum(xi, 0), means, prec), rtol=1e-6)

    eps = 0.05
    det = ood.create("mdsens", epsilon=eps, **kw).fit(train)
    h = np.maximum(xi, 0)
    diff = h[:, None, :] - means[None]
    closest = np.einsum("ncd,de,nce->nc", diff, prec, diff).argmin(1)
    grad = (h - means[closest]) @ prec * (xi > 0)
    moved = np.maximum(xi - eps * np.sign(grad), 0)
    got = det.score(x)
    np.testing.assert_allclose(got, _max_gauss(moved, means, prec), rtol=1e-4)
    assert np.mean(got > det0.score(x)) > 0.9  # pre-processing moves towards the closest class


def test_mdsens_default_layers_and_input_std(problem):
    p = image_problem()
    det = ood.create("mdsens", model=p.model, epsilon=0.0).fit(p.train)
    assert det.layers_ == ["block1", "block2", PENULTIMATE]
    assert det.layer_scores(p.test_id.extras["inputs"][:5]).shape == (5, 3)
    # epsilon is in raw units: epsilon 0.02 with std 2 is epsilon 0.01 on the normalised inputs
    a = ood.create("mdsens", model=problem.model, epsilon=0.02, input_std=2.0).fit(problem.train)
    b = ood.create("mdsens", model=problem.model, epsilon=0.01).fit(problem.train)
    np.testing.assert_allclose(a.score(problem.test_id[:20]), b.score(problem.test_id[:20]), rtol=1e-6)
    with pytest.raises(ValueError, match="layer_weights"):
        ood.create("mdsens", model=problem.model, layer_weights=[1.0, 2.0]).fit(problem.train).score(problem.test_id[:3])
