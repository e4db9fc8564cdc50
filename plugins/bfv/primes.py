"""Batching-friendly plaintext primes and the Chinese remainder theorem.

BFV batching needs a prime plaintext modulus ``t`` with ``t = 1 (mod 2N)``. One prime holds
at most about 60 bits, and the noise budget usually allows far fewer, so a network whose
outputs need more bits runs once per prime ``t_1 .. t_k`` and the client recombines the
residues with the CRT (as CryptoNets did).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

__all__ = ["batching_primes", "choose_plain_moduli", "crt_combine", "is_prime",
           "largest_batching_primes", "plain_moduli"]

_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
MAX_PLAIN_BITS = 60
"""SEAL's largest plaintext modulus."""


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every ``n < 3.3 * 10**24``."""
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def batching_primes(poly_degree: int, min_bits: int) -> Iterator[int]:
    """Primes ``t = 1 (mod 2 * poly_degree)`` of at least ``min_bits`` bits, ascending.

    Ascending from the bottom of the range keeps them apart from SEAL's coefficient primes,
    which it takes from the top of theirs.
    """
    step = 2 * poly_degree
    k = max(1, -(-(2 ** (min_bits - 1) - 1) // step))
    while True:
        t = k * step + 1
        if t.bit_length() > MAX_PLAIN_BITS:
            return
        if is_prime(t):
            yield t
        k += 1


def largest_batching_primes(poly_degree: int, max_bits: int, count: int) -> list[int]:
    """Up to ``count`` of the largest primes ``t = 1 (mod 2 * poly_degree)`` of at most
    ``max_bits`` bits, descending (fewer when fewer exist)."""
    step = 2 * poly_degree
    found: list[int] = []
    k = (2 ** min(max_bits, MAX_PLAIN_BITS) - 2) // step
    while k >= 1 and len(found) < count:
        if is_prime(k * step + 1):
            found.append(k * step + 1)
        k -= 1
    return found


def plain_moduli(poly_degree: int, bound: int, count: int, max_bits: int,
                 min_bits: int | None = None) -> list[int] | None:
    """The smallest ``count`` batching primes whose product exceeds ``2 * bound``.

    Every value in ``[-bound, bound]`` is then recovered exactly from its residues.

    Args:
        poly_degree: the BFV ring degree ``N``.
        bound: the largest ``|integer|`` the network can output.
        count: how many primes (BFV contexts).
        max_bits: the largest prime the noise budget allows, in bits.
        min_bits: the smallest prime size to use (the default: as small as will do).

    Returns:
        The primes, or ``None`` when ``count`` primes of ``max_bits`` bits cannot hold
        ``bound``.
    """
    need = (2 * int(bound) + 1).bit_length()
    size = max(-(-need // count) + 1, min_bits or 2)
    if size > max_bits:
        return None
    primes: list[int] = []
    for t in batching_primes(poly_degree, size):
        if t.bit_length() > max_bits:
            return None
        primes.append(t)
        if len(primes) == count:
            return primes if math.prod(primes) > 2 * bound else None
    return None


def choose_plain_moduli(poly_degree: int, bound: int, max_bits: int, max_primes: int,
                        min_bits: int | None = None) -> list[int] | None:
    """The fewest primes of at most ``max_bits`` bits (see ``plain_moduli``) holding
    ``bound``, or ``None`` when ``max_primes`` do not."""
    for count in range(1, max_primes + 1):
        primes = plain_moduli(poly_degree, bound, count, max_bits, min_bits)
        if primes is not None:
            return primes
    return None


def crt_combine(residues: Sequence[np.ndarray], moduli: Sequence[int]) -> np.ndarray:
    """The centered integers (``|y| < prod / 2``) with the given residues, as an object array."""
    product = 1
    for t in moduli:
        product *= int(t)
    total = np.zeros(np.shape(residues[0]), dtype=object)
    for r, t in zip(residues, moduli):
        t = int(t)
        rest = product // t
        coef = rest * pow(rest % t, -1, t)
        total = total + np.asarray(r).astype(object) * coef
    total = total % product
    return np.where(total > product // 2, total - product, total)
