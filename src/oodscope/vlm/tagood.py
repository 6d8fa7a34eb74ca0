"""TagOOD (Li et al., ACM MM 2024): object-level features from an image-tagging model and a
class-centre learner; the detector is ``tagood`` (`oodscope.detectors.vlm_foundation`).

`tag_features` turns a tagger's outputs into `Features`, as the authors' ``gen_data_tokens``
does with RAM (Recognize Anything, Swin-L): the ID classes map to tags (``id_tags``); the
ID tags whose confidence passes their threshold are the image's tags; each such tag's
attention over the image patches is min-max normalised, the maximum over the tags kept, and
the patch embeddings with attention above ``attn_threshold`` (0.5) are the object-level
tokens. A training image without any such tag falls back to its most confident ID tag; a
test image without one keeps no tokens (its score is 0). The tag confidence stored beside
the tokens is the largest confidence among the image's tags.

Features layout (extras): ``tag_tokens`` (N, P, D) float32, the kept patch embeddings in
place and zeros elsewhere; ``tag_mask`` (N, P) float32, 1 where a token is kept;
``tag_confidence`` (N,).

A tagger is any callable ``images -> {"logits": (N, T) confidences in [0, 1],
"attention": (N, T, P), "patch_embeds": (N, P, D)}``. `TinyTagger` is a randomly
initialised stand-in for tests (it recognises nothing); RAM itself (the ``ram`` package of
github xinyu1205/recognize-anything) is not a dependency here: wrap its forward pass in
such a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..features import Features

__all__ = ["TinyTagger", "tag_features"]


class TinyTagger:
    """Random patch embedder + tag queries (torch): ``patch_embeds = conv(patches)``,
    ``attention = softmax_P(q_t · k_p / √D)``, ``logits = sigmoid(w_t · Σ_p attn·k_p)``."""

    def __init__(self, n_tags: int = 8, dim: int = 16, patch: int = 8, size: int = 32, seed: int = 0):
        import torch

        torch.manual_seed(int(seed))
        self.size, self.dim = int(size), int(dim)
        self.embed = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.queries = torch.randn(n_tags, dim)
        self.head = torch.randn(n_tags, dim) * 2.0

    def __call__(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        import torch

        from .synood import _to_batch

        with torch.no_grad():
            x = _to_batch(images, self.size) * 2 - 1
            k = self.embed(x).flatten(2).transpose(1, 2)                        # (N, P, D)
            attn = torch.softmax(torch.einsum("td,npd->ntp", self.queries, k) / self.dim ** 0.5, dim=-1)
            pooled = torch.einsum("ntp,npd->ntd", attn, k)
            logits = torch.sigmoid((pooled * self.head).sum(-1))
        return {"logits": logits.numpy(), "attention": attn.numpy(), "patch_embeds": k.numpy()}


def _select(logits, attention, patch_embeds, id_tags, thresholds, attn_threshold, fallback):
    n, p, d = patch_embeds.shape
    tokens = np.zeros((n, p, d), np.float32)
    mask = np.zeros((n, p), np.float32)
    conf = np.zeros(n)
    for i in range(n):
        tags = [t for t in id_tags if logits[i, t] > thresholds[t]]
        if not tags:
            if not fallback:
                continue
            tags = [id_tags[int(np.argmax(logits[i, id_tags]))]]
        a = attention[i, tags].astype(np.float64)                                 # (k, P)
        lo, hi = a.min(axis=1, keepdims=True), a.max(axis=1, keepdims=True)
        a = ((a - lo) / np.maximum(hi - lo, 1e-12)).max(axis=0)
        keep = a > attn_threshold
        tokens[i, keep] = patch_embeds[i, keep]
        mask[i, keep] = 1.0
        conf[i] = float(np.max(logits[i, tags]))
    return tokens, mask, conf


def tag_features(tagger: Callable, images: Sequence[Any], id_tags: Sequence[int], labels=None,
                 thresholds: float | Sequence[float] = 0.5, attn_threshold: float = 0.5, train: bool = False,
                 batch_size: int = 64) -> Features:
    """Object-level tag tokens of ``images`` (see the module docstring). ``id_tags[c]`` is
    the tag index of ID class ``c``; ``train=True`` applies the training-image fallback."""
    id_tags = [int(t) for t in id_tags]
    if not id_tags:
        raise ValueError("id_tags is empty: give the tag index of every ID class.")
    parts = []
    for s in range(0, len(images), batch_size):
        out = tagger(images[s:s + batch_size])
        logits = np.asarray(out["logits"], dtype=np.float64)
        attn, emb = np.asarray(out["attention"]), np.asarray(out["patch_embeds"], dtype=np.float32)
        if logits.ndim != 2 or attn.shape != (*logits.shape, emb.shape[1]) or emb.ndim != 3:
            raise ValueError(f"tagger output shapes do not fit: logits {logits.shape}, attention {attn.shape}, "
                             f"patch_embeds {emb.shape}; expected (N, T), (N, T, P), (N, P, D).")
        if max(id_tags) >= logits.shape[1] or min(id_tags) < 0:
            raise ValueError(f"id_tags must index the tagger's {logits.shape[1]} tags.")
        thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (logits.shape[1],))
        parts.append(_select(logits, attn, emb, id_tags, thr, attn_threshold, train))
    tokens, mask, conf = (np.concatenate(x) for x in zip(*parts))
    y = None if labels is None else np.asarray(labels, dtype=np.int64)
    return Features(labels=y, extras={"tag_tokens": tokens, "tag_mask": mask, "tag_confidence": conf})
