"""Hand-checked values for the distance-based detectors (brute-force numpy references)."""

from __future__ import annotations

import numpy as np
import pytest

import oodscope as ood
from oodscope import Features
from oodscope._numeric import l2_normalize, logsumexp, shrunk_covariance_inverse, softmax
from oodscope.detectors.distance import knn_recall_at_k, vim_default_dim


def _tiny(seed=0, n=90, d=6, c=3, offset=3.0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 2, (c, d)) + offset
    y = np.arange(n) % c
    x = means[y] + rng.normal(0, 1, (n, d)) * rng.uniform(0.3, 2.0, d)
    w = rng.normal(0, 1, (c, d))
    b = rng.normal(0, 1, c)
    f = Features(logits=x @ w.T + b, features=x, labels=y, head_weight=w, head_bias=b)
    xt = means[rng.integers(0, c, 25)] + rng.normal(0, 1.5, (25, d))
    t = Features(logits=xt @ w.T + b, features=xt, head_weight=w, head_bias=b)
    return f, t


def _maha(x, mean, prec):
    diff = x - mean
    return np.einsum("ni,ij,nj->n", diff, prec, diff)


# ------------------------------------------------------------------ Gaussian family
def test_mahalanobis_matches_brute_force():
    train, test = _tiny()
    x, y = train.features.astype(np.float64), train.labels
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    centred = x - means[y]
    cov = centred.T @ centred / len(x)  # within-class scatter / N (total sample count)
    prec = shrunk_covariance_inverse(cov, 1e-3)
    q = test.features.astype(np.float64)
    expected = -np.min(np.stack([_maha(q, m, prec) for m in means], 1), 1)
    det = ood.create("mahalanobis", shrinkage=1e-3).fit(train)
    np.testing.assert_allclose(det.covariance_, cov, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(det.means_, means, rtol=1e-12)
    np.testing.assert_allclose(det.score(test), expected, rtol=1e-4)


def test_mahalanobis_covariance_divides_by_total_count():
    # two classes, each a pair of points ±1 around its mean along axis 0: scatter is 4 in
    # that direction, N = 4 samples, C = 2 classes, N - C = 2
    x = np.array([[9.0, 0], [11, 0], [-11, 1], [-9, 1]])
    f = Features(features=x, labels=[0, 0, 1, 1], meta={"num_classes": 2})
    det = ood.create("mahalanobis").fit(f)
    assert det.covariance_[0, 0] == pytest.approx(4.0 / 4)


def test_rmds_matches_brute_force_and_sign():
    train, test = _tiny(seed=1)
    x, y = train.features.astype(np.float64), train.labels
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    centred = x - means[y]
    prec = shrunk_covariance_inverse(centred.T @ centred / len(x), 1e-3)
    mu0 = x.mean(0)
    prec0 = shrunk_covariance_inverse((x - mu0).T @ (x - mu0) / len(x), 1e-3)
    q = test.features.astype(np.float64)
    md = np.stack([_maha(q, m, prec) for m in means], 1)
    expected = -np.min(md - _maha(q, mu0, prec0)[:, None], 1)
    det = ood.create("rmds").fit(train)
    np.testing.assert_allclose(det.score(test), expected, rtol=1e-7, atol=1e-9)
    # a point on a class mean beats a point equally far from the background but between classes
    assert det.score(Features(features=means[:1]))[0] > det.score(Features(features=mu0[None]))[0]


def test_rmds_single_class_is_refused():
    train, _ = _tiny()
    one = train[train.labels == 0]
    with pytest.raises(ValueError, match="two classes"):
        ood.create("rmds").fit(one)


def test_ssd_matches_brute_force_and_aliases():
    train, test = _tiny(seed=2)
    xn = l2_normalize(train.features.astype(np.float64), axis=1)
    m, s = xn.mean(0), xn.std(0)
    z = (xn - m) / s
    prec = shrunk_covariance_inverse(z.T @ z / len(z), 1e-3)
    zq = (l2_normalize(test.features.astype(np.float64), axis=1) - m) / s
    expected = -_maha(zq, z.mean(0), prec)
    for name in ("ssd", "palm_score", "onecls_mahalanobis"):
        det = ood.create(name).fit(train)
        np.testing.assert_allclose(det.score(test), expected, rtol=1e-4)
    assert ood.create("palm_score").name == "ssd"


@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "ssd", "vim", "residual"])
def test_chunked_fit_equals_unchunked(name, tmp_path):
    """Streaming over float16 memmap chunks gives the in-memory statistics to 1e-8."""
    rng = np.random.default_rng(3)
    n, d, c = 403, 16, 4
    y = rng.integers(0, c, n)
    x = (rng.normal(0, 1, (c, d))[y] * 3 + 50.0 + rng.normal(0, 1, (n, d))).astype(np.float16)
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    mm.flush()
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    w, b = rng.normal(0, 1, (c, d)), rng.normal(0, 1, c)
    kw = {"dim": 8} if name in ("vim", "residual") else {}

    def feats(arr):
        return Features(
            logits=np.asarray(arr, np.float32) @ w.T + b,
            features=arr,
            labels=y,
            head_weight=w,
            head_bias=b,
        )

    whole = ood.create(name, **kw).fit(feats(x.astype(np.float32)))
    chunked = ood.create(name, chunk_size=37, **kw).fit(feats(mm))
    attrs = {
        "mahalanobis": ["means_", "covariance_", "precision_"],
        "rmds": ["means_", "covariance_", "background_covariance_"],
        "ssd": ["mean_", "std_", "covariance_"],
        "vim": ["origin_", "alpha_"],
        "residual": ["origin_"],
    }[name]
    for attr in attrs:
        np.testing.assert_allclose(
            getattr(chunked, attr), getattr(whole, attr), rtol=1e-8, atol=1e-12
        )
    if name in ("vim", "residual"):  # compare subspaces, not eigenvector signs
        p1 = whole.residual_basis_ @ whole.residual_basis_.T
        p2 = chunked.residual_basis_ @ chunked.residual_basis_.T
        np.testing.assert_allclose(p1, p2, atol=1e-8)
    test = feats(x.astype(np.float32))[:50]
    np.testing.assert_allclose(chunked.score(test), whole.score(test), rtol=1e-5, atol=1e-6)


