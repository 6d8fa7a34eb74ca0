"""The command line: `oodscope demo` end to end, `oodscope list`, help texts."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from oodscope.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "board.csv"
    assert main(["demo", "--quiet", "--out", str(out)]) == 0
    return pd.read_csv(out)


def test_demo_writes_a_leaderboard(demo_run):
    board = demo_run
    assert len(board) >= 20, board["detector"].tolist()
    for col in ("auroc[far: photos]", "auroc[near: digits 6-9]", "fpr_at_95_tpr[far: photos]"):
        assert col in board.columns
        assert board[col].between(0, 1).all()


def test_demo_feature_space_beats_msp_on_far_ood(demo_run):
    board = demo_run.set_index("detector")
    msp = board.loc["msp", "auroc[far: photos]"]
    feature_space = board[board["family"].isin(["distance", "density"])]
    assert len(feature_space) >= 5
    assert feature_space["auroc[far: photos]"].max() > msp
    assert (feature_space["auroc[far: photos]"] > msp).mean() >= 0.5


def test_demo_is_deterministic(tmp_path):
    from oodscope.demo import run_demo

    a = run_demo(seed=3, epochs=5, detectors="msp,energy", progress=False)
    b = run_demo(seed=3, epochs=5, detectors="msp,energy", progress=False)
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))


def test_list_shows_every_detector(capsys):
    import oodscope as ood

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ood.list_detectors():
        assert name in out
    assert f"{len(ood.list_detectors())} detectors" in out


def test_help_is_fast_and_complete():
    r = subprocess.run([sys.executable, "-m", "oodscope.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("demo", "list", "train", "bench"):
        assert cmd in r.stdout


def test_import_is_light():
    code = "import sys, oodscope; print('torch' in sys.modules, 'transformers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False False"
