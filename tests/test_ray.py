"""Scale-out on a real local Ray cluster (127.0.0.1, 2 CPUs, one per module):
``secureinfer serve --ray`` replicas sharing keys, key uploads streamed into the key store
(too big, garbage, cut off: JSON errors, the service serving on), a killed replica, bfv
workers as Ray actors, and ``--ray`` without the extra."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import secureinfer
from secureinfer.testing.networks import NETWORKS, inputs

ray = pytest.importorskip("ray", reason="the ray extra is not installed: "
                                         "pip install 'secureinfer[ray]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")

from ray import serve  # noqa: E402

from secureinfer import remote  # noqa: E402
from secureinfer.serve import Settings  # noqa: E402
from secureinfer.serve.cluster import deploy  # noqa: E402

PORT = 18731
TOKEN = "ray-s3cret"
#: The service's body limit in these tests: above the deployed (noise-flooded) bfv keys of
#: mlp_square (about 62 MiB), small enough to send a body past it quickly.
LIMIT = 96 << 20


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield
    serve.shutdown()
    ray.shutdown()


# Ray tasks and actors first: the service's two replicas then hold both CPUs.


def test_bfv_workers_are_ray_actors_under_ray(cluster):
    if secureinfer.resolve("bfv").availability():
        pytest.skip(f"bfv: {secureinfer.resolve('bfv').availability()}")
    layers = NETWORKS["mlp_poly"](np.random.default_rng(0))
    calib = inputs(layers, 64, seed=2)
    sm = secureinfer.compile_layers(layers, "bfv?workers=2", calibration=calib)
    client, server, _ = sm.setup()
    pool = server.ctx.pool
    assert pool.engine == "ray" and pool.size == 2
    x = calib[:3]
    np.testing.assert_array_equal(client.decrypt(server.evaluate(client.encrypt(x))),
                                  sm.reference(x))
    ray.kill(pool._engine.actors[1], no_restart=True)
    with pytest.raises(secureinfer.EvaluationError, match=r"worker for primes \[1\] died"):
        server.evaluate(client.encrypt(x))
    pool.close()


def test_bench_on_ray_equals_the_local_run(cluster):
    from secureinfer.raybench import bench_on_ray
    from secureinfer.runner import run

    configs = [c for c in ("clear", "bfv") if not secureinfer.resolve(c).availability()]
    got = bench_on_ray(configs, model=None, dataset="digits", arch="mlp", limit=24,
                       allow_insecure=False, shards=3)
    assert [r["config"] for r in got] == configs
    for config, r in zip(configs, got):
        local = run(config, dataset="digits", limit=24, progress=False)
        assert r["engine"] == "ray" and r["workers"] == 2 and r["shards"] == 3
        assert r["samples"] == local["samples"] == 24
        assert r["accuracy"] == local["accuracy"]
        assert r["agreement"] == local["agreement"]
        assert r["max_abs_error"] == pytest.approx(local["max_abs_error"], abs=1e-9)
        assert r["latency_s"]["evaluate"] > 0


@pytest.fixture(scope="module")
def service(cluster, tmp_path_factory):
    if secureinfer.resolve("bfv").availability():
        pytest.skip(f"bfv: {secureinfer.resolve('bfv').availability()}")
    root = tmp_path_factory.mktemp("ray_service")
    layers = NETWORKS["mlp_square"](np.random.default_rng(11))
    x = inputs(layers, 48, seed=12)
    sm = secureinfer.compile_layers(layers, "bfv", calibration=x, deploy=True)
    sm.save(root / "artifact")
    url = deploy(Settings(artifact=root / "artifact", keys_dir=root / "keys", token=TOKEN,
                          max_request_bytes=LIMIT), port=PORT, replicas=2)
    yield sm, x, url, root / "keys"


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _infer(url: str, session: remote.Session, x: np.ndarray) -> httpx.Response:
    return httpx.post(url + "/v1/infer", content=session.client.encrypt(x),
                      headers={"X-Key-Id": session.key_id, **AUTH}, timeout=60)


def _staged(keys_dir: Path) -> list[Path]:
    return sorted(keys_dir.glob(".upload.*.part"))


def _bundle(sm) -> bytes:
    owner = sm.owner()
    return remote.bundle_keys(owner.keys.public_keys(), None)


def test_keys_registered_on_one_replica_serve_on_the_other(service):
    sm, x, url, keys_dir = service
    with httpx.Client(timeout=60) as http:
        ids = {http.get(url + "/healthz").headers["x-replica-id"] for _ in range(30)}
    assert len(ids) == 2  # both replicas answer
    session = remote.connect(url, token=TOKEN)
    assert (keys_dir / f"{session.key_id}.keys").is_file()  # the shared store has them
    answered: dict[str, np.ndarray] = {}
    for k in range(30):
        r = _infer(url, session, x[k % 8:k % 8 + 1])
        assert r.status_code == 200, r.text
        answered.setdefault(r.headers["x-replica-id"],
                            session.client.decrypt(r.content) - sm.reference(x[k % 8:k % 8 + 1]))
        if len(answered) == 2:
            break
    # Each replica computed a correct result with keys uploaded once, through one of them.
    assert set(answered) == ids
    for diff in answered.values():
        np.testing.assert_array_equal(diff, 0)


def test_key_upload_streams_into_the_key_store_not_through_ray(service):
    # The front writes the body to the shared keys dir as it arrives, and the replica gets
    # only the file's name: half-way through the upload the staging file already holds
    # the first half (through Ray's calls the bytes would only land once all were read).
    sm, x, url, keys_dir = service
    body = _bundle(sm)
    half, seen, sent = len(body) // 2, threading.Event(), threading.Event()
    grown: list[int] = []

    def chunks():
        for i in range(0, half, 1 << 20):
            yield body[i:min(i + (1 << 20), half)]
        sent.set()
        seen.wait(60)
        for i in range(half, len(body), 1 << 20):
            yield body[i:i + (1 << 20)]

    def watch() -> None:
        sent.wait(60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not grown:
            sizes = [p.stat().st_size for p in _staged(keys_dir) if p.exists()]
            if sizes and max(sizes) >= half:
                grown.append(max(sizes))
            time.sleep(0.05)
        seen.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    r = httpx.post(url + "/v1/keys", content=chunks(), headers=AUTH, timeout=120)
    watcher.join()
    assert r.status_code == 200, r.text
    assert grown, "no staging file in the keys dir held half the body mid-upload"
    key_id = r.json()["key_id"]
    assert key_id == hashlib.sha256(body).hexdigest()
    assert (keys_dir / f"{key_id}.keys").read_bytes() == body
    assert _staged(keys_dir) == []
    # and the staged keys serve on both replicas like any others
    session = remote.connect(url, token=TOKEN)
    r = _infer(url, session, x[:1])
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(session.client.decrypt(r.content), sm.reference(x[:1]))


def _raw_upload(url: str, declared: int, body: bytes) -> bytes:
    """POST /v1/keys declaring ``declared`` bytes and sending ``body``; what the service
    answered before the socket was closed (``b""`` when nothing came in 2 s)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        head = (f"POST /v1/keys HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}"
                f"\r\nContent-Length: {declared}\r\n\r\n")
        sock.sendall(head.encode() + body)
        answer = b""
        try:
            while chunk := sock.recv(1 << 16):
                answer += chunk
                head, _, rest = answer.partition(b"\r\n\r\n")
                length = [int(v) for k, _, v in (line.partition(b":") for line in
                                                 head.split(b"\r\n"))
                          if k.strip().lower() == b"content-length"]
                if length and len(rest) >= length[0]:
                    break
        except TimeoutError:
            pass
        return answer


