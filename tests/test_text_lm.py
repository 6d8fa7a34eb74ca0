"""LM likelihood ratio: tiny randomly initialised GPT-2 models, no download.

A tiny GPT-2 is "pre-trained" briefly on a broad toy corpus (five topics), fine-tuned on two
of them (the in-distribution topics), and the likelihood ratio must rank held-out ID
sentences above sentences from the other topics. This tests the method end to end at toy
scale; real-size LMs are for users with a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import oodscope as ood
from oodscope import Features
from oodscope.metrics import auroc
from oodscope.text import text_array
from oodscope.text.lm import finetune_causal_lm, likelihood_ratio, sequence_log_likelihood


TOPICS = {
    "weather": (["the", "today", "tomorrow", "tonight"], ["rain", "snow", "wind", "sun", "fog", "storm"],
                ["is", "looks", "will be"], ["heavy", "light", "cold", "warm", "strong"]),
    "cooking": (["please", "now", "then", "first"], ["bake", "boil", "fry", "stir", "chop", "grill"],
                ["the", "some", "fresh"], ["bread", "pasta", "onion", "garlic", "rice"]),
    "sports": (["our", "their", "the", "a"], ["team", "coach", "player", "striker", "keeper"],
               ["won", "lost", "scored", "missed"], ["goal", "match", "final", "penalty", "league"]),
    "finance": (["my", "the", "your", "a"], ["bank", "loan", "stock", "fund", "account"],
                ["rose", "fell", "paid", "closed"], ["interest", "dividend", "credit", "balance"]),
    "travel": (["we", "they", "you", "i"], ["fly", "drive", "sail", "walk", "ride"],
               ["to", "from", "across"], ["paris", "rome", "tokyo", "lima", "oslo"]),
}


def _sentences(topic: str, n: int, rng: np.random.Generator) -> list[str]:
    a, b, c, d = TOPICS[topic]
    return [" ".join([rng.choice(a), rng.choice(b), rng.choice(c), rng.choice(d), rng.choice(b)]) for _ in range(n)]


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    words = sorted({w for t in TOPICS.values() for group in t for phrase in group for w in phrase.split()})
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<unk>")
    cfg = transformers.GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg)
    broad = [s for t in TOPICS for s in _sentences(t, 200, rng)]
    # Brief "pre-training" on every topic; the result is the base model.
    base = finetune_causal_lm(base, tok, broad, steps=150, lr=3e-3, batch_size=32, max_length=16,
                              lora=False, progress=False)
    id_train = _sentences("weather", 150, rng) + _sentences("cooking", 150, rng)
    id_test = _sentences("weather", 60, rng) + _sentences("cooking", 60, rng)
    ood_test = _sentences("sports", 40, rng) + _sentences("finance", 40, rng) + _sentences("travel", 40, rng)
    return dict(tok=tok, base=base, cfg=cfg, id_train=id_train, id_test=id_test, ood_test=ood_test)


def test_log_likelihood_matches_model_loss(toy):
    text = ["today rain is heavy snow"]
    ll = sequence_log_likelihood(toy["base"], toy["tok"], text)
    ids = torch.tensor([[2] + toy["tok"](text[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = toy["base"](input_ids=ids, labels=ids).loss.item()  # mean NLL of tokens after BOS
    assert ll["n_tokens"][0] == ids.shape[1] - 1
    assert ll["mean"][0] == pytest.approx(-loss, rel=1e-4)
    assert ll["total"][0] == pytest.approx(-loss * (ids.shape[1] - 1), rel=1e-4)


def test_batching_and_padding_do_not_change_likelihood(toy):
    texts = ["today rain", "please bake the bread fry garlic garlic", "the team won goal"]
    together = sequence_log_likelihood(toy["base"], toy["tok"], texts, batch_size=3)["total"]
    alone = np.array([sequence_log_likelihood(toy["base"], toy["tok"], [t])["total"][0] for t in texts])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_finetuned_ratio_ranks_id_text_higher(toy):
    ft = finetune_causal_lm(toy["base"], toy["tok"], toy["id_train"], steps=120, lr=3e-3, batch_size=32,
                            max_length=16, lora=False, progress=False)
    for reduction in ("mean", "total"):
        s_id = likelihood_ratio(toy["base"], ft, toy["tok"], toy["id_test"], reduction=reduction)
        s_ood = likelihood_ratio(toy["base"], ft, toy["tok"], toy["ood_test"], reduction=reduction)
        assert auroc(s_id, s_ood) > 0.9, reduction
        assert s_id.mean() > 0 > s_ood.mean()


def test_lm_ratio_detector_fits_by_finetuning(toy):
    det = ood.create("lm_ratio", base_model=toy["base"], tokenizer=toy["tok"], finetune_steps=120,
                     finetune_lr=3e-3, finetune_batch_size=32, max_length=16, lora=False)
    det.fit(Features(extras={"text": text_array(toy["id_train"])}))
    s_id = det.score(Features(extras={"text": text_array(toy["id_test"])}))
    s_ood = det.score(Features(extras={"text": text_array(toy["ood_test"])}))
    assert auroc(s_id, s_ood) > 0.9
    # The base model is left untouched by fit.
    assert det.base_ is toy["base"]
    one = det.score(Features(extras={"text": text_array(toy["id_test"][:1])}))
    np.testing.assert_allclose(one, s_id[:1], rtol=1e-6)


def test_lm_ratio_with_given_pair_and_bad_input(toy):
    det = ood.create("lm_ratio", base_model=toy["base"], finetuned_model=toy["base"], tokenizer=toy["tok"])
    det.fit()
    s = det.score(Features(extras={"text": text_array(["today rain is cold fog"])}))
    assert s == pytest.approx(0.0, abs=1e-9)  # identical models: ratio exactly 0
    with pytest.raises(ValueError, match="text"):
        det.score(Features(features=np.zeros((2, 3))))
    with pytest.raises(ValueError, match="base_model"):
        ood.create("lm_ratio").fit()
    with pytest.raises(ValueError, match="text"):
        ood.create("lm_ratio", base_model=toy["base"], tokenizer=toy["tok"]).fit()
    with pytest.raises(ValueError, match="reduction"):
        ood.create("lm_ratio", base_model=toy["base"], tokenizer=toy["tok"], reduction="max").fit()
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=toy["cfg"].vocab_size + 5, n_positions=32,
                                                                 n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="vocabularies"):
        likelihood_ratio(toy["base"], other, toy["tok"], ["today rain"])
    with pytest.raises(ValueError, match="empty"):
        sequence_log_likelihood(toy["base"], toy["tok"], ["today", "  "])


def test_long_text_truncated_with_warning(toy):
    long = " ".join(["rain"] * 40)
    with pytest.warns(UserWarning, match="truncated"):
        ll = sequence_log_likelihood(toy["base"], toy["tok"], [long], max_length=16)
    assert ll["n_tokens"][0] == 15


def test_text_extra_survives_save_load(tmp_path):
    f = Features(features=np.zeros((2, 3), np.float32), extras={"text": text_array(["héllo wörld", "b"])})
    g = Features.load(f.save(tmp_path / "t.npz"))
    assert g.extras["text"].tolist() == ["héllo wörld", "b"]
