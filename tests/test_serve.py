"""`secureinfer serve` as a real uvicorn process on 127.0.0.1, reached over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import secureinfer
from secureinfer import codec
from secureinfer.codec import Kind
from secureinfer.testing import NETWORKS, inputs

httpx = pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")

from secureinfer import remote  # noqa: E402

TOKEN = "test-token-4f2a"
SCHEMES = {"clear": "mlp_square", "ckks": "mlp_square", "bfv": "mlp_square",
           "fe-ip": "mlp_square", "fe-quad": "mlp_poly"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One `secureinfer serve` subprocess."""

    def __init__(self, artifact: Path, keys: Path, token: str | None = TOKEN,
                 max_mb: float = 256.0) -> None:
        self.artifact, self.keys, self.token, self.max_mb = artifact, keys, token, max_mb
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Service":
        env = dict(os.environ, SECUREINFER_TOKEN=self.token or "")
        cmd = [sys.executable, "-m", "secureinfer", "serve", str(self.artifact),
               "--port", str(self.port), "--keys-dir", str(self.keys),
               "--max-request-mb", str(self.max_mb)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("serve did not come up in 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _compile(config: str, net: str, directory: Path):
    reason = secureinfer.resolve(config).availability()
    if reason:
        pytest.skip(f"{config}: {reason}")
    layers = NETWORKS[net](np.random.default_rng(11))
    x = inputs(layers, 48, seed=12)
    sm = secureinfer.compile_layers(layers, config, calibration=x, deploy=True)
    sm.save(directory)
    return sm, x


@pytest.fixture(scope="module", params=sorted(SCHEMES))
def deployed(request, tmp_path_factory):
    config = request.param
    root = tmp_path_factory.mktemp(config.replace("-", "_"))
    sm, x = _compile(config, SCHEMES[config], root / "artifact")
    service = Service(root / "artifact", root / "keys").start()
    yield sm, x, service
    service.stop()


def test_every_scheme_end_to_end(deployed):
    sm, x, service = deployed
    with remote.connect(service.url, token=TOKEN) as session:
        assert session.model.digest == sm.digest
        got = session.infer(x[:2])
        got_one = session.infer(x[2])
    caps = sm.scheme.capabilities
    atol = 0.0 if caps.exact else caps.tolerance
    np.testing.assert_allclose(got, sm.reference(x[:2]), rtol=0, atol=atol)
    np.testing.assert_allclose(got_one, sm.reference(x[2:3]), rtol=0, atol=atol)
    assert session.bytes_sent["keys"] > 0 and session.bytes_received["output"] > 0
    assert len(session.round_trips) == 2


# ----- one service for concurrency, restart and bad input -----------------------------------


@pytest.fixture(scope="module")
def bfv_service(tmp_path_factory):
    root = tmp_path_factory.mktemp("bfv_service")
    sm, x = _compile("bfv", "mlp_square", root / "artifact")
    service = Service(root / "artifact", root / "keys").start()
    yield sm, x, service, root
    service.stop()


def test_two_key_owners_at_the_same_time(bfv_service):
    sm, x, service, _ = bfv_service
    sessions = [remote.connect(service.url, token=TOKEN) for _ in range(2)]
    assert sessions[0].key_id != sessions[1].key_id
    results: dict[int, list[np.ndarray]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for k in range(3):
                results[i].append(sessions[i].infer(x[2 * k + i: 2 * k + i + 1]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for i in range(2):
        want = np.concatenate([sm.reference(x[2 * k + i: 2 * k + i + 1]) for k in range(3)])
        np.testing.assert_array_equal(np.concatenate(results[i]), want)
    # owner 1's ciphertext evaluated under owner 0's keys does not decrypt for owner 1
    ct = sessions[1].client.encrypt(x[:1])
    out = httpx.post(service.url + "/v1/infer", content=ct,
                     headers={"X-Key-Id": sessions[0].key_id,
                              "Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert out.status_code in (200, 400, 500)
    if out.status_code == 200:
        try:
            got = sessions[1].client.decrypt(out.content)
        except secureinfer.SecureInferError:
            pass  # the noise budget or bound check caught it
        else:
            assert not np.array_equal(got, sm.reference(x[:1]))
    for s in sessions:
        s.close()


def test_restart_keeps_keys(bfv_service):
    sm, x, service, root = bfv_service
    session = remote.connect(service.url, token=TOKEN)
    key_id, uploaded = session.key_id, session.bytes_sent["keys"]
    assert (root / "keys" / f"{key_id}.keys").exists()
    service.stop()
    service.start()
    health = httpx.get(service.url + "/healthz").json()
    assert health["keys_stored"] >= 1 and health["keys_cached"] == 0
    session.url = service.url
    got = session.infer(x[:1])  # the same key id, no new upload
    np.testing.assert_array_equal(got, sm.reference(x[:1]))
    assert session.bytes_sent["keys"] == uploaded
    session.close()


def _post(service: Service, path: str, body: bytes, **headers: str) -> httpx.Response:
    headers.setdefault("Authorization", f"Bearer {TOKEN}")
    return httpx.post(service.url + path, content=body, headers=headers, timeout=60)


def _no_traceback(response: httpx.Response) -> dict:
    assert "Traceback" not in response.text and 'File "' not in response.text
    return response.json()


def test_bad_input_answers(bfv_service, tmp_path):
    sm, x, service, _ = bfv_service
    session = remote.connect(service.url, token=TOKEN)
    good = session.client.encrypt(x[:1])

    # malformed envelope and key bytes: 400 with the EnvelopeError message
    r = _post(service, "/v1/infer", b"garbage", **{"X-Key-Id": session.key_id})
    body = _no_traceback(r)
    assert r.status_code == 400 and body["error"] == "EnvelopeError"
    assert "not a secureinfer message" in body["detail"]
    r = _post(service, "/v1/keys", b"\x01\x00\x00\x00junk")
    assert r.status_code == 400 and _no_traceback(r)["error"] == "EnvelopeError"
    bad_keys = remote.bundle_keys(codec.seal(Kind.PUBLIC_KEYS, sm.scheme.name, sm.digest,
                                             b"not keys"), None)
    r = _post(service, "/v1/keys", bad_keys)
    assert r.status_code == 400 and _no_traceback(r)["error"] == "EnvelopeError"

    # unknown key id: 404 naming it
    unknown = "ab" * 32
    r = _post(service, "/v1/infer", good, **{"X-Key-Id": unknown})
    assert r.status_code == 404 and unknown in _no_traceback(r)["detail"]

    # keys (and inputs) of another model: 409
    other, _ = _compile("bfv?bits=6", "mlp_square", tmp_path / "other")
    owner = other.owner()
    r = _post(service, "/v1/keys", remote.bundle_keys(owner.keys.public_keys(), None))
    assert r.status_code == 409 and _no_traceback(r)["error"] == "ForeignKeysError"
    r = _post(service, "/v1/infer", owner.encrypt(x[:1]), **{"X-Key-Id": session.key_id})
    assert r.status_code == 409

    # missing or wrong token: 401
    r = httpx.post(service.url + "/v1/infer", content=good, headers={"X-Key-Id": session.key_id})
    assert r.status_code == 401 and _no_traceback(r)["error"] == "Unauthorized"
    r = _post(service, "/v1/keys", b"", Authorization="Bearer wrong")
    assert r.status_code == 401
    assert httpx.get(service.url + "/v1/model").status_code == 401

    assert service.alive()
    np.testing.assert_array_equal(session.infer(x[:1]), sm.reference(x[:1]))

    metrics = httpx.get(service.url + "/metrics").text
    assert 'secureinfer_errors_total{kind="EnvelopeError"}' in metrics
    assert 'secureinfer_errors_total{kind="UnknownKeyError"}' in metrics
    assert "secureinfer_request_seconds_bucket" in metrics and "secureinfer_keys_cached" in metrics
    session.close()


@pytest.fixture(scope="module")
def clear_service(tmp_path_factory):
    root = tmp_path_factory.mktemp("clear_service")
    sm, x = _compile("clear", "mlp_square", root / "artifact")
    service = Service(root / "artifact", root / "keys", token=None, max_mb=1.0).start()
    yield sm, x, service
    service.stop()


def test_body_above_the_limit_is_refused_before_it_is_read(clear_service):
    _, _, service = clear_service
    key_id = "ab" * 32
    # body above the limit (1 MiB here): 413 before the body is read
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
        s.sendall("POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n"
                  f"X-Key-Id: {key_id}\r\n\r\n"
                  .encode())  # headers only: the server must answer without the body
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413") and "Traceback" not in head
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
        s.sendall("POST /v1/keys HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  f"\r\n".encode())
        chunk = b"x" * (256 << 10)
        try:
            for _ in range(5):  # 1.25 MiB streamed with no length given: refused on the way
                s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except OSError:
            pass  # the server answered and closed before the end of the body
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413")

    assert service.alive()


def test_malformed_inputs_are_400_and_serving_goes_on(clear_service):
    sm, x, service = clear_service
    session = remote.connect(service.url)  # this service has no token
    # inputs of the wrong shape, object ints, a wrong sample count or NaN: refused as
    # malformed (400) before any layer runs (a layer's own failure: test_model.py)
    for x_bad, n, pattern in [(np.zeros((1, 5)), 1, r"shape \(1, 5\)"),
                              (np.full((1, 1, 4, 4), 10**400, dtype=object), 1,
                               "object arrays"),
                              (np.zeros((2, 1, 4, 4)), 1, "holds 1 sample.*holds 2"),
                              (np.full((1, 1, 4, 4), np.nan), 1, "NaN")]:
        msg = codec.seal(Kind.INPUT, sm.scheme.name, sm.digest,
                         codec.pack_fields({"n": n, "ct": codec.pack_fields({"x": x_bad})}))
        r = httpx.post(service.url + "/v1/infer", content=msg,
                       headers={"X-Key-Id": session.key_id})
        body = _no_traceback(r)
        assert r.status_code == 400 and body["error"] == "EnvelopeError", body
        assert re.search(pattern, body["detail"]), body
    assert service.alive()
    np.testing.assert_allclose(session.infer(x[:2]), sm.reference(x[:2]), atol=1e-9)
    r = httpx.get(service.url + "/v1/model")
    manifest = json.loads(r.content)["manifest"]
    assert manifest["role"] == "client" and manifest["layers"] == []
    assert secureinfer.load_client(service.url).digest == sm.digest  # a URL works as a DIR
    session.close()


def _deploy_example() -> tuple[list[str], str]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("<!-- deploy-example -->", 1)[1]
    bash = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    return [line for line in bash.splitlines() if line and not line.startswith("#")], python


def test_readme_deploy_example(tmp_path):
    """The README's Deploy commands, run as written (only the port changed)."""
    reason = secureinfer.resolve("ckks").availability()
    if reason:
        pytest.skip(f"ckks: {reason}")
    (compile_cmd, serve_cmd, run_cmd), python = _deploy_example()
    port = str(_free_port())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("SECUREINFER_TOKEN", None)
    (tmp_path / "token.txt").write_text(TOKEN + "\n")
    subprocess.run(["bash", "-c", compile_cmd], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=300)
    proc = subprocess.Popen(["bash", "-c", "exec " + serve_cmd.replace("8000", port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        run = subprocess.run(["bash", "-c", run_cmd.replace("8000", port)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "accuracy" in run.stdout and "round trip" in run.stdout
        assert "network" in run.stdout and "keys" in run.stdout
        x = np.random.default_rng(0).random((3, 1, 8, 8))
        scope = {"token": TOKEN, "x": x}
        exec(python.replace("8000", port), scope)  # noqa: S102 - the README's own example
        assert scope["logits"].shape == (3, 10)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("deployed", ["fe-ip"], indirect=True)
def test_fe_input_outside_the_planned_range_is_422(deployed):
    sm, _, service = deployed
    from secureinfer.plugins.fe_common.groups import fr, group, pack_elements, random_scalar

    with remote.connect(service.url, token=TOKEN) as session:
        ops = group("G1")
        g, rho = ops.generator(), random_scalar()
        h = session.client.keys.secret.public.h  # a well-formed ciphertext of 10**7 each
        body = [ops.law(hi * fr(rho), ops.pow(g, 10**7)) for hi in h]
        payload = codec.pack_fields({"count": 1,
                                     "ct": pack_elements(ops, [ops.pow(g, rho), *body])})
        msg = codec.seal(Kind.INPUT, sm.scheme.name, sm.digest,
                         codec.pack_fields({"n": 1, "ct": payload}))
        r = _post(service, "/v1/infer", msg, **{"X-Key-Id": session.key_id})
        body = _no_traceback(r)
        assert r.status_code == 422 and "layer fc1" in body["detail"], body
        assert service.alive()


def test_key_store_lru_under_budget_reopens_from_disk(tmp_path):
    from secureinfer.serve.keystore import KeyStore, UnknownKeyError, key_id_of

    layers = NETWORKS["mlp_square"](np.random.default_rng(1))
    x = inputs(layers, 8)
    sm = secureinfer.compile_layers(layers, "clear?bits=8", calibration=x)
    store = KeyStore(sm, tmp_path / "keys", budget_bytes=1)  # room for one opened server
    owners = [sm.owner() for _ in range(3)]
    # clear's public keys are the same empty payload for everyone: a field tells them apart
    bodies = [codec.pack_fields({**codec.unpack_fields(remote.bundle_keys(
        o.keys.public_keys(), None)), "owner": str(i)}) for i, o in enumerate(owners)]
    ids = [store.put(b)[0] for b in bodies]
    assert ids == [key_id_of(b) for b in bodies] and len(set(ids)) == 3
    assert store.cached == 1 and store.stored == 3
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == sorted(f"{i}.keys" for i in ids)
    with store.lock(ids[0]):
        server = store.get(ids[0])  # evicted: opened again from its file
    ct = owners[0].encrypt(x[:1])
    np.testing.assert_array_equal(owners[0].decrypt(server.evaluate(ct)), sm.reference(x[:1]))
    assert store.put(bodies[0]) == (ids[0], False)  # the same bytes: the same id, stored once
    (tmp_path / "keys" / f"{ids[1]}.keys").write_bytes(b"damaged")
    with pytest.raises(UnknownKeyError, match="damaged"):
        store.get(ids[1])


# ----- a hostile server: answers the client must not trust ----------------------------------


@pytest.fixture(scope="module")
def hostile():
    """A real HTTP server on 127.0.0.1 that answers GET /<what>/v1/model with bad bodies."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bodies = {"deep": b"[" * 200000, "huge": b"x" * (1 << 20), "sized": b"x" * (1 << 20)}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # close-delimited: no Content-Length unless sent

        def do_GET(self):  # noqa: N802 - http.server's name
            what = self.path.strip("/").partition("/")[0]
            self.send_response(200)
            if what == "sized":
                self.send_header("Content-Length", str(len(bodies[what])))
            self.end_headers()
            self.wfile.write(bodies.get(what, b"{}"))

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_deeply_nested_bundle_is_an_artifact_error(hostile):
    with pytest.raises(secureinfer.ArtifactError, match=r"not a client artifact bundle "
                                                       r"\(RecursionError"):
        secureinfer.load_client(hostile + "/deep")
    with pytest.raises(secureinfer.ArtifactError, match="nested too deeply"):
        secureinfer.artifact.client_from_bundle(b"[" * 200000, None)


def test_the_client_stops_reading_at_its_limit(hostile, monkeypatch):
    monkeypatch.setattr(secureinfer.artifact, "MAX_BUNDLE_BYTES", 64 << 10)
    with pytest.raises(remote.RemoteError, match=r"at least \d+ bytes, more than the 65536"):
        secureinfer.load_client(hostile + "/huge")  # streamed: no Content-Length
    with pytest.raises(remote.RemoteError, match=r"at least 1048576 bytes, more than the 65536"):
        remote.fetch_client_bundle(hostile + "/sized")  # refused on its Content-Length


def test_bogus_key_ids_leave_the_lock_table_bounded(tmp_path):
    from secureinfer.serve.keystore import KeyStore, UnknownKeyError

    layers = NETWORKS["mlp_square"](np.random.default_rng(1))
    sm = secureinfer.compile_layers(layers, "clear", calibration=inputs(layers, 8))
    store = KeyStore(sm, tmp_path / "keys", budget_bytes=1 << 20)
    for i in range(2000):
        with pytest.raises(UnknownKeyError, match="not 64 hex digits"):
            store.lock(f"bogus-{i}")  # refused before any lock is made
        with pytest.raises(UnknownKeyError, match="unknown key id"):
            with store.lock(f"{i:064x}"):  # well formed, never uploaded
                store.get(f"{i:064x}")
    assert len(store._locks) == 0
    owner = sm.owner()
    key_id, _ = store.put(remote.bundle_keys(owner.keys.public_keys(), None))
    held = store.lock(key_id)
    assert store.lock(key_id) is held  # one lock per key owner while in use


@pytest.mark.parametrize("deployed", ["fe-ip"], indirect=True)
def test_fe_keys_without_functional_keys_are_a_400(deployed):
    sm, _, service = deployed
    owner = sm.owner()
    r = _post(service, "/v1/keys", remote.bundle_keys(owner.keys.public_keys(), None))
    body = _no_traceback(r)
    assert r.status_code == 400 and body["error"] == "RoleError", body
    assert "functional keys" in body["detail"]
    assert service.alive()


def test_key_store_sizes_servers_from_keys_not_from_process_memory(tmp_path):
    from secureinfer.serve.keystore import KEY_MEMORY_FACTOR, KeyStore

    layers = NETWORKS["mlp_square"](np.random.default_rng(1))
    sm = secureinfer.compile_layers(layers, "clear", calibration=inputs(layers, 8))
    bodies = [remote.bundle_keys(codec.seal(Kind.PUBLIC_KEYS, sm.scheme.name, sm.digest,
                                            codec.pack_fields({"owner": str(i)})), None)
              for i in range(3)]
    one = KEY_MEMORY_FACTOR * len(codec.unpack_fields(bodies[0])["public"])
    store = KeyStore(sm, tmp_path / "keys", budget_bytes=int(2.5 * one))
    ballast = []
    for body in bodies:
        ballast.append(np.ones(1 << 22))  # 32 MB allocated meanwhile: not the server's
        store.put(body)
    assert store.cached == 2 and store.cached_bytes == 2 * one
