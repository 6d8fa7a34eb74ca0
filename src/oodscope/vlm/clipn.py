"""CLIPN's trainable half: the "no" text encoder with learnable "no" prompts, its two losses,
and loading released CLIPN checkpoints.

Wang et al., "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No", ICCV 2023 (code:
xmed-lab/CLIPN). CLIPN keeps CLIP's image and text ("yes") towers frozen and adds a second
text tower, initialised from the first, that learns to say "no": for an image ``i`` and a
caption ``j``, with ``l = s·cos(img_i, yes_j)`` and ``l^no = s·cos(img_i, no_j)``,
``p_yes,ij = e^l / (e^l + e^{l^no})``.

* image-text binary-opposite loss (ITBO): ``−log p_yes,ii`` on matched pairs (averaged over
  N) and ``−log (1 − p_yes,ij)`` on unmatched ones (averaged over N² − N);
* text semantic-opposite loss (TSO): ``2 − sqrt(2 − 2·cos(yes_j, no_j) + 1e-4)``, pushing
  each caption's "no" embedding away from its "yes" embedding;
* ``L = ½ (ITBO_yes + ITBO_no + TSO)`` (the repo's ``* 0.5``).

The "no" prompts are ``P`` = 16 learnable tensors of shape (context length, width) *added*
to the token + position embeddings of the "no" tower; in training each caption gets one of
the P prompts or their mean at random, at test time the mean. The ``clipn`` detector scores
with the resulting "no" class embeddings (`CLIPNNoText` plugs in as its ``no_encoder``).

Because the yes towers are frozen, `train_no_encoder` needs only the image embeddings and
the yes-caption embeddings (precomputed once, any backend) plus the caption tokens.

`load_clipn_checkpoint` reads a released CLIPN checkpoint (``epoch_10.pt``: a dict with
``state_dict``, keys optionally prefixed ``module.``) — torch's restricted ``weights_only``
loader, never a full unpickle — or a ``.safetensors`` file with the same keys, and maps
``transformer_no.*``, ``token_embedding_no``, ``positional_embedding_no``, ``ln_final_no.*``,
``text_projection_no`` and ``prompt_no`` onto `NoTextEncoder` (the yes text tower's keys onto
`TextTower`); the image tower's ``visual.*`` keys come back untouched for open_clip.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backends import DualEncoder

__all__ = ["TextTower", "NoTextEncoder", "CLIPNNoText", "itbo_loss", "tso_loss", "clipn_loss",
           "train_no_encoder", "load_clipn_checkpoint", "split_clipn_state_dict", "text_config_from_state"]


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
    """CLIP's residual attention block, with open_clip's parameter names."""

    def __init__(self, width: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", _QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.resblocks = nn.ModuleList([_Block(width, heads, quick_gelu) for _ in range(layers)])

    def forward(self, x, mask):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class TextTower(nn.Module):
    """CLIP's text transformer in open_clip's layout (keys ``token_embedding.weight``,
    ``positional_embedding``, ``transformer.resblocks.*``, ``ln_final.*``,
    ``text_projection``). Tokens are (N, context_length) with the end-of-text token holding
    the largest id of each row (CLIP's BPE convention); its output is the text embedding."""

    def __init__(self, vocab_size: int = 49408, context_length: int = 77, width: int = 512, heads: int = 8,
                 layers: int = 12, embed_dim: int = 512, quick_gelu: bool = True):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, context_length=context_length, width=width, heads=heads,
                           layers=layers, embed_dim=embed_dim, quick_gelu=quick_gelu)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = _Transformer(width, layers, heads, quick_gelu)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.register_buffer("attn_mask", torch.full((context_length, context_length), float("-inf")).triu_(1),
                             persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def forward(self, tokens: torch.Tensor, added: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings (N, embed_dim); ``added`` (N or 1, L, W) is summed onto the input
        embeddings (CLIPN's "no" prompts)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.positional_embedding.device)
        if tokens.ndim != 2 or tokens.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(f"tokens must be (N, {self.positional_embedding.shape[0]}) ids, got "
                             f"{tuple(tokens.shape)}; tokenise with the model's context length.")
        x = self.token_embedding(tokens) + self.positional_embedding
        if added is not None:
            x = x + added
        x = self.transformer(x.permute(1, 0, 2), self.attn_mask).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection


class NoTextEncoder(nn.Module):
    """CLIPN's "no" text tower plus its ``n_prompts`` learnable "no" prompts."""

    def __init__(self, n_prompts: int = 16, **tower_config: Any):
        super().__init__()
        self.tower = TextTower(**tower_config)
        cfg = self.tower.config
        self.prompt_no = nn.Parameter(torch.zeros(int(n_prompts), cfg["context_length"], cfg["width"]))

    @classmethod
    def from_yes_tower(cls, yes: TextTower, n_prompts: int = 16) -> NoTextEncoder:
        """CLIPN's initialisation: the "no" tower starts as a copy of the "yes" tower."""
        enc = cls(n_prompts, **yes.config)
        enc.tower.load_state_dict(yes.state_dict())
        return enc

    def forward(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.training:
            choices = torch.cat([self.prompt_no, self.prompt_no.mean(0, keepdim=True)], 0)
            idx = torch.randint(0, len(choices), (len(tokens),), generator=generator)
            return self.tower(tokens, choices[idx.to(choices.device)])
        return self.tower(tokens, self.prompt_no.mean(0, keepdim=True))


# ------------------------------------------------------------------ losses
def itbo_loss(image: torch.Tensor, yes: torch.Tensor, no: torch.Tensor, logit_scale: float | torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_yes, loss_no)``: matched pairs should say yes, unmatched ones no.

    ``image``, ``yes``, ``no``: (N, D) L2-normalised, row ``i`` of ``yes``/``no`` the caption
    of image ``i``."""
    n = image.shape[0]
    if n < 2:
        raise ValueError("The binary opposite loss needs at least 2 image-caption pairs (unmatched pairs).")
    l_yes = logit_scale * image @ yes.T
    l_no = logit_scale * image @ no.T
    log_p = F.log_softmax(torch.stack([l_yes, l_no], -1), dim=-1)  # (N, N, 2): [yes, no]
    eye = torch.eye(n, dtype=torch.bool, device=image.device)
    loss_yes = -log_p[..., 0][eye].sum() / n
    loss_no = -log_p[..., 1][~eye].sum() / (n * n - n)
    return loss_yes, loss_no


def tso_loss(yes: torch.Tensor, no: torch.Tensor) -> torch.Tensor:
    """Mean ``2 − ‖yes − no‖`` for unit vectors (the L2 mode; ε = 1e-4 under the root)."""
    return (2.0 - torch.sqrt(2.0 - 2.0 * (yes * no).sum(-1) + 1e-4)).mean()


def clipn_loss(image, yes, no, logit_scale) -> dict[str, torch.Tensor]:
    """``{"itbo_yes", "itbo_no", "tso", "total"}`` with total = ½ (sum of the three)."""
    ly, ln = itbo_loss(image, yes, no, logit_scale)
    t = tso_loss(yes, no)
    return {"itbo_yes": ly, "itbo_no": ln, "tso": t, "total": 0.5 * (ly + ln + t)}


def train_no_encoder(no_encoder: NoTextEncoder, image_embeds: Any, yes_text_embeds: Any, tokens: Any,
                     steps: int = 200, lr: float = 3e-4, batch_size: int = 64, logit_scale: float = 100.0,
                     weight_decay: float = 0.1, seed: int = 0) -> list[dict[str, float]]:
    """Train the "no" tower and prompts on image-caption pairs with the frozen yes side given
    as embeddings (``image_embeds``, ``yes_text_embeds``: (N, D); ``tokens``: (N, L) caption
    ids). AdamW as the repo (lr 3e-4, wd 0.1 for CC3M at batch 512). Returns the loss log."""
    img = F.normalize(torch.as_tensor(np.asarray(image_embeds), dtype=torch.float32), dim=-1)
    yes = F.normalize(torch.as_tensor(np.asarray(yes_text_embeds), dtype=torch.float32), dim=-1)
    tok = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if not (len(img) == len(yes) == len(tok)):
        raise ValueError(f"image_embeds, yes_text_embeds and tokens differ in length ({len(img)}, {len(yes)}, "
                         f"{len(tok)}); give one caption per image.")
    if img.shape[1] != yes.shape[1] or img.shape[1] != no_encoder.tower.config["embed_dim"]:
        raise ValueError(f"Embedding widths differ: images {img.shape[1]}, yes texts {yes.shape[1]}, "
                         f"no tower {no_encoder.tower.config['embed_dim']}; use one joint space.")
    if not (torch.isfinite(img).all() and torch.isfinite(yes).all()):
        raise ValueError("image_embeds / yes_text_embeds contain NaN or inf.")
    if len(img) < 2:
        raise ValueError("train_no_encoder needs at least 2 image-caption pairs.")
    gen = torch.Generator().manual_seed(int(seed))
    dev = no_encoder.prompt_no.device
    opt = torch.optim.AdamW(no_encoder.parameters(), lr=lr, weight_decay=weight_decay)
    no_encoder.train()
    log = []
    for _ in range(int(steps)):
        idx = torch.randperm(len(img), generator=gen)[: min(int(batch_size), len(img))]
        no = F.normalize(no_encoder(tok[idx].to(dev), generator=gen), dim=-1)
        terms = clipn_loss(img[idx].to(dev), yes[idx].to(dev), no, logit_scale)
        if not torch.isfinite(terms["total"]):
            raise FloatingPointError(f"CLIPN training diverged at step {len(log) + 1}; lower lr.")
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        log.append({k: float(v.detach()) for k, v in terms.items()})
    no_encoder.eval()
    return log


# ------------------------------------------------------------------ released checkpoints
_NO_KEYS = {"transformer_no.": "tower.transformer.", "token_embedding_no.": "tower.token_embedding.",
            "positional_embedding_no": "tower.positional_embedding", "ln_final_no.": "tower.ln_final.",
            "text_projection_no": "tower.text_projection", "prompt_no": "prompt_no"}
_YES_KEYS = {"transformer.": "transformer.", "token_embedding.": "token_embedding.",
             "positional_embedding": "positional_embedding", "ln_final.": "ln_final.",
             "text_projection": "text_projection"}


def _map(key: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):]
    return None


def split_clipn_state_dict(state: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``(yes_text, no_text, rest)``: a CLIPN state dict split into `TextTower` keys, `NoTextEncoder`
    keys and everything else (``visual.*``, ``logit_scale``, ...). Strips a ``module.`` prefix."""
    if not state:
        raise ValueError("The CLIPN state dict is empty.")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    yes, no, rest = {}, {}, {}
    for k, v in state.items():
        # the "_no" names first: "transformer_no." also starts with "transformer"
        mapped = _map(k, _NO_KEYS)
        if mapped is not None:
            no[mapped] = v
            continue
        mapped = _map(k, _YES_KEYS)
        (yes.__setitem__(mapped, v) if mapped is not None else rest.__setitem__(k, v))
    if not no:
        raise ValueError("No CLIPN 'no' tower in this state dict (no transformer_no.* / prompt_no keys): "
                         "is it a plain CLIP checkpoint rather than a CLIPN one?")
    return yes, no, rest


def text_config_from_state(state: dict[str, Any], prefix: str = "") -> dict[str, int]:
    """The text tower's size from its weights (heads = width / 64 as CLIP)."""
    width = int(state[f"{prefix}ln_final.weight"].shape[0])
    layers = len({k.split(".")[2 + prefix.count(".")] for k in state if k.startswith(f"{prefix}transformer.resblocks.")})
    return dict(vocab_size=int(state[f"{prefix}token_embedding.weight"].shape[0]),
                context_length=int(state[f"{prefix}positional_embedding"].shape[0]), width=width,
                heads=max(1, width // 64), layers=layers, embed_dim=int(state[f"{prefix}text_projection"].shape[1]))


def _read_state(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or a dict with 'state_dict').")
    return obj


def load_clipn_checkpoint(path: str | Path, quick_gelu: bool = True, heads: int | None = None
                          ) -> tuple[TextTower | None, NoTextEncoder, dict[str, Any]]:
    """``(yes_text_tower or None, no_text_encoder, rest)`` from a released CLIPN checkpoint.

    ``quick_gelu``: OpenAI-initialised CLIPs (the released ViT-B/16 and ViT-B/32) use
    QuickGELU. ``heads`` overrides CLIP's width/64 rule. ``rest`` holds the image tower
    (``visual.*``) and ``logit_scale`` for open_clip."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No CLIPN checkpoint at {path}.")
    yes, no, rest = split_clipn_state_dict(_read_state(path))
    no_cfg = text_config_from_state(no, "tower.")
    if heads is not None:
        no_cfg["heads"] = int(heads)
    n_prompts = int(no["prompt_no"].shape[0]) if "prompt_no" in no else 16
    enc = NoTextEncoder(n_prompts, quick_gelu=quick_gelu, **no_cfg)
    _load_strict(enc, no, "the 'no' text tower")
    tower = None
    if yes:
        tower = TextTower(quick_gelu=quick_gelu, **{**text_config_from_state(yes), **({"heads": heads} if heads else {})})
        _load_strict(tower, yes, "the 'yes' text tower")
        tower.eval()
    return tower, enc.eval(), rest


def _load_strict(module: nn.Module, state: dict[str, Any], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"CLIPN checkpoint does not fit {what}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}.")


class CLIPNNoText(DualEncoder):
    """A trained `NoTextEncoder` as the ``no_encoder`` of the ``clipn`` detector.

    ``tokenizer(texts)`` must return (N, context_length) ids in the yes tower's vocabulary
    (``open_clip.get_tokenizer(arch)`` for released CLIPN weights). Text only."""

    def __init__(self, no_encoder: NoTextEncoder, tokenizer: Callable[[Sequence[str]], Any], name: str = "clipn-no",
                 device: str = "cpu"):
        self.model = no_encoder.eval().to(device)
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.embed_dim = int(no_encoder.tower.config["embed_dim"])

    def _fingerprint(self) -> str:
        from .backends import _state_fingerprint

        return f"{self.name}:{_state_fingerprint(self.model)}"

    def _encode_tokens(self, texts: list[str]):
        return self.model(torch.as_tensor(np.asarray(self.tokenizer(texts)), dtype=torch.long, device=self.device))

    def _encode_pixels(self, pixels, local: bool):
        raise ValueError("CLIPNNoText is the 'no' text tower only; embed images with the CLIP image tower.")
