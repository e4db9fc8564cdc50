"""Output privacy for BFV (``bfv?rerandomize=true&flood_bits=N``): the server sanitizes outputs.

What a decryption shows. An output ciphertext ``(c0, c1)`` at data modulus ``q`` decrypts
to ``c0 + c1 s = Delta m + v (mod q)``: ``m`` holds the result in some slots and other
values of the computation (partial sums, rotated copies, the network on zero inputs) in
the rest, ``v`` is the evaluation's noise, and ``c1`` is a function of the weights and of
the client's input ciphertexts. Before returning an output the server (public key only):

1. adds a fresh encryption of zero under the client's public key, mod-switched to the
   output's level: ``c1`` becomes ``c1 + u p1 + e1`` with a fresh ternary ``u``,
   pseudorandom under RLWE, so the pair no longer shows how it was computed;
2. adds a plaintext holding independent uniform values mod ``t`` (``os.urandom``, by
   rejection) in every slot that is not a result slot, so those slots show nothing;
3. with ``flood_bits = lambda > 0``, adds to ``c0`` a polynomial ``F`` whose ``N``
   coefficients are independent uniform integers in ``[-2^b, 2^b)`` (``os.urandom``;
   ``wire`` rewrites the serialized coefficients, mod each ``q_j`` of the output level).

The argument. The client sees ``Delta m + v + F`` (``v`` now includes the zero's noise).
A simulator that knows only the result draws ``Delta m' + F`` (``m'``: the result, uniform
elsewhere). Coefficient by coefficient, a uniform variable on ``2^(b+1)`` integers shifted
by ``|v_i|`` is at statistical distance ``|v_i| / 2^(b+1)`` from the unshifted one, so the
whole polynomial is within ``N ||v|| / 2^(b+1)``. The planner (``planner``) bounds
``||v|| <= q / (2t) * 2^-budget`` with its noise model's budget estimate before the flood
and picks ``b = ceil(log2 ||v|| + lambda + log2 N)``: the distance is at most
``2^-(lambda + 1)`` per output ciphertext (``k`` outputs: ``k 2^-(lambda + 1)``). The
guarantee is relative to that estimate (``noise``: measured per-operation losses, rounded
up), not to a proven worst case. The flood costs ``lambda + log2 N + 2`` bits of budget,
which the planner reserves at the output; the budget a client then measures is set by
``b`` (``plan["noise_budget_left_bits"]``), whatever the weights.

With ``flood_bits=0`` only steps 1 and 2 run: the decrypted noise (its size, the noise
budget) still depends on the computation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import wire
from .backend import RAW, PrimeContext, new_contexts

__all__ = ["DEFAULT_FLOOD_BITS", "Rerandomizer", "flood_residues", "uniform_below"]

DEFAULT_FLOOD_BITS = 40
"""The statistical security of the flood when ``flood_bits`` is unset and outputs are
protected."""
_MAX_MODULUS_BITS = 60  # a residue shifted by 4 bits stays below 2^64


def flood_residues(bits: int, count: int, moduli: Sequence[int]) -> np.ndarray:
    """Residues mod each of ``moduli`` of ``count`` independent uniform integers in
    ``[-2^bits, 2^bits)`` from ``os.urandom``: ``(len(moduli), count)`` u64.

    Each integer is ``bits + 1`` random bits (big-endian bytes, the top byte masked)
    minus ``2^bits``, reduced by Horner's rule a byte at a time (four bits for a modulus
    above 56 bits; every modulus has at most 60, so no intermediate value reaches 2^64).
    """
    width = bits + 1
    nbytes = -(-width // 8)
    raw = np.frombuffer(os.urandom(nbytes * count), dtype=np.uint8).reshape(count, nbytes)
    raw = raw.copy()
    raw[:, 0] &= (1 << (width - 8 * (nbytes - 1))) - 1
    out = np.empty((len(moduli), count), dtype=np.uint64)
    for j, q in enumerate(int(m) for m in moduli):
        if q.bit_length() > _MAX_MODULUS_BITS:
            raise ValueError(f"bfv flood: a {q.bit_length()}-bit coefficient prime is above "
                             f"{_MAX_MODULUS_BITS} bits")
        r, mod = np.zeros(count, dtype=np.uint64), np.uint64(q)
        for byte in raw.T.astype(np.uint64):
            if q.bit_length() <= 56:  # a whole byte at a time
                r = ((r << np.uint64(8)) | byte) % mod
            else:
                r = ((r << np.uint64(4)) | (byte >> np.uint64(4))) % mod
                r = ((r << np.uint64(4)) | (byte & np.uint64(15))) % mod
        out[j] = (r + np.uint64(q - pow(2, bits, q))) % mod
    return out


def uniform_below(t: int, count: int) -> np.ndarray:
    """``count`` independent uniform integers in ``[0, t)`` from ``os.urandom`` (rejection
    sampling on ``t.bit_length()``-bit draws), as int64."""
    shift = np.uint64(64 - int(t).bit_length())
    out = np.empty(0, dtype=np.uint64)
    while len(out) < count:
        need = count - len(out)
        draw = np.frombuffer(os.urandom(8 * 2 * need), dtype=np.uint64) >> shift
        out = np.concatenate([out, draw[draw < np.uint64(t)][:need]])
    return out.astype(np.int64)


class Rerandomizer:
    """Re-randomizes, slot-masks and (with ``flood_log2``) noise-floods output ciphertexts.

    Args:
        primes: one context per plaintext prime, holding the client's public key.
        drops: the coefficient primes the outputs have dropped (modulus switching).
        flood_log2: ``b``: flood coefficients are uniform in ``[-2^b, 2^b)``; ``None``: no
            flood.
    """

    def __init__(self, primes: Sequence[PrimeContext], drops: int,
                 flood_log2: int | None = None) -> None:
        self.primes = list(primes)
        self.drops = int(drops)
        self.flood_log2 = flood_log2

    @classmethod
    def from_public_keys(cls, poly_degree: int, plain_moduli: Sequence[int],
                         coeff_bits: Sequence[int], public_keys: Sequence[bytes],
                         drops: int, flood_log2: int | None = None) -> "Rerandomizer":
        """Contexts with only the public keys (for a server whose workers run the layers)."""
        primes = new_contexts(poly_degree, plain_moduli, coeff_bits)
        for i, p in enumerate(primes):
            p.load_keys({"public_key": list(public_keys)}, i)
        return cls(primes, drops, flood_log2)

    def __repr__(self) -> str:
        flood = f", flood 2^{self.flood_log2}" if self.flood_log2 is not None else ""
        return f"<bfv Rerandomizer {len(self.primes)} primes{flood} (public keys only)>"

    def apply(self, prime: int, ct: Any, keep: np.ndarray | None = None) -> bytes:
        """``ct`` plus a fresh encryption of zero under prime ``prime``'s public key, uniform
        values in every slot outside ``keep`` (``None``: keep every slot), and the flood;
        serialized."""
        p = self.primes[prime]
        zero = p.encrypt(np.zeros(p.slots, np.int64))
        p.switch_down(zero, self.drops)
        out = p.he.add(ct, zero, True)
        if keep is not None:
            mask = uniform_below(p.t, p.slots)
            mask[keep] = 0
            p.he.add_plain(out, p.encode(mask), False)
        blob = out.to_bytes(RAW)
        return blob if self.flood_log2 is None else self._flood(p, blob)

    def apply_bytes(self, prime: int, blob: bytes, keep: np.ndarray | None = None) -> bytes:
        """``apply`` on a serialized ciphertext."""
        return self.apply(prime, self.primes[prime].load(blob), keep)

    def _flood(self, p: PrimeContext, blob: bytes) -> bytes:
        """Add the flood polynomial to ``c0`` of a serialized ciphertext (every coefficient
        stays reduced mod its prime, so the bytes stay valid; the client's SEAL checks them
        when it loads them)."""
        bits = int(self.flood_log2 or 0)
        moduli = [int(q) for q in p.he.get_qi()][:-1]  # the data primes (the last: special)
        limbs = len(moduli) - self.drops
        ct = wire.parse(blob, p.slots, limbs)
        qs = np.asarray(moduli[:limbs], dtype=np.uint64)[:, None]
        ct.data[0] = (ct.data[0] + flood_residues(bits, p.slots, moduli[:limbs])) % qs
        return ct.dump()
