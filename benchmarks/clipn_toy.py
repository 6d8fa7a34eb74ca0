"""CLIPN at toy size: train the "no" text tower and prompts, then score with ATD / CTW.

No CLIP weights can be downloaded here, so this is plumbing at toy scale, not a reproduction:
a tiny random "yes" text tower (`TextTower`, 1 layer, width 64) defines a joint space; an
image is its caption's yes-embedding plus noise (the frozen image tower's stand-in). The "no"
tower (initialised from the yes tower, 16 prompts) is trained with ITBO + TSO on random
image-caption pairs (the stand-in for CC3M). Then 10 captions are the ID classes; ID test
images come from them, OOD test images from other captions; the ``clipn`` detector scores with
the trained "no" embeddings (ATD and CTW) against MCM on the yes embeddings alone.

    python benchmarks/clipn_toy.py [--steps 300] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import oodscope as ood
from oodscope import Features
from oodscope.vlm.clipn import CLIPNNoText, NoTextEncoder, TextTower, train_no_encoder

CFG = dict(vocab_size=200, context_length=8, width=64, heads=2, layers=1, embed_dim=32)


def _captions(rng, n):
    out = np.zeros((n, CFG["context_length"]), dtype=np.int64)
    for i in range(n):
        k = rng.integers(2, 6)
        out[i, :k] = rng.integers(1, CFG["vocab_size"] - 1, k)
        out[i, k] = CFG["vocab_size"] - 1
    return out


def run(seed: int, steps: int) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    yes_tower = TextTower(**CFG).eval()

    def embed(tokens):
        with torch.no_grad():
            return F.normalize(yes_tower(torch.as_tensor(tokens)), dim=-1)

    def images(yes, noise=0.25):
        return F.normalize(yes + noise * torch.randn_like(yes) / np.sqrt(CFG["embed_dim"]), dim=-1)

    pairs = _captions(rng, 2000)
    yes_pairs = embed(pairs)
    enc = NoTextEncoder.from_yes_tower(yes_tower)
    log = train_no_encoder(enc, images(yes_pairs), yes_pairs, pairs, steps=steps, lr=1e-3, batch_size=128,
                           logit_scale=20.0, seed=seed)
    classes, others = _captions(rng, 10), _captions(rng, 200)
    yes_cls, yes_other = embed(classes), embed(others)
    test_id = images(yes_cls[rng.integers(0, 10, 500)])
    test_ood = images(yes_other[rng.integers(0, 200, 500)])
    names = [f"c{i}" for i in range(10)]
    lookup = dict(zip(names, classes))
    no_text = CLIPNNoText(enc, lambda texts: np.stack([lookup[t] for t in texts]))
    res = {"itbo_yes": (log[0]["itbo_yes"], log[-1]["itbo_yes"]), "itbo_no": (log[0]["itbo_no"], log[-1]["itbo_no"]),
           "tso": (log[0]["tso"], log[-1]["tso"])}
    x_id, x_ood = Features(extras={"image_embeds": test_id.numpy()}), Features(extras={"image_embeds": test_ood.numpy()})
    mcm = ood.create("mcm", text_embeds=yes_cls.numpy()).fit()
    res["mcm"] = ood.metrics.auroc(mcm.score(x_id), mcm.score(x_ood))
    for rule in ("atd", "ctw"):
        det = ood.create("clipn", text_embeds=yes_cls.numpy(), no_encoder=no_text, class_names=names,
                         templates=("{}",), rule=rule, logit_scale=20.0).fit()
        res[rule] = ood.metrics.auroc(det.score(x_id), det.score(x_ood))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [run(int(s), args.steps) for s in args.seeds.split(",")]
    for k in ("itbo_yes", "itbo_no", "tso"):
        print(f"{k:9s} loss: first step {np.mean([r[k][0] for r in rows]):.3f} -> last step "
              f"{np.mean([r[k][1] for r in rows]):.3f}")
    for k in ("mcm", "atd", "ctw"):
        v = [100 * r[k] for r in rows]
        print(f"{k:4s} AUROC {np.mean(v):.1f} ± {np.std(v):.1f}  (seeds {args.seeds})")


if __name__ == "__main__":
    main()
