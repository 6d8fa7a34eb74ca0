"""Post-hoc detectors on cached Features (NCI, NAC-UE, GROOD, CF-OOD, WEBO, OpenMax, MC
dropout, multi-layer aggregation, SEM): signs, and small cases computed by hand or by an
independent computation (autograd, scipy, brute force)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import oodscope as ood
from oodscope import Features
from oodscope._numeric import log_softmax, logsumexp, softmax
from oodscope.detectors._network import pool_layer
from oodscope.detectors.multilayer import fisher_brown
from oodscope.detectors.neuron import nac_thresholds
from oodscope.detectors.openmax import fit_weibull_high, weibull_cdf
from oodscope.detectors.prototype import cfof_grid

from conftest import make_detector
from image_problem import image_problem

SYNTHETIC = ["nci", "nac_ue", "grood", "cfood", "webo", "openmax", "mc_dropout"]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_sign_far_ood(name, problem):
    det = make_detector(name, problem).fit(problem.train)
    assert ood.metrics.auroc(det.score(problem.test_id), det.score(problem.test_ood)) >= 0.95


@pytest.mark.parametrize("name,kw", [
    ("multilayer", {"layers": ["block1", "block2", "features"]}),
    ("multilayer", {"layers": ["block1", "block2"], "detector": ("knn", {"k": 5}), "aggregation": "fisher"}),
    ("sem", {"layers": ["block1"]}),
])
def test_sign_with_layers(name, kw):
    p = image_problem()
    det = ood.create(name, **kw).fit(p.train)
    assert ood.metrics.auroc(det.score(p.test_id), det.score(p.test_ood)) >= 0.95


def test_oodscope_list_has_them_all_with_references():
    info = ood.detector_info().set_index("name")
    new = ["rankfeat", "rankweight", "nci", "adascale_a", "adascale_l", "grood", "cfood", "mdsens",
           "nac_ue", "webo", "openmax", "mc_dropout", "sem", "multilayer"]
    assert len(info) >= 52
    for name in new:
        assert len(info.loc[name, "reference"]) > 20, name


# ------------------------------------------------------------------ NCI
def test_nci_by_hand():
    """μ_G = mean of [1,1] and [3,1] = [2,1]. h = [2,4]: h − μ = [0,3], unit [0,1]; logits
    W h = [2, 8] -> class 1, w_1·unit = 2; ‖h‖₁ = 6 -> 2 + 0.5·6 = 5."""
    w = np.array([[1.0, 0.0], [1.0, 2.0]])
    train = Features(features=np.array([[1.0, 1.0], [3.0, 1.0]]), head_weight=w, head_bias=np.zeros(2))
    det = ood.create("nci", alpha=0.5).fit(train)
    np.testing.assert_allclose(det.train_mean_, [2.0, 1.0])
    x = Features(features=np.array([[2.0, 4.0], [2.0, 1.0]]), head_weight=w, head_bias=np.zeros(2))
    # the second sample sits at μ_G: projection 0 by definition, norm term 0.5·3
    np.testing.assert_allclose(det.score(x), [5.0, 1.5])


# ------------------------------------------------------------------ NAC-UE
def test_nac_thresholds_by_hand():
    # bins=4: x = linspace(1, √1000, 2) -> log_1000 x = [0, .5]; mirrored [0, .5, 1], last + .01, then 1.2
    np.testing.assert_allclose(nac_thresholds(4), [0.0, 0.5, 1.01, 1.2])
    edges = nac_thresholds(6)  # log_1000(linspace(1, √1000, 3)[1]) = ln(16.3114)/ln(1000)
    np.testing.assert_allclose(edges, [0, 0.404164, 0.5, 0.595836, 1.01, 1.2], atol=1e-6)


def test_nac_ue_by_hand():
    """One neuron h = x, head W = [[1], [-1]]: p0 − p1 = tanh(x), so the KL gradient is
    Wᵀ(p − ½) = tanh(x) and the state is sigmoid(β·x·tanh x). With β = 1 the training values
    x = 0, .5, .6, 1, 2 have states .5, .5575, .5799, .6817, .8730: three in [.5, .5958) and
    two in [.5958, 1.01). With min_count 4 those bins are covered .75 and .5."""
    w = np.array([[1.0], [-1.0]])

    def feats(x):
        x = np.asarray(x, dtype=np.float64)[:, None]
        return Features(features=x, logits=x @ w.T, labels=np.where(x[:, 0] >= 0, 0, 1),
                        head_weight=w, head_bias=np.zeros(2))

    det = ood.create("nac_ue", steepness=1.0, bins=6, min_count=4, n_samples=None)
    det.fit(feats([0.0, 0.5, 0.6, 1.0, 2.0]))
    states = det.states(feats([0.0, 0.5, 0.6, 1.0, 2.0]))[:, 0]
    np.testing.assert_allclose(states, [0.5, 0.557509, 0.579868, 0.681700, 0.873034], atol=1e-6)
    np.testing.assert_array_equal(det.counts_[:, 0], [0, 0, 3, 2, 0])
    np.testing.assert_allclose(det.score(feats([0.55, 1.5, -0.3])), [0.75, 0.5, 0.75])


# ------------------------------------------------------------------ GROOD
def test_grood_gradient_matches_autograd(problem):
    det = ood.create("grood").fit(problem.train)
    h = problem.test_ood.features[:6].astype(np.float64)
    ood_proto = torch.tensor(det.ood_prototype_, requires_grad=True)
    protos = torch.cat([torch.tensor(det.prototypes_), ood_proto[None]])
    scores = -torch.cdist(torch.tensor(h), protos)
    pred = torch.tensor(problem.test_ood.logits[:6].argmax(1))
    want = np.stack([torch.autograd.grad(torch.nn.functional.cross_entropy(scores[i:i + 1], pred[i:i + 1]),
                                         ood_proto, retain_graph=True)[0].numpy() for i in range(6)])
    np.testing.assert_allclose(det.gradients(h), want, rtol=1e-8, atol=1e-12)


def test_grood_by_hand():
    """Class means [0,0] and [4,0]; OOD prototype (mean mode) [2,0]. Training samples are the
    two means themselves: distances to ([0,0], [4,0], [2,0]) are (0, 4, 2) and (4, 0, 2), so
    q_o = e⁻²/(1 + e⁻⁴ + e⁻²) and the gradients are q_o·(∓1, 0). A query at [2,2]: distances
    (√8, √8, 2), gradient q'·(0, 1) with q' = e⁻²/(2e^{−√8} + e⁻²)."""
    f = np.array([[0.0, 0.0], [4.0, 0.0]])
    train = Features(features=f, logits=np.array([[1.0, 0.0], [0.0, 1.0]]), labels=np.array([0, 1]))
    det = ood.create("grood", ood_prototype="mean").fit(train)
    np.testing.assert_allclose(det.ood_prototype_, [2.0, 0.0])
    q = np.exp(-2) / (1 + np.exp(-4) + np.exp(-2))
    np.testing.assert_allclose(det.train_gradients_, [[-q, 0.0], [q, 0.0]], rtol=1e-12)
    q2 = np.exp(-2) / (2 * np.exp(-np.sqrt(8)) + np.exp(-2))
    x = Features(features=np.array([[2.0, 2.0]]), logits=np.array([[0.0, 0.0]]))
    np.testing.assert_allclose(det.score(x), [-np.hypot(q, q2)], rtol=1e-12)


def test_grood_refuses_labels_that_never_match_the_logits(problem):
    bad = problem.train.replace(labels=(problem.train.logits.argmax(1) + 1) % problem.num_classes)
    with pytest.raises(ValueError, match="classified correctly"):
        ood.create("grood").fit(bad)


# ------------------------------------------------------------------ CF-OOD
def _brute_cfof(ref, queries, rho, grid):
    """CFOF by its definition: the smallest grid κ for which at least ⌈ρn⌉ reference points
    have the query among their ⌊κn⌋ nearest other reference points (ties count as in)."""
    n = len(ref)
    need = int(np.ceil(rho * n - 1e-9))
    out = []
    for q in queries:
        kappa = 1.0
        for g in grid:
            m = int(g * n - 1) + 1  # neighbourhood size
            if m < 1 or m > n - 1:
                continue
            count = 0
            for i in range(n):
                others = np.sort([np.sum((ref[i] - ref[j]) ** 2) for j in range(n) if j != i])
                count += np.sum((q - ref[i]) ** 2) <= others[m - 1]
            if count >= need:
                kappa = g
                break
        out.append(kappa)
    return np.array(out)


def test_cfood_matches_the_definition():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((25, 3))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    queries = np.vstack([ref[:3] + 0.05 * rng.standard_normal((3, 3)), rng.standard_normal((4, 3))])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    det = ood.create("cfood", reference_fraction=1.0, rho=0.12).fit(Features(features=ref))
    got = det.cfof(Features(features=queries))
    np.testing.assert_allclose(got, _brute_cfof(ref, queries, 0.12, cfof_grid()))
    # scale-free by construction: the features are L2-normalised first
    np.testing.assert_allclose(det.cfof(Features(features=7.0 * queries)), got)


def test_cfood_shares_one_pass_across_planned_rho_values():
    rng = np.random.default_rng(4)
    ref = Features(features=rng.standard_normal((60, 4)))
    queries = Features(features=rng.standard_normal((30, 4)))
    det = ood.create("cfood", reference_fraction=1.0).fit(ref)
    det.plan_score_params({"rho": [0.02, 0.1, 0.3]})  # what the tuner announces
    for rho in (0.3, 0.02, 0.1):
        det.rho = rho
        alone = ood.create("cfood", reference_fraction=1.0, rho=rho).fit(ref)
        np.testing.assert_array_equal(det.score(queries), alone.score(queries))
    assert len(det._cfof_cache_) == 1 and len(next(iter(det._cfof_cache_.values()))) == 3


def test_cfood_fractions_that_reach_max_reference_share_one_fit_in_tuning():
    from oodscope.bench.tuning import tune

    rng = np.random.default_rng(5)
    train = Features(features=rng.standard_normal((400, 4)))
    val_id = Features(features=rng.standard_normal((40, 4)))
    val_ood = Features(features=2.0 + rng.standard_normal((40, 4)))
    space = {"reference_fraction": [0.1, 0.5, 1.0], "rho": [0.05, 0.2]}
    det = ood.create("cfood", max_reference=150)
    # 0.5 and 1.0 of 400 rows are both capped at 150; 0.1 is 40 rows
    assert det.equivalent_fit_params({"reference_fraction": 0.5}, 400) == \
        det.equivalent_fit_params({"reference_fraction": 1.0}, 400)
    assert det.equivalent_fit_params({"reference_fraction": 0.1}, 400) != \
        det.equivalent_fit_params({"reference_fraction": 0.5}, 400)
    result = tune(det, train, val_id, val_ood, space)
    assert result.n_fits == 2
    for row in result.candidates:
        alone = ood.create("cfood", max_reference=150, **row["params"]).fit(train)
        s_id, s_ood = alone.score(val_id), alone.score(val_ood)
        assert row["val_auroc"] == ood.metrics.auroc(s_id, s_ood)


def test_grood_shares_one_search_across_planned_k_values():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 3, 300)
    feats = rng.standard_normal((300, 6)) + 3.0 * np.eye(3, 6)[y]
    train = Features(features=feats, logits=feats[:, :3], labels=y)
    q_feats = rng.standard_normal((50, 6)) * 2.0
    queries = Features(features=q_feats, logits=q_feats[:, :3])
    det = ood.create("grood").fit(train)
    det.plan_score_params({"k": [1, 10, 50]})
    for k in (50, 1, 10):
        det.k = k
        alone = ood.create("grood", k=k).fit(train)
        np.testing.assert_array_equal(det.score(queries), alone.score(queries))
    assert len(det._knn_cache_) == 1 and sorted(next(iter(det._knn_cache_.values()))) == [1, 10, 50]


def test_tuned_grood_scores_test_sets_for_the_chosen_k_only():
    from oodscope.bench.tuning import tune

    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 300)
    feats = rng.standard_normal((300, 6)) + 3.0 * np.eye(3, 6)[y]
    train = Features(features=feats, logits=feats[:, :3], labels=y)
    val_id = Features(features=feats[:40] + 0.1, logits=feats[:40, :3])
    far = rng.standard_normal((40, 6)) * 3.0
    val_ood = Features(features=far, logits=far[:, :3])
    result = tune(ood.create("grood"), train, val_id, val_ood, {"k": [1, 5, 20]})
    assert result.n_fits == 1
    det = result.detector
    det.score(Features(features=far[:7], logits=far[:7, :3]))
    assert list(det._knn_cache_.values())[-1].keys() == {det.k}  # no work for the other k


# ------------------------------------------------------------------ WEBO
def test_webo_by_hand():
    logits = np.array([[0.0, np.log(2.0), 5.0]])
    det = ood.create("webo", energy_weights=[1.0, 0.5, -1.0]).fit()
    # relu(w) = [1, .5, 0]: log(1·1 + .5·2 + 0) = log 2
    np.testing.assert_allclose(det.score(Features(logits=logits)), [np.log(2.0)])
    np.testing.assert_allclose(ood.create("webo", energy_weights=[1, 1, 1]).fit().score(Features(logits=logits)),
                               logsumexp(logits, axis=1))


def test_webo_needs_weights_of_a_vos_network():
    with pytest.raises(ValueError, match="VOS"):
        ood.create("webo").fit()
    with pytest.raises(ValueError, match="at least one"):
        ood.create("webo", energy_weights=[-1.0, 0.0]).fit()
    with pytest.raises(ValueError, match="3 energy weights"):
        ood.create("webo", energy_weights=[1.0, 1.0, 1.0]).fit().score(Features(logits=np.zeros((2, 4))))


# ------------------------------------------------------------------ OpenMax
def test_weibull_fit_is_the_maximum_likelihood_fit():
    rng = np.random.default_rng(0)
    tail = np.sort(rng.weibull(2.0, 40) * 3.0)[-20:]
    shape, log_scale, shift = fit_weibull_high(tail, translate=1.0)
    c, loc, scale = stats.weibull_min.fit(tail + shift, floc=0.0)
    np.testing.assert_allclose([shape, np.exp(log_scale)], [c, scale], rtol=1e-4)
    np.testing.assert_allclose(weibull_cdf(tail, shape, log_scale, shift),
                               stats.weibull_min.cdf(tail + shift, c, scale=scale), rtol=1e-4, atol=1e-9)
    assert shift == pytest.approx(1.0 - tail.min())  # libMR: translate − smallest tail value


def test_openmax_recalibration_by_hand(problem):
    det = ood.create("openmax", alpha=2, distance="euclidean", tail_size=10).fit(problem.train)
    z = problem.test_id.logits[:5].astype(np.float64)
    dist = np.linalg.norm(z[:, None, :] - det.mean_vectors_[None], axis=2)
    w = np.stack([weibull_cdf(dist[:, k], *det.weibull_[k]) for k in range(z.shape[1])], axis=1)
    order = np.argsort(-z, axis=1)
    omega = np.zeros_like(z)
    omega[np.arange(5), order[:, 0]] = 1.0  # alpha = 2: weights 2/2, 1/2
    omega[np.arange(5), order[:, 1]] = 0.5
    kept = z * (1 - omega * w)
    unknown = (z - kept).sum(1, keepdims=True)
    want = -log_softmax(np.hstack([unknown, kept]), axis=1)[:, 0]
    np.testing.assert_allclose(det.score(problem.test_id[:5]), want, rtol=1e-10)
    # the mean activation vector of class c is the mean logit of its correctly classified samples
    t = problem.train
    ok = (t.logits.argmax(1) == t.labels) & (t.labels == 2)
    np.testing.assert_allclose(det.mean_vectors_[2], t.logits[ok].astype(np.float64).mean(0), rtol=1e-10)


# ------------------------------------------------------------------ MC dropout
def test_mc_dropout_by_hand(problem):
    x = problem.test_id[:7]
    logits = x.features.astype(np.float64) @ x.head_weight.T.astype(np.float64) + x.head_bias
    no_drop = ood.create("mc_dropout", p=0.0, n_samples=3).fit()
    np.testing.assert_allclose(no_drop.score(x), softmax(logits, axis=1).max(1), rtol=1e-10)
    det = ood.create("mc_dropout", p=0.5, n_samples=4, random_state=2).fit()
    masks = det.masks(x.features.shape[1])
    assert set(np.unique(masks)) <= {0.0, 2.0}
    probs = [softmax((x.features * m) @ x.head_weight.T.astype(np.float64) + x.head_bias, axis=1) for m in masks]
    mean = np.mean(probs, axis=0)
    np.testing.assert_allclose(det.score(x), mean.max(1), rtol=1e-8)
    ent = det.clone(criterion="entropy").fit().score(x)
    np.testing.assert_allclose(ent, (mean * np.log(mean)).sum(1), rtol=1e-8)
    mi = det.clone(criterion="mutual_info").fit().score(x)
    per_pass = np.mean([(q * np.log(q)).sum(1) for q in probs], axis=0)
    np.testing.assert_allclose(mi, (mean * np.log(mean)).sum(1) - per_pass, rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------ multi-layer aggregation
def test_pool_layer_by_hand():
    a = np.arange(8, dtype=np.float64).reshape(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    np.testing.assert_allclose(pool_layer(a), [[1.5, 5.5]])
    np.testing.assert_allclose(pool_layer(a, "stat"), [[1.5, 5.5, 1.25, 1.25]])


def test_multilayer_reads_what_extract_wrote_and_aggregates_by_hand():
    """``extract(..., layers=[...])`` stores ``"layer:<name>"``; MultiLayer reads exactly that
    and, with "std", averages each layer's score over its calibration std."""
    p = image_problem()
    assert {"layer:block1", "layer:block2"} <= set(p.train.extras)
    det = ood.create("multilayer", detector="mahalanobis", layers=["block1", "features"],
                     calibration_fraction=0.25).fit(p.train)
    assert det.requires == {"layer:block1", "features"}
    assert det.fit_requirements() == {"layer:block1", "features", "labels"}
    perm = np.random.default_rng(0).permutation(len(p.train))
    cal, fit = np.sort(perm[:75]), np.sort(perm[75:])
    x = p.test_ood[:10]
    manual = []
    for arr, arr_x in [(pool_layer(p.train.extras["layer:block1"]), pool_layer(x.extras["layer:block1"])),
                       (p.train.features.astype(np.float64), x.features.astype(np.float64))]:
        m = ood.create("mahalanobis").fit(Features(features=arr[fit].astype(np.float32), labels=p.train.labels[fit]))
        cal_scores = m.score(Features(features=arr[cal].astype(np.float32)))
        manual.append(m.score(Features(features=arr_x.astype(np.float32))) / cal_scores.std())
    np.testing.assert_allclose(det.score(x), np.mean(manual, axis=0), rtol=1e-8)
    mean_agg = det.clone(aggregation="mean").fit(p.train)
    assert ood.metrics.auroc(mean_agg.score(p.test_id), mean_agg.score(p.test_ood)) >= 0.95


