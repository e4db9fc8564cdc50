"""A data owner talking to ``secureinfer serve`` over HTTP (httpx).

    >>> import secureinfer.remote
    >>> with secureinfer.remote.connect("http://127.0.0.1:8000", token="s3cret") as session:
    ...     logits = session.infer(x)

``connect`` fetches the client artifact (``GET /v1/model``), generates keys (the data
owner is its own key owner; under FE, its own authority), uploads the public, evaluation
or functional keys once (``POST /v1/keys``), and ``infer`` runs encrypt -> ``POST
/v1/infer`` -> decrypt. The session counts the bytes it sends and receives and times
every round trip. A 4xx or 5xx answer raises the ``RemoteError`` the server described.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import time
from typing import Any

import numpy as np

from . import codec
from .errors import ArtifactError, SecureInferError
from .model import Client, ClientModel

__all__ = ["RemoteError", "Session", "bundle_keys", "connect", "fetch_client_bundle",
           "run_remote"]

_TIMEOUT = 600.0
_MAX_RESPONSE = 1 << 30


class RemoteError(SecureInferError):
    """The service refused a request; ``status`` and ``kind`` are the server's."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        self.status, self.kind, self.detail = status, kind, detail
        super().__init__(f"HTTP {status} {kind}: {detail}")


def bundle_keys(public: bytes, functional: bytes | None) -> bytes:
    """The ``POST /v1/keys`` body: a key owner's public and (FE) functional key envelopes."""
    return codec.pack_fields({"public": public, "functional": functional or b""})


def _httpx() -> Any:
    try:
        import httpx
    except ImportError as exc:
        from .errors import BackendNotInstalledError

        raise BackendNotInstalledError(f"secureinfer.remote needs httpx ({exc}): pip install "
                                       "'secureinfer[serve]'") from None
    return httpx


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _raise_for(response: Any) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        kind, detail = str(body.get("error")), str(body.get("detail"))
    except (ValueError, AttributeError):
        kind, detail = "HTTPError", response.text[:500]
    raise RemoteError(response.status_code, kind, detail)


def _split_bundle(data: bytes, where: str) -> tuple[bytes, bytes | None]:
    try:
        doc = json.loads(data)
        manifest = json.dumps(doc["manifest"]).encode()
        arrays = doc.get("arrays")
        return manifest, base64.b64decode(arrays, validate=True) if arrays else None
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
        raise ArtifactError(f"{where}: not a client artifact bundle "
                            f"({str(exc)[:200]})") from None


def fetch_client_bundle(url: str, *, token: str | None = None,
                        client: Any = None) -> tuple[bytes, bytes | None]:
    """``GET url/v1/model``: the client manifest and arrays (``load_client`` parses them)."""
    httpx = _httpx()
    own = client is None
    client = client or httpx.Client(timeout=_TIMEOUT)
    try:
        response = client.get(url.rstrip("/") + "/v1/model", headers=_headers(token))
        _raise_for(response)
        return _split_bundle(response.content, f"{url}/v1/model")
    finally:
        if own:
            client.close()


