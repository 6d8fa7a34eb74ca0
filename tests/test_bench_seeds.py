"""The benchmarks the seed papers define (MixOE, ASCOOD, AnimalsMetaCoCo, PT-OOD, NOVA), end to
end on tiny fixtures written here in each release's file layout (tests/fixtures/README.md),
with tiny random networks: split bookkeeping, failure without data, and results coming out.
Nothing here measures a detector: the networks are untrained."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest

from oodscope.bench import ProviderOptions, get_benchmark
from oodscope.bench.runner import run_benchmark
from oodscope.cli import main
from oodscope.localisation import average_precision, box_iou, localisation_metrics, xywh_to_xyxy

from test_bench_data import _image_folders

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")


def _png(path: Path, seed: int, size: int = 12, rgb: bool = True) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if rgb else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def _checkpoint(path: Path, num_classes: int, in_channels: int = 3, image_size: int = 16) -> Path:
    from oodscope.models import create, save_checkpoint

    torch.manual_seed(0)
    net = create("small_cnn", num_classes=num_classes, in_channels=in_channels, width=2, feature_dim=8,
                 image_size=image_size)
    return save_checkpoint(net, path)


def _ok_rows(out: Path) -> list[dict]:
    return [r for r in json.loads((out / "results.json").read_text())["rows"] if r["status"] == "ok"]


def _cli(*args) -> int:
    return main(["bench", *map(str, args), "--n-boot", "0", "--no-report"])


# --------------------------------------------------------------------------- localisation
def test_localisation_metrics_match_a_hand_computation():
    # image A: one gold box, a perfect hit (score .9) and a false positive (.8);
    # image B: two gold boxes, one prediction half-overlapping the first (IoU 50/100 = 0.5, score .7)
    pred = [[[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 10, 5]]]
    scores = [[0.9, 0.8], [0.7]]
    gold = [[[0, 0, 10, 10]], [[0, 0, 10, 10], [50, 50, 60, 60]]]
    np.testing.assert_allclose(box_iou([[0, 0, 10, 10]], [[0, 0, 10, 5], [5, 0, 15, 10], [20, 20, 30, 30]]),
                               [[0.5, 50 / 150, 0.0]])
    # IoU 0.5: TP, FP, TP over 3 gold boxes -> recall 1/3, 1/3, 2/3; monotone precision 1, 2/3, 2/3.
    # Of the 101 recall points, 0..0.33 (34) read 1, 0.34..0.66 (33) read 2/3, the rest 0.
    assert average_precision(pred, gold, 0.5, scores) == pytest.approx((34 + 33 * 2 / 3) / 101)
    # above 0.5 the half-overlapping box is a false positive: 34 points at precision 1
    assert average_precision(pred, gold, 0.55, scores) == pytest.approx(34 / 101)
    m = localisation_metrics(pred, gold, scores)
    assert m["map_30"] == pytest.approx(56 / 101) and m["map_50"] == pytest.approx(56 / 101)
    assert m["map_50_95"] == pytest.approx((56 + 9 * 34) / 1010)
    assert (m["n_images"], m["n_gold"], m["n_predicted"]) == (2, 3, 3)
    # ranking matters: the false positive first halves the precision of everything after it
    assert average_precision(pred, gold, 0.5, [[0.5, 0.9], [0.7]]) < average_precision(pred, gold, 0.5, scores)
    # without scores the given order is kept
    assert average_precision(pred, gold, 0.5) == pytest.approx(average_precision(pred, gold, 0.5, [[2, 1], [0]]))
    np.testing.assert_array_equal(xywh_to_xyxy([[1, 2, 3, 4]]), [[1, 2, 4, 6]])
    with pytest.raises(ValueError, match="No gold box"):
        average_precision(pred, [[], []])
    with pytest.raises(ValueError, match="x_max < x_min"):
        box_iou([[5, 0, 0, 5]], [[0, 0, 1, 1]])


# --------------------------------------------------------------------------- MixOE
_MIXOE_PATHS = {  # a row's path in each dataset's info files, as in the release
    "bird": lambda i: f"{i % 3 + 295:04d}/{i:032x}.jpg",
    "butterfly": lambda i: f"{i % 9:03d}.Papilio_machaon/{i:03d}.jpg",
    "car": lambda i: f"cars_test/{i + 1:05d}.jpg",
    "aircraft": lambda i: f"{800000 + i:07d}.jpg",
}


def _write_mixoe(root: Path, dataset: str, id_labels: list[int], held_labels: list[int]) -> None:
    """MixOE's data folder: info/<ds>/{train,val,test}.txt + images under data/<ds>/... ."""
    from oodscope.bench.mixoe import MIXOE_DATASETS

    counter = iter(range(10_000))
    for ds, (images, _, _) in MIXOE_DATASETS.items():
        (root / "info" / ds).mkdir(parents=True)
        splits = ("train", "val", "test") if ds == dataset else ("test",)
        for split in splits:
            labels = ([*id_labels, *held_labels] * (2 if split == "test" else 1) if ds == dataset
                      else [1, 2, 3])
            lines = []
            for y in labels:
                rel = _MIXOE_PATHS[ds](next(counter))
                if ds == "car" and split == "train":
                    rel = rel.replace("cars_test", "cars_train")
                _png(root / images / rel, len(lines) + 31 * y)
                lines.append(f"{rel} {y}")
            (root / "info" / ds / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def mixoe_root(tmp_path_factory):
    from oodscope.bench.mixoe import mixoe_class_split

    root = tmp_path_factory.mktemp("MixOE")
    ids, held = mixoe_class_split("aircraft", 0)
    _write_mixoe(root, "aircraft", ids[:3], held[:2])
    return root


def test_mixoe_split_bookkeeping_follows_the_release(mixoe_root):
    from oodscope.bench.mixoe import MIXOE_DATASETS, mixoe_class_split, mixoe_splits, read_info_file

    ids, held = mixoe_class_split("aircraft", 0)
    assert ids == [int(c) for c in np.random.RandomState(0).choice(range(100), 90, replace=False)]
    assert sorted(ids + held) == list(range(100)) and len(held) == 10
    assert mixoe_class_split("aircraft", 1)[1] != held
    for ds, (_, n_id, n_ood) in MIXOE_DATASETS.items():
        assert len(mixoe_class_split(ds, 0)[0]) == n_id and len(mixoe_class_split(ds, 0)[1]) == n_ood

    sp = mixoe_splits(get_benchmark("mixoe-aircraft"), ProviderOptions(data_root=mixoe_root))
    order = sorted(ids)
    test_rows = read_info_file(mixoe_root / "info/aircraft/test.txt")
    # ID rows: ID-class rows of each split file, labelled by the class's rank among the ID classes
    assert [(p.name, y) for p, y in sp["test_id"]] == [(Path(r).name, order.index(c)) for r, c in test_rows
                                                        if c in ids]
    assert {y for _, y in sp["train"]} == {order.index(c) for c in ids[:3]}
    # near OOD 'fine': the held-out classes of the test file, nothing else
    assert [p.name for p, _ in sp["fine"]] == [Path(r).name for r, c in test_rows if c in held]
    # far OOD 'coarse': random.seed(0); random.sample over the other datasets' test rows in MixOE's order
    others = [mixoe_root / MIXOE_DATASETS[o][0] / r for o in ("bird", "butterfly", "car")
              for r, _ in read_info_file(mixoe_root / f"info/{o}/test.txt")]
    random.seed(0)
    assert [p for p, _ in sp["coarse"]] == random.sample(others, len(sp["test_id"]))
    test_paths = {p for k in ("test_id", "fine", "coarse") for p, _ in sp[k]}
    assert not test_paths & {p for k in ("train", "val_id") for p, _ in sp[k]}
    # --ood fine needs only the dataset's own files
    assert "coarse" not in mixoe_splits(get_benchmark("mixoe-aircraft"),
                                        ProviderOptions(data_root=mixoe_root, ood=("fine",)))
    (mixoe_root / "extra.txt").write_text("a b.jpg 3\n\nc.jpg 4\n")
    assert read_info_file(mixoe_root / "extra.txt") == [("a b.jpg", 3), ("c.jpg", 4)]


def test_mixoe_runs_end_to_end_and_fails_listing_its_files(mixoe_root, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "net.safetensors", 90)
    out = tmp_path / "run"
    assert _cli("mixoe-aircraft", "--data-root", mixoe_root, "--model", ckpt, "--detectors", "msp,energy",
                "--cache-dir", tmp_path / "cache", "--out", out) == 0, capsys.readouterr().err
    rows = _ok_rows(out)
    assert {(r["ood_set"], r["group"]) for r in rows} >= {("fine", "near"), ("coarse", "far")}
    info = json.loads((out / "results.json").read_text())["info"]
    assert info["splits"]["fine"] == 4 and info["splits"]["coarse"] == info["splits"]["test_id"] == 6
    assert info["splits"]["val_ood"] == info["splits"]["val_id"] == 3  # generated from ID-val
    capsys.readouterr()
    assert _cli("mixoe-car", "--data-root", tmp_path / "empty", "--model", ckpt, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    for f in ("info/car/train.txt", "info/car/val.txt", "info/car/test.txt", "data/car", "info/bird/test.txt",
              "data/bird/images", "data/butterfly/images_small", "data/aircraft/images"):
        assert str(tmp_path / "empty" / f) in err
    assert "github.com/zjysteven/MixOE" in err
    assert _cli("mixoe-car", "--data-root", tmp_path / "empty", "--ood", "fine", "--out", tmp_path / "x") == 2
    assert "info/bird" not in capsys.readouterr().err


# --------------------------------------------------------------------------- ASCOOD
def _write_ascood(root: Path, name: str = "waterbirds") -> dict[str, list[str]]:
    """ASCOOD's data folder (OpenOOD layout); returns the paths each list names."""
    from oodscope.bench.openood import ASCOOD_PROTOCOLS

    proto = ASCOOD_PROTOCOLS[f"ascood-{name}"]
    listed = {}
    for j, (k, rel_list) in enumerate({**proto.lists, **proto.near, **proto.far}.items()):
        folder = proto.images_dir(root, k)
        n = 6 if k in ("train", "val_id", "test_id") else 3
        rel = [f"{k}/img_{i}.jpg" for i in range(n)]
        for i, r in enumerate(rel):
            _png(folder / r, 10 * j + i, size=20)
        labels = [i % 2 if k in ("train", "val_id", "test_id") else -1 for i in range(n)]
        (root / rel_list).parent.mkdir(parents=True, exist_ok=True)
        (root / rel_list).write_text("".join(f"{r} {y}\n" for r, y in zip(rel, labels)))
        listed[k] = [str(folder / r) for r in rel]
    return listed


def test_ascood_waterbirds_runs_in_its_release_layout_and_fails_listing_files(tmp_path, capsys):
    from oodscope.bench.openood import ASCOOD_PROTOCOLS

    proto = ASCOOD_PROTOCOLS["ascood-waterbirds"]
    spec = get_benchmark("ascood-waterbirds")
    assert spec.near == ("waterbirds_ood",) and set(spec.far) == {"ninco", "openimage_o", "sun", "texture",
                                                                   "inaturalist"}
    assert proto.lists["val_ood"] == "benchmark_imglist/imagenet200/val_openimage_o.txt"
    assert proto.far["openimage_o"] == "benchmark_imglist/imagenet200/test_openimage_o.txt"
    listed = _write_ascood(tmp_path / "data")
    assert not set(listed["val_ood"]) & {p for k in (*spec.near, *spec.far) for p in listed[k]}
    ckpt = _checkpoint(tmp_path / "net.safetensors", 2, image_size=224)
    out = tmp_path / "run"
    assert _cli("ascood-waterbirds", "--data-root", tmp_path / "data", "--model", ckpt, "--detectors",
                "msp,energy", "--cache-dir", tmp_path / "cache", "--out", out) == 0, capsys.readouterr().err
    rows = _ok_rows(out)
    groups = {r["ood_set"]: r["group"] for r in rows}
    assert groups["waterbirds_ood"] == "near" and all(groups[k] == "far" for k in spec.far)
    splits = json.loads((out / "results.json").read_text())["info"]["splits"]
    assert (splits["train"], splits["val_ood"], splits["waterbirds_ood"]) == (6, 3, 3)
    capsys.readouterr()
    assert _cli("ascood-celeba", "--data-root", tmp_path / "none", "--model", ckpt, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    for rel in (*ASCOOD_PROTOCOLS["ascood-celeba"].lists.values(), "benchmark_imglist/celeba/celeba_spurious_ood.txt",
                "benchmark_imglist/sun/sun.txt"):
        assert str(tmp_path / "none" / rel) in err
    assert "download_ascood.sh" in err and "ASCOOD image lists" in err


# --------------------------------------------------------------------------- AnimalsMetaCoCo
@pytest.fixture(scope="module")
def metacoco_root(tmp_path_factory):
    from oodscope.bench.metacoco import ANIMAL_CLASSES

    root = tmp_path_factory.mktemp("AnimalsMetaCoco")
    rows, k = [], 0
    for c in ANIMAL_CLASSES:
        for split, n in ((0, 3), (1, 1), (2, 1)):
            for _ in range(n):
                ctx = ("autumn", "snow", "water")[k % 3]
                rel = f"images/{c}/{ctx}/{k:05d}.jpg"
                _png(root / rel, k)
                rows.append(f"{k},{rel},{c},{ctx},{split}")
                k += 1
    (root / "animals_metadata.csv").write_text("Id,address,class,attribute,split\n" + "\n".join(rows) + "\n")
    return root


def test_metacoco_bookkeeping_few_shot_and_end_to_end(metacoco_root, tmp_path):
    import pandas as pd

    from oodscope.bench.metacoco import metacoco_class_split, metacoco_splits

    ids, held = metacoco_class_split(3)
    assert held == ["elephant", "fox"] and len(ids) == 24 and not set(ids) & set(held)
    spec = get_benchmark("metacoco-animals").with_params(split=3)
    sp = metacoco_splits(spec, ProviderOptions(data_root=metacoco_root, seed=4))
    df = pd.read_csv(metacoco_root / "animals_metadata.csv")
    ood = df[df["class"].isin(held)]
    perm = np.random.RandomState(4).permutation(len(ood))
    val_paths = {str(metacoco_root / a) for a in ood.iloc[perm[:1]]["address"]}
    assert {str(r[0]) for r in sp["val_ood"]} == val_paths and len(sp["animals_ood"]) == len(ood) - 1
    assert not val_paths & {str(r[0]) for r in sp["animals_ood"]}
    assert {r[1] for r in sp["train"]} == set(range(24)) and len(sp["train"]) == 72
    assert all(f"/{ids[r[1]]}/" in str(r[0]) for r in sp["test_id"])
    few = metacoco_splits(spec.with_params(shots=1), ProviderOptions(data_root=metacoco_root, seed=4))
    expected = pd.concat([g.sample(n=1, random_state=4) for _, g in
                          ((c, df[(df["split"] == 0) & (df["class"] == c)]) for c in ids)])
    assert [str(r[0]) for r in few["train"]] == [str(metacoco_root / a) for a in expected["address"]]

    backbone = _checkpoint(tmp_path / "backbone.safetensors", 5)
    res = run_benchmark("metacoco-animals", ["msp", "knn"], ci=False, progress=False,
                        provider_options=ProviderOptions(model=backbone, data_root=metacoco_root,
                                                         cache_dir=tmp_path / "cache"))
    ok = res.results.query("status == 'ok'")
    assert set(ok.detector) == {"msp", "knn"} and set(ok.query("ood_set == 'animals_ood'").group) == {"near"}
    assert res.info["linear_probe"]["classes"] == 24 and res.info["splits"]["animals_ood"] == 9
    with pytest.raises(FileNotFoundError, match="animals_metadata.csv"):
        run_benchmark("metacoco-animals", ["msp"], progress=False,
                      provider_options=ProviderOptions(model=backbone, data_root=tmp_path / "none"))


# --------------------------------------------------------------------------- PT-OOD
def test_linear_probe_is_logistic_regression_with_two_logits_for_two_classes():
    from sklearn.linear_model import LogisticRegression

    from oodscope.train.linear_probe import fit_linear_probe

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 1, (40, 3)), rng.normal(2, 1, (40, 3))])
    y = np.repeat([0, 1], 40)
    w, b = fit_linear_probe(x, y)
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(p, LogisticRegression().fit(x, y).predict_proba(x), atol=1e-10)
    with pytest.raises(ValueError, match="every class"):
        fit_linear_probe(x, np.where(y == 1, 2, 0))


