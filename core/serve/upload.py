"""Key uploads streamed into the key store directory (the Ray front's ``POST /v1/keys``).

A key bundle can be hundreds of megabytes. Passed as one value through Ray (the HTTP
proxy, the front, the object store, the replica), it is copied at every hop; one such upload
took several GB of memory on one node, enough for Ray's memory monitor to kill the front
(Ray's proxy then answers a bare 500). Under ``serve --ray`` the front therefore writes the
body, chunk by chunk as it arrives, to a staging file in the shared key store directory and
hands the replica only the file's name, in the ``X-Secureinfer-Staged`` header; the replica
checks the keys, opens them, and renames the file to its key id
(``KeyStore.put_staged``). A replica accepts that header only when its settings say it sits
behind the front (``Settings.staged_uploads``); the front drops it from every request it
receives.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from .deps import BadRequest, RequestTooLarge, check_declared_length

__all__ = ["STAGED_HEADER", "clean_staged", "is_staged_name", "stage_body", "staged_name"]

#: The header that names a staged upload, from the front to a replica only.
STAGED_HEADER = "x-secureinfer-staged"
_NAME = re.compile(r"\.upload\.[0-9a-f]{32}\.part")


def is_staged_name(name: str) -> bool:
    """Whether ``name`` has the form of a staging file's name (no path, no other file)."""
    return bool(_NAME.fullmatch(name))


def staged_name(request: Request) -> str | None:
    """The staged upload a trusted front named in this request, else ``None``.

    Raises:
        BadRequest: the header is there but is not a staging file's name.
    """
    if not request.app.state.settings.staged_uploads:
        return None
    name = request.headers.get(STAGED_HEADER)
    if name is None:
        return None
    if not is_staged_name(name):
        raise BadRequest(f"{STAGED_HEADER} {name[:80]!r} is not a staged upload's name")
    return name


async def stage_body(request: Request, directory: Path, limit: int) -> Path:
    """Write the request body to a new staging file in ``directory``; its path.

    A ``Content-Length`` above ``limit`` is refused before any byte is read, and a streamed
    body as soon as it passes it; on any failure (too large, a client that goes away, a full
    disk) the partial file is removed.

    Raises:
        RequestTooLarge: the body is above ``limit`` (413).
        KeyStoreError: the directory cannot take the file (507).
    """
    from .keystore import KeyStoreError

    check_declared_length(request, limit)
    path = Path(directory) / f".upload.{secrets.token_hex(16)}.part"
    size = 0
    try:
        with open(path, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge(
                        f"the body passed this server's limit of {limit} bytes: start the "
                        "service with a larger --max-request-mb")
                fh.write(chunk)
                fh.flush()  # on disk as it arrives, not up to a buffer behind
            await run_in_threadpool(os.fsync, fh.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise KeyStoreError(
            f"the key store {path.parent} cannot take a {size}-byte upload: "
            f"{exc.strerror or exc}; nothing was stored: free space there, or start the "
            "service with --keys-dir on another filesystem, then upload again") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def clean_staged(directory: Path) -> int:
    """Remove the staging files a killed front left in ``directory``; how many.

    Called when the (single) front starts, before it stages anything.
    """
    gone = 0
    for path in Path(directory).glob(".upload.*.part"):
        if is_staged_name(path.name):
            path.unlink(missing_ok=True)
            gone += 1
    return gone
