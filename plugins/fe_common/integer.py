"""Exact integer forms of quantized linear layers, and the bounds FE decryption needs.

``secureinfer.quant.quantize`` is the integer reference of every exact scheme. A chain of
its degree-1 layers (Linear, Conv2d, AvgPool2d as a window sum, Flatten) is an integer
affine map ``y = A x + c``: nothing is rounded between the layers, so ``A`` and ``c``
reproduce ``QuantizedNetwork.forward_int`` integer for integer. The FE schemes issue
their functional keys for the rows of ``A`` and add ``c`` (public, part of the model)
after decryption; the bound of ``<A_j, x>`` sizes the discrete-log table.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from secureinfer.errors import CompileError
from secureinfer.quant import QuantLayer

__all__ = ["affine_map", "inner_product_bound"]

_INT64_LIMIT = 2**62


def _run(qlayers: Sequence[QuantLayer], x: np.ndarray) -> np.ndarray:
    y = x
    for q in qlayers:
        y = q.forward_int(y)
    return y.reshape(len(x), -1)


def affine_map(qlayers: Sequence[QuantLayer],
               in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(A, c)`` with ``forward_int(x) == A @ x.ravel() + c`` for every integer input.

    Args:
        qlayers: consecutive quantized layers of degree 1 (no Poly).
        in_shape: the input shape of the first one (no batch dimension).

    Returns:
        ``A`` of shape ``(n_out, n_in)`` and ``c`` of shape ``(n_out,)``, int64.

    Raises:
        CompileError: a nonlinear layer, or integers beyond 2**62.
    """
    for q in qlayers:
        if q.spec.degree != 1 or q.spec.kind == "poly":
            raise CompileError(f"layer {q.spec.name}: {q.spec.describe()} is not linear; an "
                               "integer affine map covers Linear/Conv2d/AvgPool2d/Flatten only")
    n_in = int(np.prod(in_shape))
    zero = _run(qlayers, np.zeros((1, *in_shape), dtype=np.int64))[0]
    cols = _run(qlayers, np.eye(n_in, dtype=np.int64).reshape(n_in, *in_shape))
    a = (cols - zero).T
    for name, arr in (("weights", a), ("bias", zero)):
        if arr.size and int(np.max(np.abs(arr.astype(object)))) >= _INT64_LIMIT:
            raise CompileError(f"layer {qlayers[-1].spec.name}: composed integer {name} exceed "
                               "2**62; quantize with fewer bits")
    return np.ascontiguousarray(a.astype(np.int64)), zero.astype(np.int64)


def inner_product_bound(matrix: np.ndarray, input_bound: int, nonnegative: bool) -> int:
    """The largest ``|A_j . x|`` over the rows of ``matrix`` for every admissible ``x``.

    Args:
        matrix: ``(n_out, n_in)`` integers.
        input_bound: the largest ``|x_i|``.
        nonnegative: inputs lie in ``[0, input_bound]`` (else ``[-input_bound, input_bound]``).
    """
    a = np.asarray(matrix).astype(object)
    if not a.size:
        return 0
    pos = np.where(a > 0, a, 0).sum(axis=1)
    neg = -np.where(a < 0, a, 0).sum(axis=1)
    per_row = np.maximum(pos, neg) if nonnegative else pos + neg
    return int(max(per_row)) * int(input_bound)