def test_accumulator_is_accurate_with_large_offset():
    """Shifted accumulation keeps float64 accuracy when features sit far from the origin."""
    from oodscope.detectors._stats import ScatterAccumulator

    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 5000)
    x = 1e4 + rng.normal(0, 1e-2, (5000, 4)) + y[:, None]
    acc = ScatterAccumulator(4, 3)
    for s in range(0, 5000, 999):
        acc.update(x[s : s + 999], y[s : s + 999])
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    exact = (x - means[y]).T @ (x - means[y])
    np.testing.assert_allclose(
        acc.within_scatter(), exact, rtol=1e-8, atol=1e-8 * np.abs(exact).max()
    )
    total = (x - x.mean(0)).T @ (x - x.mean(0))
    np.testing.assert_allclose(
        acc.total_scatter(), total, rtol=1e-8, atol=1e-8 * np.abs(total).max()
    )


# --------------------------------------------------------------------------- KNN
def _brute_kth(train, test, k):
    a = l2_normalize(train.astype(np.float64), axis=1)
    q = l2_normalize(test.astype(np.float64), axis=1)
    dist = np.linalg.norm(q[:, None, :] - a[None], axis=2)
    return np.sort(dist, axis=1)[:, k - 1]


@pytest.mark.parametrize("backend", ["numpy", "auto"])
@pytest.mark.parametrize("k", [1, 5, 17])
def test_knn_matches_brute_force(backend, k):
    train, test = _tiny(seed=5)
    det = ood.create("knn", k=k, backend=backend).fit(train)
    np.testing.assert_allclose(
        det.score(test), -_brute_kth(train.features, test.features, k), atol=2e-4
    )


