"""Bytes on the wire: the versioned envelope and a small field codec for payloads.

Every message between roles is an envelope::

    b"secureinfer" | u16 format version | u8 kind | u8 len + scheme name |
    16-byte parameters digest | u64 len + payload

and payloads that hold several parts use ``pack_fields``: named bytes, blob lists,
numeric numpy arrays, integers and strings, length-prefixed and parsed with bounds checks.
Nothing here (or anywhere in secureinfer) unpickles received bytes.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import EnvelopeError

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_DIM",
    "MAX_NDIM",
    "Envelope",
    "Kind",
    "open_envelope",
    "pack_fields",
    "params_digest",
    "seal",
    "unpack_fields",
]

MAGIC = b"secureinfer"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<HBB")  # version, kind, name length
_DIGEST_LEN = 16
MAX_NDIM = 32  # dimensions of an array field (numpy itself stops at 64)
MAX_DIM = 2**32  # size of one dimension of an array field


class Kind(enum.IntEnum):
    """What an envelope carries."""

    PUBLIC_KEYS = 1
    FUNCTIONAL_KEYS = 2
    INPUT = 3
    OUTPUT = 4
    PLAINTEXT_OUTPUT = 5


def params_digest(scheme: str, plan: Mapping[str, Any]) -> bytes:
    """16-byte digest of the scheme name and its planned parameters."""
    text = json.dumps({"scheme": scheme, "plan": plan}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).digest()[:_DIGEST_LEN]


@dataclass(frozen=True)
class Envelope:
    """A parsed envelope."""

    kind: Kind
    scheme: str
    digest: bytes
    payload: bytes


def seal(kind: Kind, scheme: str, digest: bytes, payload: bytes) -> bytes:
    """Wrap ``payload`` in an envelope."""
    name = scheme.encode()
    if len(name) > 255 or len(digest) != _DIGEST_LEN:
        raise ValueError("scheme name longer than 255 bytes or digest not 16 bytes")
    return b"".join([MAGIC, _HEAD.pack(FORMAT_VERSION, int(kind), len(name)), name, digest,
                     struct.pack("<Q", len(payload)), payload])


def open_envelope(data: bytes, *, kind: Kind | None = None, scheme: str | None = None,
                  digest: bytes | None = None) -> Envelope:
    """Parse and check an envelope; raise ``EnvelopeError`` saying what does not match."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EnvelopeError(f"expected bytes, got {type(data).__name__}")
    buf = memoryview(bytes(data))
    if bytes(buf[: len(MAGIC)]) != MAGIC:
        raise EnvelopeError("not a secureinfer message (bad magic bytes)")
    pos = len(MAGIC)
    if len(buf) < pos + _HEAD.size:
        raise EnvelopeError("truncated secureinfer message header")
    version, raw_kind, name_len = _HEAD.unpack_from(buf, pos)
    pos += _HEAD.size
    if version != FORMAT_VERSION:
        raise EnvelopeError(f"message format version {version}; this secureinfer reads "
                            f"version {FORMAT_VERSION}: use the same secureinfer on both sides")
    try:
        got_kind = Kind(raw_kind)
    except ValueError:
        raise EnvelopeError(f"unknown message kind {raw_kind}") from None
    end = pos + name_len + _DIGEST_LEN + 8
    if len(buf) < end:
        raise EnvelopeError("truncated secureinfer message header")
    name = bytes(buf[pos: pos + name_len]).decode("utf-8", "replace")
    got_digest = bytes(buf[pos + name_len: pos + name_len + _DIGEST_LEN])
    (length,) = struct.unpack_from("<Q", buf, end - 8)
    if len(buf) != end + length:
        raise EnvelopeError(f"message payload is {len(buf) - end} bytes, header says {length}")
    if kind is not None and got_kind != kind:
        raise EnvelopeError(f"expected a {kind.name} message, got {got_kind.name}")
    if scheme is not None and name != scheme:
        raise EnvelopeError(f"message is for scheme {name!r}, this side runs {scheme!r}")
    if digest is not None and got_digest != digest:
        raise EnvelopeError(f"message parameters differ from this side's ({name}): "
                            "client and server must compile the same model and config")
    return Envelope(got_kind, name, got_digest, bytes(buf[end:]))


# ----- field codec ----------------------------------------------------------------------

_T_BYTES, _T_BLOBS, _T_ARRAY, _T_INT, _T_STR, _T_BIGINTS = b"b", b"l", b"a", b"i", b"s", b"n"
_ARRAY_KINDS = set("biuf")


