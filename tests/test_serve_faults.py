"""The service under faults (issue 15, 6): a killed handler, a full disk, a half upload.

Every test runs a real `secureinfer serve` on 127.0.0.1 (``test_serve.Service``). The full
disk is real: a 256 KiB tmpfs mounted for the test (root only; otherwise the test skips
saying so).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")

from secureinfer import remote  # noqa: E402
from test_serve import TOKEN, Service, _compile  # noqa: E402

CONFIG = "fe-ip?dlog_table_bits=12"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    # FE keys are small and fresh at every keygen: two key owners, two key files
    sm, x = _compile(CONFIG, "mlp_square", root / "artifact")
    return sm, x, root / "artifact"


def _bundle(sm) -> tuple[bytes, object]:
    """A new key owner's key bundle (what ``remote.connect`` uploads)."""
    owner = sm.owner()
    return remote.bundle_keys(owner.keys.public_keys(), owner.keys.functional_keys()), owner


def _check(sm, session, x) -> None:
    caps = sm.scheme.capabilities
    np.testing.assert_allclose(session.infer(x[:2]), sm.reference(x[:2]), rtol=0,
                               atol=0.0 if caps.exact else caps.tolerance)


def _half_upload(service: Service, body: bytes) -> socket.socket:
    """Send the headers and half of ``body`` to POST /v1/keys; the open socket."""
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
    head = (f"POST /v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _health(service: Service) -> dict:
    response = httpx.get(service.url + "/healthz", timeout=5)
    assert response.status_code == 200
    return response.json()


def test_client_disconnecting_mid_upload_leaves_nothing(artifact, tmp_path):
    sm, x, path = artifact
    keys_dir = tmp_path / "keys"
    service = Service(path, keys_dir).start()
    try:
        body, _ = _bundle(sm)
        for _ in range(3):
            sock = _half_upload(service, body)
            time.sleep(0.2)
            sock.close()  # the client goes away in the middle of the body
        time.sleep(0.5)
        assert _files(keys_dir) == []
        assert service.alive() and _health(service)["keys_stored"] == 0
        with remote.connect(service.url, token=TOKEN) as session:  # still serving
            _check(sm, session, x)
        assert len([f for f in _files(keys_dir) if f.endswith(".keys")]) == 1
        assert not [f for f in _files(keys_dir) if f.endswith(".tmp")]
    finally:
        service.stop()


def test_killed_server_leaves_no_trace_and_restarts_clean(artifact, tmp_path):
    sm, x, path = artifact
    keys_dir = tmp_path / "keys"
    service = Service(path, keys_dir).start()
    body, client = _bundle(sm)
    with httpx.Client(timeout=10) as http:
        stored = http.post(service.url + "/v1/keys", content=body,
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert stored.status_code == 200
    key_file = keys_dir / f"{stored.json()['key_id']}.keys"
    before = key_file.read_bytes()
    other, _ = _bundle(sm)
    sock = _half_upload(service, other)  # a handler waiting for the rest of a body
    time.sleep(0.2)
    # what a writer killed between its temporary file and the rename leaves behind
    (keys_dir / f".{'0' * 64}.keys.4242.1.tmp").write_bytes(other[:100])
    service.proc.send_signal(signal.SIGKILL)
    service.proc.wait(10)
    sock.close()
    assert _files(keys_dir) == sorted([key_file.name, f".{'0' * 64}.keys.4242.1.tmp"])
    service.start()  # the same keys dir
    try:
        assert _files(keys_dir) == [key_file.name]  # the stale temporary file is gone
        assert key_file.read_bytes() == before
        assert _health(service)["keys_stored"] == 1
        with remote.connect(service.url, token=TOKEN) as session:
            _check(sm, session, x)
    finally:
        service.stop()


@pytest.fixture
def tiny_disk(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs for the full-disk test needs root and mount(8)")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_a_clear_error_and_the_store_stays_whole(artifact, tmp_path, tiny_disk):
    sm, x, path = artifact
    keys_dir = tiny_disk / "keys"
    service = Service(path, keys_dir).start()
    try:
        body, _ = _bundle(sm)
        with httpx.Client(timeout=10) as http:
            first = http.post(service.url + "/v1/keys", content=body,
                              headers={"Authorization": f"Bearer {TOKEN}"})
            assert first.status_code == 200
            good = {p.name: p.read_bytes() for p in keys_dir.iterdir()}
            filler = tiny_disk / "filler"
            with open(filler, "wb", buffering=0) as fh:  # fill it to the last block
                try:
                    while True:
                        fh.write(b"\0" * 4096)
                except OSError:
                    pass
            body2, _ = _bundle(sm)
            full = http.post(service.url + "/v1/keys", content=body2,
                             headers={"Authorization": f"Bearer {TOKEN}"})
            assert full.status_code == 507, full.text
            error = full.json()
            assert error["error"] == "KeyStoreError"
            assert "No space left on device" in error["detail"]
            assert str(keys_dir) in error["detail"] and "--keys-dir" in error["detail"]
            assert "Traceback" not in full.text
            # nothing half-written, the stored keys intact, the service serving
            assert {p.name: p.read_bytes() for p in keys_dir.iterdir()} == good
            assert _health(service)["keys_stored"] == 1
            filler.unlink()
            again = http.post(service.url + "/v1/keys", content=body2,
                              headers={"Authorization": f"Bearer {TOKEN}"})
            assert again.status_code == 200 and again.json()["stored"] is True
    finally:
        service.stop()