def test_knn_subsample_and_k_limits():
    train, test = _tiny(seed=6)
    assert ood.create("knn", k=3, subsample=0.5).fit(train).bank_size_ == 45
    assert ood.create("knn", k=3, subsample=20).fit(train).bank_size_ == 20
    with pytest.raises(ValueError, match="exceeds"):
        ood.create("knn", k=30, subsample=20).fit(train)
    for bad in [
        dict(k=0),
        dict(index="annoy"),
        dict(storage="int4"),
        dict(target_recall=1.5),
        dict(probe_size=0),
        dict(subsample=1.5),
        dict(subsample=0),
        dict(backend="numpy", index="ivf"),
    ]:
        with pytest.raises(ValueError):
            ood.create("knn", **bad).fit(train)


def test_knn_float16_memmap_bank(tmp_path):
    train, test = _tiny(seed=14)
    half = train.features.astype(np.float16)
    np.save(tmp_path / "bank.npy", half)
    mm = np.load(tmp_path / "bank.npy", mmap_mode="r")
    got = ood.create("knn", k=4).fit(Features(features=mm)).score(test)
    np.testing.assert_allclose(
        got, -_brute_kth(half.astype(np.float64), test.features, 4), atol=2e-4
    )


def test_knn_approximate_index_and_recall():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(7)
    bank = rng.normal(0, 1, (3000, 16)).astype(np.float32)
    queries = rng.normal(0, 1, (200, 16)).astype(np.float32)
    # probing every cell makes IVF exhaustive: recall must be exactly 1
    assert knn_recall_at_k(bank, queries, k=10, index="ivf", nlist=20, nprobe=20) == 1.0
    low = knn_recall_at_k(bank, queries, k=10, index="ivf", nlist=50, nprobe=1)
    assert 0.0 < low < 1.0
    f = Features(features=bank)
    det = ood.create("knn", k=10, index="ivf", nlist=20, nprobe=20).fit(f)
    assert det.recall_at_k(queries, f) == 1.0
    exact = ood.create("knn", k=10).fit(f).score(Features(features=queries))
    np.testing.assert_allclose(det.score(Features(features=queries)), exact, atol=1e-5)
    with pytest.warns(RuntimeWarning, match="ivfpq"):  # PQ codes cap the recall below 0.99
        pq = ood.create("knn", k=10, index="ivfpq", nlist=8, nprobe=8).fit(f)
    assert 0.2 < pq.recall_at_k(queries, f) <= 1.0


# -------------------------------------------------------------------- ViM / residual
def test_vim_default_dims():
    assert vim_default_dim(2048) == 1000 and vim_default_dim(1536) == 1000
    assert vim_default_dim(768) == 512 and vim_default_dim(1024) == 512
    assert vim_default_dim(512) == 256 and vim_default_dim(64) == 32


def test_vim_residual_is_orthogonal_and_score_matches():
    train, test = _tiny(seed=8, d=8)
    det = ood.create("vim", dim=3).fit(train)
    w, b = train.head_weight.astype(np.float64), train.head_bias.astype(np.float64)
    u = -np.linalg.pinv(w) @ b
    np.testing.assert_allclose(det.origin_, u, rtol=1e-10)
    np.testing.assert_allclose(w @ u + b, 0.0, atol=1e-9)  # u maps to zero logits
    ns = det.residual_basis_
    np.testing.assert_allclose(ns.T @ ns, np.eye(5), atol=1e-10)
    # residual basis is the bottom eigenspace of the second moment about u
    xc = train.features.astype(np.float64) - u
    vals, vecs = np.linalg.eigh(xc.T @ xc / len(xc))
    principal = vecs[:, -3:]
    np.testing.assert_allclose(principal.T @ ns, 0.0, atol=1e-8)
    qc = test.features.astype(np.float64) - u
    res = np.linalg.norm(qc - qc @ principal @ principal.T, axis=1)
    alpha = (
        train.logits.max(1).mean()
        / np.linalg.norm(xc - xc @ principal @ principal.T, axis=1).mean()
    )
    assert det.alpha_ == pytest.approx(alpha, rel=1e-5)
    np.testing.assert_allclose(
        det.score(test), logsumexp(test.logits, 1) - alpha * res, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        ood.create("residual", dim=3).fit(train).score(test), -res, rtol=1e-5
    )


