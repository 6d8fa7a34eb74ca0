"""Saving and loading detectors: arrays + JSON with a SHA-256 manifest, never pickle."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import oodscope as ood
from oodscope import Features, persistence

from detector_examples import fitted_example, has_example


ALL = ood.list_detectors()


def _scores(det, x):
    if det.stateful:
        det.reset()
    return det.score(x)


def test_every_detector_has_an_example():
    missing = [n for n in ALL if not has_example(n)]
    assert not missing, f"add these detectors to tests/detector_examples.py: {missing}"


@pytest.mark.parametrize("name", ALL)
def test_round_trip_gives_the_same_scores(name, tmp_path):
    det, _, x = fitted_example(name)
    before = _scores(det, x)
    runtime = {"model": det.model} if "model" in det.requires else {}
    if name == "lm_ratio":
        runtime = {"base_model": det.base_model, "tokenizer": det.tokenizer}
    ood.save(det, tmp_path / "det")
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == [
        "arrays.safetensors", "manifest.json", "oodscope.json"]
    loaded = ood.load(tmp_path / "det", **runtime)
    assert type(loaded) is type(det) and loaded.is_fitted
    assert loaded.get_params().keys() == det.get_params().keys()
    after = _scores(loaded, x)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    # the saved document names what the detector expects
    doc = json.loads((tmp_path / "det" / "oodscope.json").read_text())
    assert doc["oodscope_version"] == ood.__version__ and doc["format_version"] == 1
    assert set(doc["expects"]["fields"]) == set(det.requires) - {"model"}


def test_stateful_memory_is_saved_too(tmp_path):
    det, _, x = fitted_example("adaneg")
    det.reset()
    det.score(x[:30])  # fill the test-time memory
    assert det.memory_counts.sum() > 0
    ood.save(det, tmp_path / "a")
    loaded = ood.load(tmp_path / "a")
    np.testing.assert_array_equal(loaded.memory_counts, det.memory_counts)
    np.testing.assert_allclose(loaded.score(x[30:]), det.score(x[30:]), rtol=1e-12)


def test_detector_needing_the_network_says_so(tmp_path):
    det, _, x = fitted_example("odin")
    ood.save(det, tmp_path / "o")
    with pytest.raises(ValueError, match=r"model=\.\.\."):
        ood.load(tmp_path / "o")
    doc = json.loads((tmp_path / "o" / "oodscope.json").read_text())
    assert doc["runtime_params"] == ["detector.model"]


def test_unfitted_detector_round_trips(tmp_path):
    ood.save(ood.create("knn", k=7), tmp_path / "u")
    loaded = ood.load(tmp_path / "u")
    assert loaded.k == 7 and not loaded.is_fitted


def test_nothing_is_pickled(tmp_path, monkeypatch):
    det, _, x = fitted_example("ensemble")
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    ood.save(det, tmp_path / "e")
    np.testing.assert_allclose(ood.load(tmp_path / "e").score(x), det.score(x), rtol=1e-6)


# ----------------------------------------------------------------------- damaged files
@pytest.fixture()
def saved(tmp_path):
    det, _, x = fitted_example("knn")
    return ood.save(det, tmp_path / "knn"), x


def _rewrite_manifest(path):
    """Recompute the manifest, as a careless tool (or an attacker) would."""
    doc = json.loads((path / "oodscope.json").read_text())
    arrays = persistence.read_bundle  # noqa: F841 - documents intent
    from safetensors.numpy import load_file

    persistence.write_bundle(path, doc, load_file(str(path / "arrays.safetensors")))


def test_flipped_byte_is_refused(saved):
    path, _ = saved
    f = path / "arrays.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        ood.load(path)


def test_truncated_array_file_is_refused(saved):
    path, _ = saved
    f = path / "arrays.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        ood.load(path)


def test_tampered_manifest_is_refused(saved):
    path, _ = saved
    m = json.loads((path / "manifest.json").read_text())
    m["files"]["oodscope.json"]["sha256"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        ood.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        ood.load(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        ood.load(path)


def test_extra_file_and_extra_array_are_refused(saved):
    path, _ = saved
    (path / "evil.pkl").write_bytes(b"x")
    with pytest.raises(ValueError, match="unexpected file"):
        ood.load(path)
    (path / "evil.pkl").unlink()
    # an array nothing refers to, with a manifest that matches the files
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(path / "arrays.safetensors"))
    arrays["extra"] = np.zeros(3)
    save_file(arrays, str(path / "arrays.safetensors"))
    doc = json.loads((path / "oodscope.json").read_text())
    persistence.write_bundle(path, doc, arrays)
    with pytest.raises(ValueError, match="extra member"):
        ood.load(path)


def test_object_arrays_cannot_be_saved(tmp_path):
    det = ood.create("msp").fit()
    det.bogus_ = np.array([object()], dtype=object)
    with pytest.raises(ValueError, match="dtype object"):
        ood.save(det, tmp_path / "m")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["detector"]["params"].update(k="fifty"), "invalid hyperparameters"),
    (lambda d: d["detector"]["params"].update(bogus=1), "no hyperparameter"),
    (lambda d: d["detector"].update(name=7), "must be a detector name"),
    (lambda d: d["detector"].update(name="no_such_detector"), "Unknown detector"),
    (lambda d: d["detector"].update(params=[1, 2]), "`params` must be an object"),
    (lambda d: d["detector"].update(fitted="yes"), "must be true or false"),
    (lambda d: d["detector"]["state"].update(fitted_=False), "fitted_"),
    (lambda d: d["detector"]["state"].update(index_={"$object": "os.system", "state": {}}),
     "not a registered oodscope class"),
    (lambda d: d["detector"]["state"].update(index_={"$pickle": "x"}), "unknown tag"),
    (lambda d: d["detector"]["state"].update(bank_size_={"$array": "nope"}), "not in arrays"),
    (lambda d: d.update(format_version=99), "newer than this oodscope"),
    (lambda d: d.update(format_version="1"), "must be an integer"),
    (lambda d: d.update(kind="model"), "expected detector or guard"),
    (lambda d: d["expects"]["widths"].update(features=3), "does not match"),
])
def test_json_with_wrong_content_is_a_clear_error(saved, edit, message):
    path, _ = saved
    doc = json.loads((path / "oodscope.json").read_text())
    edit(doc)
    from safetensors.numpy import load_file

    persistence.write_bundle(path, doc, load_file(str(path / "arrays.safetensors")))
    with pytest.raises(ValueError, match=message):
        ood.load(path)


def test_missing_directory_and_wrong_kind(tmp_path):
    with pytest.raises(FileNotFoundError):
        ood.load(tmp_path / "nothing")
    with pytest.raises(TypeError):
        ood.save(object(), tmp_path / "x")


def test_save_refuses_a_file_path(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        ood.save(ood.create("msp").fit(), f)


def test_scores_of_saved_features_width_mismatch_after_load(saved):
    path, x = saved
    det = ood.load(path)
    with pytest.raises(ValueError, match="width"):
        det.score(Features(features=np.ones((2, 3), np.float32)))
