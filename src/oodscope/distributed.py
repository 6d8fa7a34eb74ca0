"""Beyond one machine, on Ray (the ``ray`` extra): extraction and scoring over workers.

* `extract` runs a network over a Ray Dataset with ``map_batches``: each worker builds the
  model once (from a callable or an oodscope checkpoint), runs `oodscope.extract` on its
  batches, and the driver gathers one `Features` in input order, with the classifier head
  attached as the local path would attach it.
* `score` scores `Features` with a fitted detector or `Guard` on any number of workers. The
  detector travels as its saved bundle (`oodscope.save`: arrays + JSON, SHA-256 manifest),
  loaded by each worker with `oodscope.load` — the same format a service uses.

Both give the same result as the local path (to float32 round-off from batching).

On a real cluster: ``ray start --head`` on one machine, ``ray start --address=HEAD:6379``
on the others, then pass ``address="auto"`` (``oodscope score ... --ray auto``). Without
an address, a local Ray instance is started with ``num_cpus`` workers.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .features import Features

__all__ = ["ray_session", "score", "extract", "to_dataset"]

_ROW = "__row__"


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError("oodscope.distributed needs Ray: pip install 'oodscope[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to ``address`` (e.g. ``"auto"``) or start a local Ray; shut down only what
    this call started."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            kwargs["num_cpus"] = num_cpus
        ray.init(address=address, **kwargs)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def to_dataset(features: Features):
    """A Ray Dataset with one column per per-sample field of ``features`` plus a row index
    (so results can be put back in input order whatever the execution order)."""
    ray = _ray()
    columns = {_ROW: np.arange(len(features))}
    for name in ("logits", "features", "labels"):
        value = getattr(features, name)
        if value is not None:
            columns[name] = np.asarray(value)
    for name, value in features.extras.items():
        columns[f"extra:{name}"] = np.asarray(value)
    ds = None
    for name, arr in columns.items():
        part = ray.data.from_numpy(arr).rename_columns({"data": name})
        ds = part if ds is None else ds.zip(part)
    return ds


def _batch_features(batch: dict[str, np.ndarray], head: dict[str, np.ndarray]) -> Features:
    fields = {k: batch[k] for k in ("logits", "features", "labels") if k in batch}
    extras = {k[len("extra:"):]: v for k, v in batch.items() if k.startswith("extra:")}
    return Features(**fields, **head, extras=extras)


def _bundle_bytes(obj) -> dict[str, bytes]:
    import oodscope

    with tempfile.TemporaryDirectory(prefix="oodscope-ray-") as tmp:
        path = oodscope.save(obj, Path(tmp) / "bundle")
        return {p.name: p.read_bytes() for p in Path(path).iterdir()}


class _BundleScorer:
    """Ray actor: loads the saved detector/guard once, scores batches."""

    def __init__(self, bundle: dict[str, bytes], head: dict[str, np.ndarray], runtime: dict):
        import oodscope

        self._tmp = tempfile.TemporaryDirectory(prefix="oodscope-ray-worker-")
        root = Path(self._tmp.name)
        for name, data in bundle.items():
            (root / name).write_bytes(data)
        self.obj = oodscope.load(root, **runtime)
        self.head = head

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        f = _batch_features(batch, self.head)
        if hasattr(self.obj, "decide"):
            out = self.obj.decide(f)
            return {_ROW: batch[_ROW], "score": out["scores"], "accept": out["accept"],
                    "p_value": out["p_values"]}
        return {_ROW: batch[_ROW], "score": self.obj.score(f)}


def _gather(ds, n: int, columns: list[str]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {c: [] for c in (_ROW, *columns)}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for c in parts:
            parts[c].append(np.asarray(batch[c]))
    rows = np.concatenate(parts.pop(_ROW))
    if len(rows) != n or not np.array_equal(np.sort(rows), np.arange(n)):
        raise RuntimeError(f"Ray returned {len(rows)} rows for {n} inputs.")
    order = np.argsort(rows)
    return {c: np.concatenate(v)[order] for c, v in parts.items()}


def score(obj, features: Features, *, address: str | None = None, num_workers: int = 2,
          batch_size: int = 4096, **runtime: Any):
    """Score ``features`` with a fitted detector (returns scores) or a `Guard` (returns the
    dict of `Guard.decide`) on ``num_workers`` Ray workers. ``runtime`` objects (e.g. a
    model for ODIN) are passed to `oodscope.load` on each worker. Stateful detectors are
    refused: their scores depend on one ordered stream."""
    from .guard import Guard

    det = obj.detector if isinstance(obj, Guard) else obj
    if det.stateful:
        raise ValueError(f"{type(det).__name__} is stateful (its scores depend on the order of "
                         "one stream); score it locally, not split over workers.")
    if int(num_workers) < 1 or int(batch_size) < 1:
        raise ValueError("num_workers and batch_size must be >= 1.")
    head = {k: v for k, v in (("head_weight", features.head_weight),
                              ("head_bias", features.head_bias)) if v is not None}
    with ray_session(address, num_cpus=num_workers):
        ds = to_dataset(features).map_batches(
            _BundleScorer, fn_constructor_kwargs={"bundle": _bundle_bytes(obj), "head": head,
                                                   "runtime": runtime},
            batch_size=int(batch_size), concurrency=int(num_workers), batch_format="numpy")
        cols = ["score", "accept", "p_value"] if isinstance(obj, Guard) else ["score"]
        out = _gather(ds, len(features), cols)
    if isinstance(obj, Guard):
        return {"scores": out["score"], "accept": out["accept"].astype(bool),
                "p_values": out["p_value"]}
    return out["score"]


class _ModelRunner:
    """Ray actor: builds the model once, extracts Features of input batches."""

    def __init__(self, model_fn: Callable[[], Any] | str, extract_kwargs: dict[str, Any]):
        self.model = _build_model(model_fn)
        self.kwargs = extract_kwargs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .extraction import extract as local_extract

        x = batch["inputs"]
        f = local_extract(self.model, x, batch_size=len(x), progress=False, **self.kwargs)
        out = {_ROW: batch[_ROW], "logits": f.logits, "features": f.features}
        out.update({f"extra:{k}": v for k, v in f.extras.items()})
        return out


def _build_model(model_fn: Callable[[], Any] | str):
    if isinstance(model_fn, (str, Path)):
        from .models.checkpoint import load_checkpoint

        model, _ = load_checkpoint(model_fn)
        return model.eval()
    model = model_fn()
    return model.eval()


def extract(model_fn: Callable[[], Any] | str, inputs, labels=None, *, address: str | None = None,
            num_workers: int = 2, batch_size: int = 256, **extract_kwargs: Any) -> Features:
    """`oodscope.extract` over a Ray Dataset: ``model_fn`` is a zero-argument callable
    returning the torch model (run once per worker) or the path of an oodscope checkpoint;
    ``inputs`` an array of model inputs (N, ...) or a Ray Dataset with an ``inputs`` column.
    Returns the same `Features` as the local path, in input order."""
    ray = _ray()
    if int(num_workers) < 1 or int(batch_size) < 1:
        raise ValueError("num_workers and batch_size must be >= 1.")
    with ray_session(address, num_cpus=num_workers):
        if isinstance(inputs, np.ndarray):
            n = len(inputs)
            ds = ray.data.from_numpy(np.arange(n)).rename_columns({"data": _ROW}).zip(
                ray.data.from_numpy(np.asarray(inputs)).rename_columns({"data": "inputs"}))
        else:
            ds, n = inputs, inputs.count()
            if _ROW not in ds.columns():
                raise ValueError(f"a Ray Dataset given as inputs needs a {_ROW!r} column "
                                 "(row numbers 0..N-1) and an 'inputs' column.")
        mapped = ds.map_batches(_ModelRunner, fn_constructor_kwargs={
            "model_fn": model_fn, "extract_kwargs": extract_kwargs},
            batch_size=int(batch_size), concurrency=int(num_workers), batch_format="numpy")
        first = mapped.take_batch(1, batch_format="numpy")
        extra_cols = [c for c in first if c.startswith("extra:")]
        out = _gather(mapped, n, ["logits", "features", *extra_cols])
    head = _head_of(_build_model(model_fn), extract_kwargs.get("head"))
    extras = {c[len("extra:"):]: out[c] for c in extra_cols}
    return Features(logits=out["logits"], features=out["features"],
                    labels=None if labels is None else np.asarray(labels), extras=extras, **head)


def _head_of(model, head_name: str | None) -> dict[str, np.ndarray]:
    from .extraction import find_head

    _, head = find_head(model, head_name)
    out = {"head_weight": head.weight.detach().cpu().numpy().astype(np.float32)}
    if head.bias is not None:
        out["head_bias"] = head.bias.detach().cpu().numpy().astype(np.float32)
    return out
