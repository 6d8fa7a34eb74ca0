"""Text detectors that read the raw text.

Texts travel in ``Features.extras["text"]`` as a numpy unicode array (``dtype '<U…'``), which
`Features.save` stores without pickle; `oodscope.text.extract(..., keep_text=True)` and
`oodscope.text.text_array` build it. Embedding-based text OOD detection needs no special
detector: text `Features` carry embeddings, logits and the head, so every other family works.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..features import Features
from .base import Detector, register

__all__ = ["LMLikelihoodRatio"]


def _texts(f: Features, who: str) -> list[str]:
    arr = f.extras["text"]
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise ValueError(
            f"{who}: extras['text'] must be a 1-D numpy string array (dtype '<U…'), got "
            f"shape {arr.shape} dtype {arr.dtype}; build it with oodscope.text.text_array(texts)."
        )
    return [str(t) for t in arr.tolist()]


class _FitRequirements:
    """``fit`` needs ID text only when it has to fine-tune the LM itself; with a given
    fine-tuned model ``fit()`` may be called without data."""

    def __get__(self, obj: Any, cls: type) -> Any:
        if obj is not None and obj.finetuned_model is not None:
            return lambda: frozenset()
        return lambda: frozenset({"text"})


@register("lm_ratio", "llm_ratio", "likelihood_ratio")
class LMLikelihoodRatio(Detector):
    """Likelihood ratio of a fine-tuned and a base causal LM:
    ``S(x) = log p_finetuned(x) - log p_base(x)`` (higher = more in-distribution).

    Parameters
    ----------
    base_model : str or transformers causal LM
        The pretrained LM (name/path or loaded model).
    finetuned_model : str, causal LM or None
        The same LM fine-tuned on in-distribution text. ``None``: ``fit(train)`` fine-tunes a
        copy of ``base_model`` on ``train.extras["text"]`` (LoRA if peft is installed).
    tokenizer : str or tokenizer, optional
        Shared tokenizer (defaults to ``base_model`` when that is a name/path).
    reduction : "mean" or "total"
        Per-token mean log-likelihood difference, or the sum over tokens.
    finetune_steps, finetune_lr, finetune_batch_size, lora : fine-tuning in ``fit``.
    batch_size, max_length, device : scoring.
    """

    requires = frozenset({"text"})
    fit_fields = frozenset({"text"})
    fit_requirements = _FitRequirements()
    search_space: dict[str, list[Any]] = {}
    reference = ("Zhang et al. (2024), Your Finetuned Large Language Model is Already a Powerful "
                 "Out-of-distribution Detector")

    def __init__(self, base_model: Any = None, finetuned_model: Any = None, tokenizer: Any = None,
                 reduction: str = "mean", finetune_steps: int = 200, finetune_lr: float = 1e-4,
                 finetune_batch_size: int = 8, lora: bool | None = None, batch_size: int = 16,
                 max_length: int = 128, device: str = "cpu"):
        self.base_model = base_model
        self.finetuned_model = finetuned_model
        self.tokenizer = tokenizer
        self.reduction = reduction
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr
        self.finetune_batch_size = finetune_batch_size
        self.lora = lora
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device

    def _check_params(self) -> None:
        if self.base_model is None:
            raise ValueError("lm_ratio needs base_model= (a Hugging Face causal LM or its name/path).")
        if self.reduction not in ("mean", "total"):
            raise ValueError(f"reduction must be 'mean' or 'total', got {self.reduction!r}.")
        if int(self.max_length) < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {self.max_length}.")

    def _fit(self, train: Features | None) -> None:
        from ..text.lm import finetune_causal_lm, load_causal_lm

        base, tok = load_causal_lm(self.base_model, self.tokenizer, self.device)
        if self.finetuned_model is not None:
            finetuned, _ = load_causal_lm(self.finetuned_model, tok, self.device)
        else:
            if train is None:
                raise ValueError(
                    "lm_ratio without finetuned_model= fine-tunes the base LM in fit(train); pass "
                    "in-distribution Features with extras['text'] (oodscope.text.extract(..., keep_text=True))."
                )
            finetuned = finetune_causal_lm(
                base, tok, _texts(train, "lm_ratio.fit"), steps=self.finetune_steps, lr=self.finetune_lr,
                batch_size=self.finetune_batch_size, max_length=self.max_length, lora=self.lora,
                device=self.device, progress=False)
        self.base_, self.finetuned_, self.tokenizer_ = base, finetuned, tok

    _MODELS = ("base_", "finetuned_", "tokenizer_")

    def get_state(self) -> dict[str, Any]:
        """The loaded LMs are not data: the base LM (and a given fine-tuned one) are reloaded
        from their parameters; an LM fine-tuned in ``fit`` is saved as config + weights."""
        state = {k: v for k, v in super().get_state().items() if k not in self._MODELS}
        if self.finetuned_model is None:
            model = self.finetuned_
            if hasattr(model, "merge_and_unload"):  # LoRA: save the merged weights
                import copy

                model = copy.deepcopy(model).merge_and_unload()
            state["finetuned_config_"] = model.config.to_dict()
            state["finetuned_weights_"] = dict(model.state_dict())
        return state

    def set_state(self, state: dict[str, Any]) -> "LMLikelihoodRatio":
        from ..text.lm import load_causal_lm

        state = dict(state)
        config, weights = state.pop("finetuned_config_", None), state.pop("finetuned_weights_", None)
        super().set_state(state)
        if self.base_model is None:
            raise ValueError("lm_ratio was saved with a loaded base LM object; pass it back: "
                             "oodscope.load(path, base_model=..., tokenizer=...).")
        base, tok = load_causal_lm(self.base_model, self.tokenizer, self.device)
        if weights is None:
            finetuned, _ = load_causal_lm(self.finetuned_model, tok, self.device)
        else:
            import transformers as tr  # present: the base LM above was loaded with it

            config = dict(config)
            cfg = tr.AutoConfig.for_model(config.pop("model_type"), **config)
            finetuned = tr.AutoModelForCausalLM.from_config(cfg)
            finetuned.load_state_dict(weights)
            finetuned = finetuned.to(self.device).eval()
        self.base_, self.finetuned_, self.tokenizer_ = base, finetuned, tok
        return self

    def _score(self, x: Features) -> np.ndarray:
        from ..text.lm import likelihood_ratio

        return likelihood_ratio(self.base_, self.finetuned_, self.tokenizer_, _texts(x, "lm_ratio.score"),
                                reduction=self.reduction, batch_size=self.batch_size,
                                max_length=self.max_length, device=self.device)
