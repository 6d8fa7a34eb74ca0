"""The builder of every text benchmark (their specs are in `oodscope.bench.catalog`):
CLINC150, BANKING77-OOS, CLINC-Single-Domain-OOS, ROSTD and your own data (``bench text --data``).

One pipeline: load the release (`oodscope.text.data`), embed every split once with a sentence
encoder (cached), fit a classifier head on ``train`` (tuned on ``val``), and turn each
out-of-scope group of the release into a test OOD set. The validation OOD set is the union
of the groups' *validation* out-of-scope splits; the test out-of-scope queries never take
part in tuning. Protocol of CLINC150 (Larson et al., 2019; as used by Zhou et al., 2021):
fit on in-scope ``train``, tune on ``val`` vs ``oos_val``, report ``test`` vs ``oos_test``.

Options: ``encoder`` (spec for `oodscope.text.load_encoder`; default the packaged
all-MiniLM-L6-v2), ``finetune`` (``False``/"none", ``True``/"ce", "supcon", "margin"; the default
"auto" fine-tunes the default MiniLM encoder with "ce" for 300 steps on full runs — the
setting that reaches AUROC 98 / FPR@95 8 on CLINC150 — and keeps it frozen for ``subset``/``quick``
runs and for other encoders), ``data_root`` (the release folder). Spec parameters: ``head``
("linear" or "mlp"), ``lm`` (causal-LM name/path for the ``lm_ratio`` detector; texts are kept
in ``extras["text"]`` then), ``variant`` of CLINC150, and for ``bench text --data`` the
``text_column``, ``label_column`` and ``oos_label`` of a CSV/TSV/JSONL file.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..features import Features
from ..text.data import TextDataset
from ..text.encoders import SentenceEncoder, default_cache_dir, encode_cached, load_encoder
from ..text.extract import text_array
from ..text.heads import ClassifierHead
from .spec import BenchmarkSpec, FeatureSet, ProviderOptions

__all__ = ["build_text", "detect_layout", "load_benchmark_dataset", "parse_finetune"]

_FINETUNE_OFF = {"", "none", "false", "no", "0", "off", "head", "frozen"}
_FINETUNE_ALIASES = {"true": "ce", "yes": "ce", "1": "ce", "on": "ce", "full": "ce", "ce": "ce",
                     "supcon": "supcon", "scl": "supcon", "margin": "margin", "contrastive": "margin"}
_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")


def parse_finetune(value: Any) -> str | None:
    """``None`` (frozen encoder) or the fine-tuning objective name."""
    if value is None or value is False:
        return None
    if value is True:
        return "ce"
    key = str(value).strip().lower()
    if key in _FINETUNE_OFF:
        return None
    if key in _FINETUNE_ALIASES:
        return _FINETUNE_ALIASES[key]
    raise ValueError(
        f"Unknown --finetune value {value!r}; use none, ce (alias true/full), supcon or margin."
    )


def _finetuned_encoder(enc: SentenceEncoder, texts: list[str], labels: np.ndarray, objective: str,
                       cache_dir: Path | None, steps: int, seed: int) -> SentenceEncoder:
    """Fine-tune once; later runs reload the saved model (safetensors) from the cache."""
    from ..text.finetune import finetune_encoder

    h = hashlib.sha256(f"{enc.fingerprint()}|{objective}|{steps}|{seed}".encode())
    for t, y in zip(texts, labels.tolist()):
        h.update(f"{t}\x00{y}\x01".encode())
    path = (cache_dir or default_cache_dir()) / "finetuned_encoders" / h.hexdigest()[:24]
    if (path / "done.json").exists():
        st = __import__("sentence_transformers")
        model = st.SentenceTransformer(str(path), device=enc.device)
        new = SentenceEncoder(model, device=enc.device, batch_size=enc.batch_size, normalize=enc.normalize)
        import json

        new.finetune_info = json.loads((path / "done.json").read_text())
        return new
    new = finetune_encoder(enc, texts, labels, objective=objective, steps=steps, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    new.model_.save(str(path))
    import json

    (path / "done.json").write_text(json.dumps(new.finetune_info))
    return new


def _fitted_head(train: Features, val: Features, kind: str, seed: int, fingerprint: str,
                 cache_dir: Path | None) -> ClassifierHead:
    """Fit the head on train (tuned on val), or reload the identical fit from the cache."""
    if kind == "linear":
        clf = ClassifierHead(seed=seed)
    else:  # kept small: an MLP search is much slower than the linear one on CPU
        clf = ClassifierHead(hidden=512, weight_decay=(1e-4, 1e-2), epochs=20, seed=seed)
    h = hashlib.sha256(f"{fingerprint}|{kind}|{seed}|{clf.weight_decay}|{clf.hidden}|{clf.max_iter}".encode())
    for f in (train, val):
        h.update(np.ascontiguousarray(f.features).tobytes())
        h.update(np.ascontiguousarray(f.labels).tobytes())
    path = (cache_dir or default_cache_dir()) / "text_heads" / f"{h.hexdigest()[:24]}.npz"
    if path.exists():
        try:
            return ClassifierHead.load(path)
        except Exception:  # unreadable cache entry: refit
            pass
    clf.fit(train, None, val, val.labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    clf.save(path)
    return clf


# ----------------------------------------------------------------- data
def detect_layout(path: str | Path) -> tuple[str, dict[str, Any]]:
    """``(benchmark name, builder parameters)`` of the data at ``path``: a CLINC150 folder
    (``data_full.json``), a BANKING77-OOS folder (``train/`` + ``id-oos/train/``), a
    CLINC-Single-Domain-OOS domain folder (``train/`` + ``id-oos/valid/``, or the folder holding
    ``banking/``), a ROSTD folder (``OODRemovedtrain.tsv``, directly or in ``unsup/``), or a
    CSV/TSV/JSONL file."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in _TABLE_SUFFIXES:
            raise ValueError(f"--data {path}: a text file must be .csv, .tsv or .jsonl (with a header / keys "
                             "naming the text and label columns).")
        return "text", {"dataset": "file"}
    if not path.is_dir():
        raise FileNotFoundError(f"--data {path}: no such file or folder.")
    if (path / "data_full.json").is_file():
        return "clinc150", {}
    if (path / "train" / "seq.in").is_file() and (path / "id-oos").is_dir():
        if (path / "id-oos" / "train").is_dir():
            return "banking77-oos", {}
        return "clinc-single-domain-oos", {"domain": path.name if path.name == "credit_cards" else "banking"}
    for domain in ("banking", "credit_cards"):
        if (path / domain / "train" / "seq.in").is_file():
            return "clinc-single-domain-oos", {"domain": domain}
    if (path / "OODRemovedtrain.tsv").is_file() or (path / "unsup" / "OODRemovedtrain.tsv").is_file():
        return "rostd", {}
    raise ValueError(
        f"--data {path}: not a layout oodscope knows. Give a CLINC150 folder (data_full.json), a "
        "BANKING77-OOS or CLINC-Single-Domain-OOS release folder (train/, valid/, test/, id-oos/, "
        "ood-oos/ with seq.in + label), a ROSTD folder (OODRemovedtrain.tsv, eval.tsv, test.tsv), or a "
        ".csv/.tsv/.jsonl file with text and label columns.")


