"""SEAL through ``tenseal.sealapi``: contexts, keys, encoding and bytes.

``tenseal.sealapi`` serializes only to file paths, so objects go through a private
temporary file (in ``/dev/shm`` when available), with SEAL's own compression (zstd).
Loading checks SEAL's header and ``is_valid_for`` on every object the other party sent;
any failure becomes an ``EnvelopeError``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from secureinfer.errors import BackendNotInstalledError, CompileError, EnvelopeError

from .params import Params

__all__ = ["ClientKeys", "Seal", "from_bytes", "galois_element", "sealapi", "to_bytes"]

_INSTALL = "pip install secureinfer[ckks]"


def sealapi() -> Any:
    """Import ``tenseal.sealapi`` or say which extra installs it."""
    try:
        import tenseal.sealapi as seal
    except ImportError as exc:
        raise BackendNotInstalledError(f"scheme 'ckks' needs TenSEAL: {_INSTALL} ({exc})") from None
    return seal


def _scratch_dir(size: int) -> str:
    """``/dev/shm`` when it has room for ``size`` bytes with a wide margin (it is often a
    64 MB tmpfs in containers, and a Galois key can be tens of MB), else the temp dir."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK) \
                and shutil.disk_usage(shm).free > 4 * size + (64 << 20):
            return str(shm)
    except OSError:
        pass
    return tempfile.gettempdir()


def to_bytes(obj: Any) -> bytes:
    """Serialize a SEAL object (ciphertext, keys) with SEAL's compression."""
    # sealapi has no save_size: assume the largest object we write (a Galois key set).
    fd, path = tempfile.mkstemp(prefix="secureinfer-ckks-", dir=_scratch_dir(256 << 20))
    os.close(fd)
    try:
        obj.save(path)
        return Path(path).read_bytes()
    finally:
        os.unlink(path)


def from_bytes(obj: Any, context: Any, data: bytes, what: str, max_bytes: int) -> Any:
    """Load ``data`` into the empty SEAL object ``obj``; ``EnvelopeError`` if invalid.

    A failure to write the scratch file (disk full) is an ``OSError``, not blamed on data.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise EnvelopeError(f"ckks: {what} is {type(data).__name__}, not bytes")
    if not 16 <= len(data) <= max_bytes:
        raise EnvelopeError(f"ckks: {what} of {len(data)} bytes is not a valid SEAL object "
                            f"(expected 16..{max_bytes} bytes)")
    fd, path = tempfile.mkstemp(prefix="secureinfer-ckks-", dir=_scratch_dir(len(data)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(data))
        try:
            obj.load(context, path)
        except Exception as exc:  # noqa: BLE001 - SEAL's C++ exceptions map to several types
            raise EnvelopeError(f"ckks: {what} is malformed or belongs to other parameters "
                                f"({type(exc).__name__}: {exc})") from None
    finally:
        os.unlink(path)
    return obj


def galois_element(step: int, degree: int) -> int:
    """SEAL's Galois element for a left rotation by ``step`` slots (``3^step mod 2N``)."""
    slots = degree // 2
    return pow(3, step % slots, 2 * degree)


