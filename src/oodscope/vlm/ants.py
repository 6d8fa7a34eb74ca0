"""ANTS (Zhu et al., "Adaptive Negative Textual Space Shaping for OOD Detection via Test-Time
MLLM Understanding and Reasoning", 2025): a test-time negative label space written by an MLLM.

`ANTSStream` scores a stream of test batches as the authors' OpenOOD-VLM postprocessor
does (read from its code; not run side by side):

* ``conf_in`` — NegLabel's grouped ID mass against the initial negatives (groups of
  ``group_len`` = 100 labels, remainder dropped, one fixed random permutation).
* **Far-OOD negatives.** Images with ``conf_in`` below an adaptive threshold (initially
  0.8) are queued. Once more than 200 are queued (and fewer than ``ens_stop_step``
  generation rounds happened), the threshold is re-estimated — the 0.1-wide histogram bin
  edge after the largest jump between neighbouring bin counts of all ``conf_in`` so far is
  an upper cut, and the new threshold is the ``eta`` quantile of the scores below it — and
  the MLLM describes every queued image in a few words, avoiding its predicted class
  (`Describer.describe`). The descriptions are embedded (no prompt template, as in the
  authors' code) and appended to a first-in-first-out queue of at most 10,000 far
  negatives.
* **Near-OOD negatives.** At the 10th batch and every 40 batches after it, for the 40 ID
  classes predicted most often so far, the MLLM proposes 5 visually similar class names
  (`Describer.similar_labels`); the near space is their union.
* **Score.** ``S_far`` / ``S_near``: grouped ID mass against the far / near negatives
  (before any exist: ``conf_in``). ``S = λ·S_far + (1 − λ)·S_near`` with
  ``λ = (1 − a) / ((1 − a) + (1 − b))``, ``a`` and ``b`` the running means of "balanced"
  far / near scores (far with groups 10x larger; near with its labels repeated 10x).
  ``weighting="far"`` / ``"near"`` give the authors' ``far_only`` / ``near_only`` modes.

The score of a sample depends on the stream before it, and the batch is first written,
then scored (labels generated from a batch's own images already count for it).
`ANTSStream.space` freezes the negative space for the stateless ``ants`` detector.

Deviations: when a negative set is smaller than one group the whole set is one group (the
authors' code divides by zero there); near-OOD labels are asked without an image (their
LLaVA variant shows a fixed demo photo). Real-size recipe: ViT-B/16 CLIP, LLaVA-1.5-7B or
Qwen2-VL-2B (`oodscope.vlm.mllm.HFVisionLanguageDescriber`), 10,000 NegMining negatives,
batches of 256, ``eta = 0.5``, ``ens_stop_step = 10`` (the authors' ImageNet script).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._numeric import l2_normalize, logsumexp

__all__ = ["ANTSStream", "grouped_id_mass"]


def grouped_id_mass(img: np.ndarray, id_text: np.ndarray, neg_text: np.ndarray, temperature: float,
                    group_len: int, seed: int = 0) -> np.ndarray:
    """Mean over groups of ``group_len`` negatives of the ID softmax mass (the authors'
    ``grouping_score``): ``m // group_len`` groups (at least one), remainder dropped, one
    fixed permutation. No negatives: 1."""
    if len(neg_text) == 0:
        return np.ones(len(img))
    sid = img @ id_text.T / temperature
    sneg = img @ neg_text.T / temperature
    lse_id = logsumexp(sid, axis=1)
    m = len(neg_text)
    g = max(1, m // int(group_len))
    size = m // g
    perm = np.random.default_rng(seed).permutation(m)[: g * size].reshape(g, size)
    total = np.zeros(len(img))
    for idx in perm:
        total += np.exp(lse_id - np.logaddexp(lse_id, logsumexp(sneg[:, idx], axis=1)))
    return total / g


class ANTSStream:
    """Stream scorer (see the module docstring).

    Parameters
    ----------
    id_text : (C, D) ID label embeddings; ``class_names`` their names (for the MLLM).
    neg_text : (M, D) NegLabel negatives for ``conf_in``.
    embed_text : ``list[str] -> (n, D)`` (e.g. ``lambda t: encoder.encode_text(t)``).
    describer : a `oodscope.vlm.mllm.Describer`.
    """

    def __init__(self, id_text, class_names: Sequence[str], neg_text, embed_text: Callable[[list[str]], Any],
                 describer, eta: float = 0.5, group_len: int = 100, ens_stop_step: int = 10,
                 init_threshold: float = 0.8, min_queue: int = 200, far_queue_size: int = 10000,
                 n_frequent: int = 40, n_similar: int = 5, near_start: int = 10, near_every: int = 40,
                 temperature: float = 0.01, weighting: str = "ada", neglabel_init: bool = False, seed: int = 0):
        if weighting not in ("ada", "far", "near"):
            raise ValueError(f"weighting must be 'ada', 'far' or 'near', got {weighting!r}.")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}.")
        self.id_text = l2_normalize(np.asarray(id_text, dtype=np.float64), axis=1)
        self.class_names = [str(c) for c in class_names]
        if len(self.class_names) != len(self.id_text):
            raise ValueError(f"{len(self.class_names)} class names for {len(self.id_text)} ID text rows.")
        self.neg_text = l2_normalize(np.asarray(neg_text, dtype=np.float64).reshape(-1, self.id_text.shape[1]), axis=1)
        self.embed_text, self.describer = embed_text, describer
        self.eta, self.group_len, self.ens_stop_step = float(eta), int(group_len), int(ens_stop_step)
        self.min_queue, self.far_queue_size = int(min_queue), int(far_queue_size)
        self.n_frequent, self.n_similar = int(n_frequent), int(n_similar)
        self.near_start, self.near_every = int(near_start), int(near_every)
        self.temperature, self.weighting, self.seed = float(temperature), weighting, int(seed)
        self.init_threshold, self.neglabel_init = float(init_threshold), bool(neglabel_init)
        self.reset()

    def reset(self) -> ANTSStream:
        d = self.id_text.shape[1]
        self.threshold = self.init_threshold
        self.batches = self.rounds = 0
        self.conf_history: list[float] = []
        self.far_history: list[float] = []
        self.near_history: list[float] = []
        self.predictions: Counter = Counter()
        self._queue: list[tuple[np.ndarray, Any, int]] = []
        self.far_words: list[str] = []
        self.far_text = self.neg_text.copy() if self.neglabel_init else np.zeros((0, d))
        self.near_by_class: dict[int, list[str]] = {}
        self.near_words: list[str] = []
        self.near_text = np.zeros((0, d))
        self.weight = 0.5
        return self

    # -- pieces
    def _mass(self, img, neg, group_len):
        return grouped_id_mass(img, self.id_text, neg, self.temperature, group_len, self.seed)

    def _embed(self, words: list[str]) -> np.ndarray:
        if not words:
            return np.zeros((0, self.id_text.shape[1]))
        emb = np.asarray(self.embed_text(list(words)), dtype=np.float64)
        if emb.shape != (len(words), self.id_text.shape[1]):
            raise ValueError(f"embed_text returned shape {emb.shape} for {len(words)} texts; expected "
                             f"({len(words)}, {self.id_text.shape[1]}).")
        return l2_normalize(emb, axis=1)

    def _update_threshold(self) -> None:
        conf = np.asarray(self.conf_history)
        bins = np.arange(0, 1.1, 0.1)
        counts, _ = np.histogram(conf, bins)
        upper = bins[int(np.argmax(np.abs(np.diff(counts)))) + 1]
        below = conf[conf < upper]
        if below.size:
            self.threshold = float(np.percentile(below, self.eta * 100))

    def _generate_far(self) -> None:
        embeds = np.stack([q[0] for q in self._queue])
        images = [q[1] for q in self._queue] if all(q[1] is not None for q in self._queue) else None
        avoid = [self.class_names[q[2]] for q in self._queue]
        labels = [str(t).strip().rstrip(".") for t in self.describer.describe(images, embeds, avoid)]
        labels = [t for t in dict.fromkeys(labels) if t]
        self._queue.clear()
        if labels:
            self.far_words = (self.far_words + labels)[-self.far_queue_size:]
            self.far_text = np.concatenate([self.far_text, self._embed(labels)])[-self.far_queue_size:]

    def _update_near(self) -> None:
        top = [c for c, _ in self.predictions.most_common(self.n_frequent)]
        new = [c for c in top if c not in self.near_by_class]
        if new:
            for c, words in zip(new, self.describer.similar_labels([self.class_names[i] for i in new], self.n_similar)):
                self.near_by_class[c] = [str(w) for w in words]
        self.near_by_class = {c: w for c, w in self.near_by_class.items() if c in top}
        self.near_words = list(dict.fromkeys(w for ws in self.near_by_class.values() for w in ws))
        self.near_text = self._embed(self.near_words)

    # -- public
    def score(self, image_embeds, images: Sequence[Any] | None = None) -> np.ndarray:
        """Write one batch into the stream state, then score it (higher = more ID)."""
        img = l2_normalize(np.asarray(image_embeds, dtype=np.float64), axis=1)
        if img.ndim != 2 or img.shape[1] != self.id_text.shape[1] or not np.all(np.isfinite(img)):
            raise ValueError(f"ANTS: image embeddings must be finite (N, {self.id_text.shape[1]}), got {img.shape}.")
        if images is not None and len(images) != len(img):
            raise ValueError(f"ANTS: {len(images)} images for {len(img)} embeddings.")
        self.batches += 1
        pred = np.argmax(img @ self.id_text.T, axis=1)
        self.predictions.update(pred.tolist())
        conf_in = self._mass(img, self.neg_text, self.group_len)
        self.conf_history.extend(conf_in.tolist())
        for i in np.flatnonzero(conf_in < self.threshold):
            self._queue.append((img[i], None if images is None else images[i], int(pred[i])))
        if self.rounds < self.ens_stop_step and len(self._queue) > self.min_queue:
            self._update_threshold()
            self._generate_far()
            self.rounds += 1
        if self.batches >= self.near_start and (self.batches - self.near_start) % self.near_every == 0:
            self._update_near()
        far, far_bal = self._far_scores(img, conf_in)
        near, near_bal = self._near_scores(img, conf_in)
        self.far_history.extend(far_bal.tolist())
        self.near_history.extend(near_bal.tolist())
        if self.weighting == "far":
            return far
        if self.weighting == "near":
            return near
        a, b = 1.0 - float(np.mean(self.far_history)), 1.0 - float(np.mean(self.near_history))
        self.weight = a / (a + b) if a + b > 0 else 0.5
        return self.weight * far + (1.0 - self.weight) * near

    def _far_scores(self, img, conf_in):
        if len(self.far_text) == 0:
            return conf_in, conf_in
        if len(self.far_text) > self.group_len * 10:
            return (self._mass(img, self.far_text, self.group_len),
                    self._mass(img, self.far_text, self.group_len * 10))
        plain = self._mass(img, self.far_text, len(self.far_text))
        return plain, plain

    def _near_scores(self, img, conf_in):
        if len(self.near_text) == 0:
            return conf_in, conf_in
        return (self._mass(img, self.near_text, self.group_len),
                self._mass(img, np.tile(self.near_text, (10, 1)), self.group_len * 10))

    def space(self):
        """The negative space built so far, frozen for the ``ants`` detector (a
        `oodscope.vlm.prompts.PromptResult` with method ``"ants"``)."""
        from .prompts import PromptResult

        return PromptResult(
            method="ants", class_names=list(self.class_names), neg_words=self.far_words + self.near_words,
            arrays={"id_text": self.id_text, "neg_text": self.neg_text, "far_text": self.far_text,
                    "near_text": self.near_text},
            config={"far_weight": float(self.weight), "weighting": self.weighting, "group_len": self.group_len,
                    "temperature": self.temperature, "seed": self.seed, "n_far": int(len(self.far_text)),
                    "n_near": int(len(self.near_text)), "rounds": int(self.rounds), "batches": int(self.batches),
                    "threshold": float(self.threshold)})
