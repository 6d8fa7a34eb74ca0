"""`fit`: a small, reproducible training loop with pluggable objectives.

The objective (`oodscope.train.base.Objective`) owns the loss: plain cross-entropy by
default, or an OOD-aware method (Outlier Exposure, LogitNorm, ...). The loop owns the rest:
batching, optional outlier batches (cycled), the optimiser and learning-rate schedule,
validation, checkpoints, and stopping with a clear error when the loss stops being finite.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._outputs import logits_of

__all__ = ["NonFiniteLossError", "evaluate", "fit"]


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite."""


def _torch():
    import torch

    return torch


def _as_loader(data, batch_size: int, shuffle: bool, seed: int, mean=None, std=None, what: str = "data",
               drop_last: bool = False):
    """An iterable of batches from an ImageDataset, ``(X, y)``, a tensor/array of inputs,
    a torch Dataset, or a DataLoader/iterable (returned as is)."""
    torch = _torch()
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    from ..data import ImageDataset, loader

    if isinstance(data, ImageDataset):
        if len(data) == 0:
            raise ValueError(f"{what} is empty.")
        return loader(data, batch_size=batch_size, shuffle=shuffle, mean=mean, std=std, seed=seed,
                      drop_last=drop_last and len(data) > batch_size)
    gen = torch.Generator().manual_seed(int(seed))
    if isinstance(data, tuple) and len(data) == 2 and all(hasattr(d, "__len__") for d in data):
        X, y = data
        if isinstance(X, np.ndarray) and X.dtype == np.uint8 and X.ndim in (3, 4):
            from ..data import to_tensor

            X = to_tensor(X, mean, std)  # raw images: scale and normalise like an ImageDataset
        X, y = (torch.as_tensor(np.asarray(d)) if isinstance(d, np.ndarray) else d for d in (X, y))
        if len(X) != len(y):
            raise ValueError(f"{what}: inputs and labels differ in length ({len(X)} vs {len(y)}).")
        if len(X) == 0:
            raise ValueError(f"{what} is empty.")
        if X.dtype == torch.float64:
            X = X.float()
        return DataLoader(TensorDataset(X, torch.as_tensor(y).long()), batch_size=batch_size, shuffle=shuffle,
                          generator=gen, drop_last=drop_last and len(X) > batch_size)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        X = torch.as_tensor(data)
        if X.dtype == torch.float64:
            X = X.float()
        if len(X) == 0:
            raise ValueError(f"{what} is empty.")
        return DataLoader(TensorDataset(X), batch_size=batch_size, shuffle=shuffle, generator=gen)
    if isinstance(data, Dataset) and not isinstance(data, DataLoader) and hasattr(data, "__len__"):
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen)
    if hasattr(data, "__iter__"):
        return data
    raise ValueError(f"{what}: cannot make batches from a {type(data).__name__}; pass an ImageDataset, "
                     "a tuple (X, y) of tensors, or a DataLoader.")


def _xy(batch):
    if isinstance(batch, dict):
        return batch.get("x", batch.get("image")), batch.get("y", batch.get("label"))
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _cycle_outliers(source) -> Iterator:
    """Yield outlier input batches forever, re-iterating the source; empty -> ValueError."""
    while True:
        empty = True
        for batch in source:
            x, _ = _xy(batch)
            if x is None or len(x) == 0:
                continue
            empty = False
            yield x
        if empty:
            raise ValueError("The outlier source yielded no batches; it is empty.")


def _num_classes(model, data, given: int | None) -> int:
    if given is not None:
        return int(given)
    from ..extraction import find_head

    _, head = find_head(model)
    if head is not None:
        return int(head.out_features)
    classes = getattr(data, "classes", None)
    if classes:
        return len(classes)
    raise ValueError("Cannot tell the number of classes; pass num_classes=.")