@pytest.mark.parametrize("member", ["knn", "mahalanobis", "rmds", "ssd", "cfood", "gmm"])
def test_multilayer_takes_any_feature_space_detector(member):
    p = image_problem()
    det = ood.create("multilayer", detector=member, layers=["block2", "features"]).fit(p.train)
    assert ood.metrics.auroc(det.score(p.test_id), det.score(p.test_ood)) >= 0.9


def test_fisher_p_values_by_hand_and_free_of_units():
    """Calibration scores 1, 2, 3 plus end points one range beyond (−1 and 5) at heights
    1/5 … 5/5; scores in other units give the same p-values."""
    from oodscope.detectors.multilayer import _ecdf_p

    cal, s = np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.5, 3.0, 9.0])
    np.testing.assert_allclose(_ecdf_p(cal, s), [0.3, 0.4, 0.7, 0.8, 1.0])
    np.testing.assert_allclose(_ecdf_p(cal * 1e-30, s * 1e-30), _ecdf_p(cal, s))


def test_multilayer_refuses_what_it_cannot_feed():
    p = image_problem()
    with pytest.raises(ValueError, match="feature-space detector"):
        ood.create("multilayer", detector="energy", layers=["block1"]).fit(p.train)
    with pytest.raises(ValueError, match="layers"):
        ood.create("multilayer").fit(p.train)
    with pytest.raises(ValueError, match=r"layer:block3"):
        ood.create("multilayer", layers=["block3"]).fit(p.train)


