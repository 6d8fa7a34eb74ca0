"""CLIP prompt tuning for OOD detection: LAPT, Local-Prompt, KR-NFT and CMA.

Every ``train_*`` function returns a `PromptResult` (save it with
`oodscope.vlm.prompts.save_prompts`) whose arrays the matching detector in
`oodscope.detectors.vlm_tuned` scores with (``lapt``, ``local_prompt``, ``krnft``,
``cma``). Image towers stay frozen except in CMA. Defaults follow the authors' released
configurations (named per method below); the tests train tiny random CLIPs for a few steps.

* **LAPT** (Zhang et al., ECCV 2024; code: OpenOOD-VLM ``scripts/ood/lapt``). CoOp context
  (4 tokens from "a photo of a", one context for every label) over the ID class names and
  NegMining negatives; cross-entropy over the C + M labels on images of every label, plus
  *cross-modal mixing* (an image embedding mixed with the frozen text embedding of its own
  label, same target) and *cross-distribution mixing* (an ID image mixed with a negative-
  label image, soft target λ·y_id + (1 − λ)·y_neg); λ ~ Beta(1, 1) folded into [0, 0.5] and
  the mixed embedding L2-normalised, as in the authors' ``mixup_data``. SGD (Nesterov) lr
  0.01, wd 1e-5, 10 epochs, batch 32, cosine to 1e-6; 1,000 negatives in training, 10,000 at
  scoring (through the learned context), grouped NegLabel with 100 groups.
  Deviations: the authors' feature mixup pairs any two batch samples of different labels,
  we pair ID with negative samples only (the paper's "cross-distribution"); the cross-modal
  anchor is one prompt template (theirs: several); LAPT collects negative-label images
  automatically (generation or retrieval) — pass them as ``neg_features``; without them the
  negatives' text embeddings stand in for their images (our fallback).
* **Local-Prompt** (Zeng et al., ICLR 2025; code: AuroraZengfh/Local-Prompt). Every epoch
  16 fresh random crops per few-shot image are ranked by cosine with the frozen "a photo of
  a {class}." prompt; each of the 8 most similar is a positive (one SGD step each), the
  least similar is the negative. Class-specific local prompts (16 context tokens) and 300
  negative local prompts are trained on the crops' patch embeddings with the regional
  contrastive losses of the authors' code (top-20 regions, T = 1, negative weight 5,
  diversity weight 0.5); SGD lr 2e-3 (one constant warm-up epoch at 1e-5, then cosine), wd
  5e-4, 30 epochs, batch 256. Scored with Regional-MCM.
  Deviations: crops are square with the area drawn from (0.08, 1) (torchvision's
  ``RandomResizedCrop`` also varies the aspect ratio); the diversity term is the mean
  off-diagonal cosine of the *negative* local prompts, whose diversity it is named for —
  the released trainer computes the cosine matrix of the ID local prompts (diagonal
  included) while normalising by the negative-prompt count.
* **KR-NFT** (Zhu et al., ACM MM 2025; code: ZhuWenjie98/KRNFT). Negative Feature Tuning:
  the frozen text features ("The nice {}.") of the ID labels and 10,500 mined negatives get
  distribution-aware affine transforms (one scale/shift pair for ID rows, one for negative
  rows), each plus an image-conditional residual from a meta-network (hidden width D / 64,
  last layer zero-initialised) fed the most class-like crop. Loss (authors' code):
  ``λ_in·CE_grouped(32 best crops) + λ_out·mean log p_ID(32 worst crops) +
  λ_kd·(1 − cos(tuned, frozen))`` with 1 / 0.3 / 10 and 10 groups, of 128 fresh crops per
  image; AdamW lr 1e-5 (its default weight decay 0.01), batch 1, 3 epochs; scored with
  grouped NegLabel on the transformed features.
  Deviations: negative groups are a split of all negatives into near-equal parts (the
  released code drops the remainder); every epoch visits every image (the released trainer
  stops each epoch after a tenth of the batches).
* **CMA** (Kim et al., CVPR 2025; code: ma-kjh/CMA). Full fine-tuning of both towers with
  the FLYP contrastive loss plus the cross-modal alignment regulariser
  ``½[CE_img + λ·mean(−logsumexp_row)] + ½[CE_txt + λ·mean(−logsumexp_col)]`` (λ = 1e-3,
  AdamW lr 1e-5, wd 0.1, 500 warm-up steps then cosine, batch 512, 10 epochs); scored with
  NegLabel ("The nice {}", no grouping) on the fine-tuned model. Deviation: the learned
  logit scale is clamped at 100 during training (CLIP's own cap).

Real-size recipe: a local ViT-B/16 checkpoint (``vlm.load("hf:/path/to/clip-vit-base-
patch16")``), ImageNet-1k training images (LAPT and CMA: all of them plus, for LAPT, the
negative-label images; Local-Prompt 16-shot; KR-NFT 4-shot), the defaults above; a GPU.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..features import Features
from .backends import DualEncoder, load
from .prompts import FewShotProtocol, PromptableText, PromptResult, embed_crops, frozen_weights, random_crops

__all__ = ["mine_negative_words", "train_cma", "train_krnft", "train_lapt", "train_local_prompt"]

#: the methods' default data protocols (LAPT and CMA tune on all given images; Local-Prompt's
#: headline setting is 16-shot, KR-NFT's 4-shot)
ALL_IMAGES, SIXTEEN_SHOT, FOUR_SHOT = FewShotProtocol(None), FewShotProtocol(16), FewShotProtocol(4)


# ---------------------------------------------------------------- shared helpers
def _torch():
    import torch

    return torch


def _frozen_towers(fn):
    """Run ``fn`` with the encoder's weights excluded from autograd (restored afterwards)."""

    @functools.wraps(fn)
    def wrapper(encoder, *args, **kwargs):
        encoder = load(encoder)
        with frozen_weights(encoder.model):
            return fn(encoder, *args, **kwargs)

    return wrapper


