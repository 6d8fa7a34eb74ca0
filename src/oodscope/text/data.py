"""Text datasets for OOD detection: CLINC150, BANKING77-OOS, CLINC-Single-Domain-OOS, ROSTD,
and any CSV / TSV / JSONL file with a text column and a label column.

Every loader returns a `TextDataset`: named splits of (texts, integer labels), one shared
list of in-distribution class names, and ``-1`` as the label of out-of-scope samples.
In-scope splits are ``train``, ``val``, ``test``; out-of-scope splits are named after their
group (``oos_val``, ``oos_test`` for CLINC150 and ROSTD; ``id_oos_*`` and ``ood_oos_*`` for
the two groups of BANKING77-OOS and CLINC-Single-Domain-OOS), and
`TextDataset.oos_groups` says which split belongs to which group.

Each loader reads its release's files exactly as published (the layouts, with the
repository and commit they were checked against, are in the loaders' docstrings and in
``tests/fixtures/README.md``) and refuses data that cannot be right: a wrong column count,
files that do not line up, texts that look like a code column, a missing OOS folder.

Datasets are found as described in `oodscope.data.registry` (``$OODSCOPE_DATA/<name>/``,
the user cache, ``/usr/share/datasets/<name>/``); CLINC150 is also downloaded from its
canonical repository with a sha256 check.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._cache import file_sha256
from ..data.registry import cache_root, find_dataset_dir, is_offline, search_paths

__all__ = [
    "CLINC150_VARIANTS",
    "CLINC_SINGLE_DOMAINS",
    "OOS_LABEL",
    "TextDataset",
    "TextSplit",
    "check_plausible_texts",
    "find_dataset_dir",
    "load_banking77_oos",
    "load_clinc150",
    "load_clinc_single_domain_oos",
    "load_labelled_file",
    "load_rostd",
    "load_text_dataset",
    "load_text_file",
    "read_rostd_tsv",
    "read_seq_label",
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
    #: out-of-scope groups: ``{group: {"val": split name, "test": split name, ...}}``
    oos_groups: dict[str, dict[str, str]] = field(default_factory=dict)

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
        return TextDataset(self.name, splits, list(self.label_names), dict(self.meta, subset=int(n)),
                           {g: dict(m) for g, m in self.oos_groups.items()})

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


def check_plausible_texts(texts: Sequence[str], source: str) -> None:
    """Raise ``ValueError`` when ``texts`` cannot be a column of utterances.

    Catches a loader reading the wrong column: every text identical, mostly one- or
    two-character codes (a language or tag column), or a handful of distinct values
    repeated over many rows.
    """
    n = len(texts)
    if n == 0:
        raise ValueError(f"{source}: no texts.")
    distinct = set(texts)
    if n >= 2 and len(distinct) == 1:
        raise ValueError(f"{source}: all {n} texts are the same ({texts[0]!r}); "
                         "this is not a column of utterances (wrong column or file?).")
    short = [t for t in texts if len(t.strip()) <= 2]
    if n >= 5 and len(short) > n / 2:
        raise ValueError(f"{source}: {len(short)} of {n} texts are one or two characters long "
                         f"(e.g. {sorted(set(short))[:3]}); this looks like a code column, "
                         "not utterances (wrong column?).")
    if n >= 40 and len(distinct) <= n / 20:
        raise ValueError(f"{source}: only {len(distinct)} distinct texts among {n} rows "
                         f"(e.g. {sorted(distinct)[:3]}); this looks like a label or tag column, "
                         "not utterances (wrong column?).")


def _check_classes(labels: Sequence[str], source: str) -> None:
    if len(set(labels)) < 2:
        raise ValueError(f"{source}: every in-scope row has the label {labels[0]!r}; a training "
                         "split needs at least two classes (wrong label column or file?).")


# ----------------------------------------------------------------- locating files
def _not_found(what: str, names: Sequence[str], root, needs: str, source: str) -> FileNotFoundError:
    looked = [Path(root), Path(root) / names[0]] if root is not None else [
        p for n in names for p in search_paths(n)]
    lines = [f"{what} not found. Looked in:"] + [f"  {p}" for p in looked]
    lines.append(f"Each needs {needs}; the files come from {source}.")
    lines.append(f"Put them in one of these folders, or point OODSCOPE_DATA at a folder that "
                 f"contains {names[0]}/.")
    return FileNotFoundError("\n".join(lines))


def _find_release(names: Sequence[str], required, root) -> Path | None:
    """The first folder found under any of ``names`` (canonical name, then release names)."""
    for name in names:
        found = find_dataset_dir(name, required, root)
        if found is not None:
            return found
    return None


def _clinc_file(variant: str, root: str | Path | None, download: bool) -> Path:
    fname = f"data_{variant}.json"
    found = find_dataset_dir("clinc150", [fname], root)
    if found is not None:
        return found / fname
    url = _CLINC_URL.format(variant=variant)
    if root is not None or not download or is_offline():
        err = _not_found(f"CLINC150 file {fname}", ["clinc150"], root, fname,
                         f"{url} (github.com/clinc/oos-eval, data/)")
        reason = ("a root folder was given" if root is not None else
                  "download=False" if not download else "OODSCOPE_OFFLINE is set")
        raise FileNotFoundError(f"{err}\nNothing was downloaded: {reason}.")
    target = cache_root() / "clinc150" / fname
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
    digest = file_sha256(tmp)
    if digest != _CLINC_SHA256[variant]:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"Checksum mismatch for {url}: got {digest}, expected {_CLINC_SHA256[variant]}.")
    tmp.replace(target)
    return target


# ----------------------------------------------------------------- label handling
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


def _split_out_of_scope(splits: dict[str, TextSplit], prefix: str = "oos_") -> dict[str, TextSplit]:
    """Each split's in-scope part keeps its name; its out-of-scope part becomes
    ``<prefix><name>`` (the CLINC150 layout)."""
    out: dict[str, TextSplit] = {}
    for split, s in splits.items():
        out[split] = s.subset(np.flatnonzero(s.labels != OOS_LABEL))
        oos = np.flatnonzero(s.labels == OOS_LABEL)
        if len(oos):
            out[f"{prefix}{split}"] = s.subset(oos)
    return out


# ----------------------------------------------------------------- CLINC150
def load_clinc150(variant: str = "full", root: str | Path | None = None, download: bool = True) -> TextDataset:
    """CLINC150 (Larson et al., 2019, "An Evaluation Dataset for Intent Classification and
    Out-of-Scope Prediction"): 150 intents in 10 domains plus out-of-scope queries.

    Release layout (github.com/clinc/oos-eval, ``data/data_{full,small,imbalanced,oos_plus}.json``,
    commit 48a0e1c): one JSON object ``{"train": [[text, intent], ...], "val": ..., "test": ...,
    "oos_train": ..., "oos_val": ..., "oos_test": ...}``; out-of-scope rows have intent ``"oos"``.
    Found as ``clinc150/data_<variant>.json``, else downloaded (sha256-checked) into the user cache.

    Splits: ``train``/``val``/``test`` (in-scope) and ``oos_train``/``oos_val``/``oos_test``.
    """
    if variant not in CLINC150_VARIANTS:
        raise ValueError(f"Unknown CLINC150 variant {variant!r}; choose one of {CLINC150_VARIANTS}.")
    path = _clinc_file(variant, root, download)
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a CLINC150 JSON file ({exc}).") from exc
    expected = ("train", "val", "test", "oos_train", "oos_val", "oos_test")
    if not isinstance(raw, dict) or set(expected) - set(raw):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path} is not a CLINC150 file: expected splits {list(expected)}, found {found}.")
    named = {}
    for k in expected:
        rows = raw[k]
        bad = next((i for i, r in enumerate(rows) if not (isinstance(r, list) and len(r) == 2
                                                          and all(isinstance(v, str) for v in r))), None)
        if bad is not None:
            raise ValueError(f"{path}: {k}[{bad}] is {rows[bad]!r}; expected [text, intent].")
        named[k] = ([r[0] for r in rows], [r[1] for r in rows])
        check_plausible_texts(named[k][0], f"{path} split {k!r}")
    _check_classes(named["train"][1], f"{path} split 'train'")
    splits, names = _encode_labels(named, "train", oos_names=["oos"])
    for k in ("oos_train", "oos_val", "oos_test"):
        if np.any(splits[k].labels != OOS_LABEL):
            raise ValueError(f"{path}: split {k} should hold only 'oos' queries.")
    for k in ("train", "val", "test"):
        if np.any(splits[k].labels == OOS_LABEL):
            raise ValueError(f"{path}: in-scope split {k} holds 'oos' queries.")
    groups = {"oos": {s: f"oos_{s}" for s in ("train", "val", "test")}}
    return TextDataset(f"clinc150_{variant}", splits, names, {"source": str(path), "variant": variant},
                       groups)


# ----------------------------------------------------------------- generic files
def _read_table(path: Path, text_column: str, label_column: str | None) -> tuple[list[str], list[str] | None]:
    suffix = path.suffix.lower()
    rows: list[dict]
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{i + 1} is not valid JSON: {exc}") from exc
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(row).__name__}.")
                    rows.append(row)
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            rows = []
            for row in reader:
                if None in row or None in row.values():  # more / fewer fields than the header
                    raise ValueError(
                        f"{path}:{reader.line_num}: wrong number of fields for the header "
                        f"{reader.fieldnames} (quote fields that contain the delimiter).")
                rows.append(row)
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
    """Texts and string labels from one ``.csv``, ``.tsv`` (both with a header row) or
    ``.jsonl`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No text file at {path}.")
    texts, labels = _read_table(path, text_column, label_column)
    texts = validate_texts(texts, f"{path} column {text_column!r}")
    check_plausible_texts(texts, f"{path} column {text_column!r}")
    return texts, labels


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
    named = {split: load_text_file(path, text_column, label_column) for split, path in files.items()}
    in_scope = [l for l in named[fit_split][1] if l not in set(oos_labels)]
    if not in_scope:
        raise ValueError(f"{files[fit_split]}: no in-scope rows (every label is in {list(oos_labels)}).")
    _check_classes(in_scope, f"{files[fit_split]} column {label_column!r}")
    splits, names = _encode_labels(named, fit_split, oos_labels, unknown)
    return TextDataset(name, splits, names, {"files": {k: str(v) for k, v in files.items()}})


def load_labelled_file(path: str | Path, text_column: str = "text", label_column: str = "label",
                    oos_label: str = "oos", seed: int = 0) -> TextDataset:
    """One labelled ``.csv``/``.tsv``/``.jsonl`` file as an OOD benchmark dataset: the in-scope
    rows split 60/20/20 into ``train``/``val``/``test`` (stratified by label, seeded), the rows
    labelled ``oos_label`` in two halves, ``oos_val`` (for tuning) and ``oos_test`` (the test
    OOD set), which share no row."""
    from ..data.dataset import holdout_split

    texts, labels = load_text_file(path, text_column, label_column)
    if labels is None:
        raise ValueError(f"{path}: needs a label column ({label_column!r}).")
    is_oos = np.asarray([lab == oos_label for lab in labels])
    oos_idx, in_idx = np.flatnonzero(is_oos), np.flatnonzero(~is_oos)
    if len(oos_idx) < 2:
        raise ValueError(f"{path}: {len(oos_idx)} rows labelled {oos_label!r}; at least two out-of-scope rows "
                         "are needed (one to tune on, one to test on). Set the OOS label with --oos-label.")
    in_labels = [labels[i] for i in in_idx]
    _check_classes(in_labels, f"{path} column {label_column!r}")
    rng = np.random.default_rng(seed)
    oos_perm = rng.permutation(oos_idx)
    half = len(oos_perm) // 2
    n_test = max(1, round(0.2 * len(in_idx)))
    rest, test_pos = holdout_split(np.asarray(in_labels), n_test, seed)
    fit_pos, val_pos = holdout_split(np.asarray(in_labels)[rest], n_test, seed + 1)
    parts = {"train": in_idx[rest[fit_pos]], "val": in_idx[rest[val_pos]], "test": in_idx[test_pos],
             "oos_val": np.sort(oos_perm[:half]), "oos_test": np.sort(oos_perm[half:])}
    named = {k: ([texts[i] for i in idx], [labels[i] for i in idx]) for k, idx in parts.items()}
    splits, names = _encode_labels(named, "train", [oos_label], unknown="error")
    return TextDataset(Path(path).stem, splits, names, {"source": str(path)},
                       {"oos": {"val": "oos_val", "test": "oos_test"}})


# ----------------------------------------------------------------- Few-Shot-Intent-Detection layout
def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc}).") from exc


def read_seq_label(folder: str | Path) -> tuple[list[str], list[str]]:
    """One split of the Few-Shot-Intent-Detection layout: ``<folder>/seq.in`` (one utterance
    per line) and ``<folder>/label`` (its intent, same line).

    The published BANKING77-OOS files hold blank lines in ``seq.in`` that have no line in
    ``label`` (utterances of the BANKING77 source that contained a line break); when the
    extra lines of ``seq.in`` are exactly its blank lines they are dropped, which makes the
    two files line up again. Any other mismatch raises ``ValueError``.
    """
    folder = Path(folder)
    seq, lab = folder / "seq.in", folder / "label"
    for f in (seq, lab):
        if not f.is_file():
            raise ValueError(f"{f} is missing: each split folder of this layout holds seq.in and label.")
    texts, labels = _read_lines(seq), _read_lines(lab)
    blank = sum(1 for t in texts if not t)
    if len(texts) != len(labels):
        if len(texts) - blank != len(labels):
            raise ValueError(
                f"{seq} has {len(texts)} lines ({blank} blank) but {lab} has {len(labels)}: "
                "the two files do not line up, so no text can be paired with its label.")
        texts = [t for t in texts if t]
    elif blank:  # blank utterances with a label of their own: drop the pairs
        keep = [i for i, t in enumerate(texts) if t]
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    empty = next((i for i, l in enumerate(labels) if not l), None)
    if empty is not None:
        raise ValueError(f"{lab}: line {empty + 1} is blank; every utterance needs a label.")
    if not texts:
        raise ValueError(f"{seq} is empty.")
    check_plausible_texts(texts, str(seq))
    return texts, labels


_SPLIT_FOLDERS = {"train": "train", "val": "valid", "test": "test"}


def _load_fsid_release(root: Path, name: str, oos_folders: dict[str, tuple[str, ...]],
                       oos_label: str = "oos") -> TextDataset:
    """In-scope ``train``/``valid``/``test`` folders plus out-of-scope group folders
    (``id-oos/``, ``ood-oos/``) whose ``label`` files say ``oos`` on every line."""
    named, sources = {}, {}
    for split, folder in _SPLIT_FOLDERS.items():
        d = root / folder
        if not d.is_dir():
            raise ValueError(f"{root}: the release has a {folder}/ folder (seq.in + label); it is missing.")
        texts, labels = read_seq_label(d)
        if oos_label in labels:
            raise ValueError(f"{d / 'label'}: {labels.count(oos_label)} rows labelled {oos_label!r} in an "
                             "in-scope split; this release keeps its out-of-scope queries in "
                             f"{'/, '.join(oos_folders)}/ (wrong folder?).")
        named[split], sources[split] = (texts, labels), str(d)
    _check_classes(named["train"][1], str(root / "train" / "label"))
    in_scope = set(named["train"][1])
    groups: dict[str, dict[str, str]] = {}
    for group, group_splits in oos_folders.items():
        gdir = root / group
        if not gdir.is_dir():
            raise ValueError(f"{root}: the release's out-of-scope folder {group}/ is missing "
                             f"(it holds {', '.join(_SPLIT_FOLDERS[s] for s in group_splits)}/).")
        prefix = group.replace("-", "_")
        for split in group_splits:
            d = gdir / _SPLIT_FOLDERS[split]
            if not d.is_dir():
                raise ValueError(f"{gdir}: the release has {_SPLIT_FOLDERS[split]}/ here; it is missing.")
            texts, labels = read_seq_label(d)
            wrong = sorted(set(labels) - {oos_label})
            if wrong:
                raise ValueError(f"{d / 'label'}: out-of-scope rows must be labelled {oos_label!r}, "
                                 f"found {wrong[:3]}.")
            original = d / "label_original"
            if original.is_file():
                clash = sorted(set(_read_lines(original)) & in_scope)
                if clash:
                    raise ValueError(f"{original}: held-out intents {clash[:3]} are also in-scope classes "
                                     "of train/; this is not an out-of-scope split.")
            key = f"{prefix}_{split}"
            named[key], sources[key] = (texts, labels), str(d)
            groups.setdefault(group, {})[split] = key
    splits, names = _encode_labels(named, "train", [oos_label])
    return TextDataset(name, splits, names, {"source": str(root), "files": sources}, groups)


_FSID_HOME = "github.com/jianguoz/Few-Shot-Intent-Detection, Datasets/"


def load_banking77_oos(root: str | Path | None = None) -> TextDataset:
    """BANKING77-OOS (Zhang et al., 2021, "Are Pretrained Transformers Robust in Intent
    Classification? A Missing Ingredient in Evaluation of Out-of-Scope Intent Detection").

    Release layout (github.com/jianguoz/Few-Shot-Intent-Detection, ``Datasets/BANKING77-OOS/``,
    commit e8b107d): ``train/``, ``valid/``, ``test/`` (50 in-scope intents) and the out-of-scope
    groups ``id-oos/{train,valid,test}/`` (27 held-out banking intents, near OOS) and
    ``ood-oos/{valid,test}/`` (general queries, far OOS); every folder holds ``seq.in`` and
    ``label`` (``oos`` in the OOS folders, with the held-out intent in ``id-oos/*/label_original``).
    Found as ``banking77-oos/`` (or the release name ``BANKING77-OOS/``).

    Splits: ``train``, ``val``, ``test``, ``id_oos_train``, ``id_oos_val``, ``id_oos_test``,
    ``ood_oos_val``, ``ood_oos_test``; ``oos_groups`` maps ``id-oos`` / ``ood-oos`` to them.
    """
    names = ("banking77-oos", "BANKING77-OOS")
    found = _find_release(names, ["train/seq.in", "train/label"], root)
    if found is None:
        raise _not_found("BANKING77-OOS", names, root, "train/, valid/, test/, id-oos/ and ood-oos/ "
                         "(seq.in + label in each split folder)", _FSID_HOME + "BANKING77-OOS")
    return _load_fsid_release(found, "banking77_oos",
                              {"id-oos": ("train", "val", "test"), "ood-oos": ("val", "test")})


CLINC_SINGLE_DOMAINS = ("banking", "credit_cards")


def load_clinc_single_domain_oos(domain: str = "banking", root: str | Path | None = None) -> TextDataset:
    """CLINC-Single-Domain-OOS (Zhang et al., 2021): one CLINC150 domain, ``banking`` or
    ``credit_cards``, with 10 in-scope intents.

    Release layout (github.com/jianguoz/Few-Shot-Intent-Detection,
    ``Datasets/CLINC-Single-Domain-OOS/<domain>/``, commit e8b107d): ``train/``, ``valid/``,
    ``test/``, ``id-oos/{valid,test}/`` (the domain's 5 held-out intents) and
    ``ood-oos/{valid,test}/``, each with ``seq.in`` and ``label``. Found as
    ``clinc-single-domain-oos/<domain>/`` (or ``CLINC-Single-Domain-OOS/<domain>/``); ``root``
    may be the domain folder or the folder holding it.

    Splits: ``train``, ``val``, ``test``, ``id_oos_val``, ``id_oos_test``, ``ood_oos_val``,
    ``ood_oos_test``.
    """
    if domain not in CLINC_SINGLE_DOMAINS:
        raise ValueError(f"Unknown CLINC-Single-Domain-OOS domain {domain!r}; choose one of {CLINC_SINGLE_DOMAINS}.")
    names = (f"clinc-single-domain-oos/{domain}", f"CLINC-Single-Domain-OOS/{domain}")
    # an explicit root may also be the release's CLINC-Single-Domain-OOS/ folder itself
    found = _find_release(names + ((domain,) if root is not None else ()), ["train/seq.in", "train/label"], root)
    if found is None:
        raise _not_found(f"CLINC-Single-Domain-OOS ({domain})", names, root,
                         "train/, valid/, test/, id-oos/ and ood-oos/ (seq.in + label in each split folder)",
                         _FSID_HOME + f"CLINC-Single-Domain-OOS/{domain}")
    return _load_fsid_release(found, f"clinc_single_domain_oos_{domain}",
                              {"id-oos": ("val", "test"), "ood-oos": ("val", "test")})


# ----------------------------------------------------------------- ROSTD
_ROSTD_FILES = (("train", "OODRemovedtrain.tsv"), ("val", "eval.tsv"), ("test", "test.tsv"))
_ROSTD_OOD = "outOfDomain"


def read_rostd_tsv(path: str | Path) -> tuple[list[str], list[str]]:
    """One ROSTD file: rows ``label<TAB>slots<TAB>utterance<TAB>language`` with no header
    (in-domain rows have slots ``" "`` and language ``E``; out-of-domain rows are
    ``outOfDomain<TAB>FILLER<TAB>utterance<TAB>FILLER``). Returns ``(utterances, labels)``."""
    path = Path(path)
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as fh:
        for i, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")  # no csv quoting: utterances contain bare '"'
            if len(cols) != 4:
                raise ValueError(
                    f"{path}:{i}: expected 4 tab-separated columns (label, slots, utterance, language), "
                    f"found {len(cols)}: {line[:80]!r}.")
            if i == 1 and cols[0].strip().lower() in ("label", "intent"):
                continue  # a header row (the release has none)
            label, text = cols[0].strip(), cols[2].strip()
            if not label or not text:
                raise ValueError(f"{path}:{i}: empty {'label' if not label else 'utterance'} column.")
            texts.append(text)
            labels.append(label)
    if not texts:
        raise ValueError(f"{path} has no rows.")
    check_plausible_texts(texts, f"{path} column 3 (utterance)")
    return texts, labels


def load_rostd(root: str | Path | None = None, coarse: bool = False) -> TextDataset:
    """ROSTD (Gangal et al., 2020, "Likelihood Ratios and Generative Classifiers for
    Unsupervised Out-of-Domain Detection in Task Oriented Dialog"): English task-oriented
    dialog intents (alarm, reminder, weather) with the authors' out-of-domain queries.

    Release layout (github.com/vgtomahawk/LR_GC_OOD, ``code/data/fbrelease/unsup/``, commit
    e5439ce; ``code/data/fbreleasecoarse/unsup/`` for ``coarse=True``, commit c8c4e65):
    ``OODRemovedtrain.tsv`` (in-domain only), ``eval.tsv`` and ``test.tsv`` (in-domain mixed
    with ``outOfDomain`` rows), format in `read_rostd_tsv`. Found as ``rostd/`` (``rostd-coarse/``
    with ``coarse=True``; also under the release names ``fbrelease/`` / ``fbreleasecoarse/``),
    the three files either directly inside or in its ``unsup/`` folder.

    Splits: ``train``, ``val``, ``oos_val``, ``test``, ``oos_test``.
    """
    names = ("rostd-coarse", "fbreleasecoarse") if coarse else ("rostd", "fbrelease")
    flat = [f for _, f in _ROSTD_FILES]
    found = _find_release(names, flat, root)
    if found is None:
        found = _find_release(names, [f"unsup/{f}" for f in flat], root)
        found = found / "unsup" if found is not None else None
    if found is None:
        raise _not_found("ROSTD" + (" (coarse labels)" if coarse else ""), names, root,
                         f"{', '.join(flat)} (directly or in unsup/)",
                         "github.com/vgtomahawk/LR_GC_OOD, code/data/"
                         + ("fbreleasecoarse" if coarse else "fbrelease") + "/unsup/")
    named = {}
    for split, fname in _ROSTD_FILES:
        texts, labels = read_rostd_tsv(found / fname)
        if split != "train" and _ROSTD_OOD not in labels:
            raise ValueError(f"{found / fname}: no {_ROSTD_OOD!r} rows; the release's {fname} mixes "
                             "in-domain and out-of-domain queries (wrong file?).")
        named[split] = (texts, labels)
    train_in = [l for l in named["train"][1] if l != _ROSTD_OOD]
    if not train_in:
        raise ValueError(f"{found / _ROSTD_FILES[0][1]}: no in-domain rows.")
    _check_classes(train_in, str(found / _ROSTD_FILES[0][1]))
    splits_enc, names_ = _encode_labels(named, "train", [_ROSTD_OOD], unknown="error")
    out = _split_out_of_scope(splits_enc)
    groups = {"oos": {s: f"oos_{s}" for s in ("train", "val", "test") if f"oos_{s}" in out}}
    return TextDataset("rostd_coarse" if coarse else "rostd", out, names_, {"source": str(found)}, groups)
