"""Texts -> `Features`: embed once (cached), optionally apply a fitted classifier head."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..features import Features
from .data import validate_texts
from .encoders import TextEncoder, encode_cached, load_encoder

__all__ = ["extract", "text_array"]


def text_array(texts: Sequence[str]) -> np.ndarray:
    """Texts as a fixed-width numpy unicode array (``dtype '<U…'``), which `Features.save`
    stores without pickle. Detectors that read raw text take it from ``extras["text"]``."""
    texts = validate_texts(texts)
    return np.array(texts, dtype=str)


def extract(
    encoder: TextEncoder | str | None,
    texts: Sequence[str],
    labels: Sequence[int] | np.ndarray | None = None,
    head: Any = None,
    keep_text: bool = False,
    cache_dir: str | Path | None | bool = None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Features:
    """Embed ``texts`` with ``encoder`` and return `Features`.

    Without ``head``: ``features`` = embeddings (and ``labels``). With a fitted
    `~oodscope.text.heads.ClassifierHead`: also ``logits`` and the head's weight/bias, so
    every logit-, feature- and head-based detector runs on text.
    ``keep_text=True`` stores the texts as ``extras["text"]`` (for the LM likelihood ratio).
    ``labels`` are class indices; ``-1`` marks out-of-scope samples.
    """
    enc = load_encoder(encoder)
    texts = validate_texts(texts)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != len(texts):
            raise ValueError(f"Got {len(texts)} texts but {labels.shape[0]} labels; pass one label per text.")
        if labels.dtype.kind not in "iu":
            raise ValueError(
                f"labels must be integer class indices (-1 for out-of-scope), got dtype {labels.dtype}; "
                "map names to indices first (the text loaders do this)."
            )
    emb = encode_cached(enc, texts, cache_dir=cache_dir, batch_size=batch_size, progress=progress)
    extras = {"text": text_array(texts)} if keep_text else {}
    f = Features(features=emb, labels=labels, extras=extras, meta={"encoder": enc.fingerprint()})
    return head.apply(f) if head is not None else f
