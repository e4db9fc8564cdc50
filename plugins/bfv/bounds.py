"""The worst-case output of the integer network, by interval arithmetic per feature.

``QuantLayer.bound`` bounds every layer by its largest row times the largest input, which
is always safe but loose: inputs of a ``[0, 1]`` range are non-negative, the square of a
value is non-negative, and rows differ. Propagating an interval ``[lo, hi]`` per feature
through the exact integer layers gives a bound that is still reached by no in-range input
beyond it (every step is a sound interval enclosure), several bits tighter, and so fewer or
smaller plaintext primes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from secureinfer.layers import Flatten, Poly
from secureinfer.quant import QuantizedNetwork

from .linear import IntegerLinear, big_ints, integer_linear

__all__ = ["output_bound"]


def _mul(a_lo: np.ndarray, a_hi: np.ndarray, b_lo: np.ndarray,
         b_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cands = np.stack([a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi])
    return cands.min(axis=0), cands.max(axis=0)


def _poly(coeffs: tuple[int, ...], lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    if tuple(coeffs) == (0, 0, 1):
        sq_lo, sq_hi = lo * lo, hi * hi
        top = np.maximum(sq_lo, sq_hi)
        bottom = np.where((lo <= 0) & (hi >= 0), 0, np.minimum(sq_lo, sq_hi))
        return big_ints(bottom), big_ints(top)
    y_lo = big_ints(np.full(lo.shape, coeffs[-1]))
    y_hi = y_lo.copy()
    for c in reversed(coeffs[:-1]):  # Horner: y = y * x + c
        y_lo, y_hi = _mul(y_lo, y_hi, lo, hi)
        y_lo, y_hi = y_lo + c, y_hi + c
    return y_lo, y_hi


def output_bound(qnet: QuantizedNetwork,
                 linear: Callable[[int], IntegerLinear] | None = None) -> int:
    """The largest ``|integer|`` the last layer can output for in-range inputs.

    ``linear(i)``: layer ``i``'s integer matrix (default: built here; the planner passes
    its cache).
    """
    n_in = int(np.prod(qnet.layers[0].spec.in_shape))
    lo = big_ints(np.full(n_in, -qnet.input_bound if qnet.input_range[0] < 0 else 0))
    hi = big_ints(np.full(n_in, qnet.input_bound))
    for i, q in enumerate(qnet.layers):
        if isinstance(q.spec, Flatten):
            continue
        if isinstance(q.spec, Poly):
            lo, hi = _poly(q.coeffs, lo, hi)
            continue
        lin = linear(i) if linear is not None else integer_linear(q)
        up = lin.vals > 0  # a positive weight takes the low end to the low end
        vals = big_ints(lin.vals)
        lo_terms = np.where(up, lo[lin.cols], hi[lin.cols]) * vals
        hi_terms = np.where(up, hi[lin.cols], lo[lin.cols]) * vals
        lo, hi = lin.bias.copy(), lin.bias.copy()
        np.add.at(lo, lin.rows, lo_terms)
        np.add.at(hi, lin.rows, hi_terms)
    return int(max(max(abs(int(v)) for v in lo), max(abs(int(v)) for v in hi)))
