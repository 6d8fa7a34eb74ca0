"""Beyond one machine, on Ray (the ``ray`` extra): extraction and scoring over workers.

* `extract` runs a network over a Ray Dataset with ``map_batches``: each worker builds the
  model once (from a zero-argument callable or an oodscope checkpoint path) and runs
  `oodscope.extract` on its batches; the driver gathers one `Features` in input order, with
  the classifier head and metadata that the local path attaches.
* `score` scores `Features` with a fitted detector or `Guard` on any number of workers. The
  detector travels as its saved bundle (`oodscope.save`: arrays + JSON with a SHA-256
  manifest, no pickle of detector code), put once in Ray's object store and loaded by each
  worker with `oodscope.load`, the same format a service loads; the Features travel as
  Arrow blocks of rows.

Both give the same arrays as the local path: the same code runs on each batch of rows, so
only the batch boundaries differ (results equal up to float round-off of the batched
matrix products; the tests check 1e-6).

Without an address a local Ray instance is started (``num_cpus`` = ``num_workers``) and
shut down afterwards. On a real cluster: ``ray start --head`` on one machine,
``ray start --address=HEAD_IP:6379`` on the others, then pass ``address="auto"`` from any
of them (``oodscope score ... --ray auto``). Code that makes many calls (a benchmark runner)
opens one `ray_session` around all of them; calls inside reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .features import Features

__all__ = ["ray_session", "to_dataset", "score", "extract"]

#: Column holding each row's position in the input (results are put back in that order).
ROW = "__row__"
_EXTRA = "extra:"
#: Options of `oodscope.extract` that only make sense on one machine.
_LOCAL_ONLY = ("cache_dir", "cache_key", "out_dir", "chunk_size", "progress", "desc", "device")


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError("oodscope.distributed needs Ray: pip install 'oodscope[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Use the running Ray, else connect to ``address`` (``"auto"``: the cluster this machine
    joined with ``ray start``; ``"ray://HOST:10001"``: Ray Client) or, with ``address`` None
    or ``"local"``, start a local Ray with ``num_cpus`` CPUs. Shuts down only what it
    started. Yields the ``ray`` module."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address in (None, "local"):
            kwargs["num_cpus"] = num_cpus
            address = None if address is None else "local"
        ray.init(address=address, **kwargs)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def _ordered_execution(dataset=None) -> Iterator[None]:
    """Ray Data yields batches in input order (and without progress bars) inside: set on
    the current DataContext and on ``dataset``'s own (a Dataset keeps the context it was
    created with), restored afterwards."""
    import ray.data

    contexts = [ray.data.DataContext.get_current()]
    if dataset is not None and dataset.context is not contexts[0]:
        contexts.append(dataset.context)
    saved = [(c.execution_options.preserve_order, c.enable_progress_bars) for c in contexts]
    for c in contexts:
        c.execution_options.preserve_order, c.enable_progress_bars = True, False
    try:
        yield
    finally:
        for c, (order, bars) in zip(contexts, saved):
            c.execution_options.preserve_order, c.enable_progress_bars = order, bars


def _table(columns: dict[str, np.ndarray]):
    """A pyarrow Table of numpy columns; arrays of 2 or more dimensions become Ray's
    tensor columns (read back as numpy arrays of the same dtype and shape)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    return pa.table({
        name: ArrowTensorArray.from_numpy(np.ascontiguousarray(arr)) if arr.ndim > 1 else arr
        for name, arr in columns.items()
    })


def _from_columns(columns: dict[str, np.ndarray], n: int, block_rows: int):
    ray = _ray()
    return ray.data.from_arrow([
        _table({name: np.asarray(arr[start:start + block_rows]) for name, arr in columns.items()})
        for start in range(0, n, block_rows)
    ])


