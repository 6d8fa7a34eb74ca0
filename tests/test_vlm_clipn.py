"""CLIPN's trainable half: the two losses by hand, toy training of the "no" tower and prompts,
the released-checkpoint key mapping on a tiny synthetic state dict with CLIPN's key layout,
and the trained tower as the ``clipn`` detector's "no" encoder. Tiny random towers only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import oodscope as ood
from oodscope import Features
from oodscope.vlm.clipn import (CLIPNNoText, NoTextEncoder, TextTower, clipn_loss, itbo_loss, load_clipn_checkpoint,
                                train_no_encoder, tso_loss)

TINY = dict(vocab_size=20, context_length=6, width=64, heads=1, layers=1, embed_dim=16)


def _tokens(rng, n, vocab=20, ctx=6):
    """Caption ids: 2-4 random word ids then the end-of-text id (the largest), zero padded."""
    out = np.zeros((n, ctx), dtype=np.int64)
    for i in range(n):
        k = rng.integers(2, 5)
        out[i, :k] = rng.integers(1, vocab - 1, k)
        out[i, k] = vocab - 1
    return out


def test_itbo_and_tso_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    yes = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    no = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ly, ln = itbo_loss(img, yes, no, 2.0)
    l_yes, l_no = 2 * img @ yes.T, 2 * img @ no.T
    p_yes = torch.sigmoid(l_yes - l_no)
    assert float(ly) == pytest.approx(float(-(torch.log(p_yes[0, 0]) + torch.log(p_yes[1, 1])) / 2), rel=1e-6)
    assert float(ln) == pytest.approx(float(-(torch.log(1 - p_yes[0, 1]) + torch.log(1 - p_yes[1, 0])) / 2),
                                      rel=1e-6)
    # TSO: cos(yes_j, no_j) = 0.6 for both -> 2 - sqrt(2 - 1.2 + 1e-4)
    assert float(tso_loss(yes, no)) == pytest.approx(2 - np.sqrt(0.8 + 1e-4), rel=1e-6)
    total = clipn_loss(img, yes, no, 2.0)
    assert float(total["total"]) == pytest.approx(0.5 * float(ly + ln + tso_loss(yes, no)), rel=1e-6)
    with pytest.raises(ValueError, match="2 image-caption pairs"):
        itbo_loss(img[:1], yes[:1], no[:1], 2.0)


def _toy(seed=0, n=96):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    yes_tower = TextTower(**TINY).eval()
    tokens = _tokens(rng, n)
    with torch.no_grad():
        yes = F.normalize(yes_tower(torch.tensor(tokens)), dim=-1)
    images = F.normalize(yes + 0.3 * torch.randn_like(yes) / np.sqrt(16), dim=-1)
    return yes_tower, tokens, yes, images


def _p_yes(images, yes, no, scale=10.0):
    return torch.sigmoid(scale * (images @ yes.T - images @ no.T))


def test_toy_training_teaches_the_no_tower_to_say_no():
    yes_tower, tokens, yes, images = _toy()
    enc = NoTextEncoder.from_yes_tower(yes_tower, n_prompts=4)
    with torch.no_grad():  # a fresh copy says exactly what the yes tower says
        np.testing.assert_allclose(F.normalize(enc.eval()(torch.tensor(tokens)), dim=-1).numpy(), yes.numpy(),
                                   atol=1e-5)
    log = train_no_encoder(enc, images, yes, tokens, steps=30, lr=3e-3, batch_size=32, logit_scale=10.0)
    first, last = np.mean([r["total"] for r in log[:5]]), np.mean([r["total"] for r in log[-5:]])
    assert last < 0.85 * first
    with torch.no_grad():
        no = F.normalize(enc(torch.tensor(tokens)), dim=-1)
    p = _p_yes(images, yes, no)
    eye = torch.eye(len(p), dtype=torch.bool)
    assert float(p[eye].mean()) > 0.5 > float(p[~eye].mean())
    assert float((yes * no).sum(-1).mean()) < 0.9  # TSO pushed "no" away from "yes"
    assert enc.prompt_no.detach().abs().sum() > 0  # the prompts were learnt


def test_training_rejects_mismatched_inputs():
    yes_tower, tokens, yes, images = _toy(n=8)
    enc = NoTextEncoder.from_yes_tower(yes_tower, n_prompts=2)
    with pytest.raises(ValueError, match="length"):
        train_no_encoder(enc, images[:5], yes, tokens, steps=1)
    with pytest.raises(ValueError, match="widths"):
        train_no_encoder(enc, images[:, :8], yes[:, :8], tokens, steps=1)
    bad = images.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_no_encoder(enc, bad, yes, tokens, steps=1)
    with pytest.raises(ValueError, match="tokens must be"):
        enc(torch.zeros((2, 5), dtype=torch.long))


def _released_layout(seed=1):
    """A tiny state dict laid out as a released CLIPN checkpoint (epoch_N.pt)."""
    torch.manual_seed(seed)
    yes = TextTower(**TINY)
    no = TextTower(**TINY)  # different random weights: the mapping must pick the right ones
    state = {f"module.{k}": v for k, v in yes.state_dict().items()}
    renames = {"transformer.": "transformer_no.", "token_embedding.": "token_embedding_no.",
               "positional_embedding": "positional_embedding_no", "ln_final.": "ln_final_no.",
               "text_projection": "text_projection_no"}
    for k, v in no.state_dict().items():
        for a, b in renames.items():
            if k == a or k.startswith(a):
                state[f"module.{b}{k[len(a):]}"] = v
                break
    prompts = torch.randn(3, TINY["context_length"], TINY["width"]) * 0.1
    state["module.prompt_no"] = prompts
    state["module.visual.proj"] = torch.randn(4, 16)
    state["module.logit_scale"] = torch.tensor(np.log(100.0))
    return {"epoch": 10, "name": "toy", "state_dict": state}, yes, no, prompts


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_released_checkpoint_keys_map_onto_the_towers(tmp_path, fmt):
    ckpt, yes, no, prompts = _released_layout()
    if fmt == "pt":
        path = tmp_path / "epoch_10.pt"
        torch.save(ckpt, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "clipn.safetensors"
        save_file({k[len("module."):]: v.contiguous() for k, v in ckpt["state_dict"].items()}, str(path))
    yes_tower, enc, rest = load_clipn_checkpoint(path, quick_gelu=True)
    assert sorted(rest) == ["logit_scale", "visual.proj"]
    assert enc.tower.config == {**TINY, "quick_gelu": True} and enc.prompt_no.shape == (3, 6, 64)
    for k, v in no.state_dict().items():
        torch.testing.assert_close(enc.tower.state_dict()[k], v)
    for k, v in yes.state_dict().items():
        torch.testing.assert_close(yes_tower.state_dict()[k], v)
    torch.testing.assert_close(enc.prompt_no.detach(), prompts)
    tokens = torch.tensor(_tokens(np.random.default_rng(0), 4))
    with torch.no_grad():  # eval: the mean prompt is added to the no tower's input
        expected = no(tokens, prompts.mean(0, keepdim=True))
        torch.testing.assert_close(enc(tokens), expected)
        torch.testing.assert_close(yes_tower(tokens), yes(tokens))


def test_checkpoints_that_are_not_clipn_are_refused(tmp_path):
    torch.save({"state_dict": TextTower(**TINY).state_dict()}, tmp_path / "clip.pt")
    with pytest.raises(ValueError, match="plain CLIP"):
        load_clipn_checkpoint(tmp_path / "clip.pt")
    ckpt, *_ = _released_layout()
    ckpt["state_dict"]["module.transformer_no.resblocks.0.extra"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="unexpected"):
        load_clipn_checkpoint(tmp_path / "odd.pt")
    with pytest.raises(FileNotFoundError):
        load_clipn_checkpoint(tmp_path / "missing.pt")


def test_trained_no_tower_drives_the_clipn_detector():
    yes_tower, tokens, yes, images = _toy(seed=2, n=64)
    enc = NoTextEncoder.from_yes_tower(yes_tower, n_prompts=2)
    train_no_encoder(enc, images, yes, tokens, steps=20, lr=3e-3, batch_size=32, logit_scale=10.0)
    names = [f"class{i}" for i in range(4)]
    vocab = {n: tokens[i] for i, n in enumerate(names)}
    no_text = CLIPNNoText(enc, lambda texts: np.stack([vocab[t] for t in texts]))
    det = ood.create("clipn", text_embeds=yes[:4].numpy(), no_encoder=no_text, class_names=names,
                     templates=("{}",), logit_scale=10.0).fit()
    s = det.score(Features(extras={"image_embeds": images[:16].numpy()}))
    assert s.shape == (16,) and np.all((s > 0) & (s < 1))
    with torch.no_grad():
        no4 = F.normalize(enc(torch.tensor(tokens[:4])), dim=-1).numpy()
    np.testing.assert_allclose(det.no_text_, no4, atol=1e-5)
