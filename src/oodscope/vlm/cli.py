"""``oodscope train-prompts``: tune CLIP prompts for OOD detection (LAPT, Local-Prompt, KR-NFT, CMA).

Example::

    oodscope train-prompts lapt --vlm hf:/models/clip-vit-base-patch16 --id data/train --shots 16
    oodscope train-prompts local-prompt --vlm hf:./clip --dataset fashion-mnist --shots 4 --out runs/lp
    oodscope train-prompts cma --vlm hf:./clip --id data/train --param lam=0.001

ID images come from ``--id`` (one sub-folder per class; folder names are the class names)
or ``--dataset`` (a registered dataset's train split with its class names). The few-shot
protocol (``--shots``, ``--seed``) is the same for every method. Writes the learned prompts
to ``<out>/prompts`` (safetensors + JSON + SHA-256 manifest) and, for CMA, the fine-tuned
model to ``<out>/model`` (Hugging Face ``save_pretrained``: safetensors + config). Score
with ``oodscope.create("<method>", prompts="<out>/prompts").fit()``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..train.cli import _param

__all__ = ["add_arguments", "run"]

METHODS = {"lapt": "lapt", "local-prompt": "local_prompt", "local_prompt": "local_prompt",
           "krnft": "krnft", "kr-nft": "krnft", "cma": "cma"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", choices=sorted(METHODS), help="prompt-tuning method")
    parser.add_argument("--vlm", required=True, help="CLIP model: hf:<hub id or local dir>, "
                        "open_clip:<arch>/<checkpoint>, or a local HF checkpoint directory")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--id", metavar="DIR", help="ID image folder, one sub-folder per class")
    src.add_argument("--dataset", help="registered dataset (its train split and class names)")
    parser.add_argument("--shots", type=int, default=16,
                        help="images per class (the shared few-shot protocol); 0 = all images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the few-shot draw and of training")
    parser.add_argument("--epochs", type=int, default=argparse.SUPPRESS, help="training epochs (method default)")
    parser.add_argument("--lr", type=float, default=argparse.SUPPRESS, help="learning rate (method default)")
    parser.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, help="batch size (method default)")
    parser.add_argument("--words", default=argparse.SUPPRESS, metavar="FILE",
                        help="candidate negative labels, one a line (default: WordNet nouns and adjectives)")
    parser.add_argument("--n-negatives", type=int, default=argparse.SUPPRESS,
                        help="negative labels kept by NegMining (LAPT, KR-NFT, CMA)")
    parser.add_argument("--neg-images", default=argparse.SUPPRESS, metavar="DIR",
                        help="LAPT: images of negative labels, one sub-folder per label (the labels); "
                             "without it the labels' text embeddings stand in for their images")
    parser.add_argument("--param", action="append", type=_param, default=[], metavar="KEY=VALUE",
                        help="any other keyword of the method's train function, repeatable (JSON values)")
    parser.add_argument("--out", default=argparse.SUPPRESS, metavar="DIR",
                        help="output folder (default runs/prompts/<method>-<shots>shot-seed<seed>)")


def _id_data(args):
    from .. import data as D

    if args.id:
        ds = D.load_image_folder(args.id, progress=False)
        names = [c.replace("_", " ") for c in ds.classes]
    else:
        ds = D.load(args.dataset, "train")
        names = list(ds.classes)
    if ds.labels is None or not names:
        raise ValueError(f"{args.id or args.dataset}: no class labels (an ID folder needs one sub-folder "
                         "per class).")
    return list(ds.images), ds.labels, names


def run(args: argparse.Namespace) -> int:
    from . import load
    from .extract import extract
    from .prompt_tuning import train_cma, train_krnft, train_lapt, train_local_prompt
    from .prompts import FewShotProtocol, save_prompts

    method = METHODS[args.method]
    kwargs = dict(args.param)
    for opt in ("epochs", "lr", "batch_size", "words", "n_negatives"):
        if hasattr(args, opt):
            kwargs[opt] = getattr(args, opt)
    protocol = FewShotProtocol(args.shots or None, seed=args.seed)
    kwargs.setdefault("seed", args.seed)
    out = Path(getattr(args, "out", None) or f"runs/prompts/{method}-{args.shots or 'all'}shot-seed{args.seed}")
    encoder = load(args.vlm)
    images, labels, names = _id_data(args)
    print(f"train-prompts {method}: {len(names)} classes, {len(images)} images, "
          f"{'all' if not args.shots else args.shots} per class, model {encoder.name}", flush=True)
    if method == "lapt":
        id_feats = extract(encoder, (images, labels), progress=False)
        neg_feats = neg_words = None
        if hasattr(args, "neg_images"):
            from .. import data as D

            neg = D.load_image_folder(args.neg_images, progress=False)
            neg_words = [c.replace("_", " ") for c in neg.classes]
            neg_feats = extract(encoder, (list(neg.images), neg.labels), progress=False)
        result = train_lapt(encoder, names, id_feats, neg_features=neg_feats, neg_words=neg_words,
                            protocol=protocol, **kwargs)
    elif method == "local_prompt":
        for unused in ("words", "n_negatives"):  # Local-Prompt learns its negative prompts
            kwargs.pop(unused, None)
        result = train_local_prompt(encoder, names, images, labels, protocol=protocol, **kwargs)
    elif method == "krnft":
        result = train_krnft(encoder, names, images, labels, protocol=protocol, **kwargs)
    else:
        tuned, result = train_cma(encoder, names, images, labels, protocol=protocol, **kwargs)
        if hasattr(tuned.model, "save_pretrained"):
            tuned.model.save_pretrained(out / "model")
            if hasattr(tuned.tokenizer, "save_pretrained"):
                tuned.tokenizer.save_pretrained(out / "model")
            print(f"fine-tuned model: {out / 'model'} (load with oodscope.vlm.load('hf:{out / 'model'}'))")
    path = save_prompts(result, out / "prompts")
    last = result.history[-1] if result.history else {}
    print(f"{method}: {len(result.history)} epochs, final loss {last.get('loss', float('nan')):.4f}; "
          f"prompts written to {path}")
    print(f"score with: oodscope.create({method!r}, prompts={str(path)!r}).fit()")
    return 0
