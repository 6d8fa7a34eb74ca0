"""The HTTP service, through a real uvicorn server on 127.0.0.1 (started and stopped here)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from oodscope import Features
from oodscope.guard import Guard
from oodscope.serve import create_app

KEY = "s3cret-key"


def _subspace(n, dims, seed, d=16):
    rng = np.random.default_rng(seed)
    x = 0.05 * rng.standard_normal((n, d))
    x[:, dims] += rng.standard_normal((n, len(dims)))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def guard():
    return Guard("knn", detector_params={"k": 5}, n_boot=100).fit(
        Features(features=_subspace(800, range(8), 0)), val=Features(features=_subspace(400, range(8), 1)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a background thread, bound to loopback."""

    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                   log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def request(self, method, path, body=None, ctype="application/json", key=KEY, headers=None):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", ctype)
        if key is not None:
            req.add_header("X-API-Key", key)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if r.headers.get_content_type() == "application/json"
                                  else raw.decode())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(guard):
    with Server(create_app(guard, api_key=KEY, max_rows=500, max_body_bytes=2_000_000,
                           monitor_window=200)) as s:
        yield s


def test_score_json_rows(server, guard):
    x = np.concatenate([_subspace(20, range(8), 2), _subspace(20, range(8, 16), 3)])
    code, out = server.request("POST", "/score", {"features": x.tolist()})
    assert code == 200 and out["n"] == 40
    expected = guard.decide(Features(features=x))
    np.testing.assert_allclose(out["scores"], expected["scores"], rtol=1e-6)
    assert out["accept"] == expected["accept"].tolist()
    np.testing.assert_allclose(out["p_values"], expected["p_values"])
    assert out["threshold"] == guard.threshold_
    assert np.mean(out["accept"][:20]) >= 0.8 and not any(out["accept"][20:])
    # a bare list of rows, and a single row without the batch axis
    assert server.request("POST", "/score", x[:3].tolist())[1]["n"] == 3
    assert server.request("POST", "/score", {"features": x[0].tolist()})[1]["n"] == 1


def test_score_npy_body(server, guard):
    x = _subspace(30, range(8), 4)
    buf = io.BytesIO()
    np.save(buf, x)
    code, out = server.request("POST", "/score?field=features", buf.getvalue(), "application/x-npy")
    assert code == 200
    np.testing.assert_allclose(out["scores"], guard.score(Features(features=x)), rtol=1e-6)
    code, _ = server.request("POST", "/score", buf.getvalue(), "application/octet-stream")
    assert code == 200


@pytest.mark.parametrize("body, ctype, status, message", [
    ({"features": [[1.0] * 15]}, "application/json", 422, "width 15"),
    ({"features": [[float("nan")] * 16]}, "application/json", 422, None),
    ({"logits": [[1.0] * 16]}, "application/json", 422, "unknown field"),
    ({}, "application/json", 422, "missing field 'features'"),
    ({"features": [[1.0] * 16, [1.0] * 3]}, "application/json", 422, "ragged"),
    ({"features": [["a"] * 16]}, "application/json", 422, "numbers"),
    ({"features": []}, "application/json", 422, None),
    ({"features": [[[1.0] * 16]]}, "application/json", 422, "2-D"),
    ("not json at all", "application/json", 400, "not valid JSON"),
    ("x", "text/plain", 415, "unsupported content type"),
    ("not npy", "application/x-npy", 400, ".npy"),
    ({"features": [[0.0] * 16] * 501}, "application/json", 413, "501 rows exceed"),
])
def test_bad_input_gets_a_4xx_with_a_reason(server, body, ctype, status, message):
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()  # nan -> NaN
    code, out = server.request("POST", "/score", raw, ctype)
    assert code == status, out
    assert isinstance(out["detail"], str) and out["detail"]
    if message:
        assert message in out["detail"]


def test_nan_json_literal_is_rejected(server):
    code, out = server.request("POST", "/score", b'{"features": [[' + b",".join([b"NaN"] * 16) + b"]]}")
    assert code == 422 and "NaN" in out["detail"]


def test_body_size_limit(server):
    code, out = server.request("POST", "/score", b"[" + b" " * 2_100_000 + b"]")
    assert code == 413 and "limit" in out["detail"]


def test_api_key_is_enforced(server):
    for key in (None, "wrong", KEY + "x", ""):
        code, out = server.request("GET", "/info", key=key)
        assert code == 401 and "API key" in out["detail"]
        assert server.request("POST", "/score", {"features": [[0.0] * 16]}, key=key)[0] == 401
    assert server.request("GET", "/info", key=None, headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    assert server.request("GET", "/health", key=None) == (200, {"status": "ok"})


def test_info_and_metrics(server, guard):
    code, info = server.request("GET", "/info")
    assert code == 200 and info["detector"] == "knn" and info["fields"] == ["features"]
    assert info["widths"] == {"features": 16} and info["threshold"] == guard.threshold_
    for _ in range(3):
        server.request("POST", "/score", {"features": _subspace(60, range(8, 16), 9).tolist()})
    code, m = server.request("GET", "/metrics")
    assert code == 200 and m["n"] == 200  # the window is full
    assert m["alert"] and m["direction"] == "too many rejections"
    code, text = server.request("GET", "/metrics?format=prometheus")
    assert code == 200 and "oodscope_drift_alert 1" in text
    assert server.request("GET", "/metrics?format=xml")[0] == 422
    assert server.request("GET", "/nope")[0] == 404


def test_detector_with_two_fields_needs_json(tmp_path):
    rng = np.random.default_rng(0)
    f = Features(features=rng.standard_normal((300, 8)).astype(np.float32),
                 logits=rng.standard_normal((300, 3)).astype(np.float32))
    g = Guard("nnguide", detector_params={"k": 3}, n_boot=0).fit(f[:200], val=f[200:])
    with Server(create_app(g)) as s:
        code, out = s.request("POST", "/score", {"features": f.features[:2].tolist(),
                                                 "logits": f.logits[:2].tolist()}, key=None)
        assert code == 200 and out["n"] == 2
        code, out = s.request("POST", "/score", {"features": f.features[:2].tolist(),
                                                 "logits": f.logits[:3].tolist()}, key=None)
        assert code == 422 and "row counts" in out["detail"]
        assert s.request("POST", "/score", f.features[:2].tolist(), key=None)[0] == 422


def test_oodscope_serve_command(guard, tmp_path):
    guard.save(tmp_path / "g")
    (tmp_path / "key").write_text(KEY + "\n")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "oodscope.cli", "serve", str(tmp_path / "g"),
                             "--port", str(port), "--api-key-file", str(tmp_path / "key")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(proc.stdout.read().decode()) from None
                time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/info", timeout=5)
        assert err.value.code == 401
        req = urllib.request.Request(url + "/score", data=json.dumps([[0.1] * 16]).encode(),
                                     headers={"Content-Type": "application/json", "X-API-Key": KEY})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.loads(r.read())["n"] == 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_binds_loopback_by_default():
    import inspect

    from oodscope import serve

    assert inspect.signature(serve.serve).parameters["host"].default == "127.0.0.1"
    from oodscope.cli import build_parser

    args = build_parser().parse_args(["serve", "g"])
    assert args.host == "127.0.0.1"
