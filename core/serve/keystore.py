"""Key owners' keys: stored on disk (one file per key id), opened servers in an LRU.

A key bundle is ``pack_fields({"public": envelope, "functional": envelope or b""})``, the
bytes ``secureinfer.remote.bundle_keys`` makes; its key id is the SHA-256 of those bytes, so the same
keys always get the same id and a stored file can be checked against its name. Files are
written atomically (temporary file, fsync, rename), so a crash leaves either the whole file
or none; a temporary file that a killed writer left behind is removed when the store opens,
and a write that fails (a full disk) removes its own and raises ``KeyStoreError``. Opened
servers (parsed keys, encoded layers) stay in memory, least recently used first out, while
their estimated size fits the budget. One lock per key id serializes what touches one key
owner's server (opening, evaluating); different key owners run at once. Under ``serve --ray``
an upload arrives already written to a staging file of the directory (``put_staged``; see
``secureinfer.serve.upload``), and is checked, opened and renamed the same way.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from .. import codec
from ..codec import Kind
from ..errors import EnvelopeError, SecureInferError
from ..model import SecureModel, Server
from .upload import is_staged_name

__all__ = ["KEY_MEMORY_FACTOR", "ForeignKeysError", "KeyStore", "KeyStoreError",
           "UnknownKeyError", "check_model", "estimated_size", "key_id_of"]

_KEY_ID = re.compile(r"[0-9a-f]{64}")
_SUFFIX = ".keys"


class UnknownKeyError(SecureInferError, KeyError):
    """No key owner with this key id has uploaded keys (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0])


class ForeignKeysError(SecureInferError):
    """Keys (or an input) made for another compiled model or scheme (HTTP 409)."""


class KeyStoreError(SecureInferError):
    """The key store cannot write (a full disk, no permission): nothing was stored (507)."""


def key_id_of(data: bytes) -> str:
    """The key id of a key bundle: the SHA-256 of its bytes, hex."""
    return hashlib.sha256(data).hexdigest()


#: An opened server's memory is estimated, not measured (an RSS delta around opening also
#: counts what concurrent requests allocate): the plan's ``server_memory_bytes`` when the
#: scheme states it, else this factor times the key bytes (parsed SEAL keys take about
#: twice their compressed serialization; the rest is room for the layers encoded per server).
KEY_MEMORY_FACTOR = 4


def estimated_size(model: SecureModel, public: bytes, functional: bytes | None) -> int:
    """The LRU's size of one opened server of ``model`` (see ``KEY_MEMORY_FACTOR``)."""
    stated = model.plan.get("server_memory_bytes")
    if isinstance(stated, int) and not isinstance(stated, bool) and stated > 0:
        return stated
    return KEY_MEMORY_FACTOR * (len(public) + len(functional or b""))


def check_model(model: SecureModel, data: bytes, kind: Kind) -> None:
    """Raise ``ForeignKeysError`` when the envelope ``data`` belongs to another model and
    ``EnvelopeError`` when it is malformed or not of ``kind``."""
    env = codec.open_envelope(data)
    if env.scheme != model.scheme.name or env.digest != model.digest:
        raise ForeignKeysError(
            f"this {kind.name.lower().replace('_', ' ')} message was made for scheme "
            f"{env.scheme!r} with plan digest {env.digest.hex()}; this server runs "
            f"{model.scheme.name!r} with digest {model.digest.hex()}: fetch this server's "
            "client artifact (GET /v1/model) and make new keys from it")
    if env.kind != kind:
        raise EnvelopeError(f"expected a {kind.name} message, got {env.kind.name}")


def _cannot_store(path: Path, size: int, exc: OSError) -> KeyStoreError:
    return KeyStoreError(
        f"the key store {path.parent} cannot store {size} bytes of keys: "
        f"{exc.strerror or exc}; nothing was stored: free space there, or start the "
        "service with --keys-dir on another filesystem, then upload again")


def _check_id(key_id: Any) -> str:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise UnknownKeyError(f"key id {str(key_id)[:80]!r} is not 64 hex digits (the id "
                              "POST /v1/keys returned)")
    return key_id


