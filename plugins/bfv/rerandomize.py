"""Output privacy for BFV (``bfv?rerandomize=true``): the server re-randomizes its outputs.

An output ciphertext ``(c0, c1)`` is a function of the weights and of the client's input
ciphertexts; the client, who knows its secret key and its inputs, could read that function
back. Before returning an output the server adds a fresh encryption of zero under the
client's public key, mod-switched to the output's level: ``c1`` becomes ``c1 + u p1 + e1``
with a fresh ternary ``u``, pseudorandom under RLWE, so the pair no longer shows how it was
computed. The server needs the client's public key for this (which the BFV server already
holds to encrypt constants): never a secret key.

What it does not hide: the decrypted noise itself (``Delta m + v``: the size of ``v``, the
noise budget, depends on the computation). The fresh encryption adds independent noise
of its own but does not flood ``v`` statistically: that needs a reserve of noise budget
the planner does not set aside yet (the README says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .backend import RAW, PrimeContext, new_contexts

__all__ = ["Rerandomizer"]


class Rerandomizer:
    """Adds a fresh public-key encryption of zero to output ciphertexts.

    Args:
        primes: one context per plaintext prime, holding the client's public key.
        drops: the coefficient primes the outputs have dropped (modulus switching).
    """

    def __init__(self, primes: Sequence[PrimeContext], drops: int) -> None:
        self.primes = list(primes)
        self.drops = int(drops)

    @classmethod
    def from_public_keys(cls, poly_degree: int, plain_moduli: Sequence[int],
                         coeff_bits: Sequence[int], public_keys: Sequence[bytes],
                         drops: int) -> "Rerandomizer":
        """Contexts with only the public keys (for a server whose workers run the layers)."""
        primes = new_contexts(poly_degree, plain_moduli, coeff_bits)
        for i, p in enumerate(primes):
            p.load_keys({"public_key": list(public_keys)}, i)
        return cls(primes, drops)

    def __repr__(self) -> str:
        return f"<bfv Rerandomizer {len(self.primes)} primes (public keys only)>"

    def apply(self, prime: int, ct: Any) -> Any:
        """``ct`` plus a fresh encryption of zero under prime ``prime``'s public key."""
        p = self.primes[prime]
        zero = p.encrypt(np.zeros(p.slots, np.int64))
        p.switch_down(zero, self.drops)
        return p.he.add(ct, zero, True)

    def apply_bytes(self, prime: int, blob: bytes) -> bytes:
        """``apply`` on a serialized ciphertext."""
        return self.apply(prime, self.primes[prime].load(blob)).to_bytes(RAW)
