"""A fitted example of every registered detector, with data to score.

`fitted_example(name)` returns ``(detector, train, test)``: the detector fitted on
``train`` (or on nothing, for zero-shot ones) and Features it can score. Detectors the
synthetic problem of conftest.py feeds are built from it; the others (CLIP, text, AbeT)
get a small problem of their own. A registered detector without an example makes
`test_every_detector_has_an_example` fail, so new detectors cannot skip the round trip.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

import oodscope as ood
from oodscope import Features
from oodscope.detectors import get_detector_class

from conftest import SYNTHETIC_FIELDS, _make_problem, make_detector


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@lru_cache(maxsize=None)
def _problem():
    return _make_problem()


@lru_cache(maxsize=None)
def _clip_space():
    rng = np.random.default_rng(0)
    d, c, m = 32, 4, 40
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    text = basis[:c]
    neg = _unit(basis[c:c + 8][rng.integers(0, 8, m)] + 0.3 * rng.standard_normal((m, d)))

    def images(n, ood):
        centre = neg[rng.integers(0, m, n)] if ood else text[rng.integers(0, c, n)]
        img = _unit(centre + 0.35 * rng.standard_normal((n, d)))
        local = _unit(centre[:, None, :] + 0.45 * rng.standard_normal((n, 5, d)))
        logits = np.where(ood, 0.0, 3.0) * (img @ text.T)
        return Features(logits=logits.astype(np.float32), labels=np.full(n, -1) if ood else
                        (img @ text.T).argmax(1), extras={"image_embeds": img, "local_embeds": local})

    return text, neg, images(120, False), images(60, False), images(60, True)


def _clip_example(name):
    text, neg, train, test_id, test_ood = _clip_space()
    test = Features.concat([test_id, test_ood])
    kw = {"text_embeds": text}
    if name in ("neglabel", "adaneg"):
        kw.update(neg_text_embeds=neg, n_negatives=20, n_groups=2)
    if name == "clipn":
        kw.update(no_text_embeds=_unit(text + 0.5 * neg[:4]))
    if name == "cooked":
        kw.update(probe_epochs=5)
        return ood.create(name, **kw).fit(train), train, test
    return ood.create(name, **kw).fit(), None, test


def _abet_example():
    rng = np.random.default_rng(0)
    f = Features(logits=rng.normal(size=(50, 5)).astype(np.float32),
                 extras={"temperature": rng.uniform(0.2, 1.0, 50).astype(np.float32)})
    return ood.create("abet").fit(), None, f


@lru_cache(maxsize=None)
def _tiny_lm():
    import tokenizers
    import torch
    import transformers

    words = "the rain snow wind sun bake boil bread rice team goal bank loan".split()
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>",
                                               eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    cfg = transformers.GPT2Config(vocab_size=len(vocab), n_positions=16, n_embd=16, n_layer=1,
                                  n_head=2, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg), tok


def _lm_example():
    from oodscope.text import text_array

    base, tok = _tiny_lm()
    train = Features(extras={"text": text_array(["the rain", "the snow wind", "bake the bread"] * 4)})
    test = Features(extras={"text": text_array(["the sun rain", "team goal bank loan"])})
    det = ood.create("lm_ratio", base_model=base, tokenizer=tok, finetune_steps=3,
                     finetune_batch_size=4, lora=False, max_length=8)
    return det.fit(train), train, test


#: Detectors that need feature maps (tests/image_problem.py): constructor arguments.
IMAGE_EXAMPLES = {
    "rankfeat": {},
    "multilayer": {"layers": ["block1", "block2", "features"]},
    "sem": {"layers": ["block1"]},
}


def _image_example(name):
    from image_problem import image_problem

    p = image_problem()
    kw = dict(IMAGE_EXAMPLES[name])
    if "model" in get_detector_class(name).all_requirements():
        kw["model"] = p.model
    det = ood.create(name, **kw)
    train = p.train if det.fit_requirements() else None
    det.fit(train)
    return det, train, Features.concat([p.test_id[:40], p.test_ood[:40]])


def _mlkd_example():
    from oodscope.text import text_array

    teacher, tok = _tiny_lm()
    train = Features(extras={"text": text_array(["the rain", "the snow wind", "bake the bread"] * 4)})
    test = Features(extras={"text": text_array(["the sun rain", "team goal bank loan"])})
    det = ood.create("mlkd", teacher_model=teacher, tokenizer=tok, steps=3, batch_size=4, max_length=8,
                     student={"n_layer": 2, "n_embd": 16, "n_head": 2}, scoring="distillation")
    return det.fit(train), train, test


def has_example(name: str) -> bool:
    cls = get_detector_class(name)
    return (cls.all_requirements() <= SYNTHETIC_FIELDS or "image_embeds" in cls.requires
            or name in ("abet", "lm_ratio", "mlkd") or name in TUNED_VLM or name in IMAGE_EXAMPLES)


def fitted_example(name: str):
    """``(fitted detector, train Features or None, Features to score)``."""
    cls = get_detector_class(name)
    if name in TUNED_VLM:
        return _tuned_vlm_example(name)
    if "image_embeds" in cls.requires:
        return _clip_example(name)
    if name == "abet":
        return _abet_example()
    if name == "lm_ratio":
        return _lm_example()
    if name in IMAGE_EXAMPLES:
        return _image_example(name)
    if name == "mlkd":
        return _mlkd_example()
    p = _problem()
    det = make_detector(name, p)
    train = p.train if cls.fit_fields is not None else None
    det.fit(train)
    return det, train, Features.concat([p.test_id[:40], p.test_ood[:40]])


# ------------------------------------------------------------------ tuned / foundation VLM
#: detectors scoring with arrays a tuning run produced (prompts=PromptResult)
TUNED_VLM = ("lapt", "cma", "local_prompt", "krnft", "synood", "ants", "tagood")


def _tuned_vlm_example(name):
    from oodscope.vlm.prompts import PromptResult

    if name == "tagood":
        return _tagood_example()
    text, neg, _, test_id, test_ood = _clip_space()
    test = Features.concat([test_id, test_ood])
    rng = np.random.default_rng(1)
    d, words = text.shape[1], [f"n{i}" for i in range(len(neg))]
    cfg = {"logit_scale": 100.0}
    if name in ("lapt", "cma"):
        res = PromptResult(name, [f"c{i}" for i in range(len(text))], {"id_text": text, "neg_text": neg}, words, cfg)
        return ood.create(name, prompts=res, n_groups=2).fit(), None, test
    if name == "local_prompt":
        res = PromptResult(name, [f"c{i}" for i in range(len(text))],
                           {"global_text": text, "local_text": _unit(text + 0.1 * rng.normal(size=text.shape)),
                            "neg_local_text": neg[:6]}, config=cfg)
        return ood.create(name, prompts=res, topk=3).fit(), None, test
    if name == "krnft":
        arrays = {"base_text": np.concatenate([text, neg])}
        for part in ("id", "ood"):
            arrays[f"{part}_scale"], arrays[f"{part}_shift"] = 1 + 0.05 * rng.normal(size=d), 0.02 * rng.normal(size=d)
            for kind in ("scale", "shift"):
                arrays[f"{part}_{kind}_w1"], arrays[f"{part}_{kind}_b1"] = rng.normal(size=(4, d)), rng.normal(size=4)
                arrays[f"{part}_{kind}_w2"], arrays[f"{part}_{kind}_b2"] = 0.01 * rng.normal(size=(d, 4)), np.zeros(d)
        res = PromptResult(name, [f"c{i}" for i in range(len(text))], arrays, words, cfg)
        return ood.create(name, prompts=res, n_groups=2).fit(), None, test
    if name == "synood":
        arrays = {"id_text": text, "neg_text": neg, "proj_weight": 0.1 * rng.normal(size=(d, d)),
                  "proj_bias": np.zeros(d), "ln_weight": np.full(d, 0.1), "ln_bias": np.zeros(d)}
        res = PromptResult(name, [f"c{i}" for i in range(len(text))], arrays, words, cfg)
        return ood.create(name, prompts=res, n_groups=2).fit(), None, test
    arrays = {"id_text": text, "neg_text": neg, "far_text": _unit(neg[:20] + 0.2 * rng.normal(size=(20, d))),
              "near_text": neg[20:30]}
    res = PromptResult("ants", [f"c{i}" for i in range(len(text))], arrays, words,
                       {"far_weight": 0.6, "group_len": 10, "temperature": 0.01})
    return ood.create("ants", prompts=res).fit(), None, test


def _tagood_example():
    rng = np.random.default_rng(2)
    c, p, d = 3, 6, 8
    centres = rng.normal(size=(c, d)) * 2

    def make(n, is_ood):
        y = rng.integers(0, c, n)
        mask = (rng.random((n, p)) < 0.7).astype(np.float32)
        mask[:, 0] = 1.0
        base = rng.normal(size=(n, 1, d)) * 2 if is_ood else centres[y][:, None, :]
        tokens = ((base + 0.3 * rng.normal(size=(n, p, d))) * mask[..., None]).astype(np.float32)
        conf = rng.uniform(0.2, 0.6, n) if is_ood else rng.uniform(0.6, 1.0, n)
        return Features(labels=None if is_ood else y,
                        extras={"tag_tokens": tokens, "tag_mask": mask, "tag_confidence": conf})

    train = make(90, False)
    test = Features.concat([make(20, False).replace(labels=None), make(20, True)])
    det = ood.create("tagood", hidden=16, layers=1, heads=2, n_patterns=2, epochs=5, batch_size=32, lr=3e-3)
    return det.fit(train), train, test
