"""``create_app(settings)``: the FastAPI application of ``secureinfer serve``.

The application loads the artifact's server part once, keeps a key store, and answers
every error with a status and a one-line JSON body (``{"error": kind, "detail": message}``),
never a traceback:

=====================================  ======
malformed envelope, key bytes, header  400
bad input, role or config request      400
missing or wrong token                 401
unknown key id                         404
keys or input of another model         409
body above the limit                   413
input outside the planned range        422
key store full or not writable         507
backend failure (names the layer)      500
=====================================  ======
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..artifact import client_bundle, load_server
from ..errors import (
    ArtifactError,
    ConfigError,
    EnvelopeError,
    EvaluationError,
    InputError,
    RangeError,
    RoleError,
    SecureInferError,
)
from .deps import BadRequest, RequestTooLarge, Unauthorized
from .keystore import ForeignKeysError, KeyStore, KeyStoreError, UnknownKeyError
from .metrics import Metrics
from .routes import infer_router, keys_router, model_router, ops_router
from .settings import Settings

__all__ = ["STATUS", "create_app", "install_error_handlers"]

log = logging.getLogger("secureinfer.serve")

#: HTTP status of each error class (the first matching base class wins). What the client
#: caused (the ValueError-based errors) is a 4xx; only backend failures and server faults
#: are 500.
STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (BadRequest, 400), (EnvelopeError, 400), (ArtifactError, 400), (InputError, 400),
    (RoleError, 400), (ConfigError, 400), (Unauthorized, 401), (UnknownKeyError, 404),
    (ForeignKeysError, 409), (RequestTooLarge, 413), (RangeError, 422),
    (KeyStoreError, 507), (EvaluationError, 500), (SecureInferError, 500),
)
_ENDPOINTS = {"/v1/model", "/v1/keys", "/v1/infer", "/healthz", "/metrics"}


def _bundle(settings: Settings) -> bytes:
    manifest, arrays = client_bundle(settings.artifact)
    return json.dumps({"manifest": json.loads(manifest),
                       "arrays": base64.b64encode(arrays).decode() if arrays else None}).encode()


def _error(request: Request, status: int, exc: BaseException) -> JSONResponse:
    kind = type(exc).__name__
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.error(kind)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": kind, "detail": str(exc)}, status_code=status,
                        headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` with its status (``STATUS``) and a one-line JSON body,
    counted in ``app.state.metrics`` when the application has one (the Ray front has
    none)."""
    async def secureinfer_error(request: Request, exc: Exception) -> JSONResponse:
        status = next(code for cls, code in STATUS if isinstance(exc, cls))
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return _error(request, status, exc)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        errors = getattr(exc, "errors", lambda: [])()
        where = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in errors)
        return _error(request, 400, BadRequest(f"missing or malformed request part: {where}"))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(request, 500, RuntimeError(f"internal error ({type(exc).__name__}); the "
                                                 "server logged it and keeps serving"))

    app.add_exception_handler(SecureInferError, secureinfer_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def create_app(settings: Settings) -> FastAPI:
    """The service for ``settings.artifact``: routers for the model, keys, inference and
    operations; dependencies for the token and the body limit.

    Raises:
        ArtifactError: the artifact cannot be loaded.
    """
    model = load_server(settings.artifact)
    app = FastAPI(title="secureinfer", version="1", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.settings = settings
    app.state.model = model
    app.state.client_bundle = _bundle(settings)
    app.state.keys = KeyStore(model, settings.key_store, int(settings.cache_mb * (1 << 20)))
    app.state.metrics = Metrics()
    install_error_handlers(app)

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        path = request.url.path
        request.app.state.metrics.observe(path if path in _ENDPOINTS else "other",
                                          response.status_code, time.perf_counter() - start)
        return response

    for router in (model_router, keys_router, infer_router, ops_router):
        app.include_router(router)
    return app
