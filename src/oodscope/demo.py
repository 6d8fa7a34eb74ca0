"""``oodscope demo``: the whole flow offline, in about a minute on two CPU cores.

Data: scikit-learn's handwritten digits (8×8, ships with scikit-learn, no download).
ID = digits 0-5; near-OOD = digits 6-9 (same pixels, unseen classes); far-OOD = 8×8 patches
of the two photographs scikit-learn ships. A small torch MLP is trained on ID, the network runs
once per split (`oodscope.extract`), and every registered detector that can work from those
Features (and the few that re-run the model) is fitted on ID train and scored. No tuning:
every detector uses its paper defaults.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ID_CLASSES = (0, 1, 2, 3, 4, 5)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed for the split, the network and noise")
    p.add_argument("--epochs", type=int, default=60, help="training epochs of the demo MLP")
    p.add_argument("--out", default="oodscope_demo_results.csv", help="CSV file for the leaderboard")
    p.add_argument("--detectors", default="all",
                   help="comma-separated detector names, or 'all' for every applicable one")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _data(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target
    rng = np.random.default_rng(seed)
    is_id = np.isin(y, ID_CLASSES)
    idx = rng.permutation(np.flatnonzero(is_id))
    n_train = int(0.7 * idx.size)
    tr, te = idx[:n_train], idx[n_train:]
    near = np.flatnonzero(~is_id)
    photos = _photo_patches(te.size, rng)
    return {
        "train": (X[tr], y[tr]),
        "test": (X[te], y[te]),
        "near: digits 6-9": (X[near], -np.ones(near.size, np.int64)),
        "far: photos": (photos, -np.ones(te.size, np.int64)),
    }


def _photo_patches(n: int, rng: np.random.Generator) -> np.ndarray:
    """8×8 grey patches of the two photographs scikit-learn ships (block-averaged crops)."""
    from sklearn.datasets import load_sample_images

    grey = [img.mean(axis=2) / 255.0 for img in load_sample_images().images]
    out = np.empty((n, 1, 8, 8), np.float32)
    for i in range(n):
        img = grey[i % len(grey)]
        size = 8 * int(rng.integers(2, 9))  # crops of 16..64 px, averaged down to 8x8
        r, c = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        patch = img[r:r + size, c:c + size].reshape(8, size // 8, 8, size // 8).mean(axis=(1, 3))
        out[i, 0] = patch
    return out


def _model(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class DigitsMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(),
                                      nn.Linear(128, 64), nn.ReLU())
            self.fc = nn.Linear(64, len(ID_CLASSES))

        def forward(self, x):
            return self.fc(self.body(x))

    return DigitsMLP()


def _train(model, X, y, epochs: int, seed: int, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y).long()
    model.train()
    for _ in tqdm(range(epochs), desc="train", disable=not progress, leave=False):
        for batch in torch.randperm(len(Xt), generator=g).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(Xt[batch]), yt[batch])
            loss.backward()
            opt.step()
    model.eval()


def run_demo(seed: int = 0, epochs: int = 60, detectors: str = "all", progress: bool = True):
    """Train, extract once per split, score every applicable detector; return a DataFrame."""
    import pandas as pd
    import torch

    import oodscope as ood
    from oodscope.detectors import get_detector_class

    torch.manual_seed(seed)
    splits = _data(seed)
    model = _model(seed)
    _train(model, *splits["train"], epochs=epochs, seed=seed, progress=progress)

    t0 = time.perf_counter()
    feats = {name: ood.extract(model, (X, y), keep_inputs=True, progress=False)
             for name, (X, y) in splits.items()}
    extract_s = time.perf_counter() - t0
    train, test = feats.pop("train"), feats.pop("test")
    acc = ood.metrics.accuracy(test.logits, test.labels)

    available = {"logits", "features", "labels", "head", "model", "inputs"}
    names = ood.list_detectors(requires=available) if detectors == "all" else detectors.split(",")
    rows = []
    for name in names:
        cls = get_detector_class(name)
        params = {"model": model} if "model" in cls.all_requirements() else {}
        t = time.perf_counter()
        try:
            det = ood.create(name, **params).fit(train)
            s_id = det.score(test)
            ood_scores = {k: det.score(v) for k, v in feats.items()}
        except (ValueError, RuntimeError) as exc:
            rows.append({"detector": name, "ood_set": "-", "error": str(exc)[:120]})
            continue
        elapsed = time.perf_counter() - t
        for ood_name, s_ood in ood_scores.items():
            m = ood.metrics.evaluate(s_id, s_ood)
            rows.append({"detector": name, "family": cls.__module__.rsplit(".", 1)[-1],
                         "ood_set": ood_name, "auroc": m["auroc"], "fpr_at_95_tpr": m["fpr_at_95_tpr"],
                         "aupr_in": m["aupr_in"], "seconds": elapsed})
    df = pd.DataFrame(rows)
    df.attrs.update(id_accuracy=acc, extract_seconds=extract_s, n_train=len(train), n_test=len(test))
    return df


def leaderboard(df):
    """Wide table: one row per detector, AUROC / FPR@95 per OOD set, sorted by mean AUROC."""
    ok = df[df["ood_set"] != "-"]
    wide = ok.pivot_table(index=["detector", "family"], columns="ood_set",
                          values=["auroc", "fpr_at_95_tpr", "aupr_in"])
    wide.columns = [f"{m}[{s}]" for m, s in wide.columns]
    wide["seconds"] = ok.groupby(["detector", "family"])["seconds"].first()
    auroc_cols = [c for c in wide.columns if c.startswith("auroc")]
    wide["mean_auroc"] = wide[auroc_cols].mean(axis=1)
    return wide.sort_values("mean_auroc", ascending=False).reset_index()


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    t0 = time.perf_counter()
    df = run_demo(seed=args.seed, epochs=args.epochs, detectors=args.detectors,
                  progress=not args.quiet)
    board = leaderboard(df)
    cols = ["detector", "family"] + [c for c in board.columns if c.startswith(("auroc", "fpr"))] + ["seconds"]
    print(f"\noodscope demo — ID: digits 0-5 (test n={df.attrs['n_test']}), "
          f"ID accuracy {100 * df.attrs['id_accuracy']:.1f}%, "
          f"network ran once per split ({df.attrs['extract_seconds']:.2f}s in total)\n")
    fmt = {c: (lambda v: f"{100 * v:6.2f}") for c in cols if c.startswith(("auroc", "fpr"))}
    fmt["seconds"] = lambda v: f"{v:6.3f}"
    with pd.option_context("display.width", 200, "display.max_rows", None):
        print(board[cols].to_string(index=False, formatters=fmt))
    errors = df[df["ood_set"] == "-"] if "error" in df else df.iloc[:0]
    for _, r in errors.iterrows():
        print(f"skipped {r['detector']}: {r['error']}")
    far = next((c for c in board.columns if c.startswith("auroc[far")), None)
    if far is not None and "msp" in set(board["detector"]):
        msp = float(board.loc[board["detector"] == "msp", far].iloc[0])
        feat = board[board["family"].isin(["distance", "density"])]
        if len(feat):
            best = feat.loc[feat[far].idxmax()]
            beat = int((feat[far] > msp).sum())
            print(f"\nFar OOD: {beat} of {len(feat)} feature-space detectors beat MSP "
                  f"({100 * msp:.2f}); best {best['detector']} {100 * best[far]:.2f}.")
    print("\nAUROC and FPR@95 in %; FPR@95 = OOD accepted when 95% of ID is kept (lower is better).")
    out = Path(args.out)
    board.to_csv(out, index=False)
    print(f"Leaderboard written to {out} ({time.perf_counter() - t0:.1f}s total).")
    return 0