def _block_rows(n: int, num_workers: int, block_rows: int | None) -> int:
    if block_rows is not None:
        if int(block_rows) < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}.")
        return int(block_rows)
    # a few blocks per worker so that work is spread, each at most 65,536 rows
    return int(max(1, min(65_536, -(-n // (4 * max(num_workers, 1))))))


def _per_sample_columns(features: Features) -> dict[str, np.ndarray]:
    columns = {name: getattr(features, name) for name in ("logits", "features", "labels")
               if getattr(features, name) is not None}
    columns.update({_EXTRA + name: value for name, value in features.extras.items()})
    return columns


def to_dataset(features: Features, block_rows: int | None = None):
    """A Ray Dataset with one column per per-sample field of ``features`` (extras as
    ``"extra:NAME"``) plus ``"__row__"``, each sample's position. Built from memory-mapped
    arrays block by block (``block_rows`` rows each)."""
    n = len(features)
    columns = {ROW: np.arange(n), **_per_sample_columns(features)}
    return _from_columns(columns, n, _block_rows(n, 2, block_rows))


def _constant_fields(features: Features) -> dict[str, Any]:
    """What every batch shares: the head and the metadata."""
    out: dict[str, Any] = {"meta": dict(features.meta)}
    for name in ("head_weight", "head_bias"):
        if getattr(features, name) is not None:
            out[name] = np.asarray(getattr(features, name))
    return out


def _batch_features(batch: dict[str, np.ndarray], constant: dict[str, Any]) -> Features:
    fields = {k: batch[k] for k in ("logits", "features", "labels") if k in batch}
    extras = {k[len(_EXTRA):]: v for k, v in batch.items() if k.startswith(_EXTRA)}
    return Features(**fields, **constant, extras=extras)


def _bundle_bytes(obj) -> dict[str, bytes]:
    """The files of ``oodscope.save(obj)``, read into memory."""
    import oodscope

    with tempfile.TemporaryDirectory(prefix="oodscope-ray-") as tmp:
        path = Path(oodscope.save(obj, Path(tmp) / "bundle"))
        return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _digest(bundle: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(bundle):
        h.update(name.encode() + b"\0" + hashlib.sha256(bundle[name]).digest())
    return h.hexdigest()


#: Worker processes keep the last few loaded detectors / models (Ray reuses its worker
#: processes across tasks, so a bundle is read once per process, not once per batch).
_WORKER_CACHE: dict[str, Any] = {}
_WORKER_CACHE_SIZE = 2


def _cached(key: str, build: Callable[[], Any]) -> Any:
    if key not in _WORKER_CACHE:
        while len(_WORKER_CACHE) >= _WORKER_CACHE_SIZE:
            _WORKER_CACHE.pop(next(iter(_WORKER_CACHE)))
        _WORKER_CACHE[key] = build()
    return _WORKER_CACHE[key]


def _load_bundle(bundle: dict[str, bytes], runtime: dict[str, Any]):
    import oodscope

    with tempfile.TemporaryDirectory(prefix="oodscope-ray-worker-") as tmp:
        for name, data in bundle.items():
            (Path(tmp) / name).write_bytes(data)
        return oodscope.load(tmp, **runtime)


def _score_block(key: str, bundle_ref: list, runtime: dict[str, Any], constant: dict[str, Any],
                 columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray task: score one block of rows with the (cached) detector or guard."""
    import ray

    from .guard import Guard

    obj = _cached(key, lambda: _load_bundle(ray.get(bundle_ref[0]), runtime))
    f = _batch_features(columns, constant)
    if isinstance(obj, Guard):
        out = obj.decide(f)
        return {"score": out["scores"], "accept": out["accept"], "p_value": out["p_values"]}
    return {"score": obj.score(f)}


def _check_workers(num_workers: int, batch_size: int) -> None:
    for name, value in (("num_workers", num_workers), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_cpus(cpus_per_worker: float) -> float:
    if not (isinstance(cpus_per_worker, (int, float)) and cpus_per_worker > 0):
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker!r}.")
    return float(cpus_per_worker)


def score(obj, features: Features, *, address: str | None = None, num_workers: int = 2,
          batch_size: int = 16_384, cpus_per_worker: float = 1.0, **runtime: Any):
    """Score ``features`` on ``num_workers`` Ray workers.

    ``obj`` is a fitted detector (returns the scores, as ``obj.score(features)``) or a
    `Guard` (returns the dict of ``Guard.decide``). The rows are cut into blocks of
    ``batch_size``; at most ``num_workers`` Ray tasks (``cpus_per_worker`` CPUs each) score
    blocks at a time, anywhere in the cluster. ``runtime`` objects (e.g. ``model=`` for
    ODIN) are passed to `oodscope.load` on each worker. Stateful detectors (AdaNeg) are
    refused: their scores depend on one ordered stream. See `ray_session` for ``address``.
    """
    from .detectors.base import NotFittedError
    from .guard import Guard

    det = obj.detector if isinstance(obj, Guard) else obj
    if not det.is_fitted:
        raise NotFittedError(f"{type(det).__name__} is not fitted: fit it before scoring on Ray.")
    if det.stateful:
        raise ValueError(f"{type(det).__name__} is stateful (its scores depend on the order of "
                         "one stream); score it locally, not split over workers.")
    _check_workers(num_workers, batch_size)
    cpus = _check_cpus(cpus_per_worker)
    n = len(features)
    if n == 0:
        raise ValueError("score got 0 samples.")
    columns = _per_sample_columns(features)
    constant = _constant_fields(features)
    bundle = _bundle_bytes(obj)
    key = _digest(bundle)
    with ray_session(address, num_cpus=num_workers) as ray:
        task = ray.remote(num_cpus=cpus, max_retries=2)(_score_block)
        bundle_ref = ray.put(bundle)
        const_ref = ray.put(constant)
        starts = range(0, n, int(batch_size))
        results: dict[int, Any] = {}
        pending: dict[Any, int] = {}
        for start in starts:
            if len(pending) >= num_workers:
                done, _ = ray.wait(list(pending), num_returns=1)
                results[pending.pop(done[0])] = ray.get(done[0])
            block = {k: np.asarray(v[start:start + int(batch_size)]) for k, v in columns.items()}
            pending[task.remote(key, [bundle_ref], runtime, const_ref, block)] = start
        for ref, start in pending.items():
            results[start] = ray.get(ref)
    parts = [results[start] for start in starts]
    out = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    if len(out["score"]) != n:
        raise RuntimeError(f"Ray returned {len(out['score'])} scores for {n} inputs.")
    if isinstance(obj, Guard):
        return {"scores": out["score"].astype(np.float64), "accept": out["accept"].astype(bool),
                "p_values": out["p_value"].astype(np.float64)}
    return out["score"].astype(np.float64)


# ---------------------------------------------------------------------------- extraction
def _build_model(model_fn: Callable[[], Any] | str | Path):
    if isinstance(model_fn, (str, Path)):
        from .models.checkpoint import load_checkpoint

        model, _ = load_checkpoint(model_fn)
    elif callable(model_fn):
        model = model_fn()
    else:
        raise TypeError("model_fn must be a zero-argument callable returning the model, or the "
                        f"path of an oodscope checkpoint; got {type(model_fn).__name__}.")
    return model.eval()


def _extract_batch(batch: dict[str, np.ndarray], *, token: str, model_fn, device: str | None,
                   extract_kwargs: dict[str, Any], input_column: str,
                   label_column: str) -> dict[str, np.ndarray]:
    """Ray Data UDF: the Features of one batch, with the model this worker built for this
    `extract` call (``token``)."""
    from .extraction import extract as local_extract

    def build():
        model = _build_model(model_fn)
        return model.to(device) if device is not None else model

    model = _cached(token, build)
    x = batch[input_column]
    f = local_extract(model, x, batch_size=len(x), progress=False, **extract_kwargs)
    out = {name: value for name, value in _per_sample_columns(f).items() if name != "labels"}
    if ROW in batch:
        out[ROW] = batch[ROW]
    if label_column in batch:
        out["labels"] = np.asarray(batch[label_column]).astype(np.int64)
    return out


def _gather(ds, n: int, columns: list[str], check_rows: bool) -> dict[str, np.ndarray]:
    """Concatenate the columns of every output batch (Ray Data keeps the input order inside
    `_ordered_execution`; with ``check_rows`` the row numbers prove it)."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns + ([ROW] if check_rows else [])}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for c in parts:
            parts[c].append(np.asarray(batch[c]))
    out = {c: np.concatenate(v) for c, v in parts.items() if v}
    got = len(out[columns[0]]) if columns[0] in out else 0
    if got != n:
        raise RuntimeError(f"Ray returned {got} rows for {n} inputs.")
    if check_rows and not np.array_equal(out.pop(ROW), np.arange(n)):
        raise RuntimeError("Ray returned the rows out of order.")
    return out


def extract(model_fn: Callable[[], Any] | str | Path, inputs, labels=None, *,
            address: str | None = None, num_workers: int = 2, batch_size: int = 256,
            block_rows: int | None = None, cpus_per_worker: float = 1.0,
            gpus_per_worker: float = 0, input_column: str = "inputs",
            label_column: str = "labels", **extract_kwargs: Any) -> Features:
    """`oodscope.extract` over a Ray Dataset with ``map_batches``, the model on each worker.

    ``model_fn``: a zero-argument callable returning the torch model, built once per worker
    process (it travels as code, by cloudpickle: a function from your own module needs that
    module importable on the workers, or ``ray.cloudpickle.register_pickle_by_value``), or
    the path of an oodscope checkpoint readable from every worker. ``inputs``: an array of
    model inputs ``(N, ...)`` (with ``labels``), or a Ray Dataset with an ``input_column``
    (and optionally a ``label_column``) column, e.g. from ``ray.data.read_images`` plus a
    preprocessing ``map_batches``; its rows come back in the dataset's order. At most
    ``num_workers`` tasks run at once, each with ``cpus_per_worker`` CPUs and
    ``gpus_per_worker`` GPUs (> 0: the model runs on the worker's GPU). Other keyword
    arguments go to `oodscope.extract` (``head``, ``penultimate``, ``layers``,
    ``keep_inputs``, ``feature_dtype``).

    Returns the `Features` the local ``oodscope.extract(model, inputs)`` returns (logits,
    features, extras, labels, head, metadata), in input order.
    """
    ray = _ray()
    _check_workers(num_workers, batch_size)
    cpus = _check_cpus(cpus_per_worker)
    local_only = sorted(set(extract_kwargs) & set(_LOCAL_ONLY))
    if local_only:
        raise ValueError(f"{local_only} are options of the local oodscope.extract; the Ray path "
                         "gathers the Features in memory on the driver (save them afterwards).")
    user_dataset = inputs if isinstance(inputs, ray.data.Dataset) else None
    with ray_session(address, num_cpus=num_workers), _ordered_execution(user_dataset):
        if user_dataset is not None:
            if labels is not None:
                raise ValueError(f"with a Ray Dataset, give labels as its {label_column!r} column.")
            if input_column not in inputs.columns():
                raise ValueError(f"the Ray Dataset has no {input_column!r} column "
                                 f"(columns: {inputs.columns()}); set input_column=.")
            ds, check_rows, n = inputs, False, inputs.count()
            first = np.asarray(inputs.take_batch(1, batch_format="numpy")[input_column])
            with_labels = label_column in inputs.columns()
        else:
            x = np.asarray(inputs)
            if x.ndim < 1 or len(x) == 0:
                raise ValueError("extract got no inputs.")
            columns = {ROW: np.arange(len(x)), input_column: x}
            if labels is not None:
                y = np.asarray(labels)
                if y.shape != (len(x),):
                    raise ValueError(f"labels must have shape ({len(x)},), got {y.shape}.")
                columns[label_column] = y
            ds = _from_columns(columns, len(x), _block_rows(len(x), num_workers, block_rows))
            check_rows, first, n, with_labels = True, x[:1], len(x), labels is not None
        # which outputs exist, the head and the metadata: decided by the local path's code
        probe = _local_probe(model_fn, first, extract_kwargs)
        names = list(_per_sample_columns(probe))
        mapped = ds.map_batches(
            _extract_batch,
            fn_kwargs={"token": uuid.uuid4().hex, "model_fn": model_fn,
                       "device": "cuda" if gpus_per_worker else None,
                       "extract_kwargs": extract_kwargs, "input_column": input_column,
                       "label_column": label_column},
            batch_size=int(batch_size), concurrency=int(num_workers), batch_format="numpy",
            num_cpus=cpus, num_gpus=gpus_per_worker or None)
        out = _gather(mapped, n, names + (["labels"] if with_labels else []), check_rows)
    extras = {c[len(_EXTRA):]: out[c] for c in names if c.startswith(_EXTRA)}
    return Features(logits=out.get("logits"), features=out.get("features"),
                    labels=out.get("labels"), head_weight=probe.head_weight,
                    head_bias=probe.head_bias, extras=extras, meta=dict(probe.meta))


def _local_probe(model_fn, first: np.ndarray, extract_kwargs: dict[str, Any]) -> Features:
    """`oodscope.extract` of one input on the driver (CPU)."""
    from .extraction import extract as local_extract

    model = _build_model(model_fn).to("cpu")
    return local_extract(model, first[:1], batch_size=1, progress=False, **extract_kwargs)
