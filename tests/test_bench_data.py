"""Benchmarks on your own data: the text releases (fixtures in their published layouts), a
labelled CSV/JSONL file (``bench text --data``) and image folders with a checkpoint
(``bench images``), end to end, with tiny encoders and networks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oodscope.bench import ProviderOptions, get_benchmark
from oodscope.bench.runner import run_benchmark
from oodscope.bench.text import build_text, detect_layout
from oodscope.cli import main
from oodscope.text.data import load_labelled_file

from test_text_bench import INTENTS, OOS, WHEN, BagOfWordsEncoder

torch = pytest.importorskip("torch")

FIXTURES = Path(__file__).parent / "fixtures"
DETECTORS = ["msp", "energy", "maxlogit"]
#: benchmark -> (fixture folder, {test OOD set: group})
RELEASES = {
    "banking77-oos": ("banking77-oos", {"id-oos": "near", "ood-oos": "far"}),
    "clinc-single-domain-oos": ("clinc-single-domain-oos/banking", {"id-oos": "near", "ood-oos": "far"}),
    "rostd": ("rostd", {"rostd_ood": "near"}),
    "clinc150": ("clinc150", {"clinc150_oos": "near"}),
}


def _options(tmp_path, **kw) -> ProviderOptions:
    return ProviderOptions(encoder=BagOfWordsEncoder(), finetune="none", cache_dir=tmp_path / "cache",
                           progress=False, **kw)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_benchmarks_run_end_to_end_on_their_fixtures(name, tmp_path):
    folder, groups = RELEASES[name]
    spec = get_benchmark(name)
    assert set(spec.near) | set(spec.far) == set(groups)
    res = run_benchmark(name, DETECTORS, ci=False, progress=False,
                        provider_options=_options(tmp_path, data_root=FIXTURES / folder))
    df = res.results
    ok = df[df.status == "ok"]
    assert set(ok.detector) == set(DETECTORS), res.skipped
    for ood_set, group in groups.items():
        rows = ok[ok.ood_set == ood_set]
        assert len(rows) == len(DETECTORS) and set(rows.group) == {group}
        assert rows.auroc.between(0, 1).all()
    assert res.info["val_ood_description"] == spec.val_ood and res.info["id_accuracy"] is not None


@pytest.mark.parametrize("name", ["banking77-oos", "clinc-single-domain-oos", "rostd"])
def test_tuning_sees_only_the_validation_out_of_scope_queries(name, tmp_path, monkeypatch):
    """The validation OOD set is exactly the release's valid/eval out-of-scope rows, each test
    OOD set exactly a test split, and the validation set is the only OOD data the tuner gets."""
    from oodscope.bench import runner
    from oodscope.text import data as T

    folder, groups = RELEASES[name]
    root = FIXTURES / folder
    options = _options(tmp_path, data_root=root, fields={"text", "logits", "features", "labels"})
    fs = build_text(get_benchmark(name), options)
    ds = T.load_rostd(root) if name == "rostd" else (
        T.load_banking77_oos(root) if name == "banking77-oos" else T.load_clinc_single_domain_oos("banking", root))
    release_groups = {"rostd_ood": "oos", "id-oos": "id-oos", "ood-oos": "ood-oos"}
    assert fs.val_ood.extras["text"].tolist() == [t for g in ds.oos_groups.values() for t in ds[g["val"]].texts]
    for ood_set in groups:
        feats = {**fs.near_ood, **fs.far_ood}[ood_set]
        assert feats.extras["text"].tolist() == ds[ds.oos_groups[release_groups[ood_set]]["test"]].texts

    seen = []
    real_tune = runner.tune

    def spy(det, train, val_id, val_ood, **kw):
        seen.append(val_ood)
        return real_tune(det, train, val_id, val_ood, **kw)

    monkeypatch.setattr(runner, "tune", spy)
    run_benchmark(name, ["energy", "knn"], ci=False, progress=False, provider_options=options)
    assert seen, "a detector with a search space was tuned"
    for val_ood in seen:
        np.testing.assert_array_equal(val_ood.features, fs.val_ood.features)


def _write_intents(path: Path, n_per_class: int = 12, oos_label: str = "oos") -> None:
    rng = np.random.default_rng(0)
    rows = [{"utterance": rng.choice(t).format(rng.choice(WHEN)), "intent": k}
            for k, ts in INTENTS.items() for t in [ts] for _ in range(n_per_class)]
    rows += [{"utterance": f"{q} {w}", "intent": oos_label} for q in OOS for w in WHEN[:2]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_labelled_file_splits_are_stratified_and_disjoint(tmp_path):
    f = tmp_path / "intents.jsonl"
    _write_intents(f, oos_label="out_of_scope")
    ds = load_labelled_file(f, "utterance", "intent", "out_of_scope", seed=1)
    assert ds.label_names == sorted(INTENTS)
    sizes = {k: len(v) for k, v in ds.splits.items()}
    assert sizes == {"train": 22, "val": 7, "test": 7, "oos_val": 6, "oos_test": 6}
    for k in ("train", "val", "test"):
        assert len(np.unique(ds[k].labels)) == 3 and (ds[k].labels >= 0).all()
    assert not set(ds["oos_val"].texts) & set(ds["oos_test"].texts)
    with pytest.raises(ValueError, match="--oos-label"):
        load_labelled_file(f, "utterance", "intent", "nope")


def test_detect_layout_of_every_release_and_of_files(tmp_path):
    assert detect_layout(FIXTURES / "banking77-oos") == ("banking77-oos", {})
    assert detect_layout(FIXTURES / "clinc-single-domain-oos") == ("clinc-single-domain-oos", {"domain": "banking"})
    assert detect_layout(FIXTURES / "clinc-single-domain-oos" / "credit_cards") == (
        "clinc-single-domain-oos", {"domain": "credit_cards"})
    assert detect_layout(FIXTURES / "rostd") == ("rostd", {})
    assert detect_layout(FIXTURES / "clinc150") == ("clinc150", {})
    (tmp_path / "a.csv").write_text("text,label\nhi,x\n")
    assert detect_layout(tmp_path / "a.csv") == ("text", {"dataset": "file"})
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(ValueError, match=".csv, .tsv or .jsonl"):
        detect_layout(tmp_path / "a.txt")
    with pytest.raises(ValueError, match="not a layout"):
        detect_layout(tmp_path)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer random BERT and a word-level tokenizer (the real loading path, no download)."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for ts in INTENTS.values() for t in ts for w in t.split()} | {w for q in OOS for w in q.split()}
                   | {w for w in " ".join(WHEN).split()} | {"{}"})
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = transformers.BertTokenizerFast(str(d / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_bench_text_with_a_file_and_with_a_release_folder(tiny_bert, tmp_path, capsys):
    f = tmp_path / "intents.csv"
    rows = [json.loads(line) for line in _texts_jsonl(tmp_path).read_text().splitlines()]
    f.write_text("utterance,intent\n" + "".join(f"{r['utterance']},{r['intent']}\n" for r in rows))
    out = tmp_path / "run"
    rc = main(["bench", "text", "--data", str(f), "--text-column", "utterance", "--label-column", "intent",
               "--encoder", f"hf:{tiny_bert}", "--detectors", "msp,energy", "--n-boot", "0", "--no-report",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    js = json.loads((out / "results.json").read_text())
    ok = [r for r in js["rows"] if r["status"] == "ok"]
    assert {r["ood_set"] for r in ok} == {"oos", "near (mean)"} and {r["detector"] for r in ok} == {"msp", "energy"}
    assert js["info"]["splits"]["val_ood"] == 6 and js["info"]["splits"]["oos"] == 6
    rc = main(["bench", "text", "--data", str(FIXTURES / "banking77-oos"), "--encoder", f"hf:{tiny_bert}",
               "--finetune", "none", "--detectors", "msp", "--n-boot", "0", "--no-report",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "b77")])
    assert rc == 0, capsys.readouterr().err
    js = json.loads((tmp_path / "b77" / "results.json").read_text())
    assert {r["ood_set"] for r in js["rows"]} >= {"id-oos", "ood-oos"}
    assert any("banking77-oos" in n for n in js["info"]["notes"])
    # options the benchmark has no use for are errors
    rc = main(["bench", "clinc150", "--data", str(f), "--out", str(tmp_path / "x")])
    assert rc == 2 and "--data" in capsys.readouterr().err
    rc = main(["bench", "text", "--out", str(tmp_path / "y")])
    assert rc == 2 and "--data" in capsys.readouterr().err


def _texts_jsonl(tmp_path: Path) -> Path:
    f = tmp_path / "rows.jsonl"
    _write_intents(f)
    return f


# --------------------------------------------------------------------------- image folders
def _image_folders(root: Path, n: int = 16) -> tuple[Path, Path, Path]:
    """Three ID classes (dark / mid / bright squares), a noise OOD folder and a stripes one."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ids = root / "id"
    for c, level in enumerate((40, 128, 215)):
        (ids / f"class_{c}").mkdir(parents=True)
        for i in range(n):
            img = np.clip(rng.normal(level, 12, (20, 20)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(ids / f"class_{c}" / f"{i}.png")
    noise, stripes = root / "noise", root / "stripes"
    noise.mkdir()
    stripes.mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(noise / f"{i}.png")
        Image.fromarray(np.tile((np.arange(24) % 4 < 2).astype(np.uint8) * 255, (24, 1))).save(stripes / f"{i}.png")
    return ids, noise, stripes


def _tiny_checkpoint(path: Path) -> Path:
    from oodscope.models import create, save_checkpoint

    torch.manual_seed(0)
    net = create("small_cnn", num_classes=3, in_channels=1, width=4, feature_dim=8)
    return save_checkpoint(net, path, {"normalization": {"mean": 0.5, "std": 0.25}})


def test_cli_bench_images_with_folders_and_a_checkpoint(tmp_path, capsys):
    ids, noise, stripes = _image_folders(tmp_path)
    ckpt = _tiny_checkpoint(tmp_path / "net.safetensors")
    out = tmp_path / "run"
    rc = main(["bench", "images", "--id", str(ids), "--ood", str(noise), "--near", str(stripes),
               "--model", str(ckpt), "--detectors", "msp,energy,knn", "--n-boot", "0", "--no-report",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    js = json.loads((out / "results.json").read_text())
    ok = [r for r in js["rows"] if r["status"] == "ok"]
    assert {(r["ood_set"], r["group"]) for r in ok} == {("noise", "far"), ("stripes", "near"),
                                                         ("far (mean)", "far_mean"), ("near (mean)", "near_mean")}
    assert {r["detector"] for r in ok} == {"msp", "energy", "knn"}
    splits = js["info"]["splits"]
    assert (splits["train"], splits["val_id"], splits["test_id"]) == (24, 10, 14) and splits["val_ood"] == 10
    rc = main(["bench", "images", "--id", str(ids), "--model", str(ckpt), "--out", str(tmp_path / "x")])
    assert rc == 2 and "--ood" in capsys.readouterr().err


def test_bench_images_accepts_a_torchscript_network(tmp_path):
    from oodscope.models import load_checkpoint

    ids, noise, _ = _image_folders(tmp_path, n=8)
    net, _ = load_checkpoint(_tiny_checkpoint(tmp_path / "net.safetensors"))
    scripted = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net), str(scripted))
    spec = get_benchmark("images").with_params(id_dir=ids, ood_dirs=(noise,))
    res = run_benchmark(spec, ["msp"], ci=False, progress=False,
                        provider_options=ProviderOptions(model=scripted, cache_dir=tmp_path / "cache"))
    row = res.results.query("ood_set == 'noise'").iloc[0]
    assert row.status == "ok" and 0 <= row.auroc <= 1
    assert "net.pt" in res.info["model"]
