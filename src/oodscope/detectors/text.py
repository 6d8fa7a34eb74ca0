"""Text detectors that read the raw text.

Texts travel in ``Features.extras["text"]`` as a numpy unicode array (``dtype '<U…'``), which
`Features.save` stores without pickle; `oodscope.text.extract(..., keep_text=True)` and
`oodscope.text.text_array` build it. Embedding-based text OOD detection needs no special
detector: text `Features` carry embeddings, logits and the head, so every other family works.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._params import store_params
from ..features import Features
from .base import Detector, register

__all__ = ["LMLikelihoodRatio", "MLKD"]


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
        store_params(self, locals())

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


@register("mlkd")
class MLKD(Detector):
    """MLKD (Wu et al., ACL 2023): a causal-LM student distilled from a frozen teacher on
    in-distribution text only (prediction-layer KL + similarity-based intermediate-layer
    distillation); scored by the student's perplexity (``S = −log PPL``, the ranking of
    ``−PPL``) or by the distillation distance itself. See `oodscope.text.mlkd`.

    Parameters
    ----------
    teacher_model : causal LM, encoder, name/path, or ``"minilm"``
        The teacher (the paper: GPT-2 fine-tuned on ID text). ``"minilm"``: the packaged
        all-MiniLM-L6-v2 encoder — no LM head, so it teaches the intermediate layers only and
        the student also learns with its own LM loss (``lm_weight``); that is our offline
        stand-in for a pretrained GPT-2, not the paper's setting.
    tokenizer : the teacher's tokenizer (defaults to ``teacher_model`` when it is a name).
    finetune_teacher_steps : > 0 fine-tunes a copy of a causal teacher on the ID text in
        ``fit`` first (the paper's first stage); 0 uses the teacher as given.
    student : GPT-2 config overrides for the student (``None``: the teacher's own size when
        it is a GPT-2, else 4 layers × 256).
    steps, lr, batch_size, temperature, n_best, hidden_weight, lm_weight : distillation
        (paper: lr 5e-5, batch 8–16, τ = 1 (0.5 on SST), the 2 best teacher layers, no LM loss).
    scoring : ``"perplexity"`` (paper) or ``"distillation"``.
    """

    requires = frozenset({"text"})
    fit_fields = frozenset({"text"})
    search_space: dict[str, list[Any]] = {}
    reference = ("Wu et al., Multi-Level Knowledge Distillation for Out-of-Distribution Detection in Text, "
                 "ACL 2023 (code: microsoft/KC papers/MLKD_OOD)")

    def __init__(self, teacher_model: Any = None, tokenizer: Any = None, finetune_teacher_steps: int = 0,
                 student: dict | None = None, steps: int = 1000, lr: float = 5e-5, batch_size: int = 16,
                 temperature: float = 1.0, n_best: int = 2, hidden_weight: float = 1.0, lm_weight: float = 0.0,
                 scoring: str = "perplexity", max_length: int = 64, seed: int = 0, device: str = "cpu"):
        store_params(self, locals())

    def _check_params(self) -> None:
        if self.teacher_model is None:
            raise ValueError("mlkd needs teacher_model= (a causal LM fine-tuned on ID text, its name/path, "
                             "or 'minilm' for the packaged encoder).")
        if self.scoring not in ("perplexity", "distillation"):
            raise ValueError(f"scoring must be 'perplexity' or 'distillation', got {self.scoring!r}.")
        for name in ("steps", "batch_size", "n_best", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if int(self.max_length) < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {self.max_length}.")
        for name in ("lr", "temperature"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        for name in ("hidden_weight", "lm_weight"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")

    def _teacher(self) -> tuple[Any, Any]:
        from ..text.lm import load_causal_lm
        from ..text.mlkd import packaged_minilm_teacher

        if isinstance(self.teacher_model, str) and self.teacher_model == "minilm":
            teacher, tok = packaged_minilm_teacher(self.device)
            return teacher, self.tokenizer if self.tokenizer is not None else tok
        return load_causal_lm(self.teacher_model, self.tokenizer, self.device)

    def _fit(self, train: Features) -> None:
        from ..text.lm import finetune_causal_lm
        from ..text.mlkd import distill_student, student_config

        texts = _texts(train, "mlkd.fit")
        teacher, tok = self._teacher()
        if self.finetune_teacher_steps:
            teacher = finetune_causal_lm(teacher, tok, texts, steps=int(self.finetune_teacher_steps), lr=self.lr,
                                         batch_size=self.batch_size, max_length=self.max_length, lora=False,
                                         seed=self.seed, device=self.device, progress=False)
        cfg = student_config(teacher, tok, self.student)
        student, projection, losses = distill_student(
            teacher, tok, texts, cfg, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
            max_length=self.max_length, temperature=self.temperature, n_best=self.n_best,
            hidden_weight=self.hidden_weight, lm_weight=self.lm_weight, seed=self.seed, device=self.device,
            progress=False)
        self.student_, self.projection_, self.tokenizer_ = student, projection, tok
        self.teacher_ = teacher if self.scoring == "distillation" else None
        self.final_loss_ = float(np.mean(losses[-20:]))

    _MODELS = ("student_", "projection_", "tokenizer_", "teacher_")

    def get_state(self) -> dict[str, Any]:
        """Models as config + weights, the tokenizer as its JSON definition: the student (and,
        for ``scoring="distillation"``, the teacher and projection) load without the teacher."""
        state = {k: v for k, v in super().get_state().items() if k not in self._MODELS}
        tok = self.tokenizer_
        state["tokenizer_json_"] = tok.backend_tokenizer.to_str()
        state["tokenizer_special_"] = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
        state["student_config_"] = self.student_.config.to_dict()
        state["student_weights_"] = dict(self.student_.state_dict())
        state["projection_weights_"] = dict(self.projection_.state_dict())
        if self.teacher_ is not None:
            state["teacher_config_"] = self.teacher_.config.to_dict()
            state["teacher_weights_"] = dict(self.teacher_.state_dict())
            state["teacher_causal_"] = bool(getattr(self.teacher_, "get_output_embeddings", lambda: None)()
                                            is not None)
        return state

    def set_state(self, state: dict[str, Any]) -> "MLKD":
        import tokenizers
        import torch
        import transformers as tr

        state = dict(state)
        pop = {k: state.pop(k, None) for k in ("tokenizer_json_", "tokenizer_special_", "student_config_",
                                               "student_weights_", "projection_weights_", "teacher_config_",
                                               "teacher_weights_", "teacher_causal_")}
        super().set_state(state)

        def build(config, weights, causal=True):
            config = dict(config)
            cfg = tr.AutoConfig.for_model(config.pop("model_type"), **config)
            model = (tr.AutoModelForCausalLM if causal else tr.AutoModel).from_config(cfg)
            model.load_state_dict(weights)
            return model.to(self.device).eval()

        self.tokenizer_ = tr.PreTrainedTokenizerFast(
            tokenizer_object=tokenizers.Tokenizer.from_str(pop["tokenizer_json_"]), **pop["tokenizer_special_"])
        self.student_ = build(pop["student_config_"], pop["student_weights_"])
        w = pop["projection_weights_"]
        self.projection_ = torch.nn.Linear(w["weight"].shape[1], w["weight"].shape[0]).to(self.device)
        self.projection_.load_state_dict(w)
        self.teacher_ = (build(pop["teacher_config_"], pop["teacher_weights_"], bool(pop["teacher_causal_"]))
                         if pop["teacher_weights_"] is not None else None)
        return self

    def _score(self, x: Features) -> np.ndarray:
        from ..text.lm import sequence_log_likelihood
        from ..text.mlkd import distillation_scores

        texts = _texts(x, "mlkd.score")
        if self.scoring == "perplexity":
            return sequence_log_likelihood(self.student_, self.tokenizer_, texts, batch_size=self.batch_size,
                                           max_length=min(int(self.max_length), self.student_.config.n_positions),
                                           device=self.device)["mean"]
        return distillation_scores(self.teacher_, self.student_, self.projection_, self.tokenizer_, texts,
                                   temperature=self.temperature, n_best=self.n_best,
                                   hidden_weight=self.hidden_weight, batch_size=self.batch_size,
                                   max_length=self.max_length, device=self.device)
