"""CLIP zero-shot detectors on hand-made embeddings: known values, signs, bad input.

No model is involved: text embeddings are passed as arrays (``text_embeds=``), image
embeddings as ``Features(extras={"image_embeds": ...})``. The model plumbing is tested in
test_vlm_backends.py with a tiny random CLIP.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SYNTHETIC_FIELDS

import oodscope as ood
from oodscope import Features
from oodscope.detectors import get_detector_class
from oodscope.detectors.vlm import mine_negatives

VLM_NAMES = ["mcm", "glmcm", "neglabel", "adaneg", "clipn", "cooked"]


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def space():
    """C=4 ID classes and 40 negative words in a 32-d space; ID images near their class
    text, OOD images near negative words."""
    rng = np.random.default_rng(0)
    d, c, m = 32, 4, 40
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    text = basis[:c]
    neg = unit(basis[c : c + 8][rng.integers(0, 8, m)] + 0.3 * rng.standard_normal((m, d)))
    y = rng.integers(0, c, 200)
    img_id = unit(text[y] + 0.6 * rng.standard_normal((200, d)) / np.sqrt(d) * 3)
    img_ood = unit(neg[rng.integers(0, m, 200)] + 0.6 * rng.standard_normal((200, d)) / np.sqrt(d) * 3)
    local_id = unit(text[y][:, None, :] + 0.8 * rng.standard_normal((200, 6, d)) / np.sqrt(d) * 3)
    local_ood = unit(neg[rng.integers(0, m, (200, 6))] + 0.8 * rng.standard_normal((200, 6, d)) / np.sqrt(d) * 3)
    fid = Features(labels=y, extras={"image_embeds": img_id, "local_embeds": local_id})
    food = Features(labels=-np.ones(200, int), extras={"image_embeds": img_ood, "local_embeds": local_ood})
    return dict(text=text, neg=neg, id=fid, ood=food, d=d, c=c, y=y, basis=basis)


def test_all_six_registered_with_reference_and_kept_out_of_synthetic_contract():
    names = ood.list_detectors()
    for n in VLM_NAMES:
        assert n in names
        cls = get_detector_class(n)
        assert cls.reference and ("20" in cls.reference)
        assert "image_embeds" in cls.requires
        assert not cls.all_requirements() <= SYNTHETIC_FIELDS
        for p in cls.search_space:
            assert p in cls._param_names()


# ------------------------------------------------------------------------------ MCM
def test_mcm_equals_manual_softmax(space):
    det = ood.create("mcm", text_embeds=space["text"], temperature=0.5).fit()
    img = space["id"].extras["image_embeds"][:7]
    expected = softmax(img @ space["text"].T / 0.5).max(axis=1)
    np.testing.assert_allclose(det.score(space["id"][:7]), expected, rtol=1e-12)


def test_mcm_normalises_image_embeddings(space):
    det = ood.create("mcm", text_embeds=3.0 * space["text"]).fit()
    f = space["id"][:5]
    scaled = f.replace(extras={"image_embeds": 7.0 * f.extras["image_embeds"]})
    np.testing.assert_allclose(det.score(scaled), det.score(f), rtol=1e-12)


@pytest.mark.parametrize("name", ["mcm", "glmcm", "neglabel", "adaneg"])
def test_sign_id_near_class_text_scores_higher(name, space):
    kw = dict(text_embeds=space["text"])
    if name in ("neglabel", "adaneg"):
        kw.update(neg_text_embeds=space["neg"], n_negatives=20, n_groups=4)
    if name == "mcm" or name == "glmcm":
        kw.update(temperature=0.05)
    det = ood.create(name, **kw).fit()
    s_id, s_ood = det.score(space["id"]), det.score(space["ood"])
    assert s_id.dtype == np.float64 and s_id.shape == (200,)
    assert ood.metrics.auroc(s_id, s_ood) >= 0.9


# ------------------------------------------------------------------------------ GL-MCM
def test_glmcm_adds_local_term(space):
    det = ood.create("glmcm", text_embeds=space["text"], local_weight=0.7, temperature=1.0).fit()
    f = space["id"][:9]
    glob = softmax(f.extras["image_embeds"] @ space["text"].T).max(axis=1)
    loc = softmax(f.extras["local_embeds"] @ space["text"].T).max(axis=(1, 2))
    np.testing.assert_allclose(det.score(f), glob + 0.7 * loc, rtol=1e-6)
    mcm = ood.create("mcm", text_embeds=space["text"]).fit()
    zero = ood.create("glmcm", text_embeds=space["text"], local_weight=0.0).fit()
    np.testing.assert_allclose(zero.score(f), mcm.score(f), rtol=1e-12)


def test_glmcm_needs_local_embeds(space):
    det = ood.create("glmcm", text_embeds=space["text"]).fit()
    f = Features(extras={"image_embeds": space["id"].extras["image_embeds"][:3]})
    with pytest.raises(ValueError, match="local_embeds"):
        det.score(f)


# ------------------------------------------------------------------------------ NegLabel
def test_neglabel_without_negatives_is_one(space):
    det = ood.create("neglabel", text_embeds=space["text"], n_negatives=0).fit()
    np.testing.assert_array_equal(det.score(space["ood"][:10]), np.ones(10))
    det = ood.create("neglabel", text_embeds=space["text"],
                     neg_text_embeds=np.zeros((0, space["d"]))).fit()
    np.testing.assert_array_equal(det.score(space["id"][:10]), np.ones(10))


def test_neglabel_ungrouped_matches_formula(space):
    tau = 0.05
    det = ood.create("neglabel", text_embeds=space["text"], neg_text_embeds=space["neg"],
                     n_negatives=40, n_groups=1, temperature=tau).fit()
    img = space["ood"].extras["image_embeds"][:6]
    e_id = np.exp(img @ space["text"].T / tau).sum(axis=1)
    e_neg = np.exp(img @ space["neg"].T / tau).sum(axis=1)
    np.testing.assert_allclose(det.score(space["ood"][:6]), e_id / (e_id + e_neg), rtol=1e-10)


def test_neglabel_grouped_is_mean_over_groups(space):
    tau = 0.05
    det = ood.create("neglabel", text_embeds=space["text"], neg_text_embeds=space["neg"],
                     n_negatives=40, n_groups=4, temperature=tau).fit()
    assert len(det.groups_) == 4
    assert sorted(np.concatenate(det.groups_).tolist()) == list(range(40))
    img = space["ood"].extras["image_embeds"][:6]
    e_id = np.exp(img @ space["text"].T / tau).sum(axis=1)
    per = [e_id / (e_id + np.exp(img @ det.neg_text_[g].T / tau).sum(axis=1)) for g in det.groups_]
    np.testing.assert_allclose(det.score(space["ood"][:6]), np.mean(per, axis=0), rtol=1e-10)


def test_neglabel_grouping_nearly_seed_invariant():
    rng = np.random.default_rng(3)
    d = 48
    text = unit(rng.standard_normal((5, d)))
    neg = unit(rng.standard_normal((2000, d)))
    imgs = unit(np.concatenate([text[rng.integers(0, 5, 300)] + 0.9 * rng.standard_normal((300, d)) / np.sqrt(d) * 4,
                                rng.standard_normal((300, d))]))
    f = Features(extras={"image_embeds": imgs})
    scores = [ood.create("neglabel", text_embeds=text, neg_text_embeds=neg, n_negatives=2000,
                         n_groups=20, group_seed=s, temperature=0.05).fit().score(f) for s in (0, 1, 2)]
    aurocs = [ood.metrics.auroc(s[:300], s[300:]) for s in scores]
    assert max(aurocs) - min(aurocs) < 0.01
    assert np.max(np.abs(scores[0] - scores[1])) < 0.05
    # but the grouping is not a no-op: different seeds give (slightly) different numbers
    assert not np.allclose(scores[0], scores[1])


def test_negmining_selects_words_farthest_from_id():
    # 2-d toy table: ID labels on the x axis; words at known angles
    id_emb = unit([[1.0, 0.0], [1.0, 0.1]])
    angles = np.deg2rad([10, 170, 90, 45, 135, 180])
    words = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    idx = mine_negatives(words, id_emb, 3, percentile=0.95)
    assert set(idx.tolist()) == {1, 4, 5}  # the three farthest from the x axis
    assert idx[0] in (1, 5)  # most distant first
    det = ood.create("neglabel", text_embeds=id_emb, neg_text_embeds=words,
                     words=["w10", "w170", "w90", "w45", "w135", "w180"], n_negatives=3, n_groups=1).fit()
    assert set(det.neg_words_) == {"w170", "w135", "w180"}


def test_negmining_percentile_uses_quantile_of_similarities():
    id_emb = np.eye(3)
    words = unit([[1.0, 0.0, 0.0], [0.6, 0.6, 0.5]])
    # max similarity: word0 1.0, word1 0.6 -> percentile 1 keeps word1;
    # min similarity: word0 0.0, word1 0.5 -> percentile 0 keeps word0
    assert mine_negatives(words, id_emb, 1, percentile=1.0).tolist() == [1]
    assert mine_negatives(words, id_emb, 1, percentile=0.0).tolist() == [0]


# ------------------------------------------------------------------------------ AdaNeg
def _adaneg(space, **kw):
    base = dict(text_embeds=space["text"], neg_text_embeds=space["neg"], n_negatives=20, n_groups=4,
                temperature=0.05)
    base.update(kw)
    return ood.create("adaneg", **base).fit()


def test_adaneg_with_empty_memory_equals_neglabel(space):
    neg = ood.create("neglabel", text_embeds=space["text"], neg_text_embeds=space["neg"],
                     n_negatives=20, n_groups=4, temperature=0.05).fit()
    ada = _adaneg(space, gap=1.0)  # thresholds 1 and 0: nothing is ever written
    both = Features.concat([space["id"], space["ood"]])
    np.testing.assert_allclose(ada.score(both), neg.score(both), rtol=1e-12)
    assert ada.memory_counts.sum() == 0


def test_adaneg_is_stateful_reset_and_deterministic(space):
    ada = _adaneg(space, stream_batch_size=16, memory_size=3)
    stream = Features.concat([space["id"][:60], space["ood"][:60]])
    first = ada.score(stream)
    counts = ada.memory_counts
    assert counts.sum() > 0 and counts.max() <= 3
    second = ada.score(stream)  # memory continues: different numbers
    assert not np.allclose(first, second)
    ada.reset()
    assert ada.memory_counts.sum() == 0
    np.testing.assert_allclose(ada.score(stream), first, rtol=1e-12)  # same order, same scores
    # reset_each_call makes calls independent; score_stream chains batches of one stream
    indep = _adaneg(space, stream_batch_size=16, memory_size=3, reset_each_call=True)
    np.testing.assert_allclose(indep.score(stream), first, rtol=1e-12)
    np.testing.assert_allclose(indep.score(stream), first, rtol=1e-12)
    chained = _adaneg(space, stream_batch_size=16, memory_size=3)
    parts = list(chained.score_stream([stream[:48], stream[48:]]))
    np.testing.assert_allclose(np.concatenate(parts), first, rtol=1e-12)
    # refitting clears the memory too
    ada.fit()
    assert ada.memory_counts.sum() == 0


def test_adaneg_order_dependence_is_real(space):
    stream = Features.concat([space["id"][:40], space["ood"][:40]])
    rev = stream[np.arange(len(stream))[::-1]]
    a = _adaneg(space, stream_batch_size=8).score(stream)
    b = _adaneg(space, stream_batch_size=8).score(rev)[::-1]
    assert not np.allclose(a, b)


def test_adaneg_memory_writes_to_predicted_labels_and_replaces_high_entropy(space):
    ada = _adaneg(space, stream_batch_size=1, memory_size=1, threshold=0.5, gap=0.5)
    c = space["c"]
    # a confident ID sample goes to its class slot
    x = Features(extras={"image_embeds": space["text"][[2]]})
    s = ada.score(x)
    assert ada.memory_count_[2] == 1 and ada.memory_count_.sum() == 1
    assert s[0] > 0.5
    # a sample exactly on negative word j goes to that word's slot
    j = 5
    ada.score(Features(extras={"image_embeds": ada.neg_text_[[j]]}))
    assert ada.memory_count_[c + j] == 1
    # slot full (size 1): a lower-entropy sample replaces, a higher-entropy one does not
    stored = ada.memory_entropy_[2, 0]
    mixed = unit(space["text"][[2]] + 0.45 * space["text"][[1]])
    ada.score(Features(extras={"image_embeds": mixed}))
    if ada.memory_entropy_[2, 0] != stored:  # only if the mixed sample was written at all
        pytest.fail("a higher-entropy sample replaced a lower-entropy one")
    np.testing.assert_allclose(ada.memory_[2, 0], space["text"][2], atol=1e-6)


def test_adaneg_task_and_sample_proxies_both_rank_well(space):
    both = Features.concat([space["id"], space["ood"]])
    for proxy in ("task", "sample"):
        s = _adaneg(space, proxy=proxy, stream_batch_size=32).score(both)
        assert ood.metrics.auroc(s[:200], s[200:]) >= 0.9


# ------------------------------------------------------------------------------ CLIPN
def test_clipn_ctw_and_atd_match_formulas(space):
    rng = np.random.default_rng(1)
    no = unit(rng.standard_normal(space["text"].shape))
    f = space["id"][:8]
    img = f.extras["image_embeds"]
    l_yes, l_no = 100 * img @ space["text"].T, 100 * img @ no.T
    p_yes = 1.0 / (1.0 + np.exp(l_no - l_yes))
    pred = l_yes.argmax(axis=1)
    ctw = ood.create("clipn", text_embeds=space["text"], no_text_embeds=no, rule="ctw").fit()
    atd = ood.create("clipn", text_embeds=space["text"], no_text_embeds=no, rule="atd").fit()
    np.testing.assert_allclose(ctw.score(f), p_yes[np.arange(8), pred], rtol=1e-9)
    np.testing.assert_allclose(atd.score(f), (softmax(l_yes) * p_yes).sum(axis=1), rtol=1e-9)


@pytest.mark.parametrize("rule", ["ctw", "atd"])
def test_clipn_sign(rule, space):
    # OOD images lie in a subspace orthogonal to the class texts; the "no" texts point into it
    rng = np.random.default_rng(5)
    c, d = space["c"], space["d"]
    sub = space["basis"][c : c + 8]
    img_ood = unit(rng.random((200, 8)) @ sub + 0.5 * rng.standard_normal((200, d)) / np.sqrt(d))
    no = unit(sub.sum(axis=0)[None, :] + 0.3 * space["text"])
    det = ood.create("clipn", text_embeds=space["text"], no_text_embeds=no, rule=rule).fit()
    s_ood = det.score(Features(extras={"image_embeds": img_ood}))
    assert ood.metrics.auroc(det.score(space["id"]), s_ood) >= 0.95


def test_clipn_needs_no_embeddings(space):
    with pytest.raises(ValueError, match="'no' text embeddings"):
        ood.create("clipn", text_embeds=space["text"]).fit()
    with pytest.raises(ValueError, match="one 'no' row per class"):
        ood.create("clipn", text_embeds=space["text"], no_text_embeds=space["text"][:2]).fit()


# ------------------------------------------------------------------------------ COOkeD
def _cooked_problem(seed=0, n=240):
    """Text embeddings span dims 0-2; image embeddings live in dims 3-7, so zero-shot CLIP
    sees cos = 0 for every class (uniform probabilities) while a probe can separate them."""
    rng = np.random.default_rng(seed)
    c, d = 3, 8
    text = np.eye(d)[:c]
    centres = np.eye(d)[3:6]
    y = rng.integers(0, c, n)
    img = centres[y] + 0.15 * rng.standard_normal((n, d)) * (np.arange(d) >= 3)
    return text, img, y


def test_cooked_two_uniform_members_follow_the_third():
    text, img, y = _cooked_problem()
    train = Features(labels=y, extras={"image_embeds": img})
    _, test_img, test_y = _cooked_problem(seed=1, n=60)
    logits = np.zeros((60, 3))  # uniform classifier
    f = Features(logits=logits, labels=test_y, extras={"image_embeds": test_img})
    det = ood.create("cooked", text_embeds=text, probe_epochs=60, probe_batch_size=32).fit(train)
    p = det.probabilities(f)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    probe_only = ood.create("cooked", text_embeds=text, members=("probe",), probe_epochs=60,
                            probe_batch_size=32).fit(train)
    p_probe = probe_only.probabilities(f)
    np.testing.assert_allclose(p, (2.0 / 3.0) * (1.0 / 3.0) + p_probe / 3.0, rtol=1e-9)
    assert np.mean(p.argmax(axis=1) == test_y) > 0.95  # the probe decides
    np.testing.assert_allclose(det.score(f), 2.0 / 9.0 + p_probe.max(axis=1) / 3.0, rtol=1e-9)


def test_cooked_entropy_rule_and_members():
    text, img, y = _cooked_problem()
    train = Features(labels=y, extras={"image_embeds": img})
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((10, 3))
    f = Features(logits=logits, extras={"image_embeds": img[:10]})
    det = ood.create("cooked", text_embeds=text, members=("classifier", "clip"), rule="entropy").fit()
    p = (softmax(logits) + softmax(100 * unit(img[:10]) @ text.T)) / 2
    np.testing.assert_allclose(det.score(f), (p * np.log(p)).sum(axis=1), rtol=1e-9)
    with pytest.raises(ValueError, match="members"):
        ood.create("cooked", text_embeds=text, members=("classifier", "oracle")).fit(train)
    # without the classifier member no logits are needed; with it they are
    no_cls = ood.create("cooked", text_embeds=text, members=("clip",)).fit()
    g = Features(extras={"image_embeds": img[:10]})
    np.testing.assert_allclose(no_cls.score(g), softmax(100 * unit(img[:10]) @ text.T).max(axis=1), rtol=1e-9)
    with pytest.raises(ValueError, match="logits"):
        det.score(g)


def test_cooked_sign(space):
    rng = np.random.default_rng(0)
    text, c = space["text"], space["c"]
    train_y = rng.integers(0, c, 200)
    train_img = unit(text[train_y] + 0.6 * rng.standard_normal((200, space["d"])) / np.sqrt(space["d"]) * 3)
    train = Features(labels=train_y, extras={"image_embeds": train_img})
    logits_id = 5.0 * np.eye(c)[space["y"]]
    logits_ood = rng.standard_normal((200, c)) * 0.3
    fid = space["id"].replace(logits=logits_id)
    food = space["ood"].replace(logits=logits_ood)
    det = ood.create("cooked", text_embeds=text, probe_epochs=30).fit(train)
    assert ood.metrics.auroc(det.score(fid), det.score(food)) >= 0.9


def test_cooked_rejects_mismatched_classifier(space):
    text = space["text"]
    det = ood.create("cooked", text_embeds=text, members=("classifier", "clip")).fit()
    f = space["id"][:4].replace(logits=np.zeros((4, 7)))
    with pytest.raises(ValueError, match="classes must match class_names"):
        det.score(f)
    with pytest.raises(ValueError, match="image_embeds"):
        ood.create("cooked", text_embeds=text).fit()  # the probe needs ID training data


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name", VLM_NAMES)
def test_empty_and_duplicate_class_names(name, space):
    extra = {"no_text_embeds": space["text"]} if name == "clipn" else {}
    with pytest.raises(ValueError, match="class_names is empty"):
        ood.create(name, text_embeds=space["text"], class_names=[], **extra).fit()
    with pytest.raises(ValueError, match="duplicates"):
        ood.create(name, text_embeds=space["text"], class_names=["cat", "dog", "Cat", "car"], **extra).fit()
    with pytest.raises(ValueError, match="one row per class"):
        ood.create(name, text_embeds=space["text"], class_names=["cat", "dog"], **extra).fit()
    with pytest.raises(ValueError, match="encoder"):
        ood.create(name).fit()


@pytest.mark.parametrize("name", ["mcm", "glmcm", "neglabel", "adaneg", "clipn", "cooked"])
def test_text_and_image_width_mismatch(name, space):
    kw = dict(text_embeds=space["text"][:, :16])
    if name == "clipn":
        kw["no_text_embeds"] = space["text"][:, :16]
    if name in ("neglabel", "adaneg"):
        kw["n_negatives"] = 0
    if name == "cooked":
        kw["members"] = ("classifier", "clip")
    det = ood.create(name, **kw).fit()
    f = space["id"][:3].replace(logits=np.zeros((3, space["c"])))
    with pytest.raises(ValueError, match="width"):
        det.score(f)


def test_negative_embeddings_of_other_width_are_rejected(space):
    with pytest.raises(ValueError, match="width"):
        ood.create("neglabel", text_embeds=space["text"], neg_text_embeds=space["neg"][:, :10]).fit()


def test_word_list_missing_or_empty(tmp_path, space):
    with pytest.raises(ValueError, match="does not exist"):
        ood.create("neglabel", text_embeds=space["text"], neg_text_embeds=space["neg"],
                   words=tmp_path / "nope.txt").fit()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n\n")
    with pytest.raises(ValueError, match="no words"):
        ood.create("neglabel", text_embeds=space["text"], neg_text_embeds=space["neg"], words=empty).fit()


def test_bad_hyperparameters(space):
    t = space["text"]
    for name, kw in [("mcm", {"temperature": 0}), ("neglabel", {"n_groups": 0}),
                     ("neglabel", {"percentile": 1.5}), ("adaneg", {"proxy": "both"}),
                     ("adaneg", {"gap": 2.0}), ("clipn", {"rule": "xyz", "no_text_embeds": t}),
                     ("cooked", {"rule": "max"})]:
        with pytest.raises(ValueError):
            ood.create(name, text_embeds=t, n_negatives=0, **kw).fit() if name in ("neglabel", "adaneg") \
                else ood.create(name, text_embeds=t, **kw).fit()


def test_neglabel_needs_a_source_of_negatives(space):
    with pytest.raises(ValueError, match="neg_text_embeds"):
        ood.create("neglabel", text_embeds=space["text"]).fit()


def test_adaneg_score_mixed_is_a_seeded_shuffled_stream(space):
    ada = _adaneg(space, stream_batch_size=8)
    fid, food = space["id"][:50], space["ood"][:50]
    s_id, s_ood = ada.score_mixed(fid, food, seed=3)
    assert s_id.shape == (50,) and s_ood.shape == (50,)
    again = _adaneg(space, stream_batch_size=8).score_mixed(fid, food, seed=3)
    np.testing.assert_array_equal(again[0], s_id)
    # the same thing by hand: reset, score the permuted concatenation, undo the permutation
    both = Features(extras={"image_embeds": np.concatenate([fid.extras["image_embeds"],
                                                             food.extras["image_embeds"]])})
    order = np.random.default_rng(3).permutation(100)
    ada.reset()
    manual = np.empty(100)
    manual[order] = ada.score(both[order])
    np.testing.assert_allclose(manual[:50], s_id, rtol=1e-12)
    assert ood.metrics.auroc(s_id, s_ood) >= 0.9
    # ID first, then OOD: the same as one call on the concatenation after a reset
    f_id, f_ood = ada.score_mixed(fid, food, order="id_first")
    ada.reset()
    np.testing.assert_allclose(np.concatenate([f_id, f_ood]), ada.score(both), rtol=1e-12)
    with pytest.raises(ValueError, match="order"):
        ada.score_mixed(fid, food, order="random")
    assert type(ada).stateful and not getattr(ood.detectors.get_detector_class("neglabel"), "stateful", False)


@pytest.mark.parametrize("proxy", ["task", "sample"])
def test_adaneg_proxy_score_matches_direct_formula(proxy, space):
    ada = _adaneg(space, proxy=proxy, memory_size=3, beta=5.5, n_groups=1)
    rng = np.random.default_rng(4)
    d, c = space["d"], space["c"]
    filled = {0: 3, 2: 1, c + 1: 2}  # two ID classes and one negative label hold entries
    for lab, k in filled.items():
        ada.memory_[lab, :k] = unit(rng.standard_normal((k, d))).astype(np.float32)
        ada.memory_count_[lab] = k
    img = unit(rng.standard_normal((5, d)))
    got = ada._adaptive(img)
    anchors = np.concatenate([ada.id_text_, ada.neg_text_])
    tau = ada.temperature
    expected = []
    for x in img:
        logits = []
        for lab in range(len(anchors)):
            entries = np.concatenate([anchors[[lab]], ada.memory_[lab, :filled.get(lab, 0)]])
            if proxy == "task":
                p = entries.mean(axis=0)
            else:
                w = np.exp(-5.5 * (1 - entries @ x))
                p = (w[:, None] * entries).sum(axis=0) / w.sum()
            logits.append(x @ unit(p) / tau)
        logits = np.array(logits)
        e = np.exp(logits - logits.max())
        expected.append(e[:c].sum() / e.sum())
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # an empty memory gives proxies = text anchors: S_ada equals NegLabel
    ada.reset()
    neg = ood.create("neglabel", text_embeds=space["text"], neg_text_embeds=space["neg"],
                     n_negatives=20, n_groups=1, temperature=0.05).fit()
    np.testing.assert_allclose(ada._adaptive(img), neg.score(Features(extras={"image_embeds": img})),
                               rtol=1e-5)


def test_runner_scores_adaneg_as_seeded_mixed_streams(space):
    """The benchmark runner resets AdaNeg's memory per OOD set and scores that set mixed
    with the test ID set (seeded), so its numbers equal score_mixed's."""
    from oodscope.bench.runner import run
    from oodscope.bench.spec import FeatureSet
    from oodscope.metrics import evaluate

    fid, food = space["id"], space["ood"]
    fs = FeatureSet(train=fid[:40], val_id=fid[40:100], val_ood=food[:60], test_id=fid[100:],
                    far_ood={"neg-a": food[60:130], "neg-b": food[130:]})
    ada = _adaneg(space, stream_batch_size=16, memory_size=3)
    res = run(fs, [ada], tune_params=False, ci=False, seed=7, progress=False)
    rows = res.results.set_index("ood_set")
    for name, f in fs.far_ood.items():
        s_id, s_ood = _adaneg(space, stream_batch_size=16, memory_size=3).score_mixed(fs.test_id, f, seed=7)
        np.testing.assert_allclose(res.scores["adaneg"][name], s_ood, rtol=1e-12)
        assert rows.loc[name, "auroc"] == pytest.approx(evaluate(s_id, s_ood)["auroc"], abs=1e-12)
