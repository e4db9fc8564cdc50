"""``secureinfer serve``: a compiled artifact behind HTTP (FastAPI on uvicorn).

    >>> from secureinfer.serve import Settings, create_app
    >>> app = create_app(Settings(artifact=Path("artifact"), token="s3cret"))

Endpoints: ``GET /v1/model`` (the client artifact), ``POST /v1/keys`` (a key owner's keys;
returns the key id), ``POST /v1/infer`` (``X-Key-Id`` header, input envelope body; the
output envelope), ``GET /healthz``, ``GET /metrics`` (Prometheus text). Needs the ``serve``
extra: ``pip install 'secureinfer[serve]'``.
"""

from __future__ import annotations

from .settings import Settings

try:
    from .app import create_app
except ImportError as exc:  # fastapi is the serve extra
    from ..errors import BackendNotInstalledError

    raise BackendNotInstalledError(f"secureinfer serve needs FastAPI and uvicorn ({exc}): "
                                   "pip install 'secureinfer[serve]'") from None

__all__ = ["Settings", "create_app", "serve"]


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the service with uvicorn until interrupted (``secureinfer serve``)."""
    import uvicorn

    app = create_app(settings)
    print(f"secureinfer: serving {settings.artifact} ({app.state.model.scheme.name}, digest "
          f"{app.state.model.digest.hex()}) on http://{host}:{port}; keys in "
          f"{settings.key_store}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
