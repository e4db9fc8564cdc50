"""Bounded discrete logarithms by baby-step giant-step, with the table cached on disk.

Both FE schemes end with ``g**v`` (``v * g`` in additive notation) for an integer ``v``
known to lie in ``[-B, B]``: inner-product FE in G1, quadratic FE in GT. This module
finds ``v``, for any group with a ``GroupOps`` adapter (``fe_common.groups``)::

    from secureinfer.plugins.fe_common.groups import group
    from secureinfer.plugins.fe_common.dlog import DlogTable, DlogOutOfRange

    ops = group("G1")                          # or group("GT")
    table = DlogTable(ops, ops.generator(), bound=B)   # loads or builds the table
    v = table.solve(element)                   # int in [-B, B]
    vs = table.solve_many(elements)            # np.ndarray of int64, one per element
    # DlogOutOfRange (a secureinfer.errors.RangeError) when no v in [-B, B] fits;
    # its ``index`` says which element of ``solve_many`` failed.

Method. The baby-step table holds ``j * g`` for ``j`` in ``[0, m)``, ``m = 2**table_bits``:
a 16-byte BLAKE2b digest of each element's serialization, split into a sorted uint64 key
(looked up with ``np.searchsorted``) and a uint64 check that removes false matches, and
``j``. To
solve ``h``, the giant steps walk ``h + (m/2) g - t m g`` for ``t = 0, 1, -1, 2, -2, ...``
(values near zero, where network outputs concentrate, come first) until a key matches;
then ``v = j + t m - m/2``. ``solve_many`` walks every element in lockstep and looks all of
them up with one ``searchsorted`` per step. A search stops after the last step that can
reach ``[-B, B]`` (at most ``max_steps``, about ``2B/m + 1``): an out-of-range value raises
``DlogOutOfRange`` instead of searching forever, and so does a match outside ``[-B, B]``.

Table size. By default the smallest power of two giving at most ``target_steps`` (8)
giant steps in the worst case, within ``[2**8, 2**max_table_bits]`` (``max_table_bits``
22 by default: 4M entries, 80 MB on disk and in memory). Building costs one group
operation, one serialization and one hash per entry (5-10 us in G1, where serializing
normalizes the point with a field inversion: 20-40 s for 2**22, once per machine); a
giant step costs the same per element.

Cache. The table depends only on the group, the generator and ``m``, not on ``B``: it is
built once, kept in memory for the life of the process and stored as
``<cache>/dlog/<group>-<16 hex digits of sha256(generator)>-<table_bits>.npz``: numpy
arrays read with ``allow_pickle=False`` (nothing is unpickled), where ``<cache>`` is
``$SECUREINFER_CACHE_DIR`` or else ``platformdirs.user_cache_dir("secureinfer")``. A file
that does not parse, is not sorted or fails a spot check of a few entries is rebuilt; a
cache directory that cannot be written only costs the rebuild next time.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from secureinfer.errors import RangeError

from .groups import GroupOps

__all__ = ["CACHE_ENV_VAR", "DlogOutOfRange", "DlogTable", "cache_dir", "max_giant_steps",
           "table_bits_for"]

CACHE_ENV_VAR = "SECUREINFER_CACHE_DIR"
_FORMAT_VERSION = 1
_MIN_BITS = 8
_CHUNK = 1 << 15
_SPOT_CHECKS = 4


class DlogOutOfRange(RangeError):
    """No ``v`` in ``[-bound, bound]`` has ``g**v`` equal to the element.

    Attributes:
        index: position of the element in the ``solve_many`` call.
        bound: the bound ``B`` searched.
    """

    def __init__(self, message: str, *, index: int, bound: int) -> None:
        super().__init__(message)
        self.index = index
        self.bound = bound


def cache_dir() -> Path:
    """Where the tables live: ``$SECUREINFER_CACHE_DIR/dlog`` or the user cache's ``dlog``."""
    root = os.environ.get(CACHE_ENV_VAR)
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("secureinfer")
    return Path(root) / "dlog"


def table_bits_for(bound: int, target_steps: int = 8, max_table_bits: int = 22) -> int:
    """log2 of the table size that solves ``[-bound, bound]`` in ``target_steps`` steps."""
    need = (2 * int(bound) + 1) / max(1, int(target_steps))
    bits = math.ceil(math.log2(need)) if need > 1 else 0
    return int(min(max(bits, _MIN_BITS), max_table_bits))


