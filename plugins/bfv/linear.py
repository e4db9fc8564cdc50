"""Linear layers as integer matrices: what both packings evaluate.

Linear, Conv2d and AvgPool2d (integer window sums) become ``y = M x + b`` over the
flattened features, ``M`` kept sparse. Convolutions and pools are unfolded from their
structure and checked against the quantized layer itself (``QuantLayer.forward_int``), so
the encrypted evaluation computes exactly what the integer reference computes.

A Conv2d that is the *first* layer can instead run on the client's im2col expansion of the
input (``im2col_linear``): the client, who owns the input, lays out every patch, and the
convolution becomes a block-diagonal product that needs a handful of rotations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from secureinfer.errors import CompileError
from secureinfer.layers import AvgPool2d, Conv2d, Linear, im2col
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
    """``y = M x + bias`` on integers, ``M`` stored sparse, with the layer's name for messages.

    Attributes:
        name: the layer (``spec.name``).
        shape: ``(n_out, n_in)`` of ``M``.
        rows, cols, vals: the nonzero entries of ``M`` (int64, row-major order): a
            convolution's matrix is mostly zeros, and a dense one of a 32-channel 28x28
            layer would take gigabytes.
        bias: ``(n_out,)`` Python integers (``dtype=object``: biases are rounded at the
            output scale and can pass 64 bits deep in a network).
        input_slots: for each input feature, its slot within a period (``None``: the
            previous layer's layout).
        output_slots: for each output feature, its slot within a period.
        im2col: set when the client unfolds the input for this layer.
    """

    name: str
    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    bias: np.ndarray
    output_slots: np.ndarray
    input_slots: np.ndarray | None = None
    im2col: Im2col | None = None

    @classmethod
    def from_entries(cls, name: str, shape: tuple[int, int], rows: np.ndarray,
                     cols: np.ndarray, vals: np.ndarray, bias: np.ndarray,
                     **kw: object) -> "IntegerLinear":
        """From COO entries (zeros dropped, sorted row-major)."""
        rows, cols, vals = (np.asarray(a, np.int64).reshape(-1) for a in (rows, cols, vals))
        keep = vals != 0
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        order = np.lexsort((cols, rows))
        return cls(name, (int(shape[0]), int(shape[1])), rows[order], cols[order],
                   vals[order], big_ints(bias), **kw)  # type: ignore[arg-type]

    @classmethod
    def from_dense(cls, name: str, matrix: np.ndarray, bias: np.ndarray,
                   **kw: object) -> "IntegerLinear":
        """From a dense ``(n_out, n_in)`` integer matrix."""
        matrix = np.asarray(matrix, np.int64)
        rows, cols = np.nonzero(matrix)
        return cls.from_entries(name, matrix.shape, rows, cols, matrix[rows, cols], bias, **kw)

    def dense(self) -> np.ndarray:
        """``M`` as a dense int64 array (for small layers and tests)."""
        out = np.zeros(self.shape, np.int64)
        out[self.rows, self.cols] = self.vals
        return out

    def row_slices(self) -> list[slice]:
        """For each output, the slice of its entries in ``rows, cols, vals``."""
        bounds = np.searchsorted(self.rows, np.arange(self.shape[0] + 1))
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``M x + bias`` for a vector ``x`` (int64 or Python integers), as Python integers."""
        terms = self.vals.astype(object) * np.asarray(x, dtype=object)[self.cols]
        out = self.bias.copy()
        np.add.at(out, self.rows, terms)
        return out

    @property
    def max_row_l1(self) -> int:
        """``max_i sum_j |M_ij|``: how much a weighted sum can grow its inputs' noise."""
        if not len(self.vals):
            return 0
        sums = np.zeros(self.shape[0], np.int64)
        np.add.at(sums, self.rows, np.abs(self.vals))
        return int(sums.max())

    @property
    def nnz(self) -> int:
        """Nonzero entries."""
        return len(self.vals)


def _weights(q: QuantLayer, weights: np.ndarray | None) -> np.ndarray:
    """The layer's integer weights, or ``weights`` in their place (same shape)."""
    w = np.asarray(q.weight, np.int64)
    if weights is None:
        return w
    if np.shape(weights) != w.shape:
        raise ValueError(f"layer {q.spec.name}: weights of shape {np.shape(weights)} in "
                         f"place of {w.shape}")
    return np.asarray(weights, np.int64)


def integer_linear(q: QuantLayer, weights: np.ndarray | None = None) -> IntegerLinear:
    """The integer matrix and bias of a quantized Linear, Conv2d or AvgPool2d layer.

    A Conv2d or AvgPool2d is unfolded from its structure (``im2col`` of the input
    positions), then checked against ``QuantLayer.forward_int`` on random inputs, so the
    encrypted evaluation computes exactly what the integer reference computes.
    ``weights`` (Linear, Conv2d): integers in place of the layer's weights, and no check:
    ones give the layer's support (where the unpruned matrix has entries: the planner
    counts the all-zero diagonals it skips), ``1..n`` label each entry with its weight.
    """
    spec = q.spec
    if isinstance(spec, Linear):
        return IntegerLinear.from_dense(spec.name, _weights(q, weights), q.bias,
                                        output_slots=np.arange(len(q.bias)))
    n_in = int(np.prod(spec.in_shape))
    n_out = int(np.prod(spec.out_shape))
    # Input positions, shifted by one so that padding (zeros) reads as -1.
    pos = np.arange(1, n_in + 1, dtype=np.int64).reshape(1, *spec.in_shape)
    if isinstance(spec, Conv2d):
        oc, _, kh, kw = spec.weight.shape
        idx = im2col(pos, (kh, kw), spec.stride, spec.padding)[0] - 1  # (patches, taps)
        w = _weights(q, weights).reshape(oc, -1)  # (oc, taps)
        patches = idx.shape[0]
        rows = np.broadcast_to((np.arange(oc)[:, None, None] * patches
                                + np.arange(patches)[None, :, None]), (oc, *idx.shape))
        cols = np.broadcast_to(idx[None], (oc, *idx.shape))
        vals = np.broadcast_to(w[:, None, :], (oc, *idx.shape))
        bias = np.repeat(np.asarray(q.bias), patches)
    elif isinstance(spec, AvgPool2d):
        c, h, w_ = spec.in_shape
        chan = pos.reshape(c, 1, h, w_)
        idx = im2col(chan, (spec.kernel, spec.kernel), (spec.stride, spec.stride), (0, 0)) - 1
        patches = idx.shape[1]
        rows = np.broadcast_to(np.arange(c * patches).reshape(c, patches, 1), idx.shape)
        cols, vals = idx, np.ones(idx.shape, np.int64)
        bias = np.zeros(n_out, np.int64)
    else:
        raise TypeError(f"layer {spec.name}: {spec.kind} is not linear")
    keep = cols >= 0
    lin = IntegerLinear.from_entries(spec.name, (n_out, n_in), rows[keep], cols[keep],
                                     vals[keep], bias, output_slots=np.arange(n_out))
    if weights is None:
        _check_against_reference(lin, q)
    return lin


def _check_against_reference(lin: IntegerLinear, q: QuantLayer) -> None:
    """``M x + b`` must equal ``forward_int(x)`` (small random inputs, int64 path)."""
    probe = dataclasses.replace(q, bound=0)
    x = np.random.default_rng(0).integers(-3, 4, size=(2, *q.spec.in_shape), dtype=np.int64)
    want = probe.forward_int(x).reshape(2, -1)
    for xi, wi in zip(x.reshape(2, -1), want):
        if not np.array_equal(lin.apply(xi).astype(np.int64), wi):
            raise CompileError(f"layer {lin.name}: the unfolded matrix disagrees with the "
                               "quantized layer (a secureinfer bug: please report it)")


def big_ints(values: np.ndarray) -> np.ndarray:
    """``values`` (any shape, int, float or object) as Python integers in an object array."""
    arr = np.asarray(values)
    out = np.empty(arr.shape, dtype=object)
    if arr.dtype.kind in "iub":
        out[...] = arr  # numpy integers become Python ints on assignment
    elif arr.size:
        out[...] = np.vectorize(int, otypes=[object])(arr)
    return out


def im2col_linear(q: QuantLayer, weights: np.ndarray | None = None) -> IntegerLinear:
    """A first Conv2d on the client's unfolded input: a block-diagonal matrix.

    Output feature ``c * patches + p`` (the flattened ``(out_c, oh, ow)`` order) sums
    ``W[c, k] * u[k * patches + p]``. Patch indices are spaced to a power of two (slot
    ``c * P2 + p`` and ``k * P2 + p``) so that every diagonal is a multiple of ``P2``.
    ``weights``: integers in place of the layer's weights (see ``integer_linear``).
    """
    spec = q.spec
    assert isinstance(spec, Conv2d)
    oc, _, kh, kw = spec.weight.shape
    patches = spec.out_shape[1] * spec.out_shape[2]
    w = _weights(q, weights).reshape(oc, -1)
    taps = w.shape[1]
    c, k, p = np.meshgrid(np.arange(oc), np.arange(taps), np.arange(patches), indexing="ij")
    spaced = pow2(patches)
    slots_in = (np.arange(taps)[:, None] * spaced + np.arange(patches)).reshape(-1)
    slots_out = (np.arange(oc)[:, None] * spaced + np.arange(patches)).reshape(-1)
    unfold = Im2col((kh, kw), tuple(spec.stride), tuple(spec.padding), patches, taps)
    return IntegerLinear.from_entries(
        spec.name, (oc * patches, taps * patches), c * patches + p, k * patches + p,
        w[c, k], np.repeat(q.bias, patches), output_slots=slots_out, input_slots=slots_in,
        im2col=unfold)
