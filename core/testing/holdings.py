"""Everything a server holds, and whether any of it decrypts: the "server can decrypt
nothing" check of the conformance suite.

The server's state is walked from the ``Server`` role object (its context and layers) plus
the key messages it was sent. The configured ``Scheme`` and the ``SecureModel`` are left out:
in one process they are shared with the client, while a real server rebuilds them from the
config and the plan, which hold no key.

Two checks, both of which a leaking scheme fails:

- ``decrypting_holdings``: every object the server holds is given to the scheme's own
  ``decrypt`` as the secret key; none may give back the true result.
- ``leaked_secrets``: no secret value (an integer over 64 bits, a non-integral float, bytes
  or array) reachable from the key owner's secret may be reachable from the server, unless
  it is public: in the public keys, or in the configured scheme (its options and plan).
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Any, Iterator

import numpy as np

from .. import codec
from ..model import Parties, SecureModel

__all__ = ["decrypting_holdings", "leaked_secrets", "server_holdings"]

MAX_DEPTH = 6  # attribute levels walked below the server
MAX_OBJECTS = 5000  # objects visited per walk, so a huge key list stays quick
MAX_ARRAY = 1 << 16  # larger arrays are tables and encodings, not key values


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield f"[{key!r}]", value
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, value in enumerate(obj):
            yield f"[{i}]", value
    else:
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            yield from ((f".{k}", v) for k, v in state.items())
        for name in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, name):
                yield f".{name}", getattr(obj, name)


def _walk(root: Any, name: str, skip: set[int]) -> Iterator[tuple[str, Any]]:
    seen = set(skip)
    queue = deque([(name, root, 0)])  # breadth first: the shortest path names an object
    while queue and len(seen) < MAX_OBJECTS + len(skip):
        path, obj, depth = queue.popleft()
        if id(obj) in seen or obj is None or isinstance(obj, (bool, type)) or callable(obj) \
                and not hasattr(obj, "__dict__"):
            continue
        seen.add(id(obj))
        yield path, obj
        if depth < MAX_DEPTH and not isinstance(obj, (str, bytes, int, float, np.ndarray)):
            room = MAX_OBJECTS - len(queue)  # a huge table is sampled, not walked whole
            queue.extend((path + sub, child, depth + 1)
                         for sub, child in islice(_children(obj), max(room, 0)))


def _key_messages(model: SecureModel, parties: Parties) -> dict[str, Any]:
    authority = parties.key_owner
    messages: dict[str, Any] = {}
    for label, message in (("public_keys", authority.public_keys()),
                           ("functional_keys", authority.functional_keys())):
        payload = codec.open_envelope(message).payload
        messages[label] = payload
        if payload:
            messages[label + "_fields"] = codec.unpack_fields(payload)
    return messages


def server_holdings(model: SecureModel, parties: Parties) -> Iterator[tuple[str, Any]]:
    """``(path, object)`` for everything reachable from the server role and its key messages
    (the shared model and scheme objects excepted, see the module docstring)."""
    skip = {id(model), id(model.scheme), id(model.meter)}
    yield from _walk(parties.server, "server", skip)
    yield from _walk(_key_messages(model, parties), "received", skip)


def decrypting_holdings(model: SecureModel, parties: Parties, output: bytes,
                        want: np.ndarray) -> list[str]:
    """Paths of server-held objects with which ``scheme.decrypt`` recovers ``want`` from the
    output message ``output`` (an empty list is the required answer)."""
    payload = codec.open_envelope(output).payload
    caps = model.scheme.capabilities
    tolerance = 0.0 if caps.exact else caps.tolerance
    found = []
    for path, candidate in server_holdings(model, parties):
        try:
            got = np.asarray(model.scheme.decrypt(candidate, payload), dtype=np.float64)
        except Exception:  # noqa: BLE001 - any failure to decrypt is the expected outcome
            continue
        if got.shape == want.shape and np.allclose(got, want, rtol=0, atol=tolerance):
            found.append(path)
    return found


def _leaf_keys(obj: Any) -> Iterator[tuple[Any, str]]:
    """Hashable keys of the secret-looking values ``obj`` is or directly holds."""
    if isinstance(obj, int) and not isinstance(obj, bool) and obj.bit_length() > 64:
        yield ("int", obj), ""
    elif isinstance(obj, float) and np.isfinite(obj) and obj != round(obj):
        yield ("float", obj), ""
    elif isinstance(obj, bytes) and len(obj) >= 16:
        yield ("bytes", obj), ""
    elif isinstance(obj, np.ndarray) and obj.dtype == object:
        for i, item in enumerate(obj.flat):
            for key, _ in _leaf_keys(item):
                yield key, f".flat[{i}]"
    elif isinstance(obj, np.ndarray) and 4 <= obj.size <= MAX_ARRAY \
            and obj.min() != obj.max():
        yield ("array", obj.dtype.str, obj.tobytes()), ""


def _leaves(pairs: Iterator[tuple[str, Any]]) -> dict[Any, str]:
    out: dict[Any, str] = {}
    for path, obj in pairs:
        for key, sub in _leaf_keys(obj):
            out.setdefault(key, path + sub)
    return out


def leaked_secrets(model: SecureModel, parties: Parties) -> list[str]:
    """``"secret path == server path"`` for every secret value the server also holds."""
    skip = {id(model), id(model.meter)}
    messages = _key_messages(model, parties)
    public = _leaves(_walk({k: v for k, v in messages.items() if k.startswith("public")},
                           "public", skip))
    public.update(_leaves(_walk(model.scheme, "scheme", skip)))  # config and plan: public
    if model.output == "plaintext":  # an FE client's key: public by definition
        public.update(_leaves(_walk(model.scheme.open_client(messages["public_keys"]),
                                    "public", skip)))
    secret = {k: v for k, v in _leaves(_walk(parties.key_owner.secret, "secret", skip)).items()
              if k not in public}
    held = _leaves(server_holdings(model, parties))
    return [f"{secret[k]} == {held[k]}" for k in secret if k in held]
