"""MLKD: layer alignment, the distillation terms by hand, the sign on toy text with tiny
random GPT-2s (teacher fine-tuned on ID text, student distilled on ID text only), and bad
inputs. Plumbing and ranking only: tiny random models, not the paper's GPT-2."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import oodscope as ood
from oodscope import Features
from oodscope.text import text_array
from oodscope.text.mlkd import aligned_student_layers, distillation_terms

from detector_examples import _tiny_lm

ID = ["the rain", "the snow wind", "the wind rain", "the sun snow", "rain wind sun", "the snow"]
OOD = ["team goal bank loan", "bank loan", "goal team", "loan bank goal", "team bank", "goal loan team"]


def test_aligned_layers_follow_the_repo_middle_mode():
    assert aligned_student_layers(12) == [3, 4, 5, 6, 7, 8, 9]
    assert aligned_student_layers(4) == [1, 2, 3]
    assert aligned_student_layers(1) == [1]


def test_distillation_terms_by_hand():
    rng = np.random.default_rng(0)
    b, t, v, d = 2, 3, 5, 4
    z_s, z_t = rng.normal(size=(b, t, v)), rng.normal(size=(b, t, v))
    h_s = [rng.normal(size=(b, t, d)) for _ in range(3)]  # embeddings + 2 layers
    h_t = [rng.normal(size=(b, t, d)) for _ in range(4)]  # embeddings + 3 layers
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    student = SimpleNamespace(logits=torch.tensor(z_s), hidden_states=[torch.tensor(h) for h in h_s])
    teacher = SimpleNamespace(logits=torch.tensor(z_t), hidden_states=[torch.tensor(h) for h in h_t])
    proj = torch.nn.Linear(d, d).double()
    with torch.no_grad():
        proj.weight.copy_(torch.eye(d) * 2)
        proj.bias.zero_()
    out = distillation_terms(student, teacher, torch.tensor(mask), proj, [1, 2], temperature=0.5, n_best=2)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_t, p_s = softmax(z_t / 0.5), softmax(z_s / 0.5)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1) * mask
    hidden = np.zeros((b, t))
    for s in (1, 2):
        mse = np.stack([((2 * h_t[k] - h_s[s]) ** 2).mean(-1) for k in (1, 2, 3)], -1)
        hidden += np.sort(mse, -1)[..., :2].sum(-1)
    np.testing.assert_allclose(out["kl"].detach().numpy(), kl, rtol=1e-10)
    np.testing.assert_allclose(out["hidden"].detach().numpy(), hidden * mask, rtol=1e-10)


def test_a_student_equal_to_its_teacher_has_zero_distance():
    teacher, tok = _tiny_lm()
    inp = torch.tensor([[2, 4, 5, 6]])
    mask = torch.ones_like(inp)
    with torch.no_grad():
        out = teacher(input_ids=inp, attention_mask=mask, output_hidden_states=True)
    proj = torch.nn.Linear(16, 16)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(16))
        proj.bias.zero_()
    terms = distillation_terms(out, out, mask, proj, [1], n_best=1)
    assert float(terms["kl"].abs().max().detach()) < 1e-6 and float(terms["hidden"].abs().max().detach()) < 1e-10


@pytest.fixture(scope="module")
def fitted():
    teacher, tok = _tiny_lm()
    train = Features(extras={"text": text_array(ID * 4)})
    det = ood.create("mlkd", teacher_model=teacher, tokenizer=tok, finetune_teacher_steps=40, steps=80,
                     lr=3e-3, batch_size=8, max_length=8, student={"n_layer": 2, "n_embd": 16, "n_head": 2},
                     scoring="distillation")
    return det.fit(train)


@pytest.mark.parametrize("scoring", ["perplexity", "distillation"])
def test_sign_id_text_scores_higher(fitted, scoring):
    fitted.scoring = scoring  # the student serves both; the kept teacher serves "distillation"
    s_id = fitted.score(Features(extras={"text": text_array(ID)}))
    s_ood = fitted.score(Features(extras={"text": text_array(OOD)}))
    assert s_id.dtype == np.float64
    assert ood.metrics.auroc(s_id, s_ood) >= 0.95


def test_encoder_teacher_needs_the_students_own_lm_loss():
    from oodscope.text.mlkd import distill_student

    teacher, tok = _tiny_lm()
    encoder = teacher.transformer  # a GPT-2 body without its LM head
    with pytest.raises(ValueError, match="lm_weight"):
        distill_student(encoder, tok, ID, steps=1, progress=False)
    student, proj, losses = distill_student(encoder, tok, ID, steps=2, lm_weight=1.0, progress=False,
                                            config=None)
    assert len(losses) == 2 and np.all(np.isfinite(losses))


@pytest.mark.parametrize("params, match", [
    ({"teacher_model": None}, "teacher_model"), ({"scoring": "ppl"}, "scoring"), ({"steps": 0}, "steps"),
    ({"lr": 0.0}, "lr"), ({"lm_weight": -1.0}, "lm_weight"), ({"max_length": 1}, "max_length"),
])
def test_bad_parameters_raise(params, match):
    teacher, tok = _tiny_lm()
    kw = {"teacher_model": teacher, "tokenizer": tok, "steps": 1, **params}
    with pytest.raises(ValueError, match=match):
        ood.create("mlkd", **kw).fit(Features(extras={"text": text_array(ID)}))


def test_bad_text_inputs_raise(fitted):
    with pytest.raises(ValueError, match="text"):
        fitted.score(Features(extras={"text": np.zeros((2, 3))}))
    with pytest.raises(ValueError):
        fitted.score(Features(extras={"text": text_array(["the rain", ""])}))
    with pytest.raises(ValueError, match="text"):
        fitted.score(Features(logits=np.zeros((2, 2))))
