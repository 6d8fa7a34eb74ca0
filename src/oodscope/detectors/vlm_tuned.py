"""Detectors scoring with tuned CLIP prompts: LAPT, Local-Prompt, KR-NFT and CMA.

Each takes ``prompts=``: a `oodscope.vlm.prompts.PromptResult` or the directory
`oodscope train-prompts` / `save_prompts` wrote. ``fit()`` copies the learned arrays into
the fitted state, so a saved detector scores without the model. Image embeddings come
from the same (frozen, or for CMA the fine-tuned) image tower as during tuning.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._numeric import l2_normalize, logsumexp, softmax
from .._params import store_params
from ..features import Features
from .base import Detector, register
from .vlm import NegLabel, _as_embeds, _chunks, _image_embeds

__all__ = ["CMA", "KRNFT", "LAPT", "LocalPrompt"]


def _prompts(prompts: Any, method: str):
    from ..vlm.prompts import as_prompt_result

    if prompts is None:
        raise ValueError(f"{method} needs prompts=: the result of oodscope.vlm.prompt_tuning.train_{method} "
                         f"or the folder `oodscope train-prompts {method}` wrote.")
    return as_prompt_result(prompts, method)


def _temperature(given: float | None, res) -> float:
    """The scoring temperature: as given, else the inverse of the logit scale the prompts
    were tuned at (0.01 for CLIP's 100), so training and scoring see the same softmax."""
    if given is not None:
        return float(given)
    scale = res.config.get("logit_scale")
    return 1.0 / float(scale) if isinstance(scale, (int, float)) and scale > 0 else 0.01


def _check_temperature(t) -> None:
    if t is not None and not t > 0:
        raise ValueError(f"temperature must be > 0 (or None: the tuning's logit scale), got {t}.")


def _groups(m: int, n_groups: int, seed: int) -> list[np.ndarray]:
    if m == 0:
        return []
    perm = np.random.default_rng(seed).permutation(m)
    return list(np.array_split(perm, min(int(n_groups), m)))


class _GroupedPromptParams:
    """Parameters shared by the detectors that score tuned prompts with grouped negatives."""

    method = ""
    score_params = frozenset()  # the temperature is resolved in fit (see _temperature)

    def __init__(self, prompts: Any = None, n_groups: int = 100, group_seed: int = 0,
                 temperature: float | None = None):
        store_params(self, locals())

    def _check_params(self) -> None:
        if self.prompts is None:
            _prompts(None, self.method)
        if int(self.n_groups) != self.n_groups or self.n_groups < 1:
            raise ValueError(f"n_groups must be an integer >= 1, got {self.n_groups}.")
        _check_temperature(self.temperature)


class _TunedNegLabel(_GroupedPromptParams, NegLabel):
    """Grouped NegLabel scoring on ID / negative text embeddings read from tuned prompts."""

    def _parts(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sid = img @ self.id_text_.T / self.temperature_
        return sid, img @ self.neg_text_.T / self.temperature_, logsumexp(sid, axis=1)

    def _fit(self, train: Features | None) -> None:
        res = _prompts(self.prompts, self.method)
        self.temperature_ = _temperature(self.temperature, res)
        self.id_text_ = _as_embeds("id_text", res["id_text"])
        self.neg_text_ = _as_embeds("neg_text", res["neg_text"], allow_empty=True)
        if self.neg_text_.shape[1:] != self.id_text_.shape[1:]:
            raise ValueError("the tuned ID and negative text embeddings differ in width.")
        self.neg_words_ = list(res.neg_words) if res.neg_words is not None else None
        self.groups_ = _groups(len(self.neg_text_), self.n_groups, self.group_seed)


@register("lapt")
class LAPT(_TunedNegLabel):
    """LAPT: grouped NegLabel score with the tuned ID and negative-label prompts.

    Train with `oodscope.vlm.prompt_tuning.train_lapt` (or ``oodscope train-prompts lapt``);
    defaults follow the paper's scoring (100 groups, τ = 0.01).
    """

    method = "lapt"
    reference = ("Zhang et al., LAPT: Label-driven Automated Prompt Tuning for OOD Detection with "
                 "Vision-Language Models, ECCV 2024")
    search_space = {"n_groups": [1, 10, 100]}


@register("cma")
class CMA(_TunedNegLabel):
    """CMA: NegLabel on a CLIP fine-tuned with the cross-modal alignment regulariser.

    The prompts hold the fine-tuned text tower's ID and negative-label embeddings; score
    image embeddings from the fine-tuned image tower. One group by default, as in the
    authors' inference code.
    """

    method = "cma"
    reference = ("Kim et al., Enhanced OoD Detection through Cross-Modal Alignment of Multi-Modal "
                 "Representations, CVPR 2025")
    search_space = {"n_groups": [1, 10]}

    def __init__(self, prompts: Any = None, n_groups: int = 1, group_seed: int = 0,
                 temperature: float | None = None):
        super().__init__(prompts, n_groups, group_seed, temperature)


@register("local_prompt", "local-prompt")
class LocalPrompt(Detector):
    """Local-Prompt's Regional-MCM: global MCM plus the mean of the ``topk`` largest
    regional ID probabilities (``topk`` default 20, the trainer's default region count).

    With cosines ``g_c`` (global image vs the frozen global prompts), ``l_{p,c}`` (patch p
    vs local prompt c) and ``n_{p,j}`` (patch p vs negative local prompt j):
    ``S = max_c softmax(g/T)_c + mean(topk_{p,c} e^{l_{p,c}/T} / Σ_{c'} e^{l_{p,c'}/T} + Σ_j e^{n_{p,j}/T})``.
    Reads ``image_embeds`` and ``local_embeds`` (`oodscope.vlm.extract(..., local=True)`).
    """

    requires = frozenset({"image_embeds", "local_embeds"})
    fit_fields = None
    min_fit_samples = 1
    reference = ("Zeng et al., Local-Prompt: Extensible Local Prompts for Few-Shot Out-of-Distribution "
                 "Detection, ICLR 2025")
    search_space = {"topk": [5, 10, 20, 50], "temperature": [0.5, 1.0]}
    score_params = frozenset({"topk", "temperature"})

    def __init__(self, prompts: Any = None, topk: int = 20, temperature: float = 1.0):
        self.prompts = prompts
        self.topk = topk
        self.temperature = temperature

    def _check_params(self) -> None:
        if self.prompts is None:
            _prompts(None, "local_prompt")
        if int(self.topk) != self.topk or self.topk < 1:
            raise ValueError(f"topk must be an integer >= 1, got {self.topk}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")

    def _fit(self, train: Features | None) -> None:
        res = _prompts(self.prompts, "local_prompt")
        self.global_text_ = _as_embeds("global_text", res["global_text"])
        self.local_text_ = _as_embeds("local_text", res["local_text"])
        self.neg_local_text_ = _as_embeds("neg_local_text", res["neg_local_text"], allow_empty=True)
        if not (self.global_text_.shape == self.local_text_.shape
                and self.neg_local_text_.shape[1:] == self.local_text_.shape[1:]):
            raise ValueError("global, local and negative local text embeddings must share one width "
                             "and global/local one row per class.")

    def _score(self, x: Features) -> np.ndarray:
        d = self.local_text_.shape[1]
        img = l2_normalize(np.asarray(_image_embeds(x, d, "LocalPrompt"), dtype=np.float64), axis=1)
        local = _image_embeds(x, d, "LocalPrompt", "local_embeds")
        if local.ndim != 3:
            raise ValueError(f"`local_embeds` must be (N, P, D), got shape {local.shape}.")
        t = float(self.temperature)
        glob = softmax(img @ self.global_text_.T / t, axis=1).max(axis=1)
        out = np.empty(len(img))
        for sl in _chunks(len(img), 256):
            loc = l2_normalize(np.asarray(local[sl], dtype=np.float64), axis=-1)
            lid = loc @ self.local_text_.T / t                                  # (n, P, C)
            lneg = loc @ self.neg_local_text_.T / t
            denom = logsumexp(np.concatenate([lid, lneg], axis=-1), axis=-1)   # (n, P)
            prob = np.exp(lid - denom[..., None]).reshape(len(loc), -1)        # (n, P*C)
            k = min(int(self.topk), prob.shape[1])
            out[sl] = np.mean(-np.sort(-prob, axis=1)[:, :k], axis=1)
        return glob + out


@register("krnft", "kr-nft")
class KRNFT(_GroupedPromptParams, Detector):
    """KR-NFT: grouped NegLabel score on image-conditionally transformed text features.

    For an image x, ID rows become ``(s_id + meta_s_id(x)) ⊙ t + (b_id + meta_b_id(x))`` and
    negative rows the same with the OOD transform (`train_krnft`); the score is the grouped
    NegLabel ID mass with ``cos(x, t')/τ``. Computed without materialising one transformed
    text matrix per image.
    """

    requires = frozenset({"image_embeds"})
    fit_fields = None
    min_fit_samples = 1
    reference = ("Zhu et al., Knowledge Regularized Negative Feature Tuning of Vision-Language Models "
                 "for Out-of-Distribution Detection, ACM MM 2025")
    search_space = {"n_groups": [1, 10]}

    method = "krnft"
    _PARTS = ("id", "ood")

    def __init__(self, prompts: Any = None, n_groups: int = 10, group_seed: int = 0,
                 temperature: float | None = None):
        super().__init__(prompts, n_groups, group_seed, temperature)

    def _fit(self, train: Features | None) -> None:
        res = _prompts(self.prompts, "krnft")
        self.temperature_ = _temperature(self.temperature, res)
        self.n_id_ = len(res.class_names)
        base = np.asarray(res["base_text"], dtype=np.float64)
        if base.ndim != 2 or len(base) <= self.n_id_:
            raise ValueError("krnft prompts: base_text must hold the ID rows followed by negative rows.")
        self.base_text_ = l2_normalize(base, axis=1)
        self.transform_ = {k: np.asarray(v, dtype=np.float64) for k, v in res.arrays.items() if k != "base_text"}
        self.groups_ = _groups(len(base) - self.n_id_, self.n_groups, self.group_seed)

    def _factors(self, img: np.ndarray) -> dict[str, np.ndarray]:
        p = self.transform_
        out = {}
        for part in self._PARTS:
            for kind in ("scale", "shift"):
                key = f"{part}_{kind}"
                h = np.maximum(img @ p[f"{key}_w1"].T + p[f"{key}_b1"], 0.0)
                out[key] = p[key] + h @ p[f"{key}_w2"].T + p[f"{key}_b2"]
        return out

    @staticmethod
    def _cos(img, text, a, b):
        """cos(x_i, a_i ⊙ t_j + b_i) for every image i and text row j."""
        num = (img * a) @ text.T + np.sum(img * b, axis=1, keepdims=True)
        sq = (a * a) @ (text * text).T + 2.0 * (a * b) @ text.T + np.sum(b * b, axis=1, keepdims=True)
        return num / np.sqrt(np.maximum(sq, 1e-300))

    def _score(self, x: Features) -> np.ndarray:
        d = self.base_text_.shape[1]
        img = l2_normalize(np.asarray(_image_embeds(x, d, "KRNFT"), dtype=np.float64), axis=1)
        c = self.n_id_
        out = np.empty(len(img))
        for sl in _chunks(len(img)):
            xi = img[sl]
            f = self._factors(xi)
            sid = self._cos(xi, self.base_text_[:c], f["id_scale"], f["id_shift"]) / self.temperature_
            sneg = self._cos(xi, self.base_text_[c:], f["ood_scale"], f["ood_shift"]) / self.temperature_
            lse_id = logsumexp(sid, axis=1)
            total = np.zeros(len(xi))
            for g in self.groups_:
                total += np.exp(lse_id - np.logaddexp(lse_id, logsumexp(sneg[:, g], axis=1)))
            out[sl] = total / len(self.groups_)
        return out