def _check_names(class_names) -> list[str]:
    from ..detectors.vlm import _check_class_names

    return _check_class_names(class_names)


def _optimizer(params, name: str, lr: float, weight_decay: float, steps: int, warmup: int = 0,
               warmup_lr: float | None = None, min_lr: float = 0.0, nesterov: bool = False):
    """Optimiser plus a per-step schedule: ``warmup`` steps (linear from 0, or constant at
    ``warmup_lr`` as Dassl's "constant" warm-up), then cosine from ``lr`` to ``min_lr`` over
    the remaining steps."""
    torch = _torch()
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}.")
    if name == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov)
    elif name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}.")
    warmup = max(0, min(int(warmup), steps - 1))
    span = max(1, steps - warmup)
    floor = min_lr / lr

    def factor(s):
        if s < warmup:
            return warmup_lr / lr if warmup_lr is not None else (s + 1) / warmup
        t = min(s - warmup, span) / span
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _mix_lambda(rng, alpha: float) -> float:
    """λ ~ Beta(α, α) folded into [0, 0.5] (the authors' ``mixup_data``: the mixed sample
    always leans towards its partner); ``alpha <= 0`` gives 0 (no mixing partner weight)."""
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 0.0
    return min(lam, 1.0 - lam)


def _step(opt, sched, loss, what: str, step: int) -> float:
    torch = _torch()
    if not bool(torch.isfinite(loss.detach())):
        raise ValueError(f"{what}: the loss became {float(loss.detach())} at step {step}; lower the "
                         "learning rate or check the inputs for NaN.")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def _epochs_of(n: int, batch_size: int, epochs: int, seed: int):
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}.")
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = rng.permutation(n)
        yield [perm[s:s + batch_size] for s in range(0, n, batch_size)]


def _grouped_logits(pos, neg, n_groups: int, seed: int):
    """``[(B, C + G_g)]`` logits with the negatives split into ``n_groups`` random groups."""
    torch = _torch()
    m = neg.shape[1]
    g = max(1, min(int(n_groups), m))
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(m))
    return [torch.cat([pos, neg[:, idx]], dim=1) for idx in torch.tensor_split(perm, g)]


def _image_embeds(f: Features, what: str) -> np.ndarray:
    if not isinstance(f, Features) or "image_embeds" not in f.extras:
        raise ValueError(f"{what} must be Features with extras['image_embeds'] (oodscope.vlm.extract).")
    x = np.asarray(f.extras["image_embeds"], dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: image embeddings contain NaN or inf.")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _labels(f: Features, c: int, what: str) -> np.ndarray:
    if f.labels is None:
        raise ValueError(f"{what} needs labels.")
    y = np.asarray(f.labels, dtype=np.int64)
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"{what}: labels must lie in [0, {c}), got [{y.min()}, {y.max()}].")
    return y


def _labelled_embeds(encoder, class_names, features: Features, what: str = "id_features"):
    """``(encoder, names, embeddings, labels)``: the encoder resolved, the class names checked,
    the labelled image embeddings of ``features`` read and validated."""
    encoder = load(encoder)
    names = _check_names(class_names)
    return encoder, names, _image_embeds(features, what), _labels(features, len(names), what)


def _images_and_labels(images, labels, c: int, protocol: FewShotProtocol, what: str):
    y = np.asarray(labels, dtype=np.int64)
    if len(images) != len(y):
        raise ValueError(f"{what}: {len(images)} images but {len(y)} labels.")
    if y.size == 0 or y.min() < 0 or y.max() >= c:
        raise ValueError(f"{what}: labels must lie in [0, {c}).")
    idx = protocol.select(y, c)
    return [images[i] for i in idx], y[idx], idx


