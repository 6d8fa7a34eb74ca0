"""`oodscope bench` on a registered synthetic benchmark (no network, no real data)."""

from __future__ import annotations

import json

from oodscope.bench import BenchmarkSpec, register_benchmark
from oodscope.cli import build_parser, main

from test_bench_runner import _feature_set

_CALLS = []
_GROUPS = dict(near=["near-blend"], far=["far-noise"], covariate=["scaled"])


def _provider(spec, options):
    _CALLS.append({"seed": options.seed, "subset": options.subset, "fields": options.fields})
    return _feature_set(seed=options.seed, n=options.subset or 150)


register_benchmark(BenchmarkSpec("synthetic-test", "synthetic Gaussian classes (tests only)", _provider, **_GROUPS))


def test_bench_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["bench", "synthetic-test", "--detectors", "msp,energy", "--out", str(out),
               "--n-boot", "10", "--subset", "120", "--seeds", "0,1"])
    assert rc == 0
    assert {c["seed"] for c in _CALLS[-2:]} == {0, 1} and _CALLS[-1]["subset"] == 120
    assert _CALLS[-1]["fields"] == {"logits"}
    text = capsys.readouterr().out
    assert "msp" in text and "energy" in text and "far (mean)" in text
    for name in ("results.csv", "results.json", "report.html"):
        assert (out / name).exists()
    js = json.loads((out / "results.json").read_text())
    assert {r["seed"] for r in js["rows"]} == {0, 1}


def test_bench_cli_errors(tmp_path, capsys):
    rc = main(["bench", "synthetic-test", "--ood", "svhn", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "svhn" in err and "far-noise" in err
    rc = main(["bench", "synthetic-test", "--encoder", "x", "--out", str(tmp_path)])
    assert rc == 2 and "--encoder" in capsys.readouterr().err
    rc = main(["bench", "no-such-benchmark"])
    assert rc == 2 and "fashion-mnist" in capsys.readouterr().err


def test_bench_cli_help_lists_every_option():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["bench"]
    help_text = sub.format_help()
    for opt in ("--model", "--ood", "--detectors", "--out", "--seeds", "--no-tune", "--full-spectrum",
                "--subset", "--cache-dir", "--quick", "--encoder", "--finetune", "--vlm",
                "--compare-training", "--data-root", "--class-names", "--epochs", "--train-size",
                "--batch-size", "--lr", "--data", "--text-column", "--label-column", "--oos-label", "--id",
                "--near"):
        assert opt in help_text
    # every option is explained
    for action in sub._actions:
        assert action.help, action.option_strings
    flat = " ".join(help_text.split())
    for recipe in ("'none'", "'ce'", "'supcon'", "'margin'", "'auto'"):
        assert recipe in flat


def test_compare_training_without_module(monkeypatch, capsys):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "oodscope.bench.compare":
            raise ModuleNotFoundError(name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    rc = main(["bench", "fashion-mnist", "--compare-training", "ce,oe"])
    assert rc == 2 and "oodscope.bench.compare" in capsys.readouterr().err


_OPTS = []


def _provider_with_options(spec, options):
    _OPTS.append({"data_root": options.data_root, "vlm": options.vlm, "class_names": options.class_names})
    return _feature_set(seed=options.seed, n=options.subset or 150)


register_benchmark(BenchmarkSpec("synthetic-options", "synthetic (tests only)", _provider_with_options,
                                 options={"data_root", "vlm", "class_names"}, **_GROUPS))


def test_bench_cli_passes_data_root_and_class_names(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("cat\n\ndog house\n")
    rc = main(["bench", "synthetic-options", "--detectors", "msp", "--n-boot", "0", "--no-report",
               "--data-root", str(tmp_path), "--vlm", "hf:x", "--class-names", str(names),
               "--out", str(tmp_path / "o")])
    assert rc == 0
    assert _OPTS[-1] == {"data_root": tmp_path, "vlm": "hf:x", "class_names": ("cat", "dog house")}
    capsys.readouterr()
    # options a benchmark does not take are errors, as are training options without the comparison
    rc = main(["bench", "synthetic-test", "--data-root", str(tmp_path), "--out", str(tmp_path / "p")])
    assert rc == 2 and "--data-root" in capsys.readouterr().err
    rc = main(["bench", "synthetic-options", "--epochs", "3", "--out", str(tmp_path / "q")])
    assert rc == 2 and "--compare-training" in capsys.readouterr().err
    rc = main(["bench", "synthetic-options", "--class-names", str(tmp_path / "missing.txt")])
    assert rc == 2 and "missing.txt" in capsys.readouterr().err


def test_compare_training_gets_the_training_options(monkeypatch):
    import types
    import sys

    seen = {}
    fake = types.ModuleType("oodscope.bench.compare")
    fake.run_comparison = lambda args: seen.update(vars(args)) or 0
    monkeypatch.setitem(sys.modules, "oodscope.bench.compare", fake)
    rc = main(["bench", "--compare-training", "ce,oe", "--epochs", "2", "--train-size", "500",
               "--batch-size", "64", "--lr", "0.01"])
    assert rc == 0
    assert (seen["epochs"], seen["train_size"], seen["batch_size"], seen["lr"]) == (2, 500, 64, 0.01)
    assert seen["compare_training"] == "ce,oe"
