"""``oodscope serve``: a saved `Guard` behind HTTP (FastAPI + uvicorn, the ``serve`` extra).

Endpoints
---------
``POST /score``
    Body: JSON ``{"features": [[...], ...]}`` (one key per field the detector reads, e.g.
    ``"logits"``; a bare list of rows is taken as the single field the detector needs), or
    a ``.npy`` array (``Content-Type: application/x-npy`` or ``application/octet-stream``,
    the field named by ``?field=``, default the detector's single field). Answer:
    ``{"scores": [...], "accept": [...], "p_values": [...], "threshold": t, "n": n}``.
``GET /info``
    Detector, parameters, threshold and its interval, expected fields and widths.
``GET /metrics``
    The rolling rejection rate and its binomial test against the calibrated rate
    (`oodscope.monitor`); ``?format=prometheus`` for the Prometheus text format.
``GET /health``
    ``{"status": "ok"}``; open even when an API key is set (for liveness probes).

Bad input is answered with a 4xx whose ``detail`` says what was wrong — 400 malformed
body, 401 missing/wrong API key, 413 body or row count over the limit, 415 unsupported
content type, 422 wrong field, width, dtype or non-finite values — never a 500. The server
binds to 127.0.0.1 unless told otherwise. Scoring is serialised by a lock (detectors keep
small caches; stateful ones must see one stream).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime

import hmac
import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .guard import Guard

__all__ = ["create_app", "serve", "DEFAULT_MAX_ROWS", "DEFAULT_MAX_BODY_BYTES"]

#: requests with at most this many rows are scored on the event loop (a thread hop costs more)
INLINE_ROWS = 16
DEFAULT_MAX_ROWS = 100_000
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
_NPY_TYPES = ("application/x-npy", "application/octet-stream", "application/npy")


class InputError(Exception):
    """A request the guard cannot score, with the HTTP status to answer."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _require_fastapi():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError("oodscope serve needs FastAPI and uvicorn: pip install 'oodscope[serve]'") from None


