"""Quadratic functional encryption: the ``fe_quad`` scheme (alias ``qfe``).

With quadratic FE the server learns chosen quadratic functions of the encrypted input and
nothing else. A prefix ``Linear -> degree-2 activation -> Linear`` (Conv2d, AvgPool2d,
Flatten and folded BatchNorm count as linear) is such a set of functions, one per output:
the server learns, for example, only the 10 logits of ``784 -> 40 -> x^2 -> 10`` (the
setting of Ryffel et al., NeurIPS 2019) and runs any remaining layers in the clear.
``pip install secureinfer[fe]``.

Construction: the public-key scheme of Dufour-Sans, Gay and Pointcheval, "Reading in the
Dark: Classifying Encrypted Digits with Functional Encryption" (ePrint 2018/206; the
scheme of Ryffel et al. 2019), on the BLS12-381 pairing with mcl (pymcl). Security:
IND-CPA (a ciphertext reveals nothing beyond the values of the functions whose keys the
server holds), proven in the generic bilinear group model, not from a standard
assumption such as SXDH. BLS12-381 is the project's 128-bit curve (recent estimates of
the tower number field sieve put it near 120 bits).

Cost, for ``N = inputs + 1`` coordinates, ``H`` units of the activation, ``C`` outputs:

* master public key ``N`` G1 + ``N`` G2 elements (144 bytes per coordinate);
* functional keys: one G2 element (96 bytes) per output;
* encryption: ``2N`` G1 and ``2N`` G2 scalar multiplications by full-size scalars;
  ciphertext ``2N + 1`` G1 and ``2N`` G2 elements (288 bytes per coordinate);
* decryption: the ciphertext projected on each hidden unit (four products of the integer
  weight matrix with ``N`` group elements, about one group addition per weight), then
  ``2H + C + 2`` pairings: the count grows with the hidden width, not with ``N**2``;
  then one bounded discrete logarithm per output in GT.

Modules: ``dgp`` (the scheme), ``function`` (a quantized prefix as integer quadratic
functions), ``scheme`` (the ``Scheme`` and its fused ``SecureLayer``).
"""

from __future__ import annotations

from typing import Any

from secureinfer.hookspecs import hookimpl

from .scheme import QuadraticFE

__all__ = ["QuadraticFE"]


@hookimpl
def secureinfer_register_schemes(register: Any) -> None:
    """Register ``fe_quad`` (config strings may write ``fe-quad``)."""
    register(QuadraticFE)