class _KeyLock:
    """One key owner's lock; weakly referenced by the store, so it lives while in use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> "_KeyLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


class _Entry:
    def __init__(self, server: Server, size: int) -> None:
        self.server, self.size = server, size


class KeyStore:
    """Stored keys and the LRU of opened servers for one compiled model.

    Args:
        model: the evaluator's model (``secureinfer.load_server``).
        directory: the key store (created).
        budget_bytes: memory budget of the opened servers (at least one is kept).
    """

    def __init__(self, model: SecureModel, directory: Path, budget_bytes: int) -> None:
        self.model = model
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.budget = int(budget_bytes)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._locks: weakref.WeakValueDictionary[str, _KeyLock] = weakref.WeakValueDictionary()
        for stale in self.directory.glob(f".*{_SUFFIX}.*.tmp"):  # a killed writer's
            stale.unlink(missing_ok=True)
        self._stored = sum(1 for _ in self.directory.glob(f"*{_SUFFIX}"))

    # ----- stats -----------------------------------------------------------------------

    @property
    def cached(self) -> int:
        """Opened servers in memory."""
        return len(self._cache)

    @property
    def cached_bytes(self) -> int:
        """Their estimated memory."""
        with self._lock:
            return sum(e.size for e in self._cache.values())

    @property
    def stored(self) -> int:
        """Key owners in the store on disk."""
        return self._stored

    # ----- keys ------------------------------------------------------------------------

    def lock(self, key_id: str) -> _KeyLock:
        """The lock that serializes work on one key owner's server.

        The id's format is checked first, and the store keeps locks only while someone
        holds a reference, so bogus or unknown ids leave nothing behind.

        Raises:
            UnknownKeyError: ``key_id`` is not 64 hex digits (404).
        """
        _check_id(key_id)
        with self._lock:
            found = self._locks.get(key_id)
            if found is None:
                found = self._locks[key_id] = _KeyLock()
            return found

    def put(self, data: bytes) -> tuple[str, bool]:
        """Check, open and store a key bundle; ``(key id, newly stored)``.

        Raises:
            EnvelopeError: malformed bundle or keys (400).
            ForeignKeysError: keys of another model (409).
            KeyStoreError: the store cannot write (507).
        """
        return self._store(data, lambda path: self._write(path, data))

    def put_staged(self, name: str) -> tuple[str, bool]:
        """``put`` for a key bundle already written to ``directory/name`` (a staged upload,
        ``secureinfer.serve.upload``): checked and opened like ``put``, then renamed to its
        key id, or removed when it is refused or already stored.

        Raises:
            EnvelopeError: malformed bundle or keys, or no such staged upload (400).
            ForeignKeysError: keys of another model (409).
            KeyStoreError: the store cannot rename it (507).
        """
        if not is_staged_name(name):
            raise EnvelopeError(f"{name[:80]!r} is not a staged upload's name")
        staged = self.directory / name
        try:
            try:
                data = staged.read_bytes()
            except FileNotFoundError:
                raise EnvelopeError(f"the staged upload {name} is gone (its front stopped "
                                    "or it was already used): upload the keys again") from None
            return self._store(data, lambda path: self._commit(staged, path))
        finally:
            staged.unlink(missing_ok=True)

    def _store(self, data: bytes, commit: Callable[[Path], None]) -> tuple[str, bool]:
        public, functional = self._parse(data)
        key_id = key_id_of(data)
        with self.lock(key_id):
            path = self._path(key_id)
            if key_id in self._cache and path.exists():
                return key_id, False
            server, size = self._open(public, functional)
            created = not path.exists()
            if created:
                commit(path)
            self._insert(key_id, server, size)
        if created:
            with self._lock:
                self._stored += 1
        return key_id, created

    def get(self, key_id: str) -> Server:
        """The opened server of ``key_id``, from memory or from the store.

        The caller holds ``lock(key_id)``.

        Raises:
            UnknownKeyError: no such key id (404).
        """
        _check_id(key_id)
        with self._lock:
            entry = self._cache.get(key_id)
            if entry is not None:
                self._cache.move_to_end(key_id)
                return entry.server
        path = self._path(key_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UnknownKeyError(f"unknown key id {key_id}: upload the keys first "
                                  "(POST /v1/keys)") from None
        if key_id_of(data) != key_id:
            raise UnknownKeyError(f"the stored keys of {key_id} are damaged: upload them "
                                  "again (POST /v1/keys)")
        server, size = self._open(*self._parse(data))
        self._insert(key_id, server, size)
        return server

    # ----- internals -------------------------------------------------------------------

    def _path(self, key_id: str) -> Path:
        return self.directory / f"{key_id}{_SUFFIX}"

    def _parse(self, data: bytes) -> tuple[bytes, bytes | None]:
        fields = codec.unpack_fields(data)
        public, functional = fields.get("public"), fields.get("functional", b"")
        if not isinstance(public, bytes) or not isinstance(functional, bytes):
            raise EnvelopeError("a key bundle holds a 'public' key envelope and a "
                                "'functional' one (empty for HE): secureinfer.remote makes it")
        check_model(self.model, public, Kind.PUBLIC_KEYS)
        if functional:
            check_model(self.model, functional, Kind.FUNCTIONAL_KEYS)
        return public, functional or None

    def _open(self, public: bytes, functional: bytes | None) -> tuple[Server, int]:
        try:
            server = self.model.server(public, functional)
        except SecureInferError:
            raise
        except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as exc:
            raise EnvelopeError(f"the keys cannot be opened: {type(exc).__name__}: "
                                f"{exc}") from None
        return server, estimated_size(self.model, public, functional)

    def _insert(self, key_id: str, server: Server, size: int) -> None:
        with self._lock:
            self._cache[key_id] = _Entry(server, size)
            self._cache.move_to_end(key_id)
            total = sum(e.size for e in self._cache.values())
            while len(self._cache) > 1 and total > self.budget:
                _, old = self._cache.popitem(last=False)
                total -= old.size

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _cannot_store(path, len(data), exc) from None
        KeyStore._commit(tmp, path)

    @staticmethod
    def _commit(tmp: Path, path: Path) -> None:
        """Rename the synced file ``tmp`` to ``path``, then sync the directory (so the
        rename itself survives a crash)."""
        try:
            os.replace(tmp, path)
        except OSError as exc:
            size = tmp.stat().st_size if tmp.exists() else 0
            tmp.unlink(missing_ok=True)
            raise _cannot_store(path, size, exc) from None
        try:
            fd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def describe(self) -> dict[str, Any]:
        """Counts for ``/healthz``."""
        return {"keys_cached": self.cached, "keys_stored": self.stored,
                "cache_budget_bytes": self.budget}