class Session:
    """One key owner's connection: its client model, its keys (uploaded once), its counts.

    Attributes:
        model: the ``ClientModel`` from the server's client artifact.
        client: the data owner (holds the secret or master secret key).
        key_id: what the server stores the keys under.
        bytes_sent, bytes_received: network payload totals, by what was sent.
        round_trips: seconds of every ``/v1/infer`` request.
        server_seconds: the server's own time for each (its ``X-Evaluate-Seconds``).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = _TIMEOUT) -> None:
        from .artifact import client_from_bundle

        httpx = _httpx()
        self.url = url.rstrip("/")
        self._http = httpx.Client(timeout=timeout, headers=_headers(token))
        self.bytes_sent: dict[str, int] = {"keys": 0, "input": 0}
        self.bytes_received: dict[str, int] = {"model": 0, "output": 0}
        self.round_trips: list[float] = []
        self.server_seconds: list[float] = []
        try:
            response = self._http.get(self.url + "/v1/model")
            _raise_for(response)
            self.bytes_received["model"] += len(response.content)
            manifest, arrays = _split_bundle(response.content, f"{self.url}/v1/model")
            self.model: ClientModel = client_from_bundle(manifest, arrays,
                                                         f"{self.url}/v1/model")
            self.client: Client = self.model.owner()
            keys = self.client.keys
            body = bundle_keys(keys.public_keys(), keys.functional_keys()
                               if self.model.output == "plaintext" else None)
            response = self._post("/v1/keys", body, "keys")
            self.key_id: str = response.json()["key_id"]
        except BaseException:
            self._http.close()
            raise

    def _post(self, path: str, body: bytes, what: str,
              headers: dict[str, str] | None = None) -> Any:
        self.bytes_sent[what] += len(body)
        response = self._http.post(self.url + path, content=body,
                                   headers={"Content-Type": "application/octet-stream",
                                            **(headers or {})})
        _raise_for(response)
        return response

    def evaluate(self, message: bytes) -> bytes:
        """``POST /v1/infer`` one input envelope; the output envelope (timed)."""
        start = time.perf_counter()
        response = self._post("/v1/infer", message, "input", {"X-Key-Id": self.key_id})
        self.round_trips.append(time.perf_counter() - start)
        try:
            self.server_seconds.append(float(response.headers.get("x-evaluate-seconds", "nan")))
        except ValueError:
            self.server_seconds.append(float("nan"))
        self.bytes_received["output"] += len(response.content)
        return response.content

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Encrypt ``x`` (one input or a batch), evaluate remotely, decrypt: ``(n, ...)``."""
        return self.client.decrypt(self.evaluate(self.client.encrypt(x)))

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(url: str, *, token: str | None = None, timeout: float = _TIMEOUT) -> Session:
    """Fetch the client artifact of the service at ``url``, make and upload keys once.

    Args:
        url: ``http://host:port`` of ``secureinfer serve``.
        token: the service's bearer token, if it has one.
        timeout: seconds per HTTP request.

    Raises:
        RemoteError: the service refused (401 token, 409 another model, ...).
        ArtifactError: the client artifact is corrupt or of another version.
    """
    return Session(url, token, timeout)


def run_remote(url: str, *, token: str | None = None, dataset: str = "digits",
               limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """``secureinfer run --server URL``: the dataset's test samples through the service.

    The report has accuracy (against the labels: the client holds no model to compare
    with), the client's phases (keygen, encrypt, decrypt per sample), the round trip per
    request (which includes the server's evaluate) and the network bytes.
    """
    from tqdm.auto import tqdm

    from .data import load

    ds = load(dataset)
    x = np.asarray(ds.x_test[:limit] if limit else ds.x_test, dtype=np.float64)
    y = ds.y_test[: len(x)]
    with connect(url, token=token) as session:
        model = session.model
        if tuple(ds.input_shape) != model.input_shape:
            raise ValueError(f"dataset {ds.name} has inputs {ds.input_shape}; the server's "
                             f"model takes {model.input_shape}")
        batch = max(1, int(model.scheme.batch_size()))
        outs = []
        with tqdm(total=len(x), desc=f"{model.scheme.name} @ {url}", unit="img",
                  disable=not progress, file=sys.stderr, leave=False) as bar:
            for start in range(0, len(x), batch):
                outs.append(session.infer(x[start:start + batch]))
                bar.update(min(batch, len(x) - start))
        logits = np.concatenate(outs)
        meter = model.meter
        n = len(x)

        def lat(phase: str) -> float | None:
            v = meter.per_sample_latency(phase)
            return None if v is None else round(v, 6)

        return {
            "server": url, "scheme": model.scheme.name, "digest": model.digest.hex(),
            "output": model.output, "dataset": ds.name, "samples": n,
            "accuracy": float((logits.argmax(1) == y).mean()),
            "batch_size": batch,
            "latency_s": {"keygen": lat("keygen"), "encrypt": lat("encrypt"),
                          "decrypt": lat("decrypt")},
            "round_trip_s": round(float(np.median(session.round_trips)), 6),
            "network_bytes": {"model": session.bytes_received["model"],
                              "keys": session.bytes_sent["keys"],
                              "input_per_sample": session.bytes_sent["input"] // n,
                              "output_per_sample": session.bytes_received["output"] // n},
        }
