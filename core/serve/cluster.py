"""``secureinfer serve DIR --ray``: the same HTTP API through Ray Serve, on N replicas.

Each replica builds the FastAPI application of ``create_app`` for itself (so each holds the
compiled server, its own LRU of opened keys, its own metrics) and answers with an
``X-Replica-Id`` header. Keys are shared through the key store directory
(``Settings.key_store``): a key bundle registered on one replica is written there atomically
and opened from there by any other replica on its first request. On several machines the
directory must be shared storage (NFS or similar) mounted at the same path.

Ray replaces a replica that dies; a request that was in flight on it gets a 503 with
``Retry-After`` from the proxy (Ray's ``RayActorError`` is not an answer of the model), and
no key is lost since keys live on disk, not in the replica. Needs the ``ray`` extra:
``pip install 'secureinfer[ray]'``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

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


def _replica_class() -> Any:
    from ray import serve

    @serve.ingress()
    class Replica:
        """One replica: ``create_app(settings)`` plus the replica id on every answer."""

        def __init__(self, settings: Settings) -> None:
            self.settings = settings

        def __serve_build_asgi_app__(self) -> Any:
            from . import create_app

            app = create_app(self.settings)
            replica = serve.get_replica_context().replica_id.unique_id

            @app.middleware("http")
            async def replica_id(request: Any, call_next: Any) -> Any:
                response = await call_next(request)
                response.headers["X-Replica-Id"] = replica
                return response

            return app

    return Replica


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
    app = serve.deployment(_replica_class(), name="SecureInfer", **options).bind(settings)
    serve.run(app, name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
