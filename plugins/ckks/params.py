"""The CKKS parameter planner: ring degree, coefficient modulus chain and scale.

The chain is ``[q0, q1 .. qL, P]``: ``L`` rescaling primes of ``scale_bits`` bits (one per
level of multiplicative depth; ``2 * scale_bits`` for the level an affine stage shares with
the lazy square before it, ``Program.with_lazy_squares``), a first prime ``q0`` with ``headroom`` more bits so the
output fits (``|y| * 2^scale < q0 / 2``, from the calibrated output range) and a special
prime ``P`` for key switching, 5 bits above the largest other prime (key-switching noise
scales with ``q_max / P``; with ``P = q_max`` one rotation costs ~6 bits of precision).
Intermediate values may wrap modulo the larger moduli of the upper levels without harm:
CKKS arithmetic is a ring homomorphism and rescaling commutes with reduction, so only the
output range matters.

The scale is the smallest that keeps the estimated output error below the target: every
rescale adds independent noise of about ``2^(13 - scale_bits)`` (measured at N=8192) and
each stage amplifies the incoming error by its row norm (affine) or its RMS slope over
the calibration samples (polynomial). The ring degree is the smallest whose 128-bit bound
(HomomorphicEncryption.org standard, ternary secret, as SEAL's ``CoeffModulus::MaxBitCount``)
holds the chain and whose slots hold the layouts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from secureinfer.errors import CompileError, ConfigError
from secureinfer.scheme import Calibration

from .program import Affine, Polynomial, Program

__all__ = [
    "MAX_BITS_128",
    "Params",
    "choose_params",
    "estimate_error",
    "input_limit",
    "output_bound",
    "parse_bits",
    "security_bits",
    "security_source",
]

# Largest total coefficient modulus (bits, special prime included) at 128-bit security.
MAX_BITS_128 = {2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
DEGREES = tuple(sorted(MAX_BITS_128))
MAX_PRIME_BITS = 60
HEADROOM_MARGIN_BITS = 2
# Inputs up to INPUT_MARGIN times the calibrated range are accepted; outputs are planned
# for the calibrated range times INPUT_MARGIN ** (network degree), between 2 and 16.
INPUT_MARGIN = 1.5
MAX_OUTPUT_MARGIN = 16.0
# Key switching adds noise ~ q_max / P times a large factor (N * sigma * primes): a special
# prime 5 bits above the largest data prime brings rotations down to rescale noise.
SPECIAL_MARGIN_BITS = 5
# Measured at N=8192: a fresh encryption's largest slot error is ~2^10 / 2^scale_bits, and
# the largest slot error is ~3.5 times the RMS over 4096 slots.
FRESH_NOISE_BITS = 10.0
SLOT_MAX_FACTOR = 3.5


def noise_bits(degree: int) -> float:
    """log2 of the largest slot error one encryption, rescale or key switch adds, in units
    of the scale (measured with SEAL: about ``2^13 / 2^scale_bits`` at N=8192; rounding
    noise grows with ``N`` through the secret and the canonical embedding)."""
    return 13.0 + math.log2(degree / 8192)


def security_bits(degree: int, total_bits: int) -> int:
    """128 when ``total_bits`` is within the standard's bound, else a lower estimate.

    Below the bound the estimate scales with ``N / log q`` (the quantity lattice attacks
    depend on); it is approximate and only reported with ``allow_insecure``.
    """
    limit = MAX_BITS_128.get(degree)
    if limit is None:
        raise ConfigError(f"ckks: poly_modulus_degree={degree} is not one of "
                          f"{', '.join(map(str, DEGREES))}")
    if total_bits <= limit:
        return 128
    return int(128 * limit / total_bits)


HE_STANDARD = ("HomomorphicEncryption.org security standard (2018), 128-bit classical table, "
               "ternary-secret row")


def security_source(degree: int, total_bits: int) -> str:
    """Where ``security_bits(degree, total_bits)`` comes from, in one line."""
    limit = MAX_BITS_128[degree]
    if total_bits <= limit:
        return (f"{HE_STANDARD} for N={degree}: log q <= {limit} bits at 128 bits (the bound "
                f"SEAL enforces); this plan: log q = {total_bits}")
    return (f"below that table: log q = {total_bits} > {limit} for N={degree}; the figure "
            f"{security_bits(degree, total_bits)} is 128 * {limit} / {total_bits}, an "
            "extrapolation, not a table value")


def parse_bits(text: str) -> list[int]:
    """``"60,40,40,60"`` -> ``[60, 40, 40, 60]`` with each size checked."""
    try:
        bits = [int(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(f"ckks: coeff_mod_bits={text!r} is not a comma-separated list of "
                          "prime sizes, e.g. 40,26,26,26,40") from None
    if len(bits) < 2 or any(not 10 <= b <= MAX_PRIME_BITS for b in bits):
        raise ConfigError(f"ckks: coeff_mod_bits={text!r} needs at least two primes of 10 to "
                          f"{MAX_PRIME_BITS} bits (first, rescaling..., special)")
    return bits


@dataclass(frozen=True)
class Params:
    """Chosen encryption parameters."""

    poly_modulus_degree: int
    coeff_mod_bits: tuple[int, ...]
    scale_bits: int
    depth_available: int
    security_bits: int

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def to_dict(self) -> dict[str, Any]:
        total = sum(self.coeff_mod_bits)
        return {"poly_modulus_degree": self.poly_modulus_degree, "slots": self.slots,
                "coeff_mod_bits": list(self.coeff_mod_bits), "coeff_mod_total_bits": total,
                "max_bits_128": MAX_BITS_128[self.poly_modulus_degree],
                "scale_bits": self.scale_bits, "depth_available": self.depth_available,
                "security_bits": self.security_bits,
                "security_source": security_source(self.poly_modulus_degree, total)}


# ----- ranges and error -------------------------------------------------------------------


def _stage_ranges(program: Program, calibration: Calibration | None) -> list[float] | None:
    if calibration is None or len(calibration.layer_ranges) != len(program.specs):
        return None
    index = {id(s): i for i, s in enumerate(program.specs)}
    out = []
    for stage in program.stages:
        lo, hi = calibration.layer_ranges[index[id(stage.specs[-1])]]
        out.append(max(abs(lo), abs(hi)))
    return out


def input_bound(calibration: Calibration | None) -> float:
    """Largest calibrated input magnitude (1 without calibration)."""
    if calibration is None:
        return 1.0
    lo, hi = calibration.input_range
    return max(abs(lo), abs(hi), 1e-12)


def input_limit(calibration: Calibration | None) -> float:
    """Largest input magnitude the plan accepts: ``INPUT_MARGIN`` times the calibrated
    range, or exactly 1 without calibration (the worst-case bounds assume ``|x| <= 1``)."""
    return INPUT_MARGIN * input_bound(calibration) if calibration is not None else 1.0


def _output_margin(program: Program) -> float:
    degree = 1
    for stage in program.stages:
        degree *= stage.degree if isinstance(stage, Polynomial) else 1
    return min(MAX_OUTPUT_MARGIN, max(2.0, INPUT_MARGIN ** min(degree, 64)))


def _poly_bound(coeffs: tuple[float, ...], bound: float) -> float:
    return float(sum(abs(c) * bound ** k for k, c in enumerate(coeffs)))


def _poly_slope(coeffs: tuple[float, ...], bound: float) -> float:
    return float(sum(k * abs(c) * bound ** (k - 1) for k, c in enumerate(coeffs) if k))


def stage_bounds(program: Program, calibration: Calibration | None,
                 margin: float | None = None) -> list[float]:
    """Bound on each stage's output magnitude (logical units).

    Calibrated ranges widened by ``margin`` (default: for inputs up to ``input_limit``)
    when available, else interval arithmetic from ``|x| <= 1``.
    """
    calibrated = _stage_ranges(program, calibration)
    if calibrated is not None:
        margin = _output_margin(program) if margin is None else margin
        return [max(margin * c, 1e-6) for c in calibrated]
    bound, out = input_bound(None), []
    for stage in program.stages:
        if isinstance(stage, Affine):
            bound = stage.abs_bound(bound)
        else:
            bound = _poly_bound(stage.coeffs, bound)
        out.append(max(bound, 1e-6))
    return out


def output_bound(program: Program, calibration: Calibration | None) -> float:
    """Bound on the magnitude of the network's output."""
    return stage_bounds(program, calibration)[-1]


