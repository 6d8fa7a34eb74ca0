"""`oodscope bench` on a registered synthetic benchmark (no network, no real data)."""

from __future__ import annotations

import json

from oodscope.bench.spec import register_benchmark
from oodscope.cli import build_parser, main

from test_bench_runner import _feature_set

_CALLS = []


def _provider(seed=0, subset=None, ood=None, fields=None):
    _CALLS.append({"seed": seed, "subset": subset, "fields": fields})
    return _feature_set(seed=seed, n=subset or 150)


register_benchmark("synthetic-test", _provider, "synthetic Gaussian classes (tests only)",
                   ood_names=["near-blend", "far-noise", "scaled"])


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
                "--compare-training"):
        assert opt in help_text


def test_compare_training_without_module(monkeypatch, capsys):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "oodscope.train.compare":
            raise ModuleNotFoundError(name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    rc = main(["bench", "fashion-mnist", "--compare-training", "ce,oe"])
    assert rc == 2 and "oodscope.train.compare" in capsys.readouterr().err
