"""MultiOOD: multimodal OOD training (A2D, NP-Mix) and score fusion across modalities.

Dong et al., "MultiOOD: Scaling Out-of-Distribution Detection for Multiple Modalities",
NeurIPS 2024 (code: donghao51/MultiOOD). A network has one encoder and one classifier head per
modality and a fused head on the concatenated embeddings; the base loss is the mean
cross-entropy of the fused and the per-modality heads. Two additions:

* **A2D (agree to disagree)**: with ``p̃_m`` the softmax of modality ``m``'s logits with the
  ground-truth entry removed, ``L_A2D = −Hellinger(p̃_a, p̃_b)`` — the heads agree on the true
  class and disagree as much as possible on the rest (L1, L2 and Wasserstein are the repo's
  alternatives; averaged over modality pairs beyond two);
* **NP-Mix**: a queue of the last ``queue_size`` (65) fused embeddings per class gives class
  prototypes; for each class ``i`` a neighbour ``j`` is drawn among its ``nn_k − 1`` nearest
  prototypes, and ``f_ood = λ f_i + (1 − λ) f_j`` (``λ ~ Beta(α, α)``, α = 10) mixes a random
  queued embedding of each. The modality heads, applied to their slices of ``f_ood``, are
  pushed to high normalised entropy and to disagree:
  ``L_NP = −w_ent · mean_m H̄(p_m(f_ood)) − w_a2d · Hellinger(p_a(f_ood), p_b(f_ood))``,
  from ``start_epoch`` on, once every queue is full.

Defaults (repo): A2D weight 0.5 (1.0 is the paper's A2D-only setting), entropy and OOD-A2D
weights 0.5, nn_k = 3, queue 65, α = 10, start epoch 10, Adam lr 1e-4. Test time: any
post-hoc detector on the fused logits / embeddings (`MultiModalNet.features`); or score each
modality with its own detector and fuse the scores (`ModalityScoreFusion`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiModalNet", "hellinger", "drop_true_class", "a2d_loss", "normalized_entropy", "NPMix",
           "train_multimodal", "ModalityScoreFusion", "MULTIOOD_PROTOCOLS", "two_view_images"]

#: The MultiOOD benchmark (README and train scripts of donghao51/MultiOOD) for users with the
#: real data; split files ship in the repo under HMDB-rgb-flow/splits/ and EPIC-rgb-flow/splits/.
#: ``id_classes``/``ood_classes`` per near-OOD split; ``weights`` are the repo's A2D / NP-Mix
#: ratios for that split (a2d, a2d_ood, entropy) with A2D + NP-Mix, and epochs.
MULTIOOD_PROTOCOLS: dict[str, dict[str, Any]] = {
    "near/HMDB51": {"modalities": ("video", "flow"), "id_classes": 25, "ood_classes": 26,
                    "weights": (0.5, 0.5, 0.5), "epochs": 50},
    "near/UCF101": {"modalities": ("video", "flow"), "id_classes": 50, "ood_classes": 51,
                    "weights": (0.5, 0.5, 0.5), "epochs": 50},
    "near/EPIC-Kitchens": {"modalities": ("video", "flow", "audio"), "id_classes": 4, "ood_classes": 4,
                           "weights": (0.1, 0.1, 0.1), "epochs": 20},
    "near/Kinetics-600": {"modalities": ("video", "flow", "audio"), "id_classes": 129, "ood_classes": 100,
                          "weights": (0.1, 0.1, 0.1), "epochs": 20},
    "far/HMDB51": {"modalities": ("video", "flow"), "id_classes": 43,
                   "ood_sets": ("UCF101", "HAC", "Kinetics-600", "EPIC-Kitchens"), "weights": (0.1, 0.1, 0.1),
                   "epochs": 50},
    "far/Kinetics-600": {"modalities": ("video", "flow"), "id_classes": 229,
                         "ood_sets": ("HMDB51", "UCF101", "HAC", "EPIC-Kitchens")},
}
#: Backbones of the paper: SlowFast-R101 (RGB), SlowOnly-R50 (flow), VGGSound ResNet-18 (audio);
#: Adam lr 1e-4, batch 16, NP-Mix from epoch 10, queue 65, nn_k 3, Beta(10, 10).


def two_view_images(images: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two "modalities" from one image set for a small offline benchmark: the top and the
    bottom half of each (N, H, W) image, flattened, in [0, 1] for uint8 input. Each view alone
    is a weaker classifier than both, as with video and flow."""
    x = np.asarray(images)
    if x.ndim != 3 or x.shape[1] < 2:
        raise ValueError(f"two_view_images needs (N, H, W) images with H >= 2, got shape {x.shape}.")
    x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    h = x.shape[1] // 2
    return x[:, :h].reshape(len(x), -1), x[:, h:].reshape(len(x), -1)


