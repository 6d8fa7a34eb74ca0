"""Zero-shot detectors on a CLIP-like dual encoder (image embeddings + class-name texts).

Every detector here reads ``extras["image_embeds"]`` (made by `oodscope.vlm.extract`) and
compares it with text embeddings of the in-distribution class names. Text embeddings come
either from an ``encoder`` (a `oodscope.vlm.DualEncoder` or a model string) with
``class_names`` and prompt templates, or directly from ``text_embeds=`` arrays, so every
score can be computed (and tested) on hand-made embeddings without a model.

Cosines are computed in float64 on L2-normalised embeddings; softmax/ratios use
log-sum-exp. Scores are higher = more in-distribution.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .._numeric import l2_normalize, logsumexp, softmax
from .._params import store_params
from ..features import Features
from .base import Detector, register

__all__ = ["CLIPN", "GLMCM", "MCM", "AdaNeg", "COOkeD", "NegLabel", "mine_negatives"]

_CHUNK = 1024  # rows of images per block, so (N, M) similarity matrices never sit in memory


# ---------------------------------------------------------------- helpers
def _check_class_names(names: Any) -> list[str]:
    if isinstance(names, str):
        raise ValueError("class_names must be a list of names, not a single string.")
    names = [str(n) for n in names]
    if not names:
        raise ValueError("class_names is empty: give one name per in-distribution class.")
    seen: dict[str, str] = {}
    dups = []
    for n in names:
        key = n.strip().casefold()
        if not key:
            raise ValueError("class_names contains an empty name.")
        if key in seen:
            dups.append(n)
        seen[key] = n
    if dups:
        raise ValueError(
            f"class_names has duplicates {sorted(set(dups))}: two classes with the same text get "
            "the same embedding and split the probability. Make the names unique (e.g. "
            "'crane (bird)' vs 'crane (machine)')."
        )
    return names


def _as_embeds(name: str, arr: Any, allow_empty: bool = False) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array (n, dim), got shape {a.shape}.")
    if a.shape[0] == 0 and not allow_empty:
        raise ValueError(f"`{name}` has no rows.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"`{name}` contains NaN or inf.")
    return l2_normalize(a, axis=1)


def _resolve_encoder(encoder: Any):
    if encoder is None or not isinstance(encoder, str):
        return encoder
    from ..vlm.backends import load

    return load(encoder)


def _image_embeds(x: Features, width: int, who: str, key: str = "image_embeds") -> np.ndarray:
    arr = x.extras[key]
    if arr.shape[-1] != width:
        raise ValueError(
            f"{who}: `{key}` have width {arr.shape[-1]} but the text embeddings have width {width}; "
            "image and text embeddings must come from the same dual encoder (joint space)."
        )
    return arr


def _chunks(n: int, size: int = _CHUNK) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


def mine_negatives(candidates: np.ndarray, id_embeds: np.ndarray, n: int,
                   percentile: float = 0.95) -> np.ndarray:
    """NegMining (Jiang et al., ICLR 2024): indices of the ``n`` candidates farthest from ID.

    For each candidate, take its cosine similarity to every ID label, summarise it by the
    ``percentile`` quantile (a robust "closeness to the nearest ID labels"), and keep the
    ``n`` candidates with the lowest value, most distant first. Ties keep input order.
    """
    cand = l2_normalize(np.asarray(candidates, dtype=np.float64), axis=1)
    ids = l2_normalize(np.asarray(id_embeds, dtype=np.float64), axis=1)
    if cand.shape[1] != ids.shape[1]:
        raise ValueError(
            f"Candidate word embeddings have width {cand.shape[1]} but ID label embeddings "
            f"have width {ids.shape[1]}."
        )
    if not 0.0 <= percentile <= 1.0:
        raise ValueError(f"percentile must be in [0, 1], got {percentile}.")
    closeness = np.empty(len(cand))
    for sl in _chunks(len(cand), 8192):
        closeness[sl] = np.quantile(cand[sl] @ ids.T, percentile, axis=1)
    order = np.argsort(closeness, kind="stable")
    return order[: max(0, min(int(n), len(cand)))]


class _ZeroShot(Detector):
    """Shared parameters and text-embedding resolution for the CLIP detectors."""

    requires = frozenset({"image_embeds"})
    fit_fields = None
    min_fit_samples = 1
    #: the loaded encoder is only needed to embed prompts in ``fit``; not saved
    transient_state = frozenset({"encoder_"})

    def _check_common(self) -> None:
        if self.text_embeds is None and self.encoder is None:
            raise ValueError(
                f"{type(self).__name__} needs either encoder= (with class_names=) or "
                "text_embeds= (one row per ID class)."
            )
        if self.text_embeds is None and self.class_names is None:
            raise ValueError(f"{type(self).__name__} with an encoder needs class_names=[...].")
        if self.class_names is not None:
            names = _check_class_names(self.class_names)
            if self.text_embeds is not None and len(np.asarray(self.text_embeds)) != len(names):
                raise ValueError(
                    f"text_embeds has {len(np.asarray(self.text_embeds))} rows but class_names has "
                    f"{len(names)} entries; give one row per class."
                )
        templates = list(self.templates)
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"templates must be strings containing '{{}}', got {templates}.")

    def _check_params(self) -> None:
        self._check_common()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")

    def _id_text(self) -> np.ndarray:
        if self.text_embeds is not None:
            return _as_embeds("text_embeds", self.text_embeds)
        enc = _resolve_encoder(self.encoder)
        self.encoder_ = enc
        names = _check_class_names(self.class_names)
        return _as_embeds("text embeddings", enc.encode_text(names, self.templates))

    def _fit(self, train: Features | None) -> None:
        self.id_text_ = self._id_text()

    def _id_sims(self, x: Features) -> np.ndarray:
        img = l2_normalize(np.asarray(_image_embeds(x, self.id_text_.shape[1], type(self).__name__),
                                      dtype=np.float64), axis=1)
        return img @ self.id_text_.T


# ---------------------------------------------------------------- MCM / GL-MCM
@register("mcm")
class MCM(_ZeroShot):
    """Maximum Concept Matching: ``max_i softmax_i(cos(img, text_i) / τ)`` over ID prompts.

    Zero-shot: ``fit()`` only embeds the class prompts. τ = 1 as in the paper.
    """

    reference = ("Ming et al., Delving into Out-of-Distribution Detection with Vision-Language "
                 "Representations, NeurIPS 2022")
    search_space = {"temperature": [0.5, 1.0, 2.0]}
    score_params = frozenset({"temperature"})  # tuning changes them without refitting

    def __init__(self, encoder: Any = None, class_names: Sequence[str] | None = None,
                 text_embeds: Any = None, templates: Sequence[str] = ("a photo of a {}.",),
                 temperature: float = 1.0):
        store_params(self, locals())

    def _score(self, x: Features) -> np.ndarray:
        return softmax(self._id_sims(x) / self.temperature, axis=1).max(axis=1)


@register("glmcm", "gl-mcm")
class GLMCM(MCM):
    """Global-Local MCM: ``MCM(global) + λ · max_{p,i} softmax_i(cos(local_p, text_i) / τ)``.

    Reads ``extras["local_embeds"]`` (N, P, D): patch tokens projected into the joint space
    (`oodscope.vlm.extract(..., local=True)`). λ = 1, τ = 1 and the prompt "a photo of a {}"
    as in the authors' code.
    """

    requires = frozenset({"image_embeds", "local_embeds"})
    reference = ("Miyai et al., GL-MCM: Global and Local Maximum Concept Matching for Zero-Shot "
                 "Out-of-Distribution Detection, IJCV 2025 (arXiv:2304.04521)")
    search_space = {"local_weight": [0.5, 1.0, 2.0]}
    score_params = frozenset({"temperature", "local_weight", "local_temperature"})

    def __init__(self, encoder: Any = None, class_names: Sequence[str] | None = None,
                 text_embeds: Any = None, templates: Sequence[str] = ("a photo of a {}",),
                 temperature: float = 1.0, local_weight: float = 1.0,
                 local_temperature: float | None = None):
        super().__init__(encoder, class_names, text_embeds, templates, temperature)
        self.local_weight = local_weight
        self.local_temperature = local_temperature

    def _check_params(self) -> None:
        super()._check_params()
        if not self.local_weight >= 0:
            raise ValueError(f"local_weight must be >= 0, got {self.local_weight}.")
        if self.local_temperature is not None and not self.local_temperature > 0:
            raise ValueError(f"local_temperature must be > 0, got {self.local_temperature}.")

    def _score(self, x: Features) -> np.ndarray:
        glob = super()._score(x)
        local = _image_embeds(x, self.id_text_.shape[1], "GLMCM", "local_embeds")
        if local.ndim != 3:
            raise ValueError(f"`local_embeds` must be (N, P, D), got shape {local.shape}.")
        tau = self.local_temperature or self.temperature
        out = np.empty(len(x))
        for sl in _chunks(len(x), 256):
            loc = l2_normalize(np.asarray(local[sl], dtype=np.float64), axis=-1)
            p = softmax(loc @ self.id_text_.T / tau, axis=-1)  # (n, P, C)
            out[sl] = p.max(axis=(1, 2))
        return glob + self.local_weight * out


# ---------------------------------------------------------------- NegLabel
@register("neglabel")
class NegLabel(_ZeroShot):
    """NegLabel: ID-vs-negative-label softmax mass, with NegMining and grouping.

    ``fit()`` mines ``n_negatives`` words far from the ID labels (`mine_negatives`) from
    ``words`` (a list or a file, one word a line; default WordNet nouns + adjectives) or from
    precomputed ``neg_text_embeds``. The score with negatives split randomly (``group_seed``)
    into ``n_groups`` groups G_g is the mean over groups of

        S_g = Σ_{i∈ID} e^{cos_i/τ} / (Σ_{i∈ID} e^{cos_i/τ} + Σ_{j∈G_g} e^{cos_j/τ}).

    With no negatives the score is 1. Words equal to an ID class name are never negatives.
    Differences from the authors' code: one candidate pool and one prompt set for nouns and
    adjectives (they mine the two separately and prompt adjectives "This is a {} photo"), and
    groups of unequal size rather than dropping the remainder; pass ``neg_text_embeds`` (and
    ``words``) to use negatives embedded your way.
    """

    reference = ("Jiang et al., Negative Label Guided OOD Detection with Pretrained "
                 "Vision-Language Models, ICLR 2024")
    search_space = {"temperature": [0.005, 0.01, 0.05], "n_groups": [1, 10, 100]}
    score_params = frozenset({"temperature"})

    def __init__(self, encoder: Any = None, class_names: Sequence[str] | None = None,
                 text_embeds: Any = None, words: Any = None, neg_text_embeds: Any = None,
                 n_negatives: int = 10000, percentile: float = 0.95, n_groups: int = 100,
                 group_seed: int = 0, temperature: float = 0.01,
                 templates: Sequence[str] = ("The nice {}.",)):
        store_params(self, locals())

    def _check_params(self) -> None:
        super()._check_params()
        if int(self.n_negatives) != self.n_negatives or self.n_negatives < 0:
            raise ValueError(f"n_negatives must be an integer >= 0, got {self.n_negatives}.")
        if int(self.n_groups) != self.n_groups or self.n_groups < 1:
            raise ValueError(f"n_groups must be an integer >= 1, got {self.n_groups}.")
        if not 0.0 <= self.percentile <= 1.0:
            raise ValueError(f"percentile must be in [0, 1], got {self.percentile}.")
        if self.n_negatives > 0 and self.neg_text_embeds is None and self.encoder is None:
            raise ValueError(
                f"{type(self).__name__} needs an encoder= to embed negative words, or "
                "neg_text_embeds=, or n_negatives=0."
            )

    def _candidate_pool(self) -> tuple[np.ndarray, list[str] | None]:
        from ..vlm.wordnet import load_word_list, wordnet_words

        words = None
        if self.words is not None:
            words = load_word_list(self.words)
        if self.neg_text_embeds is not None:
            pool = _as_embeds("neg_text_embeds", self.neg_text_embeds, allow_empty=True)
            if words is not None and len(words) != len(pool):
                raise ValueError(
                    f"words has {len(words)} entries but neg_text_embeds has {len(pool)} rows."
                )
            return pool, words
        if words is None:
            words = wordnet_words(("noun", "adj"))
        if self.class_names is not None:
            id_keys = {n.strip().casefold() for n in self.class_names}
            words = [w for w in words if w.strip().casefold() not in id_keys]
        enc = getattr(self, "encoder_", None) or _resolve_encoder(self.encoder)
        emb = enc.encode_text(words, self.templates, progress=len(words) > 2000)
        return _as_embeds("negative word embeddings", emb, allow_empty=True), words

    def _fit(self, train: Features | None) -> None:
        self.id_text_ = self._id_text()
        d = self.id_text_.shape[1]
        if self.n_negatives == 0:
            neg, words = np.zeros((0, d)), []
        else:
            pool, pool_words = self._candidate_pool()
            if pool.shape[1] != d:
                raise ValueError(
                    f"Negative text embeddings have width {pool.shape[1]} but ID text embeddings "
                    f"have width {d}."
                )
            idx = mine_negatives(pool, self.id_text_, self.n_negatives, self.percentile)
            neg = pool[idx]
            words = [pool_words[i] for i in idx] if pool_words is not None else None
        self.neg_text_ = neg
        self.neg_words_ = words
        m = len(neg)
        if m == 0:
            self.groups_ = []
        else:
            perm = np.random.default_rng(self.group_seed).permutation(m)
            self.groups_ = [g for g in np.array_split(perm, min(int(self.n_groups), m))]

    # log-sum-exp of the scaled ID and per-group negative similarities
    def _parts(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sid = img @ self.id_text_.T / self.temperature
        sneg = img @ self.neg_text_.T / self.temperature
        return sid, sneg, logsumexp(sid, axis=1)

    def _grouped(self, lse_id: np.ndarray, sneg: np.ndarray) -> np.ndarray:
        if not self.groups_:
            return np.ones(len(lse_id))
        total = np.zeros(len(lse_id))
        for g in self.groups_:
            lse_g = logsumexp(sneg[:, g], axis=1)
            total += np.exp(lse_id - np.logaddexp(lse_id, lse_g))
        return total / len(self.groups_)

    def _normalized_images(self, x: Features) -> np.ndarray:
        arr = _image_embeds(x, self.id_text_.shape[1], type(self).__name__)
        return l2_normalize(np.asarray(arr, dtype=np.float64), axis=1)

    def _score(self, x: Features) -> np.ndarray:
        img = self._normalized_images(x)
        out = np.empty(len(img))
        for sl in _chunks(len(img)):
            _, sneg, lse_id = self._parts(img[sl])
            out[sl] = self._grouped(lse_id, sneg)
        return out


# ---------------------------------------------------------------- AdaNeg
@register("adaneg")
class AdaNeg(NegLabel):
    """AdaNeg: NegLabel plus a test-time memory of image features (stateful, order-dependent).

    Every label (ID class or mined negative) has a memory slot of up to ``memory_size`` test
    image embeddings, anchored by the label's text embedding. Test samples are processed in
    the order given, in blocks of ``stream_batch_size``; each block is first *written*, then
    *scored*:

    * write: with ``S`` the NegLabel score, a sample goes to the slot of its predicted ID class
      if ``S > thr + gap·(1-thr)``, to the slot of its nearest negative label if
      ``S < thr - gap·thr``; a full slot replaces its highest-entropy entry when the newcomer
      has lower entropy (entropy of the softmax over the ID labels, resp. the negatives);
    * proxies: ``proxy="task"`` — the normalised mean of the text anchor and the stored
      embeddings; ``"sample"`` — their mean weighted by ``exp(-β(1-cos(x, e)))``;
    * score: ``S_ada`` is the grouped NegLabel score with every label's text embedding
      replaced by its proxy; the result is ``(S_ada + λ·S_NegLabel)/(1+λ)`` (the paper's
      ``S_ada + λ·S_NegLabel`` divided by ``1+λ``: same ranking, scores in [0, 1]). With an
      empty memory every proxy is its text anchor, so the score equals NegLabel exactly.

    Streaming API: ``score(x)`` continues the stream from the current memory and updates it;
    ``reset()`` empties the memory (``fit`` does too); ``score_stream(batches)`` yields the
    scores of successive batches; ``score_mixed(id, ood, seed)`` resets and scores ID and OOD
    as one stream (seeded shuffle, or ID first as in the reference evaluation, which resets
    the memory for every ID/OOD pair); ``reset_each_call=True`` makes every ``score`` call an
    independent stream (beware: an OOD-only stream then fills only negative slots, which
    flatters the method). Scores are deterministic for a given order and block size.

    A batch is not scored sample by sample. ``score(x)`` equals calling ``score`` on the
    consecutive blocks of ``stream_batch_size`` rows of ``x``, one call after the other;
    inside a block every sample is written before any is scored, so a one-row call and the
    same row inside a batch get different scores. With ``stream_batch_size=1``, ``score(x)``
    equals scoring the rows of ``x`` one by one, in order.

    The text anchors, write rule and entropy follow the authors' OpenOOD-VLM code as far as
    we read it; it was not run side by side with this implementation.
    """

    reference = ("Zhang & Zhang, AdaNeg: Adaptive Negative Proxy Guided OOD Detection with "
                 "Vision-Language Models, NeurIPS 2024")
    search_space = {"gap": [0.3, 0.5, 0.7], "neglabel_weight": [0.1, 1.0]}
    score_params = frozenset()  # the memory is per instance: never share a fitted copy
    #: Scores depend on what was scored before (runners: ``reset()`` / `score_mixed`).
    stateful = True
    stream_note = ("score(x) = score() of its blocks of stream_batch_size rows in turn (each "
                   "block written to the memory, then scored); stream_batch_size=1 = row by row")

    def __init__(self, encoder: Any = None, class_names: Sequence[str] | None = None,
                 text_embeds: Any = None, words: Any = None, neg_text_embeds: Any = None,
                 n_negatives: int = 10000, percentile: float = 0.95, n_groups: int = 100,
                 group_seed: int = 0, temperature: float = 0.01,
                 templates: Sequence[str] = ("The nice {}.",), memory_size: int = 10,
                 threshold: float = 0.5, gap: float = 0.5, proxy: str = "sample",
                 beta: float = 5.5, neglabel_weight: float = 0.1, stream_batch_size: int = 256,
                 reset_each_call: bool = False):
        super().__init__(encoder, class_names, text_embeds, words, neg_text_embeds, n_negatives,
                         percentile, n_groups, group_seed, temperature, templates)
        self.memory_size = memory_size
        self.threshold = threshold
        self.gap = gap
        self.proxy = proxy
        self.beta = beta
        self.neglabel_weight = neglabel_weight
        self.stream_batch_size = stream_batch_size
        self.reset_each_call = reset_each_call

    def _check_params(self) -> None:
        super()._check_params()
        if int(self.memory_size) != self.memory_size or self.memory_size < 1:
            raise ValueError(f"memory_size must be an integer >= 1, got {self.memory_size}.")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}.")
        if not 0.0 <= self.gap <= 1.0:
            raise ValueError(f"gap must be in [0, 1], got {self.gap}.")
        if self.proxy not in ("task", "sample"):
            raise ValueError(f"proxy must be 'task' or 'sample', got {self.proxy!r}.")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}.")
        if not self.neglabel_weight >= 0:
            raise ValueError(f"neglabel_weight must be >= 0, got {self.neglabel_weight}.")
        if int(self.stream_batch_size) != self.stream_batch_size or self.stream_batch_size < 1:
            raise ValueError(f"stream_batch_size must be an integer >= 1, got {self.stream_batch_size}.")

    def _fit(self, train: Features | None) -> None:
        super()._fit(train)
        self.anchors_ = np.concatenate([self.id_text_, self.neg_text_])
        self.reset()

    # -- memory
    def reset(self) -> AdaNeg:
        """Empty the test-time memory (keeps the fitted text embeddings and negatives)."""
        if not hasattr(self, "id_text_"):
            return self
        n_labels = len(self.id_text_) + len(self.neg_text_)
        d = self.id_text_.shape[1]
        self.memory_ = np.zeros((n_labels, int(self.memory_size), d), dtype=np.float32)
        self.memory_entropy_ = np.full((n_labels, int(self.memory_size)), np.inf)
        self.memory_count_ = np.zeros(n_labels, dtype=np.int64)
        return self

    @property
    def memory_counts(self) -> np.ndarray:
        """Entries stored per label (ID classes first, then negatives)."""
        return self.memory_count_.copy()

    def _write(self, img: np.ndarray, sid: np.ndarray, sneg: np.ndarray, s_neg: np.ndarray) -> None:
        c = len(self.id_text_)
        upper = self.threshold + self.gap * (1.0 - self.threshold)
        lower = self.threshold - self.gap * self.threshold

        def entropy(logits: np.ndarray) -> np.ndarray:
            p = softmax(logits, axis=1)
            return -np.sum(p * np.log(np.clip(p, 1e-300, None)), axis=1)

        ent_id = entropy(sid)
        ent_neg = entropy(sneg) if sneg.shape[1] else np.zeros(len(img))
        for i in range(len(img)):  # in order: the memory is order-dependent by design
            if s_neg[i] > upper:
                label, ent = int(np.argmax(sid[i])), ent_id[i]
            elif s_neg[i] < lower and sneg.shape[1] > 0:
                label, ent = c + int(np.argmax(sneg[i])), ent_neg[i]
            else:
                continue
            k = self.memory_count_[label]
            if k < self.memory_size:
                slot = k
                self.memory_count_[label] += 1
            else:
                slot = int(np.argmax(self.memory_entropy_[label]))
                if ent >= self.memory_entropy_[label, slot]:
                    continue
            self.memory_[label, slot] = img[i]
            self.memory_entropy_[label, slot] = ent

    def _proxy_logits(self, img: np.ndarray) -> np.ndarray:
        """``cos(x, proxy_k)/τ`` for every label; labels with an empty slot use their text."""
        logits = img @ self.anchors_.T / self.temperature
        occupied = np.flatnonzero(self.memory_count_ > 0)
        if occupied.size == 0:
            return logits
        # entries of each occupied slot: the text anchor, then the stored embeddings
        ent = np.concatenate([self.anchors_[occupied][:, None, :].astype(np.float32),
                              self.memory_[occupied]], axis=1)
        counts = self.memory_count_[occupied]
        valid = np.arange(ent.shape[1])[None, :] <= counts[:, None]  # (K, 1+L)
        cos = np.einsum("nd,kld->nkl", img.astype(np.float32), ent).astype(np.float64)
        if self.proxy == "task":
            w = np.broadcast_to(valid[None].astype(np.float64), cos.shape)
        else:
            w = np.exp(-self.beta * (1.0 - cos)) * valid[None]
        # cos(x, normalise(Σ w_l e_l)) = Σ w_l (x·e_l) / sqrt(wᵀ G w), G the slot's Gram matrix:
        # avoids materialising one proxy per (sample, label), n·K·D floats.
        gram = np.einsum("kld,kmd->klm", ent, ent).astype(np.float64)
        norm2 = np.einsum("nkl,klm,nkm->nk", w, gram, w)
        logits[:, occupied] = np.sum(w * cos, axis=2) / np.sqrt(np.maximum(norm2, 1e-300)) / self.temperature
        return logits

    def _adaptive(self, img: np.ndarray) -> np.ndarray:
        logits = self._proxy_logits(img)
        c = len(self.id_text_)
        return self._grouped(logsumexp(logits[:, :c], axis=1), logits[:, c:])

    def _score(self, x: Features) -> np.ndarray:
        if self.reset_each_call:
            self.reset()
        img = self._normalized_images(x)
        out = np.empty(len(img))
        lam = float(self.neglabel_weight)
        for sl in _chunks(len(img), int(self.stream_batch_size)):
            sid, sneg, lse_id = self._parts(img[sl])
            s_neg = self._grouped(lse_id, sneg)
            self._write(img[sl], sid, sneg, s_neg)
            s_ada = self._adaptive(img[sl])
            out[sl] = (s_ada + lam * s_neg) / (1.0 + lam)
        return out

    def score_mixed(self, id_features: Features, ood_features: Features, seed: int = 0,
                    order: str = "shuffle") -> tuple[np.ndarray, np.ndarray]:
        """Benchmark helper: empty the memory, score ID and OOD samples as one stream and
        return ``(id_scores, ood_scores)`` in their input order. ``order="shuffle"``: a
        seeded random interleaving; ``"id_first"``: all ID samples, then all OOD samples
        (the reference evaluation's order).

        Scoring an ID-only and an OOD-only stream separately (each from an empty memory)
        would let the memory learn which stream it is in."""
        if order not in ("shuffle", "id_first"):
            raise ValueError(f"order must be 'shuffle' or 'id_first', got {order!r}.")
        both = Features.concat([
            Features(extras={"image_embeds": np.asarray(id_features.extras["image_embeds"])}),
            Features(extras={"image_embeds": np.asarray(ood_features.extras["image_embeds"])}),
        ])
        perm = (np.random.default_rng(seed).permutation(len(both)) if order == "shuffle"
                else np.arange(len(both)))
        self.reset()
        scores = np.empty(len(both))
        scores[perm] = self.score(both[perm])
        n = len(id_features)
        return scores[:n], scores[n:]

    def score_stream(self, batches: Iterable[Features]) -> Iterator[np.ndarray]:
        """Score successive batches of one test stream, updating the memory as it goes."""
        for batch in batches:
            yield self.score(batch)


# ---------------------------------------------------------------- CLIPN
@register("clipn")
class CLIPN(_ZeroShot):
    """CLIPN scores from "yes" and "no" text embeddings. The "no" tower is trained (or loaded
    from a released checkpoint) with `oodscope.vlm.clipn`; `CLIPNNoText` is its ``no_encoder``.

    With ``l_i = s·cos(img, yes_i)`` and ``l^no_i = s·cos(img, no_i)`` (s = ``logit_scale``),
    ``p_yes,i = e^{l_i} / (e^{l_i} + e^{l^no_i})``:

    * ``rule="ctw"`` (competing-to-win): ``S = p_yes,ŷ`` at ``ŷ = argmax_i l_i``;
    * ``rule="atd"`` (agreeing-to-differ): ``S = Σ_i softmax(l)_i · p_yes,i``
      (one minus the ATD OOD probability).

    "No" embeddings come from ``no_text_embeds`` or ``no_encoder`` (a dual encoder whose
    text tower is CLIPN's "no" encoder), applied to ``class_names`` with ``no_templates``.
    """

    reference = ("Wang et al., CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No, "
                 "ICCV 2023")

    def __init__(self, encoder: Any = None, class_names: Sequence[str] | None = None,
                 text_embeds: Any = None, no_encoder: Any = None, no_text_embeds: Any = None,
                 templates: Sequence[str] = ("a photo of a {}.",),
                 no_templates: Sequence[str] | None = None, rule: str = "atd",
                 logit_scale: float = 100.0):
        store_params(self, locals())

    temperature = 1.0  # unused; keeps the shared parameter check simple

    def _check_params(self) -> None:
        self._check_common()
        if self.rule not in ("atd", "ctw"):
            raise ValueError(f"rule must be 'atd' or 'ctw', got {self.rule!r}.")
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}.")
        if self.no_text_embeds is None and (self.no_encoder is None or self.class_names is None):
            raise ValueError(
                "CLIPN needs 'no' text embeddings: pass no_text_embeds= (one row per class) or "
                "no_encoder= (CLIPN's 'no' text encoder) with class_names=."
            )

    def _fit(self, train: Features | None) -> None:
        self.id_text_ = self._id_text()
        if self.no_text_embeds is not None:
            no = _as_embeds("no_text_embeds", self.no_text_embeds)
        else:
            enc = _resolve_encoder(self.no_encoder)
            no = _as_embeds("no text embeddings", enc.encode_text(
                _check_class_names(self.class_names), self.no_templates or self.templates))
        if no.shape != self.id_text_.shape:
            raise ValueError(
                f"'no' text embeddings have shape {no.shape} but 'yes' ones {self.id_text_.shape}; "
                "give one 'no' row per class, in the same space."
            )
        self.no_text_ = no

    def _score(self, x: Features) -> np.ndarray:
        sims = self._id_sims(x)
        img = l2_normalize(np.asarray(x.extras["image_embeds"], dtype=np.float64), axis=1)
        l_yes = self.logit_scale * sims
        l_no = self.logit_scale * (img @ self.no_text_.T)
        p_yes = np.exp(l_yes - np.logaddexp(l_yes, l_no))
        if self.rule == "ctw":
            pred = np.argmax(l_yes, axis=1)
            return p_yes[np.arange(len(pred)), pred]
        return np.sum(softmax(l_yes, axis=1) * p_yes, axis=1)


# ---------------------------------------------------------------- COOkeD
@register("cooked")
class COOkeD(_ZeroShot):
    """COOkeD: mean of a task classifier's, zero-shot CLIP's and a CLIP linear probe's
    class probabilities, scored by its max (``rule="msp"``) or negative entropy (``"entropy"``).

    ``p_clip = softmax(clip_scale · cos(img, text_c))``; ``p_probe = softmax(W·img + b)``
    with the probe fitted on ID training image embeddings and labels (``fit(train)``; SGD
    with momentum, ``probe_epochs`` epochs at ``probe_lr``, cosine schedule, seeded);
    ``p_cls = softmax(logits)`` from the Features' logits (same class order as
    ``class_names``). ``members`` selects which of the three are averaged; without
    ``"classifier"`` no logits are needed, without ``"probe"`` ``fit()`` needs no data.
    """

    requires = frozenset({"logits", "image_embeds"})
    fit_fields = frozenset({"image_embeds", "labels"})
    min_fit_samples = 2
    reference = ("Liu et al., COOkeD: Ensembling task classifiers and CLIP for robust OOD "
                 "detection (code: glhr/COOkeD), 2025")
    search_space = {"rule": ["msp", "entropy"]}

    _MEMBERS = ("classifier", "clip", "probe")

    def __init__(self, encoder: Any = None, class_names: Sequence[str] | None = None,
                 text_embeds: Any = None, templates: Sequence[str] = ("a photo of a {}.",),
                 clip_scale: float = 100.0, rule: str = "msp",
                 members: Sequence[str] = ("classifier", "clip", "probe"),
                 probe_epochs: int = 20, probe_lr: float = 0.1, probe_batch_size: int = 256,
                 probe_weight_decay: float = 0.0, seed: int = 0):
        store_params(self, locals())

    temperature = 1.0

    def _check_params(self) -> None:
        self._check_common()
        if self.rule not in ("msp", "entropy"):
            raise ValueError(f"rule must be 'msp' or 'entropy', got {self.rule!r}.")
        members = list(self.members)
        bad = [m for m in members if m not in self._MEMBERS]
        if bad or not members or len(set(members)) != len(members):
            raise ValueError(f"members must be distinct names from {self._MEMBERS}, got {members}.")
        if not self.clip_scale > 0:
            raise ValueError(f"clip_scale must be > 0, got {self.clip_scale}.")
        if int(self.probe_epochs) != self.probe_epochs or self.probe_epochs < 1:
            raise ValueError(f"probe_epochs must be an integer >= 1, got {self.probe_epochs}.")

    def fit(self, train: Features | None = None, **kwargs: Any) -> COOkeD:
        """Embed the class prompts and fit the probe on ``train`` (image_embeds + labels).
        Without the probe member, ``fit()`` needs no data."""
        if train is None and "probe" not in list(self.members):
            self._reset_fit()
            self._check_params()
            self._fit(None)
            self.fitted_ = True
            self._fit_dims_ = {}
            return self
        return super().fit(train, **kwargs)

    def _fit(self, train: Features | None) -> None:
        # Without the classifier member, score needs no logits. The class attribute (used by
        # runners to pick detectors) keeps "logits"; this instance narrows it.
        if "classifier" in self.members:
            self.__dict__.pop("requires", None)
        else:
            self.requires = frozenset({"image_embeds"})
        self.id_text_ = self._id_text()
        c, d = self.id_text_.shape
        if "probe" not in self.members:
            self.probe_weight_, self.probe_bias_ = np.zeros((c, d)), np.zeros(c)
            return
        if train is None:
            raise ValueError("COOkeD.fit needs ID training Features with image_embeds and labels "
                             "for its linear probe (or members without 'probe').")
        emb = _image_embeds(train, d, "COOkeD.fit")
        if train.labels.max() >= c:
            raise ValueError(f"COOkeD.fit: label {train.labels.max()} is out of range for {c} classes.")
        self.probe_weight_, self.probe_bias_ = _fit_linear_probe(
            l2_normalize(np.asarray(emb, dtype=np.float64), axis=1), train.labels, c,
            epochs=int(self.probe_epochs), lr=float(self.probe_lr),
            batch_size=int(self.probe_batch_size), weight_decay=float(self.probe_weight_decay),
            seed=int(self.seed))

    def probabilities(self, x: Features) -> np.ndarray:
        """The averaged class probabilities p̄ (N, C)."""
        c = len(self.id_text_)
        parts = []
        img = None
        if "clip" in self.members or "probe" in self.members:
            img = l2_normalize(np.asarray(_image_embeds(x, self.id_text_.shape[1], "COOkeD"),
                                          dtype=np.float64), axis=1)
        if "classifier" in self.members:
            if x.logits.shape[1] != c:
                raise ValueError(
                    f"COOkeD: the classifier has {x.logits.shape[1]} classes but there are {c} "
                    "class names; the classifier's classes must match class_names, in order."
                )
            parts.append(softmax(np.asarray(x.logits, dtype=np.float64), axis=1))
        if "clip" in self.members:
            parts.append(softmax(self.clip_scale * (img @ self.id_text_.T), axis=1))
        if "probe" in self.members:
            parts.append(softmax(img @ self.probe_weight_.T + self.probe_bias_, axis=1))
        return np.mean(parts, axis=0)

    def _score(self, x: Features) -> np.ndarray:
        p = self.probabilities(x)
        if self.rule == "msp":
            return p.max(axis=1)
        return np.sum(p * np.log(np.clip(p, 1e-300, None)), axis=1)  # -H(p)


def _fit_linear_probe(x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int, lr: float,
                      batch_size: int, weight_decay: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by minibatch SGD (momentum 0.9, cosine LR), seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    lin = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(x) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    from tqdm.auto import tqdm

    # Tiny matrix products gain nothing from threads, and on a busy machine the thread
    # hand-off dominates (measured: 0.5 s with one thread vs 60 s with two).
    threads = torch.get_num_threads()
    if batch_size * x.shape[1] * num_classes < 1_000_000:
        torch.set_num_threads(1)
    try:
        for _ in tqdm(range(epochs), desc="COOkeD probe", disable=len(x) * epochs < 200_000, leave=False):
            perm = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), batch_size):
                idx = perm[s : s + batch_size]
                loss = torch.nn.functional.cross_entropy(lin(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