def test_fisher_brown_by_hand():
    p = np.array([[0.5, 0.25], [0.1, 0.9]])
    tau = -2 * np.log(p).sum(1)
    mu, var = 5.0, 12.0
    c, k = var / (2 * mu), 2 * mu**2 / var
    np.testing.assert_allclose(fisher_brown(p, mu, var), np.log(stats.chi2.sf(tau / c, k)), rtol=1e-12)
    # independent layers (μ = 2L, σ² = 4L) give Fisher's plain χ²(2L) test
    np.testing.assert_allclose(fisher_brown(p, 4.0, 8.0), np.log(stats.chi2.sf(tau, 4)), rtol=1e-12)


# ------------------------------------------------------------------ SEM
def test_sem_single_component_is_a_gaussian_by_hand():
    """One component, no PCA: log p_high = −½ (h − μ)ᵀ P (h − μ) where P inverts the sample
    covariance plus sklearn's reg_covar (1e-6 of the mean variance: EM runs in units of the
    data's spread), shrunk by 1e-3 towards its mean eigenvalue; the low-level part enters as
    −λ·log p_low."""
    rng = np.random.default_rng(0)
    h = rng.standard_normal((500, 4)) @ rng.standard_normal((4, 4)) + 3.0
    low = rng.standard_normal((500, 3)) * [1.0, 2.0, 0.5]
    train = Features(features=h, extras={"layer:conv1": low})
    x = Features(features=h[:20] + rng.standard_normal((20, 4)), extras={"layer:conv1": low[:20] * 3})
    det = ood.create("sem", layers=["conv1"], low_weight=0.0, high_components=1, low_components=1,
                     high_dim=None, shrinkage=1e-3).fit(train)

    def gauss(z, ref):
        cov = np.cov(ref.T, bias=True)
        d = cov.shape[0]
        cov = cov + 1e-6 * np.trace(cov) / d * np.eye(d)
        cov = (1 - 1e-3) * cov + 1e-3 * np.trace(cov) / d * np.eye(d)
        diff = z - ref.mean(0)
        return -0.5 * np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov), diff)

    high, low_density = det.log_densities(x)
    np.testing.assert_allclose(high, gauss(x.features, h), rtol=1e-6)
    np.testing.assert_allclose(low_density, gauss(x.extras["layer:conv1"], low), rtol=1e-6)
    np.testing.assert_allclose(det.score(x), high)
    np.testing.assert_allclose(det.clone(low_weight=0.5).fit(train).score(x), high - 0.5 * low_density, rtol=1e-10)
