"""NOVA: rare brain-MRI anomalies as an evaluation-only OOD set, with box localisation.

Bercea et al., "NOVA: A Benchmark for Anomaly Localization and Clinical Reasoning in Brain
MRI" (arXiv 2505.14064): about 900 brain MRI slices of 281 rare pathologies from Eurorad, each
with a caption, a diagnosis and expert bounding boxes (a "gold" consensus and the raters'),
never to be trained on. Release: huggingface.co/datasets/c-i-ber/Nova, file
``data/nova-v1.parquet`` (commit d28872d72247b4d32e537b8976cc1bd661502075 "submitted versions"
changes ``croissant.json`` and that file; the croissant describes "gold + multi-rater bounding
boxes (as JSON), and clinical metadata (as JSON)"). The authors' example notebook (same
dataset repository, ``example.ipynb`` at e2d3c6c6fd9b51a922b611ab8d48ad2f6c0be45e) reads a
record's ``image`` and ``bbox_gold`` with lists ``x``, ``y``, ``width``, ``height``
(``bbox_raters`` adds ``rater``). The parquet itself could not be opened from this machine,
so the reader accepts the forms those sources allow: ``bbox_gold`` as a struct of lists, as
its JSON text, or as a list of ``{x, y, width, height}`` boxes; ``image`` as the Hugging Face
image struct (``bytes``, ``path``), raw bytes, or a path relative to the data folder. A case is
named by its ``filename`` column when there is one, else by the image's ``path``, else by its
row number.

The benchmark (``oodscope bench nova``):

* NOVA has no training split and no normal scans, so the in-distribution data are yours:
  ``--id DIR`` (brain MRI slices, one sub-folder per class the ``--model`` classifies), cut
  (stratified, seeded) into train / ID-val / test ID; validation OOD generated from ID-val
  images. NOVA's images are the far-OOD test set ``nova`` (detection AUROC, FPR@95, ...).
* localisation: with ``--boxes FILE`` (JSON lines ``{"filename": ..., "boxes": [[x_min,
  y_min, x_max, y_max], ...], "scores": [...]}`` in the original image's pixels; scores
  optional; a case without a line has no predicted box), the gold boxes score them with
  NOVA's mAP@30, mAP@50 and mAP@[50:95] (`oodscope.localisation`), reported in
  ``info["localisation"]``. No oodscope detector predicts boxes; the file comes from your
  localiser (e.g. a VLM prompted as in the paper).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .spec import BenchmarkSpec, FeatureSet, ProviderOptions

__all__ = ["NOVA_FILE", "NovaCases", "build_nova", "evaluate_nova_boxes", "load_nova", "read_box_predictions"]

NOVA_FILE = "data/nova-v1.parquet"
_HOW_TO_GET = ("Download it from huggingface.co/datasets/c-i-ber/Nova (e.g. `huggingface-cli download c-i-ber/Nova "
               "--repo-type dataset --local-dir DIR`; academic, non-commercial use) and pass DIR as --data-root "
               "or put it at $OODSCOPE_DATA/nova. Reading parquet needs pyarrow (pip install pyarrow).")


@dataclass
class NovaCases:
    """NOVA's cases in file order: ``names``, encoded ``images`` (open binary files), ``gold``
    boxes ``(n_i, 4)`` as ``(x_min, y_min, x_max, y_max)`` pixels, and ``meta`` (the other
    columns: caption, diagnosis, ...)."""

    names: list[str]
    images: list[Any]
    gold: list[np.ndarray]
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def _gold_boxes(value: Any, where: str) -> np.ndarray:
    from ..localisation import xywh_to_xyxy

    if isinstance(value, (bytes, str)):
        value = json.loads(value) if str(value if isinstance(value, str) else value.decode()).strip() else []
    if value is None:
        return np.zeros((0, 4))
    if isinstance(value, dict):
        try:
            cols = [np.asarray(value[k] or [], dtype=np.float64) for k in ("x", "y", "width", "height")]
        except KeyError as exc:
            raise ValueError(f"{where}: bbox_gold has no {exc.args[0]!r} (expected x, y, width, height).") from None
        if len({len(c) for c in cols}) != 1:
            raise ValueError(f"{where}: bbox_gold's x, y, width, height lists differ in length.")
        return xywh_to_xyxy(np.stack(cols, axis=1)) if len(cols[0]) else np.zeros((0, 4))
    if isinstance(value, (list, tuple)):
        if not value:
            return np.zeros((0, 4))
        if all(isinstance(v, dict) for v in value):
            return xywh_to_xyxy([[v["x"], v["y"], v["width"], v["height"]] for v in value])
    raise ValueError(f"{where}: cannot read bbox_gold {str(value)[:80]!r} (expected x, y, width, height lists).")


def _image(value: Any, root: Path, where: str) -> Any:
    if isinstance(value, dict):
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value)
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else root / value
        if not path.exists():
            raise FileNotFoundError(f"{where}: image file {path} does not exist.")
        return path
    raise ValueError(f"{where}: no image bytes or path in the 'image' column.")


def load_nova(root: str | Path) -> NovaCases:
    """The cases of ``root/data/nova-v1.parquet`` (see the module docstring for the columns)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("Reading NOVA's parquet file needs pyarrow: pip install pyarrow.") from None
    root = Path(root)
    path = root / NOVA_FILE
    rows = pq.read_table(path).to_pylist()
    if not rows:
        raise ValueError(f"{path}: no rows.")
    missing = [c for c in ("image", "bbox_gold") if c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {sorted(rows[0])}.")
    names, images, gold, meta = [], [], [], []
    for i, row in enumerate(rows):
        image = row["image"]
        name = row.get("filename") or (image.get("path") if isinstance(image, dict) else None) or f"row{i}"
        where = f"{path} row {i} ({name})"
        names.append(str(name))
        images.append(_image(image, root, where))
        gold.append(_gold_boxes(row["bbox_gold"], where))
        meta.append({k: v for k, v in row.items() if k not in ("image", "bbox_gold", "bbox_raters")
                     and isinstance(v, (str, int, float, type(None)))})
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: case names are not unique; predictions could not be matched to cases.")
    return NovaCases(names, images, gold, meta)


def read_box_predictions(path: str | Path, names: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(boxes, scores)`` per case of ``names`` from a JSON-lines file (see the module doc)."""
    index = {n: i for i, n in enumerate(names)}
    boxes = [np.zeros((0, 4)) for _ in names]
    scores = [np.zeros(0) for _ in names]
    seen = set()
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg}).") from None
        name = str(rec.get("filename", ""))
        if name not in index:
            raise ValueError(f"{where}: unknown case {name!r}; 'filename' must name a NOVA case "
                             f"(e.g. {names[0]!r}).")
        if name in seen:
            raise ValueError(f"{where}: a second line for case {name!r}.")
        seen.add(name)
        b = np.asarray(rec.get("boxes") or [], dtype=np.float64).reshape(-1, 4)
        s = np.asarray(rec["scores"], dtype=np.float64) if rec.get("scores") is not None else np.ones(len(b))
        if s.shape != (len(b),):
            raise ValueError(f"{where}: {len(b)} boxes but {s.size} scores.")
        boxes[index[name]], scores[index[name]] = b, s
    return boxes, scores


def evaluate_nova_boxes(predictions: str | Path, root: str | Path | None = None,
                        cases: NovaCases | None = None) -> dict[str, float]:
    """NOVA's localisation metrics of a predictions file against the gold boxes."""
    from ..localisation import localisation_metrics

    cases = cases if cases is not None else load_nova(root)
    boxes, scores = read_box_predictions(predictions, cases.names)
    return localisation_metrics(boxes, cases.gold, scores)


def build_nova(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """``bench nova``: your ID brain MRI folder and classifier vs NOVA (see the module doc)."""
    from ..data import ImageDataset, read_image_files
    from .extract import ImageExtractor, check_model, load_network, model_normalization
    from .openood import release_root
    from .vision import _feature_set, image_read_options, input_shape, split_id_folder

    p = spec.params
    root = release_root("nova", [NOVA_FILE], options.data_root, spec.name, "NOVA's parquet file", _HOW_TO_GET)
    if p.get("id_dir") is None or not Path(p["id_dir"]).is_dir():
        raise ValueError(f"bench {spec.name} needs --id DIR: your in-distribution brain MRI images, one "
                         f"sub-folder per class of --model (NOVA has no normal scans); got {p.get('id_dir')!r}.")
    if p.get("boxes") is not None and not Path(p["boxes"]).is_file():
        raise FileNotFoundError(f"--boxes {p['boxes']!r}: no such file (JSON lines of predicted boxes).")
    if options.net is None and options.model is None:
        raise ValueError(f"Benchmark {spec.name!r} evaluates your network: pass --model path/to/checkpoint.")
    cases = load_nova(root)
    localisation = evaluate_nova_boxes(p["boxes"], cases=cases) if p.get("boxes") is not None else None
    net, meta, source = load_network(options, benchmark=spec.name)
    shape = input_shape(net, meta, source)
    sets = split_id_folder(p["id_dir"], options, shape, p["val_fraction"], p["test_fraction"], name="nova-id")
    check_model(net, len(sets["classes"]), shape, source)
    far = {}
    if options.wants("nova"):
        far["nova"] = options.cap(ImageDataset(read_image_files(cases.images, **image_read_options(
            shape, options.progress)), None, name="nova"))
    mean, std = model_normalization(meta, 0.5, 0.25)
    ex = ImageExtractor(net, mean, std, options)
    fs = _feature_set(ex, sets, far=far)
    fs.info.update(model=source, normalization={"mean": mean, "std": std},
                   ood_descriptions={"nova": f"NOVA's {len(cases)} rare-pathology brain MRI slices"},
                   notes=[f"ID classes from {p['id_dir']}: {', '.join(sets['classes'])}; NOVA from {root}"],
                   **ex.info())
    if localisation is not None:
        fs.info["localisation"] = {"boxes": str(p["boxes"]), **localisation}
        fs.info["notes"].append(
            f"Localisation of {p['boxes']} against NOVA's gold boxes: mAP@30 {localisation['map_30']:.4f}, "
            f"mAP@50 {localisation['map_50']:.4f}, mAP@[50:95] {localisation['map_50_95']:.4f}")
    fs.detector_kwargs["*"] = {"model": net, "input_std": std}
    return fs
