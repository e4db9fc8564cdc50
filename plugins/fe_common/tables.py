"""Precomputed tables that turn exponentiations into a few group operations.

Through Python, one G1 addition costs about 1 us and one full 255-bit G1 scalar
multiplication about 50 us (GT: 1.7 us and 150 us). Two structures of the FE schemes make
tables pay:

* ``FixedBase``: many exponents of the *same* base (``g``, ``r * g``, ...). The base is
  split into windows of ``w`` bits and ``d * 2**(w*k) * base`` is stored for every digit
  ``d``; ``base**e`` is then one group operation per nonzero digit (32 for w = 8).
* ``SmallMatVec``: the product ``out_j = sum_i A[j, i] * C_i`` of a fixed integer matrix
  ``A`` with a vector of group elements ``C`` (the decryption of inner-product FE, with
  ``A`` the quantized weights). Each element ``C_i`` gets its own windowed table of
  multiples ``d * 2**(c*k) * C_i``, with the window ``c`` chosen per column to minimise
  (table size + nonzero digits of the column's weights): small weights used by many
  outputs get a full table (one operation per weight); weights used by few outputs get
  a small window. Negative weights go to a second sum subtracted once per output.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Sequence

import numpy as np

from .groups import GroupOps, group_order

__all__ = ["FixedBase", "SmallMatVec"]

_SCALAR_BYTES = 32


def _digits(values: Sequence[int], window: int) -> np.ndarray:
    """``(n, 256 // window)`` little-endian base-``2**window`` digits of ``values mod r``."""
    r = group_order()
    raw = np.frombuffer(b"".join((int(v) % r).to_bytes(_SCALAR_BYTES, "little")
                                 for v in values), dtype=np.uint8)
    raw = raw.reshape(len(values), _SCALAR_BYTES)
    if window == 8:
        return raw.astype(np.int64)
    bits = np.unpackbits(raw, axis=1, bitorder="little").astype(np.int64)
    bits = bits.reshape(len(values), -1, window)
    return bits @ (1 << np.arange(window, dtype=np.int64))


class FixedBase:
    """``base**e`` for many exponents ``e`` (any integers, reduced mod r).

    Args:
        ops: the group.
        base: the fixed element.
        window: digit width in bits, 2, 4 or 8 (table of ``256/w * (2**w - 1)`` elements:
            8160 for w = 8, about 1.6 MB in G1).
    """

    def __init__(self, ops: GroupOps, base: Any, window: int = 8) -> None:
        if window not in (2, 4, 8):
            raise ValueError(f"window={window}: choose 2, 4 or 8 bits")
        self.ops = ops
        self.window = window
        self._per = (1 << window) - 1
        flat: list[Any] = []
        level = base
        for _ in range(8 * _SCALAR_BYTES // window):
            run = list(itertools.accumulate(itertools.repeat(level, self._per), ops.law))
            flat.extend(run)
            level = ops.law(run[-1], level)  # (2**w - 1 + 1) * level
        self._flat = flat

    def pow(self, exponent: int) -> Any:
        """``base**exponent``."""
        return self.pow_many([exponent])[0]

    def pow_many(self, exponents: Sequence[int]) -> list[Any]:
        """``[base**e for e in exponents]``, one group operation per nonzero digit."""
        if not len(exponents):
            return []
        digits = _digits(exponents, self.window)
        offsets = np.arange(digits.shape[1], dtype=np.int64) * self._per - 1
        get, law, one = self._flat.__getitem__, self.ops.law, self.ops.identity()
        out = []
        for row in digits:
            idx = (row + offsets)[row != 0]
            out.append(functools.reduce(law, map(get, idx.tolist()), one))
        return out


class SmallMatVec:
    """``out_j = sum_i A[j, i] * C_i`` for a fixed integer matrix ``A`` (group law written
    additively; in GT it is ``prod_i C_i ** A[j, i]``).

    Built once per matrix (the plan of windows and the index lists); each call builds the
    per-element tables for its ``C`` and sums. ``adds`` is the number of group operations
    one call costs.

    Args:
        ops: the group.
        matrix: ``(n_out, n_in)`` integers with ``|A| < 2**62``.
        max_window: the largest window tried per column, in bits.
    """

    def __init__(self, ops: GroupOps, matrix: np.ndarray, max_window: int = 8) -> None:
        a = np.asarray(matrix)
        if a.ndim != 2 or a.dtype.kind not in "iu":
            raise ValueError(f"SmallMatVec takes a 2-D integer matrix, got {a.dtype} {a.shape}")
        self.ops = ops
        self.shape = a.shape
        mag = np.abs(a.astype(np.int64))
        self._levels: list[list[tuple[int, int]]] = []  # per column: (doublings, entries)
        offsets: list[np.ndarray] = []  # per column: flat offset of each level's entry 1
        flat_size, table_adds = 0, 0
        windows = np.zeros(a.shape[1], dtype=np.int64)
        for i in range(a.shape[1]):
            col = mag[:, i]
            window = self._best_window(col[col != 0], max_window)
            windows[i] = window
            plan, offs, cost = self._column_plan(col, window, flat_size)
            self._levels.append(plan)
            offsets.append(offs)
            flat_size += sum(n for _, n in plan)
            table_adds += cost
        self.windows = windows
        self._pos, self._neg, term_adds = self._index_lists(a, mag, windows, offsets)
        self.adds = table_adds + term_adds

    @staticmethod
    def _best_window(col: np.ndarray, max_window: int) -> int:
        """The window ``c`` minimising table entries plus nonzero digits of ``col``."""
        if not col.size:
            return 1
        top = int(col.max()).bit_length()
        best, best_cost = 1, None
        for c in range(1, min(max_window, top) + 1):
            levels = -(-top // c)
            digits = [(col >> (c * k)) & ((1 << c) - 1) for k in range(levels)]
            cost = sum(int(d.max()) for d in digits) + c * (levels - 1) \
                + sum(int(np.count_nonzero(d)) for d in digits)
            if best_cost is None or cost < best_cost:
                best, best_cost = c, cost
        return best

    @staticmethod
    def _column_plan(col: np.ndarray, window: int,
                     start: int) -> tuple[list[tuple[int, int]], np.ndarray, int]:
        """Per level: doublings from the previous level's base and table entries."""
        nz = col[col != 0]
        top = int(nz.max()).bit_length() if nz.size else 0
        levels = -(-top // window) if top else 0
        plan, offs, cost, pos = [], [], 0, start
        for k in range(levels):
            entries = int(((nz >> (window * k)) & ((1 << window) - 1)).max())
            plan.append((window if k else 0, entries))
            offs.append(pos - 1)
            pos += entries
            cost += (window if k else 0) + max(entries - 1, 0)
        return plan, np.asarray(offs, dtype=np.int64), cost

    def _index_lists(self, a: np.ndarray, mag: np.ndarray, windows: np.ndarray,
                     offsets: list[np.ndarray]) -> tuple[list[list[int]], list[list[int]], int]:
        pos: list[list[int]] = [[] for _ in range(a.shape[0])]
        neg: list[list[int]] = [[] for _ in range(a.shape[0])]
        for i in range(a.shape[1]):
            rows = np.flatnonzero(mag[:, i])
            c = int(windows[i])
            for k, off in enumerate(offsets[i].tolist()):
                d = (mag[rows, i] >> (c * k)) & ((1 << c) - 1)
                keep = d != 0
                for j, idx, negative in zip(rows[keep].tolist(), (d[keep] + off).tolist(),
                                            (a[rows[keep], i] < 0).tolist()):
                    (neg if negative else pos)[j].append(idx)
        adds = sum(len(p) + len(n) + (1 if n else 0) for p, n in zip(pos, neg))
        return pos, neg, adds

    def _tables(self, bases: Sequence[Any]) -> list[Any]:
        law = self.ops.law
        flat: list[Any] = []
        for base, plan in zip(bases, self._levels):
            level = base
            for doublings, entries in plan:
                for _ in range(doublings):
                    level = law(level, level)
                flat.extend(itertools.accumulate(itertools.repeat(level, entries), law))
        return flat

    def __call__(self, bases: Sequence[Any], start: Sequence[Any] | None = None) -> list[Any]:
        """``[start_j + sum_i A[j, i] * bases[i] for j]`` (``start`` defaults to identity)."""
        if len(bases) != self.shape[1]:
            raise ValueError(f"expected {self.shape[1]} group elements, got {len(bases)}")
        ops, law = self.ops, self.ops.law
        get = self._tables(bases).__getitem__
        starts = start if start is not None else itertools.repeat(ops.identity())
        out = []
        for s, p, n in zip(starts, self._pos, self._neg):
            acc = functools.reduce(law, map(get, p), s)
            if n:
                acc = law(acc, ops.inv(functools.reduce(law, map(get, n), ops.identity())))
            out.append(acc)
        return out
