"""Linear layers as integer matrices: what both packings evaluate.

Linear, Conv2d and AvgPool2d (integer window sums) become ``y = M x + b`` over the
flattened features, read off the quantized layer itself (``QuantLayer.forward_int`` on unit
vectors), so the encrypted evaluation computes exactly what the integer reference computes.

A Conv2d that is the *first* layer can instead run on the client's im2col expansion of the
input (``im2col_linear``): the client, who owns the input, lays out every patch, and the
convolution becomes a block-diagonal product that needs a handful of rotations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from secureinfer.layers import Conv2d, Linear, im2col
from secureinfer.quant import QuantLayer

__all__ = ["Im2col", "IntegerLinear", "big_ints", "im2col_linear", "integer_linear", "pow2"]


def pow2(n: int) -> int:
    """The smallest power of two that is at least ``n`` (and at least 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclass(frozen=True)
class Im2col:
    """How the client unfolds an image for a first Conv2d.

    Feature ``k * patches + p`` of the unfolded input is element ``k`` of patch ``p``
    (``k`` runs over ``(channel, row, column)`` of the kernel, as ``im2col`` orders it).
    """

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    patches: int
    taps: int

    def unfold(self, x_q: np.ndarray) -> np.ndarray:
        """``(n, c, h, w)`` integers to ``(n, taps * patches)`` unfolded features."""
        cols = im2col(x_q, self.kernel, self.stride, self.padding)  # (n, patches, taps)
        return cols.transpose(0, 2, 1).reshape(len(x_q), -1)


@dataclass(frozen=True)
class IntegerLinear:
    """``y = matrix @ x + bias`` on integers, with the layer's name for messages.

    Attributes:
        name: the layer (``spec.name``).
        matrix: ``(n_out, n_in)`` int64.
        bias: ``(n_out,)`` Python integers (``dtype=object``: biases are rounded at the
            output scale and can pass 64 bits deep in a network).
        input_slots: for each input feature, its slot within a period (``None``: the
            previous layer's layout).
        output_slots: for each output feature, its slot within a period.
        im2col: set when the client unfolds the input for this layer.
    """

    name: str
    matrix: np.ndarray
    bias: np.ndarray
    output_slots: np.ndarray
    input_slots: np.ndarray | None = None
    im2col: Im2col | None = None

    @property
    def max_row_l1(self) -> int:
        """``max_i sum_j |M_ij|``: how much a weighted sum can grow its inputs' noise."""
        return int(np.abs(self.matrix).sum(axis=1).max()) if self.matrix.size else 0


def integer_linear(q: QuantLayer) -> IntegerLinear:
    """The integer matrix and bias of a quantized Linear, Conv2d or AvgPool2d layer."""
    spec = q.spec
    if isinstance(spec, Linear):
        matrix, bias = np.asarray(q.weight, np.int64), q.bias
    else:
        probe = dataclasses.replace(q, bound=0)  # unit vectors stay small: int64 path
        n_in = int(np.prod(spec.in_shape))
        zero = probe.forward_int(np.zeros((1, *spec.in_shape), np.int64)).reshape(-1)
        unit = probe.forward_int(np.eye(n_in, dtype=np.int64).reshape(n_in, *spec.in_shape))
        matrix = (unit.reshape(n_in, -1) - zero).T.astype(np.int64)
        bias = zero
    return IntegerLinear(spec.name, matrix, big_ints(bias), np.arange(len(bias)))


def big_ints(values: np.ndarray) -> np.ndarray:
    """``values`` (any shape, int, float or object) as Python integers in an object array."""
    arr = np.asarray(values)
    out = np.empty(arr.shape, dtype=object)
    if arr.dtype.kind in "iub":
        out[...] = arr  # numpy integers become Python ints on assignment
    elif arr.size:
        out[...] = np.vectorize(int, otypes=[object])(arr)
    return out


def im2col_linear(q: QuantLayer) -> IntegerLinear:
    """A first Conv2d on the client's unfolded input: a block-diagonal matrix.

    Output feature ``c * patches + p`` (the flattened ``(out_c, oh, ow)`` order) sums
    ``W[c, k] * u[k * patches + p]``. Patch indices are spaced to a power of two (slot
    ``c * P2 + p`` and ``k * P2 + p``) so that every diagonal is a multiple of ``P2``.
    """
    spec = q.spec
    assert isinstance(spec, Conv2d)
    oc, _, kh, kw = spec.weight.shape
    patches = spec.out_shape[1] * spec.out_shape[2]
    w = np.asarray(q.weight, np.int64).reshape(oc, -1)
    taps = w.shape[1]
    matrix = np.kron(w, np.eye(patches, dtype=np.int64))
    bias = big_ints(np.repeat(q.bias, patches))
    spaced = pow2(patches)
    slots_in = (np.arange(taps)[:, None] * spaced + np.arange(patches)).reshape(-1)
    slots_out = (np.arange(oc)[:, None] * spaced + np.arange(patches)).reshape(-1)
    unfold = Im2col((kh, kw), tuple(spec.stride), tuple(spec.padding), patches, taps)
    return IntegerLinear(spec.name, matrix, bias, slots_out, slots_in, unfold)