def _nonfinite_message(step: int, epoch: int, loss, x, lr: float, logs: dict) -> str:
    xs = x.detach().float()
    finite_x = bool(_torch().isfinite(xs).all())
    lines = [f"Training loss became {float(loss.detach())} at step {step} (epoch {epoch + 1}); stopped."]
    lines.append(f"  batch inputs: min {float(xs.min()):.3g}, max {float(xs.max()):.3g}, "
                 f"all finite: {finite_x}; learning rate {lr:.3g}; loss terms {logs}.")
    lines.append("  Likely causes: a learning rate too high (try 10x lower), inputs on a bad scale "
                 "(normalise images to mean 0 / std 1, not 0-255), NaN/inf in the data, or a loss "
                 "weight or temperature that makes a term overflow.")
    return "\n".join(lines)


def evaluate(model, data, device: str = "cpu", batch_size: int = 512, mean=None, std=None) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on labelled ``data``."""
    torch = _torch()
    import torch.nn.functional as F

    batches = _as_loader(data, batch_size, False, 0, mean, std, "evaluation data")
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for batch in batches:
            x, y = _xy(batch)
            if y is None:
                raise ValueError("evaluate needs labelled data.")
            x, y = x.to(device), y.to(device)
            keep = y >= 0
            if not bool(keep.any()):
                continue
            logits = logits_of(model(x))[keep]
            y = y[keep]
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluate got no labelled samples.")
    return {"accuracy": correct / total, "loss": loss_sum / total, "n": total}


def _checked_objective(objective, outliers, train_data, epochs: int, batch_size: int, max_steps: int | None):
    """The objective (cross-entropy by default), after every argument check that needs no data pass."""
    from ..data import ImageDataset
    from .base import CrossEntropy, Objective

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}.")
    objective = CrossEntropy() if objective is None else objective
    if not isinstance(objective, Objective) and not hasattr(objective, "loss"):
        raise ValueError(f"objective must be an oodscope.train.Objective, got {type(objective).__name__}.")
    if getattr(objective, "needs_outliers", False) and outliers is None:
        raise ValueError(f"{type(objective).__name__} needs auxiliary outliers: pass outliers= "
                         "(e.g. oodscope.train.outliers.get_outlier_source('photos', id_data=train)).")
    if isinstance(outliers, ImageDataset) and len(outliers) == 0:
        raise ValueError("The outlier dataset is empty.")
    if outliers is not None and isinstance(train_data, ImageDataset):
        from .outliers import check_outliers_for

        # a wrong outlier image shape fails here, not at the first training step
        check_outliers_for(objective, outliers, train_data.images.shape[1:])
    return objective


def _normalization(train_data, mean, std):
    """``(mean, std, record)``: statistics of the training images when not given."""
    from ..data import ImageDataset, channel_stats

    if isinstance(train_data, ImageDataset) and (mean is None or std is None):
        mean, std = channel_stats(train_data)
    if mean is None or std is None:
        return mean, std, None
    return mean, std, {"mean": [float(v) for v in np.atleast_1d(mean)], "std": [float(v) for v in np.atleast_1d(std)]}


def _optimizer(model, objective, optimizer: str, lr: float | None, weight_decay: float | None, momentum: float):
    """``(optimizer, its parameters, lr)``: Adam/AdamW (default lr 1e-3, no decay) or SGD
    (lr 0.1, Nesterov momentum, decay 5e-4), over the model's and the objective's parameters."""
    torch = _torch()
    params, seen = [], set()
    for p in list(model.parameters()) + list(objective.parameters() or []):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    name = optimizer.lower()
    if name in ("adam", "adamw"):
        lr = 1e-3 if lr is None else lr
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        opt = cls(params, lr=lr, weight_decay=0.0 if weight_decay is None else weight_decay)
    elif name == "sgd":
        lr = 0.1 if lr is None else lr
        wd = 5e-4 if weight_decay is None else weight_decay
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=wd)
    else:
        raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {optimizer!r}.")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}.")
    return opt, params, lr


def _scheduler(opt, schedule: str | None, train_loader, epochs: int, max_steps: int | None):
    """``(scheduler or None, steps per epoch or None)``; cosine decays to zero per step."""
    try:
        steps_per_epoch = len(train_loader)
    except TypeError:
        steps_per_epoch = None
    if steps_per_epoch == 0:
        raise ValueError("train_data yields no batches.")
    total_steps = (steps_per_epoch * epochs) if steps_per_epoch else None
    if max_steps is not None:
        total_steps = min(total_steps, max_steps) if total_steps else max_steps
    if schedule not in (None, "none", "cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or None, got {schedule!r}.")
    if schedule != "cosine":
        return None, steps_per_epoch
    if total_steps is None:
        raise ValueError("The cosine schedule needs a known number of steps: give max_steps= "
                         "or data with a length.")
    span = max(1, total_steps)
    return _torch().optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, span) / span))), steps_per_epoch


class _Run:
    """The state of one training run: what every step needs, and the step counter."""

    def __init__(self, model, objective, opt, params, scheduler, out_iter, augment, grad_clip, device, seed):
        self.model, self.objective, self.opt, self.params = model, objective, opt, params
        self.scheduler, self.out_iter, self.augment, self.grad_clip = scheduler, out_iter, augment, grad_clip
        self.device = device
        self.aug_gen = _torch().Generator().manual_seed(int(seed) + 2)
        self.step = 0

    def train_step(self, batch, epoch: int) -> tuple[float, dict]:
        """One optimiser step; a non-finite loss stops training with `NonFiniteLossError`."""
        torch = _torch()
        x, y = _xy(batch)
        if y is None:
            raise ValueError("train_data must yield (x, y) pairs with labels.")
        x, y = x.to(self.device), y.to(self.device)
        if x.dtype == torch.float64:
            x = x.float()
        if self.augment is not None:
            x = self.augment(x, self.aug_gen)
        x_out = next(self.out_iter).to(self.device) if self.out_iter is not None else None
        loss, logs = self.objective.loss(self.model, x, y, x_out=x_out)
        if not bool(torch.isfinite(loss.detach()).all()):
            lr = self.opt.param_groups[0]["lr"]
            raise NonFiniteLossError(_nonfinite_message(self.step + 1, epoch, loss, x, lr, logs))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        return float(loss.detach()), logs or {}

    def train_epoch(self, loader, epoch: int, epochs: int, steps_per_epoch, max_steps, progress: bool):
        """``(mean loss, mean of each logged term, whether max_steps was reached)``."""
        from tqdm.auto import tqdm

        self.model.train()
        loss_sum, n_batches, log_sums = 0.0, 0, {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress,
                   total=steps_per_epoch)
        done = False
        for batch in bar:
            loss, logs = self.train_step(batch, epoch)
            loss_sum += loss
            n_batches += 1
            for k, v in logs.items():
                log_sums[k] = log_sums.get(k, 0.0) + float(v)
            if progress and self.step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}")
            if max_steps is not None and self.step >= max_steps:
                done = True
                break
        bar.close()
        n = max(n_batches, 1)
        return loss_sum / n, {k: v / n for k, v in log_sums.items()}, done


def fit(model, train_data, objective=None, outliers=None, epochs: int = 5, lr: float | None = None,
        optimizer: str = "adam", schedule: str | None = "cosine", batch_size: int = 128, seed: int = 0,
        val_data=None, checkpoint=None, progress: bool = True, device: str = "cpu",
        max_steps: int | None = None, *, weight_decay: float | None = None, momentum: float = 0.9,
        augment=None, mean=None, std=None, outlier_batch_size: int | None = None,
        num_classes: int | None = None, grad_clip: float | None = None, meta: dict | None = None):
    """Train ``model`` with ``objective`` and return ``(model, history)``.

    Parameters
    ----------
    train_data, val_data : `ImageDataset`, a tuple ``(X, y)`` of tensors/arrays, or a
        DataLoader yielding ``(x, y)``. ImageDatasets are normalised with ``mean``/``std``
        (computed from the training images when not given; reported in the history).
    objective : an `Objective` (default: cross-entropy). ``objective.setup(model, C)`` runs
        first, its ``parameters()`` are optimised with the model's, ``on_epoch_end(epoch)``
        (0-based) runs after every epoch.
    outliers : auxiliary outliers for objectives with ``needs_outliers``: an ImageDataset, a
        tensor of inputs, or a DataLoader; cycled, one batch per training step, passed as
        ``x_out``.
    lr : default 1e-3 for Adam/AdamW, 0.1 for SGD (momentum 0.9, Nesterov).
    schedule : ``"cosine"`` (per step, to zero) or ``None``.
    checkpoint : path; the model and history are saved there after every epoch.
    max_steps : stop after this many optimiser steps (the cosine schedule spans them).
    augment : callable ``(x, generator) -> x`` applied to training batches (e.g.
        `oodscope.data.RandomShiftFlip`).

    A NaN or infinite loss stops training at once with `NonFiniteLossError` (a
    ``ValueError``). Runs are reproducible for a given ``seed`` on the same machine.
    """
    torch = _torch()
    objective = _checked_objective(objective, outliers, train_data, epochs, batch_size, max_steps)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    mean, std, normalization = _normalization(train_data, mean, std)
    train_loader = _as_loader(train_data, batch_size, True, seed, mean, std, "train_data", drop_last=True)
    val_loader = None if val_data is None else _as_loader(val_data, 512, False, seed, mean, std, "val_data")
    out_iter = None
    if outliers is not None:
        out_loader = _as_loader(outliers, outlier_batch_size or batch_size, True, seed + 1, mean, std, "outliers")
        out_iter = _cycle_outliers(out_loader)

    model.to(device)
    objective.setup(model, _num_classes(model, train_data, num_classes))
    model.to(device)  # setup may have added modules
    opt, params, lr = _optimizer(model, objective, optimizer, lr, weight_decay, momentum)
    scheduler, steps_per_epoch = _scheduler(opt, schedule, train_loader, epochs, max_steps)
    run = _Run(model, objective, opt, params, scheduler, out_iter, augment, grad_clip, device, seed)
    history: dict[str, Any] = {
        "epoch": [], "train_loss": [], "val_accuracy": [], "val_loss": [], "lr": [], "logs": [],
        "steps": 0, "epoch_time_s": [], "seed": seed, "objective": repr(objective),
        "objective_name": getattr(objective, "name", type(objective).__name__),
        "optimizer": optimizer.lower(), "base_lr": lr, "batch_size": batch_size, "normalization": normalization,
    }
    start = time.time()
    for epoch in range(epochs):
        t0 = time.time()
        loss, logs, done = run.train_epoch(train_loader, epoch, epochs, steps_per_epoch, max_steps, progress)
        objective.on_epoch_end(epoch)
        _record_epoch(history, epoch, loss, logs, opt, round(time.time() - t0, 2), run.step)
        if val_loader is not None:
            m = evaluate(model, val_loader, device=device)
            history["val_accuracy"].append(m["accuracy"])
            history["val_loss"].append(m["loss"])
        if progress:
            val = f", val acc {history['val_accuracy'][-1]:.4f}" if val_loader is not None else ""
            print(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}{val} ({history['epoch_time_s'][-1]:.0f}s)", flush=True)
        if checkpoint is not None:
            from ..models.checkpoint import save_checkpoint

            save_checkpoint(model, checkpoint, {**(meta or {}), "history": history})
        if done:
            break
    history["wall_time_s"] = round(time.time() - start, 2)
    model.eval()
    return model, history


def _record_epoch(history: dict, epoch: int, loss: float, logs: dict, opt, seconds: float, step: int) -> None:
    history["epoch"].append(epoch + 1)
    history["train_loss"].append(loss)
    history["logs"].append(logs)
    history["lr"].append(float(opt.param_groups[0]["lr"]))
    history["epoch_time_s"].append(seconds)
    history["steps"] = step
