"""FastAPI dependencies: the bearer token, and the body limit enforced while reading."""

from __future__ import annotations

import hmac

from fastapi import Request

from ..errors import SecureInferError

__all__ = ["BadRequest", "RequestTooLarge", "Unauthorized", "check_declared_length", "read_body",
           "require_token"]


class Unauthorized(SecureInferError):
    """Missing or wrong bearer token (HTTP 401)."""


class RequestTooLarge(SecureInferError):
    """A body above ``--max-request-mb`` (HTTP 413), refused before it is read whole."""


class BadRequest(SecureInferError):
    """A request the service cannot parse at the HTTP level (HTTP 400)."""


def require_token(request: Request) -> None:
    """Refuse a ``/v1`` request without ``Authorization: Bearer <token>`` when the service
    has a token (constant-time comparison)."""
    token = request.app.state.settings.token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                             token.encode()):
        raise Unauthorized("missing or wrong bearer token: send Authorization: Bearer "
                           "<token> (secureinfer.remote.connect(url, token=...))")


def check_declared_length(request: Request, limit: int) -> None:
    """Refuse a request whose ``Content-Length`` is above ``limit``, before reading it.

    Raises:
        BadRequest: the header is not a number (400).
        RequestTooLarge: it is above ``limit`` (413).
    """
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise BadRequest(f"Content-Length {declared[:40]!r} is not a number") from None
    if size > limit:
        raise RequestTooLarge(f"the body is {size} bytes, above this server's limit of "
                              f"{limit}: start the service with a larger --max-request-mb")


async def read_body(request: Request) -> bytes:
    """The request body, at most ``max_request_bytes``: a larger ``Content-Length`` is
    refused before any byte is read, and a streamed body as soon as it passes the limit."""
    limit = request.app.state.settings.max_request_bytes
    check_declared_length(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"the body passed this server's limit of {limit} bytes: "
                                  "start the service with a larger --max-request-mb")
    return bytes(body)
