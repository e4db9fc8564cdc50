"""``secureinfer serve DIR --ray``: the same HTTP API through Ray Serve, on N replicas.

Each replica builds the FastAPI application of ``create_app`` for itself (so each holds the
compiled server, its own LRU of opened keys, its own metrics) and runs every request
through it in process; a light front deployment (``@serve.ingress``, no CPU reserved)
receives the HTTP requests from Ray's proxy and hands them to a replica, whose answer
carries an ``X-Replica-Id`` header. Keys are shared through the key store directory
(``Settings.key_store``): a key bundle registered on one replica is written there atomically
and opened from there by any other replica on its first request. On several machines the
directory must be shared storage (NFS or similar) mounted at the same path.

Ray replaces a replica that dies; a request that was in flight on it gets a 503 with
``Retry-After: 1`` from the front (Ray's own proxy would answer 500), and no key is lost
since keys live on disk, not in the replica. Needs the ``ray`` extra:
``pip install 'secureinfer[ray]'``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from ..errors import BackendNotInstalledError
from .settings import Settings

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


def _front_class(max_request_bytes: int) -> Any:
    from ray import serve

    @serve.ingress()
    class Front:
        """The HTTP entry: forwards each request to a replica; a replica that died while
        holding it is a 503 with ``Retry-After`` (Ray replaces the replica)."""

        def __init__(self, replicas: Any) -> None:
            self.replicas = replicas

        def __serve_build_asgi_app__(self) -> Any:
            return _front_app(self.replicas, max_request_bytes)

    return Front


def _front_app(replicas: Any, max_request_bytes: int) -> Any:
    """The front's FastAPI application (built on its replica, never pickled)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    front = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @front.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(request: Request, path: str) -> Response:
        size = request.headers.get("content-length", "0")
        if size.isdigit() and int(size) > max_request_bytes:
            return JSONResponse({"error": "RequestTooLarge", "detail":
                                 f"the body of {size} bytes exceeds this server's limit of "
                                 f"{max_request_bytes}"}, status_code=413)
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        try:
            status, out, content = await replicas.handle.remote(
                request.method, "/" + path, request.url.query, headers, body)
        except (RayActorError, DeploymentUnavailableError) as exc:
            return JSONResponse({"error": "ReplicaUnavailable", "detail":
                                 f"the replica holding this request stopped "
                                 f"({type(exc).__name__}); Ray is replacing it: retry"},
                                status_code=503, headers={"Retry-After": "1"})
        return Response(content, status_code=status, headers=dict(out))

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
                                   keys_dir=settings.key_store.resolve())
    settings.key_store.mkdir(parents=True, exist_ok=True)
    serve.start(http_options={"host": host, "port": port})
    replicas_app = serve.deployment(_replica_class(), name="SecureInfer", **options)
    front = serve.deployment(_front_class(settings.max_request_bytes), name="Front",
                             ray_actor_options={"num_cpus": 0})
    app = front.bind(replicas_app.bind(settings))
    serve.run(app, name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
