"""Integer quantization of a layer prefix: the exact reference of the integer schemes.

BFV, inner-product FE and quadratic FE compute on integers. ``quantize`` maps a prefix of
LayerSpecs to integer weights with their scale factors; ``QuantizedNetwork.forward_int`` is
the integer computation those schemes must reproduce exactly, and ``bounds`` are the
worst-case magnitudes they plan their moduli and discrete-log tables from.

Conventions (per-tensor, no zero points):

* input: ``x = s_in * x_q``; non-negative ranges use ``x_q`` in ``[0, 2**bits - 1]``,
  signed ranges ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``;
* Linear / Conv2d: ``W = s_w * W_q`` with ``|W_q| <= 2**(bits-1) - 1``; the output scale is
  ``s_in * s_w`` and the bias is rounded at that scale, so ``y_q = W_q x_q + b_q``;
* AvgPool2d: the integer *sum* of each window, scale divided by the window size;
* Flatten: nothing;
* Poly of degree d: ``y_q = sum_k q_k x_q**k`` with integer ``q_k = round(c_k s**k / s_out)``
  and ``s_out = s**d * 2**-coeff_bits``; ``x**2`` is exactly ``y_q = x_q**2``, ``s_out = s**2``.

Integers grow layer after layer (nothing rescales); arrays switch from int64 to Python
integers (``dtype=object``) where a worst-case bound passes 2**62, so the reference stays
exact at any depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import CompileError, RangeError
from .layers import AvgPool2d, Conv2d, Flatten, LayerSpec, Linear, Poly

__all__ = ["EdgeQuantizer", "QuantLayer", "QuantizedNetwork", "quantize"]

_INT64_SAFE = 2**62


def _as_int(a: np.ndarray, bound: int) -> np.ndarray:
    """int64 when every value fits with room to spare, else Python ints (object)."""
    return a.astype(np.int64) if bound < _INT64_SAFE else a.astype(object)


@dataclass
class QuantLayer:
    """One quantized layer.

    Attributes:
        spec: the float layer it comes from.
        in_scale, out_scale: ``value = scale * integer`` on the way in and out.
        weight, bias: integer weight and bias (Linear, Conv2d as given, not as matrix).
        coeffs: integer polynomial coefficients, lowest first (Poly).
        bound: the largest ``|output integer|`` any in-range input can produce.
    """

    spec: LayerSpec
    in_scale: float
    out_scale: float
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    coeffs: tuple[int, ...] | None = None
    bound: int = 0

    def forward_int(self, x: np.ndarray) -> np.ndarray:
        """Integer evaluation on a batch (int64 or object arrays)."""
        spec = self.spec
        big = self.bound >= _INT64_SAFE
        if isinstance(spec, Linear):
            w = self.weight.astype(object) if big else self.weight
            b = self.bias.astype(object) if big else self.bias
            return (x.astype(object) if big else x) @ w.T + b
        if isinstance(spec, Conv2d):
            from .layers import im2col

            oc, _, kh, kw = spec.weight.shape
            xs = x.astype(object) if big else x
            cols = im2col(xs, (kh, kw), spec.stride, spec.padding)
            w = self.weight.reshape(oc, -1)
            y = cols @ (w.astype(object) if big else w).T + (
                self.bias.astype(object) if big else self.bias)
            return y.transpose(0, 2, 1).reshape(x.shape[0], *spec.out_shape)
        if isinstance(spec, AvgPool2d):
            from .layers import im2col

            n, c = x.shape[:2]
            cols = im2col(x.reshape(n * c, 1, *x.shape[2:]), (spec.kernel, spec.kernel),
                          (spec.stride, spec.stride), (0, 0))
            return cols.sum(axis=2).reshape(n, *spec.out_shape)
        if isinstance(spec, Flatten):
            return x.reshape(x.shape[0], -1)
        if isinstance(spec, Poly):
            xs = x.astype(object) if big else x
            y = np.full(x.shape, self.coeffs[-1], dtype=xs.dtype)
            for c in reversed(self.coeffs[:-1]):
                y = y * xs + c
            return y
        raise CompileError(f"layer {spec.name}: {spec.kind} cannot be quantized")


@dataclass
class QuantizedNetwork:
    """A prefix of layers on integers, with its input quantizer.

    Attributes:
        bits: the bit width of inputs and weights.
        input_range: the calibrated ``(lo, hi)`` inputs must stay inside.
        input_scale: ``x = input_scale * x_q``.
        input_bound: the largest ``|x_q|``.
        layers: the quantized layers, in order.
    """

    bits: int
    input_range: tuple[float, float]
    input_scale: float
    input_bound: int
    layers: list[QuantLayer] = field(default_factory=list)

    @property
    def output_scale(self) -> float:
        """Scale of the last layer's integers."""
        return self.layers[-1].out_scale if self.layers else self.input_scale

    @property
    def bounds(self) -> list[int]:
        """Worst-case ``|integer|`` after each layer."""
        return [layer.bound for layer in self.layers]

    @property
    def max_bound(self) -> int:
        """The largest worst-case ``|integer|`` anywhere in the prefix (input included)."""
        return max([self.input_bound, *self.bounds])

    @property
    def edges(self) -> "EdgeQuantizer":
        """The input quantizer and output scale: all a client needs (no weights)."""
        return EdgeQuantizer(self.bits, self.input_range, self.input_scale, self.input_bound,
                             self.output_scale)

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Map float inputs to integers (``EdgeQuantizer.quantize_input``)."""
        return self.edges.quantize_input(x)

    def forward_int(self, x_q: np.ndarray) -> np.ndarray:
        """Run every quantized layer on integer inputs."""
        y = x_q
        for layer in self.layers:
            y = layer.forward_int(y)
        return y

    def dequantize(self, y_q: np.ndarray) -> np.ndarray:
        """Integers of the last layer back to floats."""
        return self.edges.dequantize(y_q)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Quantize, run on integers, dequantize: what an exact scheme returns."""
        return self.dequantize(self.forward_int(self.quantize_input(x)))

    def to_dict(self) -> dict[str, Any]:
        """Scales and bounds, JSON-able (for reports and plans)."""
        return {"bits": self.bits, "input_range": list(self.input_range),
                "input_scale": self.input_scale, "input_bound": self.input_bound,
                "output_scale": self.output_scale,
                "layers": [{"layer": q.spec.name, "kind": q.spec.kind,
                            "out_scale": q.out_scale, "bound": int(q.bound)}
                           for q in self.layers]}


