"""Pyfhel (SEAL) behind a small interface: one BFV context per plaintext prime.

Everything here follows the plan: the client and the server each build the same contexts
from it (SEAL picks the coefficient primes deterministically from their sizes), so only
keys and ciphertexts travel, and SEAL validates each of them against the receiver's own
context when it loads them. Serialization is uncompressed (the cached Pyfhel wheel is
built without zlib and zstd).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from secureinfer.errors import BackendNotInstalledError, CompileError, EnvelopeError

__all__ = ["HE_STANDARD", "MAX_COEFF_BITS", "RAW", "PrimeContext", "backend", "centered",
           "key_bytes", "load_ciphertexts", "new_contexts", "security_source"]

EXTRA = "pip install secureinfer[bfv]"
RAW = "none"
"""Serialization compression: none (the cached Pyfhel wheel is built without zlib/zstd)."""

MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
"""Largest total coefficient modulus for 128-bit security (HomomorphicEncryption.org
standard, ternary secrets: the same table SEAL enforces)."""
HE_STANDARD = ("HomomorphicEncryption.org security standard (2018), 128-bit classical table, "
               "ternary-secret row")


def security_source(poly_degree: int, total_bits: int) -> str:
    """Where a plan's 128 bits come from (the planner never exceeds the table's bound)."""
    return (f"{HE_STANDARD} for N={poly_degree}: log q <= {MAX_COEFF_BITS[poly_degree]} bits "
            f"at 128 bits (the bound SEAL enforces); this plan: log q = {total_bits}")


def key_bytes(poly_degree: int, primes: int) -> int:
    """Bytes of one Galois key of one context, uncompressed (SEAL's headers aside):
    ``primes - 1`` key-switching components of two polynomials over all ``primes``
    coefficient primes (the special prime included)."""
    return (primes - 1) * 2 * poly_degree * primes * 8


def backend() -> Any:
    """The ``Pyfhel`` module, or ``BackendNotInstalledError`` naming the extra."""
    try:
        import Pyfhel
    except ImportError as exc:
        raise BackendNotInstalledError(
            f"the bfv scheme needs Pyfhel ({exc}): {EXTRA}") from None
    return Pyfhel


def centered(values: Any, t: int) -> np.ndarray:
    """Integers (int64 or Python ints) reduced into ``(-t/2, t/2]`` as int64."""
    arr = np.asarray(values)
    if arr.dtype == object:
        arr = np.array([int(v) % t for v in arr.reshape(-1)], dtype=np.int64).reshape(arr.shape)
    else:
        arr = np.mod(arr.astype(np.int64), t)
    return np.where(arr > t // 2, arr - t, arr).astype(np.int64)


@dataclass
class PrimeContext:
    """One BFV context: plaintext prime ``t``, its keys, and cached plaintexts.

    Attributes:
        he: the ``Pyfhel`` object (a server's holds no secret key).
        t: the plaintext prime.
    """

    he: Any
    t: int
    _constants: dict[int, Any] = field(default_factory=dict, repr=False)

    @property
    def slots(self) -> int:
        """Integer slots per ciphertext (``N``)."""
        return int(self.he.n)

    def encode(self, values: np.ndarray) -> Any:
        """A plaintext of ``N`` integers (reduced mod ``t``)."""
        return self.he.encodeInt(np.ascontiguousarray(centered(values, self.t)))

    def encode_constant(self, c: int) -> Any:
        """A plaintext with every slot ``c`` (reduced mod ``t``)."""
        return self.he.encodeInt(np.full(self.slots, self.signed(c), np.int64))

    def encrypt(self, values: np.ndarray) -> Any:
        """Encrypt ``N`` integers (with the public key)."""
        return self.he.encryptPtxt(self.encode(values))

    def signed(self, c: int) -> int:
        """``c mod t`` in ``(-t/2, t/2]``."""
        c = int(c) % self.t
        return c - self.t if c > self.t // 2 else c

    def plain_constant(self, c: int) -> Any:
        """The (cached) plaintext with every slot ``c``, for ``0 < c < t/2``."""
        if c not in self._constants:
            self._constants[c] = self.he.encodeInt(np.full(self.slots, c, np.int64))
        return self._constants[c]

    def times(self, ct: Any, c: int) -> Any | None:
        """A new ciphertext ``c * ct``; ``None`` when ``c = 0 (mod t)``.

        SEAL lifts a negative constant as ``t - |c|``, which costs ``log t`` bits of noise;
        multiplying by ``|c|`` and negating costs only ``log |c|``.
        """
        c = self.signed(c)
        if c == 0:
            return None
        out = ct.copy() if abs(c) == 1 else self.he.multiply_plain(
            ct, self.plain_constant(abs(c)), True)
        if c < 0:
            self.he.negate(out)
        return out

    def switch_down(self, ct: Any, times: int) -> None:
        """Drop ``times`` coefficient primes from ``ct`` (modulus switching), in place.

        Pyfhel 3.5 switches only CKKS and BGV ciphertexts, although SEAL switches BFV ones
        too; relabelling the ciphertext for the call reaches SEAL's BFV switch.
        """
        for _ in range(times):
            ct.scheme = "bgv"
            try:
                self.he.mod_switch_to_next_ctxt(ct)
            finally:
                ct.scheme = "bfv"

    def load_keys(self, keys: Mapping[str, Sequence[bytes]], i: int) -> None:
        """Load entry ``i`` of the ``public_key``, ``relin_key`` and ``rotate_key`` lists
        (those not empty); ``EnvelopeError`` when SEAL rejects one."""
        loaders = (("public_key", self.he.from_bytes_public_key),
                   ("relin_key", self.he.from_bytes_relin_key),
                   ("rotate_key", self.he.from_bytes_rotate_key))
        try:
            for field_name, load in loaders:
                if keys.get(field_name):
                    load(keys[field_name][i])
        except Exception as exc:  # noqa: BLE001 - Cython maps SEAL's errors to many types
            raise EnvelopeError(f"bfv public keys: malformed key for prime {self.t} "
                                f"({exc})") from None

    def ciphertext_size(self) -> int:
        """Bytes of a serialized fresh ciphertext: the size of every input ciphertext."""
        return len(self.encrypt(np.zeros(self.slots, np.int64)).to_bytes(RAW))

    def load(self, data: bytes) -> Any:
        """Parse one ciphertext; ``EnvelopeError`` when it is not one of this context."""
        Pyfhel = backend()
        try:
            ct = Pyfhel.PyCtxt(pyfhel=self.he, bytestring=bytes(data))
        except Exception as exc:  # noqa: BLE001 - Cython maps SEAL's errors to many types
            raise EnvelopeError(f"malformed BFV ciphertext ({exc})") from None
        if ct.size() != 2:
            raise EnvelopeError(f"malformed BFV ciphertext (size {ct.size()}, expected 2)")
        return ct


def new_contexts(poly_degree: int, plain_moduli: Sequence[int],
                 coeff_bits: Sequence[int]) -> list[PrimeContext]:
    """The plan's contexts, without keys. ``CompileError`` if SEAL rejects them."""
    Pyfhel = backend()
    if sum(coeff_bits) > MAX_COEFF_BITS[poly_degree]:
        raise CompileError(f"bfv: a {sum(coeff_bits)}-bit coefficient modulus is above the "
                           f"128-bit bound {MAX_COEFF_BITS[poly_degree]} for N={poly_degree}")
    out = []
    for t in plain_moduli:
        he = Pyfhel.Pyfhel()
        # sec=0: Pyfhel would otherwise replace the chain by SEAL's default one; the
        # bound above is the same check SEAL makes for 128-bit security.
        status = he.contextGen("bfv", n=poly_degree, t=int(t), sec=0, qi_sizes=list(coeff_bits))
        got = [q.bit_length() for q in he.get_qi()]
        if not status.startswith("success") or got != list(coeff_bits) or int(he.t) != t:
            raise CompileError(f"bfv: SEAL rejects N={poly_degree}, t={t}, "
                               f"coefficient primes of {list(coeff_bits)} bits: {status}")
        out.append(PrimeContext(he, int(t)))
    return out


def load_ciphertexts(contexts: Sequence[PrimeContext], blobs: Sequence[bytes],
                     per_prime: int, expected_size: int | None = None) -> list[list[Any]]:
    """``k * per_prime`` serialized ciphertexts (prime-major) -> ``[prime][i]``."""
    if len(blobs) != len(contexts) * per_prime:
        raise EnvelopeError(f"expected {len(contexts) * per_prime} BFV ciphertexts, "
                            f"got {len(blobs)}")
    out = []
    for i, ctx in enumerate(contexts):
        chunk = blobs[i * per_prime:(i + 1) * per_prime]
        if expected_size is not None and any(len(b) != expected_size for b in chunk):
            raise EnvelopeError("a BFV ciphertext has the wrong size for these parameters")
        out.append([ctx.load(b) for b in chunk])
    return out
