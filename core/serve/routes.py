"""The service's endpoints, one router per concern: the model, keys, inference, operations."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from ..codec import Kind
from ..errors import EvaluationError, SecureInferError
from ..metrics import Meter
from .deps import read_body, require_token
from .keystore import check_model
from .upload import staged_name

__all__ = ["infer_router", "keys_router", "model_router", "ops_router"]

model_router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], tags=["model"])
keys_router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], tags=["keys"])
infer_router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], tags=["infer"])
ops_router = APIRouter(tags=["operations"])


class ServiceFault(EvaluationError):
    """A backend failure outside any layer (parsing the input, writing the output)."""

    def __init__(self, scheme: str, where: str, cause: BaseException) -> None:
        SecureInferError.__init__(
            self, f"{where}: the {scheme} backend failed: {type(cause).__name__}: {cause}")
        self.scheme, self.layer, self.kind = scheme, where, "io"


@model_router.get("/model")
def get_model(request: Request) -> Response:
    """The client artifact (manifest and, under FE, the prefix arrays) as JSON."""
    return Response(request.app.state.client_bundle, media_type="application/json")


@keys_router.post("/keys")
async def post_keys(request: Request) -> dict[str, object]:
    """Store one key owner's keys; the key id is the SHA-256 of the uploaded bytes.

    Behind the ``serve --ray`` front the body is already in the key store directory, and
    the request names its staging file instead (``secureinfer.serve.upload``).
    """
    store = request.app.state.keys
    staged = staged_name(request)
    if staged is not None:
        key_id, created = await run_in_threadpool(store.put_staged, staged)
    else:
        key_id, created = await run_in_threadpool(store.put, await read_body(request))
    return {"key_id": key_id, "stored": created}


def _evaluate(request: Request, key_id: str, body: bytes) -> bytes:
    state = request.app.state
    model = state.model
    check_model(model, body, Kind.INPUT)
    with state.keys.lock(key_id):
        server = state.keys.get(key_id)
        try:
            return server.evaluate(body, meter=Meter())
        except SecureInferError:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a backend outside a layer; reported as 500
            raise ServiceFault(model.scheme.name, "(input or output)", exc) from exc


@infer_router.post("/infer")
async def post_infer(request: Request, body: bytes = Depends(read_body),
                     x_key_id: str = Header(..., alias="X-Key-Id")) -> Response:
    """Evaluate one input envelope with the keys of ``X-Key-Id``; the output envelope."""
    start = time.perf_counter()
    out = await run_in_threadpool(_evaluate, request, x_key_id, body)
    return Response(out, media_type="application/octet-stream",
                    headers={"X-Evaluate-Seconds": f"{time.perf_counter() - start:.6f}"})


@ops_router.get("/healthz")
def healthz(request: Request) -> dict[str, object]:
    """Liveness, with the model's scheme, digest and key counts."""
    state = request.app.state
    return {"status": "ok", "scheme": state.model.scheme.name,
            "digest": state.model.digest.hex(), **state.keys.describe()}


@ops_router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus text: requests, errors by kind, latency histogram, keys cached."""
    state = request.app.state
    text = state.metrics.render(state.keys.cached, state.keys.cached_bytes, state.keys.stored)
    return Response(text, media_type="text/plain; version=0.0.4")

