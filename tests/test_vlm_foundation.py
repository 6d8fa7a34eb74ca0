"""Foundation-model-driven methods: SynOOD, ANTS, TagOOD (plumbing on tiny random models).

The diffusion model, the MLLM and the tagging model are replaced by a randomly initialised
in-painting net (`TinyInpaintGenerator`), a retrieval "describer" over a word list
(`RuleBasedDescriber`) and a random tagger (`TinyTagger`). What is checked: each method's
own mechanism against an independent computation (energy guidance moves the score towards
its target, the ANTS threshold / label generation / λ rules, TagOOD's token selection), the
scores against brute-force formulas, and the sign of every detector (ID above OOD on the
example problems of tests/detector_examples.py). Nothing here reproduces a paper's number.
"""

from __future__ import annotations

import numpy as np
import pytest

import oodscope as ood
from oodscope import Features

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from detector_examples import TUNED_VLM, fitted_example  # noqa: E402
from test_vlm_prompts import NAMES, WORDS, _images, clip  # noqa: E402,F401

from oodscope.vlm import ants as A  # noqa: E402
from oodscope.vlm import synood as S  # noqa: E402
from oodscope.vlm import tagood as T  # noqa: E402
from oodscope.vlm.mllm import RuleBasedDescriber, parse_numbered_list  # noqa: E402


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("name", TUNED_VLM)
def test_detector_ranks_in_distribution_above_ood(name):
    """Fails if a detector's sign flips (the contract suite's sign test covers only the
    detectors the synthetic problem feeds)."""
    det, _, x = fitted_example(name)
    s = det.score(x)
    half = len(x) // 2
    assert ood.metrics.auroc(s[:half], s[half:]) >= 0.9


# ----------------------------------------------------------------------------- describers
def _word_space(d=16, seed=0):
    rng = np.random.default_rng(seed)
    vocab = {}

    def embed(texts):
        if not len(texts):
            return np.zeros((0, d))
        for t in texts:
            if t not in vocab:
                vocab[t] = rng.normal(size=d)
        return _unit(np.stack([vocab[t] for t in texts]))

    return embed


def test_rule_based_describer_answers_by_retrieval_and_avoids_the_named_class():
    embed = _word_space()
    words = ["cat", "catfish", "dog", "tree", "rock", "lamp"]
    desc = RuleBasedDescriber(words, embed, n_words=2)
    img = embed(["cat"]) + 0.01 * embed(["rock"])
    answer = desc.describe(None, img, ["cat"])[0]
    assert "cat" not in answer and len(answer.split(" and ")) == 2
    similar = desc.similar_labels(["dog"], k=3)[0]
    assert len(similar) == 3 and "dog" not in similar
    assert desc.context(None, embed(["tree"]) + embed(["lamp"]), ["tree"])[0].split(", ")[0] == "lamp"
    assert parse_numbered_list("1. wolf\n2. fox 3. coyote.") == ["wolf", "fox", "coyote"]
    assert parse_numbered_list("wolf, fox, coyote") == ["wolf", "fox", "coyote"]


# ----------------------------------------------------------------------------- SynOOD
def test_energy_guided_synthesis_moves_the_score_towards_its_target(clip):  # noqa: F811
    _, enc = clip
    images, y = _images(6, "id", 11)
    logits_fn = S.clip_logits_fn(enc, NAMES)
    gen = S.TinyInpaintGenerator(size=32, seed=0)
    prompts = [f"A photo only remain {w}." for w in WORDS[:6]]
    start = S.boundary_energy(logits_fn(S._to_batch(images, 32))).mean().item()
    target = start - 0.05
    out, energy, history = S.synthesize_near_boundary(gen, images, prompts, logits_fn, iters=6, lr=3000.0,
                                                      target_energy=target, batch_size=3)
    assert out.dtype == np.uint8 and out.shape == (6, 32, 32, 3) and energy.shape == (6,)
    assert history[-1] < 0.1 * history[0], history  # the guidance reduces (E_target - E)^2
    # without guidance (one round) the result is the seeded generation, reproducibly
    a = S.synthesize_near_boundary(gen, images, prompts, logits_fn, iters=1, target_energy=target, batch_size=3)
    b = S.synthesize_near_boundary(gen, images, prompts, logits_fn, iters=1, target_energy=target, batch_size=3)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2][0] == pytest.approx(history[0])  # round 0 of the guided run is that generation
    with pytest.raises(ValueError, match="prompts"):
        S.synthesize_near_boundary(gen, images, prompts[:2], logits_fn)