def test_too_big_or_failed_uploads_are_json_errors_and_the_service_keeps_serving(service):
    sm, x, url, keys_dir = service
    stored = sorted(keys_dir.glob("*.keys"))

    def over_the_limit():  # streamed (chunked): no Content-Length to refuse up front
        for _ in range(LIMIT // (1 << 20) + 2):
            yield b"\0" * (1 << 20)

    with httpx.Client(timeout=120) as http:
        big = http.post(url + "/v1/keys", content=over_the_limit(), headers=AUTH)
        assert big.status_code == 413, big.text
        assert big.json()["error"] == "RequestTooLarge"
        assert str(LIMIT) in big.json()["detail"] and "--max-request-mb" in big.json()["detail"]
        declared = _raw_upload(url, LIMIT + 1, b"")  # refused before any byte is read
        assert declared.startswith(b"HTTP/1.1 413") and str(LIMIT).encode() in declared
        garbage = http.post(url + "/v1/keys", content=b"not a key bundle" * 4096, headers=AUTH)
        assert garbage.status_code == 400 and garbage.json()["error"] == "EnvelopeError"
        anonymous = http.post(url + "/v1/keys", content=_bundle(sm))
        assert anonymous.status_code == 401 and anonymous.json()["error"] == "Unauthorized"
        planted = keys_dir / f".upload.{'0' * 32}.part"  # valid keys a client names
        planted.write_bytes(_bundle(sm))
        forged = http.post(url + "/v1/keys", content=b"x",
                           headers={**AUTH, "X-Secureinfer-Staged": planted.name})
        assert forged.status_code == 400  # the front drops the header: b"x" is the body
        assert planted.exists()
        planted.unlink()
        cut = _bundle(sm)
        assert _raw_upload(url, len(cut), cut[: len(cut) // 2]) == b""  # then goes away
        deadline = time.monotonic() + 30
        while _staged(keys_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
    # nothing half-written or stored by any of them, and the service still serves
    assert _staged(keys_dir) == [] and sorted(keys_dir.glob("*.keys")) == stored
    session = remote.connect(url, token=TOKEN)
    r = _infer(url, session, x[:1])
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(session.client.decrypt(r.content), sm.reference(x[:1]))


def test_a_service_clients_reach_ignores_the_staging_header(tmp_path):
    # Only replicas behind the front honour X-Secureinfer-Staged; plain `secureinfer serve`
    # parses the body, so a client cannot make it adopt a file of the keys dir.
    from test_serve import TOKEN as SERVE_TOKEN, Service, _compile

    sm, _ = _compile("bfv", "mlp_square", tmp_path / "artifact")
    keys_dir = tmp_path / "keys"
    service = Service(tmp_path / "artifact", keys_dir).start()
    try:
        planted = keys_dir / f".upload.{'1' * 32}.part"
        planted.write_bytes(_bundle(sm))
        r = httpx.post(service.url + "/v1/keys", content=b"x", timeout=60, headers={
            "Authorization": f"Bearer {SERVE_TOKEN}", "X-Secureinfer-Staged": planted.name})
        assert r.status_code == 400 and r.json()["error"] == "EnvelopeError"
        assert planted.exists() and not list(keys_dir.glob("*.keys"))
    finally:
        service.stop()

def test_a_ray_failure_is_a_json_answer_never_a_bare_500():
    from ray.exceptions import ActorDiedError, ObjectStoreFullError

    from secureinfer.serve.cluster import _failure

    died = _failure(ActorDiedError())
    assert died.status_code == 503 and died.headers["retry-after"] == "1"
    full = _failure(ObjectStoreFullError("object store full: 4 GiB"))
    assert full.status_code == 503
    other = _failure(RuntimeError("serialization failed"))
    assert other.status_code == 500
    assert b'"ReplicaFailed"' in other.body and b"serialization failed" in other.body


def _replica_actors() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::secureinfer#SecureInfer#")]


def test_a_killed_replica_is_replaced_and_no_key_is_lost(service):
    sm, x, url, _ = service
    session = remote.connect(url, token=TOKEN)
    statuses: list[httpx.Response] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                statuses.append(http.post(url + "/v1/infer",
                                          content=session.client.encrypt(x[:1]),
                                          headers={"X-Key-Id": session.key_id, **AUTH}))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = _replica_actors()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads)  # no request hung
    codes = {r.status_code for r in statuses}
    assert codes <= {200, 503}, [(r.status_code, r.text[:200]) for r in statuses
                                 if r.status_code not in (200, 503)]
    for r in statuses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
    # Replaced: two replicas again, the dead one not among them.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        names = _replica_actors()
        if len(names) == 2 and victim not in names:
            break
        time.sleep(1)
    assert len(_replica_actors()) == 2 and victim not in _replica_actors()
    # The same key id still works on every replica (the keys are on disk, not in one).
    seen = set()
    for k in range(20):
        r = _infer(url, session, x[:1])
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(session.client.decrypt(r.content), sm.reference(x[:1]))
        seen.add(r.headers["x-replica-id"])
        if len(seen) == 2:
            break
    assert victim.rsplit("#", 1)[1] not in seen


def test_ray_flag_without_the_extra_names_it(tmp_path: Path):
    code = ("import sys; sys.modules['ray'] = None; from secureinfer.cli import main; "
            f"sys.exit(main(['serve', {str(tmp_path)!r}, '--ray']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "pip install 'secureinfer[ray]'" in proc.stderr
    code = code.replace("['serve', ", "['bench', '--schemes', 'clear', '--model', ").replace(
        ", '--ray']", ", '--ray']")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'secureinfer[ray]'" in proc.stderr