def max_giant_steps(bound: int, table_bits: int) -> int:
    """Giant steps of the longest search (an out-of-range element) for ``[-bound, bound]``."""
    m = 1 << int(table_bits)
    return 1 + (int(bound) + m // 2) // m - (m // 2 - int(bound)) // m


@dataclass(frozen=True)
class _Baby:
    """The baby steps: sorted primary keys, their checks and exponents."""

    keys: np.ndarray    # uint64, strictly increasing
    checks: np.ndarray  # uint64
    exps: np.ndarray    # uint32 (j of j * g)


_MEMORY: dict[tuple[str, bytes, int], _Baby] = {}


def _key_pairs(blobs: list[bytes]) -> np.ndarray:
    """``(n, 2)`` uint64: a 16-byte BLAKE2b digest of each serialization, as key and check.

    A digest of the whole serialization, not a slice of it: an element and its inverse
    share their leading bytes (the x coordinate in G1, the first half in GT).
    """
    digests = b"".join(hashlib.blake2b(b, digest_size=16).digest() for b in blobs)
    return np.frombuffer(digests, dtype="<u8").reshape(len(blobs), 2)


class DlogTable:
    """Solves ``g**v = h`` for ``v`` in ``[-bound, bound]`` (see the module docstring).

    Args:
        ops: the group's adapter (``group("G1")``, ``group("GT")``).
        generator: ``g``.
        bound: ``B``; results lie in ``[-B, B]``.
        table_bits: log2 of the baby-step table size; by default from ``bound``.
        target_steps: worst-case giant steps the default table size aims at.
        max_table_bits: the largest default table (the memory and build-time cap).
        cache: a directory for the table files (default ``cache_dir()``); ``False``
            keeps the table in memory only.

    Attributes:
        table_bits, table_size: the baby-step table is ``2**table_bits`` entries.
        max_steps: giant steps of the longest search (an out-of-range element).
        cache_path: the table file (``None`` without a disk cache).
        source: where the table came from: ``"memory"``, ``"disk"`` or ``"built"``.
    """

    def __init__(self, ops: GroupOps, generator: Any, bound: int, *,
                 table_bits: int | None = None, target_steps: int = 8,
                 max_table_bits: int = 22, cache: str | Path | bool | None = None) -> None:
        if int(bound) < 0:
            raise ValueError(f"discrete-log bound must be >= 0, got {bound}")
        self.ops = ops
        self.generator = generator
        self.bound = int(bound)
        self.table_bits = int(table_bits if table_bits is not None
                              else table_bits_for(self.bound, target_steps, max_table_bits))
        if not 1 <= self.table_bits <= 32:
            raise ValueError(f"table_bits={self.table_bits} is outside 1..32")
        self.table_size = 1 << self.table_bits
        m, half = self.table_size, self.table_size // 2
        self._t_min = (half - self.bound) // m
        self._t_max = (self.bound + half) // m
        self.max_steps = max_giant_steps(self.bound, self.table_bits)
        self._gen_bytes = ops.to_bytes(generator)
        self._shift = ops.pow(generator, half)
        self._giant = ops.pow(generator, m)
        self._giant_inv = ops.inv(self._giant)
        if cache is False:
            self.cache_path: Path | None = None
        else:
            folder = cache_dir() if cache in (None, True) else Path(cache)
            digest = hashlib.sha256(self._gen_bytes).hexdigest()[:16]
            self.cache_path = folder / f"{ops.name}-{digest}-{self.table_bits}.npz"
        self._baby, self.source = self._obtain()

    def __repr__(self) -> str:
        return (f"DlogTable({self.ops.name}, bound={self.bound}, "
                f"table=2**{self.table_bits}, max_steps={self.max_steps})")

    # ----- the table -------------------------------------------------------------------

    def _obtain(self) -> tuple[_Baby, str]:
        mem_key = (self.ops.name, self._gen_bytes, self.table_bits)
        if mem_key in _MEMORY:
            return _MEMORY[mem_key], "memory"
        baby = self._load()
        source = "disk"
        if baby is None:
            baby, source = self._build(), "built"
            self._save(baby)
        _MEMORY[mem_key] = baby
        return baby, source

    def _build(self) -> _Baby:
        ops, m = self.ops, self.table_size
        pairs = np.empty((m, 2), dtype=np.uint64)
        cur = ops.identity()
        for start in range(0, m, _CHUNK):
            n = min(_CHUNK, m - start)
            run = list(itertools.accumulate(itertools.repeat(self.generator, n), ops.law,
                                            initial=cur))
            pairs[start:start + n] = _key_pairs([ops.to_bytes(e) for e in run[:n]])
            cur = run[n]
        order = np.argsort(pairs[:, 0], kind="stable")
        return _Baby(np.ascontiguousarray(pairs[order, 0]),
                     np.ascontiguousarray(pairs[order, 1]), order.astype(np.uint32))

    def _load(self) -> _Baby | None:
        path = self.cache_path
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["version"][0])
                gen = data["generator"].tobytes()
                baby = _Baby(data["keys"], data["checks"], data["exps"])
        except (OSError, ValueError, KeyError, IndexError):
            return None
        if version != _FORMAT_VERSION or gen != self._gen_bytes or not self._valid(baby):
            return None
        return baby

    def _valid(self, baby: _Baby) -> bool:
        m = self.table_size
        arrays = (baby.keys, baby.checks, baby.exps)
        if any(a.shape != (m,) for a in arrays) or baby.keys.dtype != np.uint64 \
                or baby.checks.dtype != np.uint64 or baby.exps.dtype != np.uint32:
            return False
        if not np.all(baby.keys[1:] >= baby.keys[:-1]) or int(baby.exps.max()) >= m:
            return False
        rng = np.random.default_rng()
        for pos in rng.integers(0, m, size=_SPOT_CHECKS):
            elem = self.ops.pow(self.generator, int(baby.exps[pos]))
            pair = _key_pairs([self.ops.to_bytes(elem)])[0]
            if pair[0] != baby.keys[pos] or pair[1] != baby.checks[pos]:
                return False
        return True

    def _save(self, baby: _Baby) -> None:
        path = self.cache_path
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.savez(fh, version=np.array([_FORMAT_VERSION], dtype=np.int64),
                             generator=np.frombuffer(self._gen_bytes, dtype=np.uint8),
                             keys=baby.keys, checks=baby.checks, exps=baby.exps)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:
            warnings.warn(f"could not cache the discrete-log table in {path.parent}: {exc} "
                          f"(set {CACHE_ENV_VAR} to a writable directory)", stacklevel=3)

    # ----- solving ---------------------------------------------------------------------

    def _lookup(self, elements: list[Any]) -> np.ndarray:
        """``j`` with ``j * g == element`` for table members, ``-1`` for the others."""
        baby = self._baby
        pairs = _key_pairs([self.ops.to_bytes(e) for e in elements])
        key, check = pairs[:, 0], pairs[:, 1]
        pos = np.searchsorted(baby.keys, key)
        pos_c = np.minimum(pos, self.table_size - 1)
        hit = baby.keys[pos_c] == key
        ok = hit & (baby.checks[pos_c] == check)
        found = np.where(ok, baby.exps[pos_c].astype(np.int64), -1)
        for i in np.flatnonzero(hit & ~ok):  # equal primary keys: rare, scan them all
            stop = np.searchsorted(baby.keys, key[i], side="right")
            same = np.flatnonzero(baby.checks[pos[i]:stop] == check[i])
            if same.size:
                found[i] = int(baby.exps[pos[i] + same[0]])
        return found

    def solve(self, element: Any) -> int:
        """The ``v`` in ``[-bound, bound]`` with ``g**v == element``.

        Raises:
            DlogOutOfRange: no such ``v``.
        """
        return int(self.solve_many([element])[0])

    def solve_many(self, elements: Iterable[Any]) -> np.ndarray:
        """``solve`` for every element, walked in lockstep; an int64 array.

        Raises:
            DlogOutOfRange: for the first element (``index``) with no ``v`` in range.
        """
        elems = list(elements)
        out = np.zeros(len(elems), dtype=np.int64)
        law, m, half = self.ops.law, self.table_size, self.table_size // 2
        up = {i: law(e, self._shift) for i, e in enumerate(elems)}
        down = dict(up)
        pending = list(range(len(elems)))
        for step in range(max(self._t_max, -self._t_min) + 1):
            if not pending:
                break
            owners: list[tuple[int, int]] = []
            walkers: list[Any] = []
            if step <= self._t_max:
                for i in pending:
                    if step:
                        up[i] = law(up[i], self._giant_inv)
                    owners.append((i, step))
                    walkers.append(up[i])
            if step and -step >= self._t_min:
                for i in pending:
                    down[i] = law(down[i], self._giant)
                    owners.append((i, -step))
                    walkers.append(down[i])
            done = set()
            for (i, t), j in zip(owners, self._lookup(walkers)):
                if j >= 0 and i not in done:
                    out[i] = self._accept(i, int(j) + t * m - half)
                    done.add(i)
            pending = [i for i in pending if i not in done]
        if pending:
            i = pending[0]
            raise DlogOutOfRange(
                f"discrete logarithm of element {i} (and {len(pending) - 1} more) is not in "
                f"[-{self.bound}, {self.bound}] ({self.max_steps} giant steps of "
                f"2**{self.table_bits} searched): the value exceeds the bound it was planned "
                "for (an input outside the calibrated range, or mismatched keys)",
                index=i, bound=self.bound)
        return out

    def _accept(self, index: int, value: int) -> int:
        if abs(value) > self.bound:
            raise DlogOutOfRange(
                f"discrete logarithm of element {index} is {value}, outside "
                f"[-{self.bound}, {self.bound}]: the value exceeds the bound it was "
                "planned for (an input outside the calibrated range)",
                index=index, bound=self.bound)
        return value
