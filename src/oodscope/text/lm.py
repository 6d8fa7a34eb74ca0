"""Causal-LM likelihoods and the fine-tuned / base likelihood ratio.

Zhang, Li, Zhang et al. (2024), "Your Finetuned Large Language Model is Already a Powerful
Out-of-distribution Detector": with a base LM theta and a copy theta' fine-tuned on
in-distribution text, the score

    S(x) = log p_theta'(x) - log p_theta(x)

is high for in-distribution text (the fine-tuned model gained likelihood there) and near or
below zero elsewhere. It is reported both per token (mean log-likelihood difference) and in
total (sum over tokens). Any two Hugging Face causal LMs that share a tokenizer work;
`finetune_causal_lm` builds theta' from theta (LoRA when ``peft`` is installed, a full
fine-tune otherwise).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .data import validate_texts
from .encoders import _require

__all__ = ["finetune_causal_lm", "likelihood_ratio", "load_causal_lm", "sequence_log_likelihood"]


def load_causal_lm(model: Any, tokenizer: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from names/paths (``AutoModelForCausalLM``/``AutoTokenizer``) or
    loaded objects."""
    if isinstance(model, str):
        tr = _require("transformers")
        tokenizer = tokenizer if tokenizer is not None else model
        model = tr.AutoModelForCausalLM.from_pretrained(model)
    if isinstance(tokenizer, str):
        tokenizer = _require("transformers").AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer is None:
        raise ValueError("A loaded causal LM needs its tokenizer=... as well.")
    return model.to(device), tokenizer


def _prepare_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _start_token(tokenizer: Any) -> int | None:
    """BOS, else EOS, else CLS (BERT-style vocabularies): the token every text starts with."""
    for name in ("bos_token_id", "eos_token_id", "cls_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return tid
    return None


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids per text with a leading BOS (or EOS, or CLS) so the first word is scored
    too; returns the number of texts that had to be truncated."""
    start = _start_token(tokenizer)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out, n_cut = [], 0
    for seq in ids:
        seq = ([start] if start is not None else []) + list(seq)
        if len(seq) > max_length:
            seq, n_cut = seq[:max_length], n_cut + 1
        out.append(seq)
    return out, n_cut


def sequence_log_likelihood(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16,
                            max_length: int = 128, device: str = "cpu", progress: bool = False) -> dict[str, np.ndarray]:
    """Per-text log-likelihood under a causal LM: ``total`` (sum of token log-probs, float64),
    ``mean`` (per token) and ``n_tokens`` (scored tokens). Texts longer than ``max_length``
    tokens are truncated, with one warning."""
    import torch
    from tqdm.auto import tqdm

    texts = validate_texts(texts)
    tokenizer = _prepare_tokenizer(tokenizer)
    ids, n_cut = _encode(tokenizer, texts, int(max_length))
    if n_cut:
        warnings.warn(f"{n_cut} of {len(texts)} texts exceed max_length={max_length} tokens and were truncated.",
                      UserWarning, stacklevel=2)
    total = np.zeros(len(texts))
    count = np.zeros(len(texts), dtype=np.int64)
    order = np.argsort([len(s) for s in ids])  # similar lengths per batch: less padding
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="log-likelihood", leave=False):
                idx = order[s:s + batch_size]
                inp, mask = _pad_batch([ids[i] for i in idx], tokenizer.pad_token_id)
                inp, mask = inp.to(device), mask.to(device)
                logits = model(input_ids=inp, attention_mask=mask).logits[:, :-1].double()
                logp = torch.log_softmax(logits, dim=-1).gather(-1, inp[:, 1:, None]).squeeze(-1)
                m = mask[:, 1:].double()
                total[idx] = (logp * m).sum(1).cpu().numpy()
                count[idx] = m.sum(1).long().cpu().numpy()
    finally:
        model.train(was_training)
    if np.any(count == 0):
        raise ValueError("Some texts have no scorable token (need at least one token after BOS).")
    return {"total": total, "mean": total / count, "n_tokens": count}


def _pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` long tensors, right-padded to the longest sequence."""
    import torch

    width = max(len(s) for s in seqs)
    inp = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(inp)
    for r, s in enumerate(seqs):
        inp[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return inp, mask


def _check_pair(base: Any, finetuned: Any) -> None:
    vb = base.get_input_embeddings().num_embeddings
    vf = finetuned.get_input_embeddings().num_embeddings
    if vb != vf:
        raise ValueError(
            f"The two language models have different vocabularies ({vb} vs {vf} tokens); the "
            "likelihood ratio needs two models that share one tokenizer."
        )


def likelihood_ratio(base: Any, finetuned: Any, tokenizer: Any, texts: Sequence[str], reduction: str = "mean",
                     batch_size: int = 16, max_length: int = 128, device: str = "cpu",
                     progress: bool = False) -> np.ndarray:
    """``log p_finetuned(x) - log p_base(x)`` per text (``reduction="mean"``: per token;
    ``"total"``: summed). Higher = more in-distribution."""
    if reduction not in ("mean", "total"):
        raise ValueError(f"reduction must be 'mean' or 'total', got {reduction!r}.")
    _check_pair(base, finetuned)
    kw = dict(batch_size=batch_size, max_length=max_length, device=device, progress=progress)
    ft = sequence_log_likelihood(finetuned, tokenizer, texts, **kw)
    bs = sequence_log_likelihood(base, tokenizer, texts, **kw)
    return ft[reduction] - bs[reduction]


def finetune_causal_lm(base: Any, tokenizer: Any, texts: Sequence[str], steps: int = 200, lr: float = 1e-4,
                       batch_size: int = 8, max_length: int = 128, lora: bool | None = None, lora_rank: int = 32,
                       lora_alpha: int = 64, seed: int = 0, device: str = "cpu", progress: bool = True) -> Any:
    """A copy of ``base`` fine-tuned with the language-modelling loss on ``texts``.

    ``lora=None`` uses LoRA (rank 32, alpha 64 as in the paper) when ``peft`` is installed and
    a full fine-tune otherwise; ``True`` requires peft, ``False`` forces a full fine-tune.
    The returned model is a plain causal LM (LoRA weights merged). ``base`` is not modified.
    """
    import torch
    from tqdm.auto import tqdm

    texts = validate_texts(texts)
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    tokenizer = _prepare_tokenizer(tokenizer)
    use_lora = lora
    if lora is None or lora:
        try:
            import peft
            use_lora = True
        except ImportError:
            if lora:
                raise _missing_peft() from None
            use_lora = False
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = copy.deepcopy(base).to(device)
    if use_lora:
        import peft

        cfg = peft.LoraConfig(r=int(lora_rank), lora_alpha=int(lora_alpha), lora_dropout=0.0,
                              task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ids, _ = _encode(tokenizer, texts, int(max_length))
    eos = tokenizer.eos_token_id
    model.train()
    for _ in tqdm(range(int(steps)), disable=not progress, desc="finetune LM", leave=False):
        idx = rng.choice(len(ids), size=min(batch_size, len(ids)), replace=False)
        seqs = [ids[i] + ([eos] if eos is not None and len(ids[i]) < max_length else []) for i in idx]
        inp, mask = _pad_batch(seqs, tokenizer.pad_token_id)
        labels = inp.masked_fill(mask == 0, -100)
        out = model(input_ids=inp.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    if use_lora:
        model = model.merge_and_unload()
    return model.eval()


def _missing_peft() -> ImportError:
    return ImportError("lora=True needs the `peft` package: pip install peft (or pass lora=None/False).")