def mine_negative_words(encoder: DualEncoder, class_names: Sequence[str], words: Any = None,
                        n_negatives: int = 10000, template: str = "The nice {}.", percentile: float = 0.95):
    """NegMining: the ``n_negatives`` words (default WordNet nouns + adjectives) farthest from
    the ID labels, and their frozen text embeddings ``(M, D)``."""
    from ..detectors.vlm import mine_negatives
    from .wordnet import load_word_list, wordnet_words

    pool = load_word_list(words) if words is not None else wordnet_words(("noun", "adj"))
    ids = {n.strip().casefold() for n in class_names}
    pool = [w for w in pool if w.strip().casefold() not in ids]
    if not pool:
        raise ValueError("No candidate negative words left after removing the ID class names.")
    id_emb = encoder.encode_text(list(class_names), (template,))
    cand = encoder.encode_text(pool, (template,), progress=len(pool) > 2000)
    idx = mine_negatives(cand, id_emb, n_negatives, percentile)
    return [pool[i] for i in idx], cand[idx].astype(np.float64)


def resolve_negatives(encoder: DualEncoder, class_names: Sequence[str], neg_words: Sequence[str] | None, words: Any,
                      n_negatives: int, template: str, what: str) -> tuple[list[str], np.ndarray]:
    """``neg_words`` embedded with ``template``, or (when None) NegMining's ``n_negatives``
    from ``words``; refuses an empty list."""
    if neg_words is None:
        neg_words, emb = mine_negative_words(encoder, class_names, words, n_negatives, template)
    else:
        neg_words = [str(w) for w in neg_words]
        emb = encoder.encode_text(neg_words, (template,)).astype(np.float64)
    if not neg_words:
        raise ValueError(f"{what} needs at least one negative label.")
    return list(neg_words), emb


def _history_entry(epoch: int, losses: list[float], t0: float, **extra) -> dict[str, float]:
    return {"epoch": epoch, "loss": float(np.mean(losses)), "time_s": round(time.time() - t0, 2), **extra}


# ---------------------------------------------------------------- LAPT
def _encode_in_chunks(text: PromptableText, names: list[str], ctx, chunk: int = 512) -> np.ndarray:
    """``text.encode`` without gradients, in chunks (thousands of negative labels)."""
    torch = _torch()
    out = []
    with torch.no_grad():
        for s in range(0, len(names), chunk):
            part = ctx[s:s + chunk] if ctx.ndim == 3 else ctx
            out.append(text.encode(names[s:s + chunk], part).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, text.encoder.embed_dim))


