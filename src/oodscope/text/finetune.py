"""Supervised fine-tuning of a sentence encoder on in-distribution text.

Objectives (``objective=``):

* ``"ce"``: cross-entropy through a linear classifier on the sentence embedding.
* ``"supcon"``: cross-entropy + lambda * supervised contrastive loss (Khosla et al., 2020).
* ``"margin"``: cross-entropy + lambda * margin-based contrastive loss, as in Zhou, Liu and
  Chen (2021), "Contrastive Out-of-Distribution Detection for Pretrained Transformers"
  (EMNLP): same-class pairs are pulled together (mean squared distance) and different-class
  pairs pushed beyond a margin xi set to the largest same-class distance in the batch,
  both normalised by the embedding width.

Batches are class-balanced (``classes_per_batch`` classes x ``per_class`` texts) so every
sample has positives for the contrastive terms. Training is bounded by ``steps`` so it stays
CPU-feasible for small encoders such as MiniLM-L6 (a few minutes for a few hundred steps).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .data import validate_texts
from .encoders import SentenceEncoder, load_encoder

__all__ = ["finetune_encoder", "margin_contrastive_loss", "supervised_contrastive_loss"]

OBJECTIVES = ("ce", "supcon", "margin")


def supervised_contrastive_loss(z: Any, y: Any, temperature: float = 0.1) -> Any:
    """SupCon loss (Khosla et al., 2020) on L2-normalised embeddings ``z``; anchors without a
    positive in the batch are skipped."""
    import torch

    z = torch.nn.functional.normalize(z, dim=1)
    sim = z @ z.T / temperature
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    pos = (y[:, None] == y[None, :]) & ~self_mask
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    n_pos = pos.sum(1)
    keep = n_pos > 0
    if not keep.any():
        return z.sum() * 0.0
    mean_log_prob_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1)[keep] / n_pos[keep]
    return -mean_log_prob_pos.mean()


def margin_contrastive_loss(h: Any, y: Any) -> Any:
    """Margin-based contrastive loss of Zhou et al. (2021): mean squared distance to
    same-class samples plus hinge ``(xi - d^2)_+`` to other-class samples, where the margin
    ``xi`` is the largest same-class squared distance in the batch (detached), divided by
    the embedding width."""
    import torch

    d2 = torch.cdist(h, h).pow(2)
    n = h.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=h.device)
    pos = (y[:, None] == y[None, :]) & ~self_mask
    neg = y[:, None] != y[None, :]
    if not pos.any() or not neg.any():
        return h.sum() * 0.0
    xi = d2[pos].max().detach()
    pos_term = torch.where(pos, d2, torch.zeros_like(d2)).sum(1) / pos.sum(1).clamp_min(1)
    neg_term = torch.where(neg, torch.relu(xi - d2), torch.zeros_like(d2)).sum(1) / neg.sum(1).clamp_min(1)
    return (pos_term + neg_term).mean() / h.shape[1]


def _balanced_batches(labels: np.ndarray, classes_per_batch: int, per_class: int, rng: np.random.Generator):
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    classes = np.array(sorted(by_class))
    while True:
        chosen = rng.choice(classes, size=min(classes_per_batch, len(classes)), replace=False)
        idx = [rng.choice(by_class[c], size=per_class, replace=len(by_class[c]) < per_class) for c in chosen]
        yield np.concatenate(idx)


def finetune_encoder(
    encoder: SentenceEncoder | str | None,
    texts: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    objective: str = "ce",
    steps: int = 300,
    lr: float = 3e-5,
    head_lr: float = 3e-3,
    classes_per_batch: int = 16,
    per_class: int = 4,
    contrastive_weight: float = 1.0,
    temperature: float = 0.1,
    max_length: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> SentenceEncoder:
    """Fine-tune a copy of a sentence-transformers encoder on labelled in-distribution texts.

    Returns a new `SentenceEncoder` (the input encoder is untouched) with a ``finetune_info``
    dict (objective, steps, seconds, final losses). Its weights differ from the original, so
    the embedding cache keys differ too.
    """
    import torch
    from tqdm.auto import tqdm

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    enc = load_encoder(encoder)
    if not isinstance(enc, SentenceEncoder):
        raise ValueError("finetune_encoder works on SentenceEncoder (sentence-transformers) models.")
    texts = validate_texts(texts)
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != len(texts):
        raise ValueError(f"Got {len(texts)} texts but {y.shape[0]} labels.")
    if y.dtype.kind not in "iu" or (y.size and y.min() < 0):
        raise ValueError("labels must be non-negative integer class indices of in-distribution texts.")
    if len(np.unique(y)) < 2:
        raise ValueError("Fine-tuning needs at least two classes.")

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = copy.deepcopy(enc.model_)
    model.max_seq_length = min(int(max_length), int(getattr(model, "max_seq_length", max_length) or max_length))
    getter = getattr(model, "get_embedding_dimension", None) or getattr(model, "get_sentence_embedding_dimension", None)
    dim = getter() if getter is not None else None
    if dim is None:
        dim = model.encode([texts[0]], convert_to_numpy=True).shape[1]
    num_classes = int(y.max()) + 1
    classifier = torch.nn.Linear(dim, num_classes)
    scale = math.sqrt(dim)  # unit-norm embeddings -> roughly unit per-dimension scale
    opt = torch.optim.AdamW([
        {"params": model.parameters(), "lr": lr},
        {"params": classifier.parameters(), "lr": head_lr},
    ], weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / max(1, steps - warmup)) if s >= warmup
        else (s + 1) / warmup)
    batches = _balanced_batches(y, classes_per_batch, per_class, rng)
    model.train()
    t0 = time.time()
    history = []
    bar = tqdm(range(steps), desc=f"finetune[{objective}]", disable=not progress, leave=False)
    for step in bar:
        idx = next(batches)
        feats = model.tokenize([texts[i] for i in idx])
        out = model(feats)
        h = out["sentence_embedding"]
        yb = torch.as_tensor(y[idx])
        ce = torch.nn.functional.cross_entropy(classifier(h * scale), yb)
        loss = ce
        extra = torch.zeros(())
        if objective == "supcon":
            extra = supervised_contrastive_loss(h, yb, temperature)
        elif objective == "margin":
            extra = margin_contrastive_loss(h, yb)
        loss = ce + contrastive_weight * extra
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(classifier.parameters()), 1.0)
        opt.step()
        sched.step()
        history.append((float(ce.detach()), float(extra.detach())))
        if step % 10 == 0:
            bar.set_postfix(ce=f"{history[-1][0]:.3f}", aux=f"{history[-1][1]:.3f}")
    model.eval()
    tail = np.array(history[-20:])
    new = SentenceEncoder(model, device=enc.device, batch_size=enc.batch_size, normalize=enc.normalize,
                          max_length=enc.max_length, progress=enc.progress)
    new.finetune_info = {
        "base": enc.name, "objective": objective, "steps": int(steps), "lr": lr,
        "batch": classes_per_batch * per_class, "seconds": round(time.time() - t0, 1),
        "final_ce": float(tail[:, 0].mean()), "final_aux": float(tail[:, 1].mean()),
    }
    return new
