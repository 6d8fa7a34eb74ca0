"""Text loaders: CLINC150 from the shared data, and tiny generated files in the public
formats of the generic CSV/TSV/JSONL loader, BANKING77-OOS / CLINC-Single-Domain-OOS
(Few-Shot-Intent-Detection layout) and ROSTD (TSV)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oodscope.text import data as td


def _clinc_available() -> bool:
    return td.find_dataset_dir("clinc150", ["data_small.json"]) is not None


@pytest.mark.skipif(not _clinc_available(), reason="CLINC150 not in $OODSCOPE_DATA")
def test_clinc150_full_and_small():
    full = td.load_clinc150("full", download=False)
    sizes = {k: len(v) for k, v in full.splits.items()}
    assert sizes == {"train": 15000, "val": 3000, "test": 4500, "oos_train": 100, "oos_val": 100, "oos_test": 1000}
    assert full.num_classes == 150
    assert set(np.unique(full["train"].labels)) == set(range(150))
    assert np.all(full["oos_test"].labels == -1)
    # Label indices refer to one shared, sorted name list in every split.
    i = int(np.flatnonzero(np.array(full.label_names) == "translate")[0])
    assert full["train"].labels[0] == i and "italian" in full["train"].texts[0]
    small = td.load_clinc150("small", download=False)
    assert len(small["train"]) == 7500 and small.label_names == full.label_names
    sub = full.subsample(50)
    assert all(len(s) <= 50 for s in sub.splits.values())
    with pytest.raises(ValueError, match="variant"):
        td.load_clinc150("huge")


def test_clinc150_missing_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OODSCOPE_DATA", str(tmp_path / "nothing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="clinc150"):
        td.load_clinc150("full", download=False)


def test_clinc150_from_env_folder(tmp_path, monkeypatch):
    d = tmp_path / "clinc150"
    d.mkdir()
    raw = {"train": [["hi there", "greet"], ["bye now", "bye"]], "val": [["hello", "greet"]],
           "test": [["so long", "bye"]], "oos_train": [["what is love", "oos"]],
           "oos_val": [["buy a boat", "oos"]], "oos_test": [["sing a song", "oos"]]}
    (d / "data_full.json").write_text(json.dumps(raw))
    monkeypatch.setenv("OODSCOPE_DATA", str(tmp_path))
    ds = td.load_clinc150("full", download=False)
    assert ds.label_names == ["bye", "greet"]
    assert ds["train"].labels.tolist() == [1, 0] and ds["oos_val"].labels.tolist() == [-1]
    raw["test"] = [["so long", "unseen_intent"]]
    (d / "data_full.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unseen_intent"):
        td.load_clinc150("full", download=False)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_generic_text_files(tmp_path, fmt):
    rows = {"train": [("book a flight", "travel"), ("play jazz", "music"), ("fly to rome", "travel")],
            "test": [("play rock", "music"), ("what is the meaning of life", "oos")]}
    files = {}
    for split, rs in rows.items():
        p = tmp_path / f"{split}.{fmt}"
        if fmt == "jsonl":
            p.write_text("\n".join(json.dumps({"utterance": t, "intent": l}) for t, l in rs) + "\n")
        else:
            sep = "\t" if fmt == "tsv" else ","
            p.write_text(f"utterance{sep}intent\n" + "".join(f'"{t}"{sep}{l}\n' for t, l in rs))
        files[split] = p
    ds = td.load_text_dataset(files, text_column="utterance", label_column="intent")
    assert ds.label_names == ["music", "travel"]
    assert ds["train"].labels.tolist() == [1, 0, 1]
    assert ds["test"].labels.tolist() == [0, -1]
    assert ds["test"].texts[1] == "what is the meaning of life"
    with pytest.raises(ValueError, match="no column"):
        td.load_text_dataset(files, text_column="text", label_column="intent")


def test_unknown_labels_and_bad_texts(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nhello,a\nbye,b\n")
    (tmp_path / "val.csv").write_text("text,label\nhey,c\n")
    files = {"train": tmp_path / "train.csv", "val": tmp_path / "val.csv"}
    with pytest.raises(ValueError, match="never appears in 'train'"):
        td.load_text_dataset(files)
    ds = td.load_text_dataset(files, unknown="oos")
    assert ds["val"].labels.tolist() == [-1]
    (tmp_path / "empty.csv").write_text("text,label\n,a\nbye,b\n")
    with pytest.raises(ValueError, match="empty string"):
        td.load_text_dataset({"train": tmp_path / "empty.csv"})
    with pytest.raises(ValueError, match=r"texts\[1\] is a int"):
        td.TextSplit(["ok", 3], [0, 1])
    with pytest.raises(ValueError, match="2 texts but 3 labels"):
        td.TextSplit(["ok", "fine"], [0, 1, 1])
    with pytest.raises(ValueError, match="single string"):
        td.validate_texts("just one")
    with pytest.raises(ValueError, match="unsupported"):
        td.load_text_file(_touch(tmp_path / "x.parquet"))


def _touch(p: Path) -> Path:
    p.write_text("x")
    return p


def _write_fsid(root: Path, splits: dict[str, list[tuple[str, str]]]) -> None:
    for split, rows in splits.items():
        d = root / split
        d.mkdir(parents=True)
        (d / "seq.in").write_text("".join(t + "\n" for t, _ in rows))
        (d / "label").write_text("".join(l + "\n" for _, l in rows))


def test_banking77_oos_and_single_domain(tmp_path, monkeypatch):
    rows = {"train": [("card lost", "lost_card"), ("top up failed", "top_up_failed"), ("card gone", "lost_card")],
            "valid": [("where is my card", "lost_card"), ("weather today", "oos")],
            "test": [("top up did not work", "top_up_failed"), ("tell a joke", "oos"), ("sing", "oos")]}
    _write_fsid(tmp_path / "banking77_oos", rows)
    _write_fsid(tmp_path / "clinc_single_domain_oos" / "banking", rows)
    monkeypatch.setenv("OODSCOPE_DATA", str(tmp_path))
    for ds in (td.load_banking77_oos(), td.load_clinc_single_domain_oos("banking")):
        assert ds.label_names == ["lost_card", "top_up_failed"]
        assert {k: len(v) for k, v in ds.splits.items()} == {"train": 3, "valid": 1, "oos_valid": 1, "test": 1, "oos_test": 2}
        assert ds["oos_test"].texts == ["tell a joke", "sing"]
        assert np.all(ds["oos_test"].labels == -1)
    with pytest.raises(FileNotFoundError, match="credit_cards"):
        td.load_clinc_single_domain_oos("credit_cards")
    (tmp_path / "banking77_oos" / "test" / "label").write_text("oos\n")
    with pytest.raises(ValueError, match="seq.in has 3 lines but label has 1"):
        td.load_banking77_oos()


def test_rostd(tmp_path, monkeypatch):
    d = tmp_path / "rostd"
    d.mkdir()
    (d / "train.tsv").write_text("weather/find\tO O\tis it raining\nalarm/set_alarm\tO O\twake me at 7\n")
    (d / "eval.tsv").write_text("weather/find\tO\twill it snow\noutOfDomain\tO\twho won the game\n")
    (d / "test.tsv").write_text("alarm/set_alarm\tO\talarm at noon\noutOfDomain\tO\tbest pizza near me\n")
    monkeypatch.setenv("OODSCOPE_DATA", str(tmp_path))
    ds = td.load_rostd()
    assert ds.label_names == ["alarm/set_alarm", "weather/find"]
    assert ds["val"].texts == ["will it snow"] and ds["oos_val"].texts == ["who won the game"]
    assert ds["test"].labels.tolist() == [0] and ds["oos_test"].labels.tolist() == [-1]
    monkeypatch.setenv("OODSCOPE_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="ROSTD"):
        td.load_rostd()
