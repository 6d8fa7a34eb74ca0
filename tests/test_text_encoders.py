"""Encoder plumbing with a tiny randomly initialised BERT and a tokenizer built locally
(no download); the real packaged MiniLM only in one slow test."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import oodscope as ood
from oodscope.text import (
    HFEncoder,
    MissingExtraError,
    SentenceEncoder,
    encode_cached,
    extract,
    load_encoder,
)


WORDS = ["book", "a", "flight", "to", "rome", "play", "some", "jazz", "music", "what", "is", "the", "weather", "today", "set", "an", "alarm", "for", "seven"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinybert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"), model_max_length=12)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=12)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


TEXTS = ["book a flight to rome", "play some jazz music", "what is the weather today",
         "set an alarm for seven", "play music"]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_encoder_shapes_and_padding_invariance(tiny_dir, pooling):
    enc = HFEncoder(str(tiny_dir), pooling=pooling, batch_size=2, progress=False)
    emb = enc.encode(TEXTS)
    assert emb.shape == (5, 16) and emb.dtype == np.float32
    # A text's embedding does not depend on the (padded) batch it is in.
    alone = enc.encode(["play music"])
    np.testing.assert_allclose(alone[0], emb[4], rtol=1e-4, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])


def test_mean_and_cls_pooling_differ(tiny_dir):
    a = HFEncoder(str(tiny_dir), pooling="mean", progress=False).encode(TEXTS[:2])
    b = HFEncoder(str(tiny_dir), pooling="cls", progress=False).encode(TEXTS[:2])
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="pooling"):
        HFEncoder(str(tiny_dir), pooling="max").encode(TEXTS[:1])


def test_cache_hits_and_keys_on_weights(tiny_dir, tmp_path):
    enc = HFEncoder(str(tiny_dir), progress=False)
    first = encode_cached(enc, TEXTS, cache_dir=tmp_path)
    assert len(list((tmp_path / "text_embeddings").glob("*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("cache miss")

    enc._encode = boom
    np.testing.assert_array_equal(encode_cached(enc, TEXTS, cache_dir=tmp_path), first)
    with pytest.raises(AssertionError, match="cache miss"):  # different texts -> new key
        encode_cached(enc, TEXTS[::-1], cache_dir=tmp_path)
    # Changed weights -> different fingerprint -> no stale hit.
    other = HFEncoder(str(tiny_dir), progress=False)
    with torch.no_grad():
        other.parts_[0].embeddings.word_embeddings.weight.add_(1.0)
    assert other.fingerprint() != HFEncoder(str(tiny_dir)).fingerprint()
    assert not np.allclose(encode_cached(other, TEXTS, cache_dir=tmp_path), first)


def test_long_texts_truncated_with_one_warning(tiny_dir):
    enc = HFEncoder(str(tiny_dir), progress=False)
    long = " ".join(WORDS)  # longer than the 12-token limit
    with pytest.warns(UserWarning, match="truncated"):
        e = enc.encode([long, "play music"])
    assert np.all(np.isfinite(e))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode([long])  # said once per encoder


def test_sentence_transformers_spec_and_extract(tiny_dir, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    st_models = _st_models()
    body = st_models.Transformer(str(tiny_dir))
    model = st.SentenceTransformer(modules=[body, st_models.Pooling(16, "mean")], device="cpu")
    model.save(str(tmp_path / "st"))
    enc = load_encoder(f"sentence-transformers:{tmp_path / 'st'}", progress=False)
    assert isinstance(enc, SentenceEncoder)
    ref = HFEncoder(str(tiny_dir), pooling="mean", progress=False).encode(TEXTS)
    labels = np.array([0, 1, 2, 3, 1])
    f = extract(enc, TEXTS, labels, keep_text=True, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(f.features, ref, rtol=1e-4, atol=1e-5)
    assert f.labels.tolist() == labels.tolist()
    assert f.extras["text"].dtype.kind == "U" and f.extras["text"][0] == TEXTS[0]
    with pytest.raises(ValueError, match="5 texts but 4 labels"):
        extract(enc, TEXTS, labels[:4], cache_dir=False)
    with pytest.raises(ValueError, match="empty string"):
        extract(enc, ["ok", ""], cache_dir=False)
    with pytest.raises(ValueError, match="not a string"):
        extract(enc, ["ok", None], cache_dir=False)


def test_encoder_specs_and_missing_extra(monkeypatch):
    assert isinstance(load_encoder(None), SentenceEncoder) and load_encoder(None).model is None
    assert isinstance(load_encoder("hf-cls:bert-tiny"), HFEncoder)
    assert load_encoder("hf-cls:bert-tiny").pooling == "cls"
    with pytest.raises(ValueError, match="Unknown encoder spec"):
        load_encoder("word2vec:abc")
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # simulate not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'oodscope\[text\]'"):
        SentenceEncoder().encode(["hello"])


@pytest.mark.slow
def test_packaged_minilm_end_to_end():
    enc = ood.text.SentenceEncoder(progress=False)
    texts = ["book a flight to rome", "reserve a plane ticket to paris", "what is 2 plus 2"]
    emb = enc.encode(texts)
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2


def _st_models():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers import models
    return models