def test_synood_training_mines_labels_tunes_them_and_scores_with_the_projection(clip):  # noqa: F811
    _, enc = clip
    # embeddings placed near the text embeddings: the random tiny CLIP maps every test image
    # to nearly one point, which would give one mined label and nothing to learn
    rng = np.random.default_rng(0)
    neg0 = enc.encode_text(WORDS, ("The nice {}.",)).astype(np.float64)
    id0 = enc.encode_text(NAMES, ("The nice {}.",)).astype(np.float64)
    y = np.arange(24) % 3
    id_f = Features(labels=y, extras={"image_embeds": _unit(id0[y] + 0.3 * rng.normal(size=(24, 16)))})
    ood_f = Features(extras={"image_embeds": _unit(neg0[np.arange(24) % 4] + 0.3 * rng.normal(size=(24, 16)))})
    desc = RuleBasedDescriber(WORDS, lambda t: enc.encode_text(t))
    prompts = S.context_prompts(desc, None, ood_f.extras["image_embeds"], ["cat"] * 24)
    assert all(p.startswith("A photo only remain ") and p.endswith(".") for p in prompts)
    res = S.train_synood(enc, NAMES, id_f, ood_f, neg_words=WORDS, proj_epochs=15, label_epochs=15,
                         batch_size=8, proj_lr=1e-2, label_lr=0.5)
    mined = S.mine_ood_labels(ood_f.extras["image_embeds"], neg0)
    np.testing.assert_array_equal(res["tuned_labels"], np.unique(mined))
    untouched = np.setdiff1d(np.arange(len(WORDS)), res["tuned_labels"])
    np.testing.assert_allclose(res["neg_text"][untouched], neg0[untouched], atol=1e-6)
    assert not np.allclose(res["neg_text"][res["tuned_labels"]], neg0[res["tuned_labels"]], atol=1e-4)
    for stage in ("projection", "labels"):
        h = [r["loss"] for r in res.history if r["stage"] == stage]
        assert h[-1] < h[0], (stage, h)
    det = ood.create("synood", prompts=res, n_groups=1).fit()
    x = ood_f.extras["image_embeds"][:5].astype(np.float64)
    proj = S._projection(16, 0)
    with torch.no_grad():
        proj[0].weight.copy_(torch.as_tensor(res["proj_weight"]))
        proj[0].bias.copy_(torch.as_tensor(res["proj_bias"]))
        proj[1].weight.copy_(torch.as_tensor(res["ln_weight"]))
        proj[1].bias.copy_(torch.as_tensor(res["ln_bias"]))
        xp = S.project(torch.as_tensor(_unit(x), dtype=torch.float32), proj).double().numpy()
    t = 1.0 / res.config["logit_scale"]
    e_id, e_neg = np.exp(xp @ res["id_text"].T / t), np.exp(xp @ _unit(res["neg_text"]).T / t)
    want = e_id.sum(1) / (e_id.sum(1) + e_neg.sum(1))
    np.testing.assert_allclose(det.score(Features(extras={"image_embeds": x})), want, rtol=1e-5)