def test_pt_ood_probes_a_frozen_backbone_on_your_folders(tmp_path, capsys):
    ids, noise, stripes = _image_folders(tmp_path, n=10)
    backbone = _checkpoint(tmp_path / "backbone.safetensors", 7, in_channels=1, image_size=16)
    out = tmp_path / "run"
    assert _cli("pt-ood", "--id", ids, "--near", stripes, "--ood", noise, "--model", backbone, "--detectors",
                "msp,energy,knn", "--cache-dir", tmp_path / "cache", "--out", out) == 0, capsys.readouterr().err
    rows = _ok_rows(out)
    assert {(r["ood_set"], r["group"]) for r in rows} >= {("stripes", "near"), ("noise", "far")}
    info = json.loads((out / "results.json").read_text())["info"]
    assert info["linear_probe"]["classes"] == 3 and info["linear_probe"]["feature_dim"] == 8
    assert "linear probe" in info["model"]
    capsys.readouterr()
    assert _cli("pt-ood", "--id", ids, "--near", tmp_path / "nope", "--model", backbone, "--out", tmp_path / "x") == 2
    assert "nope" in capsys.readouterr().err


# --------------------------------------------------------------------------- NOVA
def _write_nova(root: Path, gold_as: str = "json") -> list[list[list[float]]]:
    """``data/nova-v1.parquet`` with the fields of the release (image struct, bbox_gold, ...)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(1)
    rows, gold = [], []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24 + i, 24), dtype=np.uint8)).save(buf, format="PNG")
        boxes = {"x": [2.0 + i], "y": [3.0], "width": [8.0], "height": [6.0 + i]} if i != 5 else \
            {"x": [], "y": [], "width": [], "height": []}
        gold.append([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in zip(*boxes.values())])
        rows.append({"filename": f"case_{i:03d}.png", "image": {"bytes": buf.getvalue(), "path": f"case_{i:03d}.png"},
                     "caption": "T2 hyperintense lesion", "final_diagnosis": "rare thing",
                     "bbox_gold": json.dumps(boxes) if gold_as == "json" else boxes})
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "nova-v1.parquet")
    return gold


def test_nova_reads_the_release_and_scores_boxes_end_to_end(tmp_path, capsys):
    from oodscope.bench.nova import load_nova

    gold = _write_nova(tmp_path / "Nova")
    _write_nova(tmp_path / "struct", gold_as="struct")
    for where in ("Nova", "struct"):
        cases = load_nova(tmp_path / where)
        assert cases.names[0] == "case_000.png" and cases.meta[0]["final_diagnosis"] == "rare thing"
        for got, want in zip(cases.gold, gold):
            np.testing.assert_array_equal(got, np.array(want).reshape(-1, 4))
    preds = tmp_path / "boxes.jsonl"
    preds.write_text("\n".join([
        json.dumps({"filename": "case_000.png", "boxes": [[2, 3, 10, 9]], "scores": [0.9]}),   # exact hit
        json.dumps({"filename": "case_001.png", "boxes": [[40, 40, 45, 45]], "scores": [0.8]}),  # miss
        json.dumps({"filename": "case_005.png", "boxes": [[1, 1, 4, 4]]}),                     # no gold: FP
    ]) + "\n")
    ids, _, _ = _image_folders(tmp_path, n=10)
    ckpt = _checkpoint(tmp_path / "net.safetensors", 3, in_channels=1, image_size=16)
    out = tmp_path / "run"
    assert _cli("nova", "--id", ids, "--data-root", tmp_path / "Nova", "--model", ckpt, "--boxes", preds,
                "--detectors", "msp,energy", "--cache-dir", tmp_path / "cache", "--out", out) == 0, \
        capsys.readouterr().err
    assert {(r["ood_set"], r["group"]) for r in _ok_rows(out)} >= {("nova", "far")}
    info = json.loads((out / "results.json").read_text())["info"]
    assert info["splits"]["nova"] == 6
    # hits in ranking order: TP (.9), FP (.8), FP (1.0 -> first!) over 5 gold boxes
    expected = localisation_metrics([[[2, 3, 10, 9]], [[40, 40, 45, 45]], [], [], [], [[1, 1, 4, 4]]], gold,
                                    [[0.9], [0.8], [], [], [], [1.0]])
    assert info["localisation"]["map_50"] == pytest.approx(expected["map_50"])
    assert expected["map_50"] == pytest.approx(21 * 0.5 / 101)  # recall 1/5 reached at precision 1/2
    capsys.readouterr()
    assert _cli("nova", "--id", ids, "--data-root", tmp_path / "nothing", "--model", ckpt, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nothing" / "data" / "nova-v1.parquet") in err and "c-i-ber/Nova" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"filename": "unknown.png", "boxes": []}) + "\n")
    with pytest.raises(ValueError, match="unknown case"):
        from oodscope.bench.nova import evaluate_nova_boxes

        evaluate_nova_boxes(bad, tmp_path / "Nova")