def load_benchmark_dataset(params: dict[str, Any], root: Path | None, seed: int = 0) -> TextDataset:
    """The `TextDataset` that ``params["dataset"]`` names, from ``root`` (else the data folders)."""
    from ..text import data as T

    name = params["dataset"]
    if name == "clinc150":
        return T.load_clinc150(params.get("variant", "full"), root=root)
    if name == "banking77-oos":
        return T.load_banking77_oos(root)
    if name == "clinc-single-domain-oos":
        return T.load_clinc_single_domain_oos(params.get("domain", "banking"), root)
    if name == "rostd":
        return T.load_rostd(root, coarse=params.get("coarse", False))
    if name == "file":
        return T.load_labelled_file(params["data"], params["text_column"], params["label_column"],
                                    params["oos_label"], seed)
    raise ValueError(f"Unknown text dataset {name!r}.")


def _resolve(spec: BenchmarkSpec, options: ProviderOptions) -> tuple[BenchmarkSpec, Path | None, list[str]]:
    """``(spec, data root, notes)``; for ``bench text --data``, the registered spec of the
    detected layout with the data there (a file: the ``text`` spec reading it)."""
    if spec.params["dataset"] != "auto":
        return spec, options.data_root, []
    data = spec.params.get("data")
    if data is None:
        raise ValueError("bench text needs --data DIR_OR_FILE: a CLINC150, BANKING77-OOS, "
                         "CLINC-Single-Domain-OOS or ROSTD folder, or a CSV/TSV/JSONL file.")
    name, extra = detect_layout(data)
    note = [f"--data {data}: read as {'a labelled text file' if name == 'text' else name}"]
    if name == "text":
        return spec.with_params(**extra, groups={"oos": ("near", "oos")}), None, note
    from .catalog import get_benchmark

    return get_benchmark(name).with_params(**extra), Path(data), note