def test_residual_sign_off_subspace():
    """Samples leaving the training subspace score lower (the generic far-OOD test cannot
    show this: its OOD differs from ID only inside the principal subspace)."""
    rng = np.random.default_rng(9)
    d, c = 32, 4
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    inside, outside = basis[:, :8], basis[:, 8:]
    w = rng.normal(size=(c, d)) @ inside @ inside.T
    b = np.zeros(c)

    def make(n, off):
        x = rng.normal(size=(n, 8)) @ inside.T * 3 + off * rng.normal(size=(n, d - 8)) @ outside.T
        return Features(logits=x @ w.T, features=x, head_weight=w, head_bias=b)

    det = ood.create("residual", dim=8).fit(make(500, 0.1))
    auc = ood.metrics.auroc(det.score(make(200, 0.1)), det.score(make(200, 1.0)))
    assert auc > 0.99


def test_vim_rejects_dim_too_large_and_no_residual():
    train, _ = _tiny(d=6)
    with pytest.raises(ValueError, match="dim"):
        ood.create("vim", dim=6).fit(train)
    flat = train.replace(features=np.ones_like(train.features))
    with pytest.raises(ValueError, match="principal subspace"):
        ood.create("vim", dim=3).fit(flat)


# ------------------------------------------------------------------ other scores
def test_fdbd_matches_direct_loop():
    train, test = _tiny(seed=10)
    w, b = test.head_weight.astype(np.float64), test.head_bias.astype(np.float64)
    mu = train.features.astype(np.float64).mean(0)
    expected = []
    for z in test.features.astype(np.float64):
        logits = w @ z + b
        yhat = int(np.argmax(logits))
        dists = [
            abs((w[yhat] - w[c]) @ z + b[yhat] - b[c]) / np.linalg.norm(w[yhat] - w[c])
            for c in range(len(w))
            if c != yhat
        ]
        expected.append(np.mean(dists) / np.linalg.norm(z - mu))
    det = ood.create("fdbd").fit(train)
    np.testing.assert_allclose(det.score(test), expected, rtol=1e-4)


def test_she_matches_brute_force_with_fallback():
    train, test = _tiny(seed=11)
    x, y = train.features.astype(np.float64), train.labels
    pred = train.logits.argmax(1)
    patterns = []
    for c in range(3):
        ok = (y == c) & (pred == c)
        patterns.append(x[ok].mean(0) if ok.any() else x[y == c].mean(0))
    patterns = np.stack(patterns)
    expected = np.einsum(
        "ij,ij->i", test.features.astype(np.float64), patterns[test.logits.argmax(1)]
    )
    det = ood.create("she").fit(train)
    np.testing.assert_allclose(det.score(test), expected, rtol=1e-5)
    # a class the network never gets right falls back to the mean of its samples
    wrong = train.replace(logits=np.roll(train.logits, 1, axis=1) * 0 + np.eye(3)[(y + 1) % 3])
    det = ood.create("she").fit(wrong)
    np.testing.assert_allclose(det.patterns_[1], x[y == 1].mean(0), rtol=1e-10)


def test_nnguide_matches_brute_force():
    train, test = _tiny(seed=12)
    guide = (
        l2_normalize(train.features.astype(np.float64), axis=1)
        * logsumexp(train.logits, 1)[:, None]
    )
    sims = l2_normalize(test.features.astype(np.float64), axis=1) @ guide.T
    expected = logsumexp(test.logits, 1) * np.sort(sims, axis=1)[:, ::-1][:, :7].mean(1)
    for backend in ("numpy", "auto"):
        det = ood.create("nnguide", k=7, backend=backend).fit(train)
        np.testing.assert_allclose(det.score(test), expected, rtol=1e-4, atol=1e-5)


def test_relation_matches_brute_force():
    train, test = _tiny(seed=13)
    a = l2_normalize(train.features.astype(np.float64), axis=1)
    pa = softmax(train.logits, 1)
    q = l2_normalize(test.features.astype(np.float64), axis=1)
    pq = softmax(test.logits, 1)
    expected = []
    for zi, pi in zip(q, pq):
        rel = np.maximum(a @ zi, 0) * (pa @ pi)
        expected.append(np.sum(np.where(rel > 0.03, rel, 0) ** 4))
    det = ood.create("relation", pow=4).fit(train)
    np.testing.assert_allclose(det.score(test), expected, rtol=1e-4)


