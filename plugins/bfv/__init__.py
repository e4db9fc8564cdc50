"""The ``bfv`` scheme: exact encrypted integers with BFV on Pyfhel (SEAL).

``pip install secureinfer[bfv]``. The network runs quantized (``secureinfer.quant``, the
``clear?bits=N`` reference), on integers modulo one or more batching-friendly primes, and
the client's result equals the quantized network run in the clear, integer for integer:

* the planner (``planner``) bounds the output from the quantization, picks primes
  ``t_i = 1 (mod 2N)`` whose product holds it (CRT: the fewest, or up to two more when
  smaller primes make the contexts cheaper by its cost model), the smallest ring degree
  ``N`` with the noise budget for the depth (``noise``), at 128-bit security, and refuses
  at compile time, naming the bound, when nothing fits;
* ``single`` packing (``layout``) puts one input per ciphertext row and runs linear
  layers as rotated diagonals with baby-step giant-step (Galois keys for the rotations
  used only); ``batch`` packing is CryptoNets' one input per slot;
* the client rejects NaN, infinite and out-of-range inputs at encrypt time, checks the
  noise budget of every output ciphertext and the bound of every recombined value (a
  sanity check; the noise budget is the guarantee), or raises;
* a deployed model's server re-randomizes, slot-masks and noise-floods every output
  (``rerandomize``, ``flood_bits`` 40 by default; the planner reserves the flood's noise
  budget), so a decryption shows the result and nothing more of the weights, up to
  statistical distance ``2^-flood_bits`` against the planner's noise estimate; in one
  process, where the client holds the model, it does not (``secureinfer.privacy``).
"""

from __future__ import annotations

from typing import Any

from secureinfer.hookspecs import hookimpl

from .scheme import BfvScheme

__all__ = ["BfvScheme"]


@hookimpl
def secureinfer_register_schemes(register: Any) -> None:
    """Register ``bfv``."""
    register(BfvScheme)
