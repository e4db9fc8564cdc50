"""``secureinfer serve DIR --ray``: the same HTTP API through Ray Serve, on N replicas.

Each replica builds the FastAPI application of ``create_app`` for itself (so each holds the
compiled server, its own LRU of opened keys, its own metrics) and runs every request
through it in process; a light front deployment (``@serve.ingress``, no CPU reserved)
receives the HTTP requests from Ray's proxy and hands them to a replica, whose answer
carries an ``X-Replica-Id`` header. Keys are shared through the key store directory
(``Settings.key_store``): the front streams a ``POST /v1/keys`` body into a staging file
there (``secureinfer.serve.upload``; hundreds of MB must not be copied through Ray's calls
and object store), the replica that takes the request checks, opens and renames it to its
key id, and any other replica opens it from there on its first request with that key id.
On several machines the directory must be shared storage (NFS or similar) mounted at the
same path, on the front's node too.

Ray replaces a replica that dies; a request that was in flight on it gets a 503 with
``Retry-After: 1`` from the front (Ray's own proxy would answer a bare 500), any other Ray
failure a JSON 500, and no key is lost since keys live on disk, not in the replica. Needs
the ``ray`` extra: ``pip install 'secureinfer[ray]'``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from ..errors import BackendNotInstalledError
from .app import install_error_handlers
from .deps import read_body, require_token
from .settings import Settings
from .upload import STAGED_HEADER, clean_staged, stage_body

__all__ = ["RAY_EXTRA", "deploy", "import_ray"]

RAY_EXTRA = "pip install 'secureinfer[ray]'"


def import_ray() -> Any:
    """``ray`` with Ray Serve, or a ``BackendNotInstalledError`` naming the extra."""
    try:
        import ray
        from ray import serve  # noqa: F401 - Ray Serve is part of the extra
    except ImportError as exc:
        raise BackendNotInstalledError(f"--ray needs Ray with Ray Serve ({exc}): "
                                       f"{RAY_EXTRA}") from None
    return ray


#: Hop-by-hop and length headers not forwarded between the front and a replica.
_DROP = frozenset({"host", "content-length", "transfer-encoding", "connection",
                   "content-encoding"})


def _replica_class() -> Any:
    from ray import serve

    class Replica:
        """One replica: ``create_app(settings)`` run in process, plus its replica id."""

        def __init__(self, settings: Settings) -> None:
            import httpx

            from . import create_app

            self.app = create_app(settings)
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                          base_url="http://replica", timeout=None)

        async def handle(self, method: str, path: str, query: str,
                         headers: dict[str, str], body: bytes
                         ) -> tuple[int, list[tuple[str, str]], bytes]:
            """One HTTP request through the application: status, headers, body."""
            response = await self.http.request(method, path + (f"?{query}" if query else ""),
                                               headers=headers, content=body)
            out = [(k, v) for k, v in response.headers.items() if k.lower() not in _DROP]
            return response.status_code, [*out, ("x-replica-id", self.replica)], \
                response.content

    return Replica


def _front_class(settings: Settings) -> Any:
    from ray import serve

    @serve.ingress()
    class Front:
        """The HTTP entry: streams key uploads into the key store, forwards each request
        to a replica; a replica that died while holding it is a 503 with ``Retry-After``
        (Ray replaces the replica)."""

        def __init__(self, replicas: Any) -> None:
            self.replicas = replicas
            clean_staged(settings.key_store)  # what a killed front left staged

        def __serve_build_asgi_app__(self) -> Any:
            return _front_app(self.replicas, settings)

    return Front


def _gone() -> tuple[type[BaseException], ...]:
    """Ray errors that mean the replica (or its node) went away or ran out of a resource:
    the request may be retried on a replacement."""
    from ray import exceptions as rx
    from ray.serve.exceptions import DeploymentUnavailableError

    return (rx.RayActorError, DeploymentUnavailableError, rx.OutOfMemoryError,
            rx.ObjectStoreFullError, rx.OutOfDiskError, rx.ObjectLostError,
            rx.NodeDiedError, rx.WorkerCrashedError)


def _failure(exc: Exception) -> JSONResponse:
    """The JSON answer for a call to a replica that raised ``exc`` (never a bare 500)."""
    text = str(exc)
    hint = (" The node ran low on memory (Ray's memory monitor stops workers above "
            "RAY_memory_usage_threshold): run fewer replicas per node, a smaller --cache-mb, "
            "or give the node more memory." if "memory" in text.lower() else "")
    if not isinstance(exc, _gone()):
        return JSONResponse({"error": "ReplicaFailed", "detail":
                             f"the replica's call failed ({type(exc).__name__}: "
                             f"{text.splitlines()[0][:300] if text else ''}); the service "
                             f"keeps serving.{hint}"}, status_code=500)
    return JSONResponse({"error": "ReplicaUnavailable", "detail":
                         f"the replica holding this request stopped ({type(exc).__name__}); "
                         f"Ray is replacing it: retry.{hint}"},
                        status_code=503, headers={"Retry-After": "1"})


async def _call(replicas: Any, request: Request, path: str, body: bytes,
                extra: dict[str, str]) -> Response:
    """One request through a replica's application, its answer as the front's."""
    headers = {k: v for k, v in request.headers.items()
               if k.lower() not in _DROP and k.lower() != STAGED_HEADER}
    try:
        status, out, content = await replicas.handle.remote(
            request.method, path, request.url.query, {**headers, **extra}, body)
    except Exception as exc:  # noqa: BLE001 - every Ray failure is answered as JSON
        return _failure(exc)
    return Response(content, status_code=status, headers=dict(out))


def _front_app(replicas: Any, settings: Settings) -> Any:
    """The front's FastAPI application (built on its replica, never pickled).

    ``POST /v1/keys`` (after the token check) streams the body into a staging file of the
    key store and hands the replica its name, so the keys never travel through Ray; every
    other request is read (at most ``max_request_bytes``) and forwarded as it is.
    """
    front = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    front.state.settings = settings
    install_error_handlers(front)

    @front.post("/v1/keys", dependencies=[Depends(require_token)])
    async def keys(request: Request) -> Response:
        staged = await stage_body(request, settings.key_store, settings.max_request_bytes)
        try:
            return await _call(replicas, request, "/v1/keys", b"",
                               {STAGED_HEADER: staged.name})
        finally:  # the replica renamed or removed it, unless it never got there
            staged.unlink(missing_ok=True)

    @front.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(request: Request, path: str) -> Response:
        return await _call(replicas, request, "/" + path, await read_body(request), {})

    return front


def deploy(settings: Settings, *, address: str | None = None, host: str = "127.0.0.1",
           port: int = 8000, replicas: int | None = None, min_replicas: int | None = None,
           max_replicas: int | None = None, name: str = "secureinfer") -> str:
    """Start the service on Ray Serve and return its URL (does not block).

    Args:
        settings: the service's configuration (the key store must be reachable from every
            node running a replica).
        address: the Ray cluster (``ray.init(address)``); ``None``: the running one, or a
            new local one.
        host, port: where Ray Serve's HTTP proxy listens.
        replicas: a fixed number of replicas (default 1), or
        min_replicas, max_replicas: autoscaling bounds.

    Raises:
        BackendNotInstalledError: Ray is not installed.
        ConfigError: inconsistent replica counts.
    """
    from ..errors import ConfigError

    ray = import_ray()
    from ray import serve

    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise ConfigError("--replicas is a fixed count; give it or --min-replicas/"
                          "--max-replicas (autoscaling), not both")
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 4}
    if min_replicas is not None or max_replicas is not None:
        lo, hi = min_replicas or 1, max_replicas or max(min_replicas or 1, 1)
        if not 0 <= lo <= hi or hi < 1:
            raise ConfigError(f"--min-replicas {lo} / --max-replicas {hi}: need "
                              "0 <= min <= max and max >= 1")
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                         "target_ongoing_requests": 1}
    else:
        n = 1 if replicas is None else replicas
        if n < 1:
            raise ConfigError(f"--replicas {n} must be at least 1")
        options["num_replicas"] = n
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    settings = dataclasses.replace(settings, artifact=Path(settings.artifact).resolve(),
                                   keys_dir=settings.key_store.resolve(), staged_uploads=True)
    settings.key_store.mkdir(parents=True, exist_ok=True)
    serve.start(http_options={"host": host, "port": port})
    replicas_app = serve.deployment(_replica_class(), name="SecureInfer", **options)
    front = serve.deployment(_front_class(settings), name="Front",
                             ray_actor_options={"num_cpus": 0})
    app = front.bind(replicas_app.bind(settings))
    serve.run(app, name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
