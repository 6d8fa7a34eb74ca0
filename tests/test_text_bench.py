"""The clinc150 benchmark provider on a tiny CLINC-format file with a tiny random encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from oodscope.bench import ProviderOptions, get_benchmark, list_benchmarks
from oodscope.bench.text import build_text, parse_finetune
from oodscope.text.encoders import TextEncoder


INTENTS = {
    "weather": ["will it rain {}", "is it sunny {}", "weather forecast {}", "how cold is it {}"],
    "alarm": ["set an alarm {}", "wake me up {}", "alarm for {}", "remind me to wake {}"],
    "music": ["play some jazz {}", "put on music {}", "play a song {}", "start my playlist {}"],
}
WHEN = ["today", "tomorrow", "tonight", "at seven", "this morning", "on monday", "later", "soon"]
OOS = ["who wrote hamlet", "how tall is everest", "translate hello to french", "what is my credit score",
       "order a pizza", "how do i fix a flat tire"]


class BagOfWordsEncoder(TextEncoder):
    """Deterministic hashed bag-of-words embedding: tiny, fast, no model download."""

    def __init__(self, dim: int = 32):
        self.dim = dim
        self.progress = False

    def fingerprint(self) -> str:
        return f"bow{self.dim}"

    def _encode(self, texts, batch_size, progress):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                rng = np.random.default_rng(sum(map(ord, w)) * 7919 + len(w))
                out[i] += rng.standard_normal(self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def clinc150_provider(**options):
    return build_text(get_benchmark("clinc150"), ProviderOptions(**options))


@pytest.fixture()
def tiny_clinc(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)

    def rows(n):
        return [[rng.choice(t).format(rng.choice(WHEN)), k] for k, ts in INTENTS.items() for t in [ts] for _ in range(n)]

    raw = {"train": rows(20), "val": rows(8), "test": rows(10),
           "oos_train": [[q, "oos"] for q in OOS[:2]], "oos_val": [[q, "oos"] for q in OOS[:3]],
           "oos_test": [[q, "oos"] for q in OOS]}
    (tmp_path / "clinc150").mkdir()
    (tmp_path / "clinc150" / "data_full.json").write_text(json.dumps(raw))
    monkeypatch.setenv("OODSCOPE_DATA", str(tmp_path))
    return tmp_path


def test_provider_builds_featureset(tiny_clinc):
    fs = clinc150_provider(encoder=BagOfWordsEncoder(), cache_dir=tiny_clinc / "cache")
    assert len(fs.train) == 60 and len(fs.val_id) == 24 and len(fs.test_id) == 30
    assert len(fs.val_ood) == 3 and set(fs.near_ood) == {"clinc150_oos"} and not fs.far_ood
    assert len(fs.near_ood["clinc150_oos"]) == 6 and np.all(fs.near_ood["clinc150_oos"].labels == -1)
    assert {"logits", "features", "labels", "head"} <= fs.fields()
    assert fs.info["id_accuracy"] > 0.9
    np.testing.assert_allclose(fs.test_id.logits, fs.test_id.logits_from_features(), rtol=1e-4, atol=1e-4)
    assert fs.train.meta["label_names"] == ["alarm", "music", "weather"]
    kept = clinc150_provider(encoder=BagOfWordsEncoder(), cache_dir=tiny_clinc / "cache", fields={"text"})
    assert kept.test_id.extras["text"].dtype.kind == "U"


def test_registered_and_runs_through_runner(tiny_clinc):
    assert "clinc150" in list_benchmarks()
    spec = get_benchmark("clinc150")
    assert "energy" in spec.default_detectors and spec.near == ("clinc150_oos",)
    from oodscope.bench.runner import run

    fs = clinc150_provider(encoder=BagOfWordsEncoder(), cache_dir=tiny_clinc / "cache")
    res = run(fs, ["msp", "energy"], ci=False, progress=False)
    df = res.results
    rows = df[(df.ood_set == "clinc150_oos") & (df.status == "ok")]
    assert set(rows.detector) == {"msp", "energy"}
    assert (rows.auroc > 0.5).all()


def test_finetune_option_parsing():
    assert parse_finetune(None) is None and parse_finetune("none") is None and parse_finetune(False) is None
    assert parse_finetune(True) == "ce" and parse_finetune("full") == "ce"
    assert parse_finetune("margin") == "margin" and parse_finetune("supcon") == "supcon"
    with pytest.raises(ValueError, match="finetune"):
        parse_finetune("lots")


def test_small_subset_keeps_only_seen_classes(tiny_clinc):
    fs = clinc150_provider(encoder=BagOfWordsEncoder(), subset=4, cache_dir=tiny_clinc / "cache")
    seen = set(fs.train.labels.tolist())
    assert len(fs.train) == 4
    assert set(fs.test_id.labels.tolist()) <= seen and set(fs.val_id.labels.tolist()) <= seen
