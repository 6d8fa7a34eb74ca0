"""Vision-language (CLIP-like) models for zero-shot OOD detection.

>>> import oodscope as ood
>>> clip = ood.vlm.load("hf:openai/clip-vit-base-patch16")   # or "open_clip:ViT-B-16/laion2b_s34b_b88k"
>>> det = ood.create("neglabel", encoder=clip, class_names=names).fit()   # mines negatives
>>> scores = det.score(ood.vlm.extract(clip, images))        # Features with image embeddings

Detectors (in `oodscope.detectors.vlm`): ``mcm``, ``glmcm``, ``neglabel``, ``adaneg``,
``clipn``, ``cooked``. Tuned prompts (`oodscope.vlm.prompt_tuning`, ``oodscope train-prompts``):
``lapt``, ``local_prompt``, ``krnft``, ``cma``. Foundation-model methods
(`oodscope.vlm.synood`, `oodscope.vlm.ants`, `oodscope.vlm.tagood`, pluggable MLLMs in
`oodscope.vlm.mllm`): ``synood``, ``ants``, ``tagood``. torch / transformers / open_clip are imported only when a model is
loaded or run.
"""

from __future__ import annotations

from .backends import (
    DualEncoder,
    HFCLIPEncoder,
    OpenCLIPEncoder,
    available_backends,
    load,
    preprocess_images,
)
from .extract import extract
from .wordnet import load_word_list, read_wordnet_data, wordnet_words

__all__ = [
    "DualEncoder",
    "HFCLIPEncoder",
    "OpenCLIPEncoder",
    "available_backends",
    "extract",
    "load",
    "load_word_list",
    "preprocess_images",
    "read_wordnet_data",
    "wordnet_words",
]