@dataclass
class Seal:
    """A SEAL context for ``params`` with its encoder and evaluator (no keys).

    Attributes:
        parms_bytes: SEAL's serialized encryption parameters (the public context).
        primes: the data primes ``q_0 .. q_L`` (special prime excluded).
        parms_ids: the parameter id of each chain index (``L`` = top level).
    """

    params: Params
    parms_bytes: bytes = field(init=False)
    context: Any = field(init=False)
    encoder: Any = field(init=False)
    evaluator: Any = field(init=False)
    primes: list[int] = field(init=False)
    parms_ids: dict[int, list[int]] = field(init=False)

    def __post_init__(self) -> None:
        seal = sealapi()
        p = self.params
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(p.poly_modulus_degree)
        try:
            parms.set_coeff_modulus(seal.CoeffModulus.Create(p.poly_modulus_degree,
                                                             list(p.coeff_mod_bits)))
        except Exception as exc:  # noqa: BLE001 - SEAL's C++ exceptions map to several types
            raise CompileError(f"ckks: SEAL cannot build primes of {list(p.coeff_mod_bits)} bits "
                               f"for N={p.poly_modulus_degree} ({exc}); choose larger "
                               "scale_bits or another chain") from None
        level = seal.SEC_LEVEL_TYPE.TC128 if p.security_bits >= 128 else seal.SEC_LEVEL_TYPE.NONE
        self.parms_bytes = to_bytes(parms)
        self.context = seal.SEALContext(parms, True, level)
        if not self.context.parameters_set():
            raise CompileError(f"ckks: SEAL rejects the parameters: "
                               f"{self.context.parameters_error_message()}")
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        top = self.context.first_context_data()
        self.primes = [m.value() for m in top.parms().coeff_modulus()]
        self.parms_ids = {}
        data = top
        while data is not None:
            self.parms_ids[data.chain_index()] = data.parms_id()
            data = data.next_context_data()

    @property
    def top(self) -> int:
        """Chain index of fresh ciphertexts."""
        return len(self.primes) - 1

    @property
    def slots(self) -> int:
        return self.params.slots

    def new_ciphertext(self) -> Any:
        return sealapi().Ciphertext()

    def encode(self, values: np.ndarray | float, level: int, scale: float) -> Any:
        """A plaintext of ``values`` (array over the slots, or one number in every slot)."""
        pt = sealapi().Plaintext()
        if np.ndim(values) == 0:
            self.encoder.encode(float(values), self.parms_ids[level], scale, pt)
        else:
            self.encoder.encode(np.asarray(values, dtype=np.float64).tolist(),
                                self.parms_ids[level], scale, pt)
        return pt

    def decode(self, pt: Any) -> np.ndarray:
        return np.asarray(self.encoder.decode_double(pt))

    def max_ciphertext_bytes(self) -> int:
        """Upper bound on a serialized ciphertext (uncompressed size plus headers)."""
        n = self.params.poly_modulus_degree
        return 2 * n * len(self.primes) * 8 + 4096

    def load_ciphertext(self, data: bytes, level: int, what: str) -> Any:
        """Load a two-part ciphertext that must be at chain index ``level``."""
        ct = from_bytes(sealapi().Ciphertext(), self.context, data, what,
                        self.max_ciphertext_bytes())
        if ct.size() != 2 or list(ct.parms_id()) != list(self.parms_ids[level]) \
                or not ct.is_ntt_form():
            raise EnvelopeError(f"ckks: {what} is not a fresh two-part ciphertext at level "
                                f"{level} of these parameters")
        return ct

    def load_keys(self, cls_name: str, data: bytes, what: str, count: int) -> Any:
        """Load ``count`` evaluation keys (``RelinKeys`` or ``GaloisKeys``)."""
        n = self.params.poly_modulus_degree
        k = len(self.params.coeff_mod_bits)
        limit = count * (k - 1) * 2 * n * k * 8 + 65536
        return from_bytes(getattr(sealapi(), cls_name)(), self.context, data, what, limit)


class ClientKeys:
    """The client's live keys: secret key, symmetric encryptor and decryptor.

    Never serialized, never sent: ``repr`` does not show key material.
    """

    def __init__(self, seal: Seal, steps: Sequence[int], relin: bool,
                 public: bool = False) -> None:
        api = sealapi()
        self.seal = seal
        keygen = api.KeyGenerator(seal.context)
        self._secret = keygen.secret_key()
        self.encryptor = api.Encryptor(seal.context, self._secret)
        self.decryptor = api.Decryptor(seal.context, self._secret)
        self.public_key = None  # for the server's output flooding (``flood.Flooder``)
        if public:
            self.public_key = api.PublicKey()
            keygen.create_public_key(self.public_key)
        self.relin = None
        if relin:
            self.relin = api.RelinKeys()
            keygen.create_relin_keys(self.relin)
        self.galois = None
        if steps:
            self.galois = api.GaloisKeys()
            elts = [galois_element(s, seal.params.poly_modulus_degree) for s in steps]
            keygen.create_galois_keys(elts, self.galois)

    def __repr__(self) -> str:
        return f"<ckks ClientKeys N={self.seal.params.poly_modulus_degree} (secret)>"

    def encrypt(self, values: np.ndarray) -> Any:
        """Encrypt ``values`` at the top level with the plan's scale (secret-key mode)."""
        pt = self.seal.encode(values, self.seal.top, 2.0 ** self.seal.params.scale_bits)
        ct = sealapi().Ciphertext()
        self.encryptor.encrypt_symmetric(pt, ct)
        return ct

    def decrypt(self, ct: Any) -> np.ndarray:
        pt = sealapi().Plaintext()
        self.decryptor.decrypt(ct, pt)
        return self.seal.decode(pt)