def hellinger(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``‖√p − √q‖₂ / √2`` (in [0, 1]); probabilities clamped at 1e-6 as the repo."""
    p, q = p.clamp_min(1e-6), q.clamp_min(1e-6)
    return (torch.sqrt(((p.sqrt() - q.sqrt()) ** 2).sum(-1)) / np.sqrt(2.0)).mean()


def drop_true_class(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(B, C−1)``: each row without its ground-truth column."""
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, y.view(-1, 1), False)
    return logits[keep].view(len(logits), -1)


def _distance(p: torch.Tensor, q: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hellinger":
        return hellinger(p, q)
    if kind == "l1":
        return (p - q).abs().mean()
    if kind == "l2":
        return ((p - q) ** 2).mean()
    raise ValueError(f"distance must be 'hellinger', 'l1' or 'l2', got {kind!r}.")


def a2d_loss(modality_logits: Sequence[torch.Tensor], y: torch.Tensor, distance: str = "hellinger") -> torch.Tensor:
    """``−mean over modality pairs of distance(softmax(drop_true(z_a)), softmax(drop_true(z_b)))``."""
    probs = [F.softmax(drop_true_class(z, y), dim=1) for z in modality_logits]
    return -torch.stack([_distance(a, b, distance) for a, b in combinations(probs, 2)]).mean()


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row softmax entropy divided by ``log C`` (in [0, 1])."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1) / np.log(logits.shape[-1])


class MultiModalNet(nn.Module):
    """Per-modality encoders and heads plus a fused linear head on the concatenated embeddings.

    ``encoders[m]`` maps modality ``m``'s input to an embedding of width ``dims[m]``.
    ``forward(inputs)`` returns ``{"logits": fused, "modality_logits": [...], "embeddings": [...]}``."""

    def __init__(self, encoders: Sequence[nn.Module], dims: Sequence[int], num_classes: int):
        super().__init__()
        if len(encoders) != len(dims) or len(encoders) < 2:
            raise ValueError(f"MultiModalNet needs >= 2 modalities with one width each; got {len(encoders)} "
                             f"encoders and {len(dims)} widths.")
        self.encoders = nn.ModuleList(encoders)
        self.heads = nn.ModuleList([nn.Linear(int(d), int(num_classes)) for d in dims])
        self.fc = nn.Linear(int(sum(dims)), int(num_classes))  # registered last: `extract` finds it
        self.dims = [int(d) for d in dims]

    def slices(self) -> list[slice]:
        edges = np.cumsum([0, *self.dims])
        return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    def forward(self, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
        if len(inputs) != len(self.encoders):
            raise ValueError(f"Expected {len(self.encoders)} modality inputs, got {len(inputs)}.")
        emb = [enc(x) for enc, x in zip(self.encoders, inputs)]
        return {"logits": self.fc(torch.cat(emb, dim=1)), "modality_logits": [h(e) for h, e in zip(self.heads, emb)],
                "embeddings": emb}


class NPMix:
    """Nearest-prototype mixup of fused embeddings (class queues of ``queue_size``)."""

    def __init__(self, num_classes: int, dim: int, queue_size: int = 65, nn_k: int = 3, alpha: float = 10.0,
                 seed: int = 0):
        if nn_k < 2 or num_classes < 2:
            raise ValueError("NP-Mix needs nn_k >= 2 (itself plus at least one neighbour) and >= 2 classes.")
        self.queue = torch.zeros(num_classes, int(queue_size), int(dim))
        self.count = np.zeros(num_classes, dtype=np.int64)
        self.nn_k = min(int(nn_k), num_classes)
        self.alpha = float(alpha)
        self.rng = np.random.default_rng(seed)

    @property
    def ready(self) -> bool:
        return bool(np.all(self.count >= self.queue.shape[1]))

    def update(self, fused: torch.Tensor, y: torch.Tensor) -> None:
        """Push detached embeddings: fill each queue, then drop its oldest entry (FIFO)."""
        for f, c in zip(fused.detach().cpu(), y.cpu().tolist()):
            n = self.count[c]
            if n < self.queue.shape[1]:
                self.queue[c, n] = f
            else:
                self.queue[c] = torch.cat([self.queue[c, 1:], f[None]], 0)
            self.count[c] += 1

    def prototypes(self) -> torch.Tensor:
        return self.queue.mean(1)

    def sample(self) -> torch.Tensor:
        """One synthetic outlier embedding per class, ``(C, D)``."""
        if not self.ready:
            raise ValueError("NP-Mix queues are not full yet; call update() with more ID batches first.")
        protos = self.prototypes()
        d = torch.cdist(protos, protos)
        neighbours = d.argsort(dim=1)[:, 1:self.nn_k]  # nearest first, itself excluded
        size = self.queue.shape[1]
        out = []
        for i in range(len(protos)):
            j = int(self.rng.choice(neighbours[i].numpy()))
            lam = float(self.rng.beta(self.alpha, self.alpha))
            out.append(lam * self.queue[i, self.rng.integers(size)] + (1 - lam) * self.queue[j, self.rng.integers(size)])
        return torch.stack(out)


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    perm = rng.permutation(n)
    for s in range(0, n, batch_size):
        yield perm[s:s + batch_size]


def train_multimodal(net: MultiModalNet, inputs: Sequence[Any], labels: Any, epochs: int = 50, lr: float = 1e-4,
                     batch_size: int = 16, a2d_weight: float = 0.5, distance: str = "hellinger",
                     npmix: bool = True, entropy_weight: float = 0.5, ood_a2d_weight: float = 0.5,
                     queue_size: int = 65, nn_k: int = 3, alpha: float = 10.0, start_epoch: int = 10,
                     seed: int = 0) -> list[dict[str, float]]:
    """Train ``net`` on per-modality arrays ``inputs`` and ``labels`` with CE (fused + each
    modality) + A2D (+ NP-Mix). ``a2d_weight=0, npmix=False`` is the plain baseline. Returns
    the per-epoch mean losses."""
    xs = [torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in inputs]
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if any(len(x) != len(y) for x in xs):
        raise ValueError(f"Every modality needs one row per label: {[len(x) for x in xs]} rows, {len(y)} labels.")
    if len(y) == 0 or y.min() < 0 or y.max() >= net.fc.out_features:
        raise ValueError(f"labels must be class indices in [0, {net.fc.out_features}); got "
                         f"{'none' if len(y) == 0 else f'{int(y.min())}..{int(y.max())}'}.")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mixer = NPMix(net.fc.out_features, sum(net.dims), queue_size, nn_k, alpha, seed) if npmix else None
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    history = []
    for epoch in range(int(epochs)):
        net.train()
        sums: dict[str, float] = {}
        steps = 0
        for idx in _batches(len(y), int(batch_size), rng):
            yb = y[idx]
            out = net([x[idx] for x in xs])
            ce = (F.cross_entropy(out["logits"], yb)
                  + sum(F.cross_entropy(z, yb) for z in out["modality_logits"])) / (1 + len(xs))
            terms = {"ce": ce}
            if a2d_weight:
                terms["a2d"] = a2d_weight * a2d_loss(out["modality_logits"], yb, distance)
            if mixer is not None:
                ready_before = mixer.ready
                mixer.update(torch.cat(out["embeddings"], 1), yb)
                if ready_before and epoch >= start_epoch:
                    fake = mixer.sample()
                    logits = [h(fake[:, s]) for h, s in zip(net.heads, net.slices())]
                    terms["np_entropy"] = -entropy_weight * torch.stack(
                        [normalized_entropy(z).mean() for z in logits]).mean()
                    terms["np_a2d"] = -ood_a2d_weight * torch.stack(
                        [_distance(F.softmax(a, 1), F.softmax(b, 1), distance)
                         for a, b in combinations(logits, 2)]).mean()
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"MultiOOD training diverged at epoch {epoch + 1}; lower lr.")
            opt.zero_grad()
            loss.backward()
            opt.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            steps += 1
        history.append({"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}})
    net.eval()
    return history


class ModalityScoreFusion:
    """Fuse per-modality OOD scores (higher = more ID) into one: each modality's scores are
    standardised with held-out ID scores (``"zscore"``: mean/std; ``"rank"``: their empirical
    CDF, mid-rank for ties) and averaged with ``weights``. Per sample: a sample's fused score
    never depends on the rest of the batch."""

    def __init__(self, method: str = "zscore", weights: Sequence[float] | None = None):
        self.method = method
        self.weights = weights

    def fit(self, id_scores: Sequence[Any]) -> ModalityScoreFusion:
        if self.method not in ("zscore", "rank"):
            raise ValueError(f"method must be 'zscore' or 'rank', got {self.method!r}.")
        cols = [self._check(s, "id_scores") for s in id_scores]
        if len(cols) < 2:
            raise ValueError("Score fusion needs the scores of at least 2 modalities.")
        self.sorted_ = [np.sort(c) for c in cols]
        self.stats_ = [(float(c.mean()), float(c.std()) if c.std() > 0 else 1.0) for c in cols]
        w = np.ones(len(cols)) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        if w.shape != (len(cols),) or np.any(w < 0) or not w.sum() > 0:
            raise ValueError(f"weights must be {len(cols)} non-negative numbers with a positive sum.")
        self.weights_ = w / w.sum()
        return self

    @staticmethod
    def _check(s: Any, what: str) -> np.ndarray:
        a = np.asarray(s, dtype=np.float64).reshape(-1)
        if a.size == 0 or not np.all(np.isfinite(a)):
            raise ValueError(f"{what}: every modality needs a non-empty, finite score vector.")
        return a

    def transform(self, scores: Sequence[Any]) -> np.ndarray:
        """``(N, M)`` standardised per-modality scores."""
        if not hasattr(self, "stats_"):
            raise ValueError("ModalityScoreFusion is not fitted: call fit(id_scores_per_modality) first.")
        cols = [self._check(s, "scores") for s in scores]
        if len(cols) != len(self.stats_) or len({len(c) for c in cols}) != 1:
            raise ValueError(f"Give {len(self.stats_)} score vectors of equal length (one per modality).")
        out = []
        for c, (mean, std), ref in zip(cols, self.stats_, self.sorted_):
            if self.method == "zscore":
                out.append((c - mean) / std)
            else:
                out.append((np.searchsorted(ref, c, "left") + np.searchsorted(ref, c, "right")) / (2.0 * len(ref)))
        return np.stack(out, 1)

    def score(self, scores: Sequence[Any]) -> np.ndarray:
        return self.transform(scores) @ self.weights_