def _poly_slopes(program: Program, calibration: Calibration | None) -> dict[int, float]:
    """Per polynomial stage, the RMS of ``|p'(x)|`` over the calibration samples."""
    if calibration is None or calibration.samples is None or not len(calibration.samples):
        return {}
    x = np.asarray(calibration.samples, dtype=np.float64).reshape(len(calibration.samples), -1)
    slopes = {}
    for k, stage in enumerate(program.stages):
        if isinstance(stage, Affine):
            x = stage.apply(x)
            continue
        deriv = sum(i * c * x ** (i - 1) for i, c in enumerate(stage.coeffs) if i)
        slopes[k] = float(np.sqrt(np.mean(np.square(deriv))))
        x = sum(c * x ** i for i, c in enumerate(stage.coeffs))
    return slopes


def amplification(program: Program, calibration: Calibration | None) -> list[float]:
    """Per stage, how much it multiplies an error on its input.

    Slot errors are independent and the next stage mixes many slots, so an affine stage
    amplifies by its largest row norm (not its row sum) and a polynomial by the RMS of
    its slope over the calibration samples (its largest slope over the calibrated range
    when there are no samples).
    """
    bounds = stage_bounds(program, calibration, margin=1.0)
    slopes = _poly_slopes(program, calibration)
    prev = input_bound(calibration)
    amps = []
    for k, (stage, bound) in enumerate(zip(program.stages, bounds)):
        if isinstance(stage, Affine):
            amps.append(stage.row_norm_max())
        else:
            amp = slopes.get(k, _poly_slope(stage.coeffs, prev))
            if stage.folded:  # noise lands on sqrt(|a|) x (program.build_program)
                amp /= min(1.0, math.sqrt(abs(stage.coeffs[2])))
            amps.append(amp)
        prev = bound
    return amps


