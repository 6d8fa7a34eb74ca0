"""Dual-encoder (CLIP-like) backends behind one small interface.

A backend turns images into L2-normalised embeddings in the joint image-text space (plus,
on request, local patch embeddings projected into the same space) and turns texts into
L2-normalised embeddings, averaging over prompt templates. Two implementations:

* `HFCLIPEncoder`: Hugging Face ``transformers`` CLIP models (no torchvision needed);
* `OpenCLIPEncoder`: ``open_clip`` models (imported lazily; open_clip pulls torchvision, so
  it is the user's install).

`load` resolves a model string: ``"hf:openai/clip-vit-base-patch16"``,
``"open_clip:ViT-B-16/laion2b_s34b_b88k"``, or a local directory holding an HF CLIP
checkpoint (``config.json``). Image preprocessing (resize, centre crop, normalise) is done
with PIL and numpy.

Local tokens follow the "value path" used by GL-MCM / LoCoOp (after MaskCLIP): the last
transformer block's attention is replaced by its value projection for every patch token,
then the block's residual + MLP, the final layer norm and the visual projection apply as
for the class token. ``local_mode="tokens"`` instead projects the plain last-block patch
tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DualEncoder",
    "HFCLIPEncoder",
    "OpenCLIPEncoder",
    "available_backends",
    "load",
    "preprocess_images",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------- preprocessing
def _to_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"Cannot read an image of shape {arr.shape}; pass PIL images, HxW / HxWx3 arrays "
            "or 3xHxW tensors."
        )
    if arr.dtype.kind == "f":
        if arr.size and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
            raise ValueError(
                "Float images must hold values in [0, 1] (raw pixels, not normalised); got "
                f"range [{arr.min():.3g}, {arr.max():.3g}]. Pass preprocessed=True to "
                "vlm.extract if the images are already CLIP-normalised tensors."
            )
        arr = np.round(arr * 255.0)
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert("RGB")


def preprocess_images(
    images: Sequence[Any] | np.ndarray,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """CLIP preprocessing with PIL: resize the short side (bicubic), centre crop, normalise.

    Accepts PIL images, uint8 arrays (HxW or HxWx3), float arrays in [0, 1], or CHW tensors.
    Returns a float32 array (N, 3, size, size).
    """
    from PIL import Image

    if hasattr(images, "ndim") and images.ndim < 3:
        raise ValueError(
            f"preprocess_images takes a batch (first axis = samples), got shape {tuple(images.shape)}; "
            "wrap a single image in a list."
        )
    images = list(images)
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    for i, image in enumerate(images):
        img = _to_pil(image)
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out[i] = (arr - m) / s
    return out


# ---------------------------------------------------------------- interface
class DualEncoder:
    """Interface of a CLIP-like model. Subclasses implement the three ``_encode*`` hooks.

    Attributes: ``name`` (identifies the model in caches and reports), ``embed_dim``,
    ``image_size``, ``logit_scale`` (the model's learned inverse temperature, ~100 for CLIP).
    ``cache_dir`` (optional) makes `encode_text` cache text embeddings on disk.
    """

    name: str = "dual-encoder"
    embed_dim: int = 0
    image_size: int = 224
    logit_scale: float = 100.0
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    cache_dir: str | Path | None = None
    device: str = "cpu"

    def _init_common(self, model, tokenizer, name, device, local_mode, cache_dir) -> None:
        """State every backend shares: the model in eval mode on ``device``, its tokenizer,
        the local-token mode, the cache folder and CLIP's learned logit scale."""
        _check_local_mode(local_mode)
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.local_mode = local_mode
        self.cache_dir = cache_dir
        self.logit_scale = float(model.logit_scale.detach().exp().item())

    # -- hooks
    def _encode_pixels(self, pixels, local: bool):  # -> (global (N,D) tensor, local (N,P,D) or None)
        raise NotImplementedError

    def _encode_tokens(self, texts: list[str]):  # -> (N, D) tensor (not normalised)
        raise NotImplementedError

    def _fingerprint(self) -> str:
        return self.name

    # -- public
    @property
    def fingerprint(self) -> str:
        """Identifies the weights (for caches)."""
        fp = getattr(self, "_fp_cache", None)
        if fp is None:
            fp = self._fingerprint()
            self._fp_cache = fp
        return fp

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        return preprocess_images(images, self.image_size, self.mean, self.std)

    def encode_images(self, pixels, local: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Embed preprocessed pixels (N, 3, S, S): L2-normalised global (N, D) float32 and,
        with ``local=True``, L2-normalised local patch embeddings (N, P, D)."""
        torch = _torch()
        x = torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, torch.Tensor) else pixels)
        x = x.float().to(self.device)
        with torch.no_grad():
            g, loc = self._encode_pixels(x, local)
            g = torch.nn.functional.normalize(g.float(), dim=-1).cpu().numpy()
            if loc is not None:
                loc = torch.nn.functional.normalize(loc.float(), dim=-1).cpu().numpy()
        return g, (loc if local else None)

    def encode_text(
        self,
        texts: Sequence[str],
        templates: Sequence[str] = ("{}",),
        batch_size: int = 256,
        progress: bool = False,
    ) -> np.ndarray:
        """L2-normalised text embeddings (N, D) float32, averaged over prompt templates
        (each template's embedding is normalised before the mean, as in CLIP's ensembling).

        Results are cached in memory per (model, texts, templates) and on disk when
        ``cache_dir`` is set, so several detectors share one pass of the text tower.
        """
        texts = [str(t) for t in texts]
        templates = list(templates)
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"templates must be a non-empty list of strings with '{{}}', got {templates}.")
        if len(texts) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        key = hashlib.sha256(
            json.dumps([self.fingerprint, texts, templates]).encode("utf-8")
        ).hexdigest()[:32]
        mem = self.__dict__.setdefault("_text_cache", {})
        if key in mem:
            return mem[key]
        path = Path(self.cache_dir) / f"text-{key}.npy" if self.cache_dir is not None else None
        if path is not None and path.exists():
            out = np.load(path, allow_pickle=False)
            mem[key] = out
            return out
        torch = _torch()
        from tqdm.auto import tqdm

        acc = np.zeros((len(texts), self.embed_dim), dtype=np.float64)
        total = len(texts) * len(templates)
        bar = tqdm(total=total, desc="encode text", disable=not progress, leave=False)
        for template in templates:
            prompts = [template.format(t) for t in texts]
            for i in range(0, len(prompts), batch_size):
                with torch.no_grad():
                    emb = self._encode_tokens(prompts[i : i + batch_size]).float()
                    emb = torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()
                acc[i : i + len(emb)] += emb
                bar.update(len(emb))
        bar.close()
        acc /= np.maximum(np.linalg.norm(acc, axis=1, keepdims=True), 1e-12)
        out = acc.astype(np.float32)
        mem[key] = out
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, out, allow_pickle=False)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, embed_dim={self.embed_dim})"


def _state_fingerprint(module) -> str:
    from ..extraction import model_fingerprint

    return model_fingerprint(module)


# ---------------------------------------------------------------- Hugging Face
def _check_local_mode(local_mode: str) -> None:
    if local_mode not in ("value", "tokens"):
        raise ValueError(f"local_mode must be 'value' or 'tokens', got {local_mode!r}.")


class HFCLIPEncoder(DualEncoder):
    """A ``transformers`` CLIP model (``CLIPModel``) plus a tokenizer.

    Parameters
    ----------
    model : transformers.CLIPModel
    tokenizer : a callable HF tokenizer (``tokenizer(texts, padding=..., return_tensors="pt")``)
    name : identifier for caches and reports.
    image_size, mean, std : preprocessing; read from ``preprocessor_config.json`` by
        `from_pretrained`, CLIP defaults otherwise.
    local_mode : ``"value"`` (GL-MCM value path) or ``"tokens"`` (plain patch tokens).
    """

    def __init__(self, model, tokenizer, name: str = "hf-clip", image_size: int | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 device: str = "cpu", local_mode: str = "value", cache_dir: str | Path | None = None):
        self._init_common(model, tokenizer, name, device, local_mode, cache_dir)
        cfg = model.config
        self.embed_dim = int(cfg.projection_dim)
        self.image_size = int(image_size or cfg.vision_config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_length = int(cfg.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str = "cpu", **kwargs: Any) -> HFCLIPEncoder:
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        size, mean, std = None, CLIP_MEAN, CLIP_STD
        cfg_file = Path(name_or_path) / "preprocessor_config.json"
        if not cfg_file.exists():
            try:
                from huggingface_hub import hf_hub_download

                cfg_file = Path(hf_hub_download(name_or_path, "preprocessor_config.json"))
            except Exception:  # offline or no such file: CLIP defaults below
                cfg_file = None
        if cfg_file is not None and Path(cfg_file).exists():
            pc = json.loads(Path(cfg_file).read_text())
            crop = pc.get("crop_size")
            size = crop.get("height") if isinstance(crop, dict) else crop
            mean = tuple(pc.get("image_mean", mean))
            std = tuple(pc.get("image_std", std))
        return cls(model, tokenizer, name=f"hf:{name_or_path}", image_size=size, mean=mean,
                   std=std, device=device, **kwargs)

    def _fingerprint(self) -> str:
        return f"{self.name}:{_state_fingerprint(self.model)}"

    def _encode_pixels(self, pixels, local: bool):
        vision = self.model.vision_model
        layers = vision.encoder.layers
        captured = {}
        hook = None
        if local:
            hook = layers[-1].register_forward_pre_hook(
                lambda m, args, kwargs: captured.__setitem__("h", args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True,
            )
        try:
            out = vision(pixel_values=pixels, return_dict=True)
        finally:
            if hook is not None:
                hook.remove()
        proj = self.model.visual_projection
        g = proj(out.pooler_output)
        loc = None
        if local:
            if self.local_mode == "value":
                h = captured["h"]
                last = layers[-1]
                attn = last.self_attn
                v = attn.out_proj(attn.v_proj(last.layer_norm1(h)))
                x = h + v
                x = x + last.mlp(last.layer_norm2(x))
            else:
                x = out.last_hidden_state
            loc = proj(vision.post_layernorm(x[:, 1:, :]))
        return g, loc

    def _encode_tokens(self, texts: list[str]):
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        text = self.model.text_model(
            input_ids=tok["input_ids"].to(self.device),
            attention_mask=tok.get("attention_mask").to(self.device) if tok.get("attention_mask") is not None else None,
            return_dict=True,
        )
        return self.model.text_projection(text.pooler_output)


# ---------------------------------------------------------------- open_clip
class OpenCLIPEncoder(DualEncoder):
    """An ``open_clip`` model (``open_clip.create_model_and_transforms``); imported lazily.

    Local tokens are computed for ViT image towers only (``model.visual.transformer``).
    """

    def __init__(self, model, tokenizer, name: str = "open_clip", image_size: int | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 device: str = "cpu", local_mode: str = "value", cache_dir: str | Path | None = None):
        self._init_common(model, tokenizer, name, device, local_mode, cache_dir)
        visual = model.visual
        size = image_size or getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(getattr(visual, "image_mean", None) or mean)
        self.std = tuple(getattr(visual, "image_std", None) or std)
        with _torch().no_grad():
            probe = model.encode_text(tokenizer(["a"]).to(device))
        self.embed_dim = int(probe.shape[-1])

    @classmethod
    def from_pretrained(cls, arch: str, pretrained: str | None = None, device: str = "cpu",
                        **kwargs: Any) -> OpenCLIPEncoder:
        import open_clip

        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(arch)
        name = f"open_clip:{arch}" + (f"/{pretrained}" if pretrained else "")
        return cls(model, tokenizer, name=name, device=device, **kwargs)

    def _fingerprint(self) -> str:
        return f"{self.name}:{_state_fingerprint(self.model)}"

    def _encode_pixels(self, pixels, local: bool):
        torch = _torch()
        visual = self.model.visual
        if not local:
            return self.model.encode_image(pixels), None
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None:
            raise ValueError(
                f"{self.name}: local tokens need a ViT image tower (visual.transformer.resblocks); "
                "use local=False with this model."
            )
        captured = {}
        hook = blocks[-1].register_forward_pre_hook(
            lambda m, args, kwargs: captured.__setitem__("h", args[0] if args else kwargs["q_x"]),
            with_kwargs=True,
        )
        try:
            g = self.model.encode_image(pixels)
        finally:
            hook.remove()
        h = captured["h"]
        last = blocks[-1]
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            h = h.transpose(0, 1)
        if self.local_mode == "value":
            attn = last.attn
            d = h.shape[-1]
            w_v = attn.in_proj_weight[2 * d :]
            b_v = attn.in_proj_bias[2 * d :] if attn.in_proj_bias is not None else None
            v = torch.nn.functional.linear(last.ln_1(h), w_v, b_v)
            v = attn.out_proj(v)
            ls1 = getattr(last, "ls_1", None)
            x = h + (ls1(v) if ls1 is not None else v)
            m = last.mlp(last.ln_2(x))
            ls2 = getattr(last, "ls_2", None)
            x = x + (ls2(m) if ls2 is not None else m)
        else:
            x = last(h)
        x = visual.ln_post(x[:, 1:, :])
        if visual.proj is not None:
            x = x @ visual.proj
        return g, x

    def _encode_tokens(self, texts: list[str]):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


# ---------------------------------------------------------------- resolver
def available_backends() -> dict[str, bool]:
    """Which backends can be imported here."""
    return {
        "hf (transformers)": importlib.util.find_spec("transformers") is not None,
        "open_clip": importlib.util.find_spec("open_clip") is not None,
    }


def _installed_hint() -> str:
    avail = available_backends()
    have = [k for k, v in avail.items() if v] or ["none"]
    missing = [k for k, v in avail.items() if not v]
    hint = f"Installed backends: {', '.join(have)}."
    if missing:
        hint += f" Not installed: {', '.join(missing)}."
    return hint


def load(spec: str | DualEncoder, device: str = "cpu", cache_dir: str | Path | None = None,
         **kwargs: Any) -> DualEncoder:
    """Resolve a dual encoder from a string (or return a `DualEncoder` unchanged).

    * ``"hf:<hub id or local dir>"``: Hugging Face ``transformers`` CLIP;
    * ``"open_clip:<arch>[/<pretrained tag or checkpoint file>]"``: open_clip;
    * a local directory with a ``config.json``: Hugging Face CLIP.
    """
    if isinstance(spec, DualEncoder):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"vlm.load needs a model string such as 'hf:openai/clip-vit-base-patch16', got {spec!r}.")
    spec = spec.strip()
    backend, _, rest = spec.partition(":")
    backend = backend.lower()
    if backend in ("hf", "huggingface", "transformers") and rest:
        if not available_backends()["hf (transformers)"]:
            raise ValueError(f"Cannot load {spec!r}: transformers is not installed. {_installed_hint()}")
        try:
            enc = HFCLIPEncoder.from_pretrained(rest, device=device, cache_dir=cache_dir, **kwargs)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"Cannot load the Hugging Face CLIP model {rest!r}: {exc}. Give a hub id "
                "(needs network or a warm HF cache) or a local directory with config.json, "
                f"model weights and tokenizer files. {_installed_hint()}"
            ) from exc
        return enc
    if backend in ("open_clip", "openclip") and rest:
        if not available_backends()["open_clip"]:
            raise ValueError(
                f"Cannot load {spec!r}: open_clip is not installed (pip install open_clip_torch; "
                f"it needs torchvision). {_installed_hint()}"
            )
        arch, _, pretrained = rest.partition("/")
        return OpenCLIPEncoder.from_pretrained(arch, pretrained or None, device=device,
                                               cache_dir=cache_dir, **kwargs)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        return load(f"hf:{path}", device=device, cache_dir=cache_dir, **kwargs)
    raise ValueError(
        f"Cannot resolve the vision-language model {spec!r}. Use 'hf:<hub id or dir>', "
        "'open_clip:<arch>/<pretrained>', or a local directory with an HF CLIP checkpoint "
        f"(config.json). {_installed_hint()}"
    )
