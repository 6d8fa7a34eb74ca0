"""The Features container: validation, slicing, concatenation and exact persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from oodscope import Features
from oodscope.features import as_features


def _features(n=12, d=6, c=3, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((c, d)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    kwargs = dict(
        logits=feats @ w.T + b,
        features=feats,
        labels=rng.integers(0, c, n),
        head_weight=w,
        head_bias=b,
        extras={
            "temperature": rng.random(n).astype(np.float64),
            "layer:body.1": rng.standard_normal((n, 2, 3)).astype(np.float16),
            "token_ids": rng.integers(0, 100, (n, 4)).astype(np.int32),
        },
        meta={"model": "Tiny", "class_names": ["a", "b", "c"], "nested": {"x": 1.5}},
    )
    kwargs.update(overrides)
    return Features(**kwargs)


def _is_mapped(arr) -> bool:
    while arr is not None:
        if isinstance(arr, np.memmap):
            return True
        arr = getattr(arr, "base", None)
    return False


def _assert_same(a: Features, b: Features) -> None:
    for name in ("logits", "features", "labels", "head_weight", "head_bias"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None, name
            continue
        assert y is not None, name
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    assert sorted(a.extras) == sorted(b.extras)
    for k in a.extras:
        assert a.extras[k].dtype == b.extras[k].dtype, k
        np.testing.assert_array_equal(np.asarray(a.extras[k]), np.asarray(b.extras[k]), err_msg=k)
    assert a.meta == b.meta


# ------------------------------------------------------------------ persistence
@pytest.mark.parametrize("fmt", ["npz", "dir", "dir-mmap"])
def test_save_load_round_trip_is_exact(tmp_path, fmt):
    f = _features(features=np.random.default_rng(1).standard_normal((12, 6)).astype(np.float16))
    f = f.replace(head_weight=None, head_bias=None)  # float16 features with no head
    g = _features()
    for obj, name in ((f, "a"), (g, "b")):
        path = tmp_path / (f"{name}.npz" if fmt == "npz" else name)
        written = obj.save(path)
        assert written == path
        back = Features.load(path, mmap=fmt == "dir-mmap")
        _assert_same(obj, back)
        if fmt == "dir-mmap":
            for arr in (back.features, back.labels, back.logits, back.extras["temperature"]):
                assert _is_mapped(arr), "memmapped arrays must not be copied into RAM"
        if fmt == "npz":
            assert not list(tmp_path.glob("*.tmp.npz")), "temporary file left behind"


def test_directory_format_is_plain_npy_plus_json(tmp_path):
    _features().save(tmp_path / "feats")
    names = sorted(p.name for p in (tmp_path / "feats").iterdir())
    assert "meta.json" in names and "logits.npy" in names and "extra__temperature.npy" in names
    header = json.loads((tmp_path / "feats" / "meta.json").read_text())
    assert header["format"] == "oodscope.Features" and header["meta"]["model"] == "Tiny"
    # every array file loads without pickle
    for p in (tmp_path / "feats").glob("*.npy"):
        np.load(p, allow_pickle=False)


def test_saving_over_a_directory_drops_fields_that_are_gone(tmp_path):
    path = tmp_path / "feats"
    _features().save(path)
    slim = _features().replace(logits=None, extras={})
    slim.save(path)
    back = Features.load(path)
    assert back.logits is None and back.extras == {}
    _assert_same(slim, back)


def test_object_extras_cannot_be_saved(tmp_path):
    obj = np.empty(12, dtype=object)
    obj[:] = [{"a": i} for i in range(12)]
    f = _features(extras={"captions": obj})
    with pytest.raises(ValueError, match="object"):
        f.save(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="object"):
        f.save(tmp_path / "xdir")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Features.load(tmp_path / "nope.npz")
    np.savez(tmp_path / "plain.npz", logits=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not written by Features.save"):
        Features.load(tmp_path / "plain.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable"):
        Features.load(tmp_path / "garbage.npz")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="meta.json"):
        Features.load(tmp_path / "emptydir")


# ------------------------------------------------------------------ container
def test_slicing_keeps_alignment_and_head():
    f = _features()
    for index in (3, -1, slice(2, 7), np.arange(12) % 3 == 0, np.array([5, 0, 5])):
        sub = f[index]
        rows = np.arange(12)[index]
        rows = np.atleast_1d(rows)
        assert len(sub) == len(rows)
        np.testing.assert_array_equal(sub.logits, f.logits[rows])
        np.testing.assert_array_equal(sub.features, f.features[rows])
        np.testing.assert_array_equal(sub.labels, f.labels[rows])
        for k in f.extras:
            np.testing.assert_array_equal(sub.extras[k], f.extras[k][rows])
        assert sub.head_weight is f.head_weight and sub.head_bias is f.head_bias
        assert sub.meta == f.meta
    assert len(f[:0]) == 0


def test_concat_inverts_slicing():
    f = _features()
    back = Features.concat([f[:5], f[5:9], f[9:]])
    _assert_same(f, back)


def test_concat_errors():
    f = _features()
    with pytest.raises(ValueError, match="at least one"):
        Features.concat([])
    other_head = f.replace(head_weight=f.head_weight + 1)
    with pytest.raises(ValueError, match="different classifier heads"):
        Features.concat([f, other_head])
    other_bias = f.replace(head_bias=f.head_bias + 1)
    with pytest.raises(ValueError, match="different classifier heads"):
        Features.concat([f, other_bias])
    with pytest.raises(ValueError, match="different extras"):
        Features.concat([f, f.replace(extras={})])
    with pytest.raises(ValueError, match="`labels` is missing"):
        Features.concat([f, f.replace(labels=None)])


def test_replace_shares_arrays_and_revalidates():
    f = _features()
    g = f.replace(labels=None)
    assert g.labels is None and f.labels is not None
    assert g.logits is f.logits
    with pytest.raises(ValueError, match="same length"):
        f.replace(labels=np.zeros(5, dtype=int))


def test_logits_from_features_and_num_classes():
    f = _features()
    np.testing.assert_allclose(f.logits_from_features(), f.logits, rtol=1e-5, atol=1e-5)
    assert f.num_classes == 3
    assert f.replace(logits=None).num_classes == 3
    assert Features(features=np.zeros((2, 4)), meta={"num_classes": 7}).num_classes == 7
    with pytest.raises(ValueError, match="head"):
        f.replace(head_weight=None, head_bias=None).logits_from_features()


def test_as_features_accepts_a_mapping():
    f = as_features({"logits": np.zeros((3, 2))})
    assert isinstance(f, Features) and len(f) == 3
    with pytest.raises(TypeError, match="Features"):
        as_features(np.zeros((3, 2)))


# ------------------------------------------------------------------ validation
def test_mismatched_lengths_name_the_field():
    with pytest.raises(ValueError, match="`features` has 5 rows"):
        Features(logits=np.zeros((4, 3)), features=np.zeros((5, 2)))
    with pytest.raises(ValueError, match="`labels` has 3 rows"):
        Features(logits=np.zeros((4, 3)), labels=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="`inputs` has 2 rows"):
        Features(logits=np.zeros((4, 3)), extras={"inputs": np.zeros((2, 8))})
    with pytest.raises(ValueError, match="first .sample. dimension"):
        Features(logits=np.zeros((4, 3)), extras={"scalar": np.float32(1.0)})


def test_head_shape_mismatch():
    with pytest.raises(ValueError, match="head_weight has 4 rows but logits have 3"):
        Features(logits=np.zeros((2, 3)), head_weight=np.zeros((4, 5)))
    with pytest.raises(ValueError, match="head_weight has 5 columns but features are 6"):
        Features(features=np.zeros((2, 6)), head_weight=np.zeros((3, 5)))
    with pytest.raises(ValueError, match="head_bias has 2 entries"):
        Features(head_weight=np.zeros((3, 5)), head_bias=np.zeros(2))
    with pytest.raises(ValueError, match="without head_weight"):
        Features(logits=np.zeros((2, 3)), head_bias=np.zeros(3))


def test_dtype_and_ndim_validation():
    with pytest.raises(ValueError, match="integers"):
        Features(labels=np.array([0.0, 1.5]))
    with pytest.raises(ValueError, match="integers"):
        Features(labels=np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="integers"):
        Features(labels=np.array(["cat", "dog"]))
    whole = Features(labels=np.array([0.0, 2.0]))
    assert whole.labels.dtype == np.int64 and list(whole.labels) == [0, 2]
    with pytest.raises(ValueError, match="1-D"):
        Features(labels=np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="numeric"):
        Features(logits=np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="2-D"):
        Features(features=np.zeros(5))
    ints = Features(logits=np.ones((2, 3), dtype=np.int64))
    assert ints.logits.dtype.kind == "f"


def test_require_names_missing_and_present_fields():
    f = _features().replace(features=None, head_weight=None, head_bias=None)
    with pytest.raises(ValueError) as err:
        f.require(["logits", "features", "head", "inputs", "model"], who="MyDetector")
    msg = str(err.value)
    assert "MyDetector" in msg
    assert "'features'" in msg and "'head'" in msg and "'inputs'" in msg
    assert "'model'" not in msg.split("but")[0], "the model never travels in Features"
    assert "'logits'" in msg.split("but")[1], "the message lists what is present"
    assert f.require(["logits", "labels", "temperature"]) is f
    assert f.has("temperature") and not f.has("model") and not f.has("head")


# ------------------------------------------------------------------ damaged files
def _npz_members(path):
    with np.load(path, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def _rewrite(path, **changes):
    members = _npz_members(path)
    members.update(changes)
    members = {k: v for k, v in members.items() if v is not None}
    np.savez(path, **members)


def _meta(obj) -> np.ndarray:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return np.frombuffer(raw, dtype=np.uint8)


_HEADER = {"format": "oodscope.Features", "version": 1, "meta": {}}

DAMAGED_NPZ = {
    "object array": (lambda p: _rewrite(p, logits=np.array([None, 1], dtype=object)),
                     "object array"),
    "unknown member": (lambda p: _rewrite(p, bogus=np.zeros(3)), "unknown member 'bogus'"),
    "metadata not JSON": (lambda p: _rewrite(p, __meta__=_meta(b"{not json")), "not UTF-8 JSON"),
    "metadata not UTF-8": (lambda p: _rewrite(p, __meta__=_meta(b"\xff\xfe\x00")), "not UTF-8 JSON"),
    "metadata a list": (lambda p: _rewrite(p, __meta__=_meta([1, 2])), "not an oodscope Features"),
    "meta not a dict": (lambda p: _rewrite(p, __meta__=_meta({**_HEADER, "meta": [1]})),
                        "`meta` must be an object"),
    "newer format": (lambda p: _rewrite(p, __meta__=_meta({**_HEADER, "version": 99})), "newer oodscope"),
    "version not an int": (lambda p: _rewrite(p, __meta__=_meta({**_HEADER, "version": "1"})),
                           "must be an integer"),
    "metadata of floats": (lambda p: _rewrite(p, __meta__=np.zeros(4)), "not a byte string"),
    "no metadata": (lambda p: _rewrite(p, __meta__=None), "no metadata"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-200]), "damaged|not a readable|truncated"),
    "corrupt member": (lambda p: p.write_bytes(_flip_middle(p.read_bytes())), "damaged|not a readable"),
    "plain npy named npz": (lambda p: np.save(open(p, "wb"), np.zeros((3, 2))), "not a zip archive"),
    "empty file": (lambda p: p.write_bytes(b""), "not a zip archive"),
    "wrong shapes": (lambda p: _rewrite(p, labels=np.zeros(7, dtype=np.int64)), "do not form valid Features"),
}


def _flip_middle(data: bytes) -> bytes:
    data = bytearray(data)
    data[len(data) // 3] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("kind", sorted(DAMAGED_NPZ))
def test_damaged_npz_is_a_clear_value_error(tmp_path, kind):
    path = _features().save(tmp_path / "f.npz")
    damage, message = DAMAGED_NPZ[kind]
    damage(path)
    with pytest.raises(ValueError, match=message) as err:
        Features.load(path)
    assert str(path) in str(err.value)


DAMAGED_DIR = {
    "meta.json not JSON": (lambda d: (d / "meta.json").write_text("{oops"), "not UTF-8 JSON"),
    "meta.json a number": (lambda d: (d / "meta.json").write_text("3"), "not an oodscope Features"),
    "unknown npy": (lambda d: np.save(d / "bogus.npy", np.zeros(3)), "unknown member 'bogus'"),
    "stray file": (lambda d: (d / "notes.txt").write_text("x"), "unexpected file"),
    "object npy": (lambda d: np.save(d / "logits.npy", np.array([None], dtype=object), allow_pickle=True),
                   "object array"),
    "truncated npy": (lambda d: (d / "features.npy").write_bytes((d / "features.npy").read_bytes()[:-50]),
                      "cannot be read"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGED_DIR))
def test_damaged_directory_is_a_clear_value_error(tmp_path, kind):
    path = _features().save(tmp_path / "fdir")
    damage, message = DAMAGED_DIR[kind]
    damage(path)
    with pytest.raises(ValueError, match=message) as err:
        Features.load(path)
    assert str(path) in str(err.value)


def test_meta_with_numpy_values_saves_as_plain_json(tmp_path):
    f = _features(meta={"n": np.int64(3), "acc": np.float32(0.5), "ids": np.arange(3), "ok": np.bool_(True)})
    back = Features.load(f.save(tmp_path / "m.npz"))
    assert back.meta == {"n": 3, "acc": 0.5, "ids": [0, 1, 2], "ok": True}
    with pytest.raises(ValueError, match=r"meta\['bad'\] has type object"):
        _features(meta={"bad": object()}).save(tmp_path / "x.npz")
