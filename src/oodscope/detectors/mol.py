"""MOL: meta OOD learning for continuously adaptive OOD detection.

Wu, Lu, Fang & Zhang, "Meta OOD Learning for Continuously Adaptive OOD Detection", ICCV 2023
(arXiv 2309.11705; no public code found). The setting (CAOOD): the ID and OOD distributions
keep shifting after deployment, and each new distribution arrives with only a few labelled ID
samples. MOL meta-learns ("learning to adapt") an initialisation of the OOD detection model
such that a few gradient steps on those few samples restore classification and detection.

What is implemented here, on cached penultimate features (a head, not the whole network):

* meta-training (MAML, second order): tasks are drawn from the training Features grouped by
  ``extras[domain_key]`` (e.g. the corruption kind × severity of each sample); per task, a
  support set of ``support_size`` labelled samples and a query set of ``query_size`` others
  from the same domain; ``inner_steps`` SGD steps (``inner_lr``) on the support cross-entropy
  adapt the head; the outer loss is the query cross-entropy of the adapted head, plus, when
  ``fit(train, outliers=...)`` gives auxiliary outliers, ``energy_weight`` times the
  energy-bounded hinge of Liu et al. (2020) on query ID and outlier energies (margins
  ``m_in``/``m_out`` on ``−logsumexp``); Adam (``outer_lr``) on the initialisation;
* deployment: `adapt(support)` takes ``adapt_steps`` SGD steps from the meta-learned
  initialisation on a few labelled samples of the new distribution; `score` is the energy
  ``logsumexp`` of the adapted head's logits (higher = more in-distribution); `reset` returns
  to the initialisation; `score_stream` runs a sequence of (support, test) stages.

Only the abstract of the paper could be read: the task construction, the losses (CE and the
energy hinge), the energy score and the head-only adaptation on frozen features are our
reading of "learning to adapt an OOD detection model", not the paper's verified recipe.
Features are standardised with the training mean and standard deviation (float64).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .._numeric import logsumexp
from .._params import store_params
from ..features import Features, as_features
from .base import Detector, register

__all__ = ["MOL"]


@register("mol")
class MOL(Detector):
    """Meta-learned, few-shot adaptable energy detector on features (see the module doc).

    Parameters
    ----------
    hidden : width of the head's hidden layer (0: a linear head).
    inner_steps, inner_lr : SGD steps and rate of the adaptation inside meta-training.
    adapt_steps : SGD steps of `adapt` at deployment (``inner_lr``).
    meta_iters, tasks_per_iter, outer_lr : meta-training.
    support_size, query_size : samples per task.
    energy_weight, m_in, m_out : the energy hinge when outliers are given.
    domain_key : ``extras`` key of the per-sample domain id (absent: one domain).
    """

    requires = frozenset({"features"})
    not_by_default = ("meta-trains a head with second-order MAML (minutes per tuning candidate); "
                      "name it, or run the fashion-mnist-c-stream benchmark it is made for")
    fit_fields = frozenset({"features", "labels"})
    search_space = {"adapt_steps": [1, 5, 10], "inner_lr": [0.01, 0.1]}
    reference = ("Wu, Lu, Fang & Zhang, Meta OOD Learning for Continuously Adaptive OOD Detection, ICCV 2023 "
                 "(arXiv 2309.11705; recipe unverified, see oodscope list notes)")
    min_fit_samples = 4

    def __init__(self, hidden: int = 0, inner_steps: int = 1, inner_lr: float = 0.1, adapt_steps: int = 5,
                 meta_iters: int = 300, tasks_per_iter: int = 4, outer_lr: float = 1e-2, support_size: int = 20,
                 query_size: int = 64, energy_weight: float = 0.1, m_in: float = -5.0, m_out: float = -1.0,
                 domain_key: str = "domain", seed: int = 0):
        store_params(self, locals())

    def _check_params(self) -> None:
        for name in ("inner_steps", "adapt_steps", "meta_iters", "tasks_per_iter", "support_size", "query_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "adapt_steps" else 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, (int, np.integer)) or self.hidden < 0:
            raise ValueError(f"hidden must be an integer >= 0 (0: linear head), got {self.hidden!r}.")
        for name in ("inner_lr", "outer_lr"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        if not (isinstance(self.energy_weight, (int, float)) and self.energy_weight >= 0):
            raise ValueError(f"energy_weight must be >= 0, got {self.energy_weight!r}.")

    # ------------------------------------------------------------------ torch pieces
    def _init_params(self, d: int, c: int, gen) -> dict:
        import torch

        def linear(i, o):
            bound = 1.0 / np.sqrt(i)
            return (torch.empty(o, i).uniform_(-bound, bound, generator=gen),
                    torch.empty(o).uniform_(-bound, bound, generator=gen))

        if self.hidden:
            w1, b1 = linear(d, int(self.hidden))
            w2, b2 = linear(int(self.hidden), c)
            return {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
        w, b = linear(d, c)
        return {"w2": w, "b2": b}

    @staticmethod
    def _forward(params: dict, x):
        import torch

        h = x
        if "w1" in params:
            h = torch.relu(torch.nn.functional.linear(h, params["w1"], params["b1"]))
        return torch.nn.functional.linear(h, params["w2"], params["b2"])

    def _sgd(self, params: dict, x, y, steps: int, create_graph: bool) -> dict:
        import torch

        for _ in range(int(steps)):
            loss = torch.nn.functional.cross_entropy(self._forward(params, x), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params = {k: p - float(self.inner_lr) * g for (k, p), g in zip(params.items(), grads)}
        return params

    def _energy_hinge(self, params, x_in, x_out):
        import torch

        e_in = -torch.logsumexp(self._forward(params, x_in), dim=1)
        e_out = -torch.logsumexp(self._forward(params, x_out), dim=1)
        return (torch.relu(e_in - self.m_in) ** 2).mean() + (torch.relu(self.m_out - e_out) ** 2).mean()

    # ------------------------------------------------------------------ fit
    def _standardize(self, f: np.ndarray) -> np.ndarray:
        return ((np.asarray(f, dtype=np.float64) - self.mean_) / self.scale_).astype(np.float32)

    def _fit(self, train: Features, outliers: Features | None = None) -> None:
        import torch

        x64 = np.asarray(train.features, dtype=np.float64)
        self.mean_ = x64.mean(0)
        std = x64.std(0)
        ref = float(std.max()) if std.size else 0.0
        # dead or constant dimensions keep a scale relative to the live ones (never 1e-30 / 0)
        self.scale_ = np.where(std > 1e-12 * max(ref, 1e-300), std, max(ref, 1.0))
        x = torch.from_numpy(self._standardize(x64))
        y = torch.as_tensor(np.asarray(train.labels), dtype=torch.long)
        c = int(train.num_classes or int(train.labels.max()) + 1)
        self.num_classes_ = c
        dom = np.asarray(train.extras[self.domain_key]) if self.domain_key in train.extras else np.zeros(len(train))
        if dom.shape != (len(train),):
            raise ValueError(f"extras[{self.domain_key!r}] must hold one domain id per sample, got shape {dom.shape}.")
        groups = [np.flatnonzero(dom == d) for d in np.unique(dom)]
        groups = [g for g in groups if len(g) >= 2]
        if not groups:
            raise ValueError("MOL.fit needs at least one domain with 2 or more samples.")
        x_out = None
        if outliers is not None:
            out = as_features(outliers)
            out.require({"features"}, "MOL.fit(outliers=...)")
            self._check_finite(out, {"features"}, "fit(outliers=...)")
            if out.features.shape[1] != x.shape[1]:
                raise ValueError(f"outliers have width {out.features.shape[1]} but train features {x.shape[1]}.")
            x_out = torch.from_numpy(self._standardize(out.features))
        gen = torch.Generator().manual_seed(int(self.seed))
        rng = np.random.default_rng(int(self.seed))
        params = {k: v.requires_grad_(True) for k, v in self._init_params(x.shape[1], c, gen).items()}
        opt = torch.optim.Adam(list(params.values()), lr=float(self.outer_lr))
        log = []
        for _ in range(int(self.meta_iters)):
            loss = 0.0
            for _ in range(int(self.tasks_per_iter)):
                g = groups[rng.integers(len(groups))]
                perm = rng.permutation(g)
                n_sup = min(int(self.support_size), len(g) - 1)
                sup, qry = perm[:n_sup], perm[n_sup:n_sup + int(self.query_size)]
                adapted = self._sgd(params, x[sup], y[sup], int(self.inner_steps), create_graph=True)
                task = torch.nn.functional.cross_entropy(self._forward(adapted, x[qry]), y[qry])
                if x_out is not None and self.energy_weight:
                    o = torch.from_numpy(rng.integers(0, len(x_out), len(qry)))
                    task = task + float(self.energy_weight) * self._energy_hinge(adapted, x[qry], x_out[o])
                loss = loss + task / int(self.tasks_per_iter)
            opt.zero_grad()
            loss.backward()
            opt.step()
            log.append(float(loss.detach()))
        if not np.isfinite(log[-1]):
            raise FloatingPointError("MOL meta-training diverged (non-finite loss); lower outer_lr or inner_lr.")
        self.init_params_ = {k: v.detach().numpy().astype(np.float64) for k, v in params.items()}
        self.params_ = {k: v.copy() for k, v in self.init_params_.items()}
        self.meta_losses_ = np.asarray(log)

    # ------------------------------------------------------------------ deployment
    def reset(self) -> "MOL":
        """Back to the meta-learned initialisation."""
        if self.is_fitted:
            self.params_ = {k: v.copy() for k, v in self.init_params_.items()}
        return self

    def adapt(self, support: Features, steps: int | None = None) -> "MOL":
        """``adapt_steps`` SGD steps from the meta-learned initialisation on a few labelled
        samples of the new distribution (``support`` needs ``features`` and ``labels``)."""
        import torch

        if not self.is_fitted:
            raise ValueError("MOL.adapt before fit: meta-train first with fit(train).")
        s = as_features(support)
        s.require({"features", "labels"}, "MOL.adapt")
        self._check_finite(s, {"features"}, "adapt")
        if len(s) == 0:
            raise ValueError("MOL.adapt got 0 support samples.")
        if s.features.shape[1] != len(self.mean_):
            raise ValueError(f"MOL was fitted on features of width {len(self.mean_)}, support has {s.features.shape[1]}.")
        labels = np.asarray(s.labels)
        if labels.min() < 0 or labels.max() >= self.num_classes_:
            raise ValueError(f"MOL.adapt needs ID labels in [0, {self.num_classes_}); got {labels.min()}..{labels.max()}.")
        params = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in self.init_params_.items()}
        x = torch.from_numpy(self._standardize(s.features))
        y = torch.as_tensor(labels, dtype=torch.long)
        adapted = self._sgd(params, x, y, int(self.adapt_steps if steps is None else steps), create_graph=False)
        self.params_ = {k: v.detach().numpy().astype(np.float64) for k, v in adapted.items()}
        return self

    def logits(self, x: Features) -> np.ndarray:
        """The current (adapted) head's logits, float64."""
        z = (np.asarray(x.features, dtype=np.float64) - self.mean_) / self.scale_
        p = self.params_
        if "w1" in p:
            z = np.maximum(z @ p["w1"].T + p["b1"], 0.0)
        return z @ p["w2"].T + p["b2"]

    def _score(self, x: Features) -> np.ndarray:
        return logsumexp(self.logits(x), axis=1)

    def score_stream(self, stages: Iterable[tuple[Features | None, Features]]) -> list[np.ndarray]:
        """For each ``(support, test)`` stage of a shifting stream: reset to the meta-learned
        initialisation, adapt on ``support`` (``None``: no adaptation) and score ``test``."""
        out = []
        for support, test in stages:
            self.reset()
            if support is not None:
                self.adapt(support)
            out.append(self.score(test))
        return out
