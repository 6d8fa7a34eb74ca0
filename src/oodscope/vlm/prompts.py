"""Shared machinery for CLIP prompt tuning (LAPT, Local-Prompt, KR-NFT, CMA).

* `PromptableText` — the text tower of a `DualEncoder` with learnable context token
  embeddings: ``[SOS] [ctx_1 .. ctx_n] <name> . [EOS]`` (CoOp's layout). The context
  replaces the embeddings of ``n`` placeholder tokens through a forward hook on the token
  embedding layer, so the backend's own causal mask, positions and EOS pooling are used.
* `FewShotProtocol` — the few-shot split every method here trains on: ``shots`` images per
  class drawn with a seed (the protocol of CoOp / LoCoOp / Local-Prompt / KR-NFT).
* `random_crops` / `embed_crops` / `crop_views` — random crops of each image embedded by
  the frozen image tower (Local-Prompt's and KR-NFT's negative augmentation picks crops from
  these; both draw fresh crops every epoch, as the authors' data loaders do).
* `PromptResult` with `save_prompts` / `load_prompts` — what a tuning run produces: the
  learned arrays (context vectors, resulting text embeddings, feature transforms) and
  JSON (method, class names, negative words, configuration, history), written with
  `oodscope.persistence.write_bundle` (safetensors + JSON + SHA-256 manifest; no pickle).

Real-size recipe (not run here: no CLIP weights can be downloaded in this environment):
load a local checkpoint (``vlm.load("hf:/path/to/clip-vit-base-patch16")``), use
``shots=16`` (LAPT: the automatically collected set instead) and the method defaults,
which follow the authors' configurations; expect about one GPU-hour per method on
ImageNet-1k. The tests train tiny randomly initialised CLIPs for a few steps: they check
the plumbing, gradients and persistence, not the papers' numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._state import persistable
from .backends import DualEncoder, HFCLIPEncoder, OpenCLIPEncoder

__all__ = [
    "FewShotProtocol",
    "PromptResult",
    "PromptableText",
    "crop_views",
    "embed_crops",
    "load_prompts",
    "random_crops",
    "save_prompts",
]

PROMPTS_FORMAT = "oodscope.prompts"
PROMPTS_VERSION = 1


# ---------------------------------------------------------------- few-shot protocol
@dataclass(frozen=True)
class FewShotProtocol:
    """``shots`` training images per class, drawn without replacement with ``seed``.

    ``shots=None`` keeps every image (full-data tuning, e.g. CMA). Classes with fewer
    than ``shots`` images are an error unless ``allow_fewer`` (then all of them are used).
    """

    shots: int | None = 16
    seed: int = 0
    allow_fewer: bool = False

    def __post_init__(self) -> None:
        if self.shots is not None and (isinstance(self.shots, bool) or int(self.shots) != self.shots
                                       or self.shots < 1):
            raise ValueError(f"shots must be a positive integer or None, got {self.shots!r}.")

    def select(self, labels: Sequence[int], num_classes: int | None = None) -> np.ndarray:
        """Sorted indices of the selected samples."""
        y = np.asarray(labels)
        if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError("FewShotProtocol.select needs a non-empty 1-D integer label array.")
        if y.min() < 0:
            raise ValueError("FewShotProtocol.select: labels must be >= 0 (ID classes only).")
        c = int(num_classes if num_classes is not None else y.max() + 1)
        if self.shots is None:
            return np.arange(len(y))
        rng = np.random.default_rng(self.seed)
        picked, short = [], []
        for k in range(c):
            idx = np.flatnonzero(y == k)
            if len(idx) < self.shots:
                short.append((k, len(idx)))
                if not self.allow_fewer:
                    continue
            picked.append(rng.permutation(idx)[: self.shots])
        if short and not self.allow_fewer:
            raise ValueError(f"{len(short)} class(es) have fewer than {self.shots} images "
                             f"(class, count): {short[:5]}; lower shots or pass allow_fewer=True.")
        return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)

    def to_json(self) -> dict[str, Any]:
        return {"shots": self.shots, "seed": self.seed, "allow_fewer": self.allow_fewer}


# ---------------------------------------------------------------- learnable text tower
class PromptableText:
    """Differentiable text embeddings with learnable context tokens.

    ``encode(names, ctx)`` returns L2-normalised embeddings (len(names), D) as a torch
    tensor with gradients flowing into ``ctx``: shape ``(n_ctx, width)`` (one context for
    every name, CoOp's generic context) or ``(len(names), n_ctx, width)`` (class-specific).
    """

    def __init__(self, encoder: DualEncoder, n_ctx: int, placeholder: str = "X"):
        if int(n_ctx) != n_ctx or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}.")
        self.encoder = encoder
        self.n_ctx = int(n_ctx)
        self.placeholder = placeholder
        self._kind = self._backend(encoder)
        self.embedding = self._token_embedding()
        self.width = int(self.embedding.embedding_dim)
        self._tok_cache: dict[tuple[str, ...], Any] = {}
        self._ctx = None

    @staticmethod
    def _backend(encoder) -> str:
        if isinstance(encoder, HFCLIPEncoder):
            return "hf"
        if isinstance(encoder, OpenCLIPEncoder):
            return "open_clip"
        raise ValueError(f"Prompt tuning supports HFCLIPEncoder and OpenCLIPEncoder text towers, got "
                         f"{type(encoder).__name__}.")

    def _token_embedding(self):
        m = self.encoder.model
        if self._kind == "hf":
            return m.text_model.embeddings.token_embedding
        emb = getattr(m, "token_embedding", None) or getattr(getattr(m, "text", None), "token_embedding", None)
        if emb is None:
            raise ValueError(f"{self.encoder.name}: cannot find the text token embedding (model.token_embedding).")
        return emb

    def _tokenize(self, prompts: list[str]):
        if self._kind == "hf":
            tok = self.encoder.tokenizer(prompts, padding=True, truncation=True,
                                         max_length=self.encoder.max_length, return_tensors="pt")
            return tok["input_ids"], tok.get("attention_mask")
        return self.encoder.tokenizer(prompts), None

    def _placeholder_id(self) -> int:
        ids, _ = self._tokenize([self.placeholder])
        return int(ids[0, 1])  # [SOS] placeholder [EOS]

    def tokenized(self, names: Sequence[str]):
        key = tuple(names)
        hit = self._tok_cache.get(key)
        if hit is not None:
            return hit
        prefix = " ".join([self.placeholder] * self.n_ctx)
        prompts = [f"{prefix} {n}." if n else f"{prefix}." for n in names]
        ids, mask = self._tokenize(prompts)
        pid = self._placeholder_id()
        if ids.shape[1] < 1 + self.n_ctx or not bool((ids[:, 1:1 + self.n_ctx] == pid).all()):
            raise ValueError(f"The tokenizer of {self.encoder.name} does not map the placeholder "
                             f"{self.placeholder!r} to one token per context slot; use another placeholder.")
        self._tok_cache[key] = (ids, mask)
        return ids, mask

    def init_context(self, count: int | None = None, init_text: str | None = None, std: float = 0.02,
                     seed: int = 0):
        """A context parameter: from the token embeddings of ``init_text`` (which must have
        exactly ``n_ctx`` tokens) or N(0, std²); ``count`` rows for class-specific contexts."""
        import torch

        if init_text:
            ids, mask = self._tokenize([init_text])
            length = int(mask[0].sum()) if mask is not None else int((ids[0] != 0).sum())
            if length - 2 != self.n_ctx:
                raise ValueError(f"init_text {init_text!r} has {length - 2} tokens but n_ctx is {self.n_ctx}; "
                                 "give a text of exactly n_ctx tokens, or none (random init).")
            body = ids[0, 1:1 + self.n_ctx]
            with torch.no_grad():
                ctx = self.embedding(body.to(self.embedding.weight.device)).detach().clone().float()
        else:
            g = torch.Generator().manual_seed(int(seed))
            ctx = torch.randn(self.n_ctx, self.width, generator=g) * std
        if count is not None:
            ctx = ctx.unsqueeze(0).repeat(int(count), 1, 1)
        return torch.nn.Parameter(ctx)

    def encode(self, names: Sequence[str], ctx, normalize: bool = True):
        """Text embeddings of ``names`` with ``ctx`` in the context slots (differentiable)."""
        import torch

        names = [str(n) for n in names]
        if ctx.ndim == 3 and ctx.shape[0] != len(names):
            raise ValueError(f"class-specific context has {ctx.shape[0]} rows for {len(names)} names.")
        if ctx.shape[-2:] != (self.n_ctx, self.width):
            raise ValueError(f"context must end in shape ({self.n_ctx}, {self.width}), got {tuple(ctx.shape)}.")
        ids, mask = self.tokenized(names)
        n = self.n_ctx

        def hook(module, args, out):
            out = out.clone()
            out[:, 1:1 + n, :] = ctx.to(out.dtype) if ctx.ndim == 3 else ctx.to(out.dtype).unsqueeze(0)
            return out

        handle = self.embedding.register_forward_hook(hook)
        try:
            dev = self.encoder.device
            if self._kind == "hf":
                m = self.encoder.model
                out = m.text_model(input_ids=ids.to(dev), attention_mask=None if mask is None else mask.to(dev),
                                   return_dict=True)
                emb = m.text_projection(out.pooler_output)
            else:
                emb = self.encoder.model.encode_text(ids.to(dev))
        finally:
            handle.remove()
        emb = emb.float()
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb

    def frozen(self, names: Sequence[str], template: str = "a photo of a {}.") -> np.ndarray:
        """Hand-crafted prompt embeddings (no context), float64, normalised."""
        return self.encoder.encode_text(list(names), (template,)).astype(np.float64)


class frozen_weights:
    """Context manager: ``module``'s parameters get no gradients inside, as before after."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self._saved = [(p, p.requires_grad) for p in self.module.parameters()]
        for p, _ in self._saved:
            p.requires_grad_(False)
        return self.module

    def __exit__(self, *exc):
        for p, flag in self._saved:
            p.requires_grad_(flag)
        return False


# ---------------------------------------------------------------- crop views
def random_crops(images: Sequence[Any], n_views: int = 16, scale=(0.08, 1.0), rng=None,
                 flip: bool = True) -> list:
    """``n_views`` random square crops of every image (PIL), each flipped left-right with
    probability 1/2 when ``flip``. The area fraction is drawn from ``scale`` (torchvision's
    ``RandomResizedCrop`` default range; it also varies the aspect ratio, we do not).
    Returns a flat list, image-major: crops ``i * n_views .. (i + 1) * n_views - 1`` are of
    image ``i``."""
    from PIL import Image

    from .backends import _to_pil

    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}.")
    lo, hi = float(scale[0]), float(scale[1])
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}.")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    crops = []
    for image in images:
        img = _to_pil(image)
        w, h = img.size
        for _ in range(n_views):
            side = min(max(1, int(round(np.sqrt(rng.uniform(lo, hi) * w * h)))), w, h)
            x0 = int(rng.integers(0, w - side + 1))
            y0 = int(rng.integers(0, h - side + 1))
            crop = img.crop((x0, y0, x0 + side, y0 + side))
            if flip and rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crops.append(crop)
    return crops


