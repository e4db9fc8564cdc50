"""The layer IR: what a compiled network is made of.

A ``LayerSpec`` is a plain dataclass holding numpy weights; plugins see only these, never
torch. Shapes exclude the batch dimension. ``forward`` is the float64 reference evaluation
(batch first) that the ``clear`` scheme and the clear suffix of plaintext-output schemes run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np

from .errors import InvalidLayerError

__all__ = [
    "AvgPool2d",
    "Conv2d",
    "Flatten",
    "LayerSpec",
    "Linear",
    "Poly",
    "forward",
    "im2col",
    "network_degree",
    "nonfinite_parameters",
]


@dataclass(eq=False)
class LayerSpec:
    """One layer of a compiled network.

    Attributes:
        name: where the layer came from (the torch module path), used in every error.
        in_shape: input shape without the batch dimension.
        out_shape: output shape without the batch dimension.
    """

    kind: ClassVar[str] = "layer"
    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.in_shape = tuple(int(d) for d in self.in_shape)
        self.out_shape = self._infer_out_shape()

    def _infer_out_shape(self) -> tuple[int, ...]:
        return self.in_shape

    @property
    def degree(self) -> int:
        """Polynomial degree of the layer as a function of its input."""
        return 1

    def forward(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Evaluate the layer on a batch ``x`` of shape ``(n, *in_shape)``."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short human description, e.g. ``Linear fc1 64->32``."""
        return f"{type(self).__name__} {self.name} {self.in_shape}->{self.out_shape}"


@dataclass(eq=False)
class Linear(LayerSpec):
    """``y = x @ weight.T + bias`` with ``weight`` of shape ``(out, in)``."""

    kind: ClassVar[str] = "linear"
    weight: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    bias: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def _infer_out_shape(self) -> tuple[int, ...]:
        self.weight = np.asarray(self.weight, dtype=np.float64)
        self.bias = np.asarray(self.bias, dtype=np.float64)
        out_f, in_f = self.weight.shape
        if self.in_shape != (in_f,):
            raise InvalidLayerError(f"layer {self.name}: input shape {self.in_shape} != ({in_f},)")
        if self.bias.shape != (out_f,):
            raise InvalidLayerError(f"layer {self.name}: bias shape {self.bias.shape} != ({out_f},)")
        return (out_f,)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    def describe(self) -> str:
        return f"Linear {self.name} {self.weight.shape[1]}->{self.weight.shape[0]}"


