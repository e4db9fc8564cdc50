"""A conservative model of the BFV invariant noise budget, in bits.

SEAL reports the *invariant noise budget* of a ciphertext: decryption is correct while it is
above zero. The planner simulates the budget through the network with the per-operation
costs below, measured with Pyfhel 3.5 / SEAL 4.1 (``N`` = 4096 to 32768, ``t`` = 16 to 60
bits) and rounded up:

======================================  ===========================  ===============
operation                               measured loss                model
======================================  ===========================  ===============
fresh encryption (data modulus ``Q``)   ``Q - log t - 8`` left       same
ciphertext x general plaintext          ``log t + 4 .. 6``           ``log t + log N / 2``
ciphertext x constant ``0 < c``         ``log c``                    same
ciphertext x ciphertext + relinearize   ``log t + 12 .. 14``         ``log t + log N / 2 + 8``
``r`` rotations                         3 on a fresh ciphertext      adds ``r`` noises of budget ``Q - log t - 13.5``
sum of ``m`` products                   ``0.5 log m``                ``0.5 log m + 1.5``
modulus switch to ``Q'``                0 while the budget fits      adds a noise of budget ``Q' - log t - 8.5``
======================================  ===========================  ===============

Rotations and modulus switching *add* a fixed noise (key switching, rounding): the budget
after them is ``-log2(2**-b + r * 2**-floor)``, which matters once modulus switching has
brought the budget near the floor.

A negative constant costs ``log t`` in SEAL (it is lifted as ``t - |c|``), so constants are
applied as ``|c|`` followed by a negation or subtraction. The plan keeps ``MARGIN`` bits at
the end, and the client checks the real budget of every output before decoding it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MARGIN", "NoiseModel"]

MARGIN = 6.0
"""Bits of budget the plan keeps after the last layer."""

_FRESH_LOSS = 8.0
_SWITCH_LOSS = 8.5
_KEYSWITCH_FLOOR = 13.5


@dataclass(frozen=True)
class NoiseModel:
    """Budget arithmetic for one ring degree and plaintext size.

    Attributes:
        poly_degree: the ring degree ``N``.
        t_bits: ``log2`` of the largest plaintext prime.
    """

    poly_degree: int
    t_bits: float

    @property
    def _half_log_n(self) -> float:
        return math.log2(self.poly_degree) / 2

    def fresh(self, q_bits: float) -> float:
        """Budget of a fresh encryption under a data modulus of ``q_bits`` bits."""
        return q_bits - self.t_bits - _FRESH_LOSS

    def plain_products(self, budget: float, terms: int) -> float:
        """After a sum of ``terms`` ciphertext x general-plaintext products."""
        return budget - self.t_bits - self._half_log_n - _sum_loss(terms)

    def constant_products(self, budget: float, l1_norm: int) -> float:
        """After ``sum_j c_j x_j`` with integer constants of total ``sum |c_j| = l1_norm``."""
        return budget - math.log2(max(int(l1_norm), 1)) - 1.0

    def constant(self, budget: float, c: int) -> float:
        """After one product by the constant ``c`` (reduced mod ``t``: at most ``t / 2``)."""
        if abs(c) <= 1:
            return budget
        return budget - min(math.log2(abs(c)), self.t_bits - 1)

    def multiply(self, a: float, b: float) -> float:
        """After a ciphertext x ciphertext product and relinearization."""
        return min(a, b) - self.t_bits - self._half_log_n - 8.0

    def rotate(self, budget: float, q_bits: float, count: int) -> float:
        """After ``count`` rotations (key switching adds a fixed noise each)."""
        return _add_noise(budget, q_bits - self.t_bits - _KEYSWITCH_FLOOR, count)

    def switch(self, budget: float, q_bits: float) -> float:
        """After switching down to a data modulus of ``q_bits`` bits (rounding noise)."""
        return _add_noise(budget, q_bits - self.t_bits - _SWITCH_LOSS, 1)


def _add_noise(budget: float, floor: float, count: int) -> float:
    if count <= 0:
        return budget
    return -math.log2(2.0 ** -budget + count * 2.0 ** -floor)


def _sum_loss(terms: int) -> float:
    return 0.5 * math.log2(terms) + 1.5 if terms > 1 else 0.0
