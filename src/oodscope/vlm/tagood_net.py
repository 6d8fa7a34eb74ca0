"""TagOOD's class-centre learner (torch; imported only by the ``tagood`` detector).

A ViT-style encoder over the object tokens (authors' ``models/classifier.py``): a linear
input projection, a CLS token, learned positions, pre-norm blocks (multi-head attention and
a GELU MLP of width 4H, dropout), a final LayerNorm (eps 1e-6) and a linear classifier on
the CLS output. `train_centres` trains it with cross-entropy plus ``center_weight`` × the
EMA-centre loss of the authors' ``EMALoss``: the CLS feature is cut into ``K`` chunks, the
loss is the per-chunk MSE to the class's centres summed over chunks, and after each step the
centres of the batch's classes move to ``α·centre + (1 − α)·feature`` (with several samples
of one class in a batch, the last one written wins, as in the authors' indexed assignment).
The total is clamped to [1e-5, 1e3] as theirs is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["TagCentreNet", "train_centres"]


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * hidden, hidden), nn.Dropout(dropout))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x, pad):
        h = self.ln_1(x)
        h, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        x = x + self.drop(h)
        return x + self.mlp(self.ln_2(x))


class TagCentreNet(nn.Module):
    def __init__(self, dim_in: int, hidden: int, layers: int, heads: int, n_classes: int, max_tokens: int,
                 dropout: float = 0.1):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.image_proj = nn.Linear(dim_in, hidden)
        self.pos_embedding = nn.Parameter(torch.empty(1, max_tokens + 1, hidden).normal_(std=0.02))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(hidden, eps=1e-6)
        self.classifier = nn.Linear(hidden, n_classes)

    def features(self, tokens, mask):
        """CLS feature (N, H) of ``tokens`` (N, P, D); ``mask`` (N, P) True = a kept token."""
        n = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(n, -1, -1), self.image_proj(tokens.float())], dim=1)
        x = self.drop(x + self.pos_embedding[:, :x.shape[1]])
        pad = torch.cat([torch.zeros(n, 1, dtype=torch.bool), ~mask.bool()], dim=1)
        for block in self.blocks:
            x = block(x, pad)
        return self.ln(x)[:, 0]

    def forward(self, tokens, mask):
        return self.classifier(self.features(tokens, mask))


def train_centres(net: TagCentreNet, tokens: np.ndarray, mask: np.ndarray, labels: np.ndarray, n_classes: int,
                  n_patterns: int, epochs: int, lr: float, weight_decay: float, batch_size: int, ema: float,
                  center_weight: float, seed: int):
    """Train ``net`` in place; returns ``(centres (C, K, H/K) float64, history)``."""
    hidden = net.cls_token.shape[-1]
    g = torch.Generator().manual_seed(int(seed))
    centres = torch.randn(n_classes, n_patterns, hidden // n_patterns, generator=g)
    x_all, m_all, y_all = torch.from_numpy(tokens), torch.from_numpy(mask), torch.from_numpy(labels)
    n = len(x_all)
    per_epoch = -(-n // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * per_epoch), eta_min=1e-5)
    rng = np.random.default_rng(seed)
    history = []
    net.train()
    for epoch in range(1, epochs + 1):
        losses, correct = [], 0
        perm = rng.permutation(n)
        for s in range(0, n, batch_size):
            idx = torch.as_tensor(perm[s:s + batch_size])
            x, m, y = x_all[idx], m_all[idx], y_all[idx]
            feats = net.features(x, m)
            logits = net.classifier(feats)
            chunks = feats.reshape(len(y), n_patterns, -1)
            target = centres[y]
            centre_loss = torch.nn.functional.mse_loss(chunks, target, reduction="none").mean(-1).sum(-1).mean()
            loss = torch.clamp(center_weight * centre_loss + torch.nn.functional.cross_entropy(logits, y), 1e-5, 1e3)
            if not bool(torch.isfinite(loss.detach())):
                raise ValueError(f"TagOOD: the training loss became {float(loss.detach())}; lower lr.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                centres[y] = ema * target + (1 - ema) * chunks.detach()
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == y).sum())
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "accuracy": correct / n})
    net.eval()
    return centres.double().numpy(), history