def im2col(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int]) -> np.ndarray:
    """Unfold ``x`` of shape ``(n, c, h, w)`` into ``(n, oh*ow, c*kh*kw)`` patches."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    if ph or pw:
        # Not np.pad: on object arrays (Python integers past 64 bits) it pads with
        # numpy.int64 zeros, whose products with big integers overflow.
        padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
        padded[:, :, ph:ph + h, pw:pw + w] = x
        x, h, w = padded, h + 2 * ph, w + 2 * pw
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    win = win[:, :, ::sh, ::sw][:, :, :oh, :ow]  # (n, c, oh, ow, kh, kw)
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n, oh * ow, c * kh * kw)


@dataclass(eq=False)
class Conv2d(LayerSpec):
    """2-D convolution, ``weight`` of shape ``(out_c, in_c, kh, kw)``, no groups or dilation."""

    kind: ClassVar[str] = "conv2d"
    weight: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 1, 1)))
    bias: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    def _infer_out_shape(self) -> tuple[int, ...]:
        self.weight = np.asarray(self.weight, dtype=np.float64)
        self.bias = np.asarray(self.bias, dtype=np.float64)
        self.stride = tuple(int(s) for s in self.stride)  # type: ignore[assignment]
        self.padding = tuple(int(p) for p in self.padding)  # type: ignore[assignment]
        oc, ic, kh, kw = self.weight.shape
        if len(self.in_shape) != 3 or self.in_shape[0] != ic:
            raise InvalidLayerError(f"layer {self.name}: input shape {self.in_shape} is not ({ic}, H, W)")
        _, h, w = self.in_shape
        oh = (h + 2 * self.padding[0] - kh) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - kw) // self.stride[1] + 1
        if oh < 1 or ow < 1:
            raise InvalidLayerError(f"layer {self.name}: kernel {kh}x{kw} larger than input {h}x{w}")
        return (oc, oh, ow)

    def forward(self, x: np.ndarray) -> np.ndarray:
        oc, _, kh, kw = self.weight.shape
        cols = im2col(x, (kh, kw), self.stride, self.padding)
        y = cols @ self.weight.reshape(oc, -1).T + self.bias  # (n, oh*ow, oc)
        return y.transpose(0, 2, 1).reshape(x.shape[0], *self.out_shape)

    def as_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """The convolution as a dense ``(out_features, in_features)`` matrix and bias."""
        n_in = int(np.prod(self.in_shape))
        eye = np.eye(n_in).reshape(n_in, *self.in_shape)
        zero_bias = self.bias
        self.bias = np.zeros_like(zero_bias)
        try:
            cols = self.forward(eye).reshape(n_in, -1)
        finally:
            self.bias = zero_bias
        return cols.T.copy(), np.repeat(self.bias, self.out_shape[1] * self.out_shape[2])

    def describe(self) -> str:
        oc, ic, kh, kw = self.weight.shape
        return f"Conv2d {self.name} {ic}->{oc} k{kh}x{kw} s{self.stride[0]} p{self.padding[0]}"


@dataclass(eq=False)
class AvgPool2d(LayerSpec):
    """Average pooling (a linear layer): square ``kernel``, ``stride``, no padding."""

    kind: ClassVar[str] = "avgpool2d"
    kernel: int = 2
    stride: int = 2

    def _infer_out_shape(self) -> tuple[int, ...]:
        c, h, w = self.in_shape
        return (c, (h - self.kernel) // self.stride + 1, (w - self.kernel) // self.stride + 1)

    def forward(self, x: np.ndarray) -> np.ndarray:
        n, c = x.shape[:2]
        cols = im2col(x.reshape(n * c, 1, *x.shape[2:]), (self.kernel, self.kernel),
                      (self.stride, self.stride), (0, 0))
        return cols.mean(axis=2).reshape(n, *self.out_shape)


@dataclass(eq=False)
class Flatten(LayerSpec):
    """Row-major flatten of everything but the batch dimension."""

    kind: ClassVar[str] = "flatten"

    def _infer_out_shape(self) -> tuple[int, ...]:
        return (int(np.prod(self.in_shape)),)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], -1)


@dataclass(eq=False)
class Poly(LayerSpec):
    """Element-wise polynomial activation, ``coeffs`` lowest degree first.

    ``Square`` is ``coeffs=(0, 0, 1)``.
    """

    kind: ClassVar[str] = "poly"
    coeffs: tuple[float, ...] = (0.0, 0.0, 1.0)

    def _infer_out_shape(self) -> tuple[int, ...]:
        coeffs = [float(c) for c in self.coeffs]
        while len(coeffs) > 1 and coeffs[-1] == 0.0:
            coeffs.pop()
        self.coeffs = tuple(coeffs)
        return self.in_shape

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    @property
    def is_square(self) -> bool:
        """True for exactly ``x**2``."""
        return self.coeffs == (0.0, 0.0, 1.0)

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = np.full_like(x, self.coeffs[-1], dtype=np.float64)
        for c in reversed(self.coeffs[:-1]):
            y = y * x + c
        return y

    def describe(self) -> str:
        return f"Poly {self.name} degree {self.degree} {self.coeffs}"


def forward(layers: list[LayerSpec], x: np.ndarray) -> np.ndarray:
    """Run ``layers`` on the batch ``x`` in float64 (the reference evaluation)."""
    y = np.asarray(x, dtype=np.float64)
    for layer in layers:
        y = layer.forward(y)
    return y


def nonfinite_parameters(layers: list[LayerSpec]) -> list[str]:
    """``"layer.field"`` for every weight, bias or coefficient that is NaN or infinite."""
    found = []
    for layer in layers:
        for f in fields(layer):
            value = getattr(layer, f.name)
            if isinstance(value, (np.ndarray, tuple)) and f.name != "in_shape" \
                    and f.name != "out_shape":
                arr = np.asarray(value, dtype=np.float64) if not isinstance(value, np.ndarray) \
                    else value
                if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
                    found.append(f"{layer.name}.{f.name}")
    return found


def network_degree(layers: list[LayerSpec]) -> int:
    """Total polynomial degree of the composition of ``layers``."""
    degree = 1
    for layer in layers:
        degree *= layer.degree
    return degree