@_frozen_towers
def train_lapt(encoder: DualEncoder | str, class_names: Sequence[str], id_features: Features,
               neg_features: Features | None = None, neg_words: Sequence[str] | None = None,
               words: Any = None, n_negatives: int = 1000, n_score_negatives: int | None = 10000,
               score_neg_words: Sequence[str] | None = None, n_ctx: int = 4,
               ctx_init: str | None = "a photo of a", class_specific: bool = False, epochs: int = 10,
               batch_size: int = 32, lr: float = 0.01, optimizer: str = "sgd", weight_decay: float = 1e-5,
               mix_alpha: float = 1.0, cross_modal_weight: float = 1.0,
               cross_distribution_weight: float = 1.0, anchor_template: str = "a photo of a {}.",
               protocol: FewShotProtocol = ALL_IMAGES, n_groups: int = 100,
               seed: int = 0) -> PromptResult:
    """LAPT prompt tuning (see the module docstring).

    ``id_features`` : image embeddings + labels in [0, C) for the ID labels.
    ``neg_features`` : image embeddings + labels in [0, M) indexing ``neg_words`` (the
        automatically collected images of the negative labels); without them the negative
        labels' frozen text embeddings stand in for their images.
    ``neg_words`` : the training negative labels; when None, NegMining over ``words``
        (default WordNet nouns + adjectives) ranks the pool and the ``n_negatives`` farthest
        are trained on.
    ``n_score_negatives`` / ``score_neg_words`` : the negative labels the detector scores
        with, embedded through the *learned* context (the authors train with 1,000 negatives
        and test with 10,000). When the training negatives were mined here, the
        ``n_score_negatives`` farthest words of the same ranking are used; given
        ``score_neg_words`` are used as they are; otherwise the training negatives.
        A class-specific context has no context for new labels: it scores with the
        training negatives.
    """
    torch = _torch()
    encoder, names, x_id, y_id = _labelled_embeds(encoder, class_names, id_features)
    c = len(names)
    sel = protocol.select(y_id, c)
    x_id, y_id = x_id[sel], y_id[sel]
    ranked = None
    if neg_words is None:
        want = max(int(n_negatives), int(n_score_negatives or 0))
        ranked, _ = mine_negative_words(encoder, names, words, want)
        neg_words = ranked[:int(n_negatives)]
    neg_words = [str(w) for w in neg_words]
    if not neg_words:
        raise ValueError("LAPT needs at least one negative label.")
    m = len(neg_words)
    if score_neg_words is not None:
        if class_specific:
            raise ValueError("A class-specific LAPT context has no context for new negative labels; leave "
                             "score_neg_words unset (it scores with the training negatives).")
        score_words = [str(w) for w in score_neg_words]
    elif ranked is not None and n_score_negatives and not class_specific:
        score_words = ranked[:int(n_score_negatives)]
    else:
        score_words = neg_words
    text = PromptableText(encoder, n_ctx)
    anchors_np = np.concatenate([text.frozen(names, anchor_template), text.frozen(neg_words, anchor_template)])
    if neg_features is not None:
        x_neg = _image_embeds(neg_features, "neg_features")
        y_neg = _labels(neg_features, m, "neg_features") + c
        neg_source = "images"
    else:
        x_neg, y_neg, neg_source = anchors_np[c:], np.arange(c, c + m), "text-embeddings"
    if x_neg.shape[1] != x_id.shape[1] or anchors_np.shape[1] != x_id.shape[1]:
        raise ValueError("ID images, negative images and text embeddings must share one joint space.")
    x_all = torch.tensor(np.concatenate([x_id, x_neg]), dtype=torch.float32)
    y_all = torch.tensor(np.concatenate([y_id, y_neg]), dtype=torch.long)
    anchors = torch.tensor(anchors_np, dtype=torch.float32)
    labels = names + neg_words
    ctx = text.init_context(count=len(labels) if class_specific else None, init_text=ctx_init, seed=seed)
    n = len(x_all)
    steps = epochs * -(-n // batch_size)
    opt, sched = _optimizer([ctx], optimizer, lr, weight_decay, steps, min_lr=1e-6, nesterov=optimizer == "sgd")
    scale = float(encoder.logit_scale)
    rng = np.random.default_rng(seed + 1)
    history, step, t0 = [], 0, time.time()
    normalize = torch.nn.functional.normalize

    def soft_ce(logits, target):
        return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()

    for epoch, batches in enumerate(_epochs_of(n, batch_size, epochs, seed), 1):
        losses = []
        for idx in batches:
            t = text.encode(labels, ctx)                    # (C+M, D), through the text tower
            xb, yb = x_all[idx], y_all[idx]
            onehot = torch.nn.functional.one_hot(yb, c + m).float()
            loss = soft_ce(scale * xb @ t.T, onehot)
            if cross_modal_weight > 0:  # image mixed with the text of its own label, same target
                lam = _mix_lambda(rng, mix_alpha)
                xm = normalize(lam * xb + (1 - lam) * anchors[yb], dim=1)
                loss = loss + cross_modal_weight * soft_ce(scale * xm @ t.T, onehot)
            is_id = yb < c
            if cross_distribution_weight > 0 and bool(is_id.any()) and bool((~is_id).any()):
                lam = _mix_lambda(rng, mix_alpha)  # ID image weight; the target mixes alike
                i_idx = torch.nonzero(is_id).flatten()
                o_idx = torch.nonzero(~is_id).flatten()
                partner = o_idx[torch.as_tensor(rng.integers(0, len(o_idx), len(i_idx)))]
                xm = normalize(lam * xb[i_idx] + (1 - lam) * xb[partner], dim=1)
                target = lam * onehot[i_idx] + (1 - lam) * onehot[partner]
                loss = loss + cross_distribution_weight * soft_ce(scale * xm @ t.T, target)
            step += 1
            losses.append(_step(opt, sched, loss, "LAPT", step))
        history.append(_history_entry(epoch, losses, t0))
    id_text = _encode_in_chunks(text, names, ctx[:c] if class_specific else ctx)
    neg_text = _encode_in_chunks(text, score_words, ctx[c:] if class_specific else ctx)
    return PromptResult(
        method="lapt", class_names=names, neg_words=score_words, encoder=encoder.name, history=history,
        arrays={"ctx": ctx.detach().numpy(), "id_text": id_text, "neg_text": neg_text},
        config={"n_ctx": n_ctx, "ctx_init": ctx_init, "class_specific": class_specific, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "weight_decay": weight_decay,
                "mix_alpha": mix_alpha, "cross_modal_weight": cross_modal_weight,
                "cross_distribution_weight": cross_distribution_weight, "anchor_template": anchor_template,
                "n_groups": n_groups, "negative_images": neg_source, "n_train_negatives": m,
                "train_neg_words": neg_words if score_words != neg_words else None,
                "n_id_images": int(len(x_id)), "protocol": protocol.to_json(), "seed": seed,
                "logit_scale": scale})


# ---------------------------------------------------------------- Local-Prompt
def _local_contrastive(pos_logits, neg_logits, label, k: int, temperature: float):
    """-log Σ_topk e^{l_y/T} / Σ over the top-k regions of every prompt (authors' loss_local)."""
    torch = _torch()
    b = pos_logits.shape[0]
    ar = torch.arange(b)
    true = pos_logits[ar, :, label]                              # (B, P)
    top_true = true.topk(k, dim=1).values                        # (B, k)
    top_all = torch.cat([pos_logits.topk(k, dim=1).values, neg_logits.topk(k, dim=1).values], dim=2)
    num = torch.logsumexp(top_true / temperature, dim=1)
    den = torch.logsumexp(top_all.reshape(b, -1) / temperature, dim=1)
    return (den - num).mean()


def _local_negative(neg_prompt_logits, id_prompt_logits, label, k: int, temperature: float):
    """Negative crops: their top-k regions (by the true class) should match the negative
    prompts rather than the ID local prompts (authors' loss_local_neg)."""
    torch = _torch()
    b = neg_prompt_logits.shape[0]
    ar = torch.arange(b)
    pos = id_prompt_logits[ar, :, label].topk(k, dim=1).indices        # (B, k) regions
    sel_neg = torch.gather(neg_prompt_logits, 1, pos[:, :, None].expand(-1, -1, neg_prompt_logits.shape[2]))
    top_id = id_prompt_logits.topk(k, dim=1).values                     # (B, k, C)
    num = torch.logsumexp(sel_neg.reshape(b, -1) / temperature, dim=1)
    den = torch.logsumexp(torch.cat([sel_neg, top_id], dim=2).reshape(b, -1) / temperature, dim=1)
    return (den - num).mean()


def _select_crops(encoder, images, class_text, labels, n_views, crop_scale, rng, local_for: int):
    """Fresh random crops of ``images`` ranked by cosine with their true class's frozen prompt
    (global-prompt-guided selection): ``(global (B, V, D), order (B, V) most similar first,
    local tokens (B, local_for + 1, P, D) of the ``local_for`` best crops and the worst crop, or None)``."""
    crops = random_crops(images, n_views, crop_scale, rng)
    g, _ = embed_crops(encoder, crops, len(images))
    g = g.astype(np.float64)
    order = np.argsort(-np.einsum("nvd,nd->nv", g, class_text[labels]), axis=1, kind="stable")
    if not local_for:
        return g, order, None
    pick = np.concatenate([order[:, :local_for], order[:, -1:]], axis=1)
    chosen = [crops[i * n_views + j] for i in range(len(images)) for j in pick[i]]
    _, loc = embed_crops(encoder, chosen, len(images), local=True)
    loc = loc.astype(np.float32)
    return g, order, loc / np.maximum(np.linalg.norm(loc, axis=-1, keepdims=True), 1e-12)


@_frozen_towers
def train_local_prompt(encoder: DualEncoder | str, class_names: Sequence[str], images: Sequence[Any],
                       labels: Sequence[int], protocol: FewShotProtocol = SIXTEEN_SHOT,
                       n_ctx: int = 16, n_neg_prompts: int = 300, n_views: int = 16, num_pos: int = 8,
                       topk: int = 20, temperature: float = 1.0, neg_weight: float = 5.0,
                       div_weight: float = 0.5, global_template: str = "a photo of a {}.",
                       epochs: int = 30, batch_size: int = 256, lr: float = 2e-3, warmup_lr: float = 1e-5,
                       crop_scale=(0.08, 1.0), seed: int = 0) -> PromptResult:
    """Local-Prompt few-shot tuning (see the module docstring). ``images``: PIL images or
    arrays. Every epoch draws ``n_views`` fresh crops per image; the ``num_pos`` crops most
    similar to the true class's frozen global prompt are positives (one optimiser step each,
    as the authors' trainer does) and the least similar one is the negative. SGD with a
    one-epoch constant warm-up at ``warmup_lr``, then cosine."""
    torch = _torch()
    encoder = load(encoder)
    names = _check_names(class_names)
    c = len(names)
    images, y, _ = _images_and_labels(list(images), labels, c, protocol, "Local-Prompt")
    if not 1 <= num_pos < n_views:
        raise ValueError(f"num_pos must be in [1, n_views) so positives and the negative crop differ; got "
                         f"num_pos={num_pos}, n_views={n_views}.")
    text = PromptableText(encoder, n_ctx)
    glob = text.frozen(names, global_template)                        # (C, D)
    local_ctx = text.init_context(count=c, seed=seed)
    neg_ctx = text.init_context(count=n_neg_prompts, seed=seed + 1)
    n = len(y)
    per_epoch = -(-n // batch_size) * num_pos
    opt, sched = _optimizer([local_ctx, neg_ctx], "sgd", lr, 5e-4, epochs * per_epoch, warmup=per_epoch,
                            warmup_lr=warmup_lr)
    scale = float(encoder.logit_scale)
    yt = torch.as_tensor(y)
    neg_names = [""] * n_neg_prompts
    rng = np.random.default_rng(seed)
    history, step, t0 = [], 0, time.time()
    for epoch, batches in enumerate(_epochs_of(n, batch_size, epochs, seed), 1):
        losses = []
        for idx in batches:
            _, _, loc = _select_crops(encoder, [images[i] for i in idx], glob, y[idx], n_views, crop_scale,
                                      rng, num_pos)
            k = max(1, min(int(topk), loc.shape[2]))
            neg_local = torch.as_tensor(loc[:, -1])                                   # (B, P, D)
            lab = yt[idx]
            for j in range(num_pos):
                pos_local = torch.as_tensor(loc[:, j])
                lt = text.encode(names, local_ctx)                                    # (C, D)
                nt = text.encode(neg_names, neg_ctx)                                  # (Nn, D)
                l_pos = _local_contrastive(scale * pos_local @ lt.T, scale * pos_local @ nt.T, lab, k, temperature)
                l_neg = _local_negative(scale * neg_local @ nt.T, scale * neg_local @ lt.T, lab, k, temperature)
                gram = nt @ nt.T
                div = (gram.sum() - gram.diagonal().sum()) / max(1, n_neg_prompts * (n_neg_prompts - 1))
                loss = l_pos + neg_weight * l_neg + div_weight * div
                step += 1
                losses.append(_step(opt, sched, loss, "Local-Prompt", step))
        history.append(_history_entry(epoch, losses, t0))
    with torch.no_grad():
        local_text = text.encode(names, local_ctx).double().numpy()
        neg_local_text = text.encode(neg_names, neg_ctx).double().numpy()
    return PromptResult(
        method="local_prompt", class_names=names, encoder=encoder.name, history=history,
        arrays={"global_text": glob, "local_text": local_text, "neg_local_text": neg_local_text,
                "local_ctx": local_ctx.detach().numpy(), "neg_ctx": neg_ctx.detach().numpy()},
        config={"n_ctx": n_ctx, "n_neg_prompts": n_neg_prompts, "n_views": n_views, "num_pos": num_pos,
                "topk": topk, "temperature": temperature, "neg_weight": neg_weight, "div_weight": div_weight,
                "global_template": global_template, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                "warmup_lr": warmup_lr, "crop_scale": list(crop_scale), "protocol": protocol.to_json(),
                "seed": seed, "logit_scale": scale, "n_images": int(n)})


# ---------------------------------------------------------------- KR-NFT
class _NFT:
    """Distribution-aware feature transforms with image-conditional meta-network residuals."""

    def __init__(self, dim: int, image_dim: int, hidden: int, seed: int):
        torch = _torch()
        torch.manual_seed(seed)
        self.params = {}
        for part in ("id", "ood"):
            self.params[f"{part}_scale"] = torch.nn.Parameter(torch.ones(dim))
            self.params[f"{part}_shift"] = torch.nn.Parameter(torch.zeros(dim))
            for kind in ("scale", "shift"):
                first = torch.nn.Linear(image_dim, hidden)
                self.params[f"{part}_{kind}_w1"] = torch.nn.Parameter(first.weight.detach().clone())
                self.params[f"{part}_{kind}_b1"] = torch.nn.Parameter(first.bias.detach().clone())
                self.params[f"{part}_{kind}_w2"] = torch.nn.Parameter(torch.zeros(dim, hidden))
                self.params[f"{part}_{kind}_b2"] = torch.nn.Parameter(torch.zeros(dim))

    def factors(self, img):
        """Per-image ``{id,ood}_{scale,shift}`` (B, D)."""
        torch = _torch()
        p = self.params
        out = {}
        for part in ("id", "ood"):
            for kind in ("scale", "shift"):
                h = torch.relu(img @ p[f"{part}_{kind}_w1"].T + p[f"{part}_{kind}_b1"])
                out[f"{part}_{kind}"] = p[f"{part}_{kind}"] + h @ p[f"{part}_{kind}_w2"].T + p[f"{part}_{kind}_b2"]
        return out

    def transformed(self, base, img, n_id: int):
        """L2-normalised ``scale(x) ⊙ t + shift(x)`` for each image x: (B, C+M, D); ID rows
        use the ID transform, negative rows the OOD one."""
        torch = _torch()
        f = self.factors(img)
        tuned_id = f["id_scale"][:, None, :] * base[None, :n_id] + f["id_shift"][:, None, :]
        tuned_ood = f["ood_scale"][:, None, :] * base[None, n_id:] + f["ood_shift"][:, None, :]
        return torch.nn.functional.normalize(torch.cat([tuned_id, tuned_ood], dim=1), dim=-1)


@_frozen_towers
def train_krnft(encoder: DualEncoder | str, class_names: Sequence[str], images: Sequence[Any],
                labels: Sequence[int], protocol: FewShotProtocol = FOUR_SHOT,
                neg_words: Sequence[str] | None = None, words: Any = None, n_negatives: int = 10500,
                template: str = "The nice {}.", n_views: int = 128, n_selection: int = 32,
                meta_reduction: int = 64, n_groups: int = 10, in_weight: float = 1.0, out_weight: float = 0.3,
                kd_weight: float = 10.0, epochs: int = 3, batch_size: int = 1, lr: float = 1e-5,
                weight_decay: float = 0.01, crop_scale=(0.08, 1.0), seed: int = 0) -> PromptResult:
    """KR-NFT few-shot tuning (see the module docstring).

    Every step draws ``n_views`` fresh crops of each image, ranks them by cosine with the
    frozen "a photo of a {class}." prompt, and uses the ``n_selection`` most similar as ID
    crops (grouped cross-entropy), the ``n_selection`` least similar as OOD crops (their ID
    probability mass is minimised) and the most similar one to condition the meta-network.
    Defaults follow the authors' 4-shot ImageNet script (batch 1, AdamW lr 1e-5 with its
    default weight decay 0.01, meta-network width ``512 / 64``, 10,500 negatives)."""
    torch = _torch()
    encoder = load(encoder)
    names = _check_names(class_names)
    c = len(names)
    images, y, _ = _images_and_labels(list(images), labels, c, protocol, "KR-NFT")
    if not 1 <= n_selection <= n_views // 2:
        raise ValueError(f"n_selection must be in [1, n_views // 2] so ID and OOD crops differ; got "
                         f"n_selection={n_selection}, n_views={n_views}.")
    neg_words, neg_emb = resolve_negatives(encoder, names, neg_words, words, n_negatives, template, "KR-NFT")
    base = np.concatenate([encoder.encode_text(names, (template,)).astype(np.float64), neg_emb])
    photo = encoder.encode_text(names, ("a photo of a {}.",)).astype(np.float64)
    d = base.shape[1]
    nft = _NFT(d, d, max(1, d // int(meta_reduction)), seed)
    base_t = torch.tensor(base, dtype=torch.float32)
    base_unit = torch.nn.functional.normalize(base_t, dim=-1)
    n = len(y)
    steps = epochs * -(-n // batch_size)
    opt, sched = _optimizer(list(nft.params.values()), "adamw", lr, weight_decay, steps)
    scale = float(encoder.logit_scale)
    yt = torch.as_tensor(y)
    rng = np.random.default_rng(seed)
    s = n_selection
    history, step, t0 = [], 0, time.time()
    for epoch, batches in enumerate(_epochs_of(n, batch_size, epochs, seed), 1):
        losses = []
        for idx in batches:
            g, order, _ = _select_crops(encoder, [images[i] for i in idx], photo, y[idx], n_views, crop_scale,
                                        rng, 0)
            g = torch.tensor(g, dtype=torch.float32)
            pos = torch.take_along_dim(g, torch.as_tensor(order[:, :s, None]), dim=1)    # (B, s, D)
            neg = torch.take_along_dim(g, torch.as_tensor(order[:, -s:, None]), dim=1)
            tuned = nft.transformed(base_t, pos[:, 0], c)                               # (B, C+M, D)
            lp = scale * torch.einsum("bsd,bkd->bsk", pos, tuned)                       # (B, s, C+M)
            ln = scale * torch.einsum("bsd,bkd->bsk", neg, tuned)
            target = yt[idx].repeat_interleave(s)
            groups_p = _grouped_logits(lp[..., :c].reshape(-1, c), lp[..., c:].reshape(len(target), -1),
                                       n_groups, seed)
            l_in = sum(torch.nn.functional.cross_entropy(gl, target) for gl in groups_p) / len(groups_p)
            groups_n = _grouped_logits(ln[..., :c].reshape(-1, c), ln[..., c:].reshape(len(target), -1),
                                       n_groups, seed)
            l_out = sum((torch.logsumexp(gl[:, :c], 1) - torch.logsumexp(gl, 1)).mean() for gl in groups_n) / len(groups_n)
            l_kd = 1.0 - (tuned * base_unit[None]).sum(-1).mean()
            loss = in_weight * l_in + out_weight * l_out + kd_weight * l_kd
            step += 1
            losses.append(_step(opt, sched, loss, "KR-NFT", step))
        history.append(_history_entry(epoch, losses, t0))
    arrays = {k: v.detach().double().numpy() for k, v in nft.params.items()}
    arrays["base_text"] = base
    return PromptResult(
        method="krnft", class_names=names, neg_words=list(neg_words), encoder=encoder.name, history=history,
        arrays=arrays,
        config={"template": template, "n_views": n_views, "n_selection": n_selection,
                "meta_reduction": meta_reduction, "n_groups": n_groups, "in_weight": in_weight,
                "out_weight": out_weight, "kd_weight": kd_weight, "epochs": epochs, "batch_size": batch_size,
                "lr": lr, "weight_decay": weight_decay, "crop_scale": list(crop_scale),
                "protocol": protocol.to_json(), "seed": seed, "logit_scale": scale, "n_images": int(n)})


# ---------------------------------------------------------------- CMA
def cma_loss(image_embeds, text_embeds, scale, lam: float):
    """FLYP contrastive loss plus CMA's alignment regulariser (λ = 0 gives FLYP)."""
    torch = _torch()
    f = torch.nn.functional
    img = f.normalize(image_embeds, dim=-1)
    txt = f.normalize(text_embeds, dim=-1)
    logits = scale * img @ txt.T
    target = torch.arange(len(img), device=img.device)
    row = f.cross_entropy(logits, target) + lam * (-torch.logsumexp(logits, dim=1)).mean()
    col = f.cross_entropy(logits.T, target) + lam * (-torch.logsumexp(logits.T, dim=1)).mean()
    return 0.5 * row + 0.5 * col


def train_cma(encoder: DualEncoder | str, class_names: Sequence[str], images: Sequence[Any],
              labels: Sequence[int], protocol: FewShotProtocol = ALL_IMAGES, lam: float = 1e-3,
              template: str = "a photo of a {}.", score_template: str = "The nice {}.",
              neg_words: Sequence[str] | None = None, words: Any = None, n_negatives: int = 10000,
              epochs: int = 10, batch_size: int = 512, lr: float = 1e-5, weight_decay: float = 0.1,
              warmup_steps: int = 500, seed: int = 0):
    """CMA fine-tuning of both towers. Returns ``(fine-tuned encoder, PromptResult)``; the
    result holds the fine-tuned encoder's ID and negative-label text embeddings, so the
    ``cma`` detector scores without reloading the model. Save the model itself with
    ``encoder.model.save_pretrained(dir)`` (safetensors) to embed new images later."""
    torch = _torch()
    encoder = load(encoder)
    names = _check_names(class_names)
    c = len(names)
    images, y, _ = _images_and_labels(list(images), labels, c, protocol, "CMA")
    tuned = copy.copy(encoder)
    tuned.model = copy.deepcopy(encoder.model).train()
    tuned.__dict__.pop("_text_cache", None)
    tuned.__dict__.pop("_fp_cache", None)
    tuned.name = f"{encoder.name}+cma"
    pixels = torch.as_tensor(encoder.preprocess(images))
    prompts = [template.format(n) for n in names]
    params = list(tuned.model.parameters())
    for p in params:
        p.requires_grad_(True)
    n = len(y)
    steps = epochs * -(-n // batch_size)
    opt, sched = _optimizer(params, "adamw", lr, weight_decay, steps, warmup=warmup_steps)
    log_scale = tuned.model.logit_scale
    history, step, t0 = [], 0, time.time()
    torch.manual_seed(seed)
    for epoch, batches in enumerate(_epochs_of(n, batch_size, epochs, seed), 1):
        losses = []
        for idx in batches:
            img, _ = tuned._encode_pixels(pixels[idx].to(tuned.device), False)
            txt = tuned._encode_tokens([prompts[i] for i in y[idx]])
            loss = cma_loss(img, txt, log_scale.exp().clamp(max=100.0), lam)
            step += 1
            losses.append(_step(opt, sched, loss, "CMA", step))
        history.append(_history_entry(epoch, losses, t0))
    tuned.model.eval()
    tuned.logit_scale = float(log_scale.detach().exp())
    neg_words, neg_emb = resolve_negatives(tuned, names, neg_words, words, n_negatives, score_template, "CMA")
    result = PromptResult(
        method="cma", class_names=names, neg_words=list(neg_words), encoder=tuned.name, history=history,
        arrays={"id_text": tuned.encode_text(names, (score_template,)).astype(np.float64), "neg_text": neg_emb},
        config={"lam": lam, "template": template, "score_template": score_template, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                "protocol": protocol.to_json(), "seed": seed, "n_images": int(n)})
    return tuned, result