# ----------------------------------------------------------------------------- ANTS
def test_grouped_id_mass_matches_brute_force():
    rng = np.random.default_rng(0)
    img, idt, neg = _unit(rng.normal(size=(4, 8))), _unit(rng.normal(size=(3, 8))), _unit(rng.normal(size=(23, 8)))
    got = A.grouped_id_mass(img, idt, neg, 0.1, group_len=5, seed=3)
    perm = np.random.default_rng(3).permutation(23)[:20].reshape(4, 5)  # 4 groups of 5, 3 dropped
    e_id = np.exp(img @ idt.T / 0.1).sum(1)
    want = np.mean([e_id / (e_id + np.exp(img @ neg[g].T / 0.1).sum(1)) for g in perm], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.all(A.grouped_id_mass(img, idt, neg[:0], 0.1, 5) == 1.0)


def _ants_problem(seed=0):
    rng = np.random.default_rng(seed)
    d, c = 24, 4
    embed = _word_space(d, seed)
    names = ["wolf", "fox", "owl", "oak"]
    words = [f"w{i}" for i in range(60)]
    id_text, neg_text = embed(names), embed(words[:30])
    far_words = words[30:]

    def batch(n, frac_ood):
        k = int(n * frac_ood)
        idx = rng.integers(0, c, n - k)
        ins = _unit(id_text[idx] + 0.4 * rng.normal(size=(n - k, d)))
        outs = _unit(embed([far_words[i] for i in rng.integers(0, 30, k)]) + 0.4 * rng.normal(size=(k, d)))
        return np.concatenate([ins, outs])

    desc = RuleBasedDescriber(far_words + names, embed, n_words=1)  # one word: its own embedding
    return names, id_text, neg_text, embed, desc, batch


def test_ants_stream_follows_the_threshold_generation_and_weighting_rules():
    names, id_text, neg_text, embed, desc, batch = _ants_problem()
    stream = A.ANTSStream(id_text, names, neg_text, embed, desc, group_len=5, min_queue=6, ens_stop_step=2,
                          near_start=2, near_every=3, n_frequent=2, n_similar=3, temperature=0.05)
    mass = lambda x: A.grouped_id_mass(_unit(x), stream.id_text, stream.neg_text, 0.05, 5)  # noqa: E731
    first = batch(5, 0.0)  # fewer than min_queue low scores: no generation yet
    np.testing.assert_allclose(stream.score(first), mass(first), rtol=1e-12)  # far = near = NegLabel
    assert stream.rounds == 0 and len(stream.far_text) == 0
    second = batch(30, 0.5)
    conf = np.concatenate([mass(first), mass(second)])
    assert np.sum(conf < 0.8) > 6  # the queue passes min_queue: one generation round
    stream.score(second)
    bins = np.arange(0, 1.1, 0.1)
    counts, _ = np.histogram(conf, bins)
    upper = bins[int(np.argmax(np.abs(np.diff(counts)))) + 1]
    assert stream.threshold == pytest.approx(np.percentile(conf[conf < upper], 50))
    assert stream.rounds == 1 and len(stream.far_text) == len(stream.far_words) > 0
    assert all(w not in names for w in stream.far_words)
    for _ in range(3):
        stream.score(batch(20, 0.5))
    assert stream.rounds == 2  # ens_stop_step caps the generation rounds
    top = [c for c, _ in stream.predictions.most_common(2)]
    want = list(dict.fromkeys(w for ws in desc.similar_labels([names[c] for c in top], 3) for w in ws))
    assert sorted(stream.near_words) == sorted(want) and len(stream.near_text) == len(want)
    a, b = 1 - np.mean(stream.far_history), 1 - np.mean(stream.near_history)
    assert stream.weight == pytest.approx(a / (a + b))
    # the frozen space scores a new batch as the stream's far-only / near-only branches do
    nxt = batch(10, 0.5)
    det_far = ood.create("ants", prompts=stream.space(), far_weight=1.0).fit()
    det_near = ood.create("ants", prompts=stream.space(), far_weight=0.0).fit()
    far, _ = stream._far_scores(_unit(nxt), None)
    near, _ = stream._near_scores(_unit(nxt), None)
    np.testing.assert_allclose(det_far.score(Features(extras={"image_embeds": nxt})), far, rtol=1e-10)
    np.testing.assert_allclose(det_near.score(Features(extras={"image_embeds": nxt})), near, rtol=1e-10)
    with pytest.raises(ValueError, match="weighting"):
        A.ANTSStream(id_text, names, neg_text, embed, desc, weighting="both")


def test_ants_far_negatives_lower_the_score_of_ood_like_images():
    names, id_text, neg_text, embed, desc, batch = _ants_problem(1)
    stream = A.ANTSStream(id_text, names, neg_text[:0], embed, desc, group_len=5, min_queue=10,
                          weighting="far", temperature=0.05, init_threshold=1.01)
    for _ in range(3):
        stream.score(batch(40, 0.5))
    assert len(stream.far_text) > 0
    probe_id, probe_ood = batch(30, 0.0), batch(30, 1.0)
    fresh = A.ANTSStream(id_text, names, neg_text[:0], embed, desc, weighting="far", temperature=0.05)
    before = ood.metrics.auroc(fresh.score(probe_id), fresh.score(probe_ood))
    det = ood.create("ants", prompts=stream.space(), far_weight=1.0).fit()
    after = ood.metrics.auroc(det.score(Features(extras={"image_embeds": probe_id})),
                              det.score(Features(extras={"image_embeds": probe_ood})))
    assert before == 0.5 and after > 0.9  # no negatives: every score is 1; MLLM labels separate


# ----------------------------------------------------------------------------- TagOOD
def _fake_tagger(logits, attention, embeds):
    return lambda images: {"logits": logits[:len(images)], "attention": attention[:len(images)],
                           "patch_embeds": embeds[:len(images)]}


def test_tag_features_select_object_tokens_as_the_authors_do():
    rng = np.random.default_rng(0)
    n, t, p, d = 3, 5, 6, 4
    logits = np.array([[0.9, 0.1, 0.7, 0.2, 0.95],   # ID tags 0 and 2 pass; tag 4 is not an ID tag
                       [0.1, 0.3, 0.2, 0.9, 0.9],    # no ID tag passes
                       [0.2, 0.1, 0.6, 0.1, 0.1]])
    attn = rng.random((n, t, p))
    emb = rng.normal(size=(n, p, d)).astype(np.float32)
    test_f = T.tag_features(_fake_tagger(logits, attn, emb), [None] * n, id_tags=[0, 2], labels=None)
    norm = lambda a: (a - a.min()) / (a.max() - a.min())  # noqa: E731
    keep0 = np.maximum(norm(attn[0, 0]), norm(attn[0, 2])) > 0.5
    np.testing.assert_array_equal(test_f.extras["tag_mask"][0], keep0.astype(np.float32))
    np.testing.assert_array_equal(test_f.extras["tag_tokens"][0][keep0], emb[0][keep0])
    assert np.all(test_f.extras["tag_tokens"][0][~keep0] == 0)
    assert test_f.extras["tag_confidence"][0] == pytest.approx(0.9)
    assert test_f.extras["tag_mask"][1].sum() == 0 and test_f.extras["tag_confidence"][1] == 0  # test: no tokens
    train_f = T.tag_features(_fake_tagger(logits, attn, emb), [None] * n, id_tags=[0, 2], labels=[0, 1, 1],
                             train=True)
    keep1 = norm(attn[1, 2]) > 0.5  # train fallback: the most confident ID tag (tag 2, 0.2 > 0.1)
    np.testing.assert_array_equal(train_f.extras["tag_mask"][1], keep1.astype(np.float32))
    assert train_f.extras["tag_confidence"][1] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="id_tags"):
        T.tag_features(_fake_tagger(logits, attn, emb), [None] * n, id_tags=[7])


