"""SEAL's uncompressed ciphertext serialization, read and rewritten coefficient by coefficient.

Pyfhel exposes no coefficient access, so the server's output flood (``rerandomize``) edits a
ciphertext's bytes. SEAL 4.1 writes a ciphertext (``compr_mode_type::none``) as:

=======  ==================================================================================
bytes    field
=======  ==================================================================================
16       ``SEALHeader``: magic ``0xA15E`` (u16), header size 16 (u8), version major, minor
         (u8), compression mode (u8, 0: none), reserved (u16), total size in bytes (u64)
32       ``parms_id``: four u64
1        ``is_ntt_form`` (0: coefficient form, as BFV ciphertexts are)
8 x 3    ``size`` (polynomials), ``poly_modulus_degree`` ``N``, ``coeff_modulus_size`` ``k``
8        ``scale`` (f64, 1.0 in BFV)
8        ``correction_factor`` (u64, 1 in BFV)
16       the ``SEALHeader`` of the data array (its own total size)
8        the array's length: ``size * k * N``
8 each   the coefficients, u64, polynomial-major then RNS limb then coefficient: limb ``j`` of
         polynomial ``c_p`` is ``data[p, j, :]``, each value in ``[0, q_j)``
=======  ==================================================================================

``parse`` checks every one of these fields against what the caller expects (and the sizes
against the byte count) before it reads a coefficient; ``dump`` writes the edited
coefficients back into a copy. SEAL validates the result again when it is loaded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from secureinfer.errors import EnvelopeError

__all__ = ["CiphertextBytes", "parse"]

_HEADER = struct.Struct("<HBBBBHQ")
_MAGIC = 0xA15E
_SEAL_MAJOR = 4
_FIELDS = struct.Struct("<32sBQQQdQ")
_COUNT = struct.Struct("<Q")
_DATA = _HEADER.size + _FIELDS.size + _HEADER.size + _COUNT.size


@dataclass
class CiphertextBytes:
    """A parsed ciphertext: its bytes before the coefficients, and the coefficients.

    Attributes:
        prefix: every byte before the first coefficient (headers and fields, unchanged).
        data: ``(size, k, N)`` u64 coefficients (a writable copy).
    """

    prefix: bytes
    data: np.ndarray

    def dump(self) -> bytes:
        """The serialization with the (edited) coefficients."""
        return self.prefix + np.ascontiguousarray(self.data, dtype="<u8").tobytes()


def _header(blob: bytes, offset: int, size: int, what: str) -> None:
    magic, hsize, major, _minor, compr, _reserved, total = _HEADER.unpack_from(blob, offset)
    if magic != _MAGIC or hsize != _HEADER.size or major != _SEAL_MAJOR:
        raise EnvelopeError(f"bfv: {what} is not a SEAL {_SEAL_MAJOR}.x serialization "
                            f"(magic {magic:#x}, header {hsize} bytes, version {major})")
    if compr != 0:
        raise EnvelopeError(f"bfv: {what} is compressed (mode {compr}); the server writes "
                            "uncompressed ciphertexts")
    if total != size:
        raise EnvelopeError(f"bfv: {what} claims {total} bytes, holds {size}")


def parse(blob: bytes, poly_degree: int, limbs: int) -> CiphertextBytes:
    """Read a serialized 2-polynomial BFV ciphertext of ``N = poly_degree`` with ``limbs``
    coefficient primes.

    Raises:
        EnvelopeError: any field differs from what these parameters give (a layout this
            module does not know, or a ciphertext of another level).
    """
    blob = bytes(blob)
    expect = _DATA + 8 * 2 * limbs * poly_degree
    if len(blob) != expect:
        raise EnvelopeError(f"bfv: a ciphertext of N={poly_degree} at {limbs} coefficient "
                            f"primes has {expect} bytes, this one {len(blob)}")
    _header(blob, 0, len(blob), "the ciphertext")
    _, ntt, size, degree, k, _scale, _factor = _FIELDS.unpack_from(blob, _HEADER.size)
    if (ntt, size, degree, k) != (0, 2, poly_degree, limbs):
        raise EnvelopeError(f"bfv: the ciphertext has ntt={ntt}, size={size}, N={degree}, "
                            f"k={k}; expected 0, 2, {poly_degree}, {limbs}")
    start = _HEADER.size + _FIELDS.size
    _header(blob, start, len(blob) - start, "the ciphertext's data")
    (count,) = _COUNT.unpack_from(blob, start + _HEADER.size)
    if count != 2 * limbs * poly_degree:
        raise EnvelopeError(f"bfv: the ciphertext's data holds {count} coefficients, "
                            f"expected {2 * limbs * poly_degree}")
    data = np.frombuffer(blob, dtype="<u8", offset=_DATA).reshape(2, limbs, poly_degree)
    return CiphertextBytes(blob[:_DATA], data.astype(np.uint64))
