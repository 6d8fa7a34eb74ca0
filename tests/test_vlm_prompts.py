"""CLIP prompt tuning (LAPT, Local-Prompt, KR-NFT, CMA) on a tiny random CLIP.

Plumbing only: a randomly initialised 2-layer CLIP cannot reproduce the papers' numbers.
What is checked: the few-shot protocol, that gradients reach exactly the tuned parameters,
that each method's training objective moves its own training data the right way (so a
sign error in a loss or a train/score mismatch fails), the scores against brute-force
formulas, persistence without pickle, and the `oodscope train-prompts` entry point.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import oodscope as ood
from oodscope import Features

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_vlm_backends import build_tiny_clip  # noqa: E402

from oodscope.vlm import prompt_tuning as pt  # noqa: E402
from oodscope.vlm.prompts import (  # noqa: E402
    FewShotProtocol,
    PromptableText,
    PromptResult,
    crop_views,
    load_prompts,
    save_prompts,
)

NAMES = ["cat", "dog", "tree"]
WORDS = ["apple", "stone", "cloud", "river", "chair", "lamp", "bread", "sock", "mud", "fog"]
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230]])
CTX = "x y z w"  # four one-character tokens in the tiny tokenizer, like "a photo of a" in CLIP's


def _images(n, kind, seed):
    """Grey 40x40 images with a 24x24 square: a class colour (``"id"``, labels 0-2 cycled), or
    (``"ood"``, labels 0-1 cycled) a random texture or black-and-white stripes."""
    rng = np.random.default_rng(seed)
    out = []
    stripes = np.repeat((np.arange(24) // 3 % 2 * 255.0)[:, None, None], 24, axis=1).repeat(3, axis=2)
    for i in range(n):
        img = np.full((40, 40, 3), 128.0) + rng.normal(0, 10, (40, 40, 3))
        x0, y0 = rng.integers(0, 16, 2)
        if kind == "id":
            patch = COLOURS[i % 3] + rng.normal(0, 10, 3)
        else:
            patch = rng.integers(0, 255, (24, 24, 3)) if i % 2 == 0 else stripes
        img[y0:y0 + 24, x0:x0 + 24] = patch
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out, np.arange(n) % (3 if kind == "id" else 2)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-clip-prompts")
    build_tiny_clip(d)
    torch.set_num_threads(1)
    return d, ood.vlm.load(f"hf:{d}")


@pytest.fixture(scope="module")
def data(clip):
    _, enc = clip
    train, y = _images(30, "id", 0)
    neg, y_neg = _images(20, "ood", 3)  # textures are WORDS[0], stripes WORDS[1]
    return dict(train=train, y=y, feats=ood.vlm.extract(enc, (train, y), progress=False),
                neg=neg, neg_feats=ood.vlm.extract(enc, (neg, y_neg), progress=False))


def _auroc_gap(det, pos, neg):
    return ood.metrics.auroc(det.score(pos), det.score(neg))


# ----------------------------------------------------------------------------- protocol
def test_few_shot_protocol_is_stratified_seeded_and_strict():
    y = np.repeat(np.arange(4), [5, 6, 7, 3])
    p = FewShotProtocol(3, seed=1)
    idx = p.select(y)
    assert np.bincount(y[idx]).tolist() == [3, 3, 3, 3]
    np.testing.assert_array_equal(idx, FewShotProtocol(3, seed=1).select(y))
    assert not np.array_equal(idx, FewShotProtocol(3, seed=2).select(y))
    with pytest.raises(ValueError, match="fewer than 4"):
        FewShotProtocol(4).select(y)
    assert np.bincount(y[FewShotProtocol(4, allow_fewer=True).select(y)]).tolist() == [4, 4, 4, 3]
    assert len(FewShotProtocol(None).select(y)) == len(y)
    with pytest.raises(ValueError, match="positive integer"):
        FewShotProtocol(0)


# ----------------------------------------------------------------------------- text tower
def test_context_initialised_from_text_reproduces_the_hand_prompt(clip):
    _, enc = clip
    text = PromptableText(enc, 4)
    ctx = text.init_context(init_text=CTX)
    learned = text.encode(NAMES, ctx).detach().numpy()
    np.testing.assert_allclose(learned, enc.encode_text(NAMES, (CTX + " {}.",)), atol=1e-5)
    per_class = text.init_context(count=3, init_text=CTX)
    np.testing.assert_allclose(text.encode(NAMES, per_class).detach().numpy(), learned, atol=1e-6)
    with pytest.raises(ValueError, match="exactly n_ctx"):
        text.init_context(init_text="a photo of a")  # 9 character tokens here


def test_gradients_reach_the_context_and_the_towers_stay_untouched(clip, data):
    _, enc = clip
    text = PromptableText(enc, 4)
    ctx = text.init_context(seed=0)
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    flags = [p.requires_grad for p in enc.model.parameters()]
    loss = text.encode(NAMES, ctx)[:, 0].sum()
    loss.backward()
    assert ctx.grad is not None and float(ctx.grad.abs().sum()) > 0
    enc.model.zero_grad(set_to_none=True)
    pt.train_lapt(enc, NAMES, data["feats"], neg_words=WORDS, ctx_init=CTX, epochs=1, batch_size=16)
    assert [p.requires_grad for p in enc.model.parameters()] == flags
    for k, v in enc.model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- methods
def test_lapt_separates_its_id_and_negative_training_images(clip, data):
    _, enc = clip
    ident = PromptResult("lapt", NAMES, {"id_text": enc.encode_text(NAMES, (CTX + " {}.",)),
                                         "neg_text": enc.encode_text(WORDS, (CTX + " {}.",))}, list(WORDS),
                         config={"logit_scale": enc.logit_scale})
    start = ood.create("lapt", prompts=ident, n_groups=1).fit()  # = the untrained context
    res = pt.train_lapt(enc, NAMES, data["feats"], neg_features=data["neg_feats"], neg_words=WORDS,
                        ctx_init=CTX, class_specific=True, epochs=60, batch_size=16, lr=0.01)
    det = ood.create("lapt", prompts=res, n_groups=1).fit()
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    before = _auroc_gap(start, data["feats"], data["neg_feats"])
    after = _auroc_gap(det, data["feats"], data["neg_feats"])
    assert after > before + 0.05 and after > 0.7, (before, after)
    assert res["ctx"].shape == (len(NAMES) + len(WORDS), 4, 32)
    assert res.config["negative_images"] == "images"


def test_lapt_without_negative_images_uses_text_and_mines_negatives(clip, data):
    _, enc = clip
    res = pt.train_lapt(enc, NAMES, data["feats"], words=WORDS, n_negatives=4, n_score_negatives=7, ctx_init=CTX,
                        epochs=1)
    ranked, _ = pt.mine_negative_words(enc, NAMES, WORDS, 7)
    # trains on the 4 farthest mined labels, scores with the 7 farthest through the learned context
    assert res.config["train_neg_words"] == ranked[:4] and res.neg_words == ranked
    assert res.config["negative_images"] == "text-embeddings"
    assert res["neg_text"].shape == (7, 16)
    text = PromptableText(enc, 4)
    np.testing.assert_allclose(res["neg_text"], text.encode(ranked, torch.as_tensor(res["ctx"])).detach().numpy(),
                               atol=1e-5)
    with pytest.raises(ValueError, match="class-specific"):
        pt.train_lapt(enc, NAMES, data["feats"], neg_words=WORDS[:3], score_neg_words=WORDS, class_specific=True,
                      ctx_init=CTX, epochs=1)


def test_mixing_lambda_is_folded_to_at_most_one_half():
    rng = np.random.default_rng(0)
    lams = [pt._mix_lambda(rng, 1.0) for _ in range(200)]
    assert max(lams) <= 0.5 and min(lams) >= 0.0 and np.mean(lams) == pytest.approx(0.25, abs=0.05)


def test_schedule_warms_up_then_anneals_to_the_floor():
    p = torch.nn.Parameter(torch.zeros(1))
    opt, sched = pt._optimizer([p], "sgd", 0.1, 0.0, steps=10, warmup=2, warmup_lr=1e-5, min_lr=1e-3)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([1e-5, 1e-5]) and lrs[2] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 1e-3


def _crops(enc, images, y, n_views, local):
    """The training crops the methods select: most and least similar to the class prompt."""
    g, loc = crop_views(enc, images, n_views=n_views, seed=0, local=local)
    sim = np.einsum("nvd,nd->nv", g, enc.encode_text(NAMES, ("a photo of a {}.",))[y])
    order = np.argsort(-sim, axis=1)
    rows = np.arange(len(g))
    pick = lambda a, j: a[rows, order[:, j]]  # noqa: E731
    pos = {"image_embeds": pick(g, 0)}
    neg = {"image_embeds": pick(g, -1)}
    if local:
        pos["local_embeds"], neg["local_embeds"] = pick(loc, 0), pick(loc, -1)
    return Features(extras=pos), Features(extras=neg)


def test_local_prompt_ranks_its_positive_crops_above_its_negative_crops(clip, data):
    _, enc = clip
    p = FewShotProtocol(4)
    idx = p.select(data["y"])
    pos, neg = _crops(enc, [data["train"][i] for i in idx], data["y"][idx], 6, True)
    kw = dict(protocol=p, n_ctx=4, n_neg_prompts=4, n_views=8, num_pos=2, topk=4, batch_size=12)
    start = pt.train_local_prompt(enc, NAMES, data["train"], data["y"], epochs=1, lr=1e-12, **kw)
    res = pt.train_local_prompt(enc, NAMES, data["train"], data["y"], epochs=30, lr=0.05, **kw)
    before = _auroc_gap(ood.create("local_prompt", prompts=start, topk=4).fit(), pos, neg)
    after = _auroc_gap(ood.create("local_prompt", prompts=res, topk=4).fit(), pos, neg)
    # fresh crops every epoch make the epoch loss noisy; the separation is what must move
    assert len(res.history) == 30 and after > before + 0.1, (before, after)
    with pytest.raises(ValueError, match="num_pos"):
        pt.train_local_prompt(enc, NAMES, data["train"], data["y"], epochs=1, **{**kw, "num_pos": 8})


def _log_odds_gap(det, pos, neg):
    """mean logit(ID mass) of the positive crops minus that of the negative crops."""
    lo = lambda s: np.log(s) - np.log1p(-s)  # noqa: E731
    return float(np.mean(lo(det.score(pos))) - np.mean(lo(det.score(neg))))


def test_krnft_separates_its_id_crops_from_its_ood_crops(clip, data):
    """KR-NFT's loss raises the ID mass of the crops most like their class and lowers it for
    the least alike: the log-odds gap between the two grows (scores saturate near 1 on this
    random CLIP, so the gap is measured on the log-odds, not by AUROC)."""
    _, enc = clip
    p = FewShotProtocol(4)
    idx = p.select(data["y"])
    pos, neg = _crops(enc, [data["train"][i] for i in idx], data["y"][idx], 16, False)
    kw = dict(protocol=p, neg_words=WORDS, n_views=16, n_selection=4, n_groups=1, batch_size=4)
    start = pt.train_krnft(enc, NAMES, data["train"], data["y"], epochs=1, lr=1e-12, **kw)
    res = pt.train_krnft(enc, NAMES, data["train"], data["y"], epochs=20, lr=5e-3, **kw)
    before = _log_odds_gap(ood.create("krnft", prompts=start, n_groups=1).fit(), pos, neg)
    after = _log_odds_gap(ood.create("krnft", prompts=res, n_groups=1).fit(), pos, neg)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert after > before + 0.05, (before, after)
    # the OOD term alone lowers the ID mass of the least class-like crops
    only_out = pt.train_krnft(enc, NAMES, data["train"], data["y"], epochs=20, lr=5e-3, in_weight=0.0, **kw)
    s0 = ood.create("krnft", prompts=start, n_groups=1).fit().score(neg)
    s1 = ood.create("krnft", prompts=only_out, n_groups=1).fit().score(neg)
    assert s1.mean() < s0.mean()
    with pytest.raises(ValueError, match="n_selection"):
        pt.train_krnft(enc, NAMES, data["train"], data["y"], **{**kw, "n_views": 4, "n_selection": 3})


def test_cma_loss_reduces_to_flyp_and_fine_tuning_leaves_the_input_model_alone(clip, data):
    _, enc = clip
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    f = torch.nn.functional
    logits = 10 * f.normalize(img, dim=-1) @ f.normalize(txt, dim=-1).T
    flyp = 0.5 * (f.cross_entropy(logits, torch.arange(6)) + f.cross_entropy(logits.T, torch.arange(6)))
    assert torch.allclose(pt.cma_loss(img, txt, 10.0, 0.0), flyp)
    reg = -0.5 * (torch.logsumexp(logits, 1).mean() + torch.logsumexp(logits.T, 1).mean())
    assert torch.allclose(pt.cma_loss(img, txt, 10.0, 0.5), flyp + 0.5 * reg)
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    tuned, res = pt.train_cma(enc, NAMES, data["train"], data["y"], neg_words=WORDS, epochs=15, batch_size=15,
                              lr=1e-3, warmup_steps=2)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert all(torch.equal(v, before[k]) for k, v in enc.model.state_dict().items())
    assert not torch.equal(tuned.model.visual_projection.weight, enc.model.visual_projection.weight)
    # the result holds the *fine-tuned* text tower's embeddings
    np.testing.assert_allclose(res["id_text"], tuned.encode_text(NAMES, ("The nice {}.",)), atol=1e-6)
    det = ood.create("cma", prompts=res).fit()
    assert det.score(ood.vlm.extract(tuned, np.stack(data["train"][:5]), progress=False)).shape == (5,)


# ----------------------------------------------------------------------------- scores
def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_krnft_score_matches_explicit_transformed_features():
    rng = np.random.default_rng(0)
    c, m, d, h = 3, 7, 8, 4
    arrays = {"base_text": _unit(rng.normal(size=(c + m, d)))}
    for part in ("id", "ood"):
        arrays[f"{part}_scale"] = 1 + 0.3 * rng.normal(size=d)
        arrays[f"{part}_shift"] = 0.2 * rng.normal(size=d)
        for kind in ("scale", "shift"):
            arrays[f"{part}_{kind}_w1"] = rng.normal(size=(h, d))
            arrays[f"{part}_{kind}_b1"] = rng.normal(size=h)
            arrays[f"{part}_{kind}_w2"] = 0.1 * rng.normal(size=(d, h))
            arrays[f"{part}_{kind}_b2"] = 0.1 * rng.normal(size=d)
    res = PromptResult("krnft", NAMES, arrays, [f"w{i}" for i in range(m)])
    det = ood.create("krnft", prompts=res, n_groups=2, temperature=0.05).fit()
    x = _unit(rng.normal(size=(5, d)))
    got = det.score(Features(extras={"image_embeds": x}))

    def meta(part, kind, xi):
        k = f"{part}_{kind}"
        return arrays[k] + np.maximum(arrays[f"{k}_w1"] @ xi + arrays[f"{k}_b1"], 0) @ arrays[f"{k}_w2"].T \
            + arrays[f"{k}_b2"]

    for i, xi in enumerate(x):
        t = np.concatenate([meta("id", "scale", xi) * arrays["base_text"][:c] + meta("id", "shift", xi),
                            meta("ood", "scale", xi) * arrays["base_text"][c:] + meta("ood", "shift", xi)])
        s = np.exp(_unit(t) @ xi / 0.05)
        want = np.mean([s[:c].sum() / (s[:c].sum() + s[c:][g].sum()) for g in det.groups_])
        assert got[i] == pytest.approx(want, rel=1e-9)


def test_local_prompt_score_matches_the_regional_mcm_formula():
    rng = np.random.default_rng(1)
    c, nn, d, p = 3, 2, 8, 5
    res = PromptResult("local_prompt", NAMES, {"global_text": _unit(rng.normal(size=(c, d))),
                                               "local_text": _unit(rng.normal(size=(c, d))),
                                               "neg_local_text": _unit(rng.normal(size=(nn, d)))})
    det = ood.create("local_prompt", prompts=res, topk=4, temperature=0.5).fit()
    g, loc = _unit(rng.normal(size=(4, d))), _unit(rng.normal(size=(4, p, d)))
    got = det.score(Features(extras={"image_embeds": g, "local_embeds": loc}))
    for i in range(4):
        e = np.exp(g[i] @ res["global_text"].T / 0.5)
        lid = np.exp(loc[i] @ res["local_text"].T / 0.5)
        lneg = np.exp(loc[i] @ res["neg_local_text"].T / 0.5)
        reg = (lid / (lid.sum(1, keepdims=True) + lneg.sum(1, keepdims=True))).ravel()
        assert got[i] == pytest.approx(e.max() / e.sum() + np.sort(reg)[-4:].mean(), rel=1e-9)


def test_tuned_detectors_reject_bad_input(tmp_path):
    res = PromptResult("lapt", NAMES, {"id_text": np.eye(3, 8), "neg_text": np.eye(4, 8)}, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="needs prompts="):
        ood.create("lapt").fit()
    with pytest.raises(ValueError, match="tuned with 'lapt'"):
        ood.create("krnft", prompts=res).fit()
    det = ood.create("lapt", prompts=res).fit()
    with pytest.raises(ValueError, match="width"):
        det.score(Features(extras={"image_embeds": np.ones((2, 5))}))
    lp = PromptResult("local_prompt", NAMES, {k: np.eye(3, 8) for k in ("global_text", "local_text", "neg_local_text")})
    with pytest.raises(ValueError, match="local_embeds"):
        ood.create("local_prompt", prompts=lp).fit().score(Features(extras={"image_embeds": np.ones((2, 8))}))
    with pytest.raises(ValueError, match="NaN"):
        PromptResult("lapt", NAMES, {"id_text": np.full((3, 8), np.nan)})
    with pytest.raises(ValueError, match="n_groups"):
        ood.create("lapt", prompts=res, n_groups=0).fit()


# ----------------------------------------------------------------------------- persistence
def test_prompts_round_trip_and_refuse_tampering(tmp_path):
    res = PromptResult("lapt", NAMES, {"id_text": np.eye(3, 8), "neg_text": np.eye(4, 8), "ctx": np.ones((4, 32))},
                       ["a", "b", "c", "d"], config={"lr": 0.1}, history=[{"epoch": 1, "loss": 2.0}])
    path = save_prompts(res, tmp_path / "p")
    back = load_prompts(path)
    assert back.method == "lapt" and back.neg_words == res.neg_words and back.config == {"lr": 0.1}
    for k in res.arrays:
        np.testing.assert_array_equal(back[k], res[k])
    f = path / "arrays.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="SHA-256"):
        load_prompts(path)
    det_dir = tmp_path / "det"
    ood.save(ood.create("lapt", prompts=save_prompts(res, tmp_path / "p2"), n_groups=2).fit(), det_dir)
    assert ood.load(det_dir).score(Features(extras={"image_embeds": np.eye(2, 8)})).shape == (2,)
    from oodscope.persistence import write_bundle

    write_bundle(tmp_path / "notprompts", {"format": "other"}, {})
    with pytest.raises(ValueError, match="not saved prompts"):
        load_prompts(tmp_path / "notprompts")


# ----------------------------------------------------------------------------- CLI
def _image_folder(root, per_class=3):
    from PIL import Image

    images, y = _images(per_class * 3, "id", 5)
    for i, (img, label) in enumerate(zip(images, y)):
        d = root / NAMES[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("method, extra", [
    ("lapt", ["--param", f"ctx_init={json.dumps(CTX)}"]),
    ("local-prompt", ["--param", "n_ctx=4", "--param", "n_neg_prompts=3", "--param", "n_views=3",
                      "--param", "num_pos=1", "--param", "topk=4"]),
    ("krnft", ["--param", "n_views=3", "--param", "n_selection=1", "--param", "n_groups=2"]),
    ("cma", ["--param", "warmup_steps=1"]),
])
def test_train_prompts_cli_end_to_end(clip, tmp_path, method, extra):
    from oodscope.cli import main

    d, enc = clip
    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS))
    out = tmp_path / "run"
    rc = main(["train-prompts", method, "--vlm", f"hf:{d}", "--id", str(_image_folder(tmp_path / "id")),
               "--shots", "2", "--epochs", "1", "--batch-size", "4", "--words", str(words),
               "--n-negatives", "4", "--out", str(out), *extra])
    assert rc == 0
    res = load_prompts(out / "prompts")
    name = {"local-prompt": "local_prompt"}.get(method, method)
    assert res.method == name and res.config["protocol"]["shots"] == 2
    det = ood.create(name, prompts=str(out / "prompts")).fit()
    model = ood.vlm.load(f"hf:{out / 'model'}") if method == "cma" else enc
    x = ood.vlm.extract(model, np.stack(_images(4, "ood", 9)[0]), local=method == "local-prompt", progress=False)
    assert len(x) == 4
    assert np.all(np.isfinite(det.score(x)))


def test_train_prompts_cli_reports_a_missing_folder(clip, tmp_path, capsys):
    from oodscope.cli import main

    d, _ = clip
    assert main(["train-prompts", "lapt", "--vlm", f"hf:{d}", "--id", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