def test_tagood_end_to_end_on_a_tiny_tagger():
    tagger = T.TinyTagger(n_tags=6, dim=8, patch=8, size=32, seed=0)
    train, y = _images(30, "id", 0)
    test_id, _ = _images(12, "id", 1)
    test_ood, _ = _images(12, "ood", 2)
    kw = dict(id_tags=[0, 1, 2], thresholds=0.0)
    f_train = T.tag_features(tagger, train, labels=y, train=True, **kw)
    det = ood.create("tagood", hidden=16, layers=1, heads=2, n_patterns=2, epochs=30, batch_size=16, lr=3e-3,
                     dropout=0.0).fit(f_train)
    assert det.history_[-1]["loss"] < det.history_[0]["loss"]
    assert det.history_[-1]["accuracy"] > 1 / 3
    s = det.score(Features.concat([T.tag_features(tagger, test_id, **kw), T.tag_features(tagger, test_ood, **kw)]))
    assert s.shape == (24,) and np.all(np.isfinite(s))
    empty = T.tag_features(tagger, test_ood, id_tags=[0, 1, 2], thresholds=1.0)  # no tag passes: no tokens
    assert np.all(det.score(empty) == 0.0)


def test_tagood_score_is_the_centre_cosine_times_the_tag_confidence():
    det, train, x = fitted_example("tagood")
    with torch.no_grad():
        f = det.net_.features(torch.from_numpy(x.extras["tag_tokens"]),
                              torch.from_numpy(x.extras["tag_mask"] > 0.5)).double().numpy()
    f = _unit(f.reshape(len(f), *det.centres_.shape[1:]))
    want = np.einsum("nkh,ckh->nck", f, _unit(det.centres_)).mean(2).max(1) * x.extras["tag_confidence"]
    np.testing.assert_allclose(det.score(x), want, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        ood.create("tagood", hidden=10, heads=4).fit(train)