def test_relation_skips_only_bank_blocks_below_the_threshold(monkeypatch):
    """A confident 8-class network: the pruned sum equals the brute-force sum, and most
    (query, bank block) pairs are never computed."""
    rng = np.random.default_rng(21)
    c, n = 8, 6000
    y = rng.integers(0, c, n)
    feats = rng.standard_normal((n, 16)) + 4.0 * np.eye(c, 16)[y]
    logits = 12.0 * np.eye(c)[y] + rng.standard_normal((n, c))
    logits[:50] = rng.standard_normal((50, c))  # a few unsure rows: blocks that stay active
    train = Features(features=feats.astype(np.float32), logits=logits.astype(np.float32))
    yq = rng.integers(0, c, 300)
    q_logits = 12.0 * np.eye(c)[yq] + rng.standard_normal((300, c))
    test = Features(features=(rng.standard_normal((300, 16)) + 4.0 * np.eye(c, 16)[yq]).astype(np.float32),
                    logits=q_logits.astype(np.float32))
    det = ood.create("relation", pow=2).fit(train)

    import oodscope.detectors.distance as distance

    pairs = []
    power = distance._power
    monkeypatch.setattr(distance, "_power", lambda a, p: pairs.append(a.size) or power(a, p))
    got = det.score(test)
    a = l2_normalize(train.features.astype(np.float64), axis=1)
    pa = softmax(train.logits.astype(np.float64), 1)
    q = l2_normalize(test.features.astype(np.float64), axis=1)
    pq = softmax(test.logits.astype(np.float64), 1)
    rel = np.maximum(q @ a.T, 0) * (pq @ pa.T)
    expected = np.sum(np.where(rel > 0.03, rel, 0) ** 2, axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # the 8 blocks holding the unsure rows relate to every query (8 x ~230 x 300 pairs);
    # without pruning all 6000 x 300 pairs are computed
    assert 0 < sum(pairs) < 0.4 * n * len(test)


def test_parameter_validation():
    train, _ = _tiny()
    for name, bad in [
        ("mahalanobis", dict(shrinkage=1.0)),
        ("mahalanobis", dict(chunk_size=0)),
        ("vim", dict(dim=0)),
        ("relation", dict(pow=0)),
        ("nnguide", dict(k=0)),
        ("ssd", dict(shrinkage=-0.1)),
    ]:
        with pytest.raises(ValueError):
            ood.create(name, **bad).fit(train)


def test_knn_without_faiss_falls_back_to_exact_numpy(monkeypatch):
    import oodscope.detectors.distance as distance

    monkeypatch.setattr(distance, "_import_faiss", lambda: None)
    train, test = _tiny(seed=15)
    det = ood.create("knn", k=3).fit(train)
    assert det.index_.index is None and det.index_.bank is not None
    np.testing.assert_allclose(
        det.score(test), -_brute_kth(train.features, test.features, 3), atol=2e-4
    )
    with pytest.raises(ValueError, match="needs faiss"):
        ood.create("knn", k=3, index="ivf").fit(train)


def test_knn_search_cache_serves_smaller_k_without_searching():
    """Tuning over k reuses one search: a second call with a smaller k slices the first."""
    from oodscope import Features, create

    rng = np.random.default_rng(0)
    train = Features(features=rng.standard_normal((300, 16)).astype(np.float32))
    test = Features(features=rng.standard_normal((40, 16)).astype(np.float32))
    det = create("knn", k=20).fit(train)
    s20 = det.score(test)
    calls = []
    index = det.index_
    original = index.index.search if index.index is not None else None
    if original is not None:
        index.index.search = lambda q, k: calls.append(k) or original(q, k)
    det.k = 5
    s5 = det.score(test)
    assert calls == []  # served from the k=20 result
    np.testing.assert_allclose(s5, create("knn", k=5).fit(train).score(test), rtol=1e-6)
    assert not np.allclose(s5, s20)
    index._cache.clear()  # without the stored result the index is searched again
    det.score(test)
    assert calls == [5] or original is None
