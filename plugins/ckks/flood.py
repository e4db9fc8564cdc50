"""Output privacy for CKKS (``ckks?flood_bits=N``): the server floods its outputs.

What a decryption shows. The client decrypts an output ciphertext ``(c0, c1)`` to the
integer polynomial ``D = c0 + c1 s = Delta * sigma^-1(y) + e`` (mod ``q0``): ``y`` is the
result, ``e`` the error of the whole evaluation, which depends on the weights (rounding of
every plaintext product, rescale, key switch). ``c1`` is itself a function of the weights
and of the client's own input ciphertexts. Before returning an output the server therefore:

1. adds a fresh encryption of zero under the client's public key (``encrypt_zero``): ``c1``
   becomes ``c1 + u a + e1`` with a fresh ternary ``u``, pseudorandom under RLWE, so the
   pair no longer shows how it was computed (computational, like any RLWE ciphertext);
2. adds a plaintext ``F`` whose ``n`` coefficients are independent Gaussians of standard
   deviation ``sigma_f`` (drawn as complex slot values with independent real and imaginary
   parts: ``sigma / sqrt(n)`` is an isometry between coefficients and slots, so isotropic
   slots are isotropic coefficients), from ``os.urandom`` (Box-Muller on 53-bit uniforms).

The argument (statistical distance per output ciphertext). The client sees ``D + F``. A
simulator that knows only ``y`` outputs ``round(Delta * sigma^-1(y) + G)`` with ``G`` the
same Gaussian; by data processing the distance between the two is at most that of ``e + G``
and ``G``, which for Gaussians of standard deviation ``sigma_f`` is
``2 Phi(|e|_2 / (2 sigma_f)) - 1 <= |e|_2 / (sigma_f sqrt(2 pi))``. Parseval over the slots
gives ``|e|_2 = Delta * sqrt(2/n * sum_j |z_j|^2) <= Delta * B`` when every slot error
``z_j`` (complex) has ``|z_j| <= B``. So ``sigma_f = Delta * B * 2^N / sqrt(2 pi)`` makes
the distance at most ``2^-N``. ``B`` is ``ERROR_MARGIN * sqrt(2)`` times the planner's
estimated largest error (``params.estimate_error``, measured to hold with room, and for
the imaginary parts too): the guarantee is relative to that estimate. Decrypting ``k``
outputs adds up to ``k * 2^-N``. The 53-bit sampler's tails (beyond 8.5 sigma) move it by
less than ``n * 2^-55`` per ciphertext, negligible next to ``2^-N`` for ``N <= 40``.

The precision cost. Each output slot gains a Gaussian of standard deviation
``sigma_slot = sigma_f * sqrt(n / 2) / Delta = B * 2^N * sqrt(n / (4 pi))``: ``N`` bits
plus ``log2 sqrt(n / 4 pi)`` (4.7 at n=8192). The planner picks a scale whose estimated
error ``B`` keeps ``TAIL * sigma_slot + B`` below the scheme's tolerance (``error_target``);
when no scale up to 59 bits does, compilation stops and says which ``flood_bits`` the
network can carry (``check_capacity``).

The other slots. An output ciphertext holds more than the result: in ``single`` packing the
slots outside the output positions hold other values of the last layers' computation
(partial sums, rotated copies), in ``batch`` packing the slots past the group's inputs hold
the network's output on zero inputs. ``Flooder.mask`` first multiplies the output by a 0/1
plaintext of the result's slots (one more level in the chain, ``MASK_DEPTH``), so those
slots carry only noise, which the flood then hides like the rest. The mask adds one
rescale's noise and its own encoding error times the masked values (about ``2^-40`` at a
50-bit scale), both inside ``ERROR_MARGIN``. Outputs then stay on ``q0 * q1``
(``params.choose_params(output_prime=True)``): ``q0`` holds only the output's magnitude,
so the scale can grow to 59 bits for the flood.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from secureinfer import privacy
from secureinfer.errors import CompileError, EnvelopeError
from secureinfer.scheme import Calibration

from . import params as _params
from .backend import from_bytes, sealapi
from .program import Program

__all__ = [
    "DEFAULT_FLOOD_BITS",
    "ERROR_MARGIN",
    "MASK_DEPTH",
    "TAIL",
    "Flooder",
    "check_capacity",
    "choose_params",
    "coeff_sigma",
    "error_target",
    "gaussians",
    "max_flood_bits",
    "open_flooder",
    "plan_keys",
    "slot_sigma",
]

#: The statistical security of the output flooding (``flood_bits``) when it is unset and the
#: model is compiled for deployment (``secureinfer.privacy``; 0 in one process).
DEFAULT_FLOOD_BITS = 16
#: The flood covers this many times the estimated largest slot error.
ERROR_MARGIN = 2.0
#: Flooded outputs stay within ``TAIL`` standard deviations of the flood (P < 2e-9 a slot).
TAIL = 6.0
#: Levels the output mask uses (one plaintext product and its rescale).
MASK_DEPTH = 1


def _bound(estimated_error: float) -> float:
    """``B``: the bound on every complex slot error the flood is sized for."""
    return ERROR_MARGIN * math.sqrt(2.0) * estimated_error


def coeff_sigma(estimated_error: float, scale: float, bits: int) -> float:
    """Standard deviation of each flood coefficient: ``Delta * B * 2^bits / sqrt(2 pi)``."""
    return scale * _bound(estimated_error) * 2.0 ** bits / math.sqrt(2 * math.pi)


def slot_sigma(estimated_error: float, bits: int, degree: int) -> float:
    """Standard deviation the flood adds to the real part of each output slot."""
    return _bound(estimated_error) * 2.0 ** bits * math.sqrt(degree / (4 * math.pi))


def flooded_error(estimated_error: float, bits: int, degree: int) -> float:
    """The largest output error with the flood: ``B_est + TAIL * sigma_slot``."""
    if bits <= 0:
        return estimated_error
    return estimated_error + TAIL * slot_sigma(estimated_error, bits, degree)


def error_target(total: float, bits: int, degree: int) -> float:
    """The estimated error the planner must reach for a flooded error below ``total``."""
    if bits <= 0:
        return total
    return total / flooded_error(1.0, bits, degree)


def max_flood_bits(estimated_error: float, degree: int, total: float) -> int:
    """The largest ``flood_bits`` whose flooded error stays below ``total`` (0: none)."""
    bits = 0
    while bits < 128 and flooded_error(estimated_error, bits + 1, degree) <= total:
        bits += 1
    return bits


def check_capacity(estimated_error: float, bits: int, degree: int, scale_bits: int,
                   total: float) -> None:
    """Refuse a plan whose scale cannot carry a flood of ``bits`` within ``total``.

    Raises:
        CompileError: names the flood it needs, what this chain can carry, what to change.
    """
    if bits <= 0 or flooded_error(estimated_error, bits, degree) <= total:
        return
    can = max_flood_bits(estimated_error, degree, total)
    raise CompileError(
        f"ckks: flood_bits={bits} adds noise of standard deviation "
        f"{slot_sigma(estimated_error, bits, degree):.3g} to each output (2^{bits} times the "
        f"estimated error {estimated_error:.3g} at scale 2^{scale_bits}, N={degree}), above "
        f"the tolerance {total:.3g}; this chain carries at most flood_bits={can}: lower "
        "flood_bits, leave scale_bits and coeff_mod_bits to the planner (it raises the "
        "scale), or make the network shallower; flood_bits=0 turns flooding off (only for a "
        "client that holds the model)")


def choose_params(program: Program, calibration: Calibration | None, opts: dict[str, Any],
                  fits: Callable[[int], bool], allow_insecure: bool,
                  tolerance: float) -> _params.Params:
    """``params.choose_params`` with room for the flood of ``opts["flood_bits"]``.

    Unflooded plans aim at ``tolerance / 10``; flooded ones at ``tolerance / 2`` for the
    estimated error plus ``TAIL`` flood deviations.

    Raises:
        CompileError: no chain carries the flood; the message says how many bits fit.
    """
    bits = int(opts.get("flood_bits") or 0)
    total = tolerance / 2 if bits else tolerance / 10
    try:
        chosen = _params.choose_params(program, calibration, opts, fits,
                                       lambda n: error_target(total, bits, n), allow_insecure,
                                       extra_depth=MASK_DEPTH if bits else 0,
                                       output_prime=bool(bits))
    except CompileError as exc:
        if not bits or opts.get("scale_bits") or opts.get("coeff_mod_bits"):
            raise
        degree = opts.get("poly_modulus_degree") or _params.DEGREES[-1]
        raise CompileError(f"{exc}. With flood_bits={bits} the planner needs a scale that "
                           f"keeps 2^{bits} times the error within the tolerance; the "
                           f"largest scale whose chain N={degree} holds carries at most "
                           f"flood_bits={_carried(program, calibration, degree, total)}: "
                           "lower flood_bits (0 turns flooding off, only for a client that "
                           "holds the model)") from None
    check_capacity(_params.estimate_error(program, calibration, chosen.poly_modulus_degree,
                                          chosen.scale_bits),
                   bits, chosen.poly_modulus_degree, chosen.scale_bits, total)
    return chosen


def _carried(program: Program, calibration: Calibration | None, degree: int,
             total: float) -> int:
    """The most flood bits of any scale whose chain fits ``degree`` at 128 bits."""
    headroom = _params._headroom(program, calibration)
    for scale in range(_params.MAX_PRIME_BITS - 1, 19, -1):
        # the chain of ``output_prime``: q0 for the output's magnitude, then the scale primes
        chain = [max(_params._min_scale(degree), headroom + _params.HEADROOM_MARGIN_BITS)] \
            + [scale] * (program.depth + MASK_DEPTH + 1) \
            + [min(_params.MAX_PRIME_BITS, scale + _params.SPECIAL_MARGIN_BITS)]
        if sum(chain) <= _params.MAX_BITS_128[degree]:
            error = _params.estimate_error(program, calibration, degree, scale)
            return max_flood_bits(error, degree, total)
    return 0


def plan_keys(error: float, bits: int, degree: int, by: str) -> dict[str, Any]:
    """The plan's output-privacy keys, from the estimated error before the flood; ``by``:
    who chose ``bits`` (``secureinfer.privacy``)."""
    protection = (
        f"outputs masked and noise-flooded (flood_bits={bits}): each decrypted output "
        f"ciphertext is within statistical distance 2^-{bits} of one showing the result "
        f"only, measured against the planner's estimated error bound ({ERROR_MARGIN:g} x "
        f"the estimated largest slot error {error:.3g}, not a proven bound)" if bits else
        "outputs not flooded (flood_bits=0): the decrypted noise and the other slots "
        "depend on the weights")
    return {"flood_bits": bits, "error_before_flood": error,
            "flood_slot_sigma": slot_sigma(error, bits, degree) if bits else 0.0,
            "public_key": bool(bits),
            "flood_statistical_security_bits": bits,
            "flood_measured_against": (
                f"the estimated slot-error bound {_bound(error):.3g} (ERROR_MARGIN x sqrt 2 x "
                "params.estimate_error)" if bits else None),
            **privacy.plan_keys(by, protection, "flood_bits=0")}


def open_flooder(seal: Any, plan: dict[str, Any], fields: dict[str, Any]) -> "Flooder | None":
    """The server's ``Flooder`` from the public-key message ``fields`` (``None``: no flood).

    Raises:
        EnvelopeError: the plan floods and the message has no (valid) public key.
    """
    bits = int(plan.get("flood_bits", 0))
    if not bits:
        return None
    public = fields.get("public", b"")
    if not isinstance(public, bytes) or not public:
        raise EnvelopeError(f"ckks: the plan floods outputs (flood_bits={bits}) and needs the "
                            "client's public key, missing from the public keys")
    n, k = seal.params.poly_modulus_degree, len(seal.params.coeff_mod_bits)
    key = from_bytes(sealapi().PublicKey(), seal.context, public, "public key",
                     2 * n * k * 8 + 4096)  # at the key level: the special prime included
    return Flooder(seal, key, plan["error_before_flood"], bits)


def gaussians(count: int) -> np.ndarray:
    """``count`` standard normal samples from ``os.urandom`` (Box-Muller, 53-bit uniforms)."""
    pairs = (count + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(pairs, 2)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0 ** 53  # (0, 1]
    radius = np.sqrt(-2.0 * np.log(u[:, 0]))
    angle = 2 * math.pi * u[:, 1]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


class Flooder:
    """Floods output ciphertexts in place (the server's; it holds the public key only).

    Args:
        seal: the server's SEAL context (``backend.Seal``).
        public_key: the client's SEAL public key (encryptions of zero).
        estimated_error: the plan's estimated largest output error (logical units).
        bits: ``flood_bits``.
    """

    def __init__(self, seal: Any, public_key: Any, estimated_error: float, bits: int) -> None:
        self.seal = seal
        self.encryptor = sealapi().Encryptor(seal.context, public_key)
        self.estimated_error = float(estimated_error)
        self.bits = int(bits)

    def __repr__(self) -> str:
        return f"<ckks Flooder flood_bits={self.bits} (public key only)>"

    def slot_values(self, scale: float) -> list[complex]:
        """One flood: complex slots whose coefficients are Gaussians of ``coeff_sigma``."""
        n = self.seal.params.poly_modulus_degree
        sigma = coeff_sigma(self.estimated_error, scale, self.bits)
        t = sigma * math.sqrt(n / 2) / scale  # real and imaginary std of each slot
        g = gaussians(n) * t
        return (g[: n // 2] + 1j * g[n // 2:]).tolist()

    def mask(self, ct: Any, keep: np.ndarray) -> None:
        """Zero every slot of ``ct`` but ``keep`` (a 0/1 plaintext product, then the rescale
        by that level's prime, so the scale is unchanged): one level."""
        seal = self.seal
        level = seal.context.get_context_data(ct.parms_id()).chain_index()
        ones = np.zeros(seal.slots)
        ones[keep] = 1.0
        seal.evaluator.multiply_plain_inplace(ct, seal.encode(ones, level,
                                                              float(seal.primes[level])))
        seal.evaluator.rescale_to_next_inplace(ct)

    def apply_all(self, value: Any, cts: list[Any], positions: np.ndarray, width: int) -> None:
        """Flood every output ciphertext of ``value`` (``cts``, flattened) in place, keeping
        ``positions`` (single packing) or each group's first ``count`` slots (batch, ``width``
        ciphertexts a group)."""
        for i, ct in enumerate(cts):
            self.apply(ct, positions if value.packing == "single"
                       else np.arange(value.counts[i // width]))

    def apply(self, ct: Any, keep: np.ndarray) -> None:
        """Keep only the slots ``keep`` of ``ct`` (the result), then add a fresh public-key
        encryption of zero and a Gaussian plaintext."""
        self.mask(ct, keep)
        api, seal = sealapi(), self.seal
        zero = api.Ciphertext()
        self.encryptor.encrypt_zero(ct.parms_id(), zero)
        zero.scale = ct.scale
        seal.evaluator.add_inplace(ct, zero)
        pt = api.Plaintext()
        seal.encoder.encode(self.slot_values(ct.scale), ct.parms_id(), ct.scale, pt)
        seal.evaluator.add_plain_inplace(ct, pt)
