"""Text datasets for OOD detection: CLINC150, BANKING77-OOS, CLINC-Single-Domain-OOS, ROSTD,
and any CSV / TSV / JSONL file with a text column and a label column.

Every loader returns a `TextDataset`: named splits of (texts, integer labels), one shared
list of in-distribution class names, and ``-1`` as the label of out-of-scope samples.
In-scope splits keep the dataset's names (``train``, ``val``, ``test``); out-of-scope
splits are prefixed ``oos_`` (``oos_train``, ``oos_val``, ``oos_test``).

Datasets are found, in order, under ``$OODSCOPE_DATA/<name>/``, ``~/.cache/oodscope/<name>/``
and, for CLINC150, downloaded from the canonical repository with a sha256 check.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "CLINC150_VARIANTS",
    "TextDataset",
    "TextSplit",
    "find_dataset_dir",
    "load_banking77_oos",
    "load_clinc150",
    "load_clinc_single_domain_oos",
    "load_rostd",
    "load_text_dataset",
    "load_text_file",
    "validate_texts",
]

#: Label marking out-of-scope / unknown samples.
OOS_LABEL = -1

CLINC150_VARIANTS = ("full", "small", "imbalanced", "oos_plus")
_CLINC_URL = "https://raw.githubusercontent.com/clinc/oos-eval/master/data/data_{variant}.json"
_CLINC_SHA256 = {
    "full": "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0",
    "small": "050e17476e6b4fa88f8518edaf09921c8f5e3a86dc8b63615361102a20b2ac01",
    "imbalanced": "4886730b20c51eece26aa392ecae2717bfe9908680419e96255351c6148eb4cc",
    "oos_plus": "bfcca9ae515623541dc1983c94c4ed7cae9d26b42ae47d74b972e51bb6f7a21f",
}


@dataclass
class TextSplit:
    """Texts with integer labels (``-1`` = out-of-scope)."""

    texts: list[str]
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.texts = validate_texts(self.texts)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.texts) != self.labels.shape[0]:
            raise ValueError(
                f"Got {len(self.texts)} texts but {self.labels.shape[0]} labels; "
                "pass one label per text."
            )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int] | np.ndarray) -> TextSplit:
        index = np.asarray(index, dtype=np.int64)
        return TextSplit([self.texts[i] for i in index], self.labels[index])


@dataclass
class TextDataset:
    """Named splits plus the in-distribution class names (label ``i`` is ``label_names[i]``)."""

    name: str
    splits: dict[str, TextSplit]
    label_names: list[str]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, split: str) -> TextSplit:
        if split not in self.splits:
            raise KeyError(f"{self.name} has no split {split!r}; available: {sorted(self.splits)}.")
        return self.splits[split]

    def __contains__(self, split: str) -> bool:
        return split in self.splits

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subsample(self, n: int | None, seed: int = 0) -> TextDataset:
        """At most ``n`` random samples per split (for quick runs); ``None`` keeps everything."""
        if n is None:
            return self
        if int(n) < 1:
            raise ValueError(f"subset must be a positive number of samples per split, got {n}.")
        rng = np.random.default_rng(seed)
        splits = {}
        for k, s in self.splits.items():
            if len(s) <= n:
                splits[k] = s
            else:
                splits[k] = s.subset(np.sort(rng.choice(len(s), int(n), replace=False)))
        return TextDataset(self.name, splits, list(self.label_names), dict(self.meta, subset=int(n)))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"TextDataset({self.name!r}, classes={self.num_classes}, {sizes})"


def validate_texts(texts: Iterable[str], what: str = "texts") -> list[str]:
    """A list of non-empty strings, or a ``ValueError`` naming the first bad item."""
    if isinstance(texts, str):
        raise ValueError(f"{what} must be a sequence of strings, got a single string; wrap it in a list.")
    out = list(texts.tolist() if isinstance(texts, np.ndarray) else texts)
    for i, t in enumerate(out):
        if isinstance(t, np.str_):
            out[i] = t = str(t)
        if not isinstance(t, str):
            raise ValueError(
                f"{what}[{i}] is a {type(t).__name__}, not a string; convert or drop it "
                "(e.g. [str(t) for t in texts])."
            )
        if not t.strip():
            raise ValueError(f"{what}[{i}] is an empty string; remove empty texts before encoding.")
    return out


# ----------------------------------------------------------------- locating files
def find_dataset_dir(name: str, required: Sequence[str] = (), root: str | Path | None = None) -> Path | None:
    """The first folder among ``root``, ``$OODSCOPE_DATA/<name>``, ``~/.cache/oodscope/<name>``
    holding every file in ``required``; ``None`` when there is none."""
    candidates = []
    if root is not None:
        candidates.append(Path(root))
    env = os.environ.get("OODSCOPE_DATA")
    if env:
        candidates.append(Path(env) / name)
    candidates.append(Path.home() / ".cache" / "oodscope" / name)
    for c in candidates:
        if c.is_dir() and all((c / r).exists() for r in required):
            return c
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _clinc_file(variant: str, root: str | Path | None, download: bool) -> Path:
    fname = f"data_{variant}.json"
    found = find_dataset_dir("clinc150", [fname], root)
    if found is not None:
        return found / fname
    target = Path.home() / ".cache" / "oodscope" / "clinc150" / fname
    url = _CLINC_URL.format(variant=variant)
    if not download:
        raise FileNotFoundError(
            f"CLINC150 file {fname} not found in $OODSCOPE_DATA/clinc150 or ~/.cache/oodscope/clinc150. "
            f"Download it from {url} into one of those folders, or pass download=True."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    import urllib.request

    tmp = target.with_suffix(".part")
    try:
        urllib.request.urlretrieve(url, tmp)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"CLINC150 file {fname} is not available locally and downloading {url} failed ({exc}). "
            f"Put {fname} in $OODSCOPE_DATA/clinc150/ or {target.parent}/."
        ) from exc
    digest = _sha256(tmp)
    if digest != _CLINC_SHA256[variant]:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"Checksum mismatch for {url}: got {digest}, expected {_CLINC_SHA256[variant]}.")
    tmp.replace(target)
    return target


# ----------------------------------------------------------------- label handling
def _split_out_of_scope(splits: dict[str, "TextSplit"]) -> dict[str, "TextSplit"]:
    """Each split's in-scope part keeps its name; its out-of-scope part becomes ``oos_<name>``
    (the CLINC150 layout)."""
    out: dict[str, TextSplit] = {}
    for split, s in splits.items():
        out[split] = s.subset(np.flatnonzero(s.labels != OOS_LABEL))
        oos = np.flatnonzero(s.labels == OOS_LABEL)
        if len(oos):
            out[f"oos_{split}"] = s.subset(oos)
    return out


def _encode_labels(
    named: dict[str, tuple[list[str], list[str]]],
    fit_split: str,
    oos_names: Iterable[str],
    unknown: str = "error",
) -> tuple[dict[str, TextSplit], list[str]]:
    """Turn string labels into indices using the classes seen in ``fit_split``.

    ``oos_names`` map to ``-1``. A label absent from ``fit_split`` raises (``unknown="error"``)
    or becomes ``-1`` (``unknown="oos"``).
    """
    oos = set(oos_names)
    texts, labels = named[fit_split]
    label_names = sorted({l for l in labels if l not in oos})
    index = {n: i for i, n in enumerate(label_names)}
    splits = {}
    for split, (texts, labels) in named.items():
        ids = np.empty(len(labels), dtype=np.int64)
        for j, l in enumerate(labels):
            if l in oos:
                ids[j] = OOS_LABEL
            elif l in index:
                ids[j] = index[l]
            elif unknown == "oos":
                ids[j] = OOS_LABEL
            else:
                raise ValueError(
                    f"Split {split!r} has label {l!r} (row {j}) that never appears in {fit_split!r}. "
                    "Fix the data, or pass unknown='oos' to treat unseen labels as out-of-scope."
                )
        splits[split] = TextSplit(texts, ids)
    return splits, label_names


# ----------------------------------------------------------------- CLINC150
def load_clinc150(variant: str = "full", root: str | Path | None = None, download: bool = True) -> TextDataset:
    """CLINC150 (Larson et al., 2019, "An Evaluation Dataset for Intent Classification and
    Out-of-Scope Prediction"): 150 intents in 10 domains plus out-of-scope queries.

    Splits: ``train``/``val``/``test`` (in-scope) and ``oos_train``/``oos_val``/``oos_test``.
    ``variant`` is one of ``full``, ``small``, ``imbalanced``, ``oos_plus``.
    """
    if variant not in CLINC150_VARIANTS:
        raise ValueError(f"Unknown CLINC150 variant {variant!r}; choose one of {CLINC150_VARIANTS}.")
    path = _clinc_file(variant, root, download)
    with open(path, encoding="utf-8") as fh:
        raw = json.load(fh)
    expected = {"train", "val", "test", "oos_train", "oos_val", "oos_test"}
    missing = expected - set(raw)
    if missing:
        raise ValueError(f"{path} is not a CLINC150 file: missing splits {sorted(missing)}.")
    named = {k: ([r[0] for r in raw[k]], [r[1] for r in raw[k]]) for k in sorted(expected)}
    splits, names = _encode_labels(named, "train", oos_names=["oos"])
    for k in ("oos_train", "oos_val", "oos_test"):
        if np.any(splits[k].labels != OOS_LABEL):
            raise ValueError(f"{path}: split {k} should hold only 'oos' queries.")
    return TextDataset(f"clinc150_{variant}", splits, names, {"source": str(path), "variant": variant})


# ----------------------------------------------------------------- generic files
def _read_table(path: Path, text_column: str, label_column: str | None) -> tuple[list[str], list[str] | None]:
    suffix = "".join(path.suffixes[-1:]).lower()
    rows: list[dict]
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{i + 1} is not valid JSON: {exc}") from exc
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise ValueError(f"{path}: unsupported text file type {suffix!r}; use .csv, .tsv or .jsonl.")
    if not rows:
        raise ValueError(f"{path} has no rows.")
    for col in (text_column, label_column):
        if col is not None and col not in rows[0]:
            raise ValueError(f"{path} has no column {col!r}; columns are {sorted(rows[0])}.")
    texts = [r[text_column] for r in rows]
    labels = None if label_column is None else [str(r[label_column]) for r in rows]
    return texts, labels


def load_text_file(
    path: str | Path, text_column: str = "text", label_column: str | None = "label"
) -> tuple[list[str], list[str] | None]:
    """Texts and string labels from one ``.csv``, ``.tsv`` or ``.jsonl`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No text file at {path}.")
    texts, labels = _read_table(path, text_column, label_column)
    return validate_texts(texts, f"{path.name} column {text_column!r}"), labels


def load_text_dataset(
    files: dict[str, str | Path],
    text_column: str = "text",
    label_column: str = "label",
    oos_labels: Sequence[str] = ("oos",),
    fit_split: str = "train",
    unknown: str = "error",
    name: str = "text",
) -> TextDataset:
    """A dataset from one file per split: ``{"train": "train.csv", "test": ..., ...}``.

    Rows whose label is in ``oos_labels`` get label ``-1``. Class names come from
    ``fit_split``; a label unseen there raises unless ``unknown="oos"``.
    """
    if fit_split not in files:
        raise ValueError(f"files must include the {fit_split!r} split; got {sorted(files)}.")
    if unknown not in ("error", "oos"):
        raise ValueError(f"unknown must be 'error' or 'oos', got {unknown!r}.")
    named = {}
    for split, path in files.items():
        texts, labels = load_text_file(path, text_column, label_column)
        named[split] = (texts, labels)
    splits, names = _encode_labels(named, fit_split, oos_labels, unknown)
    return TextDataset(name, splits, names, {"files": {k: str(v) for k, v in files.items()}})


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [line.rstrip("\n").rstrip("\r") for line in fh]


def _load_seq_label_folders(root: Path, name: str, splits: Sequence[str], oos_label: str) -> TextDataset:
    """Few-Shot-Intent-Detection layout: ``<root>/<split>/seq.in`` + ``<root>/<split>/label``."""
    named = {}
    for split in splits:
        d = root / split
        if not d.is_dir():
            continue
        texts, labels = _read_lines(d / "seq.in"), _read_lines(d / "label")
        if texts and texts[-1] == "" and len(texts) == len(labels) + 1:
            texts = texts[:-1]
        if labels and labels[-1] == "" and len(labels) == len(texts) + 1:
            labels = labels[:-1]
        if len(texts) != len(labels):
            raise ValueError(f"{d}: seq.in has {len(texts)} lines but label has {len(labels)}.")
        named[split] = (texts, labels)
    if "train" not in named:
        raise FileNotFoundError(f"{root} has no train/seq.in + train/label.")
    # In-scope and out-of-scope parts of each split become separate splits, as for CLINC150.
    splits_enc, names = _encode_labels(named, "train", [oos_label])
    out = _split_out_of_scope(splits_enc)
    return TextDataset(name, out, names, {"source": str(root)})


_FSID_SPLITS = ("train", "valid", "test")


def load_banking77_oos(root: str | Path | None = None) -> TextDataset:
    """BANKING77-OOS (Zhang et al., 2022, "Are Pretrained Transformers Robust in Intent
    Classification?"), in the Few-Shot-Intent-Detection layout (``train/seq.in``, ``train/label``,
    ``valid/...``, ``test/...``; out-of-scope label ``oos``). Looked up as ``banking77_oos``."""
    found = find_dataset_dir("banking77_oos", ["train/seq.in", "train/label"], root)
    if found is None:
        raise FileNotFoundError(
            "BANKING77-OOS not found: put the release folder (train/, valid/, test/ with seq.in "
            "and label; from github.com/jianguoz/Few-Shot-Intent-Detection, Datasets/BANKING77-OOS) "
            "in $OODSCOPE_DATA/banking77_oos or ~/.cache/oodscope/banking77_oos."
        )
    return _load_seq_label_folders(found, "banking77_oos", _FSID_SPLITS, "oos")


def load_clinc_single_domain_oos(domain: str = "banking", root: str | Path | None = None) -> TextDataset:
    """CLINC-Single-Domain-OOS (Zhang et al., 2022): one CLINC domain (``banking`` or
    ``credit_cards``) with in-domain out-of-scope queries, Few-Shot-Intent-Detection layout,
    looked up as ``clinc_single_domain_oos/<domain>``."""
    name = f"clinc_single_domain_oos/{domain}"
    found = find_dataset_dir(name, ["train/seq.in", "train/label"], root)
    if found is None:
        raise FileNotFoundError(
            f"CLINC-Single-Domain-OOS ({domain}) not found: put the release folder (train/, valid/, "
            f"test/ with seq.in and label) in $OODSCOPE_DATA/{name} or ~/.cache/oodscope/{name}."
        )
    return _load_seq_label_folders(found, f"clinc_single_domain_oos_{domain}", _FSID_SPLITS, "oos")


def load_rostd(root: str | Path | None = None) -> TextDataset:
    """ROSTD (Gangal et al., 2020, "Likelihood Ratios and Generative Classifiers for Unsupervised
    Out-of-Domain Detection in Task Oriented Dialog"): the English FB dialog intents with
    out-of-domain queries labelled ``outOfDomain``.

    Expects TSV files ``{train,eval,test}.tsv`` with rows ``label<TAB>slots<TAB>text`` (the
    release format; a header row, if any, is skipped), found as ``rostd``.
    """
    found = find_dataset_dir("rostd", ["train.tsv"], root)
    if found is None:
        raise FileNotFoundError(
            "ROSTD not found: put train.tsv, eval.tsv and test.tsv (label<TAB>slots<TAB>text) in "
            "$OODSCOPE_DATA/rostd or ~/.cache/oodscope/rostd."
        )
    named = {}
    for split, fname in (("train", "train.tsv"), ("val", "eval.tsv"), ("test", "test.tsv")):
        p = found / fname
        if not p.exists():
            continue
        texts, labels = [], []
        with open(p, encoding="utf-8", newline="") as fh:
            for i, row in enumerate(csv.reader(fh, delimiter="\t")):
                if not row or (i == 0 and row[0].lower() in ("label", "intent")):
                    continue
                if len(row) < 2:
                    raise ValueError(f"{p}:{i + 1}: expected label<TAB>...<TAB>text, got {row!r}.")
                labels.append(row[0].strip())
                texts.append(row[-1])
        named[split] = (texts, labels)
    splits_enc, names = _encode_labels(named, "train", ["outOfDomain"], unknown="error")
    out = _split_out_of_scope(splits_enc)
    return TextDataset("rostd", out, names, {"source": str(found)})