def _blob(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def pack_fields(fields: Mapping[str, Any]) -> bytes:
    """Serialize named fields: ``bytes``, ``list[bytes]``, numeric arrays, arrays of Python
    integers (``dtype=object``, any size), ``int``, ``str``."""
    out = [struct.pack("<I", len(fields))]
    for name, value in fields.items():
        key = name.encode()
        out.append(struct.pack("<H", len(key)) + key)
        if isinstance(value, (bytes, bytearray)):
            out.append(_T_BYTES + _blob(bytes(value)))
        elif isinstance(value, (list, tuple)):
            out.append(_T_BLOBS + struct.pack("<Q", len(value)))
            out.extend(_blob(bytes(v)) for v in value)
        elif isinstance(value, np.ndarray) and value.dtype == object:
            text = ",".join(str(int(v)) for v in value.ravel()).encode()
            out.append(_T_BIGINTS + bytes([value.ndim])
                       + struct.pack(f"<{value.ndim}Q", *value.shape) + _blob(text))
        elif isinstance(value, np.ndarray):
            if value.dtype.kind not in _ARRAY_KINDS:
                raise TypeError(f"field {name!r}: dtype {value.dtype} is not numeric")
            dt = value.dtype.str.encode()
            arr = np.ascontiguousarray(value)
            out.append(_T_ARRAY + bytes([len(dt)]) + dt + bytes([arr.ndim])
                       + struct.pack(f"<{arr.ndim}Q", *arr.shape) + _blob(arr.tobytes()))
        elif isinstance(value, (bool, int, np.integer)):
            out.append(_T_INT + _blob(str(int(value)).encode()))
        elif isinstance(value, str):
            out.append(_T_STR + _blob(value.encode()))
        else:
            raise TypeError(f"field {name!r}: cannot pack {type(value).__name__}")
    return b"".join(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.buf = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise EnvelopeError("truncated or malformed payload")
        chunk = bytes(self.buf[self.pos: self.pos + n])
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def blob(self) -> bytes:
        return self.take(self.unpack("<Q")[0])


def _shape(r: _Reader, name: str) -> tuple[int, ...]:
    ndim = r.take(1)[0]
    if ndim > MAX_NDIM:
        raise EnvelopeError(f"field {name!r}: {ndim} dimensions (at most {MAX_NDIM})")
    shape = r.unpack(f"<{ndim}Q")
    if any(d > MAX_DIM for d in shape):
        raise EnvelopeError(f"field {name!r}: shape {shape} has a dimension over {MAX_DIM}")
    return shape


def unpack_fields(data: bytes) -> dict[str, Any]:
    """Parse what ``pack_fields`` wrote; raise ``EnvelopeError`` on malformed input."""
    r = _Reader(bytes(data))
    (count,) = r.unpack("<I")
    fields: dict[str, Any] = {}
    for _ in range(count):
        name = r.take(r.unpack("<H")[0]).decode("utf-8", "replace")
        tag = r.take(1)
        if tag == _T_BYTES:
            fields[name] = r.blob()
        elif tag == _T_BLOBS:
            (n,) = r.unpack("<Q")
            if n > len(r.buf):
                raise EnvelopeError("malformed payload: impossible list length")
            fields[name] = [r.blob() for _ in range(n)]
        elif tag == _T_ARRAY:
            spec = r.take(r.take(1)[0]).decode("ascii", "replace")
            try:
                dt = np.dtype(spec)
            except Exception:  # noqa: BLE001 - numpy parses some specs with ast (SyntaxError)
                raise EnvelopeError(f"field {name!r}: unknown dtype {spec!r}") from None
            if dt.kind not in _ARRAY_KINDS:
                raise EnvelopeError(f"field {name!r}: dtype {dt} is not numeric")
            shape = _shape(r, name)
            raw = r.blob()
            if math.prod(shape) * dt.itemsize != len(raw):
                raise EnvelopeError(f"field {name!r}: {len(raw)} bytes do not fill shape {shape}")
            fields[name] = np.frombuffer(raw, dtype=dt).reshape(shape).copy()
        elif tag == _T_BIGINTS:
            shape = _shape(r, name)
            text = r.blob().decode("ascii", "replace")
            try:
                vals = [int(v) for v in text.split(",")] if text else []
            except ValueError:
                raise EnvelopeError(f"field {name!r}: malformed integers") from None
            if len(vals) != math.prod(shape):
                raise EnvelopeError(f"field {name!r}: {len(vals)} integers do not fill {shape}")
            arr = np.empty(len(vals), dtype=object)
            arr[:] = vals
            fields[name] = arr.reshape(shape)
        elif tag == _T_INT:
            try:
                fields[name] = int(r.blob().decode("ascii"))
            except ValueError:
                raise EnvelopeError(f"field {name!r}: malformed integer") from None
        elif tag == _T_STR:
            fields[name] = r.blob().decode("utf-8", "replace")
        else:
            raise EnvelopeError(f"field {name!r}: unknown type tag {tag!r}")
    if r.pos != len(r.buf):
        raise EnvelopeError("trailing bytes after payload fields")
    return fields