def estimate_error(program: Program, calibration: Calibration | None, degree: int,
                   scale_bits: int) -> float:
    """Estimated largest absolute error of the output (logical units).

    Errors are tracked as RMS over the slots: each stage amplifies the incoming error and
    its rescale adds independent noise (they add in quadrature); the largest slot error is
    ``SLOT_MAX_FACTOR`` times the RMS.
    """
    step = 2.0 ** (noise_bits(degree) - scale_bits) / SLOT_MAX_FACTOR
    err = step * 2.0 ** (FRESH_NOISE_BITS - noise_bits(8192))
    for stage, amp in zip(program.stages, amplification(program, calibration)):
        if isinstance(stage, Affine) and stage.is_noop:
            continue
        if isinstance(stage, Polynomial) and stage.lazy:  # no rescale: no noise of its own
            err *= amp
            continue
        err = math.hypot(amp * err, step)
    return SLOT_MAX_FACTOR * err


# ----- choosing ---------------------------------------------------------------------------


def _min_scale(degree: int) -> int:
    """Smallest prime size with enough NTT-friendly primes (``= 1 mod 2N``) per size."""
    return max(20, int(math.log2(2 * degree)) + 9)


def _headroom(program: Program, calibration: Calibration | None) -> int:
    bound = output_bound(program, calibration)
    return max(4, math.ceil(math.log2(2 * bound)) + HEADROOM_MARGIN_BITS)


def _auto_scale(program: Program, calibration: Calibration | None, degree: int,
                target: float) -> int:
    scale = _min_scale(degree)
    while scale < MAX_PRIME_BITS and estimate_error(program, calibration, degree, scale) > target:
        scale += 1
    return scale


def _chain(scale: int, headroom: int, sizes: list[int]) -> list[int]:
    """``[q0, q1 .. qL, P]`` for the rescaling primes ``sizes`` in evaluation order (the
    first stage divides by ``qL``)."""
    first = scale + headroom
    special = min(MAX_PRIME_BITS, max(first, *sizes, scale) + SPECIAL_MARGIN_BITS)
    return [first] + sizes[::-1] + [special]


def _check_headroom(program: Program, calibration: Calibration | None, headroom: int,
                    text: str) -> None:
    """Refuse a user chain whose first prime cannot hold the calibrated outputs."""
    bound = stage_bounds(program, calibration, margin=1.0)[-1]
    if 2 * bound >= 2.0 ** headroom:
        raise CompileError(f"ckks: coeff_mod_bits={text} leaves {headroom} bits above the scale "
                           f"in the first prime (outputs below 2^{headroom - 1}), but outputs "
                           f"reach {bound:.3g}; make the first prime at least "
                           f"{math.ceil(math.log2(2 * bound)) + 1} bits larger than the scale")


def _too_deep(depth: int, program: Program, detail: str) -> CompileError:
    stages = "; ".join(f"{d} for {name}" for name, d in program.stage_depths() if d)
    return CompileError(f"ckks: the network needs multiplicative depth {depth} ({stages}); "
                        f"{detail}")


