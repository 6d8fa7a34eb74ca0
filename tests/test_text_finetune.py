"""Encoder fine-tuning: the contrastive losses on hand-made tensors, and a few steps on a
tiny random sentence-transformers model (plumbing; CLINC150 gains are in the benchmark)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

from oodscope.text import SentenceEncoder
from oodscope.text.finetune import (
    finetune_encoder,
    margin_contrastive_loss,
    supervised_contrastive_loss,
)



def test_supcon_prefers_clustered_embeddings():
    y = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.99, 0.1], [0.1, 0.99]])
    assert supervised_contrastive_loss(clustered, y) < supervised_contrastive_loss(mixed, y)
    # No positives at all: zero loss, still differentiable.
    z = torch.randn(3, 2, requires_grad=True)
    loss = supervised_contrastive_loss(z, torch.tensor([0, 1, 2]))
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_margin_loss_values():
    y = torch.tensor([0, 0, 1, 1])
    h = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 0.0]])
    # Positive pairs at squared distance 1, so xi = 1; negatives are far beyond it: only the
    # pull term remains: mean over anchors of 1, divided by the width 2.
    assert float(margin_contrastive_loss(h, y)) == pytest.approx(0.5)
    close = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.0], [1.5, 0.0]])
    assert float(margin_contrastive_loss(close, y)) > 0.5


@pytest.mark.parametrize("objective", ["ce", "margin"])
def test_finetune_tiny_sentence_model(tmp_path, objective):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + ["play", "jazz", "rock", "set", "alarm", "wake", "me", "up", "at", "seven"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    st_models = _st_models()
    model = st.SentenceTransformer(modules=[st_models.Transformer(str(tmp_path / "bert")),
                                            st_models.Pooling(16, "mean"), st_models.Normalize()], device="cpu")
    enc = SentenceEncoder(model, progress=False)
    texts = ["play jazz", "play rock", "play jazz rock", "set alarm", "wake me up", "alarm at seven"]
    labels = np.array([0, 0, 0, 1, 1, 1])
    before = enc.encode(texts)
    new = finetune_encoder(enc, texts, labels, objective=objective, steps=30, lr=1e-3, classes_per_batch=2,
                           per_class=3, progress=False)
    after = new.encode(texts)
    np.testing.assert_array_equal(enc.encode(texts), before)  # the original is untouched
    assert new.fingerprint() != enc.fingerprint()
    assert new.finetune_info["objective"] == objective and new.finetune_info["steps"] == 30

    def separation(e):
        sim = e @ e.T
        same = sim[labels[:, None] == labels[None, :]].mean()
        return same - sim[labels[:, None] != labels[None, :]].mean()

    assert separation(after) > separation(before)
    with pytest.raises(ValueError, match="objective"):
        finetune_encoder(enc, texts, labels, objective="triplet")
    with pytest.raises(ValueError, match="non-negative"):
        finetune_encoder(enc, texts, -np.ones(6, int))


def _st_models():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers import models
    return models
