"""ODIN, i-ODIN and GradNorm against direct autograd computations on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oodscope as ood
from oodscope._numeric import softmax


def _manual_perturbed_msp(model, x, T, eps, only_top=False):
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    logits = model(xt)
    loss = torch.nn.functional.cross_entropy(logits / T, logits.argmax(1), reduction="sum")
    (g,) = torch.autograd.grad(loss, xt)
    step = torch.sign(g)
    if only_top:
        mask = torch.zeros_like(g)
        mask[torch.arange(len(g)), g.abs().argmax(1)] = 1.0
        step = step * mask
    with torch.no_grad():
        out = model(xt.detach() - eps * step).double().numpy()
    return softmax(out / T, axis=1).max(1)


def test_odin_without_perturbation_is_tempered_msp(problem):
    det = ood.create("odin", model=problem.model, temperature=1000.0, epsilon=0.0).fit()
    expected = softmax(problem.test_id.logits.astype(np.float64) / 1000.0, axis=1).max(1)
    np.testing.assert_allclose(det.score(problem.test_id), expected, rtol=1e-6)


@pytest.mark.parametrize("name,only_top", [("odin", False), ("iodin", True)])
def test_perturbation_matches_autograd(problem, name, only_top):
    eps = 0.05
    det = ood.create(name, model=problem.model, temperature=1000.0, epsilon=eps, batch_size=37).fit()
    x = problem.test_ood[:100]
    got = det.score(x)
    want = _manual_perturbed_msp(problem.model, x.extras["inputs"], 1000.0, eps, only_top)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # the perturbation moves towards higher confidence, so scores must not drop
    base = ood.create(name, model=problem.model, epsilon=0.0).fit().score(x)
    assert np.mean(got >= base - 1e-9) >= 0.95
    assert np.mean(got > base) > 0.5


def test_iodin_moves_only_one_element(problem):
    from oodscope.detectors.gradient import IODIN

    g = torch.tensor([[0.1, -3.0, 2.0], [0.0, 0.5, -0.2]])
    step = IODIN(model=problem.model)._step(g)
    np.testing.assert_array_equal(step.numpy(), [[0.0, -1.0, 0.0], [0.0, 1.0, 0.0]])


def test_input_std_rescales_epsilon(problem):
    a = ood.create("odin", model=problem.model, epsilon=0.02, input_std=2.0).fit()
    b = ood.create("odin", model=problem.model, epsilon=0.01).fit()
    x = problem.test_id[:50]
    np.testing.assert_allclose(a.score(x), b.score(x), rtol=1e-6)


def test_odin_batch_size_invariance_and_mode_restored(problem):
    problem.model.train()
    try:
        s1 = ood.create("odin", model=problem.model, epsilon=0.01, batch_size=1).fit().score(problem.test_id[:20])
        assert problem.model.training, "ODIN must restore the model's training mode"
    finally:
        problem.model.eval()
    s2 = ood.create("odin", model=problem.model, epsilon=0.01, batch_size=64).fit().score(problem.test_id[:20])
    np.testing.assert_allclose(s1, s2, rtol=1e-6)


def test_odin_reads_dict_outputs(problem):
    class DictNet(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"logits": self.inner(x), "temperature": torch.ones(len(x))}

    x = problem.test_id[:30]
    plain = ood.create("odin", model=problem.model, epsilon=0.01).fit().score(x)
    wrapped = ood.create("odin", model=DictNet(problem.model), epsilon=0.01).fit().score(x)
    np.testing.assert_allclose(plain, wrapped, rtol=1e-7)


def test_odin_clear_errors(problem):
    with pytest.raises(ValueError, match="model="):
        ood.create("odin").fit()
    with pytest.raises(ValueError, match="epsilon"):
        ood.create("odin", model=problem.model, epsilon=-1.0).fit()
    det = ood.create("odin", model=problem.model).fit()
    with pytest.raises(ValueError, match="inputs"):
        det.score(problem.test_id.replace(extras={}))
    tokens = problem.test_id[:5].replace(extras={"inputs": np.ones((5, problem.dim), dtype=np.int64)})
    with pytest.raises(ValueError, match="floating point"):
        det.score(tokens)


def test_gradnorm_matches_autograd_on_last_layer(problem):
    """‖∂KL(u‖softmax)/∂W‖₁ computed by autograd per sample equals the closed form."""
    fc = problem.model.fc
    x = problem.test_id[:40]
    feats = torch.tensor(x.features, dtype=torch.float64)
    # a scaled-down head keeps the softmax soft, so the gradients are far from zero
    W = (0.3 * fc.weight.detach().double()).requires_grad_(True)
    b = fc.bias.detach().double()
    want = []
    for h in feats:
        logits = W @ h + b
        C = logits.shape[0]
        loss = -(torch.log_softmax(logits / 2.0, 0)).sum() / C  # KL(u‖p) up to a constant, T=2
        (gW,) = torch.autograd.grad(loss, W)
        want.append(gW.abs().sum().item())
    x = x.replace(logits=(feats @ W.detach().T + b).numpy(),
                  head_weight=W.detach().numpy(), head_bias=b.numpy())
    got = ood.create("gradnorm", temperature=2.0).fit().score(x)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gradnorm_chunking_is_invisible(problem):
    a = ood.create("gradnorm", chunk_size=7).fit().score(problem.test_ood)
    b = ood.create("gradnorm").fit().score(problem.test_ood)
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_gradnorm_needs_head_and_features(problem):
    det = ood.create("gradnorm").fit()
    with pytest.raises(ValueError, match="head"):
        det.score(problem.test_id.replace(head_weight=None, head_bias=None))
    with pytest.raises(ValueError, match="features"):
        det.score(problem.test_id.replace(features=None))
