"""Text loaders on fixtures in each release's exact layout (tests/fixtures/, see its README),
on broken copies of them, and on the real CLINC150 files when they are available."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from oodscope.data import registry
from oodscope.text import data as td

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No dataset anywhere: empty data folder and cache, no system folders, no network."""
    monkeypatch.setenv("OODSCOPE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("OODSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OODSCOPE_OFFLINE", "1")
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", ())
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def _copy(name: str, dest: Path) -> Path:
    target = dest / name
    shutil.copytree(FIXTURES / name, target)
    return target


def _drop_line(path: Path, index: int) -> None:
    lines = path.read_text().splitlines()
    del lines[index]
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------ the real CLINC150 files
@pytest.mark.requires_data("clinc150")
def test_clinc150_real_files_all_variants():
    sizes = {"full": 15000, "small": 7500, "imbalanced": 10525, "oos_plus": 15000}
    full = None
    for variant, n_train in sizes.items():
        ds = td.load_clinc150(variant, download=False)
        assert {k: len(v) for k, v in ds.splits.items()} == {
            "train": n_train, "val": 3000, "test": 4500,
            "oos_train": 250 if variant == "oos_plus" else 100, "oos_val": 100, "oos_test": 1000}
        assert ds.num_classes == 150 and set(np.unique(ds["train"].labels)) == set(range(150))
        assert ds.oos_groups == {"oos": {"train": "oos_train", "val": "oos_val", "test": "oos_test"}}
        full = full or ds
        assert ds.label_names == full.label_names
    i = full.label_names.index("translate")
    assert full["train"].labels[0] == i and "italian" in full["train"].texts[0]
    assert all(len(s) <= 50 for s in full.subsample(50).splits.values())
    assert full.subsample(50).oos_groups == full.oos_groups


# ------------------------------------------------------------------ CLINC150 layout
def test_clinc150_fixture_and_lookup(nowhere):
    ds = td.load_clinc150("full", root=FIXTURES)
    assert ds.label_names == ["balance", "translate"]
    assert ds["train"].labels.tolist() == [1, 1, 0, 0] and ds["oos_test"].labels.tolist() == [-1, -1]
    _copy("clinc150", nowhere)  # the same file found through OODSCOPE_DATA
    assert td.load_clinc150("full", download=False)["val"].texts == ds["val"].texts


def test_clinc150_missing_says_where_to_put_it_and_never_downloads_offline(nowhere):
    with pytest.raises(FileNotFoundError) as err:
        td.load_clinc150("small")  # download=True, but OODSCOPE_OFFLINE=1
    msg = str(err.value)
    assert str(nowhere / "clinc150") in msg and "data_small.json" in msg
    assert "raw.githubusercontent.com/clinc/oos-eval" in msg and "OODSCOPE_OFFLINE" in msg
    assert not (nowhere.parent / "cache" / "clinc150").exists()
    with pytest.raises(ValueError, match="variant"):
        td.load_clinc150("huge")


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw.pop("oos_val"), "missing|expected splits"),
    (lambda raw: raw["train"].append(["only the text"]), r"train\[4\]"),
    (lambda raw: raw["test"].append(["so long", "unseen_intent"]), "unseen_intent"),
    (lambda raw: raw["val"].append(["what's my balance", "oos"]), "in-scope split val"),
    (lambda raw: raw.update(train=[["same words", "a"], ["same words", "b"]]), "all 2 texts are the same"),
    (lambda raw: raw.update(train=[[t, "balance"] for t, _ in raw["train"]]), "at least two classes"),
])
def test_clinc150_malformed_files_are_refused(tmp_path, damage, message):
    d = _copy("clinc150", tmp_path)
    raw = json.loads((d / "data_full.json").read_text())
    damage(raw)
    (d / "data_full.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message) as err:
        td.load_clinc150("full", root=d)
    assert "data_full.json" in str(err.value) or "unseen_intent" in str(err.value)


# ------------------------------------------------------------------ BANKING77-OOS
def test_banking77_oos_release_layout():
    ds = td.load_banking77_oos(FIXTURES)
    assert ds.label_names == ["card_arrival", "top_up_failed", "transfer_timing"]
    assert {k: len(v) for k, v in ds.splits.items()} == {
        "train": 9, "val": 3, "test": 4, "id_oos_train": 3, "id_oos_val": 2, "id_oos_test": 5,
        "ood_oos_val": 3, "ood_oos_test": 3}
    assert ds.oos_groups == {"id-oos": {"train": "id_oos_train", "val": "id_oos_val", "test": "id_oos_test"},
                             "ood-oos": {"val": "ood_oos_val", "test": "ood_oos_test"}}
    for group in ds.oos_groups.values():
        assert all(np.all(ds[k].labels == -1) for k in group.values())
    # blank lines in seq.in (line breaks inside source utterances) are dropped, so every
    # text after them still meets its own label
    train = ds["train"]
    assert train.texts[5] == "top up is not working for me" and ds.label_names[train.labels[5]] == "top_up_failed"
    assert train.texts[6].startswith("how long does a transfer") and train.labels[6] == 2
    assert ds["id_oos_test"].texts == ["i need to know your exchange rates.",
                                       "my pin is not working and i need assistance.",
                                       "where can i get my pin unblocked?", "does this card work everywhere?",
                                       "what businesses accept this card?"]


def test_banking77_oos_found_under_canonical_and_release_names(nowhere):
    shutil.copytree(FIXTURES / "banking77-oos", nowhere / "BANKING77-OOS")
    assert len(td.load_banking77_oos()["id_oos_test"]) == 5
    shutil.rmtree(nowhere / "BANKING77-OOS")
    with pytest.raises(FileNotFoundError) as err:
        td.load_banking77_oos()
    assert str(nowhere / "banking77-oos") in str(err.value) and "Few-Shot-Intent-Detection" in str(err.value)


def _break_remove(rel):
    return lambda root: shutil.rmtree(root / rel)


@pytest.mark.parametrize("damage, where, message", [
    (_break_remove("id-oos"), "banking77-oos", "id-oos/ is missing"),
    (_break_remove("ood-oos/test"), "ood-oos", "test/ here; it is missing"),
    (_break_remove("valid"), "banking77-oos", "valid/ folder"),
    (lambda r: (r / "test" / "label").unlink(), "test/label", "missing"),
    (lambda r: _drop_line(r / "valid" / "label", 1), "valid/seq.in", "do not line up"),
    (lambda r: _drop_line(r / "id-oos" / "test" / "label", 0), "id-oos/test/seq.in", r"8 lines \(3 blank\) but .* has 4"),
    (lambda r: (r / "train" / "label").write_text("card_arrival\n\n" + "top_up_failed\n" * 7),
     "train/label", "line 2 is blank"),
    (lambda r: (r / "test" / "label").write_text("card_arrival\noos\noos\ntop_up_failed\n"),
     "test/label", "in an in-scope split"),
    (lambda r: (r / "ood-oos" / "valid" / "label").write_text("oos\ncard_arrival\noos\n"),
     "ood-oos/valid/label", "must be labelled 'oos'"),
    (lambda r: (r / "id-oos" / "valid" / "label_original").write_text("exchange_rate\ncard_arrival\n"),
     "label_original", "also in-scope classes"),
    (lambda r: (r / "train" / "label").write_text("card_arrival\n" * 9), "train/label", "at least two classes"),
    (lambda r: (r / "ood-oos" / "test" / "seq.in").write_text("oos\noos\noos\n"), "ood-oos/test/seq.in",
     "all 3 texts are the same"),
])
def test_banking77_oos_malformed_release_is_refused(tmp_path, damage, where, message):
    root = _copy("banking77-oos", tmp_path)
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # stray files of the release are ignored
    damage(root)
    with pytest.raises(ValueError, match=message) as err:
        td.load_banking77_oos(root)
    assert where in str(err.value)


def test_read_seq_label_blank_utterance_with_its_own_label_is_dropped(tmp_path):
    (tmp_path / "seq.in").write_text("first\n\nthird\n")
    (tmp_path / "label").write_text("a\nb\nc\n")
    assert td.read_seq_label(tmp_path) == (["first", "third"], ["a", "c"])


# ------------------------------------------------------------------ CLINC-Single-Domain-OOS
@pytest.mark.parametrize("domain", ["banking", "credit_cards"])
def test_clinc_single_domain_oos_release_layout(domain):
    ds = td.load_clinc_single_domain_oos(domain, FIXTURES)
    assert ds.num_classes == 3 and ds.name == f"clinc_single_domain_oos_{domain}"
    assert {k: len(v) for k, v in ds.splits.items()} == {
        "train": 6, "val": 4, "test": 3, "id_oos_val": 2, "id_oos_test": 3, "ood_oos_val": 2, "ood_oos_test": 4}
    assert set(ds.oos_groups) == {"id-oos", "ood-oos"} and "train" not in ds.oos_groups["id-oos"]
    quoted = [t for t in ds["val"].texts if t.startswith('"')]
    assert len(quoted) == 1 and "\t" not in quoted[0]  # an unbalanced quote is read as a plain character


def test_clinc_single_domain_oos_errors(tmp_path, nowhere):
    with pytest.raises(ValueError, match="domain"):
        td.load_clinc_single_domain_oos("travel")
    with pytest.raises(FileNotFoundError, match="credit_cards"):
        td.load_clinc_single_domain_oos("credit_cards")
    root = tmp_path / "copy"
    shutil.copytree(FIXTURES / "clinc-single-domain-oos", root)
    shutil.rmtree(root / "banking" / "id-oos" / "valid")
    with pytest.raises(ValueError, match="valid/ here; it is missing"):
        td.load_clinc_single_domain_oos("banking", root)


# ------------------------------------------------------------------ ROSTD
def test_rostd_release_layout():
    ds = td.load_rostd(FIXTURES)
    assert ds.label_names == ["alarm/set_alarm", "alarm/snooze_alarm", "reminder/set_reminder", "weather/find"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 6, "val": 3, "oos_val": 2, "test": 3, "oos_test": 2}
    # the utterance is the third of four columns, not the language code in the last
    assert ds["val"].texts == ["What's today's high?", "Set an alarm", "Remind me to call mom"]
    assert ds["oos_val"].texts[1] == "How much was my last deposit into my checking"
    assert ds["oos_test"].texts[0].endswith('note attached "Happy birthday."""')
    assert ds.oos_groups == {"oos": {"val": "oos_val", "test": "oos_test"}}
    coarse = td.load_rostd(FIXTURES, coarse=True)
    assert coarse.label_names == ["alarm", "reminder", "weather"] and coarse["test"].texts == ds["test"].texts


def test_rostd_found_flat_or_in_unsup_under_release_names(nowhere):
    shutil.copytree(FIXTURES / "rostd" / "unsup", nowhere / "fbrelease")
    assert len(td.load_rostd()["train"]) == 6
    shutil.copytree(FIXTURES / "rostd-coarse", nowhere / "rostd-coarse")
    assert td.load_rostd(coarse=True).num_classes == 3
    with pytest.raises(FileNotFoundError, match="OODRemovedtrain.tsv"):
        td.load_rostd(nowhere / "elsewhere")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "eval.tsv").write_text("weather/find\t \tWill it rain\n"), r"eval.tsv:1: expected 4"),
    (lambda d: (d / "test.tsv").open("a").write("alarm/set_alarm\t \tset alarm\tE\textra\n"), r"test.tsv:6: expected 4"),
    # the language column where the utterance should be (what reading the last column gives)
    (lambda d: (d / "eval.tsv").write_text("".join(
        f"{lab}\t{slots}\t{code}\t{code}\n" for lab, slots, code in
        [("weather/find", " ", "E"), ("outOfDomain", "FILLER", "FILLER"), ("alarm/set_alarm", " ", "E")] * 3)),
     "eval.tsv column 3.*(code column|distinct)"),
    (lambda d: (d / "test.tsv").write_text("weather/find\t \tWill it rain\tE\nalarm/set_alarm\t \tSet alarm\tE\n"),
     "test.tsv: no 'outOfDomain' rows"),
    (lambda d: (d / "OODRemovedtrain.tsv").write_text("weather/find\t \tWill it rain\tE\nweather/find\t \tIs it hot\tE\n"),
     "OODRemovedtrain.tsv.*at least two classes"),
    (lambda d: (d / "eval.tsv").write_text("weather/find\t \t \tE\noutOfDomain\tFILLER\tpizza\tFILLER\n"),
     r"eval.tsv:1: empty utterance"),
    (lambda d: (d / "test.tsv").unlink(), "test.tsv"),
])
def test_rostd_malformed_files_are_refused(tmp_path, damage, message):
    root = _copy("rostd", tmp_path)
    damage(root / "unsup")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        td.load_rostd(root)