def choose_params(program: Program, calibration: Calibration | None, opts: dict[str, Any],
                  fits: Callable[[int], bool], target_error: float | Callable[[int], float],
                  allow_insecure: bool = False, extra_depth: int = 0,
                  output_prime: bool = False) -> Params:
    """Pick ``Params`` for ``program``; options ``poly_modulus_degree``, ``scale_bits`` and
    ``coeff_mod_bits`` override the automatic choice.

    Args:
        fits: whether the packing's values fit the slots of a given ring degree.
        target_error: the output error the automatic scale aims below (or a function of
            the ring degree giving it: the output flood grows with it).
        extra_depth: levels needed after the network (the output mask of ``flood``).
        output_prime: outputs stay one level above the bottom, on ``q0 * q1``: the first
            prime holds only the output's magnitude (``headroom`` bits), so the scale is not
            capped at ``60 - headroom`` bits (flooding needs a wide scale).

    Raises:
        CompileError: the depth does not fit the given chain, or no ring degree up to 32768
            holds it at 128-bit security; the message gives the depth needed.
    """
    depth = program.depth + extra_depth
    headroom = _headroom(program, calibration)
    degree_opt = opts.get("poly_modulus_degree")
    scale_opt = opts.get("scale_bits")
    bits_opt = opts.get("coeff_mod_bits")
    degrees = [degree_opt] if degree_opt else list(DEGREES)
    if bits_opt:
        bits = parse_bits(bits_opt)
        if len(bits) - 2 < depth:
            raise _too_deep(depth, program,
                            f"coeff_mod_bits={bits_opt} gives {len(bits) - 2} rescaling "
                            f"primes: add {depth - len(bits) + 2} more")
        scale = scale_opt or Counter(bits[1:-1] or bits[:1]).most_common(1)[0][0]
        off = [b for b in bits[1:-1] if abs(b - scale) > 1]
        if off:
            # Rescaling divides by each middle prime: a scale far from them drifts by the
            # ratio at every level (x^k ends at s^k / q^(k-1)) and the result is garbage.
            raise ConfigError(f"ckks: scale_bits={scale} but coeff_mod_bits={bits_opt} has "
                              f"rescaling primes of {sorted(set(off))} bits; the middle primes "
                              "must be within 1 bit of the scale: give them the scale's size, "
                              "or leave scale_bits out")
        _check_headroom(program, calibration, bits[0] - scale, bits_opt)
        for degree in degrees:
            if fits(degree) and (sum(bits) <= MAX_BITS_128[degree] or
                                 (degree_opt and allow_insecure)):
                return Params(degree, tuple(bits), scale, len(bits) - 2,
                              security_bits(degree, sum(bits)))
        raise CompileError(f"ckks: coeff_mod_bits={bits_opt} ({sum(bits)} bits) fits no "
                           "poly_modulus_degree at 128-bit security with these layouts; use "
                           "fewer or smaller primes or a larger poly_modulus_degree")
    last_reason = ""
    for degree in degrees:
        if not fits(degree):
            last_reason = f"the values do not fit the {degree // 2} slots of N={degree}"
            continue
        target = target_error(degree) if callable(target_error) else target_error
        scale = scale_opt or _auto_scale(program, calibration, degree, target)
        sizes = program.level_bits(scale) + [scale] * extra_depth
        if max(sizes, default=0) + SPECIAL_MARGIN_BITS > MAX_PRIME_BITS:
            raise CompileError(
                f"ckks: lazy rescaling needs primes of {max(sizes)} bits (twice scale_bits="
                f"{scale}) and a special prime {SPECIAL_MARGIN_BITS} bits above, more than "
                f"{MAX_PRIME_BITS}; use lazy_rescale=off or scale_bits <= "
                f"{(MAX_PRIME_BITS - SPECIAL_MARGIN_BITS) // 2}")
        chain = _chain(scale, headroom, sizes)
        if output_prime:
            chain = [max(_min_scale(degree), headroom + HEADROOM_MARGIN_BITS), scale] + chain[1:]
        total = sum(chain)
        if total > MAX_BITS_128[degree] and not (degree_opt and allow_insecure):
            last_reason = (f"its chain of {total} bits ({chain}) exceeds the "
                           f"{MAX_BITS_128[degree]} bits N={degree} allows at 128-bit security")
            continue
        if scale + headroom > MAX_PRIME_BITS and not output_prime:
            raise CompileError(
                f"ckks: outputs up to ~2^{headroom - HEADROOM_MARGIN_BITS - 1} need a first "
                f"prime of {scale + headroom} bits (> {MAX_PRIME_BITS}); pass calibration data "
                "to compile() (uncalibrated bounds are worst-case) or rescale the model")
        return Params(degree, tuple(chain), scale, depth, security_bits(degree, total))
    fix = ("use a larger poly_modulus_degree, smaller scale_bits, or a shallower network "
           "(fewer or lower-degree polynomial activations)" if degree_opt else
           "make the network shallower (fewer or lower-degree polynomial activations)")
    raise _too_deep(depth, program, f"{last_reason}; {fix}")
