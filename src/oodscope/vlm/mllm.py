"""Pluggable multimodal-LLM "describers" for the foundation-model methods (ANTS, SynOOD).

A describer answers three questions the methods ask an MLLM:

* `Describer.describe` — a short description of each (OOD-looking) test image, avoiding
  its predicted ID class: ANTS turns these into far-OOD negative labels;
* `Describer.similar_labels` — class names that look like a given ID class but are not it:
  ANTS's near-OOD negative labels;
* `Describer.context` — the scene elements of an image other than its main subject:
  SynOOD's in-painting prompt ("A photo only remain {context}.").

Two implementations:

* `HFVisionLanguageDescriber` loads a local Hugging Face image-text-to-text checkpoint
  (LLaVA-1.5-7B is ANTS's default; Qwen2-VL, BLIP-2 and SmolVLM are its alternatives) and
  asks the authors' prompts. It needs the images themselves (PIL / arrays).
* `RuleBasedDescriber` is the offline stand-in used in tests: it answers from a word list
  embedded by the same dual encoder (nearest words to an image embedding, nearest words to a
  class name), so the methods' plumbing runs without an MLLM. Its answers are retrieval, not
  generation: results with it say nothing about the papers' numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["Describer", "HFVisionLanguageDescriber", "RuleBasedDescriber", "parse_numbered_list"]

#: the authors' prompts (ANTS: OpenOOD-VLM ants_postprocessor; SynOOD: context extraction)
DESCRIBE_PROMPT = "Provide a short and concise description of this image less than eight words, don't include {}."
SIMILAR_PROMPT = "Give me {k} different class names that share similar visual features with {c}, don't contain {c}."
CONTEXT_PROMPT = ("List the objects and scene elements in this image other than the {}, separated by commas. "
                  "Do not mention the {}.")


class Describer:
    """Interface. ``images`` may be None when only embeddings are at hand; an implementation
    that needs pixels raises ValueError then."""

    def describe(self, images: Sequence[Any] | None, embeds: np.ndarray, avoid: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def similar_labels(self, class_names: Sequence[str], k: int = 5) -> list[list[str]]:
        raise NotImplementedError

    def context(self, images: Sequence[Any] | None, embeds: np.ndarray, subjects: Sequence[str]) -> list[str]:
        raise NotImplementedError


def _contains(word: str, name: str) -> bool:
    return name.strip().casefold() in word.casefold() or word.strip().casefold() in name.casefold()


class RuleBasedDescriber(Describer):
    """Answers by retrieval from ``words`` embedded with ``embed`` (``texts -> (n, D)``,
    e.g. ``encoder.encode_text``): the offline stand-in for an MLLM.

    * describe: the ``n_words`` words nearest to the image embedding, skipping any that
      contains (or is contained in) the name to avoid, joined by " and ";
    * similar_labels: the ``k`` words nearest to the class name's embedding, skipping the
      name itself;
    * context: the words nearest to the image embedding after its component along the
      subject's text embedding is removed, comma-separated.
    """

    def __init__(self, words: Sequence[str], embed: Callable[[list[str]], np.ndarray], n_words: int = 2):
        self.words = [str(w) for w in words]
        if not self.words:
            raise ValueError("RuleBasedDescriber needs a non-empty word list.")
        self.embed = embed
        self.n_words = int(n_words)
        self._w = self._unit(np.asarray(embed(self.words), dtype=np.float64))

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def _nearest(self, vec: np.ndarray, avoid: str, k: int) -> list[str]:
        order = np.argsort(-(self._w @ vec), kind="stable")
        out = [self.words[i] for i in order if not _contains(self.words[i], avoid)]
        return out[:k]

    def describe(self, images, embeds, avoid):
        e = self._unit(np.asarray(embeds, dtype=np.float64))
        return [" and ".join(self._nearest(v, a, self.n_words)) for v, a in zip(e, avoid)]

    def similar_labels(self, class_names, k=5):
        t = self._unit(np.asarray(self.embed(list(class_names)), dtype=np.float64))
        return [self._nearest(v, c, k) for v, c in zip(t, class_names)]

    def context(self, images, embeds, subjects):
        e = self._unit(np.asarray(embeds, dtype=np.float64))
        s = self._unit(np.asarray(self.embed(list(subjects)), dtype=np.float64))
        rest = e - np.sum(e * s, axis=1, keepdims=True) * s
        return [", ".join(self._nearest(self._unit(v), c, self.n_words)) for v, c in zip(rest, subjects)]


def parse_numbered_list(answer: str) -> list[str]:
    """Items of an answer written as "1. a\\n2. b" or "1. a 2. b" or "a, b, c"."""
    text = answer.strip()
    items = [m.strip(" .,;") for m in re.split(r"(?:^|\s)\d+[.)]\s*", text) if m.strip(" .,;")]
    if len(items) <= 1 and "," in text:
        items = [p.strip(" .") for p in text.split(",") if p.strip(" .")]
    return items


class HFVisionLanguageDescriber(Describer):
    """A local Hugging Face image-text-to-text model (``AutoModelForImageTextToText``) with
    its processor's chat template, asked the authors' prompts, greedy decoding.

    ``path``: a checkpoint directory (e.g. a downloaded ``llava-hf/llava-1.5-7b-hf``).
    Near-OOD labels are asked about a blank 28x28 image, as the authors' Qwen variant does.
    Not run in this repository's tests (no MLLM weights here); `parse_numbered_list` is.
    """

    def __init__(self, path: str, device: str = "cpu", max_new_tokens: int = 40, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, torch_dtype=getattr(torch, dtype))
        self.model = self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = int(max_new_tokens)

    def _ask(self, image, question: str) -> str:
        import torch

        from .backends import _to_pil

        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(chat, add_generation_prompt=True)
        inputs = self.processor(images=_to_pil(image), text=prompt, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.processor.decode(new, skip_special_tokens=True).strip()

    def _need_images(self, images, what: str):
        if images is None:
            raise ValueError(f"{type(self).__name__}.{what} needs the images; keep them next to the embeddings "
                             "(e.g. Features(extras={'image_embeds': ..., 'images': uint8 array})).")
        return images

    def describe(self, images, embeds, avoid):
        images = self._need_images(images, "describe")
        return [self._ask(img, DESCRIBE_PROMPT.format(a)).rstrip(".") for img, a in zip(images, avoid)]

    def similar_labels(self, class_names, k=5):
        blank = np.zeros((28, 28, 3), np.uint8)
        out = []
        for c in class_names:
            items = parse_numbered_list(self._ask(blank, SIMILAR_PROMPT.format(k=k, c=c)))
            out.append([i for i in items if not _contains(i, c)][:k])
        return out

    def context(self, images, embeds, subjects):
        images = self._need_images(images, "context")
        return [self._ask(img, CONTEXT_PROMPT.format(s, s)) for img, s in zip(images, subjects)]
