"""Detectors of the foundation-model-driven methods: SynOOD, ANTS (frozen space), TagOOD.

* ``synood`` — grouped NegLabel on the residual-projected image embedding with the tuned
  negative-label features (`oodscope.vlm.synood.train_synood`).
* ``ants`` — the ANTS score ``λ·S_far + (1 − λ)·S_near`` with a negative space an
  `oodscope.vlm.ants.ANTSStream` built and froze (``stream.space()``); the streaming,
  MLLM-in-the-loop scorer itself is ``ANTSStream.score``.
* ``tagood`` — TagOOD's class-centre learner on tag-selected object tokens
  (`oodscope.vlm.tagood.tag_features`), trained in ``fit``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._numeric import l2_normalize
from .._params import store_params
from ..features import Features
from .base import Detector, register
from .vlm import _as_embeds, _chunks, _image_embeds
from .vlm_tuned import _prompts, _TunedNegLabel

__all__ = ["ANTS", "SynOOD", "TagOOD"]


@register("synood")
class SynOOD(_TunedNegLabel):
    """SynOOD: grouped NegLabel with ``normalize(f + ReLU(LN(W f + b)))`` for the image and
    the negative-label features tuned on near-boundary synthetic OOD images.

    Train with `oodscope.vlm.synood` (synthesis, label mining, `train_synood`)."""

    method = "synood"
    reference = ("Li et al., Synthesizing Near-Boundary OOD Samples for Out-of-Distribution Detection, "
                 "ICCV 2025")
    search_space = {"n_groups": [1, 10, 100]}

    def _fit(self, train: Features | None) -> None:
        super()._fit(train)
        res = _prompts(self.prompts, self.method)
        d = self.id_text_.shape[1]
        self.proj_weight_ = np.asarray(res["proj_weight"], dtype=np.float64)
        self.proj_bias_ = np.asarray(res["proj_bias"], dtype=np.float64)
        self.ln_weight_ = np.asarray(res["ln_weight"], dtype=np.float64)
        self.ln_bias_ = np.asarray(res["ln_bias"], dtype=np.float64)
        self.ln_eps_ = float(res.config.get("ln_eps", 1e-5))
        if self.proj_weight_.shape != (d, d) or any(a.shape != (d,) for a in
                                                    (self.proj_bias_, self.ln_weight_, self.ln_bias_)):
            raise ValueError(f"synood prompts: the projection must be ({d}, {d}) with ({d},) biases.")

    def _project(self, img: np.ndarray) -> np.ndarray:
        h = img @ self.proj_weight_.T + self.proj_bias_
        h = (h - h.mean(axis=1, keepdims=True)) / np.sqrt(h.var(axis=1, keepdims=True) + self.ln_eps_)
        return l2_normalize(img + np.maximum(h * self.ln_weight_ + self.ln_bias_, 0.0), axis=1)

    def _normalized_images(self, x: Features) -> np.ndarray:
        return self._project(super()._normalized_images(x))


@register("ants")
class ANTS(_TunedNegLabel):
    """ANTS with a frozen negative space: ``λ·S_far + (1 − λ)·S_near`` (grouped ID mass
    against the MLLM-written far / near negatives; NegLabel's score where a space is empty),
    λ and the spaces as an `oodscope.vlm.ants.ANTSStream` left them (``prompts=stream.space()``).

    Stateless: unlike the paper's test-time scorer, the space does not grow while scoring;
    use ``ANTSStream`` for that."""

    method = "ants"
    reference = ("Zhu et al., ANTS: Adaptive Negative Textual Space Shaping for OOD Detection via Test-Time "
                 "MLLM Understanding and Reasoning, 2025 (arXiv:2509.03951)")
    search_space = {"far_weight": [None, 0.0, 0.5, 1.0]}
    score_params = frozenset({"far_weight"})

    def __init__(self, prompts: Any = None, far_weight: float | None = None, temperature: float | None = None):
        self.prompts = prompts
        self.far_weight = far_weight
        self.temperature = temperature

    def _check_params(self) -> None:
        if self.prompts is None:
            _prompts(None, self.method)
        if self.far_weight is not None and not 0.0 <= self.far_weight <= 1.0:
            raise ValueError(f"far_weight must be in [0, 1] or None (the stream's λ), got {self.far_weight}.")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (or None: the stream's), got {self.temperature}.")

    def _fit(self, train: Features | None) -> None:
        res = _prompts(self.prompts, self.method)
        self.id_text_ = _as_embeds("id_text", res["id_text"])
        spaces = {k: _as_embeds(k, res[k], allow_empty=True) for k in ("neg_text", "far_text", "near_text")}
        if any(v.shape[1] != self.id_text_.shape[1] for v in spaces.values()):
            raise ValueError("ants space: every text array must have the width of id_text.")
        self.neg_text_, self.far_text_, self.near_text_ = spaces["neg_text"], spaces["far_text"], spaces["near_text"]
        cfg = res.config
        self.temperature_ = float(self.temperature if self.temperature is not None else cfg.get("temperature", 0.01))
        self.group_len_ = int(cfg.get("group_len", 100))
        self.stream_weight_ = float(cfg.get("far_weight", 0.5))
        self.group_seed_ = int(cfg.get("seed", 0))

    def _score(self, x: Features) -> np.ndarray:
        from ..vlm.ants import grouped_id_mass

        img = l2_normalize(np.asarray(_image_embeds(x, self.id_text_.shape[1], "ANTS"), dtype=np.float64), axis=1)
        w = self.stream_weight_ if self.far_weight is None else float(self.far_weight)
        out = np.empty(len(img))
        for sl in _chunks(len(img)):
            mass = lambda neg, g: grouped_id_mass(img[sl], self.id_text_, neg, self.temperature_, g,  # noqa: E731
                                                  self.group_seed_)
            base = mass(self.neg_text_, self.group_len_)
            far = base if len(self.far_text_) == 0 else mass(
                self.far_text_, self.group_len_ if len(self.far_text_) > 10 * self.group_len_ else len(self.far_text_))
            near = base if len(self.near_text_) == 0 else mass(self.near_text_, self.group_len_)
            out[sl] = w * far + (1.0 - w) * near
        return out


@register("tagood")
class TagOOD(Detector):
    """TagOOD: a small transformer over tag-selected object tokens learns EMA class centres
    (K chunks of its CLS feature per class) with cross-entropy + 0.1 × MSE to the centres;
    ``S = max_c mean_k cos(f_k, centre_{c,k}) × tag confidence`` (0 without tokens).

    Reads ``tag_tokens``, ``tag_mask`` and ``tag_confidence`` (`oodscope.vlm.tagood.tag_features`).
    Defaults follow the authors' code (hidden 512, 2 layers, 8 heads, 4 chunks, AdamW lr
    0.01, wd 5e-4, cosine to 1e-5, 100 epochs, batch 256, EMA 0.999, dropout 0.1); the
    transformer runs on CPU in ``fit``: lower ``epochs`` / ``hidden`` for quick trials.
    Deviation: padded tokens are masked out of attention so a batch scores as its rows;
    the authors score one image at a time.
    """

    requires = frozenset({"tag_tokens", "tag_mask", "tag_confidence"})
    fit_fields = frozenset({"tag_tokens", "tag_mask", "tag_confidence", "labels"})
    reference = ("Li et al., TagOOD: A Novel Approach to Out-of-Distribution Detection via Vision-Language "
                 "Representations and Class Center Learning, ACM MM 2024")
    search_space = {"center_weight": [0.1, 1.0]}
    transient_state = frozenset({"net_"})

    def __init__(self, hidden: int = 512, layers: int = 2, heads: int = 8, n_patterns: int = 4,
                 epochs: int = 100, lr: float = 0.01, weight_decay: float = 5e-4, batch_size: int = 256,
                 ema: float = 0.999, center_weight: float = 0.1, dropout: float = 0.1, seed: int = 0):
        store_params(self, locals())

    def _check_params(self) -> None:
        for name in ("hidden", "layers", "heads", "n_patterns", "epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if self.hidden % self.heads or self.hidden % self.n_patterns:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads}) and by n_patterns "
                             f"({self.n_patterns}).")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}.")
        if not (self.lr > 0 and self.center_weight >= 0 and self.weight_decay >= 0 and 0 <= self.dropout < 1):
            raise ValueError("lr must be > 0, center_weight and weight_decay >= 0, dropout in [0, 1).")

    @staticmethod
    def _inputs(x: Features):
        tokens = np.asarray(x.extras["tag_tokens"], dtype=np.float32)
        mask = np.asarray(x.extras["tag_mask"], dtype=np.float32)
        conf = np.asarray(x.extras["tag_confidence"], dtype=np.float64).reshape(-1)
        if tokens.ndim != 3 or mask.shape != tokens.shape[:2] or len(conf) != len(tokens):
            raise ValueError(f"TagOOD needs tag_tokens (N, P, D), tag_mask (N, P) and tag_confidence (N,); got "
                             f"{tokens.shape}, {mask.shape}, {conf.shape}.")
        return tokens, mask > 0.5, conf

    def _net(self, dim_in: int, n_tokens: int, n_classes: int):
        from ..vlm.tagood_net import TagCentreNet

        return TagCentreNet(dim_in, int(self.hidden), int(self.layers), int(self.heads), n_classes, n_tokens,
                            float(self.dropout))

    def _fit(self, train: Features | None) -> None:
        import torch

        from ..vlm.tagood_net import train_centres

        tokens, mask, _ = self._inputs(train)
        y = np.asarray(train.labels, dtype=np.int64)
        c = int(train.num_classes or y.max() + 1)
        torch.manual_seed(int(self.seed))
        net = self._net(tokens.shape[2], tokens.shape[1], c)
        self.centres_, self.history_ = train_centres(
            net, tokens, mask, y, c, int(self.n_patterns), int(self.epochs), float(self.lr), float(self.weight_decay),
            int(self.batch_size), float(self.ema), float(self.center_weight), int(self.seed))
        self.weights_ = {k: v.detach().double().numpy() for k, v in net.state_dict().items()}
        self.shape_ = [int(tokens.shape[2]), int(tokens.shape[1]), c]
        self.net_ = net.eval()

    def _score(self, x: Features) -> np.ndarray:
        import torch

        tokens, mask, conf = self._inputs(x)
        d, p, c = self.shape_
        if tokens.shape[1:] != (p, d):
            raise ValueError(f"TagOOD was fitted on tag_tokens of shape (P, D) = ({p}, {d}), got {tokens.shape[1:]}.")
        net = getattr(self, "net_", None)
        if net is None:
            net = self._net(d, p, c)
            net.load_state_dict({k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in self.weights_.items()})
            self.net_ = net = net.eval()
        centres = l2_normalize(np.asarray(self.centres_, dtype=np.float64), axis=-1)  # (C, K, H/K)
        out = np.zeros(len(tokens))
        for sl in _chunks(len(tokens), 512):
            with torch.no_grad():
                f = net.features(torch.from_numpy(tokens[sl]), torch.from_numpy(mask[sl])).double().numpy()
            f = l2_normalize(f.reshape(len(f), *centres.shape[1:]), axis=-1)          # (n, K, H/K)
            sim = np.einsum("nkh,ckh->nck", f, centres).mean(axis=2).max(axis=1)
            out[sl] = np.where(mask[sl].any(axis=1), sim * conf[sl], 0.0)
        return out