# ------------------------------------------------------------------ generic files and checks
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
    assert ds["train"].labels.tolist() == [1, 0, 1] and ds["test"].labels.tolist() == [0, -1]
    assert ds["test"].texts[1] == "what is the meaning of life"
    with pytest.raises(ValueError, match="no column"):
        td.load_text_dataset(files, text_column="text", label_column="intent")


def test_generic_files_malformed(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nhello,a\nbye,b\n")
    (tmp_path / "val.csv").write_text("text,label\nhey,c\n")
    files = {"train": tmp_path / "train.csv", "val": tmp_path / "val.csv"}
    with pytest.raises(ValueError, match="never appears in 'train'"):
        td.load_text_dataset(files)
    assert td.load_text_dataset(files, unknown="oos")["val"].labels.tolist() == [-1]
    (tmp_path / "wide.csv").write_text("text,label\nhello,a\nbye, now,b\n")
    with pytest.raises(ValueError, match=r"wide.csv:3: wrong number of fields"):
        td.load_text_dataset({"train": tmp_path / "wide.csv"})
    (tmp_path / "short.tsv").write_text("text\tlabel\nhello\ta\nbye\n")
    with pytest.raises(ValueError, match=r"short.tsv:3: wrong number of fields"):
        td.load_text_dataset({"train": tmp_path / "short.tsv"})
    (tmp_path / "empty.csv").write_text("text,label\n,a\nbye,b\n")
    with pytest.raises(ValueError, match="empty string"):
        td.load_text_dataset({"train": tmp_path / "empty.csv"})
    (tmp_path / "one.csv").write_text("text,label\nhello,a\nbye,a\n")
    with pytest.raises(ValueError, match="one.csv.*at least two classes"):
        td.load_text_dataset({"train": tmp_path / "one.csv"})
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(ValueError, match="unsupported"):
        td.load_text_file(tmp_path / "x.parquet")


def test_text_validation():
    with pytest.raises(ValueError, match=r"texts\[1\] is a int"):
        td.TextSplit(["ok", 3], [0, 1])
    with pytest.raises(ValueError, match="2 texts but 3 labels"):
        td.TextSplit(["ok", "fine"], [0, 1, 1])
    with pytest.raises(ValueError, match="single string"):
        td.validate_texts("just one")
    with pytest.raises(ValueError, match="code column"):
        td.check_plausible_texts(["E"] * 9 + ["a real sentence"], "x.tsv")
    with pytest.raises(ValueError, match="only 2 distinct texts among 40"):
        td.check_plausible_texts(["O O B-date", "O B-time O"] * 20, "x.tsv")
    td.check_plausible_texts(["hi", "set an alarm", "hi", "play jazz", "is it raining"], "ok.tsv")


def test_find_dataset_dir_order_alternatives_and_explicit_root(tmp_path, monkeypatch):
    env, cache, system = tmp_path / "env", tmp_path / "cache", tmp_path / "system"
    for base in (env, cache, system):
        (base / "thing" / "sub").mkdir(parents=True)
    (cache / "thing" / "a.txt").write_text("x")
    (system / "thing" / "sub" / "a.txt").write_text("x")
    monkeypatch.setenv("OODSCOPE_DATA", str(env))
    monkeypatch.setenv("OODSCOPE_CACHE", str(cache))
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", (system,))
    assert registry.search_paths("thing") == [env / "thing", cache / "thing", system / "thing"]
    assert registry.find_dataset_dir("thing") == env / "thing"
    assert registry.find_dataset_dir("thing", ["a.txt"]) == cache / "thing"
    assert registry.find_dataset_dir("thing", [("a.txt", "sub/a.txt")]) == cache / "thing"
    assert registry.find_dataset_dir("thing", ["sub/a.txt"]) == system / "thing"
    assert registry.find_dataset_dir("thing", ["b.txt"]) is None
    assert registry.find_dataset_dir("thing", ["a.txt"], root=system) is None  # an explicit root never falls back
    assert registry.find_dataset_dir("thing", ["sub/a.txt"], root=system) == system / "thing"
    assert td.find_dataset_dir is registry.find_dataset_dir
