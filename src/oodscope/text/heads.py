"""Classifier heads on frozen text embeddings.

A head turns embeddings into logits so that every logit- and head-based detector (MSP,
energy, ReAct, ViM, ...) runs on text unchanged. `ClassifierHead` fits either a linear
softmax classifier (``hidden=None``; L-BFGS on standardised inputs, folded back so the head
applies to the raw embeddings) or a one-hidden-layer MLP (Adam), and picks its weight decay
(and width, if several are given) by accuracy on validation data.

For an MLP head the ``features`` of the resulting `Features` are the MLP's hidden (post-ReLU)
activations, so ``head_weight``/``head_bias`` remain the last linear layer and
``logits == features @ head_weight.T + head_bias`` holds for both kinds; the raw embedding
is kept as the extra ``"embedding"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._params import store_params
from ..features import Features

__all__ = ["ClassifierHead", "fit_head"]


def _as_list(v: Any) -> list:
    if v is None:
        return [None]
    if isinstance(v, (list, tuple, np.ndarray)):
        return list(v)
    return [v]


class ClassifierHead:
    """Linear or MLP softmax classifier fit in torch, tuned on validation accuracy.

    Parameters
    ----------
    hidden : int, list of int, or None
        ``None`` for a linear head; a width (or candidate widths) for a one-hidden-layer MLP.
    weight_decay : float or list of float
        L2 penalty candidates (on standardised inputs for the linear head).
    max_iter : int
        L-BFGS iterations (linear head).
    epochs, lr, batch_size : MLP training.
    label_smoothing : float
    seed : int
    """

    def __init__(self, hidden: int | Sequence[int] | None = None,
                 weight_decay: float | Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2),
                 max_iter: int = 100, epochs: int = 40, lr: float = 1e-3, batch_size: int = 256,
                 label_smoothing: float = 0.0, seed: int = 0):
        store_params(self, locals())

    # ------------------------------------------------------------------ fitting
    def fit(self, x: np.ndarray | Features, y: np.ndarray | None = None,
            x_val: np.ndarray | Features | None = None, y_val: np.ndarray | None = None) -> ClassifierHead:
        """Fit on embeddings ``x`` (N, D) with labels ``y``; tune on ``(x_val, y_val)``.

        Without validation data and with more than one candidate, 10% of the training data is
        held out for the choice and the chosen setting is refit on all of it.
        """
        x, y = self._xy(x, y, "train")
        if x_val is not None:
            x_val, y_val = self._xy(x_val, y_val, "val")
            if x_val.shape[1] != x.shape[1]:
                raise ValueError(f"val embeddings are {x_val.shape[1]}-d but train embeddings are {x.shape[1]}-d.")
        classes = int(y.max()) + 1
        if len(np.unique(y)) < 2:
            raise ValueError("A classifier head needs at least two classes in the training labels.")
        if x_val is not None and y_val.size and y_val.max() >= classes:
            raise ValueError(
                f"val has label {int(y_val.max())} but train only has classes 0..{classes - 1}; "
                "every validation class must appear in training."
            )
        grid = [(h, wd) for h in _as_list(self.hidden) for wd in _as_list(self.weight_decay)]
        for h, wd in grid:
            if h is not None and int(h) < 1:
                raise ValueError(f"hidden must be a positive width or None, got {h}.")
            if wd is None or wd < 0:
                raise ValueError(f"weight_decay must be >= 0, got {wd}.")
        refit = False
        if x_val is None and len(grid) > 1:
            rng = np.random.default_rng(self.seed)
            perm = rng.permutation(len(y))
            n_val = max(1, len(y) // 10)
            x_fit, y_fit, x_val, y_val = x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]
            refit = True
        else:
            x_fit, y_fit = x, y
        self.mean_ = x_fit.mean(0)
        self.scale_ = np.maximum(x_fit.std(0), 1e-6 * max(float(x_fit.std()), 1e-12))
        results = []
        best = None
        # Strongest penalty first; each linear fit warm-starts from the previous solution
        # (a regularisation path), which keeps the whole search to a few hundred L-BFGS steps.
        grid.sort(key=lambda hw: (str(hw[0]), -float(hw[1])))
        self._warm = None
        for h, wd in grid:
            params = self._fit_one(x_fit, y_fit, classes, h, float(wd))
            acc = float(np.mean(self._predict_with(params, x_val) == y_val)) if x_val is not None else float("nan")
            results.append({"hidden": h, "weight_decay": float(wd), "val_accuracy": acc})
            if best is None or acc > best[0]:
                best = (acc, h, float(wd), params)
        acc, h, wd, params = best
        if refit:
            self.mean_ = x.mean(0)
            self.scale_ = np.maximum(x.std(0), 1e-6 * max(float(x.std()), 1e-12))
            self._warm = None
            params = self._fit_one(x, y, classes, h, wd)
        self._warm = None
        self.params_ = params
        self.best_params_ = {"hidden": h, "weight_decay": wd}
        self.val_accuracy_ = acc
        self.search_results_ = results
        self.num_classes_ = classes
        return self

    @staticmethod
    def _xy(x: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(x, Features):
            if y is None:
                y = x.labels
            x = x.extras["embedding"] if "embedding" in x.extras else x.features
            if x is None:
                raise ValueError(f"{what} Features have no features (embeddings) to fit a head on.")
        if y is None:
            raise ValueError(f"{what} labels are required to fit a classifier head.")
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y).reshape(-1)
        if x.ndim != 2:
            raise ValueError(f"{what} embeddings must be 2-D (N, D), got shape {x.shape}.")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{what}: {x.shape[0]} embeddings but {y.shape[0]} labels.")
        if x.shape[0] == 0:
            raise ValueError(f"{what}: no samples.")
        if y.dtype.kind not in "iu":
            raise ValueError(f"{what} labels must be integer class indices, got dtype {y.dtype}.")
        if y.min() < 0:
            raise ValueError(
                f"{what} labels contain {int(y.min())}: a head is fit on in-distribution samples only; "
                "drop out-of-scope (-1) rows."
            )
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{what} embeddings contain NaN or inf.")
        return x, y.astype(np.int64)

    def _fit_one(self, x: np.ndarray, y: np.ndarray, classes: int, hidden: int | None, wd: float) -> dict:
        import torch

        torch.manual_seed(self.seed)
        xs = torch.tensor((x - self.mean_) / self.scale_, dtype=torch.float32)
        yt = torch.tensor(y)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)
        if hidden is None:
            lin = torch.nn.Linear(xs.shape[1], classes)
            warm = getattr(self, "_warm", None)
            with torch.no_grad():
                if warm is not None and warm[0].shape == lin.weight.shape:
                    lin.weight.copy_(warm[0])
                    lin.bias.copy_(warm[1])
                else:
                    lin.weight.zero_()
                    lin.bias.zero_()
            opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=self.max_iter,
                                    history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-6)

            def closure():
                opt.zero_grad()
                loss = loss_fn(lin(xs), yt) + wd * lin.weight.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            self._warm = (lin.weight.detach().clone(), lin.bias.detach().clone())
            w = lin.weight.detach().double().numpy()
            b = lin.bias.detach().double().numpy()
            # Fold the standardisation into the layer: logits = x @ (w/s).T + (b - (w/s) @ m).
            w_raw = w / self.scale_
            return {"kind": "linear", "weight": w_raw, "bias": b - w_raw @ self.mean_}
        net = torch.nn.Sequential(torch.nn.Linear(xs.shape[1], int(hidden)), torch.nn.ReLU(),
                                  torch.nn.Linear(int(hidden), classes))
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=wd)
        gen = torch.Generator().manual_seed(self.seed)
        # At least a few hundred updates, however small the training set.
        epochs = max(int(self.epochs), int(np.ceil(300 / np.ceil(len(yt) / self.batch_size))))
        steps = epochs * int(np.ceil(len(yt) / self.batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(yt), generator=gen).split(self.batch_size):
                opt.zero_grad()
                loss_fn(net(xs[idx]), yt[idx]).backward()
                opt.step()
                sched.step()
        net.eval()
        l1, l2 = net[0], net[2]
        w1 = l1.weight.detach().double().numpy() / self.scale_
        b1 = l1.bias.detach().double().numpy() - w1 @ self.mean_
        return {"kind": "mlp", "w1": w1, "b1": b1,
                "weight": l2.weight.detach().double().numpy(), "bias": l2.bias.detach().double().numpy()}

    # ------------------------------------------------------------------ applying
    @staticmethod
    def _transform_with(params: dict, x: np.ndarray) -> np.ndarray:
        if params["kind"] == "linear":
            return x
        return np.maximum(x @ params["w1"].T + params["b1"], 0.0)

    def _predict_with(self, params: dict, x: np.ndarray) -> np.ndarray:
        z = self._transform_with(params, x)
        return np.argmax(z @ params["weight"].T + params["bias"], axis=1)

    def _check(self, x: Any) -> np.ndarray:
        if not hasattr(self, "params_"):
            raise ValueError("ClassifierHead is not fitted yet: call .fit(embeddings, labels, val_x, val_y).")
        x = np.asarray(x, dtype=np.float64)
        d = self.mean_.shape[0]
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"Expected embeddings of shape (N, {d}), got {x.shape}.")
        return x

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Penultimate features: the embeddings (linear head) or the MLP hidden layer."""
        x = self._check(x)
        return self._transform_with(self.params_, x).astype(np.float32)

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = self._check(x)
        z = self._transform_with(self.params_, x)
        return (z @ self.params_["weight"].T + self.params_["bias"]).astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = self._check(x)
        return self._predict_with(self.params_, x)

    @property
    def weight_(self) -> np.ndarray:
        return self.params_["weight"].astype(np.float32)

    @property
    def bias_(self) -> np.ndarray:
        return self.params_["bias"].astype(np.float32)

    def apply(self, f: Features) -> Features:
        """Features with ``logits``, head-space ``features`` and the head's weight/bias.

        ``f.features`` (or ``f.extras["embedding"]``) must hold the raw embeddings."""
        emb = f.extras["embedding"] if "embedding" in f.extras else f.features
        if emb is None:
            raise ValueError("apply needs Features whose `features` are the text embeddings.")
        extras = dict(f.extras)
        if self.params_["kind"] == "mlp":
            extras["embedding"] = np.asarray(emb, dtype=np.float32)
        return Features(
            logits=self.logits(emb), features=self.transform(emb), labels=f.labels,
            head_weight=self.weight_, head_bias=self.bias_, extras=extras,
            meta=dict(f.meta, head=self.best_params_, head_kind=self.params_["kind"]),
        )

    def save(self, path: str) -> None:
        """Write the fitted head to ``.npz`` (no pickle)."""
        import json

        arrays = {k: v for k, v in self.params_.items() if k != "kind"}
        np.savez(path, mean=self.mean_, scale=self.scale_, **arrays,
                 info=np.array(json.dumps({"kind": self.params_["kind"], "best": self.best_params_,
                                           "val_accuracy": getattr(self, "val_accuracy_", None),
                                           "search": getattr(self, "search_results_", [])})))

    @classmethod
    def load(cls, path: str) -> ClassifierHead:
        import json

        with np.load(path, allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            head = cls(hidden=info["best"]["hidden"], weight_decay=info["best"]["weight_decay"])
            head.mean_, head.scale_ = z["mean"], z["scale"]
            head.params_ = {k: z[k] for k in z.files if k not in ("mean", "scale", "info")}
        head.params_["kind"] = info["kind"]
        head.best_params_ = info["best"]
        head.val_accuracy_ = info.get("val_accuracy")
        head.search_results_ = info.get("search", [])
        head.num_classes_ = int(head.params_["weight"].shape[0])
        return head


def fit_head(train: Features, val: Features | None = None, **params: Any) -> ClassifierHead:
    """Fit a `ClassifierHead` on embedding Features (``features`` = embeddings, ``labels``)."""
    return ClassifierHead(**params).fit(train, None, val, None if val is None else val.labels)
