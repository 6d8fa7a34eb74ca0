"""``oodscope train``: train a reference network, optionally with an OOD-aware objective.

Example::

    oodscope train fashion-mnist                          # cross-entropy baseline
    oodscope train fashion-mnist --method oe --outliers photos --epochs 5
    oodscope train fashion-mnist --method logitnorm --param temperature=0.04
    oodscope train fashion-mnist --weight-ensemble wise-ft --alpha 0.25 0.5 --epochs 2

Weight-space ensembling (``--weight-ensemble wise-ft`` or ``bang``): fine-tune a pre-trained
network (``--init`` checkpoint, default the dataset's cached reference model) and also write
the WiSE-FT interpolations ``(1-α)·θ_pre + α·θ_fine-tuned`` for each ``--alpha`` as
``model-<method>-a<α>.safetensors``; ``bang`` fine-tunes with Mixup + label smoothing.

Writes ``model.safetensors`` and ``model.json`` (architecture, normalisation, test
accuracy, history, the objective and the detector its paper scores with) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def _param(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param expects KEY=VALUE, got {text!r}.")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="in-distribution dataset to train on (e.g. fashion-mnist, mnist, "
                        "kmnist, cifar10; see `oodscope.data.list_datasets()`); its 'train' split is used "
                        "for training and its 'test' split for the reported accuracy")
    parser.add_argument("--method", default="ce",
                        help="training objective, by registry name (see `oodscope.train.list_objectives()`); "
                             "'ce' is plain cross-entropy")
    parser.add_argument("--param", default=argparse.SUPPRESS, action="append", type=_param, metavar="KEY=VALUE",
                        help="objective hyperparameter, repeatable; VALUE is parsed as JSON when it can be "
                             "(e.g. --param temperature=0.04)")
    parser.add_argument("--outliers", default=argparse.SUPPRESS, metavar="SOURCE",
                        help="auxiliary outlier source for methods that need one (outlier exposure and "
                             "friends), resolved by oodscope.train.outliers.get_outlier_source: e.g. photos, "
                             "noise, patch-shuffle, dataset:<name>[/<split>], folder:<path>")
    parser.add_argument("--n-outliers", type=int, default=10000, help="number of outlier images to draw")
    parser.add_argument("--model", default=argparse.SUPPRESS,
                        help="network from oodscope.models.list_models(); default: the dataset's reference "
                             "recipe (small_cnn for 28x28 sets, resnet18_cifar for CIFAR)")
    parser.add_argument("--epochs", default=argparse.SUPPRESS, type=int, help="training epochs (default: the recipe's)")
    parser.add_argument("--lr", default=argparse.SUPPRESS, type=float, help="learning rate (default: the recipe's)")
    parser.add_argument("--batch-size", default=argparse.SUPPRESS, type=int, help="batch size (default: the recipe's)")
    parser.add_argument("--optimizer", default=argparse.SUPPRESS, choices=["adam", "adamw", "sgd"],
                        help="optimiser (default: the recipe's)")
    parser.add_argument("--max-steps", default=argparse.SUPPRESS, type=int,
                        help="stop after this many optimiser steps (for quick trials)")
    parser.add_argument("--train-subset", default=argparse.SUPPRESS, type=int, metavar="N",
                        help="train on a random subset of N training images (for quick trials)")
    parser.add_argument("--test-subset", default=argparse.SUPPRESS, type=int, metavar="N",
                        help="report accuracy on a random subset of N test images (for quick trials)")
    parser.add_argument("--init", default=argparse.SUPPRESS, metavar="CHECKPOINT",
                        help="start from this saved model (model.safetensors) instead of a fresh network: "
                             "fine-tuning; its normalisation is kept")
    parser.add_argument("--weight-ensemble", default=argparse.SUPPRESS, choices=["wise-ft", "bang"],
                        help="fine-tune the --init model (default: the dataset's reference model) and write "
                             "WiSE-FT interpolations with it; bang fine-tunes with Mixup + label smoothing")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5], metavar="A",
                        help="WiSE-FT coefficients for --weight-ensemble (0 = pre-trained, 1 = fine-tuned)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (initialisation, shuffling, outliers)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--out", default=argparse.SUPPRESS, metavar="DIR",
                        help="output folder (default: runs/train/<dataset>-<method>-seed<S>/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def run(args: argparse.Namespace) -> int:
    for name, default in (("param", []), ("outliers", None), ("model", None), ("epochs", None), ("lr", None),
                          ("batch_size", None), ("optimizer", None), ("max_steps", None),
                          ("train_subset", None), ("test_subset", None), ("out", None), ("init", None),
                          ("weight_ensemble", None)):
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.weight_ensemble == "bang" and args.method != "ce":
        raise ValueError("--weight-ensemble bang fine-tunes with its own loss (Mixup + label smoothing); "
                         "drop --method.")
    import torch

    from .. import data as odata
    from ..models import create, save_checkpoint
    from .reference import RECIPES
    from .base import create_objective
    from .loop import evaluate, fit

    dataset = args.dataset.lower()
    params = dict(args.param)
    objective = create_objective(args.method, **params)

    train = odata.load(dataset, "train")
    test = odata.load(dataset, "test")
    if args.train_subset is not None:
        if args.train_subset < 1:
            raise ValueError(f"--train-subset must be >= 1, got {args.train_subset}.")
        train = train.sample(args.train_subset, seed=args.seed)
    if args.test_subset is not None:
        if args.test_subset < 1:
            raise ValueError(f"--test-subset must be >= 1, got {args.test_subset}.")
        test = test.sample(args.test_subset, seed=args.seed)
    mean, std = odata.channel_stats(train)
    recipe = dict(RECIPES.get(dataset) or RECIPES["cifar10" if train.channels == 3 else "fashion-mnist"])

    outliers = None
    if args.outliers is not None:
        try:
            from .outliers import get_outlier_source
        except ModuleNotFoundError as exc:
            raise ValueError("--outliers needs oodscope.train.outliers, which is not available in this "
                             "install.") from exc
        outliers = get_outlier_source(args.outliers, id_data=train, n=args.n_outliers, seed=args.seed)
    elif getattr(objective, "needs_outliers", False):
        raise ValueError(f"Method {args.method!r} needs auxiliary outliers; pass --outliers SOURCE "
                         "(e.g. --outliers photos).")

    pretrained = _pretrained(args, dataset)
    if pretrained is not None:
        model, pre_meta = pretrained
        norm = pre_meta.get("normalization") or {}
        mean, std = norm.get("mean", mean), norm.get("std", std)
    else:
        model_name = args.model or recipe["model"]
        model_kwargs = dict(recipe["model_kwargs"]) if model_name == recipe["model"] else {}
        if model_name == "small_cnn" and train.image_shape[0] != 28:
            model_kwargs["image_size"] = train.image_shape[0]
        torch.manual_seed(args.seed)
        model = create(model_name, num_classes=len(train.classes) or train.num_classes,
                       in_channels=train.channels, **model_kwargs)
    augment = odata.RandomShiftFlip(**recipe["augment"]) if recipe.get("augment") else None
    out = Path(args.out) if args.out else Path("runs") / "train" / f"{dataset}-{args.method}-seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "model.safetensors"
    fit_kwargs = dict(
        outliers=outliers, epochs=args.epochs or recipe["epochs"], lr=args.lr or recipe["lr"],
        optimizer=args.optimizer or recipe["optimizer"], schedule=recipe["schedule"],
        batch_size=args.batch_size or recipe["batch_size"], weight_decay=recipe["weight_decay"],
        seed=args.seed, mean=mean, std=std, augment=augment, progress=not args.quiet,
        device=args.device, max_steps=args.max_steps)
    ensembles = {}
    if args.weight_ensemble:
        from .weight_ensembles import finetune_and_ensemble

        ensembles, model, history = finetune_and_ensemble(
            model, train, args.weight_ensemble, args.alpha,
            objective=None if args.weight_ensemble == "bang" else objective, **fit_kwargs)
    else:
        model, history = fit(model, train, objective=objective, **fit_kwargs)
    metrics = evaluate(model, odata.loader(test, 512, mean=mean, std=std), device=args.device)
    meta = {
        "dataset": dataset, "seed": args.seed, "method": args.method,
        "objective": {"name": args.method, "params": params},
        "default_detector": getattr(objective, "default_detector", "msp"),
        "detector_params": dict(getattr(objective, "detector_params", {}) or {}),
        "outliers": args.outliers, "num_classes": model.fc.out_features if hasattr(model, "fc") else None,
        "classes": train.classes, "image_shape": list(train.image_shape), "in_channels": train.channels,
        "normalization": {"mean": mean, "std": std}, "test_accuracy": metrics["accuracy"],
        "test_loss": metrics["loss"], "test_n": metrics["n"], "history": history, "argv": sys.argv[1:],
    }
    if args.init:
        meta["init"] = str(args.init)
    save_checkpoint(model.cpu(), ckpt, meta)
    print(f"test accuracy {metrics['accuracy']:.4f} ({metrics['n']} images); wrote {ckpt} and "
          f"{ckpt.with_suffix('.json')}")
    for alpha, m in ensembles.items():
        acc = evaluate(m, odata.loader(test, 512, mean=mean, std=std), device=args.device)["accuracy"]
        path = out / f"model-{args.weight_ensemble}-a{alpha:g}.safetensors"
        save_checkpoint(m.cpu(), path, dict(meta, test_accuracy=acc, weight_ensemble={
            "method": args.weight_ensemble, "alpha": alpha, "pretrained": str(args.init or "reference model"),
            "finetuned": str(ckpt)}))
        print(f"{args.weight_ensemble} alpha={alpha:g}: test accuracy {acc:.4f}; wrote {path}")
    return 0


def _pretrained(args, dataset: str):
    """``(model, meta)`` to fine-tune from, or None to train a fresh network."""
    if args.init:
        from ..models.checkpoint import load_checkpoint

        return load_checkpoint(args.init)
    if args.weight_ensemble:
        from ..models.reference import RECIPES, reference_model

        if dataset not in RECIPES:
            raise ValueError(f"--weight-ensemble needs a pre-trained network: pass --init CHECKPOINT ({dataset!r} "
                             f"has no reference model; those exist for {sorted(RECIPES)}).")
        return reference_model(dataset, seed=args.seed, progress=not args.quiet)
    return None