def _keep_seen_classes(ds: TextDataset) -> TextDataset:
    """A small random subset can miss classes: keep val/test to the ones train has."""
    seen = np.unique(ds["train"].labels)
    for k in ("val", "test"):
        s = ds.splits[k]
        ds.splits[k] = s.subset(np.flatnonzero(np.isin(s.labels, seen)))
    return ds


# ----------------------------------------------------------------- the builder
def build_text(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """Embeddings -> head -> logits for every split of the spec's dataset (module docstring)."""
    spec, root, notes = _resolve(spec, options)
    p = spec.params
    head, seed = p.get("head", "linear"), options.seed
    if head not in ("linear", "mlp"):
        raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}.")
    timings: dict[str, float] = {}
    finetune = options.finetune
    if finetune is None or finetune == "auto":
        finetune = "ce" if options.encoder is None and options.subset is None else "none"
    ds = load_benchmark_dataset(dict(p), root, seed).subsample(options.subset, seed=0)
    if options.subset is not None:
        ds = _keep_seen_classes(ds)
    enc = load_encoder(options.encoder)
    cache = options.cache_dir
    objective = parse_finetune(finetune)
    finetune_info = None
    if objective is not None:
        if not isinstance(enc, SentenceEncoder):
            raise ValueError("--finetune needs a sentence-transformers encoder (the default, or "
                             "sentence-transformers:<name>).")
        t = time.time()
        tr = ds["train"]
        enc = _finetuned_encoder(enc, tr.texts, tr.labels, objective, cache, int(p.get("finetune_steps", 300)), seed)
        finetune_info = getattr(enc, "finetune_info", None)
        timings["finetune"] = round(time.time() - t, 1)
    groups = {g: ds.oos_groups[g] for g in p["groups"]}
    val_names = [g["val"] for g in groups.values() if "val" in g]
    keep_text = p.get("lm") is not None or (options.fields is not None and "text" in options.fields)
    raw: dict[str, Features] = {}
    for split in ["train", "val", *val_names, "test", *(g["test"] for g in groups.values())]:
        t = time.time()
        s = ds[split]
        extras = {"text": text_array(s.texts)} if keep_text else {}
        raw[split] = Features(features=encode_cached(enc, s.texts, cache_dir=cache), labels=s.labels, extras=extras)
        timings[f"encode_{split}"] = round(time.time() - t, 2)
    t = time.time()
    clf = _fitted_head(raw["train"], raw["val"], head, seed, enc.fingerprint(), cache)
    timings["head"] = round(time.time() - t, 2)
    out = {k: clf.apply(v) for k, v in raw.items()}
    for f in out.values():
        f.meta.update({"label_names": ds.label_names, "encoder": enc.fingerprint()})
    if not val_names:
        raise ValueError(f"{ds.name} has no validation out-of-scope split to tune on.")
    sets: dict[str, dict[str, Features]] = {"near": {}, "far": {}}
    for g, (kind, set_name) in p["groups"].items():
        if options.wants(set_name):
            sets[kind][set_name] = out[groups[g]["test"]]
    val_ood = out[val_names[0]] if len(val_names) == 1 else Features.concat([out[k] for k in val_names])
    info = {
        "id_accuracy": float(np.mean(np.argmax(out["test"].logits, 1) == out["test"].labels)),
        "val_accuracy": float(np.mean(np.argmax(out["val"].logits, 1) == out["val"].labels)),
        "model": (f"{finetune_info['base']} fine-tuned ({objective}, {finetune_info['steps']} steps)"
                  if finetune_info else enc.name) + f" + {head} head {clf.best_params_}",
        "encoder": enc.fingerprint(), "dataset": ds.name, "variant": p.get("variant"), "finetune": finetune_info,
        "timings": timings, "classes": ds.num_classes, "val_ood_splits": val_names, "notes": notes,
    }
    detector_kwargs = {"lm_ratio": {"base_model": p["lm"]}} if p.get("lm") is not None else {}
    return FeatureSet(train=out["train"], val_id=out["val"], val_ood=val_ood, test_id=out["test"],
                      near_ood=sets["near"], far_ood=sets["far"], info=info, detector_kwargs=detector_kwargs)