class _Scorer:
    """Turns request bodies into validated Features and scores them under a lock."""

    def __init__(self, guard: Guard, max_rows: int, monitor):
        self.guard = guard
        self.max_rows = int(max_rows)
        self.monitor = monitor
        info = guard.info()
        self.fields = info["fields"]
        self.widths = info["widths"]
        self.lock = threading.Lock()
        # rows that re-run a network take too long for the event loop
        self.inline_rows = 0 if "model" in type(guard.detector).all_requirements() else INLINE_ROWS

    def features_from_json(self, body: bytes):
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(400, f"the body is not valid JSON: {exc}") from None
        if isinstance(doc, list):
            doc = {self._single_field(): doc}
        if not isinstance(doc, dict):
            raise InputError(422, "send a JSON object with one key per field, e.g. "
                                  f'{{"{self.fields[0] if self.fields else "features"}": [[...], ...]}}')
        unknown = sorted(set(doc) - set(self.fields) - {"labels"})
        if unknown:
            raise InputError(422, f"unknown field(s) {unknown}; this detector reads {self.fields}")
        arrays = {}
        for name in self.fields:
            if name not in doc:
                raise InputError(422, f"missing field {name!r}; this detector reads {self.fields}")
            arrays[name] = self._array(name, doc[name])
        return self._features(arrays)

    def features_from_npy(self, body: bytes, field: str | None):
        name = field or self._single_field()
        if name not in self.fields:
            raise InputError(422, f"field {name!r} is not read by this detector; it reads {self.fields}")
        if len(self.fields) > 1:
            raise InputError(422, f"this detector reads {self.fields}; send them together as JSON")
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(400, f"the body is not a readable .npy array: {exc}") from None
        if not isinstance(arr, np.ndarray):
            raise InputError(400, "the body is an .npz archive; send a single .npy array")
        return self._features({name: self._array(name, arr)})

    def _single_field(self) -> str:
        if len(self.fields) != 1:
            raise InputError(422, f"this detector reads {self.fields}; send a JSON object with "
                                  "one key per field")
        return self.fields[0]

    def _array(self, name: str, value: Any) -> np.ndarray:
        if name == "text":
            if not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
                raise InputError(422, "`text` must be a list of strings")
            arr = np.array(value, dtype=str)
        else:
            try:
                arr = np.asarray(value, dtype=np.float32) if not isinstance(value, np.ndarray) \
                    else value
            except (ValueError, TypeError):
                raise InputError(422, f"`{name}` must be a (rows × width) array of numbers; got "
                                      "ragged rows or non-numbers") from None
            if arr.dtype.kind not in "fiu":
                raise InputError(422, f"`{name}` must be numeric, got dtype {arr.dtype}")
            width = self.widths.get(name)
            want = 1 + (len(width) if isinstance(width, list) else 1)
            if arr.ndim == want - 1 and width is not None:  # one row sent without the batch axis
                arr = arr[None]
            if arr.ndim != want:
                raise InputError(422, f"`{name}` must be {want}-D (rows first), got shape "
                                      f"{list(arr.shape)}")
            got = list(arr.shape[1:]) if isinstance(width, list) else int(arr.shape[1])
            if width is not None and got != width:
                raise InputError(422, f"`{name}` has width {got} but the detector was fitted on "
                                      f"width {width}")
            if not np.all(np.isfinite(arr)):
                raise InputError(422, f"`{name}` contains {int(np.sum(~np.isfinite(arr)))} NaN or "
                                      "infinite value(s)")
        if len(arr) == 0:
            raise InputError(422, f"`{name}` has no rows")
        if len(arr) > self.max_rows:
            raise InputError(413, f"{len(arr)} rows exceed the limit of {self.max_rows} per request")
        return arr

    def _features(self, arrays: dict[str, np.ndarray]):
        from .features import Features

        n = {len(a) for a in arrays.values()}
        if len(n) > 1:
            raise InputError(422, f"fields have different row counts: "
                                  f"{ {k: len(v) for k, v in arrays.items()} }")
        known = {k: arrays.pop(k) for k in ("features", "logits") if k in arrays}
        return Features(**known, extras=arrays)

    def score(self, features) -> dict[str, Any]:
        with self.lock:
            return self._score_locked(features)

    def score_now(self, features) -> dict[str, Any] | None:
        """Score on the calling thread if no other request holds the detector, else None."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            return self._score_locked(features)
        finally:
            self.lock.release()

    def _score_locked(self, features) -> dict[str, Any]:
        try:
            out = self.guard.decide(features)
        except ValueError as exc:
            raise InputError(422, str(exc)) from None
        status = self.monitor.update(out["accept"]) if self.monitor is not None else None
        reply = {"n": int(len(out["scores"])), "threshold": self.guard.threshold_,
                 "scores": out["scores"].tolist(), "accept": out["accept"].tolist(),
                 "p_values": out["p_values"].tolist()}
        if status is not None and status.alert:
            reply["drift_alert"] = status.direction
        return reply


def create_app(guard: Guard, *, api_key: str | None = None, max_rows: int = DEFAULT_MAX_ROWS,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, monitor_window: int = 1000,
               alert_level: float = 1e-3):
    """The FastAPI application serving ``guard`` (see the module docstring)."""
    _require_fastapi()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.concurrency import run_in_threadpool

    if api_key is not None and not api_key:
        raise ValueError("api_key is empty; give a non-empty key or none.")
    monitor = guard.monitor(window=monitor_window, alert_level=alert_level)
    scorer = _Scorer(guard, max_rows, monitor)
    key = api_key.encode("utf-8") if api_key else None
    drain_cap = max(4 * max_body_bytes, 16 << 20)
    app = FastAPI(title="oodscope guard", version=guard.info()["oodscope_version"],
                  docs_url=None, redoc_url=None)
    app.state.guard, app.state.monitor = guard, monitor

    def error(status: int, detail: str):
        return JSONResponse({"detail": detail}, status_code=status)

    async def refuse(request: Request, status: int, detail: str):
        # Read (and drop) what the client is still sending before answering, so it gets the
        # error instead of a reset connection; past the cap the connection is simply closed.
        drained = 0
        try:
            async for chunk in request.stream():
                drained += len(chunk)
                if drained > drain_cap:
                    break
        except Exception:  # the client went away: nothing left to answer
            pass
        return error(status, detail)

    async def check_key(request: Request, call_next):
        if request.url.path != "/health":
            given = request.headers.get("x-api-key")
            auth = request.headers.get("authorization", "")
            if given is None and auth.lower().startswith("bearer "):
                given = auth[7:]
            if given is None or not hmac.compare_digest(given.encode("utf-8"), key):
                return await refuse(request, 401, "missing or wrong API key (send it as "
                                                  "X-API-Key or Authorization: Bearer)")
        return await call_next(request)

    if key is not None:  # an HTTP middleware costs every request time: only with a key
        app.middleware("http")(check_key)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        return guard.info()

    @app.get("/metrics")
    async def metrics(format: str = "json"):
        status = monitor.status()
        if format == "prometheus":
            return PlainTextResponse(_prometheus(status), media_type="text/plain; version=0.0.4")
        if format != "json":
            return error(422, "format must be 'json' or 'prometheus'")
        return _finite(status.as_dict())

    @app.post("/score")
    async def score(request: Request, field: str | None = None):
        length = request.headers.get("content-length")
        too_big = f"the body exceeds the limit of {max_body_bytes} bytes"
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return await refuse(request, 413, too_big)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return await refuse(request, 413, too_big)
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        try:
            if ctype == "application/json":
                feats = scorer.features_from_json(bytes(body))
            elif ctype in _NPY_TYPES:
                feats = scorer.features_from_npy(bytes(body), field)
            else:
                return error(415, f"unsupported content type {ctype!r}; send application/json or "
                                  "application/x-npy")
            # a few rows are scored on the event loop when the detector is free (a thread hop
            # costs more than the work); anything else, or a busy detector, goes to a thread
            reply = scorer.score_now(feats) if len(feats) <= scorer.inline_rows else None
            return reply if reply is not None else await run_in_threadpool(scorer.score, feats)
        except InputError as exc:
            return error(exc.status, exc.detail)

    return app


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


def _prometheus(status) -> str:
    lines = []
    for name, value, help_text in (
        ("oodscope_window_inputs", status.n, "decisions in the rolling window"),
        ("oodscope_window_rejected", status.rejected, "rejected inputs in the window"),
        ("oodscope_window_reject_rate", status.rate, "rejection rate in the window"),
        ("oodscope_expected_reject_rate", status.expected_rate, "calibrated rejection rate"),
        ("oodscope_reject_rate_pvalue", status.p_value, "binomial test p-value"),
        ("oodscope_drift_alert", int(status.alert), "1 while the rate is outside its range"),
        ("oodscope_inputs_total", status.total_seen, "inputs scored since start"),
        ("oodscope_rejected_total", status.total_rejected, "inputs rejected since start"),
    ):
        v = "NaN" if isinstance(value, float) and not np.isfinite(value) else value
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {v}"]
    return "\n".join(lines) + "\n"


def read_api_key(path: str | Path) -> str:
    """The API key in ``path`` (first line, stripped); an empty file is an error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--api-key-file {p}: no such file.")
    key = p.read_text(encoding="utf-8").strip().splitlines()
    if not key or not key[0].strip():
        raise ValueError(f"--api-key-file {p} is empty.")
    return key[0].strip()


def serve(guard: Guard | str | Path, host: str = "127.0.0.1", port: int = 8000, *,
          api_key: str | None = None, log_level: str = "info", **app_options: Any) -> None:
    """Run the service in this process until interrupted."""
    _require_fastapi()
    import uvicorn

    if not isinstance(guard, Guard):
        guard = Guard.load(guard)
    app = create_app(guard, api_key=api_key, **app_options)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, access_log=False)
