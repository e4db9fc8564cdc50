"""The quadratic FE scheme of Dufour-Sans, Gay and Pointcheval (2018) on BLS12-381.

Public-key functional encryption for ``x^T F x`` ("Reading in the Dark", ePrint 2018/206;
the same scheme is the one of Ryffel et al., NeurIPS 2019). With ``e: G1 x G2 -> GT`` and
generators ``g1, g2``:

* setup: ``s, t`` uniform in ``Z_r^N``; master secret ``(s, t)``; master public key
  ``(g1^s_i, g2^t_i)_i``.
* encrypt ``x``: ``gamma`` uniform, ``W`` uniform in ``GL2(Z_r)``;
  ``a_i = W^-T (x_i, gamma s_i)``, ``b_i = W (x_i, -t_i)``;
  ciphertext ``(g1^gamma, g1^a_i, g2^b_i)_i``, so that ``<a_i, b_j> = x_i x_j - gamma s_i t_j``.
* functional key for ``F``: ``g2^(s^T F t)``.
* decrypt: ``e(g1^gamma, g2^(s^T F t)) * prod_ij e(g1^a_i, g2^b_j)^F_ij = e(g1, g2)^(x^T F x)``,
  then a bounded discrete logarithm.

Decryption here never touches ``F`` entry by entry. The functions of a network prefix are
``F_c = sum_h post[c,h] u_h v_h^T + k_c e_0 e_0^T`` (``u_h`` a row of the first layer,
``v_h = q2 u_h + q1 e_0``), and by bilinearity
``prod_ij e(g1^a_i, g2^b_j)^F_ij = prod_h e(g1^(sum_i u_hi a_i), g2^(sum_j v_hj b_j))^post[c,h]
* e(g1^a_0, g2^b_0)^k_c``: project the ciphertext on each hidden unit (products of the
small integer weight matrix with the ciphertext's group elements, ``fe_common.tables``),
pair twice per unit, and let all outputs share those pairings. The value computed is the
one of the scheme as published, so its security is unchanged; only the work drops from
``N^2`` to ``2H + C + 2`` pairings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from secureinfer import codec
from secureinfer.errors import EnvelopeError

from ..fe_common.backend import pymcl
from ..fe_common.groups import (
    GroupOps,
    fr,
    group,
    group_order,
    pack_elements,
    random_scalar,
    unpack_elements,
)
from ..fe_common.tables import FixedBase, SmallMatVec
from .function import QuadraticFunction

__all__ = ["Ciphertext", "Decryptor", "MasterKey", "PublicKey", "encrypt", "functional_keys",
           "setup"]


@dataclass
class PublicKey:
    """The master public key ``(g1^s_i, g2^t_i)`` for vectors of ``size`` coordinates."""

    g1_s: list[Any]
    g2_t: list[Any]

    @property
    def size(self) -> int:
        """Coordinates of the encrypted vectors (the constant 1 included)."""
        return len(self.g1_s)

    def to_bytes(self) -> bytes:
        """Fixed-size encodings of every element."""
        return codec.pack_fields({"g1_s": pack_elements(group("G1"), self.g1_s),
                                  "g2_t": pack_elements(group("G2"), self.g2_t)})

    @classmethod
    def from_bytes(cls, data: bytes, size: int) -> PublicKey:
        """Parse and check a key for ``size`` coordinates; ``EnvelopeError`` if malformed."""
        fields = _fields(data, {"g1_s": bytes, "g2_t": bytes})
        return cls(unpack_elements(group("G1"), fields["g1_s"], size),
                   unpack_elements(group("G2"), fields["g2_t"], size))


@dataclass
class MasterKey:
    """The master secret ``(s, t)`` and its public key. Only the authority holds it."""

    s: list[int]
    t: list[int]
    public: PublicKey


def setup(size: int) -> MasterKey:
    """A fresh master key for vectors of ``size`` coordinates."""
    s = [random_scalar() for _ in range(size)]
    t = [random_scalar() for _ in range(size)]
    g1, g2 = group("G1"), group("G2")
    return MasterKey(s, t, PublicKey(FixedBase(g1, g1.generator()).pow_many(s),
                                     FixedBase(g2, g2.generator()).pow_many(t)))


@dataclass
class Ciphertext:
    """``(g1^gamma, g1^a_i, g2^b_i)``, the two coordinates of ``a_i`` and ``b_i`` apart."""

    c0: Any
    a: tuple[list[Any], list[Any]]
    b: tuple[list[Any], list[Any]]

    def to_bytes(self) -> bytes:
        """Fixed-size encodings of every element."""
        g1, g2 = group("G1"), group("G2")
        return codec.pack_fields({
            "c0": g1.to_bytes(self.c0),
            "a0": pack_elements(g1, self.a[0]), "a1": pack_elements(g1, self.a[1]),
            "b0": pack_elements(g2, self.b[0]), "b1": pack_elements(g2, self.b[1])})

    @classmethod
    def from_bytes(cls, data: bytes, size: int) -> Ciphertext:
        """Parse and check a ciphertext of ``size`` coordinates; ``EnvelopeError`` if not one."""
        f = _fields(data, dict.fromkeys(("c0", "a0", "a1", "b0", "b1"), bytes))
        g1, g2 = group("G1"), group("G2")
        return cls(g1.from_bytes(f["c0"]),
                   (unpack_elements(g1, f["a0"], size), unpack_elements(g1, f["a1"], size)),
                   (unpack_elements(g2, f["b0"], size), unpack_elements(g2, f["b1"], size)))


def _fields(data: bytes, spec: dict[str, type]) -> dict[str, Any]:
    """``unpack_fields`` with exactly the fields (and types) of ``spec``."""
    fields = codec.unpack_fields(data)
    if set(fields) != set(spec) or any(not isinstance(fields[k], t) for k, t in spec.items()):
        raise EnvelopeError(f"expected fields {sorted(spec)}, got {sorted(fields)}")
    return fields


def _random_invertible() -> tuple[list[list[int]], list[list[int]]]:
    """A uniform ``W`` in ``GL2(Z_r)`` and ``W^-T``."""
    r = group_order()
    while True:
        w = [[random_scalar(), random_scalar()], [random_scalar(), random_scalar()]]
        det = (w[0][0] * w[1][1] - w[0][1] * w[1][0]) % r
        if det:
            break
    inv = pow(det, -1, r)
    # (W^-1)^T = adj(W)^T / det
    w_inv_t = [[w[1][1] * inv % r, -w[1][0] * inv % r],
               [-w[0][1] * inv % r, w[0][0] * inv % r]]
    return w, w_inv_t


def _multiples(ops: GroupOps, base: Any, values: Sequence[int]) -> dict[int, Any]:
    """``v * base`` for every ``v`` of ``values`` (small integers), by repeated addition."""
    top = max((abs(v) for v in values), default=0)
    table = [ops.identity(), base]
    for _ in range(top - 1):
        table.append(ops.law(table[-1], base))
    return {v: (table[v] if v >= 0 else ops.inv(table[-v])) for v in set(values)}


def encrypt(public: PublicKey, x: Sequence[int]) -> Ciphertext:
    """Encrypt the integer vector ``x`` (its first coordinate is the constant 1).

    Costs ``2N`` G1 and ``2N`` G2 scalar multiplications for ``N`` coordinates (the
    ``x_i`` terms come from tables of small multiples).
    """
    if len(x) != public.size:
        raise ValueError(f"vector of {len(x)} coordinates for a key of {public.size}")
    g1, g2 = group("G1"), group("G2")
    gamma = random_scalar()
    w, m = _random_invertible()
    a: list[list[Any]] = []
    for row in m:  # a_i[k] = m[k][0] x_i + m[k][1] gamma s_i
        small = _multiples(g1, g1.pow(g1.generator(), row[0]), x)
        k = fr(row[1] * gamma)
        a.append([_add_small(g1, s * k, small[v]) for s, v in zip(public.g1_s, x)])
    b: list[list[Any]] = []
    for row in w:  # b_i[k] = w[k][0] x_i - w[k][1] t_i
        small = _multiples(g2, g2.pow(g2.generator(), row[0]), x)
        k = fr(-row[1])
        b.append([_add_small(g2, t * k, small[v]) for t, v in zip(public.g2_t, x)])
    return Ciphertext(g1.pow(g1.generator(), gamma), (a[0], a[1]), (b[0], b[1]))


def _add_small(ops: GroupOps, point: Any, small: Any) -> Any:
    """``point + small``, skipping a zero ``small``."""
    return point if small.is_zero() else ops.law(point, small)


def _key_exponents(msk: MasterKey, fn: QuadraticFunction) -> list[int]:
    """``s^T F_c t`` for every output ``c``, modulo the group order."""
    r = group_order()
    _, q1, q2 = fn.coeffs
    pre = fn.pre.astype(object)
    us = [int(v) % r for v in pre @ np.array(msk.s, dtype=object)]
    vt = [(q2 * int(u) + q1 * msk.t[0]) % r for u in pre @ np.array(msk.t, dtype=object)]
    per_unit = [u * v % r for u, v in zip(us, vt)]
    st0 = msk.s[0] * msk.t[0] % r
    return [(sum(int(c) * p for c, p in zip(row, per_unit)) + k * st0) % r
            for row, k in zip(fn.post.tolist(), fn.constant)]


def functional_keys(msk: MasterKey, fn: QuadraticFunction) -> list[Any]:
    """One G2 key ``g2^(s^T F_c t)`` per output ``c`` of ``fn``."""
    g2 = group("G2")
    return [g2.pow(g2.generator(), e) for e in _key_exponents(msk, fn)]


class Decryptor:
    """Computes ``e(g1, g2)^out_c`` for every output of ``fn`` from a ciphertext.

    Built once per server: the projection plans of the weight matrices and the keys.

    Args:
        fn: the quadratic functions.
        keys: their functional keys (one G2 element per output).
    """

    def __init__(self, fn: QuadraticFunction, keys: Sequence[Any]) -> None:
        if len(keys) != fn.outputs:
            raise EnvelopeError(f"{len(keys)} functional keys for {fn.outputs} outputs")
        self.fn = fn
        self.keys = list(keys)
        _, self._q1, self._q2 = fn.coeffs
        self._left = SmallMatVec(group("G1"), fn.pre)
        self._right = SmallMatVec(group("G2"), fn.pre) if self._q2 else None
        self._combine = SmallMatVec(group("GT"), fn.post)
        self._constant = fn.constant

    @property
    def pairings(self) -> int:
        """Pairings per decryption: two per hidden unit, one per output, two constant."""
        return 2 * self.fn.hidden + self.fn.outputs + 2

    def _right_side(self, b: list[Any]) -> list[Any]:
        """``g2^<v_h, b>`` for every unit, with ``v_h = q2 u_h + q1 e_0``."""
        g2 = group("G2")
        if self._right is None:
            return [g2.pow(b[0], self._q1)] * self.fn.hidden
        proj = self._right(b)
        if self._q2 != 1:
            proj = [g2.pow(q, self._q2) for q in proj]
        if self._q1:
            shift = g2.pow(b[0], self._q1)
            proj = [g2.law(q, shift) for q in proj]
        return proj

    def decrypt(self, ct: Ciphertext) -> list[Any]:
        """The GT elements ``e(g1, g2)^out_c``, one per output."""
        pairing, gt = pymcl().pairing, group("GT")
        units = [gt.identity()] * self.fn.hidden
        for a, b in zip(ct.a, ct.b):
            units = [u * pairing(p, q)
                     for u, p, q in zip(units, self._left(a), self._right_side(b))]
        const = pairing(ct.a[0][0], ct.b[0][0]) * pairing(ct.a[1][0], ct.b[1][0])
        starts = [pairing(ct.c0, key) * gt.pow(const, k)
                  for key, k in zip(self.keys, self._constant)]
        return self._combine(units, starts)