@dataclass(frozen=True)
class EdgeQuantizer:
    """The two ends of a quantized prefix: float inputs to integers, output integers to
    floats. Rebuilt from a plan's ``quantization`` entry, it is what a client holds.

    Attributes:
        bits: the bit width of inputs.
        input_range: the calibrated ``(lo, hi)`` inputs must stay inside.
        input_scale: ``x = input_scale * x_q``.
        input_bound: the largest ``|x_q|``.
        output_scale: ``y = output_scale * y_q``.
    """

    bits: int
    input_range: tuple[float, float]
    input_scale: float
    input_bound: int
    output_scale: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EdgeQuantizer":
        """From ``QuantizedNetwork.to_dict()`` (a plan's ``quantization`` entry)."""
        lo, hi = data["input_range"]
        return cls(int(data["bits"]), (float(lo), float(hi)), float(data["input_scale"]),
                   int(data["input_bound"]), float(data["output_scale"]))

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Map float inputs to integers; NaN, infinity or values outside ``input_range``
        raise ``RangeError``."""
        x = np.asarray(x, dtype=np.float64)
        lo, hi = self.input_range
        tol = 1e-9 * max(1.0, hi - lo)
        if not np.all(np.isfinite(x)):
            raise RangeError("input contains NaN or infinity: clean or impute it before "
                             "encrypting")
        if x.size and (x.min() < lo - tol or x.max() > hi + tol):
            raise RangeError(
                f"input values span [{x.min():.4g}, {x.max():.4g}] but the model was "
                f"quantized for [{lo:.4g}, {hi:.4g}]: scale the input like the training "
                "data, or recompile with calibration data that covers it")
        q = np.rint(x / self.input_scale)
        low = 0 if lo >= 0 else -self.input_bound  # the bounds assume x_q >= 0 then
        return np.clip(q, low, self.input_bound).astype(np.int64)

    def dequantize(self, y_q: np.ndarray) -> np.ndarray:
        """Integers of the last layer back to floats."""
        return np.asarray(y_q, dtype=np.float64) * self.output_scale


def _weight_quant(w: np.ndarray, bits: int, name: str) -> tuple[np.ndarray, float]:
    qmax = 2 ** (bits - 1) - 1
    peak = float(np.abs(w).max()) if w.size else 0.0
    scale = peak / qmax if peak > 0 else 1.0
    return np.rint(w / scale).astype(np.int64), scale


def quantize(layers: Sequence[LayerSpec], input_range: tuple[float, float], bits: int = 8,
             coeff_bits: int | None = None) -> QuantizedNetwork:
    """Quantize ``layers`` for inputs in ``input_range`` at ``bits`` bits.

    Args:
        layers: the prefix to quantize (Linear, Conv2d, AvgPool2d, Flatten, Poly).
        input_range: calibrated ``(lo, hi)`` of the inputs.
        bits: width of inputs and weights, 2 to 16.
        coeff_bits: fractional bits of polynomial coefficients other than ``x**2``
            (default: ``bits``).

    Raises:
        CompileError: a layer kind that has no integer form, or a bad bit width.
    """
    if not 2 <= int(bits) <= 16:
        raise CompileError(f"quantization: bits={bits} is outside 2..16; 8 is the usual choice")
    coeff_bits = int(bits) if coeff_bits is None else int(coeff_bits)
    lo, hi = float(input_range[0]), float(input_range[1])
    if not hi > lo:
        raise CompileError(f"quantization: empty input range [{lo}, {hi}]")
    if lo >= 0:
        in_bound = 2**bits - 1
        scale = hi / in_bound if hi > 0 else 1.0
    else:
        in_bound = 2 ** (bits - 1) - 1
        scale = max(abs(lo), abs(hi)) / in_bound
    net = QuantizedNetwork(int(bits), (lo, hi), scale, int(in_bound))
    s, bound = scale, int(in_bound)
    for spec in layers:
        if isinstance(spec, (Linear, Conv2d)):
            w_q, s_w = _weight_quant(spec.weight, bits, spec.name)
            out_scale = s * s_w
            b_q = np.array([int(v) for v in np.rint(spec.bias / out_scale)], dtype=object)
            # Each output sums one row (a Linear row, or a Conv2d kernel) of |W_q| * bound.
            rows = np.abs(w_q.reshape(w_q.shape[0], -1)).astype(object).sum(axis=1)
            new_bound = int(max(rows * bound + np.abs(b_q).astype(object)))
            q = QuantLayer(spec, s, out_scale, w_q, _as_int(b_q, new_bound), bound=new_bound)
        elif isinstance(spec, AvgPool2d):
            k2 = spec.kernel * spec.kernel
            q = QuantLayer(spec, s, s / k2, bound=bound * k2)
        elif isinstance(spec, Flatten):
            q = QuantLayer(spec, s, s, bound=bound)
        elif isinstance(spec, Poly):
            d = spec.degree
            if spec.is_square:
                coeffs, out_scale = (0, 0, 1), s * s
            else:
                out_scale = s**d * 2.0**-coeff_bits
                coeffs = tuple(int(round(c * s**k / out_scale)) for k, c in enumerate(spec.coeffs))
            new_bound = int(sum(abs(c) * bound**k for k, c in enumerate(coeffs)))
            q = QuantLayer(spec, s, out_scale, coeffs=coeffs, bound=new_bound)
        else:
            raise CompileError(f"layer {spec.name}: {spec.kind} has no integer form")
        net.layers.append(q)
        s, bound = q.out_scale, q.bound
    return net