def embed_crops(encoder: DualEncoder, crops: list, n_images: int, local: bool = False, batch_size: int = 64):
    """Embed what `random_crops` returned: ``(global (N, V, D), local (N, V, P, D) or None)``."""
    g_out, l_out = [], []
    for s in range(0, len(crops), batch_size):
        g, loc = encoder.encode_images(encoder.preprocess(crops[s:s + batch_size]), local=local)
        g_out.append(g)
        if local:
            l_out.append(loc)
    g = np.concatenate(g_out).reshape(n_images, len(crops) // n_images, -1)
    loc = np.concatenate(l_out).reshape(*g.shape[:2], *l_out[0].shape[1:]) if local else None
    return g, loc


def crop_views(encoder: DualEncoder, images: Sequence[Any], n_views: int = 16, scale=(0.08, 1.0),
               seed: int = 0, local: bool = False, batch_size: int = 64, flip: bool = True):
    """`random_crops` embedded by `embed_crops`: ``(global (N, V, D), local (N, V, P, D) or None)``."""
    crops = random_crops(images, n_views, scale, seed, flip)
    return embed_crops(encoder, crops, len(images), local, batch_size)


# ---------------------------------------------------------------- results
@persistable
@dataclass
class PromptResult:
    """What a prompt-tuning run produced. ``arrays`` hold numeric arrays only."""

    method: str
    class_names: list[str]
    arrays: dict[str, np.ndarray]
    neg_words: list[str] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    encoder: str = ""

    def __post_init__(self) -> None:
        for k, v in self.arrays.items():
            a = np.asarray(v)
            if a.dtype.kind not in "biuf":
                raise ValueError(f"PromptResult array {k!r} has dtype {a.dtype}; only numeric arrays are saved.")
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise ValueError(f"PromptResult array {k!r} contains NaN or inf: the tuning diverged "
                                 "(lower the learning rate).")
            self.arrays[k] = a

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise KeyError(f"{self.method} prompts have no array {key!r}; they hold {sorted(self.arrays)}.")
        return self.arrays[key]


def save_prompts(result: PromptResult, path: str | Path) -> Path:
    """Write ``result`` to the directory ``path`` (safetensors + JSON + SHA-256 manifest)."""
    from ..persistence import write_bundle

    doc = {"format": PROMPTS_FORMAT, "format_version": PROMPTS_VERSION, "method": result.method,
           "class_names": list(result.class_names), "neg_words": result.neg_words,
           "config": result.config, "history": result.history, "encoder": result.encoder,
           "arrays": sorted(result.arrays)}
    json.dumps(doc, allow_nan=False)  # fail before writing anything if the config is not JSON
    return write_bundle(path, doc, {k: np.ascontiguousarray(v) for k, v in result.arrays.items()})


def load_prompts(path: str | Path) -> PromptResult:
    """Read what `save_prompts` wrote; the manifest is verified first."""
    from ..persistence import read_bundle

    doc, arrays = read_bundle(path)
    if doc.get("format") != PROMPTS_FORMAT:
        raise ValueError(f"{path}: not saved prompts (format {doc.get('format')!r}); write them with "
                         "oodscope.vlm.prompts.save_prompts or `oodscope train-prompts`.")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > PROMPTS_VERSION:
        raise ValueError(f"{path}: prompts format version {version!r} is not readable by this oodscope "
                         f"(reads <= {PROMPTS_VERSION}).")
    listed = doc.get("arrays")
    if not isinstance(listed, list) or sorted(listed) != sorted(arrays):
        raise ValueError(f"{path}: the document lists arrays {listed} but the file holds {sorted(arrays)}.")
    names = doc.get("class_names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path}: class_names must be a non-empty list of strings.")
    neg = doc.get("neg_words")
    if neg is not None and not (isinstance(neg, list) and all(isinstance(w, str) for w in neg)):
        raise ValueError(f"{path}: neg_words must be a list of strings or null.")
    return PromptResult(method=str(doc.get("method")), class_names=names, arrays=dict(arrays), neg_words=neg,
                        config=doc.get("config") or {}, history=doc.get("history") or [],
                        encoder=str(doc.get("encoder", "")))


def as_prompt_result(prompts: Any, method: str | None = None) -> PromptResult:
    """A `PromptResult` from itself or a saved directory; checks the method when given."""
    res = prompts if isinstance(prompts, PromptResult) else load_prompts(prompts)
    if method is not None and res.method != method:
        raise ValueError(f"These prompts were tuned with {res.method!r}, not {method!r}; use the "
                         f"{res.method!r} detector with them.")
    return res
